"""A training forward for transformers' Mamba2 mixers on mamba-ssm's Triton kernels.

transformers runs the NemotronH Mamba mixer in PyTorch unless mamba-ssm and causal-conv1d are
both importable with their compiled parts; the PyTorch form is thousands of small kernels per
step. mamba-ssm's Triton chunk scan and gated norm have backward passes of their own, so a
training forward can use them with the conv in PyTorch. `use_fast_mamba(model)` swaps it into
every Mamba mixer of a model (sequences without padding and without a cache, as in training;
anything else still goes to transformers' own forward). On the CPU, or where the Triton kernels do
not load, the same forward runs on the toolkit's PyTorch twins, which is what the tests compare.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from nano.kernels import Kernels, select_kernels


def mamba_forward(mixer, hidden_states: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """transformers' NemotronHMamba2Mixer over (batch, T, hidden), no cache, no padding."""
    batch, length, _ = hidden_states.shape
    heads, p, groups = mixer.num_heads, mixer.head_dim, mixer.n_groups
    inner, bc = heads * p, groups * mixer.ssm_state_size
    z, xbc, dt = mixer.in_proj(hidden_states).split([inner, mixer.conv_dim, heads], dim=-1)
    xbc = F.silu(mixer.conv1d(xbc.transpose(1, 2))[..., :length].transpose(1, 2))
    x, B, C = xbc.split([inner, bc, bc], dim=-1)
    y, _ = kernels.chunk_scan(
        x.reshape(batch, length, heads, p), dt, -torch.exp(mixer.A_log.float()),
        B.reshape(batch, length, groups, -1), C.reshape(batch, length, groups, -1), mixer.D, mixer.dt_bias, None,
        dt_limit=tuple(mixer.time_step_limit), chunk_size=mixer.chunk_size,
    )
    y = kernels.gated_rms_norm(y.reshape(batch, length, inner), z, mixer.norm.weight, mixer.norm.variance_epsilon,
                               inner // groups)
    return mixer.out_proj(y)


def use_fast_mamba(model, kernels: Kernels | None = None) -> str:
    """Route every Mamba mixer's training forward through `mamba_forward`; the kernels' name."""
    kernels = kernels or select_kernels(next(model.parameters()).device)
    for layer in model.model.layers:
        mixer = layer.mixer
        if type(mixer).__name__ != "NemotronHMamba2Mixer" or hasattr(mixer, "_transformers_forward"):
            continue
        mixer._transformers_forward = mixer.forward

        def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
            padded = attention_mask is not None and not bool(attention_mask.all())
            if cache_params is not None or padded:
                return self._transformers_forward(hidden_states, cache_params=cache_params,
                                                  attention_mask=attention_mask, **kwargs)
            return mamba_forward(self, hidden_states, kernels)

        mixer.forward = types.MethodType(forward, mixer)
    return kernels.name
