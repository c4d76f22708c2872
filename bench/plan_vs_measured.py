"""The memory planner against the GPU runtime: predicted bytes beside the peak the runtime allocates.

For each (context, batch), the runtime (`nano.runtime.HybridRuntime`, random bf16 weights of the
shape) prefills `context - decode` tokens per sequence and decodes `decode` more through its CUDA
graph; the peak `torch.cuda.max_memory_allocated()` is set beside `nano.memory.plan(...)` for the
same shape, context and batch. The planner's `overhead` is allocator slack that max_memory_allocated
does not count, so the comparison is with the planner's total less its overhead; the reserved
figure (what the allocator took from the GPU) is recorded too.

    python -m bench.plan_vs_measured --shape nano-9b-v2
"""

from __future__ import annotations

import argparse

import torch


from bench.random_weights import random_model
from bench.record import write

from nano.memory import GIB, plan
from nano.runtime import HybridRuntime
from nano.shapes import SHAPES

CASES = [(8192, 1), (32768, 1), (131072, 1), (8192, 8), (32768, 4), (4096, 32)]


def measure(model, context: int, batch: int, decode: int) -> tuple[float, float]:
    """Peak allocated and reserved bytes of one prefill + `decode` graphed steps."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    runtime = HybridRuntime(model.model, batch, context)
    ids = torch.randint(300, 100000, (batch, context - decode), device="cuda")
    runtime.prefill(ids, torch.ones_like(ids))
    step = runtime.graphed(lambda tokens: runtime.step(tokens).argmax(dim=-1))
    token = torch.zeros(batch, dtype=torch.long, device="cuda")
    for _ in range(decode):
        token = step(token)
    torch.cuda.synchronize()
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    return peak, reserved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=sorted(SHAPES))
    parser.add_argument("--decode", type=int, default=32)
    args = parser.parse_args()
    model = random_model(args.shape, "cuda", endless=True)
    measure(model, 8192, 1, 4)  # warm-up: Triton compilation and autotuning, torch.compile
    rows = []
    for context, batch in CASES:
        predicted = plan(model.model.config, "h100", context, batch)
        try:
            peak, reserved = measure(model, context, batch, args.decode)
        except torch.OutOfMemoryError:
            rows.append(dict(context=context, batch=batch, error="out of memory"))
            continue
        expected = predicted.total - predicted.overhead
        rows.append(dict(
            context=context, batch=batch,
            planned_gib=round(predicted.total / GIB, 2), planned_without_overhead_gib=round(expected / GIB, 2),
            measured_peak_gib=round(peak / GIB, 2), reserved_gib=round(reserved / GIB, 2),
            error=f"{(expected - peak) / peak:+.1%}",
            weights_gib=round(predicted.weights / GIB, 2), kv_gib=round(predicted.kv_cache / GIB, 2),
            state_gib=round((predicted.ssm_state + predicted.conv_state) / GIB, 2),
            workspace_gib=round(predicted.workspace / GIB, 2),
        ))
        print(rows[-1], flush=True)
    write(f"plan-vs-measured-{args.shape}", rows, list(dict.fromkeys(k for r in rows for k in r)), "cuda",
          shape=args.shape, runtime=model.runtime_name(), torch=torch.__version__)


if __name__ == "__main__":
    main()
