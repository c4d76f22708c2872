"""The Mamba2 scan one position at a time: the obvious form that every faster scan must match
(`nano.kernels.chunk_scan_torch`, mamba-ssm's Triton kernel, the ONNX graph's scan)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def chunk_scan_sequential(x, dt, A, B, C, D, dt_bias, initial_state, dt_limit=(0.0, math.inf), chunk_size=None):
    """x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n), D (h,), initial_state (b, h, p, n)
    in fp32. Returns y (b, l, h, p) in x's dtype and the final state (fp32)."""
    heads, groups = x.shape[2], B.shape[2]
    dt = F.softplus(dt.float() + dt_bias.float()).clamp(min=dt_limit[0], max=dt_limit[1])
    B = B.float().repeat_interleave(heads // groups, dim=2)
    C = C.float().repeat_interleave(heads // groups, dim=2)
    state = initial_state.float().clone()
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A.float())  # (b, h)
        state = state * decay[..., None, None] + (dt[:, t, :, None] * x[:, t].float())[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]) + D.float()[:, None] * x[:, t].float())
    return torch.stack(ys, dim=1).to(x.dtype), state
