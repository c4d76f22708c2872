"""Searching the width under a budget, as Minitron does: enumerate, screen, distill the best briefly.

1. Enumerate a grid of widths at the chosen depth: hidden and FFN in steps of 1/64 of the
   teacher's (hidden down to 40/64, FFN down to 32/64), Mamba heads in steps of one per group
   (down to 3/4); attention heads stay. Keep those within the budget and no more than
   `tolerance` below it (a much smaller model wastes the budget).
2. Screen: prune up to `screen` of them, spread evenly over the list, and measure each one's
   held-out loss without training.
3. Distill the best `finalists` for `proxy_steps` steps each (the same data, seed and schedule),
   and keep the one with the lowest held-out loss after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from nano.memory import GIB, Shape, usable_bytes
from nano.memory import plan as memory_plan

from .targets import Sizes, pruned_config_dict


@dataclass(frozen=True)
class Budget:
    """At most `params` parameters, or a fit in memory on `gpu` at `context` tokens (batch 1)."""

    params: float | None = None
    gpu: str | None = None
    context: int | None = None

    def __post_init__(self):
        if (self.params is None) == (self.gpu is None):
            raise ValueError("a budget is either a number of parameters or a GPU and a context length")
        if self.gpu is not None:
            usable_bytes(self.gpu)  # names the known GPUs if this one is not
            if not self.context or self.context < 1:
                raise ValueError(f"a memory budget needs a context length of at least 1, got {self.context!r}")

    def measure(self, fields: dict) -> tuple[float, float]:
        """(what the budget limits for this config, the limit)."""
        if self.params is not None:
            return Shape.of(fields).parameters(), self.params
        result = memory_plan(fields, self.gpu, self.context)
        return result.total, result.usable

    def describe(self) -> str:
        return f"{self.params:.4g} parameters" if self.params is not None else f"{self.gpu} at {self.context} tokens"


@dataclass
class Candidate:
    sizes: Sizes
    parameters: int
    memory_gib: float
    measure: float
    zero_shot_loss: float | None = None
    proxy_loss: float | None = None
    chosen: bool = False

    def row(self) -> dict:
        return dict(
            hidden=self.sizes.hidden, ffn=self.sizes.ffn, mamba_heads=self.sizes.mamba_heads,
            parameters=self.parameters, memory_gib=round(self.memory_gib, 3),
            zero_shot_loss=self.zero_shot_loss, proxy_loss=self.proxy_loss, chosen=self.chosen,
        )


def _steps(original: int, lowest: int, denominator: int = 64) -> list[int]:
    values = {max(1, round(original * k / denominator)) for k in range(lowest, denominator + 1)}
    return sorted(values, reverse=True)


def grid(config, drop, budget: Budget, tolerance: float = 0.02, context_for_memory: int = 131072) -> list[Candidate]:
    """Every width on the grid at depth `drop` within `budget` and no more than `tolerance` under it;
    ValueError, with what to change, when there is none."""
    groups, heads = config.n_groups, config.mamba_num_heads
    head_choices = [h for h in range(heads, 0, -groups) if h >= heads * 3 / 4]
    out = []
    for hidden in _steps(config.hidden_size, 40):
        for ffn in _steps(config.intermediate_size, 32):
            for mamba_heads in head_choices:
                sizes = Sizes(hidden=hidden, ffn=ffn, mamba_heads=mamba_heads)
                fields = pruned_config_dict(config, sizes.plan(config, drop))
                value, limit = budget.measure(fields)
                if (1 - tolerance) * limit <= value <= limit:
                    memory = memory_plan(fields, budget.gpu or "h100", budget.context or context_for_memory)
                    out.append(Candidate(sizes, Shape.of(fields).parameters(), memory.total / GIB, value))
    if not out:
        raise ValueError(
            f"no width on the grid fits {budget.describe()} within {tolerance:.0%} of it at depth "
            f"{len(config.hybrid_override_pattern) - len(drop)}; change the depth (--layers) or the budget"
        )
    return out


def _spread(items: list, count: int) -> list:
    if len(items) <= count:
        return list(items)
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)] if count > 1 else items[:1]


def search(teacher, importance, drop, budget: Budget, train_tokens, heldout_tokens, *, tolerance: float = 0.02,
           screen: int = 8, finalists: int = 3, proxy_steps: int = 200, lr: float = 1e-4, batch_size: int = 4,
           progress: bool = False):
    """The best width under `budget` and the table of every candidate tried (see the module doc)."""
    from .proxy import heldout_loss, short_distill
    from .slicing import slice_model

    found = grid(teacher.config, drop, budget, tolerance)
    found.sort(key=lambda c: (c.sizes.hidden, c.sizes.ffn, c.sizes.mamba_heads), reverse=True)
    tried = _spread(found, screen)
    for candidate in tried:
        student = slice_model(teacher, importance, candidate.sizes.plan(teacher.config, drop))
        candidate.zero_shot_loss = heldout_loss(student, heldout_tokens, batch_size)
        del student
    best = sorted(tried, key=lambda c: c.zero_shot_loss)[:finalists]
    for candidate in best:
        student = slice_model(teacher, importance, candidate.sizes.plan(teacher.config, drop))
        short_distill(teacher, student, train_tokens, proxy_steps, lr=lr, batch_size=batch_size, progress=progress)
        candidate.proxy_loss = heldout_loss(student, heldout_tokens, batch_size)
        del student
    winner = min(best, key=lambda c: c.proxy_loss)
    winner.chosen = True
    return winner.sizes, tried
