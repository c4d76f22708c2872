"""A fast training forward for transformers' NemotronH: fused kernels in place of PyTorch's many small ones.

transformers runs the NemotronH Mamba mixer in PyTorch unless mamba-ssm and causal-conv1d are
both importable with their compiled parts; the PyTorch form is thousands of small kernels per
step, and its RMSNorms and squared ReLU are several element-wise kernels each. `use_fast_training(model)`
swaps in, for every layer:
- the Mamba mixer on mamba-ssm's Triton chunk scan and gated norm (they have backward passes of
  their own), with the conv done channels last (PyTorch's depthwise conv and the transposes
  around it cost about a tenth of a distillation step at the 9B shape). Sequences without padding
  and without a cache, as in training; anything else still goes to transformers' own forward;
- the RMSNorms and the squared ReLU compiled (one fused kernel each way) on a GPU.
On the CPU, or where the Triton kernels do not load, the same forward runs on the toolkit's
PyTorch twins, which is what the tests compare with transformers.
"""

from __future__ import annotations

import types

import torch

from nano.compiled import compiled
from nano.kernels import Kernels, causal_conv1d_silu, rms_norm_torch, select_kernels
from nano.layers import MambaDims, mamba_in_proj, mamba_out, mlp_down, mlp_up, relu2, split_xbc


def mamba_forward(mixer, hidden_states: torch.Tensor, kernels: Kernels) -> torch.Tensor:
    """transformers' NemotronHMamba2Mixer over (batch, T, hidden), no cache, no padding."""
    batch, length, _ = hidden_states.shape
    dims = MambaDims.of(mixer)
    z, xbc, dt = mamba_in_proj(hidden_states, mixer)
    xbc = _maybe_compiled(causal_conv1d_silu, xbc)(xbc, mixer.conv1d.weight, mixer.conv1d.bias)
    x, B, C = split_xbc(xbc, dims)
    y, _ = kernels.chunk_scan(
        x.reshape(batch, length, dims.heads, dims.head_dim), dt, -torch.exp(mixer.A_log.float()),
        B.reshape(batch, length, dims.groups, -1), C.reshape(batch, length, dims.groups, -1), mixer.D, mixer.dt_bias,
        None, dt_limit=tuple(mixer.time_step_limit), chunk_size=mixer.chunk_size,
    )
    return mamba_out(y.reshape(batch, length, dims.inner), z, mixer, kernels.gated_rms_norm)


def rms_norm(x, weight, eps: float):
    """transformers' NemotronHRMSNorm (the weight applied in fp32, the result in x's dtype)."""
    return rms_norm_torch(x, weight, eps)[0]


def _maybe_compiled(fn, x: torch.Tensor):
    return compiled(fn) if x.is_cuda else fn


def use_fast_training(model, kernels: Kernels | None = None) -> str:
    """Route every Mamba mixer, RMSNorm and squared ReLU of `model` through the fast forward; the kernels' name."""
    kernels = kernels or select_kernels(next(model.parameters()).device)
    for module in model.modules():
        kind = type(module).__name__
        if hasattr(module, "_transformers_forward"):
            continue
        if kind == "NemotronHMamba2Mixer":
            def forward(self, hidden_states, cache_params=None, attention_mask=None, **kwargs):
                padded = attention_mask is not None and not bool(attention_mask.all())
                if cache_params is not None or padded:
                    return self._transformers_forward(hidden_states, cache_params=cache_params,
                                                      attention_mask=attention_mask, **kwargs)
                return mamba_forward(self, hidden_states, kernels)
        elif kind == "NemotronHRMSNorm":
            def forward(self, hidden_states):
                return _maybe_compiled(rms_norm, hidden_states)(hidden_states, self.weight, self.variance_epsilon)
        elif kind == "NemotronHMLP":
            if type(module.act_fn).__name__ != "ReLUSquaredActivation":
                continue

            def forward(self, x):
                up = mlp_up(x, self)
                return mlp_down(_maybe_compiled(relu2, up)(up), self)
        else:
            continue
        module._transformers_forward = module.forward
        module.forward = types.MethodType(forward, module)
    return kernels.name
