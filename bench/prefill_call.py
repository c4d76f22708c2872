"""What one of the engine's prefill calls costs beside a decode step, at a published shape with random
weights on a GPU: the host's time to launch it, and the device's time to run it.

A server's prompts are short and come a few at a time, so the engine runs many small prefill calls
between its decode steps, each of which holds up every decoding stream. For each number of rows
(prompts prefilled together, `HybridRuntime.prefill_slots`) it times two ways of running them: eagerly
as they are (one row goes straight into its slot, `extend`, as the engine without buckets sends a
prompt alone), and padded to a bucket whose prefill is replayed from a CUDA graph
(`HybridRuntime.bucket_prefills`, captured before timing). For each it reports the median over
`--repeats` calls, after two to warm up, of:
- host_ms: from the call until it returns (the kernels launched, not waited for);
- device_ms: from before the call until the device has finished (synchronized);
- kernels: the kernels one call launches (torch.profiler);
and the same for the engine's graphed decode step of `--slots` rows, replayed back to back.
Where host_ms is close to device_ms the call is bound by launching, not by the device.

    python -m bench.prefill_call --shape nano-9b-v2 --rows 1 2 4 8 --prompt-tokens 40
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.random_weights import random_model
from bench.record import write

from nano.engine import Engine
from nano.shapes import SHAPES


def measure(call, repeats: int) -> tuple[float, float, int]:
    """Median host and device milliseconds of `call`, and the kernels one call launches."""
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    host, device = [], []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        launched = time.perf_counter()
        torch.cuda.synchronize()
        ended = time.perf_counter()
        host.append(1e3 * (launched - began))
        device.append(1e3 * (ended - began))
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0)
    return _median(host), _median(device), kernels


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--slots", type=int, default=8, help="the engine's slots, and the decode step's rows")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--tag", default="", help="added to the results file's name")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    model = random_model(args.shape, "cuda", endless=True)
    model.runtime = "fast"
    slots, context = max(args.slots, *args.rows), args.prompt_tokens + 64
    eager = Engine(model, slots=slots, context=context, prefill_buckets=False)
    engine = Engine(model, slots=slots, context=context, prefill_buckets=True)
    captured = engine.runtime.warm_up_prefills()
    print(f"captured {captured} prefill buckets", flush=True)
    generator = torch.Generator().manual_seed(0)
    vocab = len(model.tokenizer)
    prompt = lambda: torch.randint(3, vocab, (args.prompt_tokens,), generator=generator).tolist()  # noqa: E731

    results = []
    for rows in args.rows:
        prompts = [prompt() for _ in range(rows)]
        if rows == 1:
            runtime = eager.runtime.slot(0)
            ids = torch.tensor([prompts[0]], device="cuda")
            calls = {"eager": lambda: runtime.extend(ids, 0)}
        else:
            calls = {"eager": lambda: eager.runtime.prefill_slots(prompts, list(range(rows)))}
        bucket = engine.runtime.prefill_bucket(rows, args.prompt_tokens)
        if bucket is not None:
            calls[f"bucket {bucket[0]} x {bucket[1]} (graph)"] = (
                lambda: engine.runtime.prefill_slots(prompts, list(range(rows))))
        for how, call in calls.items():
            host, device, kernels = measure(call, args.repeats)
            results.append(dict(call=f"prefill {rows} x {args.prompt_tokens}", how=how, rows=rows,
                                host_ms=round(host, 2), device_ms=round(device, 2), kernels=kernels))
            print(results[-1], flush=True)

    step = engine._step(args.slots, True)  # the engine's greedy decode step, every row a padding row
    step.prepare(engine.tokens[: args.slots])  # captured before it is timed
    host, device, kernels = measure(lambda: step(engine.tokens[: args.slots]), args.repeats)
    results.append(dict(call=f"decode step, {args.slots} rows", how="graph", rows=args.slots, host_ms=round(host, 2),
                        device_ms=round(device, 2), kernels=kernels))
    write(f"prefill-call-{args.shape}{args.tag}", results, ["call", "how", "host_ms", "device_ms", "kernels"], "cuda",
          shape=args.shape, prompt_tokens=args.prompt_tokens, runtime=model.runtime_name(), torch=torch.__version__)


if __name__ == "__main__":
    main()
