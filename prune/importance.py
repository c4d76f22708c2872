"""How much each part of a NemotronH model matters, from forward passes over calibration data.

Width (one pass over the calibration samples), as Minitron scores it from activations:
- embedding channels: the normalised input of every layer (the output of its pre-norm), scored
  per layer and summed over the layers;
- MLP neurons: the activations after the squared ReLU (the down projection's input);
- Mamba heads: the x part of the input projection (the per-head input of the scan, before the
  conv), whose norm over a head's channels scores the head. Heads share B and C within their
  group, so heads are ranked within their group and every group keeps the same number;
- attention heads: the heads' outputs before o_proj, scored as Mamba heads are.
Aggregation, the choice Minitron found best: the mean of |activation| over a sample's tokens,
then the L2 norm of those means over the samples.

Depth (a second, smaller set of samples): a layer's score is how far the output distribution
moves, KL(original || with that layer removed) per token, or the LM loss with it removed; the
lowest-scoring layer goes, and the scores are taken again on the model without it, greedily,
until the target depth is reached. The candidates of a round run side by side, each layer once on
all their streams, which gives what running each candidate alone gives.

The layers run through `nano.runtime.HybridRuntime` (Triton kernels on a GPU); the tests hold both
measures to slow twins through transformers' own forward with hooks (tests/twins/importance.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nano.config import ATTENTION, MAMBA, MLP
from nano.hardware import PREFILL_TOKENS
from nano.runtime import HybridRuntime


@dataclass
class Importance:
    """Scores (higher: more important) for the width dimensions of a model."""

    hidden: torch.Tensor  # (hidden,)
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)  # MLP layer -> (ffn,)
    mamba_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # Mamba layer -> (heads,)
    attention_heads: dict[int, torch.Tensor] = field(default_factory=dict)  # attention layer -> (heads,)
    samples: int = 0

    def state_dict(self) -> dict:
        out = {"hidden": self.hidden, "samples": self.samples}
        for name in ("ffn", "mamba_heads", "attention_heads"):
            out[name] = {int(k): v for k, v in getattr(self, name).items()}
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> Importance:
        return cls(**state)


class _Sums:
    """Per (layer, tap): the sum over samples of (mean over tokens of |activation|)^2."""

    def __init__(self):
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.samples = 0

    def __call__(self, index: int, name: str, tensor: torch.Tensor) -> None:
        means = torch.linalg.vector_norm(tensor, ord=1, dim=1, dtype=torch.float32) / tensor.shape[1]
        value = means.pow(2).sum(dim=0)
        key = (index, name)
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def importance(self, model) -> Importance:
        config = model.config
        pattern = config.hybrid_override_pattern
        scores = {key: value.sqrt().cpu() for key, value in self.sums.items()}  # L2 over the samples
        hidden = sum(scores[(i, "norm")] for i in range(len(pattern)) if (i, "norm") in scores)
        result = Importance(hidden=hidden, samples=self.samples)
        for i, kind in enumerate(pattern):
            if kind == MLP and (i, "mlp") in scores:
                result.ffn[i] = scores[(i, "mlp")]
            elif kind == MAMBA and (i, "mamba_x") in scores:
                per_head = scores[(i, "mamba_x")].view(config.mamba_num_heads, config.mamba_head_dim)
                result.mamba_heads[i] = torch.linalg.vector_norm(per_head, dim=1)
            elif kind == ATTENTION and (i, "attention") in scores:
                per_head = scores[(i, "attention")].view(config.num_attention_heads, -1)
                result.attention_heads[i] = torch.linalg.vector_norm(per_head, dim=1)
        return result


def _batches(tokens: torch.Tensor, batch_size: int):
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start : start + batch_size]


def _progress(total: int, description: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="sample", disable=not enabled, leave=False)


@torch.no_grad()
def width_importance(model, tokens: torch.Tensor, batch_size: int = 8, progress: bool = False) -> Importance:
    """Width importance of a transformers `NemotronHForCausalLM` over `tokens` (samples, length)."""
    device = next(model.parameters()).device
    sums = _Sums()
    layers = range(len(model.config.hybrid_override_pattern))
    runtime = None
    with _progress(tokens.shape[0], "importance", progress) as bar:
        for batch in _batches(tokens, batch_size):
            batch = batch.to(device)
            if runtime is None or runtime.rows != batch.shape[0]:
                runtime = HybridRuntime(model, batch.shape[0], batch.shape[1] + 1, prefill_chunk=batch.shape[1])
            runtime.run_layers(model.model.embeddings(batch), layers, observe=sums)
            sums.samples += batch.shape[0]
            bar.update(batch.shape[0])
    return sums.importance(model)


# Depth.

METRICS = ("kl", "loss")
STREAM_BYTES = 4 << 30  # the layer ranking's candidate streams side by side; more go in groups


def _distance(model, normed: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, metric: str,
              slice_tokens: int = 2048) -> torch.Tensor:
    """Sum over tokens of the metric for final-normed hidden states `normed` (rows, T, hidden):
    KL(reference model || this one), or this one's next-token loss."""
    head = model.lm_head.weight
    total = torch.zeros((), dtype=torch.float64, device=normed.device)
    flat, ref = normed.flatten(0, 1), reference.flatten(0, 1)
    targets = torch.cat([tokens[:, 1:], torch.full_like(tokens[:, :1], -100)], dim=1).flatten()
    for start in range(0, flat.shape[0], slice_tokens):
        part = slice(start, start + slice_tokens)
        log_p = F.log_softmax(F.linear(flat[part], head).float(), dim=-1)
        if metric == "kl":
            log_q = F.log_softmax(F.linear(ref[part], head).float(), dim=-1)
            total += F.kl_div(log_p, log_q, log_target=True, reduction="sum").double()
        else:
            total += F.nll_loss(log_p, targets[part], reduction="sum", ignore_index=-100).double()
    return total


@dataclass
class LayerStep:
    """One greedy step: the layer removed, its score, and every candidate's score at that step."""

    layer: int
    kind: str
    score: float
    scores: dict[int, float]


def _quota(pattern: str, remove) -> dict[str, int]:
    if isinstance(remove, int):
        return {"any": remove}
    for kind, count in remove.items():
        if kind not in (MAMBA, ATTENTION, MLP) or count < 0 or count > pattern.count(kind):
            raise ValueError(f"cannot remove {count} layers of kind {kind!r} from pattern {pattern!r}")
    return dict(remove)


def _candidates(pattern: str, removed: list[int], quota: dict[str, int]) -> list[int]:
    if "any" in quota:
        return [i for i in range(len(pattern)) if i not in removed] if len(removed) < quota["any"] else []
    left = {k: n - sum(pattern[i] == k for i in removed) for k, n in quota.items()}
    return [i for i, k in enumerate(pattern) if i not in removed and left.get(k, 0) > 0]


def _steps(pattern, remove, score_round) -> list[LayerStep]:
    quota = _quota(pattern, remove)
    removed: list[int] = []
    steps = []
    while candidates := _candidates(pattern, removed, quota):
        scores = score_round(removed, candidates)
        best = min(candidates, key=lambda i: (scores[i], i))
        removed.append(best)
        steps.append(LayerStep(best, pattern[best], scores[best], scores))
    return steps


@torch.no_grad()
def rank_layers(model, tokens: torch.Tensor, remove, metric: str = "kl", batch_size: int = 2,
                progress: bool = False, tokens_per_call: int = PREFILL_TOKENS,
                stream_bytes: int = STREAM_BYTES) -> list[LayerStep]:
    """Remove layers greedily: `remove` is a count, or a count per kind ({"M": 1, "*": 2, "-": 3}).

    Each round scores every candidate on the model without the layers removed so far, and removes
    the lowest. The candidates run side by side (`_without_each`): one pass over the layers, each
    layer run once on the streams of all the candidates that keep it, at most `tokens_per_call`
    tokens a call, and batches small enough share a pass (`_runs`). The arithmetic is that of
    running each candidate alone from the stream entering the layer it skips, and so are the
    scores, batch by batch; but a round makes a call per layer, not one per candidate and layer
    after it, and on a small model (or a busy CPU) it is the calls that cost, not the arithmetic.
    The streams side by side take at most `stream_bytes` (beyond one): a large model's candidates go
    in groups that fit, a pass per group, with the same arithmetic.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown layer metric {metric!r}; known: {', '.join(METRICS)}")
    pattern = model.config.hybrid_override_pattern
    device = next(model.parameters()).device
    slots = len(pattern) + 1  # the most streams a pass carries: every layer a candidate, and the model
    runs = _runs([b.to(device) for b in _batches(tokens, batch_size)], slots, tokens_per_call)
    per_call = [max(1, tokens_per_call // sum(b.numel() for b in run)) for run in runs]
    rows = max(min(n, slots) * sum(b.shape[0] for b in run) for n, run in zip(per_call, runs))
    runtime = HybridRuntime(model, rows, tokens.shape[1] + 1, prefill_chunk=tokens.shape[1])
    everything = range(len(pattern))
    references = [_split(runtime.final_norm(runtime.run_layers(_embed(model, run), everything)), run) for run in runs]
    count = tokens.numel()
    rounds = remove if isinstance(remove, int) else sum(remove.values())
    bar = _progress(rounds * tokens.shape[0], "layers", progress)

    def score_round(removed, candidates):
        active = [i for i in everything if i not in removed]
        order = sorted(candidates)
        sums = {i: 0.0 for i in order}
        for run, n, refs in zip(runs, per_call, references):
            stream = _embed(model, run)
            group = max(1, stream_bytes // (stream.numel() * stream.element_size()) - 1)
            for i, end in _without_each(runtime, stream, active, order, n, group):
                for batch, reference, part in zip(run, refs, _split(end, run)):
                    sums[i] += _distance(model, runtime.final_norm(part), reference, batch, metric).item()
            bar.update(sum(b.shape[0] for b in run))
        return {i: s / count for i, s in sums.items()}

    try:
        return _steps(pattern, remove, score_round)
    finally:
        bar.close()


def _runs(batches: list[torch.Tensor], slots: int, tokens_per_call: int) -> list[list[torch.Tensor]]:
    """The batches in runs of consecutive ones, each run as large as lets `slots` streams of it go
    in one call (at least one batch): a pass costs a call per layer whatever it carries."""
    runs: list[list[torch.Tensor]] = [[]]
    for batch in batches:
        if runs[-1] and (sum(b.numel() for b in runs[-1]) + batch.numel()) * slots > tokens_per_call:
            runs.append([])
        runs[-1].append(batch)
    return runs


def _embed(model, run: list[torch.Tensor]) -> torch.Tensor:
    return model.model.embeddings(torch.cat(run))


def _split(stream: torch.Tensor, run: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return stream.split([b.shape[0] for b in run])


def _without_each(runtime: HybridRuntime, stream: torch.Tensor, active: list[int], candidates: list[int],
                  per_call: int, group: int):
    """Yields (candidate, the residual stream after the `active` layers with it left out), for each
    of `candidates` (ascending), `group` candidates at a time.

    Slot 0 carries the stream of all the active layers; a candidate's slot starts as a copy of it
    when its layer comes (the stream entering the layer it skips) and runs every active layer after.
    Slots start in layer order, so a layer runs on the first slots, `per_call` of them a call. Slot 0
    stops once the group's last candidate has started from it, and the next group goes on from there:
    the arithmetic is that of running each candidate alone, and the memory `group` + 1 streams.
    """
    base, position = stream, 0  # base: the stream entering active[position]
    for first_member in range(0, len(candidates), group):
        members = candidates[first_member : first_member + group]
        streams = stream.new_empty((len(members) + 1, *stream.shape))
        streams[0] = base
        slot = {layer: k + 1 for k, layer in enumerate(members)}
        started = 0
        for index in range(position, len(active)):
            layer = active[index]
            skips = layer in slot
            if skips:
                streams[slot[layer]] = streams[0]
                if started + 1 == len(members):
                    base, position = streams[0].clone(), index  # the next group starts here
            first = 0 if started + skips < len(members) else 1
            for begin in range(first, started + 1, per_call):
                part = streams[begin : min(begin + per_call, started + 1)]
                part.copy_(runtime.run_layers(part.flatten(0, 1), [layer]).view_as(part))
            started += skips
        for k, layer in enumerate(members):
            yield layer, streams[k + 1]
        del streams
