"""Minitron at small scale: does pruning plus distillation beat training from scratch, and width beat depth?

A 57M-parameter NemotronH teacher (Mamba, attention and MLP layers) is trained from scratch on the
Python source files of the installed packages (byte-level tokens; files split into training and
held-out sets by a hash of their path). It is pruned to about 63% of its parameters two ways at
(nearly) equal size, with the toolkit's own pruner:
- width only: hidden 512 -> 416, FFN 2560 -> 1920, Mamba heads 16 -> 12 (35.76M);
- depth only: 28 -> 18 layers, 4 Mamba, 5 MLP and 1 attention layer removed (35.44M);
and each is distilled for the same T tokens (forward KL, the toolkit's trainer). The baseline is
the width-only shape trained from scratch with the next-token loss for the same T tokens.
Reported: held-out loss of the teacher, of each student untrained, distilled and from scratch,
and the share of the gap between scratch and teacher that distillation closes.

    python experiments/minitron/run.py --out experiments/minitron/results

Or in two processes (each fits a 10-minute slot on the GPU machine), then merged:

    python experiments/minitron/run.py --out A --only pruned --teacher-tokens T1 --student-tokens T2
    python experiments/minitron/run.py --out B --only scratch --teacher-tokens T1 --student-tokens T2
    python experiments/minitron/run.py --out experiments/minitron/results --merge A/results.json B/results.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.record import commit, device_name  # noqa: E402

from nano.memory import parameter_count  # noqa: E402
from nano.tiny import tiny_config, tiny_tokenizer  # noqa: E402
from nano.data import token_samples  # noqa: E402
from prune.proxy import heldout_loss  # noqa: E402
from prune.importance import rank_layers, width_importance  # noqa: E402
from prune.slicing import slice_model  # noqa: E402
from prune.targets import Sizes  # noqa: E402
from prune.distill import DistillConfig, distill  # noqa: E402

TEACHER = dict(
    hybrid_override_pattern="M-M-M*-M-M-M*-M-M-M*-M-M-M*-",
    hidden_size=512,
    intermediate_size=2560,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    mamba_num_heads=16,
    mamba_head_dim=64,
    n_groups=4,
    ssm_state_size=64,
    chunk_size=128,
    max_position_embeddings=4096,
    initializer_range=0.02,
)
WIDTH = Sizes(hidden=416, ffn=1920, mamba_heads=12)
DEPTH = Sizes(remove=(("M", 4), ("-", 5), ("*", 1)))


def python_files() -> tuple[list[Path], list[Path]]:
    """The installed packages' .py files, split by a hash of the path: 1 in 20 held out."""
    roots = sorted({Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")})
    files = sorted({p for root in roots for p in root.rglob("*.py") if p.is_file()})
    held = [p for p in files if int(hashlib.sha1(str(p).encode()).hexdigest(), 16) % 20 == 0]
    held_set = set(held)
    return [p for p in files if p not in held_set], held


def probe(tokenizer, files, args, device) -> float:
    """Training tokens/s of the teacher's shape: a few timed steps on a throwaway model."""
    from transformers import NemotronHForCausalLM

    tokens = token_samples(files[:200], tokenizer, samples=args.batch_size * 8, length=args.seq_len)
    model = NemotronHForCausalLM(tiny_config(**TEACHER)).to(device)
    config = DistillConfig(steps=8, batch_size=args.batch_size, micro_batch=args.batch_size, warmup=1,
                           activation_checkpointing=False)
    history = distill(None, model, tokens, None, config)
    seconds = sum(s["seconds"] for s in history.steps[3:])  # after compilation and warm-up
    return 5 * args.batch_size * args.seq_len / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--teacher-tokens", type=float, default=24e6)
    parser.add_argument("--student-tokens", type=float, default=6e6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--heldout-samples", type=int, default=256)
    parser.add_argument("--calibration-samples", type=int, default=1024)
    parser.add_argument("--seconds", type=float,
                        help="size the runs to about this much training time instead, from a measured step time")
    parser.add_argument("--only", choices=["pruned", "scratch"],
                        help="run only the teacher and its pruned students, or only the scratch baseline "
                        "(with the same --teacher-tokens and --student-tokens, the data and seeds are the same)")
    parser.add_argument("--merge", nargs=2, metavar=("PRUNED", "SCRATCH"),
                        help="combine the results of an --only pruned and an --only scratch run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(*map(Path, args.merge), out)
    device = torch.device(args.device)
    torch.manual_seed(0)
    from transformers import NemotronHForCausalLM

    tokenizer = tiny_tokenizer()
    record: dict = dict(
        experiment="minitron-small", device=device_name(args.device), commit=commit(),
        command="python " + " ".join(sys.argv), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        teacher_shape=TEACHER, width=WIDTH.as_dict(), depth=DEPTH.as_dict(), stages={},
    )

    def save():
        (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")

    start = time.perf_counter()
    train_files, held_files = python_files()
    seq = args.seq_len
    if args.seconds:
        rate = probe(tokenizer, train_files, args, device)
        # Per token, distilling costs about the student's training (0.63 of the teacher's) plus a
        # teacher forward (1/3): two distilled students and one from scratch cost 2.55 teacher-tokens.
        args.teacher_tokens = 0.55 * args.seconds * rate
        args.student_tokens = 0.40 * args.seconds * rate / 2.55
        record["sized_by"] = dict(seconds=args.seconds, teacher_tokens_per_s=round(rate))
    teacher_steps = int(args.teacher_tokens // (args.batch_size * seq))
    student_steps = int(args.student_tokens // (args.batch_size * seq))
    train = token_samples(train_files, tokenizer, samples=teacher_steps * args.batch_size, length=seq)
    held = token_samples(held_files, tokenizer, samples=args.heldout_samples, length=seq)
    record["data"] = dict(train_files=len(train_files), heldout_files=len(held_files), train_samples=train.shape[0],
                          heldout_samples=held.shape[0], seq_len=seq, seconds=round(time.perf_counter() - start, 1))
    print(record["data"], flush=True)
    curve_tokens = held[:64]

    def run(name, student, teacher, steps, lr, min_lr):
        config = DistillConfig(steps=steps, batch_size=args.batch_size, micro_batch=args.batch_size, lr=lr,
                               min_lr=min_lr, warmup=max(1, steps // 20), eval_every=max(1, steps // 10),
                               activation_checkpointing=False, seed=1)
        began = time.perf_counter()
        history = distill(teacher, student, train, curve_tokens, config)
        seconds = time.perf_counter() - began
        final = heldout_loss(student, held, batch_size=32)
        record["stages"][name] = dict(
            parameters=parameter_count(student.config), steps=steps, tokens=steps * args.batch_size * seq, lr=lr,
            seconds=round(seconds, 1), tokens_per_s=round(steps * args.batch_size * seq / seconds),
            heldout_loss=final, curve=[dict(tokens=e["step"] * args.batch_size * seq, **e) for e in history.evals],
            train_loss=[round(s["loss"], 4) for s in history.steps[:: max(1, steps // 50)]],
        )
        save()
        print(name, {k: v for k, v in record["stages"][name].items() if k not in ("curve", "train_loss")}, flush=True)

    if args.only != "scratch":
        pruned_students(record, run, train, held, device, save, teacher_steps, student_steps, args.calibration_samples)
    if args.only != "pruned":
        torch.manual_seed(3)
        scratch = NemotronHForCausalLM(tiny_config(**dict(TEACHER, hidden_size=416, intermediate_size=1920,
                                                          mamba_num_heads=12))).to(device)
        run("width shape, from scratch", scratch, None, student_steps, 1e-3, 1e-4)
    if args.only is None:
        finish(record, out)
    record["total_seconds"] = round(time.perf_counter() - start, 1)
    save()


def merge(pruned: Path, scratch: Path, out: Path) -> None:
    record = json.loads(pruned.read_text())
    other = json.loads(scratch.read_text())
    if other["data"] != {**record["data"], "seconds": other["data"]["seconds"]}:
        raise SystemExit(f"{pruned} and {scratch} did not run on the same data: {record['data']} vs {other['data']}")
    record["stages"].update(other["stages"])
    record["processes"] = [dict(role="teacher and pruned students", commit=record["commit"], command=record["command"], date=record["date"]),
                           dict(role="scratch baseline", commit=other["commit"], command=other["command"], date=other["date"])]
    finish(record, out)
    (out / "results.json").write_text(json.dumps(record, indent=1) + "\n")


def finish(record: dict, out: Path) -> None:
    t = record["teacher_heldout_loss"]
    s = record["stages"]["width shape, from scratch"]["heldout_loss"]
    d = record["stages"]["width, pruned + distilled"]["heldout_loss"]
    record["gap_closed_by_distillation"] = (s - d) / (s - t)
    plot(record, out / "loss.png")


def pruned_students(record, run, train, held, device, save, teacher_steps: int, student_steps: int,
                    calibration_samples: int) -> None:
    from transformers import NemotronHForCausalLM

    teacher = NemotronHForCausalLM(tiny_config(**TEACHER)).to(device)
    run("teacher", teacher, None, teacher_steps, 1e-3, 1e-4)
    teacher.eval()
    record["teacher_heldout_loss"] = record["stages"]["teacher"]["heldout_loss"]

    calibration = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(2))]
    calibration = calibration[:calibration_samples]
    began = time.perf_counter()
    importance = width_importance(teacher, calibration, batch_size=64)
    steps = rank_layers(teacher, calibration[:16], dict(DEPTH.remove), batch_size=16)
    record["pruning"] = dict(seconds=round(time.perf_counter() - began, 1),
                             removed_layers=[dict(layer=s.layer, kind=s.kind, score=s.score) for s in steps])
    drop = [s.layer for s in steps]
    students = {
        "width": slice_model(teacher, importance, WIDTH.plan(teacher.config)).to(device).float(),
        "depth": slice_model(teacher, importance, DEPTH.plan(teacher.config, drop)).to(device).float(),
    }
    for name, student in students.items():
        record["stages"][f"{name}, pruned, untrained"] = dict(
            parameters=parameter_count(student.config), heldout_loss=heldout_loss(student, held, batch_size=32),
            pattern=student.config.hybrid_override_pattern)
    save()
    run("width, pruned + distilled", students["width"], teacher, student_steps, 3e-4, 3e-5)
    run("depth, pruned + distilled", students["depth"], teacher, student_steps, 3e-4, 3e-5)


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in ("width, pruned + distilled", "depth, pruned + distilled", "width shape, from scratch"):
        stage = record["stages"][name]
        curves.plot([c["tokens"] / 1e6 for c in stage["curve"]], [c["lm_loss"] for c in stage["curve"]], marker="o",
                    label=name)
    # The curves are taken on the first 64 held-out samples; the teacher's line on the same ones.
    curves.axhline(record["stages"]["teacher"]["curve"][-1]["lm_loss"], color="black", linestyle="--", label="teacher")
    curves.set_xlabel("training tokens (millions)")
    curves.set_ylabel("loss on 64 held-out samples (nats per byte)")
    curves.set_title("students of equal size, same tokens")
    curves.legend()
    names = ["teacher", "width, pruned, untrained", "depth, pruned, untrained", "width, pruned + distilled",
             "depth, pruned + distilled", "width shape, from scratch"]
    values = [record["stages"][n]["heldout_loss"] for n in names]
    bars.barh(range(len(names)), values, color=["black", "#bbb", "#bbb", "C0", "C1", "C2"])
    bars.set_yticks(range(len(names)), names)
    bars.set_xlabel("loss on all 256 held-out samples (nats per byte)")
    for i, v in enumerate(values):
        bars.text(v, i, f" {v:.3f}", va="center")
    bars.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
