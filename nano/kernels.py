"""The kernels of the fast runtime: mamba-ssm's Triton kernels where they load, plain PyTorch where not.

mamba-ssm's Triton kernels (the SSD chunk scan, the one-step state update, the fused RMSNorms)
need no compiled code, but its package `__init__` imports the compiled selective scan, so on a
machine where only the pure-Python wheel could be installed (built from the sdist with
`MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE`), `import mamba_ssm` fails and transformers
silently falls back to its reference path. `load_mamba_ssm` imports the Triton modules without
running that `__init__`, and leaves `sys.modules` as it found it, so transformers' reference
path stays what it was.

Every kernel has a PyTorch twin here, written for clarity; the twins run on the CPU and are what
the kernels are tested against. The scan's slowest twin, one position at a time, is in the tests
(tests/twins/scan.py).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


# PyTorch twins.


def rms_norm_torch(x, weight, eps: float, residual=None):
    """RMSNorm of x (+ residual, added first); returns (normed, the sum) as transformers' block does."""
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype), x


def gated_rms_norm_torch(y, z, weight, eps: float, group_size: int):
    """NemotronH's Mamba output norm: RMSNorm over groups of y * silu(z)."""
    h = y.float() * F.silu(z.float())
    shape = h.shape
    h = h.view(*shape[:-1], shape[-1] // group_size, group_size)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h.view(shape)).to(y.dtype)


def causal_conv1d_silu(x, weight, bias):
    """The Mamba conv then SiLU on (batch, T, channels), channels last: silu(conv1d(x^T)[..., :T])^T
    for a depthwise causal conv with weight (channels, 1, width), in fp32, out in x's dtype.
    Shifted multiply-adds over contiguous rows, so compiled it is one kernel each way, no transposes."""
    width, length = weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, width - 1, 0)).float()
    out = padded[:, width - 1 :] * weight[:, 0, width - 1].float()
    for k in range(width - 1):
        out = out + padded[:, k : k + length] * weight[:, 0, k].float()
    if bias is not None:
        out = out + bias.float()
    return F.silu(out).to(x.dtype)


def _discretize(dt, dt_bias, dt_limit):
    dt = F.softplus(dt.float() + dt_bias.float())
    return dt.clamp(min=dt_limit[0], max=dt_limit[1])


def chunk_scan_torch(x, dt, A, B, C, D, dt_bias, initial_state, dt_limit=(0.0, math.inf), chunk_size=64):
    """The Mamba2 scan in chunks (the SSD algorithm) in PyTorch: quadratic within a chunk, a
    recurrence across chunks. The fallback where mamba-ssm's Triton kernel is not available."""
    b, length, heads, p = x.shape
    groups = B.shape[2]
    dt = _discretize(dt, dt_bias, dt_limit)  # (b, l, h)
    pad = -length % chunk_size
    xf = F.pad(x.float(), (0, 0, 0, 0, 0, pad))
    dtf = F.pad(dt, (0, 0, 0, pad))  # padded steps have dt = 0: no decay, no input
    Bf = F.pad(B.float(), (0, 0, 0, 0, 0, pad)).repeat_interleave(heads // groups, dim=2)
    Cf = F.pad(C.float(), (0, 0, 0, 0, 0, pad)).repeat_interleave(heads // groups, dim=2)
    chunks = xf.shape[1] // chunk_size
    xf, dtf, Bf, Cf = (t.reshape(b, chunks, chunk_size, *t.shape[2:]) for t in (xf, dtf, Bf, Cf))
    a = dtf * A.float()  # (b, c, s, h): log of each step's decay
    cum = a.cumsum(dim=2)
    # Within a chunk: y_t = sum_{s<=t} C_t.B_s exp(cum_t - cum_s) dt_s x_s.
    segment = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, c, t, s, h)
    causal = torch.tril(torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=x.device))
    decay = torch.exp(segment.masked_fill(~causal[None, None, :, :, None], -math.inf))
    scores = torch.einsum("bcthn,bcshn->bctsh", Cf, Bf) * decay
    y = torch.einsum("bctsh,bcsh,bcshp->bcthp", scores, dtf, xf)
    # Each chunk's contribution to the state at its end, then the recurrence across chunks.
    to_end = torch.exp(cum[:, :, -1:, :] - cum)  # (b, c, s, h)
    chunk_states = torch.einsum("bcsh,bcsh,bcshp,bcshn->bchpn", to_end, dtf, xf, Bf)
    state = initial_state.float() if initial_state is not None else xf.new_zeros(b, heads, p, B.shape[3])
    starts = []
    for c in range(chunks):
        starts.append(state)
        state = state * torch.exp(cum[:, c, -1, :])[..., None, None] + chunk_states[:, c]
    start_states = torch.stack(starts, dim=1)  # (b, c, h, p, n)
    y = y + torch.einsum("bcthn,bchpn,bcth->bcthp", Cf, start_states, torch.exp(cum))
    y = y.reshape(b, chunks * chunk_size, heads, p)[:, :length]
    y = y + D.float()[:, None] * x.float()
    return y.to(x.dtype), state


def state_update_torch(state, x, dt, A, B, C, D, dt_bias, index=None):
    """One Mamba2 step in place on `state` (b, h, p, n; fp32); x (b, h, p), dt (b, h), B and C (b, g, n).
    `index` (b,), as mamba-ssm's `state_batch_indices` where each row updates its own state: i for
    row i, or -1 for a padding row, which keeps its state and outputs zeros."""
    heads, groups = x.shape[1], B.shape[1]
    dt = F.softplus(dt.float() + dt_bias.float())  # (b, h); no clamp, as transformers' one-step update
    B = B.float().repeat_interleave(heads // groups, dim=1)
    C = C.float().repeat_interleave(heads // groups, dim=1)
    decay = torch.exp(dt * A.float())
    new = state * decay[..., None, None] + (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new, C) + D.float()[:, None] * x.float()
    if index is not None:
        live = index >= 0
        new = torch.where(live[:, None, None, None], new, state)
        y = y * live[:, None, None]
    state.copy_(new)
    return y.to(x.dtype)


# mamba-ssm's Triton kernels.


def load_mamba_ssm() -> tuple[dict | None, str]:
    """mamba-ssm's Triton entry points, or None and the reason they could not be loaded."""
    if importlib.util.find_spec("mamba_ssm") is None:
        return None, "mamba-ssm is not installed"
    saved = {name: mod for name, mod in sys.modules.items() if name == "mamba_ssm" or name.startswith("mamba_ssm.")}
    spec = importlib.util.find_spec("mamba_ssm")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["mamba_ssm"] = package  # the package without its __init__, which needs compiled code
    try:
        combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        norms = importlib.import_module("mamba_ssm.ops.triton.layer_norm")
        gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
        version = getattr(importlib.import_module("importlib.metadata"), "version")("mamba-ssm")
    except Exception as e:  # any import error is a reason to fall back, reported as such
        return None, f"mamba-ssm's Triton kernels did not import ({type(e).__name__}: {e})"
    finally:
        for name in [n for n in sys.modules if n == "mamba_ssm" or n.startswith("mamba_ssm.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return {
        "version": version,
        "chunk_scan": combined.mamba_chunk_scan_combined,
        "state_update": update.selective_state_update,
        "rms_norm": norms.rms_norm_fn,
        "gated_rms_norm": gated.rmsnorm_fn,
    }, f"mamba-ssm {version}"


@dataclass(frozen=True)
class Kernels:
    """The kernel set one runtime uses, with a line that says which it is."""

    name: str
    chunk_scan: Callable
    state_update: Callable
    rms_norm: Callable
    gated_rms_norm: Callable


def torch_kernels(reason: str = "") -> Kernels:
    name = "PyTorch (chunked scan, one-step update, norms)" + (f"; {reason}" if reason else "")
    return Kernels(name, chunk_scan_torch, state_update_torch, rms_norm_torch, gated_rms_norm_torch)


def triton_kernels(mamba: dict) -> Kernels:
    """Adapters from mamba-ssm's signatures to the twins' signatures."""

    def chunk_scan(x, dt, A, B, C, D, dt_bias, initial_state, dt_limit=(0.0, math.inf), chunk_size=128):
        y, final = mamba["chunk_scan"](
            x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, initial_states=initial_state,
            dt_softplus=True, dt_limit=dt_limit, return_final_states=True,
        )
        return y, final

    def state_update(state, x, dt, A, B, C, D, dt_bias, index=None):
        heads, p, n = state.shape[1], state.shape[2], state.shape[3]
        # A negative index makes the kernel skip the row: no read, no write, zeros out.
        # Broadcast views with zero strides: the kernel then reads dt, A, D once per head ("tie_hdim").
        return mamba["state_update"](
            state,
            x,
            dt[..., None].expand(-1, -1, p),
            A[:, None, None].expand(heads, p, n).float(),
            B,
            C,
            D=D[:, None].expand(heads, p),
            dt_bias=dt_bias[:, None].expand(heads, p),
            dt_softplus=True,
            state_batch_indices=index,
        )

    def rms_norm(x, weight, eps, residual=None):
        shape = x.shape
        out, summed = mamba["rms_norm"](
            x.reshape(-1, shape[-1]), weight, None, residual=None if residual is None else residual.reshape(-1, shape[-1]),
            eps=eps, prenorm=True,
        )
        return out.view(shape), summed.view(shape)

    def gated_rms_norm(y, z, weight, eps, group_size):
        shape = y.shape
        out = mamba["gated_rms_norm"](
            y.reshape(-1, shape[-1]), weight, None, z=z.reshape(-1, shape[-1]), eps=eps, group_size=group_size,
            norm_before_gate=False,
        )
        return out.view(shape)

    return Kernels(
        f"{'mamba-ssm ' + mamba['version']} Triton (chunk scan, state update, fused norms)",
        chunk_scan,
        state_update,
        rms_norm,
        gated_rms_norm,
    )


@functools.lru_cache(maxsize=None)
def _select(device_type: str) -> Kernels:
    if device_type != "cuda":
        return torch_kernels()
    mamba, reason = load_mamba_ssm()
    return triton_kernels(mamba) if mamba is not None else torch_kernels(reason)


def select_kernels(device: torch.device) -> Kernels:
    """mamba-ssm's Triton kernels on a GPU when they load; the PyTorch twins otherwise (and on the CPU)."""
    return _select(torch.device(device).type)
