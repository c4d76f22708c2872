"""The distillation trainer: a pruned student learns the teacher's logits (Minitron's recovery).

One loop, read top to bottom in `distill`:
- each optimizer step takes `batch_size` sequences, in micro-batches of `micro_batch` per process,
  chosen from the step number alone (`nano.samples`: a seeded permutation per epoch of samples in
  memory, or draws from token stores on disk by memory map), so a resumed run sees exactly the
  batches an uninterrupted one would, and each process reads only its own sequences;
- loss: forward KL(teacher || student) at `temperature` (optionally over the teacher's top-k
  logits only), plus `ce_weight` x the next-token loss (0 by default, as in the Minitron recipe);
- AdamW, linear warm-up then cosine decay, or warmup-stable-decay (WSD);
- held-out LM loss and KL to the teacher every `eval_every` steps;
- a checkpoint every `save_every` steps (model, optimizer, step and history), written atomically;
  `resume=True` continues from the newest, bitwise the same on the CPU.
Under `torchrun` the student and the teacher are sharded with PyTorch's FSDP2 (`fully_shard`) and
the processes share each step's sequences; bf16 autocast on GPUs.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nano.atomic import atomic_dir
from nano.config import layer_pattern
from nano.samples import TensorSamples


@dataclass
class DistillConfig:
    steps: int
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch: int = 1  # sequences per forward and backward, per process
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup: int = 20
    schedule: str = "cosine"  # or "wsd": warm-up, constant, then a linear decay over the last `decay_fraction`
    decay_fraction: float = 0.2
    weight_decay: float = 0.0
    temperature: float = 1.0
    top_k: int | None = None
    ce_weight: float = 0.0
    eval_every: int = 50
    save_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    activation_checkpointing: bool = True
    checkpoint_kinds: str = "M*-"  # pattern letters of the layers recomputed in backward; others keep activations
    shard_teacher: bool = True  # under torchrun; False keeps a whole teacher per process (no gathers, more memory)
    fast_forward: bool = True  # Mamba on mamba-ssm's Triton kernels, norms and ReLU^2 compiled (prune.fast_training)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"schedule must be 'cosine' or 'wsd', got {self.schedule!r}")
        if not self.checkpoint_kinds or set(self.checkpoint_kinds) - set("M*-E"):
            raise ValueError(f"checkpoint_kinds takes pattern letters from 'M*-E', got {self.checkpoint_kinds!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")

    def learning_rate(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "cosine":
            progress = (step - self.warmup) / max(1, self.steps - self.warmup)
            return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        decay_start = self.steps - int(self.decay_fraction * self.steps)
        if step < decay_start:
            return self.lr
        return self.lr + (self.min_lr - self.lr) * (step - decay_start + 1) / max(1, self.steps - decay_start)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            top_k: int | None = None) -> torch.Tensor:
    """Forward KL(teacher || student) per token, averaged over tokens, at `temperature`.

    With `top_k`, the teacher's distribution is its k largest logits renormalised (what a run
    that stores only the top-k logits has), and the student is scored on those tokens."""
    vocab = student_logits.shape[-1]
    log_q = F.log_softmax(student_logits.reshape(-1, vocab).float() / temperature, dim=-1)
    teacher = teacher_logits.reshape(-1, vocab).float() / temperature
    if top_k is None:
        log_p = F.log_softmax(teacher, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
    else:
        values, index = teacher.topk(top_k, dim=-1)
        log_p = F.log_softmax(values, dim=-1)
        kl = (log_p.exp() * (log_p - log_q.gather(-1, index))).sum(-1).mean()
    return kl * temperature**2


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(model: torch.nn.Module, param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: shard each layer and the whole model over the processes of the default group (once).
    With `param_dtype`, the gathered weights are cast to it once per gather (fp32 masters stay
    sharded) and gradients are reduced in fp32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if isinstance(model, FSDPModule):
        return
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mp_policy": policy} if policy else {}
    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


@torch.no_grad()
def evaluate(teacher, student, tokens: torch.Tensor, config: DistillConfig, device) -> dict[str, float]:
    """Held-out next-token loss of the student and its KL to the teacher, over all processes."""
    rank, world = _world()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, its tokens, KL sum, its positions
    was_training = student.training
    student.eval()
    for start in range(rank * config.micro_batch, tokens.shape[0], world * config.micro_batch):
        batch = tokens[start : start + config.micro_batch].to(device)
        with _autocast(device):
            s_logits = student(input_ids=batch, use_cache=False).logits
        sums[0] += F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        sums[1] += batch[:, 1:].numel()
        if teacher is not None:
            with _autocast(device):
                t_logits = teacher(input_ids=batch, use_cache=False).logits
            sums[2] += kd_loss(s_logits, t_logits, config.temperature) * batch.numel()
            sums[3] += batch.numel()
    if world > 1:
        dist.all_reduce(sums)
    student.train(was_training)
    out = {"lm_loss": (sums[0] / sums[1]).item()}
    if teacher is not None:
        out["kl"] = (sums[2] / sums[3]).item()
    return out


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


# Checkpoints: <dir>/step-000123/{model.pt, optimizer.pt, trainer.json}, each folder written at once.

def _checkpoints(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("step-*") if (p / "trainer.json").exists())


def _save(folder: Path, step: int, student, optimizer, history: dict, config: DistillConfig) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    rank, _ = _world()
    if rank == 0:
        with atomic_dir(folder / f"step-{step:06d}") as tmp:
            torch.save(model_state, tmp / "model.pt")
            torch.save(optim_state, tmp / "optimizer.pt")
            (tmp / "trainer.json").write_text(json.dumps({"step": step, "config": asdict(config), **history}) + "\n")
        for old in _checkpoints(folder)[: -config.keep_checkpoints]:
            for file in old.iterdir():
                file.unlink()
            old.rmdir()
    if dist.is_initialized():
        dist.barrier()


def _load(checkpoint: Path, student, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    model_state = torch.load(checkpoint / "model.pt", map_location="cpu", weights_only=True)
    optim_state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=False)
    set_state_dict(student, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))
    return json.loads((checkpoint / "trainer.json").read_text())


@dataclass
class History:
    steps: list[dict] = field(default_factory=list)  # step, loss, lr, tokens, seconds
    evals: list[dict] = field(default_factory=list)  # step, lm_loss, kl
    resumed_from: int | None = None  # the checkpoint's step, when resumed


def distill(teacher, student, train_tokens, eval_tokens: torch.Tensor | None, config: DistillConfig,
            checkpoints: str | os.PathLike | None = None, resume: bool = False, progress: bool = False) -> History:
    """Train `student` (in place) on `teacher`'s logits over `train_tokens`: a tensor (samples,
    length), or a sample source read draw by draw (`nano.samples.Blend`: token stores on disk);
    with `teacher=None`, on the next-token loss alone (training from scratch, the baseline).

    Run it in one process, or in each process of `torchrun` (after `dist.init_process_group`):
    the models are then sharded with FSDP2. Returns the loss of every step and the evaluations.
    """
    from tqdm.auto import tqdm

    rank, world = _world()
    device = next(student.parameters()).device
    per_process = config.batch_size // world
    if config.batch_size % world or per_process % config.micro_batch:
        raise ValueError(f"batch_size={config.batch_size} must split evenly over {world} processes in "
                         f"micro-batches of {config.micro_batch}")
    accumulation = per_process // config.micro_batch
    if config.activation_checkpointing:
        _checkpointing(student, True, config.checkpoint_kinds)
    if config.fast_forward:
        from .fast_training import use_fast_training

        for model in (student, teacher):
            if model is not None:
                use_fast_training(model)
    if world > 1:
        shard(student, torch.bfloat16 if device.type == "cuda" else None)
        if teacher is not None and config.shard_teacher:
            shard(teacher)
    if teacher is not None:
        teacher.eval()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.95), fused=True if device.type == "cuda" else None)
    history = History()
    start_step = 0
    folder = Path(checkpoints) if checkpoints is not None else None
    if resume:
        found = _checkpoints(folder) if folder is not None and folder.exists() else []
        if found:
            state = _load(found[-1], student, optimizer)
            start_step = state["step"]
            history = History(state["steps"], state["evals"], resumed_from=start_step)

    source = TensorSamples(train_tokens, config.seed) if isinstance(train_tokens, torch.Tensor) else train_tokens
    tokens_per_step = config.batch_size * source.length
    bar = tqdm(total=config.steps, initial=start_step, desc="distill", unit="step", disable=not progress or rank != 0)
    for step in range(start_step, config.steps):
        started = time.perf_counter()
        lr = config.learning_rate(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        first = step * config.batch_size + rank * per_process  # this process's draws of the step
        total = torch.zeros((), device=device)
        for micro in range(accumulation):
            start = first + micro * config.micro_batch
            batch = source.take(range(start, start + config.micro_batch)).to(device)
            with _autocast(device):
                s_logits = student(input_ids=batch, use_cache=False).logits
            if teacher is None:  # training from scratch: the next-token loss alone
                loss = F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            else:
                with torch.no_grad(), _autocast(device):
                    t_logits = teacher(input_ids=batch, use_cache=False).logits
                loss = kd_loss(s_logits, t_logits, config.temperature, config.top_k)
                if config.ce_weight:
                    ce = F.cross_entropy(s_logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
                    loss = loss + config.ce_weight * ce
            (loss / accumulation).backward()
            total += loss.detach() / accumulation
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if world > 1:
            dist.all_reduce(total)
            total /= world
        seconds = time.perf_counter() - started
        history.steps.append(dict(step=step + 1, loss=total.item(), lr=lr, tokens=(step + 1) * tokens_per_step,
                                  seconds=round(seconds, 4)))
        bar.set_postfix(loss=f"{total.item():.4f}", tok_s=f"{tokens_per_step / seconds:,.0f}")
        bar.update(1)
        done = step + 1
        if eval_tokens is not None and (done % config.eval_every == 0 or done == config.steps):
            history.evals.append(dict(step=done, **evaluate(teacher, student, eval_tokens, config, device)))
        if folder is not None and (done % config.save_every == 0 or done == config.steps):
            _save(folder, done, student, optimizer, {"steps": history.steps, "evals": history.evals}, config)
    bar.close()
    student.eval()
    if config.activation_checkpointing:
        _checkpointing(student, False)
    return history


def _checkpointing(model, on: bool, kinds: str = "M*-") -> None:
    """Activation checkpointing on or off, on the layers whose pattern letter is in `kinds`
    (transformers renamed it from gradient checkpointing)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    if on:
        for layer, letter in zip(model.model.layers, layer_pattern(model.config.to_dict())):
            layer.gradient_checkpointing = letter in kinds


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's tensors on the CPU (gathered from all processes when sharded)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
