"""Distillation throughput at the real shapes: Nano-12B-v2-Base teacher, Nano-9B-v2 student.

Random weights (bf16 teacher, fp32 master weights for the student, bf16 autocast), the toolkit's
trainer (`prune.distill.distill`: FSDP2 over the processes, activation checkpointing, AdamW), a few
optimizer steps of `--batch` sequences of `--seq-len` tokens. Reports tokens/s per GPU and model
FLOPs utilisation: (2 x teacher parameters + 6 x student parameters) x tokens/s over the GPUs'
dense bf16 peak (the recomputation of activation checkpointing is not counted as useful work).

    torchrun --nproc_per_node 2 -m bench.distill_throughput --steps 4
    torchrun --nproc_per_node 2 -m bench.distill_throughput --batch 4 --variant micro=1 --variant micro=2,teacher=replicate
    python -m bench.distill_throughput --shape-teacher tiny --shape-student tiny   # a CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import replace

import torch
import torch.distributed as dist


from bench.record import write

from nano.memory import parameter_count
from nano.shapes import shape_config
from nano.tiny import tiny_config
from prune.distill import DistillConfig, distill

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


KERNEL_KINDS = [  # (category, pattern in the kernel's name), first match wins
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|sm90_|sm80_", re.I)),
    ("communication", re.compile(r"nccl", re.I)),
    ("fsdp copy-in/out", re.compile(r"chunk_cat|split_with_sizes_copy|foreach_copy|all_gather_copy", re.I)),
    ("mamba triton", re.compile(r"^_\w+_kernel")),
    ("conv1d", re.compile(r"conv", re.I)),
    ("optimizer", re.compile(r"multi_tensor|foreach|adam", re.I)),
    ("softmax and loss", re.compile(r"softmax|log_softmax|cross_entropy|kl_div|nll", re.I)),
    ("copy and cast", re.compile(r"copy|cast|to_copy|fill|memset|memcpy", re.I)),
]


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other elementwise")


def profile_step(teacher, student, tokens, config: DistillConfig, world: int) -> tuple[list[dict], list[dict], float]:
    """One more step of `config` under torch.profiler: GPU kernel time by category, the costliest kernels,
    and the step's wall time. Communication kernels run on their own streams and overlap the rest (and
    their time includes waiting for the other processes), so the shares may sum past 1."""
    from torch.profiler import ProfilerActivity, profile

    one = replace(config, steps=1, warmup=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        distill(teacher, student, tokens[: config.batch_size], None, one)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - began
    totals: dict[str, list] = {}
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.self_device_time_total and not e.is_user_annotation]
    for event in kernels:
        entry = totals.setdefault(kernel_kind(event.key), [0.0, 0, event.key, 0.0])
        entry[0] += event.self_device_time_total / 1e3
        entry[1] += event.count
        if event.self_device_time_total / 1e3 > entry[3]:
            entry[2], entry[3] = event.key, event.self_device_time_total / 1e3
    rows = [dict(kind=kind, kernel_ms=round(ms, 1), share_of_step=round(ms / (wall * 1e3), 3), kernels=count,
                 largest=largest[:70]) for kind, (ms, count, largest, _) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    top = [dict(kernel=e.key[:110], kind=kernel_kind(e.key), calls=e.count, kernel_ms=round(e.self_device_time_total / 1e3, 1))
           for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:30]]
    return rows, top, wall


VARIANT_KEYS = {"batch": "batch_size", "micro": "micro_batch", "checkpoint": "checkpoint_kinds", "teacher": "shard_teacher"}


def parse_variant(text: str, base: DistillConfig) -> DistillConfig:
    """'micro=2,teacher=replicate,checkpoint=M' over the base settings; checkpoint=none turns it off."""
    changes = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS:
            raise SystemExit(f"--variant: unknown key {key!r} in {text!r}; known: {', '.join(VARIANT_KEYS)}")
        if key in ("batch", "micro"):
            changes[VARIANT_KEYS[key]] = int(value)
        elif key == "teacher":
            if value not in ("shard", "replicate"):
                raise SystemExit(f"--variant: teacher={value!r}; use shard or replicate")
            changes["shard_teacher"] = value == "shard"
        elif value == "none":
            changes["activation_checkpointing"] = False
        else:
            changes["checkpoint_kinds"] = value
    return replace(base, **changes)


def describe(config: DistillConfig) -> str:
    checkpoint = config.checkpoint_kinds if config.activation_checkpointing else "none"
    teacher = "shard" if config.shard_teacher else "replicate"
    return f"batch={config.batch_size},micro={config.micro_batch},checkpoint={checkpoint},teacher={teacher}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape-teacher", default="nano-12b-v2-base")
    parser.add_argument("--shape-student", default="nano-9b-v2")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=1, help="steps left out of the rate")
    parser.add_argument("--batch", type=int, default=0, help="sequences per step (default: one per process)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--variant", action="append", metavar="KEY=VALUE,...",
                        help="settings to time, e.g. 'micro=2,teacher=replicate,checkpoint=M' (keys: "
                        f"{', '.join(VARIANT_KEYS)}); repeat for several; default: the trainer's defaults")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step of the fastest variant: GPU time by kernel category (GPU only)")
    parser.add_argument("--name", default="", help="suffix of the results' file names")
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
    base = DistillConfig(steps=args.steps, batch_size=args.batch or world, micro_batch=1, warmup=1,
                         save_every=10**9, eval_every=10**9)
    # Sharding the teacher cannot be undone in a process: the variants that keep it whole go first.
    variants = sorted((parse_variant(v, base) for v in args.variant or [""]), key=lambda c: c.shard_teacher)
    n_teacher, n_student = parameter_count(teacher.config), parameter_count(student.config)
    flops_per_token = 2 * n_teacher + 6 * n_student
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    suffix = f"-{args.name}" if args.name else ""

    def record(rows):
        write(f"distill-throughput-{args.shape_teacher}-{args.shape_student}-{world}gpu{suffix}", rows, list(rows[0]),
              "cuda" if cuda else "cpu", teacher=args.shape_teacher, student=args.shape_student,
              teacher_parameters=n_teacher, student_parameters=n_student, flops_per_token=flops_per_token,
              peak_flops_per_gpu=peak, build_s=round(build_s, 1), torch=torch.__version__,
              transformers=transformers.__version__)

    rows = []
    for config in variants:
        tokens = torch.randint(0, teacher.config.vocab_size, (config.batch_size * args.steps, args.seq_len),
                               generator=torch.Generator().manual_seed(0))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        history = distill(teacher, student, tokens, None, replace(config, steps=args.steps))
        timed = history.steps[args.warmup_steps :]
        seconds = sum(s["seconds"] for s in timed)
        tokens_per_s = len(timed) * config.batch_size * args.seq_len / seconds
        rows.append(dict(
            variant=describe(config), gpus=world, seq_len=args.seq_len, steps_timed=len(timed),
            step_s=round(seconds / len(timed), 2), tokens_per_s=round(tokens_per_s),
            tokens_per_s_per_gpu=round(tokens_per_s / world),
            mfu=round(flops_per_token * tokens_per_s / (world * peak), 3) if peak else None,
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            losses=" ".join(f"{s['loss']:.3f}" for s in history.steps),
        ))
        if rank == 0:  # after every variant: a later one may run out of memory and end the run
            record(rows)
    if args.profile and not cuda and rank == 0:
        print("--profile: GPU kernels only; nothing to profile on the CPU")
    if args.profile and cuda:
        # the teacher is as the last variant left it: profile the fastest of those run the same way
        same = [i for i, c in enumerate(variants) if c.shard_teacher == variants[-1].shard_teacher]
        fastest = rows[max(same, key=lambda i: rows[i]["tokens_per_s"])]
        config = variants[rows.index(fastest)]
        tokens = torch.randint(0, teacher.config.vocab_size, (config.batch_size, args.seq_len),
                               generator=torch.Generator().manual_seed(1))
        kinds, top, wall = profile_step(teacher, student, tokens, config, world)
        if rank == 0:
            write(f"profile-distill-{world}gpu{suffix}", kinds, list(kinds[0]), "cuda" if cuda else "cpu",
                  variant=fastest["variant"], step_wall_s=round(wall, 3), kernels=top)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
