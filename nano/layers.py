"""The NemotronH layer maths, written once over transformers' modules and their parameter names.

The fast runtime (`nano.runtime`), the fused training forward (`prune.fast_training`) and the ONNX
graphs (`export.onnx_model`) each drive the layers their own way (a cache and CUDA graphs; autograd;
a traced graph with explicit caches), but what a layer computes is this:

- Mamba2: the input projection split into z (the gate), xBC (through the causal conv and SiLU) and
  dt; xBC split into x, B and C; the selective scan (a kernel of `nano.kernels`); the gated RMSNorm
  of y by z; the output projection. `MambaDims` holds a mixer's sizes;
- attention: q, k, v as (rows, heads, T, head_dim), grouped-query, no RoPE; the output projection;
- MLP: up, squared ReLU, down.

The caches the runtime keeps are typed here too: `MambaCache` (the conv window, the fp32 SSM state,
and A = -exp(A_log) computed once) and `KVCache`. The slow, obvious twins of the kernels are in
`nano.kernels`; tests hold all three users to transformers' own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class MambaDims:
    heads: int
    head_dim: int
    state: int
    groups: int
    conv_dim: int
    kernel: int

    @classmethod
    def of(cls, mixer) -> MambaDims:
        return cls(mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups, mixer.conv_dim,
                   mixer.conv_kernel_size)

    @property
    def inner(self) -> int:
        return self.heads * self.head_dim


def mamba_in_proj(x: torch.Tensor, mixer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The input projection of x (rows, T, hidden) split into z, xBC and dt."""
    dims = MambaDims.of(mixer)
    return F.linear(x, mixer.in_proj.weight, mixer.in_proj.bias).split([dims.inner, dims.conv_dim, dims.heads], dim=-1)


def split_xbc(xbc: torch.Tensor, dims: MambaDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The conv's output split into x, B and C (each with the conv output's leading axes)."""
    bc = dims.groups * dims.state
    return xbc.split([dims.inner, bc, bc], dim=-1)


def conv_window(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype) -> torch.Tensor:
    """The conv and SiLU at one position from its whole window (rows, channels, kernel), in fp32."""
    out = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return F.silu(out).to(dtype)


def mamba_out(y: torch.Tensor, z: torch.Tensor, mixer, gated_rms_norm) -> torch.Tensor:
    """The gated RMSNorm of y (rows, T, inner) by z, with `gated_rms_norm` (a kernel), then out_proj."""
    dims = MambaDims.of(mixer)
    y = gated_rms_norm(y, z, mixer.norm.weight, mixer.norm.variance_epsilon, dims.inner // dims.groups)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)


def qkv(x: torch.Tensor, attn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (rows, heads, T, d), k and v (rows, kv_heads, T, d) of x (rows, T, hidden)."""
    rows, length, _ = x.shape
    d = attn.head_dim
    heads, kv = attn.q_proj.weight.shape[0] // d, attn.k_proj.weight.shape[0] // d
    q = F.linear(x, attn.q_proj.weight).view(rows, length, heads, d).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight).view(rows, length, kv, d).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight).view(rows, length, kv, d).transpose(1, 2)
    return q, k, v


def attention_out(out: torch.Tensor, attn) -> torch.Tensor:
    """The output projection of attention's (rows, T, heads * d)."""
    return F.linear(out, attn.o_proj.weight)


def relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


def mlp_up(x: torch.Tensor, mlp) -> torch.Tensor:
    return F.linear(x, mlp.up_proj.weight, mlp.up_proj.bias)


def mlp_down(act: torch.Tensor, mlp) -> torch.Tensor:
    return F.linear(act, mlp.down_proj.weight, mlp.down_proj.bias)


@dataclass
class MambaCache:
    """One Mamba layer's state for `rows` sequences: the last kernel-1 conv inputs, the SSM state."""

    conv: torch.Tensor  # (rows, conv_dim, kernel - 1), the model's dtype
    ssm: torch.Tensor  # (rows, heads, head_dim, state), fp32 by default
    A: torch.Tensor  # (heads,) -exp(A_log), fp32, computed once

    @classmethod
    def empty(cls, mixer, rows: int, dtype, ssm_dtype, device) -> MambaCache:
        dims = MambaDims.of(mixer)
        return cls(conv=torch.zeros(rows, dims.conv_dim, dims.kernel - 1, dtype=dtype, device=device),
                   ssm=torch.zeros(rows, dims.heads, dims.head_dim, dims.state, dtype=ssm_dtype, device=device),
                   A=-torch.exp(mixer.A_log.detach().float()))

    def reset(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()

    def first(self, rows: int) -> MambaCache:
        """The state of the first `rows` sequences, a view: one cache serves calls of fewer rows."""
        return self if rows == self.conv.shape[0] else MambaCache(self.conv[:rows], self.ssm[:rows], self.A)

    def row(self, row: int) -> MambaCache:
        """The state of sequence `row` alone, a view."""
        return MambaCache(self.conv[row : row + 1], self.ssm[row : row + 1], self.A)


@dataclass
class KVCache:
    """One attention layer's keys and values, (rows, kv_heads, capacity, head_dim)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def empty(cls, attn, kv_heads: int, rows: int, capacity: int, dtype, device) -> KVCache:
        shape = (rows, kv_heads, capacity, attn.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def first(self, rows: int) -> KVCache:
        """The keys and values of the first `rows` sequences, a view (see `MambaCache.first`)."""
        return self if rows == self.k.shape[0] else KVCache(self.k[:rows], self.v[:rows])

    def row(self, row: int) -> KVCache:
        """The keys and values of sequence `row` alone, a view."""
        return KVCache(self.k[row : row + 1], self.v[row : row + 1])
