"""Host time of one `scaled_dot_product_attention` call as the runtime's prefill makes it, per backend,
when every call has the same length and when each call has a new one (as prompts do).

The engine's server profile showed its prefill calls spending most of their host time inside SDPA.
This separates a per-call cost from a per-shape one (a backend that plans or compiles for each new
sequence length pays it on almost every prompt).

    python -m bench.sdpa_host
"""

from __future__ import annotations

import contextlib
import random
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.record import write

SHAPES = {"nano-tiny": (4, 2, 64), "nano-9b-v2": (40, 8, 128)}  # query heads, KV heads, head dim
BACKENDS = {"default": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def host_ms(heads: int, kv: int, d: int, backend, lengths: list[int], masked: bool) -> tuple[float, float]:
    """Milliseconds per call on the host (launch only) and in all (synchronised), over `lengths`."""
    device = torch.device("cuda")
    inputs = []
    for length in lengths:
        rows = 4 if masked else 1
        q = torch.randn(rows, heads, length, d, device=device, dtype=torch.bfloat16)
        k = torch.randn(rows, kv, length, d, device=device, dtype=torch.bfloat16)
        v = torch.randn(rows, kv, length, d, device=device, dtype=torch.bfloat16)
        mask = torch.ones(rows, 1, length, length, device=device, dtype=torch.bool).tril() if masked else None
        inputs.append((q, k, v, mask))

    def call(q, k, v, mask):
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                              attn_mask=mask)

    with torch.no_grad(), (sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()):
        call(*inputs[0])  # the first call of all: library loading, not what this measures
        torch.cuda.synchronize()
        host = 0.0
        start = time.perf_counter()
        for args in inputs[1:]:
            began = time.perf_counter()
            call(*args)
            host += time.perf_counter() - began
        torch.cuda.synchronize()
        total = time.perf_counter() - start
    n = len(inputs) - 1
    return 1000 * host / n, 1000 * total / n


def main() -> None:
    rng = random.Random(0)
    rows = []
    for shape, (heads, kv, d) in SHAPES.items():
        for masked in (False, True):
            for name, backend in BACKENDS.items():
                for lengths_name, lengths in (("same length", [200] * 41),
                                              ("new length each call", rng.sample(range(32, 1024), 41))):
                    try:
                        host, total = host_ms(heads, kv, d, backend, lengths, masked)
                        row = dict(shape=shape, call="padded, mask" if masked else "causal, gqa", backend=name,
                                   lengths=lengths_name, host_ms=round(host, 3), total_ms=round(total, 3))
                    except RuntimeError as e:
                        row = dict(shape=shape, call="padded, mask" if masked else "causal, gqa", backend=name,
                                   lengths=lengths_name, error=str(e).splitlines()[0][:80])
                    rows.append(row)
                    print(row, flush=True)
    write("sdpa-host", rows, ["shape", "call", "backend", "lengths", "host_ms", "total_ms", "error"], "cuda",
          torch=torch.__version__)


if __name__ == "__main__":
    main()
