"""A straightforward DeciLM forward from a config dict and a state dict, for the tests.

Loops where the model vectorises: heads one by one (each query head reads KV head `head // group`),
an explicit causal softmax, RoPE frequencies computed per frequency with Llama 3.1's three cases,
the rotation written as the rotate-half formula on full-width cos and sin. No cache, fp64.
"""

from __future__ import annotations

import math

import torch


def _intermediate(mult: float, hidden: int) -> int:
    width = int(2 * mult * hidden / 3)
    while width % 256:
        width += 1
    return width


def _frequencies(config: dict, head_dim: int) -> torch.Tensor:
    theta = config.get("rope_theta", 500000.0)
    s = config.get("rope_scaling")
    out = []
    for i in range(0, head_dim, 2):
        f = 1.0 / theta ** (i / head_dim)
        if s:
            wavelength = 2 * math.pi / f
            low_wavelength = s["original_max_position_embeddings"] / s["low_freq_factor"]
            high_wavelength = s["original_max_position_embeddings"] / s["high_freq_factor"]
            if wavelength > low_wavelength:
                f = f / s["factor"]
            elif wavelength >= high_wavelength:
                t = (s["original_max_position_embeddings"] / wavelength - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"])
                f = (1 - t) * f / s["factor"] + t * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def _norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def reference_logits(config: dict, state: dict, input_ids: list[int]) -> torch.Tensor:
    """Logits (T, vocab) of one sequence."""
    w = {k: v.double() for k, v in state.items()}
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    eps = config.get("rms_norm_eps", 1e-5)
    length = len(input_ids)
    freqs = _frequencies(config, head_dim)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * freqs[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    x = w["model.embed_tokens.weight"][torch.tensor(input_ids)]
    for i, block in enumerate(config["block_configs"]):
        p = f"model.layers.{i}."
        attention, ffn = block["attention"], block["ffn"]
        if not attention.get("no_op"):
            h = _norm(x, w[p + "input_layernorm.weight"], eps)
            if attention.get("replace_with_linear"):
                x = x + h @ w[p + "self_attn.linear_attn.weight"].T
            else:
                group = attention["n_heads_in_group"]
                q = (h @ w[p + "self_attn.q_proj.weight"].T).view(length, heads, head_dim)
                k = (h @ w[p + "self_attn.k_proj.weight"].T).view(length, heads // group, head_dim)
                v = (h @ w[p + "self_attn.v_proj.weight"].T).view(length, heads // group, head_dim)
                outputs = []
                for head in range(heads):
                    qh = _rotate(q[:, head], cos, sin)
                    kh = _rotate(k[:, head // group], cos, sin)
                    scores = qh @ kh.T / math.sqrt(head_dim)
                    scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
                    outputs.append(torch.softmax(scores, dim=-1) @ v[:, head // group])
                x = x + torch.cat(outputs, dim=-1) @ w[p + "self_attn.o_proj.weight"].T
        if not ffn.get("no_op"):
            h = _norm(x, w[p + "post_attention_layernorm.weight"], eps)
            if ffn.get("replace_with_linear"):
                x = x + h @ w[p + "mlp.linear_mlp.weight"].T
            else:
                assert w[p + "mlp.gate_proj.weight"].shape[0] == _intermediate(ffn["ffn_mult"], hidden)
                gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
                x = x + (gate * torch.sigmoid(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _norm(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T
