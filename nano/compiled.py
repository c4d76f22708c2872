"""torch.compile for the small pieces of the GPU decode step, with a plain fallback.

A decode step is mostly reading weights; what is left is many tiny element-wise kernels (the
controller's bookkeeping, the Mamba conv window, squared ReLU). Compiling them fuses each into
one kernel. Compilation happens at the first call (the eager warm-up before a CUDA graph is
captured), once per process and shape. If it fails (no working Triton, say) the plain function
is used from then on. NANO_COMPILE=0 turns it off.
"""

from __future__ import annotations

import functools
import os
import warnings

import torch


# Each piece is compiled once per shape it meets: batch sizes (the engine's buckets), layer widths,
# the engine's padding mask or none. Dynamo's default of 8 compilations per function is too few, and
# past it a fullgraph compile fails and the piece would run uncompiled for the rest of the process.
RECOMPILE_LIMIT = 64


def _raise_recompile_limit() -> None:
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))


class _Compiled:
    def __init__(self, fn):
        _raise_recompile_limit()
        self.fn = fn
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # a compiler failure costs speed, never the result
                self.failed = True
                warnings.warn(f"torch.compile of {self.fn.__name__} failed, running it uncompiled: {e}")
        return self.fn(*args)


@functools.lru_cache(maxsize=None)
def compiled(fn):
    """`fn` compiled (fused), or `fn` itself when compilation is turned off."""
    if os.environ.get("NANO_COMPILE", "1") == "0":
        return fn
    return _Compiled(fn)
