"""The published shapes of the Nemotron Nano 2 models, as NemotronH config fields.

Read from the models' published configs. Used to build random-weight models of
the exact shapes, where speed and memory are real and quality is not, and as pruning targets.
"""

from __future__ import annotations

_COMMON = dict(
    vocab_size=131072,
    max_position_embeddings=131072,
    num_attention_heads=40,
    num_key_value_heads=8,
    head_dim=128,
    mamba_num_heads=128,
    mamba_head_dim=80,
    n_groups=8,
    ssm_state_size=128,
    conv_kernel=4,
    chunk_size=128,
    use_conv_bias=True,
    mamba_proj_bias=False,
    attention_bias=False,
    mlp_bias=False,
    use_bias=False,
    mlp_hidden_act="relu2",
    mamba_hidden_act="silu",
    layer_norm_epsilon=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

NANO_12B_V2_BASE = dict(
    _COMMON,
    hybrid_override_pattern="M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
    hidden_size=5120,
    intermediate_size=20480,
)

NANO_9B_V2 = dict(
    _COMMON,
    hybrid_override_pattern="M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-",
    hidden_size=4480,
    intermediate_size=15680,
)

SHAPES = {"nano-12b-v2-base": NANO_12B_V2_BASE, "nano-9b-v2": NANO_9B_V2}


def shape_config(name: str, **overrides):
    """A transformers `NemotronHConfig` of a published shape ("nano-9b-v2", "nano-12b-v2-base")."""
    from transformers import NemotronHConfig

    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    return NemotronHConfig(**dict(SHAPES[name], **overrides))
