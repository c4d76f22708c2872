"""A fake model whose next tokens the test dictates, for testing the controller at exact positions.

A script is a function of what has been generated so far (forced tokens included) that returns
the token the model wants next, so the fake reacts to a forced `</think>` as a real model would.
The fake puts a high logit on that token and a lower one on a fallback ("x"), which is what the
sampler picks if the controller forbids the scripted token.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from nano.chat import ChatFormat
from nano.decoder import Decoder
from nano.generation import generate
from nano.tiny import TINY_CONFIG, tiny_config, tiny_tokenizer

Script = Callable[[list[int]], int]

TOKENIZER = tiny_tokenizer()
_CONFIG = tiny_config()


def tok(text: str) -> int:
    (token,) = TOKENIZER.encode(text, add_special_tokens=False)
    return token


A, B, X, NL, SPACE = tok("a"), tok("b"), tok("x"), tok("\n"), tok(" ")
OPEN, CLOSE = tok("<think>"), tok("</think>")
EOS = tok("<SPECIAL_12>")
TOOL_OPEN, TOOL_CLOSE = tok("<TOOLCALL>"), tok("</TOOLCALL>")


class ScriptedDecoder(Decoder):
    name = "scripted"

    def __init__(self, owner: "ScriptedModel"):
        self.owner = owner
        self.histories: list[list[int]] = []

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.owner.prefills += 1
        self.histories = [[] for _ in range(input_ids.shape[0])]
        return self._logits()

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        assert tokens.shape == (len(self.histories),), "a decode step takes exactly one token per row"
        self.owner.steps += 1
        for history, token in zip(self.histories, tokens.tolist()):
            history.append(token)
        return self._logits()

    def _logits(self) -> torch.Tensor:
        logits = torch.zeros(len(self.histories), self.owner.config.vocab_size)
        for row, history in enumerate(self.histories):
            logits[row, X] = 5.0
            logits[row, self.owner.scripts[row % len(self.owner.scripts)](history)] = 10.0
        return logits


class ScriptedModel:
    """Quacks like `nano.Model` for `nano.generate`: the tiny tokenizer and chat format, scripted logits."""

    def __init__(self, *scripts: Script, context: int = TINY_CONFIG["max_position_embeddings"]):
        self.scripts = scripts
        self.tokenizer = TOKENIZER
        self.config = SimpleNamespace(vocab_size=_CONFIG.vocab_size, max_position_embeddings=context)
        self.chat = ChatFormat(TOKENIZER, _CONFIG.eos_token_id)
        self.device = torch.device("cpu")
        self.prefills = 0
        self.steps = 0

    def decoder(self, rows: int = 1, capacity: int | None = None) -> ScriptedDecoder:
        return ScriptedDecoder(self)

    def generate(self, prompt="Q?", **kwargs):
        kwargs.setdefault("max_new_tokens", 400)
        return generate(self, prompt, **kwargs)


def thinker(think_len: int, answer_len: int = 4, newlines: Sequence[int] = ()) -> Script:
    """Reasons `think_len` tokens ("a", or a newline at the given 0-based positions), then closes
    reasoning itself, answers `answer_len` tokens ("b") and ends its turn."""

    def script(history: list[int]) -> int:
        if CLOSE not in history:
            r = len(history)
            if r >= think_len:
                return CLOSE
            return NL if r in newlines else A
        return B if history.count(B) < answer_len else EOS

    return script


def sequence(tokens: Sequence[int]) -> Script:
    """Proposes `tokens` in order whatever happens, then ends its turn."""

    def script(history: list[int]) -> int:
        return tokens[len(history)] if len(history) < len(tokens) else EOS

    return script


@functools.lru_cache(maxsize=None)
def bundled_budget():
    """The `nanokit_budget` package exactly as a TensorRT-LLM bundle carries it, written for the tiny
    tokenizer into a temporary folder and imported from there."""
    import importlib
    import sys
    import tempfile
    from pathlib import Path

    from export.trtllm_budget import PROCESSOR_PACKAGE, write_budget_packages

    folder = Path(tempfile.mkdtemp(prefix="nanokit-budget-"))
    write_budget_packages(folder, ChatFormat(TOKENIZER, _CONFIG.eos_token_id), _CONFIG.vocab_size)
    sys.path.insert(0, str(folder))
    return importlib.import_module(PROCESSOR_PACKAGE)


class TrtllmScripted(ScriptedModel):
    """The same scripted model generating through the stand-in for TensorRT-LLM 1.2.1's engine
    (tests/trtllm_standin.py) with the bundle's `ThinkingBudget` processor instead of nano.generate.

    The prompt is rendered as nano.generate renders it (a client asking for budget 0 or
    think=False sends reasoning off); the processor is handed the user's budget and finds the rest
    in the prompt's ids."""

    def __init__(self, *scripts: Script, prefill_chunks: int = 2, overlap: bool = False, logits_device: str = "cpu",
                 **kwargs):
        super().__init__(*scripts, **kwargs)
        self.prefill_chunks, self.overlap, self.logits_device = prefill_chunks, overlap, logits_device
        self.engine = None

    def generate(self, prompt="Q?", budget=None, grace=None, think=True, max_new_tokens=400):
        from nano.generation import _generation
        from trtllm_standin import Engine

        batched = isinstance(prompt, list)
        prompts = prompt if batched else [prompt]
        budgets = budget if isinstance(budget, list) else [budget] * len(prompts)
        graces = grace if isinstance(grace, list) else [grace] * len(prompts)
        ThinkingBudget = bundled_budget().ThinkingBudget

        def logits_of(row: int, generated: list[int]) -> torch.Tensor:
            logits = torch.zeros(self.config.vocab_size)
            logits[X] = 5.0
            logits[self.scripts[row % len(self.scripts)](generated)] = 10.0
            return logits

        self.engine = engine = Engine(logits_of, self.config.vocab_size, self.prefill_chunks, self.overlap,
                                      self.logits_device)
        requests = []
        for i, (p, b, g) in enumerate(zip(prompts, budgets, graces)):
            text, _ = self.chat.render(p, think=bool(think) and b != 0)
            requests.append(engine.add(100 + i, self.chat.encode(text), ThinkingBudget(b, g), max_new_tokens,
                                       self.chat.think.eos))
        engine.run(requests)
        results = []
        for r in requests:
            state = r.processors[0].state(r.req_id, r.prompt + r.generated)
            results.append(_generation(self.tokenizer, r.generated, state["kinds"], state["budget_hit"], len(r.prompt)))
        return results if batched else results[0]
