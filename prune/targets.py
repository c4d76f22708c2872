"""Naming the pruned model: explicit sizes, a published preset, or a budget to search under.

`Sizes` is what the slicer needs apart from which layers go: hidden, FFN, Mamba heads and
attention heads (None: unchanged), and how many layers to remove (a total, any kind, or a count
per kind). A preset turns a teacher into a published shape exactly (its sizes and its number of
layers of each kind). A budget (parameters, or memory on a named GPU at a context length, from
the core's memory model) is searched by `prune.search`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from nano.config import ATTENTION, MAMBA, MLP
from nano.memory import Shape
from nano.shapes import NANO_9B_V2


@dataclass(frozen=True)
class Plan:
    """Target sizes of the pruned model and the layers (original indices) to drop."""

    hidden: int
    ffn: int
    mamba_heads: int
    attention_heads: int
    drop: tuple[int, ...] = field(default_factory=tuple)


def check_plan(config, plan: Plan) -> None:
    """Raise ValueError, naming the value, unless `plan` can be cut from a model of `config`."""
    def bounded(name, value, original, multiple=1, why=""):
        if not 1 <= value <= original or value % multiple:
            extra = f", a multiple of {multiple}{why}" if multiple > 1 else ""
            raise ValueError(f"{name}={value} is not possible: it must be between 1 and {original}{extra}")

    bounded("hidden", plan.hidden, config.hidden_size)
    bounded("ffn", plan.ffn, config.intermediate_size)
    bounded("mamba_heads", plan.mamba_heads, config.mamba_num_heads, config.n_groups,
            f" (every one of the {config.n_groups} groups keeps the same number of heads)")
    bounded("attention_heads", plan.attention_heads, config.num_attention_heads, config.num_key_value_heads,
            f" (every one of the {config.num_key_value_heads} KV groups keeps the same number of query heads)")
    layers = len(config.hybrid_override_pattern)
    bad = [i for i in plan.drop if not 0 <= i < layers]
    if bad or len(set(plan.drop)) != len(plan.drop) or len(plan.drop) >= layers:
        raise ValueError(f"layers to drop {list(plan.drop)} must be distinct indices in 0..{layers - 1}, not all")


def pruned_pattern(pattern: str, drop) -> str:
    return "".join(kind for i, kind in enumerate(pattern) if i not in set(drop))


def pruned_config_dict(config, plan: Plan) -> dict:
    """The config (as a dict for `NemotronHConfig`) of the model that `plan` cuts from `config`."""
    check_plan(config, plan)
    fields = config.to_dict()
    for stale in ("layers_block_type", "layer_types", "num_hidden_layers", "hybrid_override_pattern"):
        fields.pop(stale, None)
    fields.update(
        hybrid_override_pattern=pruned_pattern(config.hybrid_override_pattern, plan.drop),
        hidden_size=plan.hidden,
        intermediate_size=plan.ffn,
        mamba_num_heads=plan.mamba_heads,
        num_attention_heads=plan.attention_heads,
    )
    return fields


PRESETS = {"nano-9b-v2": NANO_9B_V2}
KINDS = (MAMBA, ATTENTION, MLP)
# Fields a preset keeps from the teacher: if they differ, the preset was made for another model.
_MUST_MATCH = ("vocab_size", "num_key_value_heads", "head_dim", "mamba_head_dim", "n_groups", "ssm_state_size",
               "conv_kernel")


@dataclass(frozen=True)
class Sizes:
    hidden: int | None = None
    ffn: int | None = None
    mamba_heads: int | None = None
    attention_heads: int | None = None
    layers: int | None = None  # total layers to keep, any kinds
    remove: tuple[tuple[str, int], ...] | None = None  # layers to remove per kind, instead of `layers`

    def removal(self, pattern: str):
        """What `prune.importance.rank_layers` takes: a count, or a count per kind."""
        if self.remove is not None:
            return {kind: n for kind, n in self.remove if n}
        if self.layers is None:
            return 0
        if not 1 <= self.layers <= len(pattern):
            raise ValueError(f"layers={self.layers} is not possible: the teacher has {len(pattern)} layers")
        return len(pattern) - self.layers

    def plan(self, config, drop=()) -> Plan:
        return Plan(
            hidden=self.hidden or config.hidden_size,
            ffn=self.ffn or config.intermediate_size,
            mamba_heads=self.mamba_heads or config.mamba_num_heads,
            attention_heads=self.attention_heads or config.num_attention_heads,
            drop=tuple(sorted(drop)),
        )

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.remove is not None:
            out["remove"] = dict(self.remove)
        return out


def preset(name: str, config) -> Sizes:
    """The sizes that turn `config` (the teacher) into the published shape `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    shape = PRESETS[name]
    for key in _MUST_MATCH:
        teacher = getattr(config, key, None)
        if teacher != shape[key]:
            raise ValueError(f"preset {name!r} needs {key}={shape[key]}; the teacher has {key}={teacher}")
    teacher_pattern, target_pattern = config.hybrid_override_pattern, shape["hybrid_override_pattern"]
    remove = []
    for kind in KINDS:
        have, want = teacher_pattern.count(kind), target_pattern.count(kind)
        if want > have:
            raise ValueError(f"preset {name!r} has {want} layers of kind {kind!r}; the teacher has only {have}")
        remove.append((kind, have - want))
    for key in ("hidden_size", "intermediate_size", "mamba_num_heads", "num_attention_heads"):
        if shape[key] > getattr(config, key):
            raise ValueError(f"preset {name!r} has {key}={shape[key]}, more than the teacher's {getattr(config, key)}")
    return Sizes(
        hidden=shape["hidden_size"],
        ffn=shape["intermediate_size"],
        mamba_heads=shape["mamba_num_heads"],
        attention_heads=shape["num_attention_heads"],
        remove=tuple(remove),
    )


def _shape_after(config, sizes: Sizes, pattern: str) -> Shape:
    p = sizes.plan(config)
    base = Shape.of(config)
    return Shape(**dict(asdict(base), pattern=pattern, hidden=p.hidden, ffn=p.ffn, mamba_heads=p.mamba_heads,
                        attention_heads=p.attention_heads))


def parameter_range(config, sizes: Sizes) -> tuple[int, int]:
    """The pruned model's parameters, before layer importance says which layers go: exact (both
    ends equal) when layers are removed per kind or not at all, else the least and the most."""
    pattern = config.hybrid_override_pattern
    removal = sizes.removal(pattern)
    if isinstance(removal, dict):
        kept = "".join(k * (pattern.count(k) - removal.get(k, 0)) for k in KINDS)
        count = _shape_after(config, sizes, kept).parameters()
        return count, count
    shape = _shape_after(config, sizes, pattern)
    by_size = sorted(range(len(pattern)), key=lambda i: shape.layer_parameters(pattern[i]))
    full = shape.parameters()
    dropped = lambda order: sum(shape.layer_parameters(pattern[i]) for i in order[:removal])  # noqa: E731
    return full - dropped(by_size[::-1]), full - dropped(by_size)


def pruned_counts(config, sizes: Sizes) -> dict[str, int]:
    pattern = config.hybrid_override_pattern
    removal = sizes.removal(pattern)
    if isinstance(removal, dict):
        return {k: pattern.count(k) - removal.get(k, 0) for k in KINDS}
    return {"layers": len(pattern) - removal}
