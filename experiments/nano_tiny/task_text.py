"""Text of nano-tiny's task, for calibration (`nanokit export onnx --quant`, `nanokit prune --calib`)
and distillation (`nanokit distill --data`), as jsonl ({"text": ...} per line). Two kinds:

    worked   the model's own worked answers (greedy, no budget): the chat-rendered prompt and what
             the model wrote, as bench/onnx_int4_quality.py calibrates INT4 AWQ
    train    the training mix of train.py: full traces, ~10% with reasoning off, ~5% with the trace
             cut at a random point and closed, the system prompts and switches typed as users type
             them; each conversation rendered with the model's own chat template

Problems that are among the 1000 evaluation problems (harness/tasks/nanokit_arithmetic) are skipped,
so nothing scored later was seen in calibration or distillation.

    python experiments/nano_tiny/task_text.py worked --problems 64 --seed 20261123 --out calib-worked.jsonl
    python experiments/nano_tiny/task_text.py train --problems 20000 --seed 2 --out distill-train.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nano.arithmetic import answer_text, sample, trace  # noqa: E402
from nano.tiny import END_OF_TURN  # noqa: E402

EVAL_PROBLEMS = ROOT / "harness" / "tasks" / "nanokit_arithmetic" / "problems.jsonl"


def evaluation_questions() -> set[str]:
    return {json.loads(line)["question"] for line in EVAL_PROBLEMS.read_text().splitlines()}


def fresh_problems(rng: random.Random, count: int, skip: set[str]) -> tuple[list, int]:
    """`count` problems drawn from `rng`, none of them an evaluation problem; and how many were skipped."""
    problems, skipped = [], 0
    while len(problems) < count:
        p = sample(rng)
        if p.question in skip:
            skipped += 1
            continue
        problems.append(p)
    return problems, skipped


def worked(model, problems, max_new_tokens: int, batch: int) -> list[str]:
    import nano

    texts = []
    for start in range(0, len(problems), batch):
        chunk = problems[start : start + batch]
        for p, g in zip(chunk, nano.generate(model, [p.question for p in chunk], max_new_tokens=max_new_tokens)):
            texts.append(model.chat.render(p.question)[0] + model.tokenizer.decode(g.token_ids))
    return texts


def training_mix(chat, problems, rng: random.Random, truncated: float, no_think: float) -> list[str]:
    """train.py's make_sample as text: the same mix, on the problems given."""
    from train import conversation

    texts = []
    for problem in problems:
        roll = rng.random()
        think = roll >= no_think
        prompt, reasoning = chat.render(conversation(rng, problem.question, think))
        assert reasoning == think
        if not think:
            body = ""
        elif roll < no_think + truncated:
            steps = trace(problem)
            body = steps[: rng.randrange(len(steps))] + "</think>\n"
        else:
            body = trace(problem) + "\n</think>\n"
        texts.append(prompt + body + answer_text(problem.value) + END_OF_TURN)
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=["worked", "train"])
    parser.add_argument("--problems", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True, help="the problems' seed (evaluation uses 20261122)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="nano-tiny", help="the model that works the answers (worked)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="worked: tokens per answer at most")
    parser.add_argument("--batch", type=int, default=64, help="worked: problems per generation batch")
    parser.add_argument("--truncated", type=float, default=0.05, help="train: share of cut traces")
    parser.add_argument("--no-think", type=float, default=0.10, help="train: share with reasoning off")
    args = parser.parse_args()

    import nano

    model = nano.load(args.model, device="cpu")
    rng = random.Random(args.seed)
    problems, skipped = fresh_problems(rng, args.problems, evaluation_questions())
    if args.kind == "worked":
        texts = worked(model, problems, args.max_new_tokens, args.batch)
    else:
        texts = training_mix(model.chat, problems, rng, args.truncated, args.no_think)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tokens = sum(len(model.chat.encode(t)) for t in texts)
    print(f"wrote {out}: {len(texts)} texts ({args.kind}, seed {args.seed}), {tokens:,} tokens; "
          f"{skipped} evaluation problems skipped", flush=True)


if __name__ == "__main__":
    main()
