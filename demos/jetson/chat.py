"""A terminal chat for Jetson Orin and Thor boards, with the reasoning shown apart and tokens/s.

    python -m demos.jetson.chat --model nano-9b            # torch (JetPack ships it)
    python -m demos.jetson.chat --bundle nano-9b-onnx      # the ONNX route (onnxruntime; its TensorRT provider where installed)

It finds the board from the device tree (`/proc/device-tree/model` and `compatible`, the memory
from `/proc/meminfo`), or takes `--device orin-16`, and asks the planner which precision and context
fit there (`nano.memory.jetson_options`). In the chat: `/budget N` sets the thinking budget (`/budget
off` removes it), `/think on|off` switches reasoning, `/new` starts a new conversation, `/quit` ends.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from nano.decoder import Decoder
from nano.memory import GIB, jetson_options

DIM, RESET = "\033[2m", "\033[0m"


def detect_board(root: str | Path = "/proc") -> str | None:
    """The planner's name for this board (orin-8, orin-16, orin-32, orin-64, thor), or None off a Jetson."""
    root = Path(root)
    tree = root / "device-tree"
    compatible = (tree / "compatible").read_bytes().decode(errors="replace") if (tree / "compatible").exists() else ""
    model = (tree / "model").read_bytes().decode(errors="replace").strip("\0") if (tree / "model").exists() else ""
    if "tegra264" in compatible or "Thor" in model:
        return "thor"
    if "tegra234" not in compatible and "Orin" not in model:
        return None
    memory_gib = 0.0
    if (root / "meminfo").exists():
        for line in (root / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = int(line.split()[1]) * 1024 / GIB
    for board, size in (("orin-8", 8), ("orin-16", 16), ("orin-32", 32)):
        if memory_gib <= size:
            return board
    return "orin-64"


def choose(config: dict, board: str, context: int, torch_backend: bool) -> dict | None:
    """The most precise option the planner allows on `board` for `context` tokens; the torch backend
    runs 16-bit weights only."""
    for option in jetson_options(config):
        if option["board"] == board and option["max_context"] >= context:
            if not torch_backend or option["precision"] == "fp16":
                return option
    return None


class OnnxDecoder(Decoder):
    """The decoder interface of nano.generate (prefill, then one step per token) over the graphs of a
    bundle from `nanokit export onnx`, run by onnxruntime: the budget controller and the sampler are
    nano.generate's own."""

    def __init__(self, bundle: Path):
        from export.onnx import onnx_sessions

        self.prefill_graph, self.decode_graph = onnx_sessions(bundle)
        self.name = f"ONNX graphs on onnxruntime ({self.decode_graph.get_providers()[0]})"
        self.names = [i.name for i in self.decode_graph.get_inputs()][1:]
        self.caches = None

    def prefill(self, input_ids, attention_mask):
        import torch

        if not bool(attention_mask.all()):
            raise ValueError("the ONNX graphs take unpadded prompts: one conversation at a time")
        outputs = self.prefill_graph.run(None, {"input_ids": input_ids.cpu().numpy()})
        self.caches = outputs[1:]
        return torch.from_numpy(outputs[0][:, -1]).float()

    def step(self, tokens):
        import torch

        outputs = self.decode_graph.run(None, {"input_ids": tokens[:, None].cpu().numpy(),
                                               **dict(zip(self.names, self.caches))})
        self.caches = outputs[1:]
        return torch.from_numpy(outputs[0][:, -1]).float()


def use_bundle(model, bundle: Path) -> None:
    """Make `model` generate through the bundle's graphs (its tokenizer and chat format stay): with
    onnxruntime's TensorRT provider where it is installed (engines built once, cached in the bundle)."""
    decoder = OnnxDecoder(bundle)
    model.decoder = lambda rows=1, capacity=None: decoder
    model.runtime_name = lambda: decoder.name


def main(argv: list[str] | None = None, stdin=None, out=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nano-tiny", help="checkpoint folder, or a shipped model's name")
    parser.add_argument("--bundle", help="a folder from `nanokit export onnx` to generate through instead of torch")
    parser.add_argument("--device", help="the board: orin-8, orin-16, orin-32, orin-64 or thor (default: detected)")
    parser.add_argument("--proc", default="/proc", help="where to read the device tree and meminfo (for tests)")
    parser.add_argument("--context", type=int, default=8192, help="the context the chat needs")
    parser.add_argument("--budget", type=int, help="thinking budget in tokens (default: none)")
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    stdin, out = stdin or sys.stdin, out or sys.stdout

    import nano

    model = nano.load(args.model)
    config = json.loads((Path(model.path) / "config.json").read_text())
    board = args.device or detect_board(args.proc)
    if board is None:
        print("not a Jetson board (no tegra234 or tegra264 in the device tree); pass --device to plan for one", file=out)
        board = None
    if board is not None:
        option = choose(config, board, args.context, torch_backend=args.bundle is None)
        if option is None:
            fits = [o for o in jetson_options(config) if o["board"] == board and o["max_context"]]
            hint = ", ".join(f"{o['precision']} up to {o['max_context']} tokens" for o in fits) or "nothing"
            print(f"{board}: the model does not fit at {args.context} tokens with this backend; the planner allows "
                  f"{hint} (the ONNX route runs int8/int4)", file=out)
            return 2
        print(f"{board}: {option['precision']} weights ({option['weights_gib']} GiB), up to {option['max_context']} "
              f"tokens", file=out)
    if args.bundle:
        use_bundle(model, Path(args.bundle))
    print(f"{Path(str(model.path)).name} on {model.runtime_name()}; /budget N, /think on|off, /new, /quit", file=out)
    messages, budget, think = [], args.budget, True
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            break
        if line == "/new":
            messages = []
            continue
        if line.startswith("/budget"):
            value = line.split()[-1]
            budget = None if value == "off" else int(value)
            print(f"budget: {budget if budget is not None else 'none'}", file=out)
            continue
        if line.startswith("/think"):
            think = line.split()[-1] != "off"
            print(f"reasoning {'on' if think else 'off'}", file=out)
            continue
        messages.append({"role": "user", "content": line})
        began, shown = time.perf_counter(), None
        stream = nano.generate(model, messages, budget=budget, think=think, max_new_tokens=args.max_new_tokens,
                               stream=True)
        for event in stream:
            if event.kind != shown:
                print(f"\n{DIM}[thinking]{RESET} " if event.kind == "reasoning" else "\n[answer] ", end="", file=out)
                shown = event.kind
            print(f"{DIM}{event.text}{RESET}" if event.kind == "reasoning" else event.text, end="", file=out, flush=True)
        seconds, result = time.perf_counter() - began, stream.result
        tokens = result.reasoning_tokens + result.answer_tokens
        cut = ", budget reached" if result.budget_hit else ""
        print(f"\n({result.reasoning_tokens} reasoning + {result.answer_tokens} answer tokens{cut}, "
              f"{tokens / max(seconds, 1e-9):.1f} tokens/s)", file=out)
        messages.append({"role": "assistant", "content": result.answer})
    return 0


if __name__ == "__main__":
    sys.exit(main())
