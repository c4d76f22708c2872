"""NemotronH's configuration for a transformers without it (transformers 4, which TensorRT-LLM 1.2.1 pins).

Written by nanokit for its TensorRT-LLM bundles; `config.json`'s `auto_map` points `AutoConfig` here,
so `AutoConfig.from_pretrained(folder, trust_remote_code=True)` reads the checkpoint under
transformers 4.x. Under transformers 5, which has NemotronH, this module hands back that class, so
trusting remote code there changes nothing.

The attributes are those of NVIDIA's published NemotronH checkpoints (and of transformers 5's
class): the layer layout as `hybrid_override_pattern` (one letter a layer: M Mamba2, * attention,
- MLP, E MoE) with `layers_block_type` derived from it, the Mamba mixer's sizes, attention's and the
MLP's. transformers 5 writes the layout as `layers_block_type` alone and infinity as
`{"__float__": "Infinity"}`; both are read here. `rms_norm_eps` is the norms' epsilon under the name
TensorRT-LLM's layers read (and assign: it is a plain attribute), `layer_norm_epsilon` unless given.
"""

import math

from transformers import PretrainedConfig

_KIND_OF_LETTER = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_LETTER_OF_KIND = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*", "mlp": "-",
                   "moe": "E"}
# Older spellings of the Mamba fields, as NVIDIA's configuration code takes them.
_RENAMED = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
            "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max", "mamba_dt_limit": "time_step_limit",
            "mamba_dt_init_floor": "time_step_floor", "mamba_conv_bias": "use_conv_bias",
            "mamba_chunk_size": "chunk_size"}
# The published defaults (Nemotron-H 8B), for every field but the layout and the special tokens.
_DEFAULTS = dict(
    vocab_size=131072, hidden_size=4096, intermediate_size=21504, num_attention_heads=32, head_dim=128,
    num_key_value_heads=8, mlp_hidden_act="relu2", attention_bias=False, mlp_bias=False, use_bias=False,
    initializer_range=0.02, layer_norm_epsilon=1e-5, residual_in_fp32=False, use_cache=True, num_logits_to_keep=1,
    sliding_window=None, max_position_embeddings=4096, attention_dropout=0.0, hidden_dropout=0.0,
    use_mamba_kernels=True, ssm_state_size=128, mamba_num_heads=128, n_groups=8, mamba_head_dim=64, conv_kernel=4,
    expand=2, mamba_hidden_act="silu", time_step_min=0.001, time_step_max=0.1, time_step_limit=(0.0, math.inf),
    time_step_floor=1e-4, use_conv_bias=True, mamba_proj_bias=False, chunk_size=256, rescale_prenorm_residual=True,
)
_DEFAULT_PATTERN = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"


def _number(value):
    if isinstance(value, dict) and "__float__" in value:
        return float(value["__float__"])
    return value


class _NemotronHConfig(PretrainedConfig):
    model_type = "nemotron_h"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, hybrid_override_pattern=None, num_hidden_layers=None, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, **kwargs):
        for old, new in _RENAMED.items():
            if old in kwargs:
                kwargs.setdefault(new, kwargs.pop(old))
        block_types = kwargs.pop("layers_block_type", None) or kwargs.pop("layer_types", None)
        rms_norm_eps = kwargs.pop("rms_norm_eps", None)
        if hybrid_override_pattern is None:
            hybrid_override_pattern = (_DEFAULT_PATTERN if block_types is None
                                       else "".join(_LETTER_OF_KIND[kind] for kind in block_types))
        unknown = sorted(set(hybrid_override_pattern) - set(_KIND_OF_LETTER))
        if unknown:
            raise ValueError(f"hybrid_override_pattern {hybrid_override_pattern!r} has letters {unknown}; "
                             f"accepted: {sorted(_KIND_OF_LETTER)}")
        if num_hidden_layers is not None and num_hidden_layers != len(hybrid_override_pattern):
            raise ValueError(f"num_hidden_layers {num_hidden_layers} disagrees with the {len(hybrid_override_pattern)} "
                             f"layers of hybrid_override_pattern {hybrid_override_pattern!r}")
        fields = {name: kwargs.pop(name, default) for name, default in _DEFAULTS.items()}
        fields["time_step_limit"] = tuple(_number(v) for v in fields["time_step_limit"])
        if fields["num_key_value_heads"] is None:
            fields["num_key_value_heads"] = fields["num_attention_heads"]
        for name, value in fields.items():
            setattr(self, name, value)
        self.rms_norm_eps = fields["layer_norm_epsilon"] if rms_norm_eps is None else rms_norm_eps
        self.hybrid_override_pattern = hybrid_override_pattern
        self.num_hidden_layers = len(hybrid_override_pattern)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def layers_block_type(self):
        return [_KIND_OF_LETTER[letter] for letter in self.hybrid_override_pattern]


try:  # transformers 5: its own class, which its NemotronH model reads
    from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
except ImportError:  # transformers 4
    NemotronHConfig = _NemotronHConfig
    NemotronHConfig.__name__ = NemotronHConfig.__qualname__ = "NemotronHConfig"
