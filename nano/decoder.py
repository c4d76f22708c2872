"""What `nano.generate` drives: a decoder, made fresh for each batched generation (`Model.decoder`).

A decoder `prefill`s a left-padded batch of prompts once (`input_ids` and `attention_mask`, both
(rows, length)), then `step`s one token per row at a time (`tokens`, (rows,)); both return the
next-token logits, (rows, vocab) in fp32. `graphed(step, generator)` may hand back a faster `step`
function (the fast runtime replays the model, the budget controller and the sampler from one CUDA
graph); by default it is `step` itself. The decoders: `nano.reference.ReferenceDecoder`
(transformers' forward), `nano.runtime.HybridRuntime`, `nano.decilm.DeciLMDecoder`.
"""

from __future__ import annotations

from typing import Callable

import torch


class Decoder:
    name = "decoder"

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def graphed(self, step: Callable, generator: torch.Generator | None = None) -> Callable:
        return step
