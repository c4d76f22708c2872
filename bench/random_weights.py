"""Models of a published shape with random weights: speed and memory are real, quality is not."""

from __future__ import annotations


import torch


import nano
from nano.chat import ChatFormat
from nano.shapes import shape_config
from nano.tiny import tiny_config, tiny_tokenizer


def random_model(shape: str, device, dtype: torch.dtype = torch.bfloat16, endless: bool = False) -> nano.Model:
    """A `nano.Model` of `shape` ("tiny" or a name in nano.shapes) with the tiny byte-level tokenizer.

    With `endless`, the end token is one past the tokenizer's vocabulary, which generation never
    samples: every run then generates its full length.
    """
    from transformers import NemotronHForCausalLM

    config = tiny_config() if shape == "tiny" else shape_config(shape, eos_token_id=tiny_config().eos_token_id)
    tokenizer = tiny_tokenizer(model_max_length=config.max_position_embeddings)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = NemotronHForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    chat = ChatFormat(tokenizer, [config.vocab_size - 1] if endless else config.eos_token_id)
    return nano.Model(model=model, tokenizer=tokenizer, config=model.config, chat=chat)
