"""The Llama-Nemotron NAS family (DeciLM, `model_type` "nemotron-nas"): Super 49B and Ultra 253B.

A Llama 3.1 whose layers were searched one by one: each layer's `block_configs` entry says whether
its attention is GQA with its own `n_heads_in_group`, a single hidden x hidden linear layer
(`replace_with_linear`), or nothing (`no_op`), and whether its FFN is a gated SiLU MLP of width
`ffn_mult` (2 * ffn_mult * hidden / 3, rounded up to a multiple of 256), a single linear layer,
or nothing. A no-op sub-block has no norm either. RoPE is Llama 3.1's (rope_type "llama3").

The checkpoints ship their own modeling file for `trust_remote_code`; this module is the toolkit's
definition instead, with the same parameter names, so that `load_state_dict` takes the shipped
safetensors as they are:

    model.embed_tokens.weight, model.norm.weight, lm_head.weight
    model.layers.{i}.input_layernorm.weight            (attention not a no-op)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   (GQA)
    model.layers.{i}.self_attn.linear_attn.weight      (replace_with_linear)
    model.layers.{i}.post_attention_layernorm.weight   (FFN not a no-op)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    (gated MLP)
    model.layers.{i}.mlp.linear_mlp.weight             (replace_with_linear)

`DeciLMDecoder` is its decoder for `nano.generate` (prefill a left-padded batch, then one token per
row per step, with a static KV cache for the GQA layers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .decoder import Decoder
from .decilm_config import GATED, GQA, LINEAR, NONE, Block, DeciConfig, ffn_width  # noqa: F401 (the model's config)


def rope_frequencies(config: DeciConfig) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,) with Llama 3.1's scaling: long wavelengths slowed by
    `factor`, short ones kept, the band between interpolated."""
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = config.rope_scaling
    if not s:
        return inv.float()
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old = s["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv
    smooth = ((old / wavelength - low) / (high - low)).clamp(0, 1)
    scaled = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelength > old / low, inv / factor, torch.where(wavelength < old / high, inv, scaled)).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (…, T, heads, head_dim) by angles given as cos/sin (…, T, 1, head_dim / 2), halves layout."""
    a, b = x.float().chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: DeciConfig, kv_heads: int):
        super().__init__()
        h, d = config.hidden, config.head_dim
        self.heads, self.kv_heads, self.head_dim = config.heads, kv_heads, d
        self.q_proj = nn.Linear(h, config.heads * d, bias=False)
        self.k_proj = nn.Linear(h, kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.heads * d, h, bias=False)

    def forward(self, x, cos, sin, cache=None, slots=None, mask=None):
        """x (rows, T, hidden); `cache` (k, v) of (rows, kv_heads, capacity, d) written at `slots` (T,);
        `mask` (rows, 1, T, keys) of allowed keys (True), keys being the cache's or these T."""
        rows, length, _ = x.shape
        q = apply_rope(self.q_proj(x).view(rows, length, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(rows, length, self.kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(rows, length, self.kv_heads, self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            cache[0][:, :, slots] = k
            cache[1][:, :, slots] = v
            k, v = cache
        group = self.heads // self.kv_heads
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.repeat_interleave(group, dim=1),
                                             v.repeat_interleave(group, dim=1), attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(rows, length, -1))


class LinearAttention(nn.Module):
    def __init__(self, config: DeciConfig):
        super().__init__()
        self.linear_attn = nn.Linear(config.hidden, config.hidden, bias=False)

    def forward(self, x, *args, **kwargs):
        return self.linear_attn(x)


class MLP(nn.Module):
    def __init__(self, config: DeciConfig, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, config.hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinearMLP(nn.Module):
    def __init__(self, config: DeciConfig):
        super().__init__()
        self.linear_mlp = nn.Linear(config.hidden, config.hidden, bias=False)

    def forward(self, x):
        return self.linear_mlp(x)


class Layer(nn.Module):
    def __init__(self, config: DeciConfig, block: Block):
        super().__init__()
        self.block = block
        if block.attention != NONE:
            self.input_layernorm = RMSNorm(config.hidden, config.eps)
            self.self_attn = Attention(config, block.kv_heads) if block.attention == GQA else LinearAttention(config)
        if block.ffn != NONE:
            self.post_attention_layernorm = RMSNorm(config.hidden, config.eps)
            self.mlp = MLP(config, block.intermediate) if block.ffn == GATED else LinearMLP(config)

    def forward(self, x, cos, sin, cache=None, slots=None, mask=None):
        if self.block.attention != NONE:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, slots, mask)
        if self.block.ffn != NONE:
            x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Trunk(nn.Module):
    def __init__(self, config: DeciConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Layer(config, block) for block in config.blocks)
        self.norm = RMSNorm(config.hidden, config.eps)


class DeciLMForCausalLM(nn.Module):
    """The model: `forward(input_ids)` gives logits (rows, T, vocab) for whole sequences; the decoder
    below runs it with a cache."""

    def __init__(self, config: DeciConfig):
        super().__init__()
        self.config = config
        self.model = Trunk(config)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for `positions` (rows, T): (rows, T, 1, head_dim / 2)."""
        theta = positions.float()[..., None, None] * self.inv_freq.float()
        return theta.cos(), theta.sin()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, caches=None, slots=None,
                mask=None) -> torch.Tensor:
        rows, length = input_ids.shape
        if positions is None:
            positions = torch.arange(length, device=input_ids.device).expand(rows, length)
        if mask is None and caches is None:
            mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()[None, None]
        cos, sin = self.angles(positions)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            cache = caches.get(i) if caches is not None else None
            x = layer(x, cos, sin, cache, slots, mask)
        return self.lm_head(self.model.norm(x))


class DeciLMDecoder(Decoder):
    """`prefill` a left-padded batch, then `step` one token per row; both return (rows, vocab) fp32
    logits of the last position. The KV cache of each GQA layer is allocated once, for `capacity`."""

    name = "nano DeciLM (PyTorch, static KV cache)"

    def __init__(self, model: DeciLMForCausalLM, rows: int, capacity: int):
        self.model, self.rows, self.capacity = model, rows, capacity
        p = next(model.parameters())
        c = model.config
        self.caches = {
            i: (torch.zeros(rows, b.kv_heads, capacity, c.head_dim, dtype=p.dtype, device=p.device),
                torch.zeros(rows, b.kv_heads, capacity, c.head_dim, dtype=p.dtype, device=p.device))
            for i, b in enumerate(c.blocks) if b.attention == GQA
        }
        self.valid = torch.zeros(rows, capacity, dtype=torch.bool, device=p.device)  # keys that are real tokens
        self.length = 0  # slots used
        self.next_position = torch.zeros(rows, dtype=torch.long, device=p.device)

    def _run(self, input_ids, positions, valid):
        length = input_ids.shape[1]
        slots = torch.arange(self.length, self.length + length, device=input_ids.device)
        self.valid[:, slots] = valid
        causal = torch.arange(self.capacity, device=input_ids.device)[None, :] <= slots[:, None]  # (T, capacity)
        mask = (causal[None] & self.valid[:, None, :])[:, None]  # (rows, 1, T, capacity)
        # A padded query row attends to nothing; let it see itself so softmax stays finite (its output is unused).
        mask = mask | (torch.arange(self.capacity, device=input_ids.device)[None, None, None, :] == slots[None, None, :, None])
        logits = self.model(input_ids, positions, self.caches, slots, mask)
        self.length += length
        return logits[:, -1].float()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        rows, width = input_ids.shape
        if rows != self.rows or width >= self.capacity:
            raise ValueError(f"prefill of {rows} x {width} tokens does not fit {self.rows} rows x {self.capacity}")
        valid = attention_mask.bool()
        positions = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        self.next_position = valid.long().sum(dim=1)
        return self._run(input_ids, positions, valid)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.length >= self.capacity:
            raise ValueError(f"the cache of {self.capacity} tokens is full")
        positions = self.next_position[:, None]
        self.next_position = self.next_position + 1
        return self._run(tokens[:, None], positions, torch.ones_like(tokens, dtype=torch.bool)[:, None])
