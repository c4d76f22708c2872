"""Native memory the CPU build of torch keeps per new shape of the engine's batched prefill, with the
batch width padded to a multiple of 16 (as the runtime does) and without.

oneDNN (the Mamba conv) and MKL (the projections) keep state per new input shape; a server's prompts
come in many lengths, so the shapes a batched prefill meets decide how far that memory grows. Each
call prefills `rows` prompts (2..8) of a random length (20..300 tokens) with nano-tiny; glibc's count
of bytes handed out (apart from fragmentation) is read every `--every` calls.

    python -m bench.prefill_shapes_memory --calls 300
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import random

import torch

from bench.record import write


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def used_mib() -> float:
    """Bytes glibc has handed out (heap and mmapped), MiB."""
    gc.collect()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _Mallinfo2
    info = libc.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def run(align: int, calls: int, every: int) -> list[dict]:
    """In a process of its own: the shapes one run meets are not paid for by another."""
    import transformers

    import nano
    import nano.runtime as runtime_module
    from nano.runtime import HybridRuntime

    transformers.logging.set_verbosity_error()
    runtime_module.BATCH_ALIGN = align
    runtime = HybridRuntime(nano.load("nano-tiny", device="cpu").model, 8, 600)
    runtime.prefill_slots([[5] * 20, [6] * 20], [0, 1])
    rng, shapes, rows = random.Random(0), set(), []
    start = used_mib()
    for call in range(1, calls + 1):
        count, length = rng.randint(2, 8), rng.randint(20, 300)
        shapes.add((count, runtime_module.batch_width(length)))
        runtime.prefill_slots([[7] * length] * count, list(range(count)))
        if call % every == 0:
            rows.append(dict(align=align, calls=call, shapes=len(shapes), grown_mib=round(used_mib() - start, 2)))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    import multiprocessing

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    args = parser.parse_args()

    rows = []
    for align in (1, 16):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            rows += pool.apply(run, (align, args.calls, args.every))
    write("prefill-shapes-memory-cpu", rows, ["align", "calls", "shapes", "grown_mib"], "cpu",
          torch=torch.__version__, note="align 1: each batch as wide as its longest prompt; align 16: the runtime's "
          "padding (nano.runtime.BATCH_ALIGN). Each in a process of its own.")


if __name__ == "__main__":
    main()
