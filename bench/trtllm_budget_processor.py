"""What the TensorRT-LLM bundle's thinking-budget processor costs per generated token.

TensorRT-LLM 1.2.1 calls a logits processor on the host once per request and step, with that
request's logits row ([1, 1, vocab], fp32, on the GPU) and its ids so far (tests/trtllm_standin.py).
This times `nanokit_budget.ThinkingBudget` called that way at the real vocabulary (131072), one
request, in each phase of a response: reasoning (the rule advances, one tag is barred), the forced
close (every logit but one set to -inf), and the answer; beside a Nano-9B decode step at the
device's bandwidth floor (its 17.78 GB of bf16 weights read once), the fastest any engine goes.

    python -m bench.trtllm_budget_processor --device cuda
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

import torch


from bench.budget_overhead import NANO_9B_WEIGHT_BYTES, VOCAB, copy_bandwidth, sync
from bench.record import write

from export.trtllm_budget import PROCESSOR_PACKAGE, write_budget_packages
from nano.chat import ChatFormat
from nano.tiny import tiny_config, tiny_tokenizer


def processor_class():
    folder = Path(tempfile.mkdtemp(prefix="nanokit-budget-bench-"))
    tokenizer = tiny_tokenizer()
    write_budget_packages(folder, ChatFormat(tokenizer, tiny_config().eos_token_id), VOCAB)
    sys.path.insert(0, str(folder))
    return importlib.import_module(PROCESSOR_PACKAGE).ThinkingBudget, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    device = torch.device(args.device)
    ThinkingBudget, tokenizer = processor_class()
    (a,) = tokenizer.encode("a", add_special_tokens=False)
    (think,) = tokenizer.encode("<think>", add_special_tokens=False)
    logits = torch.zeros(1, 1, VOCAB, device=device)

    def phase(processor, ids: list[int], steps: int, token_of) -> float:
        processor(0, logits, [ids], None, None)  # the prefill call, untimed
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            ids.append(token_of(processor))
            processor(0, logits, [ids], None, None)
        sync(device)
        return (time.perf_counter() - start) / steps

    def forced(p):
        row = p._requests[0].row
        return row.forced[0] if row.forced else a

    rows = []
    floor = NANO_9B_WEIGHT_BYTES / copy_bandwidth(device) if device.type == "cuda" else None
    reasoning = phase(ThinkingBudget(None), [think], args.steps, lambda p: a)
    # Budget 0: every call forces; the close sequence is two tokens, so alternate cuts by re-opening.
    closing = ThinkingBudget(0, 0)
    closing_time = phase(closing, [think], args.steps,
                         lambda p: forced(p) if p._requests[0].row.forced else think)
    answer = phase(ThinkingBudget(8, 0), [think], args.steps, forced)  # 8 reasoning, the close, then answer
    for name, seconds in [("reasoning", reasoning), ("forced close / re-open", closing_time), ("answer", answer)]:
        row = {"phase": name, "us_per_token": round(seconds * 1e6, 1)}
        if floor:
            row["share_of_9b_floor"] = f"{100 * seconds / floor:.2f}%"
        rows.append(row)
    columns = ["phase", "us_per_token"] + (["share_of_9b_floor"] if floor else [])
    write(f"trtllm-budget-processor-{device.type}", rows, columns, str(device), vocab=VOCAB, steps=args.steps,
          nano_9b_floor_ms=round(floor * 1e3, 3) if floor else None)


if __name__ == "__main__":
    main()
