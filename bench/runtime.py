"""The fast runtime against transformers' reference path, at a published shape with random weights.

Measures, in one run (each part reports an error instead of stopping the rest):
- the device-to-device copy bandwidth, and from it the batch-1 decode roofline (weight bytes / bandwidth);
- batch-1 decode tokens/s through `nano.generate` (graph, controller and sampler included), for the
  fast runtime and for transformers' reference path;
- decode throughput at larger batches;
- prefill tokens/s at 8k, 32k and 128k context (fast) and 8k (reference);
- with `--memory-cap-gib 22`: a 131072-token prefill then 1024 decoded tokens with the process
  capped at 22 GiB (`torch.cuda.set_per_process_memory_fraction`), standing in for an A10G;
  run it as its own process, since the cap holds for the whole process.

    python -m bench.runtime --shape nano-9b-v2
    python -m bench.runtime --shape nano-9b-v2 --memory-cap-gib 22
"""

from __future__ import annotations

import argparse
import time

import torch


from bench.budget_overhead import copy_bandwidth
from bench.random_weights import random_model
from bench.record import write

import nano
from nano.runtime import HybridRuntime
from nano.shapes import SHAPES

GIB = 2**30


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def decode_rate(model, rows: int, new_tokens: int, base: int = 8, repeats: int = 3) -> float:
    """Tokens/s of decode through nano.generate, all rows together: the time of `base + new_tokens`
    tokens less that of `base`, so that prefill, allocation and graph capture cancel out; the
    median of `repeats` such pairs."""
    prompts = ["What is 347 + 58 * 6 - 12? " * 4] * rows
    run = lambda n: nano.generate(model, prompts, max_new_tokens=n)  # noqa: E731
    run(base)  # warm-up: Triton compilation, cuBLAS, torch.compile
    rates = []
    for _ in range(repeats):
        short = timed(lambda: run(base))
        long = timed(lambda: run(base + new_tokens))
        rates.append(rows * new_tokens / (long - short))
    return sorted(rates)[len(rates) // 2]


def prefill_rate(model, length: int, runtime: str) -> tuple[float, float]:
    """Tokens/s of one prefill of `length` random tokens, and the peak memory (GiB) it reached."""
    ids = torch.randint(300, 100000, (1, length), device="cuda")
    mask = torch.ones_like(ids)
    model.runtime = runtime
    warm = model.decoder(rows=1, capacity=8193)  # compiles and tunes the kernels for these shapes first
    warm.prefill(ids[:, :8192], mask[:, :8192])
    del warm
    decoder = model.decoder(rows=1, capacity=length + 1)
    torch.cuda.reset_peak_memory_stats()
    seconds = timed(lambda: decoder.prefill(ids, mask))
    peak = torch.cuda.max_memory_allocated() / GIB
    del decoder
    torch.cuda.empty_cache()
    return length / seconds, peak


def attempt(rows: list, name: str, fn) -> None:
    try:
        row = fn()
    except torch.cuda.OutOfMemoryError as e:
        row = {"error": "out of memory: " + str(e).split(".")[0]}
    except Exception as e:  # report and carry on with the other measurements
        row = {"error": f"{type(e).__name__}: {e}"[:300]}
    torch.cuda.empty_cache()
    rows.append({"measure": name, **row})
    print(rows[-1], flush=True)


def long_context(model, prompt: int, new_tokens: int) -> dict:
    """A `prompt`-token prefill then `new_tokens` greedy steps through the graphed decode step, after
    a short warm-up run (Triton compilation and autotuning, torch.compile), timed on its own."""

    def run(length: int, steps: int) -> tuple[HybridRuntime, torch.Tensor]:
        runtime = HybridRuntime(model.model, 1, length + steps)
        return runtime, torch.randint(300, 100000, (1, length), device="cuda")

    def warm_up():
        runtime, ids = run(8192, 4)
        runtime.prefill(ids, torch.ones_like(ids))
        step = runtime.graphed(lambda tokens: runtime.step(tokens).argmax(dim=-1))
        token = torch.zeros(1, dtype=torch.long, device="cuda")
        for _ in range(4):
            token = step(token)

    warm_up_s = timed(warm_up)
    torch.cuda.empty_cache()
    runtime, ids = run(prompt, new_tokens)
    torch.cuda.reset_peak_memory_stats()
    prefill = timed(lambda: runtime.prefill(ids, torch.ones_like(ids)))
    after_prefill = torch.cuda.max_memory_allocated() / GIB
    step = runtime.graphed(lambda tokens: runtime.step(tokens).argmax(dim=-1))
    token = torch.zeros(1, dtype=torch.long, device="cuda")

    def decode():
        nonlocal token
        for _ in range(new_tokens):
            token = step(token)

    seconds = timed(decode)
    return {
        "warm_up_s": round(warm_up_s, 1),
        "prompt_tokens": prompt,
        "decoded_tokens": new_tokens,
        "prefill_s": round(prefill, 2),
        "prefill_tokens_per_s": round(prompt / prefill),
        "decode_tokens_per_s": round(new_tokens / seconds, 1),
        "peak_after_prefill_gib": round(after_prefill, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=sorted(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--prefill", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--decode-only", action="store_true", help="skip the prefill measurements")
    parser.add_argument("--memory-cap-gib", type=float, help="run only the long-context test under this cap")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    total = torch.cuda.get_device_properties(0).total_memory
    if args.memory_cap_gib:
        torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * GIB / total)
    model = random_model(args.shape, "cuda", endless=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    rows: list[dict] = []
    extra = dict(
        shape=args.shape,
        weight_gib=round(weight_bytes / GIB, 2),
        transformers=transformers.__version__,
        torch=torch.__version__,
        runtime=model.runtime_name(),
    )
    if args.memory_cap_gib:
        extra["memory_cap_gib"] = args.memory_cap_gib
        attempt(rows, "131072 prefill + 1024 decode", lambda: long_context(model, 131072, 1024))
        write(f"runtime-longcontext-{args.shape}", rows, list(rows[0]), "cuda", **extra)
        return

    bandwidth = copy_bandwidth(torch.device("cuda"))
    roofline = bandwidth / weight_bytes
    extra.update(copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), roofline_tokens_per_s=round(roofline, 1))
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; batch-1 roofline {roofline:.1f} tokens/s", flush=True)

    def decode(runtime, batch, n):
        def run():
            model.runtime = runtime
            rate = decode_rate(model, batch, n)
            row = {"batch": batch, "tokens_per_s": round(rate, 1)}
            if batch == 1:
                row["of_roofline"] = round(rate / roofline, 3)
            return row
        return run

    attempt(rows, "decode, reference", decode("reference", 1, 16))
    attempt(rows, "decode, fast", decode("fast", 1, args.new_tokens))
    for batch in args.batches:
        attempt(rows, "decode, fast", decode("fast", batch, args.new_tokens))
    def prefill(runtime, length):
        def run():
            rate, peak = prefill_rate(model, length, runtime)
            return {"tokens": length, "tokens_per_s": round(rate), "peak_gib": round(peak, 2)}
        return run

    if not args.decode_only:
        for length in args.prefill:
            attempt(rows, "prefill, fast", prefill("fast", length))
        attempt(rows, "prefill, reference", prefill("reference", 8192))
    columns = ["measure", "batch", "tokens", "tokens_per_s", "of_roofline", "peak_gib", "error"]
    write(f"runtime-{args.shape}", rows, columns, "cuda", **extra)


if __name__ == "__main__":
    main()
