"""The reference decoder: transformers' own `NemotronHForCausalLM` forward and cache.

Slow and trusted. It serves generation on the CPU and is the yardstick any faster runtime is
tested against. The interface it follows is `nano.decoder.Decoder`.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .decoder import Decoder


class ReferenceDecoder(Decoder):
    name = "reference (transformers)"

    def __init__(self, model):
        self.model = model
        self.cache = None
        self.attention_mask = None

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.cache = DynamicCache(config=self.model.config)
        self.attention_mask = attention_mask
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones((tokens.shape[0], 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=self.attention_mask,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()
