"""Where a decode step's device time goes: the engine's step (slots at their own positions, padding
rows skipped) against the fast runtime's step as `nano.generate` runs it, kernel by kernel, at a
published shape with random weights on a GPU.

Both run eagerly (no CUDA graph) under torch.profiler, after warming up, with every row decoding;
each kernel's device time per step is summed by name. `bench/engine_decode.py` measures the graphed
rates; this says which kernels make the difference.

    python -m bench.profile_engine_step --shape nano-9b-v2 --rows 1 64
"""

from __future__ import annotations

import argparse
from collections import Counter
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine_decode import PROMPT
from bench.random_weights import random_model
from bench.record import write

from nano.engine import Engine
from nano.runtime import HybridRuntime
from nano.shapes import SHAPES


def kernel_times(run, steps: int) -> tuple[Counter, Counter]:
    """Microseconds of device time per step, and launches per step, by kernel name, over `steps` calls of
    `run`."""
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    times, launches = Counter(), Counter()
    for entry in prof.key_averages():
        device = getattr(entry, "self_device_time_total", None)
        device = entry.self_cuda_time_total if device is None else device
        if device > 0:
            times[entry.key[:90]] += device / steps
            launches[entry.key[:90]] += entry.count / steps
    return times, launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 64], help="rows decoding; one table for each")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    model = random_model(args.shape, "cuda", endless=True)
    model.runtime = "fast"

    for rows in args.rows:
        profile_rows(model, rows, args)


def profile_rows(model, rows: int, args) -> None:
    engine = Engine(model, slots=rows, context=args.context, graphs=False)
    requests = [engine.submit(PROMPT, max_new_tokens=args.context // 2) for _ in range(rows)]
    while any(r.state != "decoding" for r in requests):
        engine.step()
    through_engine, engine_launches = kernel_times(engine.step, args.steps)
    del engine, requests
    torch.cuda.empty_cache()

    runtime = HybridRuntime(model.model, rows, args.context, graphs=False)
    ids = torch.tensor([model.chat.encode(PROMPT)] * rows, device="cuda")
    runtime.prefill(ids, torch.ones_like(ids))
    tokens = ids[:, -1].contiguous()
    alone, alone_launches = kernel_times(partial(runtime.step, tokens), args.steps)
    del runtime
    torch.cuda.empty_cache()

    names = sorted(set(through_engine) | set(alone), key=lambda n: -max(through_engine[n], alone[n]))
    table = [dict(kernel=n, engine_us=round(through_engine[n], 1), runtime_us=round(alone[n], 1),
                  difference_us=round(through_engine[n] - alone[n], 1), engine_launches=round(engine_launches[n], 1),
                  runtime_launches=round(alone_launches[n], 1)) for n in names[:40]]
    table.append(dict(kernel="(all kernels)", engine_us=round(sum(through_engine.values()), 1),
                      runtime_us=round(sum(alone.values()), 1),
                      difference_us=round(sum(through_engine.values()) - sum(alone.values()), 1),
                      engine_launches=round(sum(engine_launches.values()), 1),
                      runtime_launches=round(sum(alone_launches.values()), 1)))
    columns = ["kernel", "engine_us", "runtime_us", "difference_us", "engine_launches", "runtime_launches"]
    write(f"profile-engine-step-{args.shape}-{rows}", table, columns,
          "cuda", shape=args.shape, rows_decoding=rows, context=args.context, torch=torch.__version__)


if __name__ == "__main__":
    main()
