"""`nanokit prune`: Minitron pruning of a NemotronH checkpoint, from the command line."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

from nano.cli import whole_number
from nano.config import ATTENTION, MAMBA, MLP
from nano.memory import format_count

from .targets import PRESETS, Sizes, parameter_range, preset, pruned_counts

_positive = whole_number(1)


def _params(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of parameters such as 9e9, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of parameters, got {text!r}")
    return value


def _memory(text: str) -> tuple[str, int]:
    gpu, _, context = text.partition(":")
    if not gpu or not context.isdigit() or int(context) < 1:
        raise argparse.ArgumentTypeError(f"expected GPU:CONTEXT such as a10g:131072, got {text!r}")
    return gpu, int(context)


def _target(args, config):
    from .search import Budget

    sizes_given = [f"--{n.replace('_', '-')}" for n in ("hidden", "ffn", "mamba_heads", "attention_heads")
                   if getattr(args, n) is not None]
    kinds = [name for name, given in (("--preset", args.preset), ("--params", args.params is not None),
                                      ("--memory", args.memory is not None), ("sizes", sizes_given)) if given]
    if len(kinds) > 1:
        raise ValueError(f"name one target, not {' and '.join(kinds)}" + (f" ({', '.join(sizes_given)})" if sizes_given else ""))
    if args.preset:
        if args.layers is not None:
            raise ValueError(f"--preset {args.preset} sets the depth itself; drop --layers {args.layers}")
        return preset(args.preset, config)
    if args.params is not None:
        return Budget(params=args.params)
    if args.memory is not None:
        return Budget(gpu=args.memory[0], context=args.memory[1])
    sizes = Sizes(hidden=args.hidden, ffn=args.ffn, mamba_heads=args.mamba_heads,
                  attention_heads=args.attention_heads, layers=args.layers)
    if sizes == Sizes():
        raise ValueError("name a target: --preset, sizes (--hidden/--ffn/--layers/--mamba-heads/--attention-heads), "
                         "--params or --memory")
    sizes.plan(config)  # checked against the teacher below, with the names of the values
    return sizes


def _describe(config_fields: dict, pattern_counts: dict, parameters: str) -> str:
    counts = ", ".join(f"{n} {k}" for k, n in pattern_counts.items())
    return (f"{sum(pattern_counts.values())} layers ({counts}), hidden {config_fields['hidden_size']}, "
            f"ffn {config_fields['intermediate_size']}, mamba heads {config_fields['mamba_num_heads']}, "
            f"attention heads {config_fields['num_attention_heads']}: {parameters} parameters")


def _dry_run(args, config, target) -> int:
    import torch
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from nano.memory import parameter_count

    from .search import Budget, grid
    from .slicing import check_plan, pruned_config_dict

    pattern = config.hybrid_override_pattern
    teacher_counts = {k: pattern.count(k) for k in (MAMBA, ATTENTION, MLP)}
    if isinstance(target, Sizes):
        check_plan(config, target.plan(config))

    print(f"teacher: {_describe(config.to_dict(), teacher_counts, format_count(parameter_count(config)))}")
    if isinstance(target, Budget):
        # Which layers go is known only after the layer ranking: count with the first ones removed.
        drop = tuple(range(len(pattern) - (args.layers or len(pattern))))
        found = grid(config, drop, target)
        print(f"budget: {target.describe()}: {len(found)} widths on the grid within 2% of it"
              + (f" at {args.layers} layers (counted as if the first {len(drop)} went; the ranking decides)"
                 if drop else ""))
        for c in sorted(found, key=lambda c: -c.parameters)[:5]:
            print(f"  hidden {c.sizes.hidden}, ffn {c.sizes.ffn}, mamba heads {c.sizes.mamba_heads}: "
                  f"{format_count(c.parameters)} parameters, {c.memory_gib:.2f} GiB")
        return 0
    counts = pruned_counts(config, target)
    low, high = parameter_range(config, target)
    # Count the real module on the meta device too: the arithmetic and transformers must agree.
    kept = "".join(k * counts[k] for k in (MAMBA, ATTENTION, MLP)) if "layers" not in counts else None
    if kept is not None:
        plan = target.plan(config)
        check_plan(config, plan)
        fields = pruned_config_dict(config, plan)
        fields["hybrid_override_pattern"] = kept
        with torch.device("meta"):
            module_count = sum(p.numel() for p in NemotronHForCausalLM(NemotronHConfig(**fields)).parameters())
        if module_count != low:
            raise RuntimeError(f"parameter arithmetic ({low}) disagrees with transformers' module ({module_count})")
        print(f"pruned:  {_describe(fields, counts, format_count(low))}")
        print("pattern: which layers of each kind go is decided by layer importance on the calibration data")
    else:
        plan = target.plan(config)
        fields = pruned_config_dict(config, plan)
        print(f"pruned:  {counts['layers']} layers, hidden {plan.hidden}, ffn {plan.ffn}, mamba heads "
              f"{plan.mamba_heads}, attention heads {plan.attention_heads}: {format_count(low)} to {format_count(high)} "
              f"parameters, depending on which layers go")
        print("pattern: the layers that go are chosen by layer importance on the calibration data")
    changed = {k: fields[k] for k in ("hidden_size", "intermediate_size", "mamba_num_heads", "num_attention_heads")}
    print("config:  " + json.dumps(changed))
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from transformers import NemotronHConfig

    from nano.checkpoint import resolve

    teacher_dir = resolve(args.teacher)
    if not (teacher_dir / "config.json").exists():
        raise ValueError(f"{teacher_dir}: no config.json; --teacher is a NemotronH checkpoint folder")
    config = NemotronHConfig.from_pretrained(teacher_dir)
    target = _target(args, config)
    if args.dry_run:
        return _dry_run(args, config, target)
    if args.calib is None or args.out is None:
        raise ValueError("--calib and --out are needed (all but --dry-run)")
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")

    import nano
    from nano.cli import quiet_transformers

    from .calibration import calibration_tokens
    from .pipeline import prune, write

    import torch

    quiet_transformers()
    teacher = nano.load(teacher_dir, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"teacher: {teacher_dir} on {teacher.device}, {teacher.runtime_name()}", file=sys.stderr)
    tokens = calibration_tokens(args.calib, teacher.tokenizer, args.samples, args.length)
    print(f"calibration: {tokens.shape[0]} samples of {tokens.shape[1]} tokens from {args.calib}", file=sys.stderr)
    result = prune(
        teacher.model, tokens, target, layers=args.layers, layer_samples=args.layer_samples,
        layer_metric=args.layer_metric, batch_size=args.batch_size, heldout=args.heldout,
        search_options=dict(screen=args.screen, finalists=args.finalists, proxy_steps=args.proxy_steps),
        progress=sys.stderr.isatty(),
    )
    invoked = sys.argv[1:2] == ["prune"]  # from the console script, not from a caller of main(argv)
    record = dict(
        command=("nanokit " + shlex.join(sys.argv[1:])) if invoked else None,
        teacher=str(teacher_dir),
        target=target.as_dict() if isinstance(target, Sizes) else target.__dict__,
        calibration=dict(path=str(args.calib), samples=tokens.shape[0], length=tokens.shape[1]),
        layer_metric=args.layer_metric,
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write(result, teacher.config, teacher.tokenizer, args.out, record, overwrite=args.overwrite)
    from nano.memory import parameter_count

    print(f"pruned: {format_count(parameter_count(result.model.config))} parameters, pattern "
          f"{result.model.config.hybrid_override_pattern}; stages (s): {result.seconds}")
    print(f"wrote {args.out}")
    return 0


def add_prune(sub) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a NemotronH checkpoint Minitron-style (depth and width, by activation importance)",
        description="Score embedding channels, MLP neurons, Mamba heads and layers on calibration data, "
        "then cut the checkpoint to the target: a preset, explicit sizes, or a budget searched over widths.",
    )
    p.add_argument("--teacher", required=True, help="the checkpoint folder to prune")
    target = p.add_argument_group("target (one of: a preset, sizes, a budget)")
    target.add_argument("--preset", choices=sorted(PRESETS), help="a published shape, e.g. nano-9b-v2 from the 12B")
    target.add_argument("--hidden", type=_positive, help="embedding channels to keep")
    target.add_argument("--ffn", type=_positive, help="MLP neurons to keep per MLP layer")
    target.add_argument("--layers", type=_positive, help="layers to keep (with a budget: the depth to search at)")
    target.add_argument("--mamba-heads", type=_positive, help="Mamba heads to keep per layer (a multiple of the groups)")
    target.add_argument("--attention-heads", type=_positive, help="query heads to keep per attention layer (default: all)")
    target.add_argument("--params", type=_params, help="parameter budget, e.g. 9e9: the best width under it is searched")
    target.add_argument("--memory", type=_memory, metavar="GPU:CONTEXT",
                        help="memory budget, e.g. a10g:131072: the best width that fits is searched")
    p.add_argument("--calib", help="calibration data: a folder or file of text or jsonl, or a .pt/.safetensors of token ids")
    p.add_argument("--out", help="output checkpoint folder")
    p.add_argument("--samples", type=_positive, default=1024, help="calibration samples (default 1024)")
    p.add_argument("--length", type=_positive, default=4096, help="tokens per sample (default 4096)")
    p.add_argument("--layer-samples", type=_positive, default=8, help="samples the layer ranking uses (default 8)")
    p.add_argument("--layer-metric", choices=["kl", "loss"], default="kl",
                   help="a layer's score: KL from the full model's outputs without it (default), or the LM loss")
    p.add_argument("--batch-size", type=_positive, default=8)
    p.add_argument("--heldout", type=_positive, default=16, help="samples kept out to rank search candidates on")
    p.add_argument("--screen", type=_positive, default=8, help="search: candidates pruned and scored untrained")
    p.add_argument("--finalists", type=_positive, default=3, help="search: candidates distilled briefly")
    p.add_argument("--proxy-steps", type=_positive, default=200, help="search: distillation steps per finalist")
    p.add_argument("--device", help="cpu, cuda, ... (default: the GPU if there is one)")
    p.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], help="default: bf16 on a GPU, fp32 on a CPU")
    p.add_argument("--dry-run", action="store_true", help="read config.json only and print the pruned shape")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)
