"""Minitron pruning at the real scale: Nano-12B-v2-Base (random bf16 weights) to the 9B preset.

Times each stage and records its peak GPU memory:
- importance: width importance over `--samples` samples of `--length` tokens (random ids);
- layers: the greedy layer ranking over `--layer-samples` samples, removing the preset's layers
  of each kind (1 Mamba, 2 attention, 3 MLP);
- slicing: cutting the 12B to the 9B preset's sizes (the layers dropped are the published 9B's,
  when the layer stage is not run in the same process).

    python -m bench.prune_scale --stages importance slicing
    python -m bench.prune_scale --stages layers
"""

from __future__ import annotations

import argparse
import time

import torch


from bench.random_weights import random_model
from bench.record import write

from nano.memory import GIB, parameter_count
from nano.shapes import NANO_9B_V2
from prune.importance import rank_layers, width_importance
from prune.slicing import slice_model
from prune.targets import preset


def published_drop(teacher: str, pruned: str) -> tuple[int, ...]:
    """The layers of `teacher` to drop to get `pruned` (matched left to right)."""
    keep, j = [], 0
    for i, kind in enumerate(teacher):
        if j < len(pruned) and pruned[j] == kind:
            keep.append(i)
            j += 1
    if j != len(pruned):
        raise ValueError("the pruned pattern is not a subsequence of the teacher's")
    return tuple(i for i in range(len(teacher)) if i not in keep)


def stage(rows, name, fn, **info):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rows.append(dict(stage=name, seconds=round(seconds, 1), peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                     **info))
    print(rows[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", nargs="+", choices=["importance", "layers", "slicing"],
                        default=["importance", "layers", "slicing"])
    parser.add_argument("--samples", type=int, default=1024)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layer-samples", type=int, default=8)
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    teacher = random_model("nano-12b-v2-base", "cuda").model
    build_s = time.perf_counter() - start
    config = teacher.config
    sizes = preset("nano-9b-v2", config)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (args.samples, args.length), generator=generator)
    rows: list[dict] = []

    importance = None
    if "importance" in args.stages:
        importance = stage(rows, "importance", lambda: width_importance(teacher, tokens, args.batch_size),
                           samples=args.samples, tokens=args.samples * args.length)
        rows[-1]["tokens_per_s"] = round(rows[-1]["tokens"] / rows[-1]["seconds"])
    drop = published_drop(config.hybrid_override_pattern, NANO_9B_V2["hybrid_override_pattern"])
    if "layers" in args.stages:
        removal = sizes.removal(config.hybrid_override_pattern)
        steps = stage(rows, "layers", lambda: rank_layers(teacher, tokens[: args.layer_samples], removal),
                      samples=args.layer_samples, tokens=args.layer_samples * args.length)
        drop = tuple(sorted(s.layer for s in steps))
        rows[-1]["removed"] = " ".join(f"{s.layer}{s.kind}" for s in steps)
    if "slicing" in args.stages:
        if importance is None:
            raise SystemExit("the slicing stage needs the importance stage in the same run")
        plan = sizes.plan(config, drop)
        pruned = stage(rows, "slicing", lambda: slice_model(teacher, importance, plan))
        rows[-1]["parameters"] = parameter_count(pruned.config)
        rows[-1]["pattern"] = pruned.config.hybrid_override_pattern
        with torch.no_grad():  # the pruned model runs
            logits = pruned(input_ids=tokens[:1, :256].cuda(), use_cache=False).logits
        rows[-1]["finite_logits"] = bool(torch.isfinite(logits).all())
    columns = ["stage", "samples", "tokens", "seconds", "tokens_per_s", "peak_gib", "parameters", "removed"]
    suffix = "-".join(args.stages)
    write(f"prune-scale-{suffix}", rows, columns, "cuda", teacher="nano-12b-v2-base (random bf16 weights)",
          target="nano-9b-v2 preset", teacher_parameters=parameter_count(config),
          teacher_weight_gib=round(sum(p.numel() * p.element_size() for p in teacher.parameters()) / GIB, 2),
          build_teacher_s=round(build_s, 1), batch_size=args.batch_size, length=args.length,
          torch=torch.__version__, transformers=transformers.__version__)


if __name__ == "__main__":
    main()
