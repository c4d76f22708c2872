"""What the thinking-budget controller costs per generated token.

Times the controller's step (`mask_logits` and `advance`) at the real vocabulary size (131072),
eagerly and, on a GPU, captured in a CUDA graph as the fast runtime will run it, beside what it
is added to: a decode step. On the CPU that step is the tiny checkpoint's reference decode step;
on a GPU it is the bandwidth floor of a Nano-9B decode step (its 17.78 GB of bf16 weights read
once at the device's measured copy bandwidth), the fastest any runtime could go.

    python -m bench.budget_overhead --device cpu
    python -m bench.budget_overhead --device cuda
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


from bench.record import write

from nano.budget import BudgetController
from nano.chat import ChatFormat
from nano.tiny import tiny_config, tiny_tokenizer

VOCAB = 131072
NANO_9B_WEIGHT_BYTES = 17.78e9  # 8.888B parameters in bf16 (nano.memory.parameter_count of the 9B shape)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, steps: int, device) -> float:
    """Mean seconds per call, after a warm-up."""
    for _ in range(10):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def make_controller(chat, rows: int, device) -> BudgetController:
    return BudgetController(
        chat.think,
        chat.line_end_ids,
        VOCAB,
        budgets=[512] * rows,
        graces=[None] * rows,
        thinking=[True] * rows,
        max_new=[10**9] * rows,
        device=device,
    )


def captured(controller, logits, sampled, device, fuse: bool = False):
    """The controller step captured in one CUDA graph; with `fuse`, `advance` is first compiled into
    fused kernels (the two column writes of `mask_logits` stay as they are: compiled on their own
    they would copy the whole logits tensor, which inside a compiled decode step they do not)."""
    advance = torch.compile(controller.advance, fullgraph=True) if fuse else controller.advance

    def step():
        controller.mask_logits(logits)
        advance(sampled)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up (and compilation) on a side stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def controller_step_seconds(chat, rows: int, device, steps: int):
    controller = make_controller(chat, rows, device)
    logits = torch.randn(rows, VOCAB, device=device)
    # A stream of reasoning with a newline now and then, as the controller sees in practice.
    stream = torch.randint(20, 200, (steps + 64, rows), device=device)
    stream[::17] = chat.encode("\n")[0]
    position = [0]

    def step():
        controller.mask_logits(logits)
        controller.advance(stream[position[0] % stream.shape[0]])
        position[0] += 1

    eager = timed(step, steps, device)
    sampling = timed(lambda: logits.argmax(dim=-1), steps, device)
    graphed = compiled = None
    if device.type == "cuda":
        graphed = timed(captured(make_controller(chat, rows, device), logits, stream[0].clone(), device), steps, device)
        try:
            compiled = timed(captured(make_controller(chat, rows, device), logits, stream[0].clone(), device, fuse=True), steps, device)
        except Exception as e:  # torch.compile needs a working Triton; report rather than fail
            print(f"compiled variant failed: {type(e).__name__}: {e}", file=sys.stderr)
    return eager, graphed, compiled, sampling


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read plus write), from a 2 GiB copy."""
    src = torch.empty(2**30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), 20, device)
    return 2 * src.numel() * src.element_size() / seconds


def tiny_decode_step_seconds(rows: int, steps: int) -> float:
    import nano
    from nano.tiny import build_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        model = nano.load(build_tiny_checkpoint(Path(tmp) / "tiny"), device="cpu")
    decoder = model.decoder()
    ids = torch.tensor([model.chat.encode("<SPECIAL_11>User\nhello\n<SPECIAL_11>Assistant\n<think>\n")] * rows)
    decoder.prefill(ids, torch.ones_like(ids))
    token = torch.full((rows,), 40)
    return timed(lambda: decoder.step(token), steps, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    device = torch.device(args.device)

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    chat = ChatFormat(tiny_tokenizer(), tiny_config().eos_token_id)
    floor_step = NANO_9B_WEIGHT_BYTES / copy_bandwidth(device) if device.type == "cuda" else None

    rows_out = []
    for rows in args.rows:
        eager, graphed, compiled, sampling = controller_step_seconds(chat, rows, device, args.steps)
        if device.type == "cuda":
            step, step_name = floor_step, "Nano-9B decode step at the bandwidth floor"
        else:
            step, step_name = tiny_decode_step_seconds(rows, min(args.steps, 300)), "tiny checkpoint reference decode step"
        row = {
            "rows": rows,
            "controller_eager_us": round(eager * 1e6, 1),
            "controller_graph_us": None if graphed is None else round(graphed * 1e6, 2),
            "argmax_us": round(sampling * 1e6, 1),
            "decode_step_ms": round(step * 1e3, 3),
            "eager_share_%": round(100 * eager / step, 3),
        }
        if graphed is not None:
            row["graph_share_%"] = round(100 * graphed / step, 4)
            row["compiled_graph_us"] = None if compiled is None else round(compiled * 1e6, 2)
            row["compiled_share_%"] = None if compiled is None else round(100 * compiled / step, 4)
        rows_out.append(row)
        decode_step_is = step_name

    columns = ["rows", "controller_eager_us", "controller_graph_us", "argmax_us", "decode_step_ms", "eager_share_%"]
    if device.type == "cuda":
        columns += ["graph_share_%", "compiled_graph_us", "compiled_share_%"]
    write(
        f"budget_overhead-{device.type}",
        rows_out,
        columns,
        args.device,
        vocab=VOCAB,
        steps=args.steps,
        decode_step_is=decode_step_is,
    )


if __name__ == "__main__":
    main()
