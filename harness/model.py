"""`nanokit`, a model for EleutherAI's lm-evaluation-harness: generation through `nano.generate` with
the thinking budget, loglikelihoods through the same model's forward (or, with an ONNX bundle, both
through the bundle's graphs).

    model_args: pretrained=DIR (a checkpoint folder or "nano-tiny"), budget=N|none, grace=N,
                think=true|false, batch_size=N, device=cuda|cpu, dtype=float32|bfloat16,
                max_length=N, onnx=BUNDLE (run an ONNX bundle's graphs instead of torch)

`generate_until` returns the answer, the text after `</think>`, as a reasoning parser would hand it
to a client; the reasoning is counted (`stats`) but not scored. A request's `until` strings cut the
answer after the fact. The prompt is the request's context as one user turn, through the model's
own chat template (which is what puts `<think>` in place); with lm-eval's `--apply_chat_template`
the messages themselves come through. Loglikelihoods read the raw text, without a template, right-
padded in batches (the model is causal, Mamba layers included, so padding after a row changes
nothing before it).

lm-eval has no plugin discovery: importing this module registers the model (`nanokit eval` does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

MESSAGES = "\x00nanokit-messages:"  # marks a context that is chat messages, not text


def parse_budget(value) -> int | None:
    """A budget from model_args: a whole number of tokens, or none/unlimited/None for no limit."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "unlimited", "")):
        return None
    try:
        budget = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a whole number of tokens or 'none', got {value!r}") from None
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return budget


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


@dataclass
class Stats:
    """What the generations did, over every generate_until request so far."""

    requests: int = 0
    reasoning_tokens: int = 0
    answer_tokens: int = 0
    budget_hits: int = 0
    answered_by_length: int = 0
    per_request: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        n = max(1, self.requests)
        return dict(requests=self.requests, mean_reasoning_tokens=round(self.reasoning_tokens / n, 2),
                    mean_answer_tokens=round(self.answer_tokens / n, 2), budget_hit=round(self.budget_hits / n, 4),
                    cut_by_length=round(self.answered_by_length / n, 4))


_LOADED: dict[tuple, object] = {}


def load_model(pretrained: str, device: str | None, dtype: str | None, onnx: str | None = None):
    """`nano.load`, once per (folder, device, dtype, ONNX bundle) in this process: a sweep over
    budgets loads once. With a bundle, the model generates through its graphs (`use_bundle`)."""
    import nano

    key = (str(pretrained), device, dtype, onnx)
    if key not in _LOADED:
        model = nano.load(pretrained, device=device, dtype=getattr(torch, dtype) if dtype else None)
        if onnx:
            use_bundle(model, onnx)
        _LOADED[key] = model
    return _LOADED[key]


def use_bundle(model, bundle) -> None:
    """Make `model` generate through the bundle's graphs, as the Jetson chat does (its tokenizer and
    chat format stay), after checking that the bundle was exported from a model of the same config.
    onnxruntime's intra-op threads are torch's count (so OMP_NUM_THREADS sets both)."""
    from pathlib import Path

    from demos.jetson.chat import OnnxDecoder

    bundle = Path(bundle)
    if not (bundle / "prefill" / "model.onnx").exists() or not (bundle / "config.json").exists():
        raise ValueError(f"{bundle}: not an ONNX bundle (no prefill/model.onnx or config.json); write one with "
                         "nanokit export onnx")
    mine, theirs = _config(Path(model.path) / "config.json"), _config(bundle / "config.json")
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        raise ValueError(f"{bundle} was exported from another model than {model.path}: config.json differs in "
                         f"{', '.join(differ[:6])}; give the --model the bundle came from")

    class BundleDecoder(OnnxDecoder):
        def __init__(self):
            import onnxruntime as ort

            from export.onnx import providers

            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = torch.get_num_threads()
            self.prefill_graph, self.decode_graph = (
                ort.InferenceSession(str(bundle / name / "model.onnx"), options, providers=providers(bundle))
                for name in ("prefill", "decode"))
            self.name = f"ONNX graphs on onnxruntime ({self.decode_graph.get_providers()[0]})"
            self.names = [i.name for i in self.decode_graph.get_inputs()][1:]
            self.caches = None

    decoder = BundleDecoder()
    model.decoder = lambda rows=1, capacity=None: decoder
    model.runtime_name = lambda: decoder.name


def _config(path) -> dict:
    """config.json without the fields that do not change what the model computes."""
    raw = json.loads(path.read_text())
    return {k: v for k, v in raw.items() if k not in ("_name_or_path", "transformers_version", "torch_dtype", "dtype")}


@register_model("nanokit")
class NanoLM(TemplateLM):
    def __init__(self, pretrained: str = "nano-tiny", budget=None, grace=None, think=True, batch_size=16,
                 device: str | None = None, dtype: str | None = None, max_length=None, onnx: str | None = None,
                 model=None, **unused):
        super().__init__()
        if unused:
            raise ValueError(f"unknown model_args for nanokit: {', '.join(sorted(unused))}; known: pretrained, "
                             "budget, grace, think, batch_size, device, dtype, max_length, onnx")
        self.model = model if model is not None else load_model(pretrained, device, dtype, onnx)
        if onnx:
            batch_size = 1  # the bundle's graphs run one row
        self.pretrained, self.onnx = str(pretrained), onnx
        self.budget, self.think = parse_budget(budget), _flag(think)
        self.grace = None if grace in (None, "none", "") else int(grace)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer = self.model.tokenizer
        config = self.model.model.config
        self.max_length = int(max_length or getattr(config, "max_position_embeddings", 4096))
        self.stats = Stats()

    # What lm-eval asks of every model.

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def device(self):
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The messages, kept as messages: `generate_until` hands them to nano.generate, whose template
        (with its reasoning switches) is the model's own."""
        return MESSAGES + json.dumps(chat_history)

    def chat_template(self, chat_template=False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    # Generation.

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        import nano

        bar = tqdm(total=len(requests), desc="generate", disable=disable_tqdm)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):  # rows batch together only with the same settings
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        results: dict[int, str] = {}
        for indices in groups.values():
            settings = dict(requests[indices[0]].args[1] or {})
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            budget = parse_budget(settings["thinking_budget"]) if "thinking_budget" in settings else self.budget
            max_new = int(settings.get("max_gen_toks", 1024))
            temperature = float(settings.get("temperature", 0.0)) if settings.get("do_sample", False) else 0.0
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                prompts = [self._prompt(requests[i].args[0]) for i in chunk]
                generations = nano.generate(self.model, prompts, budget=budget, grace=self.grace, think=self.think,
                                            max_new_tokens=max_new, temperature=temperature,
                                            seed=settings.get("seed"))
                for i, g in zip(chunk, generations):
                    results[i] = _cut(g.answer, until)
                    self._count(g, budget)
                bar.update(len(chunk))
        bar.close()
        return [results[i] for i in range(len(requests))]

    @staticmethod
    def _prompt(context: str):
        return json.loads(context[len(MESSAGES):]) if context.startswith(MESSAGES) else context

    def _count(self, g, budget) -> None:
        s = self.stats
        s.requests += 1
        s.reasoning_tokens += g.reasoning_tokens
        s.answer_tokens += g.answer_tokens
        s.budget_hits += bool(g.budget_hit)
        s.answered_by_length += g.finish_reason == "length"
        s.per_request.append(dict(budget=budget, reasoning_tokens=g.reasoning_tokens, answer_tokens=g.answer_tokens,
                                  budget_hit=bool(g.budget_hit), finish_reason=g.finish_reason))

    # Loglikelihoods.

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            rows = []
            for _, context, continuation in chunk:
                whole = (context + continuation)[-(self.max_length + 1):][:-1]  # the inputs: all but the last
                rows.append((whole, len(continuation)))
            logits = self._logits([r for r, _ in rows])
            for i, ((row, n), (_, _, continuation)) in enumerate(zip(rows, chunk)):
                scores = F.log_softmax(logits[i][len(row) - n : len(row)], dim=-1)
                target = torch.tensor(continuation, device=scores.device)
                logprob = scores.gather(1, target[:, None]).sum().item()
                greedy = bool((scores.argmax(dim=-1) == target).all())
                out.append((logprob, greedy))
        return out

    def _logits(self, rows: list[list[int]]):
        """Next-token logits (fp32) at every position of each row: through the model's forward, the
        rows right-padded into one batch; with a bundle, through its prefill graph one row at a time."""
        if self.onnx:
            import numpy as np

            graph = self.model.decoder().prefill_graph
            return [torch.from_numpy(graph.run(None, {"input_ids": np.array([row], dtype=np.int64)})[0][0]).float()
                    for row in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.eot_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return self.model.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                use_cache=False).logits.float()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for request in requests:
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, context, cont) for context, cont in windows])
            out.append(sum(s for s, _ in scores))
        return out


def _cut(text: str, until: list[str]) -> str:
    """The text up to the first of the stop strings."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text
