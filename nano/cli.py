"""`nanokit`: the toolkit's command line.

Subcommands of the core live here; the pipeline stages (`prune`, `export`, ...) add theirs through
the `nanokit.commands` entry point group, so the core does not import them.
"""

from __future__ import annotations

import argparse
import sys
import time
from importlib.metadata import entry_points

DEFAULT_MODEL = "nano-tiny"
DEFAULT_NOTICE = (
    "note: no --model given; using nano-tiny, the 4.5M-parameter NemotronH hybrid shipped with nanokit, "
    "trained to reason about integer arithmetic (+ - *) and nothing else."
)


def _printable(text: str) -> str:
    """Text safe for a terminal: control characters other than newline and tab shown escaped."""
    return "".join(c if c in "\n\t" or c.isprintable() else repr(c)[1:-1] for c in text)


class _Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.enabled else text


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _summary(gen, budget, grace, seconds: float) -> str:
    from .budget import default_grace

    if budget is None:
        limit = "no budget"
    else:
        limit = f"budget {budget}, grace {default_grace(budget) if grace is None else grace}"
    cut = "; cut by the controller" if gen.budget_hit else ""
    return (
        f"reasoning {gen.reasoning_tokens} tokens ({limit}{cut}) · answer {gen.answer_tokens} tokens · "
        f"prompt {gen.prompt_tokens} tokens · finished by {gen.finish_reason} · {seconds:.2f} s"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    import nano

    quiet_transformers()
    out, err = sys.stdout, sys.stderr
    style = _Style(out.isatty())
    if args.model is None:
        print(DEFAULT_NOTICE, file=err)
    model = nano.load(args.model or DEFAULT_MODEL, device=args.device)
    print(f"runtime: {model.runtime_name()} on {model.device}, {str(model.dtype).removeprefix('torch.')}", file=err)

    kwargs = dict(
        budget=args.budget,
        grace=args.grace,
        think=not args.no_think,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    reasoning_header = style("── reasoning ──", "2;36")
    answer_header = style("── answer ──", "1;32")
    start = time.perf_counter()
    if args.stream:
        stream = nano.generate(model, args.prompt, stream=True, **kwargs)
        current = None
        for event in stream:
            if event.kind != current:
                if current is not None:
                    out.write("\n")
                out.write((reasoning_header if event.kind == "reasoning" else answer_header) + "\n")
                current = event.kind
            text = _printable(event.text)
            out.write(style(text, "2") if event.kind == "reasoning" else text)
            out.flush()
        out.write("\n")
        gen = stream.result
    else:
        gen = nano.generate(model, args.prompt, **kwargs)
        if gen.reasoning:
            out.write(f"{reasoning_header}\n{style(_printable(gen.reasoning), '2')}\n")
        out.write(f"{answer_header}\n{_printable(gen.answer)}\n")
    seconds = time.perf_counter() - start
    print(style(_summary(gen, args.budget, args.grace, seconds), "2"), file=out)
    return 0


def whole_number(minimum: int):
    """An argparse type: a whole number of at least `minimum`, with an error naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {value}")
        return value

    return parse


def add_generate(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a response with the reasoning cut near a token budget",
        description="Generate with the thinking-budget controller: reasoning is cut near --budget "
        "tokens (at the end of a line, within --grace more), `</think>` is forced, and the answer "
        "follows in the same pass.",
    )
    p.add_argument("prompt", help="the user's message")
    p.add_argument("--model", help="checkpoint folder, or a shipped model's name (default: nano-tiny)")
    p.add_argument("--budget", type=whole_number(0), help="reasoning tokens allowed (0: reasoning off; default: no limit)")
    p.add_argument("--grace", type=whole_number(0), help="tokens allowed past the budget to finish a line (default: 10%% of it, at least 1)")
    p.add_argument("--no-think", action="store_true", help="turn reasoning off")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    p.set_defaults(func=cmd_generate)


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .config import ConfigError, check_supported
    from .hardware import TARGETS
    from .memory import GIB, check_quant_runs_on, fit

    source = Path(args.config) if args.config else Path(args.model) / "config.json"
    if not source.exists():
        raise ValueError(f"{source}: not found; --model is a checkpoint folder, --config a config.json")
    try:
        config = json.loads(source.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None
    try:
        check_supported(config, str(source), families=("nemotron_h", "decilm"))
    except ConfigError as e:
        raise ValueError(str(e)) from None
    if args.jetson:
        from .memory import jetson_options

        rows = jetson_options(config, args.batch)
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"{source}: Jetson boards, batch {args.batch} (linear layers at the precision; embeddings, head, norms, conv, KV and activations fp16)")
        print(f"  {'board':<8} {'usable':>7} {'precision':>9} {'weights':>9}  longest context")
        for r in rows:
            context = "none" if not r["max_context"] else f"{r['max_context']}" + (" (all)" if r["full_context"] else "")
            print(f"  {r['board']:<8} {r['usable_gib']:>6.1f}G {r['precision']:>9} {r['weights_gib']:>8.2f}G  {context}")
        return 0
    if not args.gpu:
        raise ValueError("--gpu is required (or --jetson for every Jetson board)")
    options = dict(weight_dtype=args.dtype, kv_dtype=args.kv_dtype, ssm_dtype=args.ssm_dtype, quant=args.quant,
                   recipe=args.recipe, tp=args.tp)
    if args.quant:
        check_quant_runs_on(args.quant, args.gpu)
    found = fit(config, args.gpu, args.context, args.batch, config.get("max_position_embeddings"), **options)
    result, best_context, best_batch = found.plan, found.max_context, found.max_batch
    if args.json:
        print(json.dumps(dict(result.as_dict(), gpu=args.gpu, **options, max_context=best_context,
                              max_batch=best_batch, quantizations_that_fit=[list(q) for q in found.quantizations])))
        return 0
    gib = lambda n: f"{n / GIB:8.2f} GiB"  # noqa: E731
    gpus = f"{args.tp} x {args.gpu}, per GPU" if args.tp > 1 else args.gpu
    print(f"{source}: batch {args.batch} x {args.context} tokens on {gpus} ({TARGETS.get(args.gpu.lower(), '?')} GiB usable)")
    for name in ("weights", "kv_cache", "ssm_state", "conv_state", "workspace", "overhead"):
        print(f"  {name:<10} {gib(getattr(result, name))}")
    state = result.weights + result.kv_cache + result.ssm_state + result.conv_state
    print(f"  {'total':<10} {gib(result.total)}   (weights and caches alone: {state / GIB:.2f} GiB)")
    print(f"  {'usable':<10} {gib(result.usable)}   {'fits' if result.fits else 'does NOT fit'}")
    print(f"largest context at batch {args.batch}: {best_context or 'none'}; largest batch at {args.context} tokens: "
          f"{best_batch or 'none'}")
    if not result.fits:
        print(f"short by {found.shortfall / GIB:.2f} GiB: {found.advice()}")
    return 0


def add_plan(sub) -> None:
    from .hardware import DEFAULT_RECIPE, DTYPE_BYTES, QUANT_FORMATS, RECIPES, TARGETS

    p = sub.add_parser("plan", help="the memory a model needs on a GPU, before anything starts",
                       description="Weights, KV cache (attention layers only), Mamba state, prefill workspace and "
                       "overhead on one GPU; whether it fits, and the largest context and batch that do.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint folder (only its config.json is read)")
    source.add_argument("--config", help="a config.json")
    p.add_argument("--gpu", help=f"one of {', '.join(TARGETS)}")
    p.add_argument("--jetson", action="store_true", help="every Orin and Thor board at each precision it runs")
    p.add_argument("--context", type=whole_number(1), default=131072)
    p.add_argument("--batch", type=whole_number(1), default=1)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="weights (the unquantized ones, with --quant)")
    p.add_argument("--quant", choices=list(QUANT_FORMATS), help="quantize the weights --recipe names, as nanokit export does")
    p.add_argument("--recipe", choices=list(RECIPES), default=DEFAULT_RECIPE,
                   help="mamba-mlp: the Mamba projections and MLPs (NVIDIA's published Nano 2 recipe); mlp: MLPs only")
    p.add_argument("--kv-dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    p.add_argument("--ssm-dtype", choices=sorted(DTYPE_BYTES), default="fp32")
    p.add_argument("--tp", type=whole_number(1), default=1, help="tensor-parallel size: the figures are per GPU")
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.set_defaults(func=cmd_plan)


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .tokenize import tokenize

    quiet_transformers()
    report = tokenize(args.tokenizer, args.data, args.out, field=args.field, split=args.split, workers=args.workers,
                      overwrite=args.overwrite, progress=sys.stderr.isatty())
    print(f"{report.prefix}.bin, .idx: {report.documents:,} documents, {report.tokens:,} tokens ({report.dtype}), "
          f"in {report.seconds:.1f} s with {report.workers} workers ({report.tokens_per_second:,.0f} tokens/s); "
          f"manifest {report.prefix}.json")
    return 0


def add_tokenize(sub) -> None:
    p = sub.add_parser("tokenize", help="text to a token store on disk (Megatron's indexed format) for distill and prune",
                       description="Tokenize documents in worker processes, each followed by the EOS token, into "
                       "OUT.bin + OUT.idx (the format of Megatron's indexed datasets, read by memory map by "
                       "`nanokit distill --data` and `nanokit prune --calib`), with OUT.json describing it. "
                       "Written atomically: a run that does not finish leaves no OUT.idx.")
    p.add_argument("--tokenizer", required=True, help="a checkpoint or tokenizer folder, or a shipped model's name")
    p.add_argument("--data", required=True, nargs="+", metavar="PATH",
                   help="text files or folders of them, jsonl, parquet, or a Hugging Face datasets folder (save_to_disk)")
    p.add_argument("--out", required=True, help="the store's prefix: writes OUT.bin, OUT.idx and OUT.json")
    p.add_argument("--field", default="text", help="the jsonl field or the parquet/dataset column (default: text)")
    p.add_argument("--split", default="train", help="the split of a DatasetDict folder (default: train)")
    p.add_argument("--workers", type=whole_number(1), help="tokenizer processes (default: one per CPU core)")
    p.add_argument("--overwrite", action="store_true", help="replace a store already at OUT")
    p.set_defaults(func=cmd_tokenize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nanokit",
        description="Compress, run with a thinking budget, and deploy NVIDIA's small Nemotron models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_generate(sub)
    add_plan(sub)
    add_tokenize(sub)
    for entry in entry_points(group="nanokit.commands"):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError) as e:
        print(f"nanokit {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
