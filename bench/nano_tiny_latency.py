"""How long nano-tiny takes to answer one question on the CPU, with no budget (the whole trace).

Loads the shipped model as a user would (`nano.load("nano-tiny")`), then answers the README's
question and a set of fresh problems one at a time, timing each `nano.generate` call.

    python -m bench.nano_tiny_latency --problems 30
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


from bench.record import write

import nano
from nano.arithmetic import boxed, sample

README_QUESTION = "What is 347 + 58 * 6 - 12?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=30)
    parser.add_argument("--seed", type=int, default=99)
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    model = nano.load("nano-tiny", device="cpu")
    load_seconds = time.perf_counter() - start

    rng = random.Random(args.seed)
    questions = [README_QUESTION] + [sample(rng).question for _ in range(args.problems)]
    rows = []
    for question in questions:
        start = time.perf_counter()
        g = nano.generate(model, question, max_new_tokens=4096)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "question": question,
                "generated_tokens": len(g.token_ids),
                "seconds": round(seconds, 2),
                "tokens_per_s": round(len(g.token_ids) / seconds, 1),
                "answer": boxed(g.answer),
            }
        )
    times = sorted(r["seconds"] for r in rows[1:])
    summary = {
        "load_seconds": round(load_seconds, 2),
        "readme_question_seconds": rows[0]["seconds"],
        "median_seconds": statistics.median(times),
        "p90_seconds": times[int(0.9 * (len(times) - 1))],
        "max_seconds": times[-1],
        "mean_tokens_per_s": round(statistics.mean(r["tokens_per_s"] for r in rows), 1),
        "torch_threads": torch.get_num_threads(),
    }
    print("  ".join(f"{k} {v}" for k, v in summary.items()))
    write("nano_tiny_latency-cpu", rows, ["question", "generated_tokens", "seconds", "tokens_per_s", "answer"], "cpu", **summary)


if __name__ == "__main__":
    main()
