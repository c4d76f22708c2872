"""The whole pruning run: importance, depth, width (given or searched), slicing, and the output folder."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nano.atomic import atomic_dir
from nano.checkpoint import write_checkpoint
from nano.memory import format_count, parameter_count

from .importance import Importance, LayerStep, rank_layers, width_importance
from .search import Budget, Candidate, search
from .slicing import slice_model
from .targets import Plan, Sizes


@dataclass
class Result:
    model: torch.nn.Module  # the pruned transformers NemotronHForCausalLM
    plan: Plan
    importance: Importance
    layer_steps: list[LayerStep]
    candidates: list[Candidate] | None
    seconds: dict[str, float] = field(default_factory=dict)
    peak_gib: dict[str, float] = field(default_factory=dict)


class _Stage:
    """Times a stage and, on a GPU, records its peak memory."""

    def __init__(self, result_times: dict, result_peaks: dict, name: str, device: torch.device):
        self.times, self.peaks, self.name, self.cuda = result_times, result_peaks, name, device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peaks[self.name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.times[self.name] = round(time.perf_counter() - self.start, 2)


def prune(teacher, tokens: torch.Tensor, target: Sizes | Budget, *, layers: int | None = None,
          layer_samples: int = 8, layer_metric: str = "kl", batch_size: int = 8, layer_batch_size: int = 2,
          heldout: int = 16, search_options: dict | None = None, progress: bool = False) -> Result:
    """Prune `teacher` (a transformers NemotronHForCausalLM) to `target` with calibration `tokens`.

    `target` is explicit `Sizes` or a `Budget`; with a budget, `layers` sets the depth (depth first,
    then width, as the published recipe) and the last `heldout` samples are kept out of the
    importance and the distillation proxy, to rank the candidates on.
    """
    device = next(teacher.parameters()).device
    times: dict[str, float] = {}
    peaks: dict[str, float] = {}
    stage = lambda name: _Stage(times, peaks, name, device)  # noqa: E731
    pattern = teacher.config.hybrid_override_pattern
    if isinstance(target, Budget):
        if tokens.shape[0] <= heldout:
            raise ValueError(f"a budget search needs more than heldout={heldout} calibration samples, got {tokens.shape[0]}")
        train, held = tokens[:-heldout], tokens[-heldout:]
        removal = Sizes(layers=layers).removal(pattern)
    else:
        train, held = tokens, None
        removal = target.removal(pattern)

    with stage("importance"):
        importance = width_importance(teacher, train, batch_size=batch_size, progress=progress)
    steps: list[LayerStep] = []
    if removal:
        with stage("layers"):
            steps = rank_layers(teacher, train[:layer_samples], removal, metric=layer_metric,
                                batch_size=layer_batch_size, progress=progress)
    drop = tuple(sorted(step.layer for step in steps))

    candidates = None
    if isinstance(target, Budget):
        with stage("search"):
            sizes, candidates = search(teacher, importance, drop, target, train, held, progress=progress,
                                       **(search_options or {}))
    else:
        sizes = target
    plan = sizes.plan(teacher.config, drop)
    with stage("slicing"):
        model = slice_model(teacher, importance, plan)
    return Result(model, plan, importance, steps, candidates, times, peaks)


def _ranking_markdown(candidates: list[Candidate]) -> str:
    lines = ["| hidden | ffn | mamba heads | parameters | memory (GiB) | loss, no training | loss after proxy | kept |",
             "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    for c in candidates:
        lines.append(f"| {c.sizes.hidden} | {c.sizes.ffn} | {c.sizes.mamba_heads} | {format_count(c.parameters)} | "
                     f"{c.memory_gib:.2f} | {fmt(c.zero_shot_loss)} | {fmt(c.proxy_loss)} | {'yes' if c.chosen else ''} |")
    return "\n".join(lines) + "\n"


def write(result: Result, teacher_config, tokenizer, out, record: dict, overwrite: bool = False) -> Path:
    """The pruned checkpoint, with `pruning.json` (what was done and measured), the importance
    scores (`importance.pt`) and, after a search, `ranking.json` and `ranking.md`; all or nothing."""
    pattern = teacher_config.hybrid_override_pattern
    summary = dict(
        record,
        teacher_parameters=parameter_count(teacher_config),
        parameters=parameter_count(result.model.config),
        teacher_pattern=pattern,
        pattern=result.model.config.hybrid_override_pattern,
        plan=dict(hidden=result.plan.hidden, ffn=result.plan.ffn, mamba_heads=result.plan.mamba_heads,
                  attention_heads=result.plan.attention_heads, dropped_layers=list(result.plan.drop)),
        layer_steps=[dict(layer=s.layer, kind=s.kind, score=s.score) for s in result.layer_steps],
        seconds=result.seconds,
        peak_gib=result.peak_gib,
    )
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, result.model, tokenizer)
        torch.save(result.importance.state_dict(), tmp / "importance.pt")
        if result.candidates is not None:
            (tmp / "ranking.json").write_text(json.dumps([c.row() for c in result.candidates], indent=2) + "\n")
            (tmp / "ranking.md").write_text(_ranking_markdown(result.candidates))
        (tmp / "pruning.json").write_text(json.dumps(summary, indent=2) + "\n")
    return Path(out)
