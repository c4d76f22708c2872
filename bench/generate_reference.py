"""`nano.generate` end to end on transformers' reference path, at a published shape with random weights.

The baseline the fast GPU runtime must beat, and the step that the budget controller's cost is
a share of. Prefill is timed with one generated token; decode speed is the rest, over the tokens
actually generated (a random model may end its turn early).

    python -m bench.generate_reference --shape nano-9b-v2 --device cuda
    python -m bench.generate_reference --shape tiny --device cpu
"""

from __future__ import annotations

import argparse
import time

import torch


from bench.budget_overhead import controller_step_seconds, sync
from bench.random_weights import random_model
from bench.record import write

import nano
from nano.shapes import SHAPES


def run(model, prompts, max_new_tokens, budget, device) -> tuple[float, int]:
    sync(device)
    start = time.perf_counter()
    out = nano.generate(model, prompts, budget=budget, max_new_tokens=max_new_tokens)
    sync(device)
    return time.perf_counter() - start, max(len(g.token_ids) for g in out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="nano-9b-v2", choices=["tiny", *SHAPES])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--budget", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    import transformers

    transformers.logging.set_verbosity_error()
    model = random_model(args.shape, device, dtype)
    params = sum(p.numel() for p in model.model.parameters())
    # A byte-level prompt: one token per character, less the chat template's own tokens.
    words = ("what is the sum of these numbers, step by step? " * 200)[: args.prompt_tokens - 20]

    rows_out = []
    for rows in args.rows:
        prompts = [words] * rows
        run(model, prompts, 4, args.budget, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        prefill, _ = run(model, prompts, 1, args.budget, device)
        total, generated = run(model, prompts, args.new_tokens, args.budget, device)
        per_token = (total - prefill) / max(generated - 1, 1)
        controller, _, _, _ = controller_step_seconds(model.chat, rows, device, 200)
        row = {
            "rows": rows,
            "prompt_tokens": len(model.chat.encode(model.chat.render(words)[0])),
            "generated": generated,
            "prefill_s": round(prefill, 3),
            "decode_ms_per_step": round(per_token * 1e3, 2),
            "tokens_per_s": round(rows / per_token, 1),
            "controller_eager_ms": round(controller * 1e3, 3),
            "controller_share_%": round(100 * controller / per_token, 2),
        }
        if device.type == "cuda":
            row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        rows_out.append(row)
    write(
        f"generate_reference-{args.shape}-{device.type}",
        rows_out,
        list(rows_out[0]),
        args.device,
        shape=args.shape,
        parameters=params,
        dtype=str(dtype).removeprefix("torch."),
        transformers=transformers.__version__,
        torch=torch.__version__,
        budget=args.budget,
    )


if __name__ == "__main__":
    main()
