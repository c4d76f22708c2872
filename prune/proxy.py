"""The short distillation the shape search ranks its finalists with, and the held-out loss it ranks by.

The loss and the loop are the trainer's (`prune.distill`), run for a few hundred steps without
checkpoints.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distill import DistillConfig, distill


@torch.no_grad()
def heldout_loss(model, tokens: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token loss of `model` over `tokens` (samples, length)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        batch = tokens[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return total / count


def short_distill(teacher, student, tokens: torch.Tensor, steps: int, lr: float = 1e-4, batch_size: int = 4,
                  seed: int = 0, progress: bool = False) -> list[float]:
    """`steps` steps of KL distillation of `student` (in place) from `teacher`; each step's loss."""
    config = DistillConfig(steps=steps, batch_size=batch_size, micro_batch=batch_size, lr=lr, min_lr=lr,
                           warmup=min(10, steps), seed=seed, activation_checkpointing=False)
    history = distill(teacher, student, tokens, None, config, progress=progress)
    return [row["loss"] for row in history.steps]
