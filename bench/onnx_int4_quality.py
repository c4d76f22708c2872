"""What INT4 AWQ costs a trained model through the ONNX route: nano-tiny's arithmetic accuracy with
greedy generation driven by onnxruntime, fp32 graphs against int4_awq graphs, on the same fresh
problems (reasoning on, no budget). Calibration: 64 of nano-tiny's own worked answers to other
problems (prompt and response, as AWQ calibrates on in-distribution text).

    python -m bench.onnx_int4_quality --problems 200
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


from bench.record import write

import nano
from export.onnx import export_onnx, onnx_sessions
from nano.arithmetic import boxed, sample
from nano.data import token_samples


def answer(sessions, prompt: list[int], eos: set[int], limit: int) -> list[int]:
    """Greedy tokens through onnxruntime until an end token or `limit`."""
    prefill, decode = sessions
    names = [i.name for i in decode.get_inputs()][1:]
    outputs = prefill.run(None, {"input_ids": np.array([prompt], dtype=np.int64)})
    tokens = []
    for _ in range(limit):
        token = int(outputs[0][0, -1].argmax())
        if token in eos:
            break
        tokens.append(token)
        outputs = decode.run(None, {"input_ids": np.array([[token]], dtype=np.int64), **dict(zip(names, outputs[1:]))})
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    args = parser.parse_args()
    model = nano.load("nano-tiny", device="cpu")
    rng = random.Random(20261123)
    calibration_problems = [sample(rng) for _ in range(64)]
    problems = [sample(rng) for _ in range(args.problems)]
    texts = []
    for p, g in zip(calibration_problems, nano.generate(model, [p.question for p in calibration_problems], max_new_tokens=512)):
        texts.append(model.chat.render(p.question)[0] + model.tokenizer.decode(g.token_ids))
    eos = set(model.chat.think.eos)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        texts_file = Path(tmp) / "calibration.jsonl"
        texts_file.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        calibration = token_samples(texts_file, model.tokenizer, 64, 256)
        for quant in (None, "int4_awq"):
            bundle = Path(tmp) / (quant or "fp32")
            export_onnx(model.path, bundle, "fp32", quant=quant, calibration=calibration if quant else None)
            sessions = onnx_sessions(bundle, exact=True)
            began, right, answered = time.perf_counter(), [], 0
            for p in problems:
                text = model.tokenizer.decode(answer(sessions, model.chat.encode(model.chat.render(p.question)[0]), eos,
                                                     args.max_new_tokens))
                value = boxed(text.split("</think>")[-1])
                answered += value is not None
                right.append(value == p.value)
            rows.append(dict(weights=quant or "fp32", problems=len(problems), accuracy=round(sum(right) / len(right), 3),
                             answered=round(answered / len(problems), 3), seconds=round(time.perf_counter() - began, 1),
                             right="".join("1" if r else "0" for r in right)))
            print(rows[-1]["weights"], rows[-1]["accuracy"], flush=True)
    both = sum(a == "1" and b == "1" for a, b in zip(rows[0]["right"], rows[1]["right"]))
    write("onnx-int4-quality-nano-tiny", rows, ["weights", "problems", "accuracy", "answered", "seconds"], "cpu",
          model="nano-tiny", calibration="64 of the model's own worked answers, 256-token samples",
          right_in_both=both, torch=torch.__version__)


if __name__ == "__main__":
    main()
