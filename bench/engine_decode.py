"""Decode through the continuous-batching engine against `nano.generate`, at a published shape with
random weights, on a GPU: batch 1 against the bandwidth roofline, and full batches.

For each batch size B the engine (B slots) admits B requests, then `--new-tokens` steps are timed
with all B decoding (the median of three, after one to warm up). `nano.generate` (the fast
runtime, one static batch) is measured in the same process as `bench.runtime` measures it (long
less short generations, so prefill and capture cancel), and the roofline is the weights read once
per token at the measured device-to-device copy bandwidth.

    python -m bench.engine_decode --shape nano-9b-v2 --batches 1 8 32 64
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.budget_overhead import copy_bandwidth
from bench.random_weights import random_model
from bench.record import write
from bench.runtime import decode_rate

from nano.engine import Engine
from nano.shapes import SHAPES

PROMPT = "What is 347 + 58 * 6 - 12? " * 4


def engine_rate(engine: Engine, rows: int, new_tokens: int, repeats: int = 3) -> tuple[float, float]:
    """Tokens/s of the engine's decode with `rows` requests decoding: admitted as a server admits
    them, then `new_tokens` steps timed; the median of `repeats` (after one to warm up). And the
    same steps' device rate: the captured decode step replayed back to back, without the engine's
    host work around it (what the host costs is the difference)."""
    rates, device = [], []
    for _ in range(repeats + 1):
        requests = [engine.submit(PROMPT, max_new_tokens=2 * new_tokens + rows + 16) for _ in range(rows)]
        while any(r.state != "decoding" for r in requests):
            engine.step()
        torch.cuda.synchronize()
        start, before = time.perf_counter(), sum(len(r.tokens) for r in requests)
        for _ in range(new_tokens):
            engine.step()
        torch.cuda.synchronize()
        rates.append((sum(len(r.tokens) for r in requests) - before) / (time.perf_counter() - start))
        step = engine._step(next(b for b in engine.buckets if b >= rows), True)  # the engine's greedy step
        start = time.perf_counter()
        for _ in range(new_tokens):
            step(engine.tokens[:rows])
        torch.cuda.synchronize()
        device.append(rows * new_tokens / (time.perf_counter() - start))
        for r in requests:
            engine.cancel(r)
        engine.run()
    return _median(rates[1:]), _median(device[1:])


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=sorted(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--context", type=int, default=1024, help="the engine's tokens per slot")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    model = random_model(args.shape, "cuda", endless=True)
    model.runtime = "fast"
    weight_bytes = sum(p.numel() * p.element_size() for p in model.model.parameters())
    bandwidth = copy_bandwidth(torch.device("cuda"))
    roofline = bandwidth / weight_bytes
    rows = []
    for batch in args.batches:
        engine = Engine(model, slots=batch, context=args.context)
        through_engine, replayed = engine_rate(engine, batch, args.new_tokens)
        del engine
        torch.cuda.empty_cache()
        alone = decode_rate(model, batch, args.new_tokens)
        row = dict(batch=batch, engine_tokens_per_s=round(through_engine, 1),
                   step_replayed_tokens_per_s=round(replayed, 1), generate_tokens_per_s=round(alone, 1),
                   engine_vs_generate=round(through_engine / alone, 3))
        if batch == 1:
            row.update(engine_of_roofline=round(through_engine / roofline, 3),
                       generate_of_roofline=round(alone / roofline, 3))
        rows.append(row)
        # Written after every batch size, so a run stopped by its time limit keeps what it measured.
        write(f"engine-decode-{args.shape}", rows, ["batch", "engine_tokens_per_s", "step_replayed_tokens_per_s",
                                                     "generate_tokens_per_s", "engine_vs_generate",
                                                     "engine_of_roofline", "generate_of_roofline"],
              "cuda", shape=args.shape, batches_asked=args.batches, weight_gib=round(weight_bytes / 2**30, 2),
              copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), roofline_tokens_per_s=round(roofline, 1),
              runtime=model.runtime_name(), torch=torch.__version__, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
