"""Logit distillation, as Minitron recovers a pruned model: forward KL on the teacher's logits.

This is the short form the shape search ranks candidates with (a few hundred steps); the
loss is the one the full trainer uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) per token, averaged over tokens, at `temperature`."""
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean") * temperature**2


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
                  warmup: int = 10, seed: int = 0, progress: bool = False) -> list[float]:
    """`steps` AdamW steps of KL distillation of `student` (trained in place) from `teacher` on
    batches drawn from `tokens`; returns the loss of each step."""
    from tqdm.auto import tqdm

    device = next(student.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    teacher.eval()
    student.train()
    losses = []
    for _ in tqdm(range(steps), desc="distill", disable=not progress, leave=False):
        rows = torch.randint(0, tokens.shape[0], (batch_size,), generator=generator)
        batch = tokens[rows].to(device)
        with torch.no_grad():
            target = teacher(input_ids=batch, use_cache=False).logits
        loss = kd_loss(student(input_ids=batch, use_cache=False).logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    student.eval()
    return losses
