"""Llama-Nemotron NAS (DeciLM) configuration, for readers whose transformers has none (every release).

Written by nanokit for its TensorRT-LLM bundles; `config.json`'s `auto_map` points `AutoConfig` here.
TensorRT-LLM's PyTorch backend (`modeling_nemotron_nas`) reads each layer's `block_configs` entry by
attribute (`block.attention.n_heads_in_group`, `block.ffn.ffn_mult`, `no_op`, `replace_with_linear`),
so the entries become small objects here, and go back to plain dicts in `to_dict`. As in NVIDIA's
own configuration code, `intermediate_size` and `num_key_value_heads` are per layer, so None here.
"""

from transformers import LlamaConfig

_ATTENTION = dict(no_op=False, replace_with_linear=False, n_heads_in_group=None, sparsify=None, window_length=None,
                  num_sink_tokens=None, unshifted_sink=False, use_prefill_window_in_sink_attention=False)
_FFN = dict(no_op=False, replace_with_linear=False, ffn_mult=None, sparsify=None)


class _Part:
    def __init__(self, defaults: dict, given: dict):
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ValueError(f"block config fields {unknown} are not known; known: {sorted(defaults)}")
        self.__dict__.update({**defaults, **given})

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class BlockConfig:
    def __init__(self, attention=None, ffn=None):
        self.attention = attention if isinstance(attention, _Part) else _Part(_ATTENTION, dict(attention or {}))
        self.ffn = ffn if isinstance(ffn, _Part) else _Part(_FFN, dict(ffn or {}))

    def to_dict(self) -> dict:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        kwargs.pop("intermediate_size", None)
        kwargs.pop("num_key_value_heads", None)
        super().__init__(**kwargs)
        self.intermediate_size = None
        self.num_key_value_heads = None
        blocks = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in (block_configs or [])]
        if blocks and len(blocks) != self.num_hidden_layers:
            raise ValueError(f"{len(blocks)} block_configs for num_hidden_layers {self.num_hidden_layers}")
        self.block_configs = blocks

    def to_dict(self):
        out = super().to_dict()
        out["block_configs"] = [b.to_dict() for b in self.block_configs]
        return out
