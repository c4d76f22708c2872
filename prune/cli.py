"""`nanokit prune`: Minitron pruning of a NemotronH checkpoint, from the command line."""

from __future__ import annotations

import argparse
import json
import os
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
    """The teacher and the pruned shapes in numbers, from the config alone (no torch, no weights)."""
    from nano.memory import parameter_count

    from .search import Budget, grid
    from .targets import check_plan, pruned_config_dict

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
    plan = target.plan(config)
    fields = pruned_config_dict(config, plan)
    if "layers" not in counts:
        print(f"pruned:  {_describe(fields, counts, format_count(low))}")
        print("pattern: which layers of each kind go is decided by layer importance on the calibration data")
    else:
        print(f"pruned:  {counts['layers']} layers, hidden {plan.hidden}, ffn {plan.ffn}, mamba heads "
              f"{plan.mamba_heads}, attention heads {plan.attention_heads}: {format_count(low)} to {format_count(high)} "
              f"parameters, depending on which layers go")
        print("pattern: the layers that go are chosen by layer importance on the calibration data")
    changed = {k: fields[k] for k in ("hidden_size", "intermediate_size", "mamba_num_heads", "num_attention_heads")}
    print("config:  " + json.dumps(changed))
    return 0


def _calibration(args, tokenizer):
    """The calibration samples. Text too short for one sample is refused with the numbers that would
    do, and fewer samples than --samples is said on stderr: either way the user learns it now, not
    from scores taken on less data than asked for."""
    from nano.data import token_samples
    from nano.samples import ShortDataError

    try:
        tokens = token_samples(args.calib_data, tokenizer, args.samples, args.length)
    except ShortDataError as e:
        raise ValueError(_short_text_advice(args, e.tokens)) from None
    if len(tokens) == 0:
        raise ValueError(f"{args.calib}: no sample of --length {args.length} tokens; lower --length or give "
                         "more data")
    if len(tokens) < args.samples:
        print(_fewer_samples_warning(args, len(tokens)), file=sys.stderr)
    return tokens


def _short_text_advice(args, made: int) -> str:
    """The options, in numbers, when the text makes `made` tokens, fewer than one sample."""
    options = []
    if made // args.samples >= 2:
        options.append(f"a lower --length: --length {made // args.samples} gives all {args.samples} samples")
    if made >= 2:
        options.append(f"fewer --samples: --samples 1 --length {made} is the longest sample it makes")
    options.append(f"more text: --samples {args.samples} of --length {args.length} take "
                   f"{args.samples * args.length:,} tokens")
    return (f"{args.calib}: the calibration data makes {made} tokens, fewer than one sample of --length "
            f"{args.length}; " + "; or ".join(options))


def _fewer_samples_warning(args, got: int) -> str:
    fits = got * args.length // args.samples
    return (f"warning: {args.calib} makes {got} samples of --length {args.length}, fewer than --samples "
            f"{args.samples}; pruning with those {got} (more text" + (f", or --length {fits}," if fits >= 2 else "")
            + f" would give all {args.samples})")


def cpu_settings() -> None:
    """Let OpenMP's idle threads sleep soon after each op (libgomp spins 300,000 rounds first by
    default). On a CPU shared with other work a spinning thread holds a core that the thread it
    waits for needs, and a small prune's many small ops then took minutes instead of seconds
    (bench/results/prune-small-cpu-busy2*.json); on an idle CPU it costs nothing measurable.
    libgomp reads this when torch loads, so it is set before; a value in the environment stands."""
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")


def cmd_prune(args: argparse.Namespace) -> int:
    cpu_settings()
    from nano.config import HybridConfig
    from nano.shipped import resolve

    teacher_dir = resolve(args.teacher)
    if not (teacher_dir / "config.json").exists():
        raise ValueError(f"{teacher_dir}: no config.json; --teacher is a NemotronH checkpoint folder")
    config = HybridConfig.read(teacher_dir)  # the targets and the dry-run need its numbers only
    target = _target(args, config)
    if args.dry_run:
        return _dry_run(args, config, target)
    if args.calib is None or args.out is None:
        raise ValueError("--calib and --out are needed (all but --dry-run)")
    args.calib_data = args.calib[0] if len(args.calib) == 1 else args.calib  # a path, or blend words / files
    args.calib = " ".join(args.calib)
    if Path(args.out).exists() and not args.overwrite:
        raise ValueError(f"{args.out} already exists; pass --overwrite to replace it")

    import torch

    import nano
    from nano.cli import quiet_transformers

    from .pipeline import prune, write

    quiet_transformers()
    teacher = nano.load(teacher_dir, device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"teacher: {teacher_dir} on {teacher.device}, {teacher.runtime_name()}", file=sys.stderr)
    tokens = _calibration(args, teacher.tokenizer)
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
    p.add_argument("--calib", nargs="+", metavar="DATA",
                   help="calibration data: a token store from `nanokit tokenize` or a blend of them (0.7 A 0.3 B), "
                   "a folder or file of text, jsonl or parquet, or a .pt/.safetensors of token ids")
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


def _distributed(device_arg):
    """Join `torchrun`'s process group when launched by it; the device of this process."""
    import os

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available() and device_arg != "cpu":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
            return torch.device("cuda", local)
        dist.init_process_group("gloo")
        return torch.device("cpu")
    if device_arg:
        return torch.device(device_arg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _saved_dtype(folder: Path):
    import torch

    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def cmd_distill(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    import nano
    from nano.atomic import atomic_dir
    from nano.checkpoint import write_checkpoint
    from nano.cli import quiet_transformers
    from nano.samples import Blend
    from nano.shipped import resolve

    from .distill import DistillConfig, distill, full_state_dict

    out = Path(args.out)
    if out.exists() and not args.overwrite and not args.resume:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    quiet_transformers()
    device = _distributed(args.device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    student_dir = resolve(args.student)
    teacher = nano.load(resolve(args.teacher), device=device)
    student = nano.load(student_dir, device=device, dtype=torch.float32)  # fp32 master weights
    if teacher.model.config.vocab_size != student.model.config.vocab_size:
        raise ValueError(f"teacher and student vocabularies differ: {teacher.model.config.vocab_size} vs "
                         f"{student.model.config.vocab_size}")
    steps = args.tokens // (args.batch_size * args.seq_len)
    if steps < 1:
        raise ValueError(f"--tokens {args.tokens} is less than one step of {args.batch_size} x {args.seq_len} tokens")
    train, held = _training_data(args, student.tokenizer, steps * args.batch_size)
    config = DistillConfig(
        steps=steps, batch_size=args.batch_size, micro_batch=args.micro_batch, lr=args.lr, min_lr=args.min_lr,
        warmup=args.warmup, schedule=args.schedule, weight_decay=args.weight_decay, temperature=args.temperature,
        top_k=args.top_k, ce_weight=args.ce_weight, eval_every=args.eval_every, save_every=args.save_every,
        seed=args.seed, activation_checkpointing=not args.no_activation_checkpointing,
        checkpoint_kinds=args.checkpoint_kinds, shard_teacher=not args.replicate_teacher,
    )
    checkpoints = Path(args.checkpoints) if args.checkpoints else out.with_name(out.name + ".checkpoints")
    if rank == 0:
        kind = "on disk, read by memory map" if isinstance(train, Blend) else "in memory"
        print(f"distill: {steps} steps of {args.batch_size} x {args.seq_len} tokens on {world} process(es), "
              f"{len(train):,} training samples ({kind}), {held.shape[0]} held out; checkpoints in {checkpoints}",
              file=sys.stderr)
    history = distill(teacher.model, student.model, train, held, config, checkpoints=checkpoints,
                      resume=args.resume, progress=sys.stderr.isatty())
    state = full_state_dict(student.model)
    if rank == 0:
        dtype = _saved_dtype(student_dir)
        with atomic_dir(out, overwrite=True) as tmp:
            write_checkpoint(tmp, student.model, student.tokenizer, state_dict={k: v.to(dtype) for k, v in state.items()})
            record = dict(teacher=str(args.teacher), student=str(args.student), data=list(args.data),
                          blend=train.describe() if isinstance(train, Blend) else None,
                          processes=world, config=config.__dict__, resumed_from=history.resumed_from,
                          steps=history.steps, evals=history.evals)
            (tmp / "distill.json").write_text(json.dumps(record, indent=1) + "\n")
        last = history.evals[-1] if history.evals else {}
        print(f"distilled: {steps} steps; held-out loss {last.get('lm_loss', float('nan')):.4f}, "
              f"KL to the teacher {last.get('kl', float('nan')):.4f}; wrote {out}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


def _training_data(args, tokenizer, draws: int):
    """The training samples (a blend of stores on disk, or a tensor in memory) and the held-out ones."""
    from nano.data import token_samples
    from nano.samples import looks_like_blend, open_blend

    held_out = args.eval_samples if args.eval_data is None else 0
    held = None if args.eval_data is None else token_samples(args.eval_data, tokenizer, args.eval_samples,
                                                             args.seq_len)
    if looks_like_blend(args.data):
        train = open_blend(args.data, args.seq_len, seed=args.seed, held_out=held_out)
        return train, held if held is not None else train.held_out_samples()
    data = args.data[0] if len(args.data) == 1 else args.data
    tokens = token_samples(data, tokenizer, samples=draws + held_out, length=args.seq_len)
    if held is not None:
        return tokens, held
    if tokens.shape[0] <= held_out:
        raise ValueError(f"{' '.join(args.data)}: {tokens.shape[0]} samples of {args.seq_len} tokens; more than "
                         f"--eval-samples {held_out} are needed (or give --eval-data)")
    return tokens[:-held_out], tokens[-held_out:]


def add_distill(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="recover a pruned model by distillation on the teacher's logits",
        description="Train the student on the teacher's logits (forward KL). Resumable; under torchrun, "
        "sharded with FSDP2 over the processes.",
    )
    p.add_argument("--teacher", required=True, help="the teacher checkpoint folder")
    p.add_argument("--student", required=True, help="the student checkpoint folder (e.g. from nanokit prune)")
    p.add_argument("--data", required=True, nargs="+", metavar="DATA",
                   help="token stores from `nanokit tokenize`, blended by weight (0.7 A 0.3 B; without weights, by "
                   "size) and read by memory map; or training text read into memory: a folder or file of text, "
                   "jsonl or parquet, or a .pt/.safetensors of token ids")
    p.add_argument("--tokens", type=_positive, required=True, help="training tokens (steps = tokens / (batch x seq-len))")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--eval-data", help="held-out text (default: the last --eval-samples samples of --data; of a "
                   "blend, the last samples of each store, kept out of training)")
    p.add_argument("--eval-samples", type=_positive, default=16)
    p.add_argument("--seq-len", type=_positive, default=4096)
    p.add_argument("--batch-size", type=_positive, default=8, help="sequences per optimizer step, all processes together")
    p.add_argument("--micro-batch", type=_positive, default=1, help="sequences per forward, per process")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup", type=whole_number(0), default=20, help="warm-up steps")
    p.add_argument("--schedule", choices=["cosine", "wsd"], default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=_positive, help="distill on the teacher's top-k logits only")
    p.add_argument("--ce-weight", type=float, default=0.0, help="weight of a next-token loss term (default 0)")
    p.add_argument("--eval-every", type=_positive, default=50)
    p.add_argument("--save-every", type=_positive, default=50)
    p.add_argument("--checkpoints", help="checkpoint folder (default: OUT.checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--checkpoint-kinds", default="M*-",
                   help="pattern letters of the layers recomputed in backward (default M*-: all); the others "
                   "keep their activations, faster for more memory")
    p.add_argument("--replicate-teacher", action="store_true",
                   help="under torchrun, a whole teacher on every GPU instead of a shard (no weight gathers)")
    p.add_argument("--device", help="cpu, cuda, ... (under torchrun: each process's GPU)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_distill)
