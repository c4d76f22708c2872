"""Accuracy versus thinking budget for nano-tiny models, through `nano.generate` itself.

Fresh problems of the training distribution (a seed the training never uses), asked as users ask
them; the answer is right when its last \\boxed{N} equals the value. Budget 0 is reasoning off,
"unlimited" is no budget. Writes a JSON file and a PNG plot.

    python experiments/nano_tiny/evaluate.py --model truncated=nano/models/nano-tiny \\
        --model control=experiments/nano_tiny/control --problems 500 --out experiments/nano_tiny/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import nano  # noqa: E402
from nano.arithmetic import EVAL_SEED, sample, score  # noqa: E402
from bench.record import commit, device_name  # noqa: E402

BUDGETS = [0, 4, 8, 16, 32, 64, 128, None]


def mcnemar(a: str, b: str) -> dict:
    """Paired comparison of two models on the same problems: who alone got each one right, and the
    exact two-sided p-value that the two are equally good (a binomial test on the discordant pairs)."""
    only_a = sum(x == "1" and y == "0" for x, y in zip(a, b))
    only_b = sum(x == "0" and y == "1" for x, y in zip(a, b))
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    return {"only_first_right": only_a, "only_second_right": only_b, "p_value": round(p, 4)}


def plot(results: dict, path: Path, problems: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc, ans, length) = plt.subplots(1, 3, figsize=(15, 4.2))
    labels = [str(b) if b is not None else "∞" for b in BUDGETS]
    panels = (
        (acc, "accuracy", "exact-match accuracy, %", 100),
        (ans, "answered", "responses with a \\boxed{} answer, %", 100),
        (length, "mean_answer_tokens", "tokens after </think> (mean)", 1),
    )
    for ax, key, what, scale in panels:
        for name, rows in results.items():
            ax.plot(range(len(rows)), [scale * r[key] for r in rows], marker="o", label=name)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("thinking budget (tokens; 0 = reasoning off, ∞ = none)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    acc.set_ylim(0, 102)
    ans.set_ylim(0, 102)
    acc.set_title(f"accuracy ({problems} problems)")
    ans.set_title("well-formed answers")
    length.set_title("answer length: work done after the cut")
    fig.suptitle("nano-tiny on fresh arithmetic problems, through nano.generate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=DIR, once per model")
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="problem seed (training uses 0 and 1)")
    parser.add_argument("--budgets", default=",".join("none" if b is None else str(b) for b in BUDGETS))
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=4096)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="float32", help="weights are stored in bf16; fp32 is what the CPU runs")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and accuracy.png")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rng = random.Random(args.seed)
    problems = [sample(rng) for _ in range(args.problems)]
    budgets = [None if b == "none" else int(b) for b in args.budgets.split(",")]
    results = {}
    for spec in args.model:
        name, folder = spec.split("=", 1)
        model = nano.load(folder, device=args.device, dtype=args.dtype)
        results[name] = []
        for budget in budgets:
            row = score(model, problems, budget, args.batch, args.max_new_tokens)
            results[name].append(row)
            print(f"{name:>17} budget {str(row['budget']):>9}: accuracy {100 * row['accuracy']:5.1f}%  "
                  f"answered {100 * row['answered']:5.1f}%  cut {100 * row['budget_hit']:5.1f}%  "
                  f"reasoning {row['mean_reasoning_tokens']:7.1f} tokens  answer {row['mean_answer_tokens']:6.1f} tokens  "
                  f"({row['seconds']} s)", flush=True)
    paired = {}
    if len(results) == 2:
        (first, a), (second, b) = results.items()
        for row_a, row_b in zip(a, b):
            test = paired[str(row_a["budget"])] = mcnemar(row_a["right"], row_b["right"])
            print(f"budget {str(row_a['budget']):>9}: {first} alone right {test['only_first_right']:3d}, "
                  f"{second} alone right {test['only_second_right']:3d}, p = {test['p_value']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        record = {
            "device": device_name(str(model.device)),
            "commit": commit(),
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "dtype": args.dtype,
            "problems": args.problems,
            "seed": args.seed,
            "results": results,
            "paired": paired,
        }
        (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        if budgets == BUDGETS:
            plot(results, args.out / "accuracy.png", args.problems)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
