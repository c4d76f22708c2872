"""Reading a NemotronH `config.json`: the layer pattern and the facts the rest of the toolkit needs.

Checkpoints in the wild spell the layer layout two ways: the original `hybrid_override_pattern`
string (one letter per layer) and transformers' newer `layers_block_type` list, itself in an old
("mamba", "attention") and a new ("linear_attention", "full_attention") vocabulary. Everything
in this toolkit speaks the pattern string; this module is the one place that translates.
"""

from __future__ import annotations

from typing import Any

# Pattern letters, as in the published configs.
MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"

_LETTER_OF_BLOCK_TYPE = {
    "mamba": MAMBA,
    "linear_attention": MAMBA,
    "attention": ATTENTION,
    "full_attention": ATTENTION,
    "mlp": MLP,
    "moe": MOE,
}

NEMOTRON_H_MODEL_TYPE = "nemotron_h"
NEMOTRON_H_ARCHITECTURE = "NemotronHForCausalLM"


class ConfigError(ValueError):
    """A checkpoint's configuration is missing, malformed, or describes an unsupported model."""


def layer_pattern(config: dict[str, Any], source: str = "config.json") -> str:
    """The layer layout as a pattern string such as ``"M-M*-"``.

    Reads `hybrid_override_pattern` or `layers_block_type` (both, where both are set: they must
    agree, since transformers 5 reads the list and older readers the string); `source` names the
    file in errors.
    """
    pattern = config.get("hybrid_override_pattern")
    block_types = config.get("layers_block_type")
    if pattern is None and block_types is None:
        raise ConfigError(f"{source}: neither hybrid_override_pattern nor layers_block_type is set")
    listed = None if block_types is None else _pattern_of_block_types(block_types, source)
    if pattern is None:
        return listed
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{source}: hybrid_override_pattern must be a non-empty string, got {pattern!r}")
    for i, letter in enumerate(pattern):
        if letter not in (MAMBA, ATTENTION, MLP, MOE):
            raise ConfigError(
                f"{source}: hybrid_override_pattern has {letter!r} at layer {i}; "
                f"accepted letters are 'M' (Mamba2), '*' (attention), '-' (MLP), 'E' (MoE)"
            )
    if listed is not None and listed != pattern:
        raise ConfigError(f"{source}: hybrid_override_pattern {pattern!r} disagrees with layers_block_type ({listed!r})")
    return pattern


def _pattern_of_block_types(block_types, source: str) -> str:
    if not isinstance(block_types, list) or not block_types:
        raise ConfigError(f"{source}: layers_block_type must be a non-empty list, got {block_types!r}")
    letters = []
    for i, block_type in enumerate(block_types):
        if block_type not in _LETTER_OF_BLOCK_TYPE:
            raise ConfigError(
                f"{source}: layers_block_type[{i}] is {block_type!r}; "
                f"accepted values are {sorted(_LETTER_OF_BLOCK_TYPE)}"
            )
        letters.append(_LETTER_OF_BLOCK_TYPE[block_type])
    return "".join(letters)


def with_layer_fields(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """`config` with `hybrid_override_pattern` and `num_hidden_layers` written out.

    transformers 5 saves the layout as `layers_block_type` alone; the readers written against the
    older form (TensorRT-LLM's NemotronH, TensorRT Edge-LLM's exporter, the configuration code of
    NVIDIA's published checkpoints) read the pattern string and the layer count, and without them
    build the default pattern or stop. transformers 5 reads both fields back as before.
    """
    pattern = layer_pattern(config, source)
    layers = config.get("num_hidden_layers")
    if layers is not None and layers != len(pattern):
        raise ConfigError(f"{source}: num_hidden_layers is {layers}, but the layer pattern {pattern!r} has "
                          f"{len(pattern)} layers")
    return {**config, "hybrid_override_pattern": pattern, "num_hidden_layers": len(pattern)}


DECILM_MODEL_TYPE = "nemotron-nas"
DECILM_ARCHITECTURE = "DeciLMForCausalLM"


def family(config: Any) -> str | None:
    """"nemotron_h" (hybrid Nano), "decilm" (Llama-Nemotron Super / Ultra), or None: the one place that
    tells, for a config.json dict, a transformers config, or the toolkit's DeciLM config."""
    from .decilm_config import DeciConfig

    if isinstance(config, DeciConfig):
        return "decilm"
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    model_type, architectures = get("model_type"), get("architectures") or []
    if model_type == NEMOTRON_H_MODEL_TYPE or NEMOTRON_H_ARCHITECTURE in architectures:
        return "nemotron_h"
    if model_type == DECILM_MODEL_TYPE or DECILM_ARCHITECTURE in architectures:
        return "decilm"
    return None


def check_supported(config: dict[str, Any], source: str = "config.json", families=("nemotron_h",)) -> str:
    """The model family of `config`; `ConfigError` unless it is one of `families`."""
    found = family(config)
    if found == "nemotron_h" and found in families:
        layer_pattern(config, source)
        return found
    if found == "decilm" and found in families:
        from .decilm_config import DeciConfig

        try:
            DeciConfig.of(config, source)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return found
    accepted = " and ".join({"nemotron_h": f"NemotronH (model_type {NEMOTRON_H_MODEL_TYPE!r})",
                             "decilm": f"Llama-Nemotron NAS (model_type {DECILM_MODEL_TYPE!r})"}[f] for f in families)
    raise ConfigError(
        f"{source}: model_type {config.get('model_type')!r} (architectures {config.get('architectures') or []}) "
        f"is not supported here; this reads {accepted} checkpoints"
    )


def context_length(config: Any) -> int:
    """The longest sequence (prompt and generated tokens together) the model was built for."""
    value = config.get("max_position_embeddings") if isinstance(config, dict) else config.max_position_embeddings
    return int(value)


# transformers' NemotronHConfig defaults for the keys this toolkit reads from a config.json that
# leaves them out (tests/test_plan.py holds them to the installed transformers).
NEMOTRON_H_DEFAULTS = {
    "vocab_size": 131072,
    "hidden_size": 4096,
    "intermediate_size": 21504,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "mamba_num_heads": 128,
    "mamba_head_dim": 64,
    "n_groups": 8,
    "ssm_state_size": 128,
    "conv_kernel": 4,
    "use_conv_bias": True,
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}


class HybridConfig:
    """A NemotronH config.json read without transformers, for the commands that only do arithmetic
    on it (the prune dry-run, the targets): attributes named as `NemotronHConfig` names them, the
    missing ones at its defaults, and `hybrid_override_pattern` always written out."""

    def __init__(self, fields: dict[str, Any], source: str = "config.json"):
        check_supported(fields, source)
        self._fields = {**NEMOTRON_H_DEFAULTS, **with_layer_fields(fields, source)}

    @classmethod
    def read(cls, path) -> HybridConfig:
        """The config in `path` (a config.json, or a checkpoint folder holding one)."""
        import json
        from pathlib import Path

        path = Path(path)
        source = path / "config.json" if path.is_dir() else path
        if not source.exists():
            raise ConfigError(f"{source}: not found; expected a NemotronH checkpoint folder or its config.json")
        try:
            return cls(json.loads(source.read_text()), str(source))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source}: not valid JSON ({e.msg} at line {e.lineno})") from None

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_fields"][name]
        except KeyError:
            raise AttributeError(f"the config has no {name!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self._fields)
