"""How long `nanokit prune` takes on a small case (issue 17): a 62-layer tiny hybrid (the Nano-12B's
pattern, hidden 64, random weights) cut to 56 layers on 16 samples of 64 tokens, on the CPU.

The teacher (`nano.tiny`) and the calibration text (the .py files of the installed torch.nn, which
every install has) are built in a temporary folder. Then:
- end to end: `python -m nano.cli prune --teacher T --layers 56 --calib C --samples 16 --length 64
  --out O` in a fresh process, timed as a user would (imports and loading included);
- per stage, in this process: loading, calibration text, width importance, layer ranking, slicing
  (no search: the target is explicit), writing; and the layers removed with their scores, so that
  runs of two versions can be held to the same result.
Wall and CPU seconds both: on a shared machine the wall time moves with the others' load, the CPU
time much less (the load averages before and after are recorded). `--busy N` runs N processes
spinning on the CPU meanwhile, the other work of a shared machine made repeatable: on 2 cores
that is where the old ranking's many small multi-threaded ops took minutes.

    python -m bench.prune_small
    python -m bench.prune_small --busy 2 --name prune-small-cpu-busy2
    python -m bench.prune_small --name prune-small-cpu-before   # from a checkout of the old code
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.record import write

NANO_12B_PATTERN = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
SHAPE = dict(hybrid_override_pattern=NANO_12B_PATTERN, hidden_size=64, intermediate_size=128, mamba_num_heads=8,
             mamba_head_dim=16, n_groups=2, num_attention_heads=4, num_key_value_heads=2)


def calibration_folder(folder: Path) -> Path:
    """The top-level .py files of the installed torch.nn, copied (the same text on every install of one torch)."""
    import torch

    folder.mkdir(parents=True)
    for source in sorted(Path(torch.nn.__file__).parent.glob("*.py")):
        (folder / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


def prune_arguments(teacher, calib, out, args) -> list[str]:
    return ["prune", "--teacher", str(teacher), "--layers", str(args.layers), "--calib", str(calib),
            "--samples", str(args.samples), "--length", str(args.length), "--out", str(out)]


def end_to_end(arguments: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds of the command in a fresh process, from this checkout (the working
    directory first on the path, so that an older checkout measures its own code)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nano.cli", *arguments], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)


def timed(rows: list[dict], name: str, fn):
    """Run `fn`, adding a row with its wall seconds and this process's CPU seconds (all threads):
    the CPU time says how much work it was when other work shares the machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    rows.append(dict(stage=name, seconds=round(time.perf_counter() - wall, 2),
                     cpu_seconds=round(time.process_time() - cpu, 2)))
    return out


def stages(args, teacher_dir: Path, calib: Path, out: Path) -> tuple[list[dict], dict]:
    """The stages `prune.pipeline.prune` runs for explicit sizes, with its defaults (8 samples for
    the layer ranking, 2 at a time; batches of 8 for the width importance), then the writing."""
    import nano
    from nano.data import token_samples
    from prune.importance import rank_layers, width_importance
    from prune.pipeline import Result
    from prune.pipeline import write as write_pruned
    from prune.slicing import slice_model
    from prune.targets import Sizes

    rows: list[dict] = []
    teacher = timed(rows, "load", lambda: nano.load(teacher_dir, device="cpu"))
    model = teacher.model
    tokens = timed(rows, "calibration text", lambda: token_samples(calib, teacher.tokenizer, args.samples, args.length))
    sizes = Sizes(layers=args.layers)
    importance = timed(rows, "width importance", lambda: width_importance(model, tokens, batch_size=8))
    removal = sizes.removal(model.config.hybrid_override_pattern)
    steps = timed(rows, "layer ranking", lambda: rank_layers(model, tokens[:8], removal, batch_size=2))
    plan = sizes.plan(model.config, tuple(sorted(s.layer for s in steps)))
    pruned = timed(rows, "slicing", lambda: slice_model(model, importance, plan))
    result = Result(pruned, plan, importance, steps, None)
    timed(rows, "writing", lambda: write_pruned(result, teacher.config, teacher.tokenizer, out, {}, overwrite=True))
    removed = dict(pattern=pruned.config.hybrid_override_pattern,
                   layer_steps=[dict(layer=s.layer, kind=s.kind, score=s.score) for s in steps])
    return rows, removed


def busy(count: int) -> list[subprocess.Popen]:
    """`count` processes spinning on the CPU, as other work on the machine would."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def as_nanokit_prune_sets_up() -> None:
    """The process settings `nanokit prune` makes before torch loads (`prune.cli.cpu_settings`; none
    in older checkouts), so that the stages timed in this process run as the command's do."""
    from prune import cli

    getattr(cli, "cpu_settings", lambda: None)()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=56)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the CPU meanwhile")
    parser.add_argument("--name", default="prune-small-cpu")
    args = parser.parse_args()
    as_nanokit_prune_sets_up()

    import torch
    import transformers

    from nano.tiny import build_tiny_checkpoint

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher = build_tiny_checkpoint(root / "teacher", **SHAPE)
        calib = calibration_folder(root / "calib")
        spinning = busy(args.busy)
        try:
            wall, cpu = end_to_end(prune_arguments(teacher, calib, root / "out-command", args))
            rows, removed = stages(args, teacher, calib, root / "out-stages")
        finally:
            for process in spinning:
                process.kill()
                process.wait()
    rows.insert(0, dict(stage="end to end (nanokit prune, fresh process)", seconds=round(wall, 2),
                        cpu_seconds=round(cpu, 2)))
    measured = "nanokit " + " ".join(prune_arguments("TEACHER", "CALIB", "OUT", args))
    write(args.name, rows, ["stage", "seconds", "cpu_seconds"], "cpu", measured=measured,
          teacher=dict(SHAPE, layers=len(NANO_12B_PATTERN)), torch_threads=torch.get_num_threads(),
          gomp_spincount=os.environ.get("GOMP_SPINCOUNT"), busy_processes=args.busy,
          load_average_before=load_before, load_average_after=[round(x, 2) for x in os.getloadavg()], **removed)


if __name__ == "__main__":
    main()
