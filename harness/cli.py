"""`nanokit eval`: lm-evaluation-harness tasks at several thinking budgets."""

from __future__ import annotations

import argparse


def cmd_eval(args: argparse.Namespace) -> int:
    from nano.cli import quiet_transformers

    from .run import Target, evaluate, parse_budgets, table

    quiet_transformers()
    if bool(args.model) == bool(args.endpoint):
        raise ValueError("give --model (a checkpoint folder or nano-tiny) or --endpoint (a server's /v1 URL)")
    target = Target(model=args.model, endpoint=args.endpoint, served_name=args.served_name, device=args.device,
                    dtype=args.dtype, onnx=args.onnx, batch_size=args.batch_size, grace=args.grace)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    summary = evaluate(target, tasks, parse_budgets(args.budgets), args.out, limit=args.limit,
                       include_paths=args.include_path or [], overwrite=args.overwrite)
    print(table(summary["rows"]))
    plot = "score_vs_budget.png" if summary["plot"] else "no plot (pip install matplotlib)"
    print(f"wrote {args.out}: results.json, results.md, {plot}, lm-eval/ (lm-eval's own results)")
    return 0


def add_eval(sub) -> None:
    from nano.cli import whole_number

    p = sub.add_parser("eval", help="lm-evaluation-harness tasks at several thinking budgets",
                       description="Score a checkpoint (through nano.generate, with the budget) or an OpenAI-compatible "
                       "endpoint (the budget in each request) on lm-eval tasks, once per budget; writes lm-eval's "
                       "results, one table and a plot of score against budget.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder, or a shipped model's name (nano-tiny)")
    source.add_argument("--endpoint", help="an OpenAI-compatible server's base URL, e.g. http://localhost:8000/v1")
    p.add_argument("--served-name", default="model", help="the model name the endpoint serves (default: model)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks (shipped: nanokit_arithmetic)")
    p.add_argument("--budgets", default="none", help="comma-separated budgets; none for no limit (default: none)")
    p.add_argument("--grace", type=whole_number(0), help="tokens allowed past a budget to finish a line")
    p.add_argument("--limit", type=whole_number(1), help="the first N documents of each task")
    p.add_argument("--batch-size", type=whole_number(1), default=16)
    p.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--onnx", help="run this ONNX bundle's graphs (nanokit export onnx of --model) instead of torch")
    p.add_argument("--include-path", action="append", help="more lm-eval task folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_eval)
