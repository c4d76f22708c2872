"""Distillation throughput at the real shapes: Nano-12B-v2-Base teacher, Nano-9B-v2 student.

Random weights (bf16 teacher, fp32 master weights for the student, bf16 autocast), the toolkit's
trainer (`prune.train.distill`: FSDP2 over the processes, activation checkpointing, AdamW), a few
optimizer steps of `--batch` sequences of `--seq-len` tokens. Reports tokens/s per GPU and model
FLOPs utilisation: (2 x teacher parameters + 6 x student parameters) x tokens/s over the GPUs'
dense bf16 peak (the recomputation of activation checkpointing is not counted as useful work).

    torchrun --nproc_per_node 2 bench/distill_throughput.py --steps 4
    python bench/distill_throughput.py --shape-teacher tiny --shape-student tiny   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import write  # noqa: E402

from nano.memory import parameter_count  # noqa: E402
from nano.shapes import shape_config  # noqa: E402
from nano.tiny import tiny_config  # noqa: E402
from prune.train import DistillConfig, distill  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak per GPU (SXM)


def build(shape: str, dtype, device):
    from transformers import NemotronHForCausalLM

    config = tiny_config() if shape == "tiny" else shape_config(shape)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return NemotronHForCausalLM(config)
    finally:
        torch.set_default_dtype(default)


def profile_step(teacher, student, tokens, batch, args) -> list[dict]:
    """One more step (of the same trainer) under torch.profiler: the ops by self device time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    config = DistillConfig(steps=1, batch_size=batch, micro_batch=1, warmup=1, activation_checkpointing=True)
    with profile(activities=activities) as prof:
        distill(teacher, student, tokens[:batch], None, config)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) or 1
    rows = sorted(events, key=lambda e: -e.self_device_time_total)[:20]
    return [dict(op=e.key[:60], calls=e.count, device_ms=round(e.self_device_time_total / 1e3, 1),
                 share=round(e.self_device_time_total / total, 3)) for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape-teacher", default="nano-12b-v2-base")
    parser.add_argument("--shape-student", default="nano-9b-v2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the rate")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (default: one per process)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--profile", action="store_true", help="profile one more step; list the costliest ops")
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    import transformers

    transformers.logging.set_verbosity_error()
    began = time.perf_counter()
    teacher = build(args.shape_teacher, torch.bfloat16 if cuda else torch.float32, device)
    student = build(args.shape_student, torch.float32, device)
    build_s = time.perf_counter() - began
    batch = args.batch or world
    tokens = torch.randint(0, teacher.config.vocab_size, (batch * args.steps, args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    config = DistillConfig(steps=args.steps, batch_size=batch, micro_batch=1, warmup=1, save_every=10**9,
                           eval_every=10**9)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    history = distill(teacher, student, tokens, None, config)
    timed = history.steps[args.warmup_steps :]
    seconds = sum(s["seconds"] for s in timed)
    tokens_per_s = len(timed) * batch * args.seq_len / seconds
    n_teacher, n_student = parameter_count(teacher.config), parameter_count(student.config)
    flops_per_token = 2 * n_teacher + 6 * n_student
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    row = dict(
        gpus=world, batch=batch, seq_len=args.seq_len, steps_timed=len(timed),
        step_s=round(seconds / len(timed), 2), tokens_per_s=round(tokens_per_s),
        tokens_per_s_per_gpu=round(tokens_per_s / world),
        mfu=round(flops_per_token * tokens_per_s / (world * peak), 3) if peak else None,
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
        losses=" ".join(f"{s['loss']:.3f}" for s in history.steps),
    )
    top = profile_step(teacher, student, tokens, batch, args) if args.profile else None
    if rank == 0:
        if top:
            write(f"profile-distill-{world}gpu", top, list(top[0]), "cuda" if cuda else "cpu")
        write(f"distill-throughput-{args.shape_teacher}-{args.shape_student}-{world}gpu", [row], list(row),
              "cuda" if cuda else "cpu", teacher=args.shape_teacher, student=args.shape_student,
              teacher_parameters=n_teacher, student_parameters=n_student, flops_per_token=flops_per_token,
              peak_flops_per_gpu=peak, build_s=round(build_s, 1), torch=torch.__version__,
              transformers=transformers.__version__)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
