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


def engine_rate(engine: Engine, rows: int, new_tokens: int, repeats: int = 3) -> float:
    """Tokens/s of the engine's decode with `rows` requests decoding: admitted one by one as a server
    admits them, then `new_tokens` steps timed; the median of `repeats` (after one to warm up)."""
    rates = []
    for _ in range(repeats + 1):
        requests = [engine.submit(PROMPT, max_new_tokens=new_tokens + rows + 16) for _ in range(rows)]
        while any(r.state != "decoding" for r in requests):
            engine.step()
        torch.cuda.synchronize()
        start, before = time.perf_counter(), sum(len(r.tokens) for r in requests)
        for _ in range(new_tokens):
            engine.step()
        torch.cuda.synchronize()
        rates.append((sum(len(r.tokens) for r in requests) - before) / (time.perf_counter() - start))
        for r in requests:
            engine.cancel(r)
        engine.run()
    return sorted(rates[1:])[len(rates[1:]) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=sorted(SHAPES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--new-tokens", type=int, default=256)
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
        engine = Engine(model, slots=batch, context=1024)
        through_engine = engine_rate(engine, batch, args.new_tokens)
        del engine
        torch.cuda.empty_cache()
        alone = decode_rate(model, batch, args.new_tokens)
        row = dict(batch=batch, engine_tokens_per_s=round(through_engine, 1), generate_tokens_per_s=round(alone, 1),
                   engine_vs_generate=round(through_engine / alone, 3))
        if batch == 1:
            row.update(engine_of_roofline=round(through_engine / roofline, 3),
                       generate_of_roofline=round(alone / roofline, 3))
        rows.append(row)
        print(row, flush=True)
    write(f"engine-decode-{args.shape}", rows, ["batch", "engine_tokens_per_s", "generate_tokens_per_s",
                                                 "engine_vs_generate", "engine_of_roofline", "generate_of_roofline"],
          "cuda", shape=args.shape, weight_gib=round(weight_bytes / 2**30, 2),
          copy_bandwidth_tb_s=round(bandwidth / 1e12, 3), roofline_tokens_per_s=round(roofline, 1),
          runtime=model.runtime_name(), torch=torch.__version__, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
