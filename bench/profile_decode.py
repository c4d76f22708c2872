"""Where the time of one batch-1 decode step goes, at a published shape with random weights.

Times the graphed step (what generation runs), then profiles the same step run eagerly to get
each kernel's GPU time (a graph replays the same kernels without the launch gaps), grouped into
matrix multiplications, mamba-ssm's Triton kernels, attention, and the rest.

    python -m bench.profile_decode --shape nano-9b-v2
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch


from bench.random_weights import random_model
from bench.record import write
from bench.runtime import timed

from nano.runtime import HybridRuntime
from nano.shapes import SHAPES


def category(name: str) -> str:
    lowered = name.lower()
    if any(k in lowered for k in ("gemm", "gemv", "cutlass", "sm90_xmma", "nvjet", "splitk")):
        return "matmul"
    if "selective_scan_update" in lowered or "layer_norm" in lowered:
        return "mamba-ssm triton"
    if "attention" in lowered or "fmha" in lowered or "flash" in lowered:
        return "attention"
    return "other (elementwise, copies, reductions)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=sorted(SHAPES))
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    model = random_model(args.shape, "cuda", endless=True)
    runtime = HybridRuntime(model.model, 1, 4096)
    ids = torch.randint(300, 100000, (1, 512), device="cuda")
    runtime.prefill(ids, torch.ones_like(ids))
    token = torch.zeros(1, dtype=torch.long, device="cuda")
    graphed = runtime.graphed(lambda t: runtime.step(t).argmax(dim=-1))
    for _ in range(4):
        token = graphed(token)
    graph_seconds = timed(lambda: [graphed(token) for _ in range(args.steps)]) / args.steps
    eager_seconds = timed(lambda: [runtime.step(token) for _ in range(10)]) / 10

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            runtime.step(token)
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.device_time / 5  # us per step
            kernels[event.name][1] += 1
    totals = defaultdict(float)
    for name, (us, _) in kernels.items():
        totals[category(name)] += us
    launched = sum(count for _, count in kernels.values()) // 5
    kernel_us = sum(totals.values())
    rows = [
        {"part": part, "us_per_step": round(us, 1), "share_%": round(100 * us / kernel_us, 1)}
        for part, us in sorted(totals.items(), key=lambda kv: -kv[1])
    ]
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    write(
        f"profile-decode-{args.shape}",
        rows,
        ["part", "us_per_step", "share_%"],
        "cuda",
        shape=args.shape,
        graph_step_ms=round(graph_seconds * 1e3, 3),
        eager_step_ms=round(eager_seconds * 1e3, 3),
        kernel_time_per_step_ms=round(kernel_us / 1e3, 3),
        kernels_per_step=launched,
        runtime=runtime.name,
        top_kernels=[{"kernel": name[:120], "us_per_step": round(us, 1), "calls_per_step": count // 5} for name, (us, count) in top],
    )


if __name__ == "__main__":
    main()
