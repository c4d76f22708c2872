"""The hybrid model as two exportable graphs: a prefill and one decode step, every cache explicit.

ONNX has no selective-scan operator, so the Mamba layers are written in standard operators:
- prefill: the SSD algorithm with no loop at all: quadratic within chunks of `chunk_size` tokens,
  and the recurrence across chunks as a masked cumulative sum over chunk decays (mamba-ssm's
  `ssd_minimal` form), so the graph has a dynamic sequence axis; the conv is channels-last shifts;
- decode: the one-step state update (h = h exp(dt A) + dt x B, y = C.h + D x) and the conv window.
Attention layers take and return their K and V; the decode step attends over past + new keys.

Inputs and outputs follow the Hugging Face ONNX names: `input_ids`, `logits`, and per layer cache
`past_key_values.{i}.key` / `.value` (attention), `past_conv.{i}` and `past_ssm.{i}` (Mamba) in,
`present.{i}.key` / `.value`, `present_conv.{i}`, `present_ssm.{i}` out, `i` being the layer's index
in the model. The SSM state is fp32 whatever the weights' dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nano.config import ATTENTION, MAMBA, MLP, layer_pattern
from nano.kernels import causal_conv1d_silu, gated_rms_norm_torch, rms_norm_torch
from nano.layers import (MambaDims, attention_out, conv_window, mamba_in_proj, mamba_out, mlp_down, mlp_up, qkv, relu2,
                         split_xbc)


def segsum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): out[..., t, s] = x[s+1] + ... + x[t] for s <= t, -inf above the diagonal."""
    length = x.shape[-1]
    repeated = x[..., None].expand(*x.shape, length)  # [..., i, j] = x[i]
    below = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)
    sums = repeated.masked_fill(~below, 0).cumsum(dim=-2)
    return sums.masked_fill(~torch.ones(length, length, dtype=torch.bool, device=x.device).tril(), -math.inf)


def ssd_scan(x, dt, A, B, C, D, dt_bias, initial_state, dt_limit, chunk_size: int):
    """The Mamba2 scan over (b, T, h, p) without loops: y (b, T, h, p) in x's dtype and the final
    state (b, h, p, n) in fp32. Same arithmetic as nano.kernels.chunk_scan_torch, whose loop over
    chunks becomes a segment sum over chunk decays."""
    b, length, heads, p = x.shape
    groups = B.shape[2]
    dt = F.softplus(dt.float() + dt_bias.float()).clamp(min=dt_limit[0], max=dt_limit[1])
    pad = (chunk_size - length % chunk_size) % chunk_size  # padded steps have dt = 0: no decay, no input
    xf = F.pad(x.float(), (0, 0, 0, 0, 0, pad))
    dtf = F.pad(dt, (0, 0, 0, pad))
    Bf = F.pad(B.float(), (0, 0, 0, 0, 0, pad)).repeat_interleave(heads // groups, dim=2)
    Cf = F.pad(C.float(), (0, 0, 0, 0, 0, pad)).repeat_interleave(heads // groups, dim=2)
    xf, dtf, Bf, Cf = (t.reshape(b, -1, chunk_size, *t.shape[2:]) for t in (xf, dtf, Bf, Cf))
    a = (dtf * A.float()).permute(0, 3, 1, 2)  # (b, h, c, s): log of each step's decay
    cum = a.cumsum(dim=-1)
    # Within a chunk: y_t = sum_{s<=t} C_t.B_s exp(cum_t - cum_s) dt_s x_s. Einsums of two operands only
    # (TensorRT's Einsum layer takes at most two inputs): the elementwise factors are multiplied in first.
    decay = torch.exp(segsum(a))  # (b, h, c, t, s)
    scores = torch.einsum("bcthn,bcshn->bhcts", Cf, Bf) * decay
    y = torch.einsum("bhcts,bcshp->bcthp", scores, xf * dtf[..., None])
    # Each chunk's contribution to the state at its end; then all chunks' starting states at once.
    to_end = torch.exp(cum[..., -1:] - cum).permute(0, 2, 3, 1)  # (b, c, s, h)
    chunk_states = torch.einsum("bcshp,bcshn->bchpn", xf * (to_end * dtf)[..., None], Bf)
    states = torch.cat([initial_state.float()[:, None], chunk_states], dim=1)  # (b, 1 + c, h, p, n)
    across = torch.exp(segsum(F.pad(cum[..., -1], (1, 0))))  # (b, h, 1 + c, 1 + c)
    passed = torch.einsum("bhzc,bchpn->bzhpn", across, states)
    starts, final = passed[:, :-1], passed[:, -1]
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cf * torch.exp(cum).permute(0, 2, 3, 1)[..., None], starts)
    y = y.reshape(b, -1, heads, p)[:, :length]
    return (y + D.float()[:, None] * x.float()).to(x.dtype), final


class _Hybrid(nn.Module):
    """Shared weights and pieces; `pattern` says which layer is which."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.pattern = layer_pattern({"layers_block_type": list(model.config.layers_block_type)})
        self.eps = model.config.layer_norm_epsilon

    def cache_names(self) -> tuple[list[str], list[str]]:
        """Input (past_*) and output (present*) names of the caches, in graph order."""
        past, present = [], []
        for i, kind in enumerate(self.pattern):
            if kind == ATTENTION:
                past += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
                present += [f"present.{i}.key", f"present.{i}.value"]
            elif kind == MAMBA:
                past += [f"past_conv.{i}", f"past_ssm.{i}"]
                present += [f"present_conv.{i}", f"present_ssm.{i}"]
        return past, present

    def _attend(self, q, k, v, mixer, causal: bool):
        group = q.shape[1] // k.shape[1]  # repeated, not enable_gqa: the exporter's attention has no GQA form
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1),
                                             is_causal=causal)
        return attention_out(out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1), mixer)

    def _logits(self, x):
        return F.linear(rms_norm_torch(x, self.model.model.norm_f.weight, self.eps)[0], self.model.lm_head.weight)


class HybridPrefill(_Hybrid):
    """input_ids (batch, sequence) -> logits (batch, sequence, vocab) and every layer's cache."""

    def forward(self, input_ids):
        x = self.model.model.embeddings(input_ids)
        presents = []
        for kind, layer in zip(self.pattern, self.model.model.layers):
            h = rms_norm_torch(x, layer.norm.weight, self.eps)[0]
            mixer = layer.mixer
            if kind == MAMBA:
                dims = MambaDims.of(mixer)
                z, xbc, dt = mamba_in_proj(h, mixer)
                width = dims.kernel - 1
                window = F.pad(xbc, (0, 0, width, 0))[:, -width:].transpose(1, 2)  # the last inputs, zeros before
                xbc = causal_conv1d_silu(xbc, mixer.conv1d.weight, mixer.conv1d.bias)
                xs, B, C = split_xbc(xbc, dims)
                rows, length = xs.shape[:2]
                state = torch.zeros(rows, dims.heads, dims.head_dim, dims.state, device=xs.device)
                y, final = ssd_scan(xs.reshape(rows, length, dims.heads, -1), dt, -torch.exp(mixer.A_log.float()),
                                    B.reshape(rows, length, dims.groups, -1), C.reshape(rows, length, dims.groups, -1),
                                    mixer.D, mixer.dt_bias, state, tuple(mixer.time_step_limit), mixer.chunk_size)
                out = mamba_out(y.reshape(rows, length, dims.inner), z, mixer, gated_rms_norm_torch)
                presents += [window, final]
            elif kind == ATTENTION:
                q, k, v = qkv(h, mixer)
                out = self._attend(q, k, v, mixer, causal=True)
                presents += [k, v]
            elif kind == MLP:
                out = mlp_down(relu2(mlp_up(h, mixer)), mixer)
            else:
                raise ValueError(f"layer kind {kind!r} has no ONNX form here")
            x = x + out
        return (self._logits(x), *presents)


class HybridDecode(_Hybrid):
    """input_ids (batch, 1) and every layer's cache -> logits (batch, 1, vocab) and the updated caches."""

    def forward(self, input_ids, *past):
        x = self.model.model.embeddings(input_ids)
        presents, cursor = [], 0
        for kind, layer in zip(self.pattern, self.model.model.layers):
            h = rms_norm_torch(x, layer.norm.weight, self.eps)[0]
            mixer = layer.mixer
            if kind == MAMBA:
                conv, ssm = past[cursor], past[cursor + 1]
                cursor += 2
                dims = MambaDims.of(mixer)
                z, xbc, dt = mamba_in_proj(h, mixer)
                window = torch.cat([conv, xbc.transpose(1, 2)], dim=2)  # (batch, channels, kernel)
                xbc = conv_window(window, mixer.conv1d.weight[:, 0], mixer.conv1d.bias, h.dtype)
                xs, B, C = split_xbc(xbc, dims)
                rows, heads, groups = xs.shape[0], dims.heads, dims.groups
                xs = xs.reshape(rows, heads, -1).float()
                B = B.reshape(rows, groups, -1).float().repeat_interleave(heads // groups, dim=1)
                C = C.reshape(rows, groups, -1).float().repeat_interleave(heads // groups, dim=1)
                step = F.softplus(dt[:, 0].float() + mixer.dt_bias.float())  # no clamp, as transformers' one step
                decay = torch.exp(step * -torch.exp(mixer.A_log.float()))
                state = ssm * decay[..., None, None] + (step[..., None] * xs)[..., None] * B[:, :, None, :]
                y = torch.einsum("bhpn,bhn->bhp", state, C) + mixer.D.float()[:, None] * xs
                out = mamba_out(y.to(h.dtype).reshape(rows, 1, dims.inner), z, mixer, gated_rms_norm_torch)
                presents += [window[:, :, 1:], state]
            elif kind == ATTENTION:
                past_k, past_v = past[cursor], past[cursor + 1]
                cursor += 2
                q, k, v = qkv(h, mixer)
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
                out = self._attend(q, k, v, mixer, causal=False)
                presents += [k, v]
            else:
                out = mlp_down(relu2(mlp_up(h, mixer)), mixer)
            x = x + out
        return (self._logits(x), *presents)
