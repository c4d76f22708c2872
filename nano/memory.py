"""Parameter counts and the memory a NemotronH model needs on a GPU, from its config alone.

One copy of this arithmetic serves the pruner (which searches shapes under a memory budget) and
the exporters (which size a deployment before the engine starts). It reads a config as a dict,
a transformers config, or anything with the same attribute names; no weights are touched.

Memory on one GPU, for `batch` sequences of `context` tokens:
- weights: every parameter at the weight dtype, or, quantized, the groups a recipe quantizes at the
  quantized format's bytes and the rest at the weight dtype;
- kv_cache: K and V of the attention layers only (`2 * kv_heads * head_dim` values per token each);
- ssm_state: the Mamba state, `heads * head_dim * state` per layer and sequence (fp32 by default,
  as NVIDIA requires for accuracy), and conv_state: the last `conv_kernel - 1` inputs of the conv;
- workspace: activations of one prefill call (the runtime prefills in chunks of 4096 tokens per row,
  fewer per row for large batches; see `prefill_chunk`);
- overhead: the allocator's slack, a fixed allowance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from .config import ATTENTION, MAMBA, MLP, family, layer_pattern
from .hardware import (ARCHITECTURES, DEFAULT_RECIPE, DTYPE_BYTES, JETSON_PRECISIONS, JETSON_QUANTIZED,
                       PREFILL_BUCKET_TOKENS, PREFILL_BUCKET_WIDTHS, PREFILL_CHUNK, PREFILL_ROWS, QUANT_FORMATS,
                       RECIPES, TARGETS, cache_columns, prefill_buckets, prefill_chunk)

GIB = 2**30

def quantized_groups(quant: str, recipe: str = DEFAULT_RECIPE) -> tuple[str, ...]:
    """The parameter groups `recipe` quantizes in the `quant` format. INT4 AWQ leaves the Mamba in_proj
    alone: its packing halves the output rows, which TensorRT-LLM's NemotronH loader splits by name."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    quant_bytes(quant)
    return tuple(g for g in RECIPES[recipe] if not (quant == "int4_awq" and g == "mamba_in_proj"))

OVERHEAD_BYTES = GIB // 4


def _get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _pattern(config: Any) -> str:
    pattern = _get(config, "hybrid_override_pattern")
    if isinstance(pattern, str):
        return pattern
    return layer_pattern(config if isinstance(config, dict) else {"layers_block_type": list(config.layers_block_type)})


@dataclass(frozen=True)
class Shape:
    """The sizes of a NemotronH model that its parameter count and memory depend on."""

    pattern: str
    vocab: int
    hidden: int
    ffn: int
    attention_heads: int
    kv_heads: int
    head_dim: int
    mamba_heads: int
    mamba_head_dim: int
    groups: int
    state: int
    conv_kernel: int
    conv_bias: bool = True
    tied: bool = False

    @classmethod
    def of(cls, config: Any) -> Shape:
        hidden = _get(config, "hidden_size")
        heads = _get(config, "num_attention_heads")
        return cls(
            pattern=_pattern(config),
            vocab=_get(config, "vocab_size"),
            hidden=hidden,
            ffn=_get(config, "intermediate_size"),
            attention_heads=heads,
            kv_heads=_get(config, "num_key_value_heads"),
            head_dim=_get(config, "head_dim") or hidden // heads,
            mamba_heads=_get(config, "mamba_num_heads"),
            mamba_head_dim=_get(config, "mamba_head_dim"),
            groups=_get(config, "n_groups"),
            state=_get(config, "ssm_state_size"),
            conv_kernel=_get(config, "conv_kernel"),
            conv_bias=bool(_get(config, "use_conv_bias", True)),
            tied=bool(_get(config, "tie_word_embeddings", False)),
        )

    @property
    def mamba_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.groups * self.state

    def layer_parameters(self, kind: str) -> int:
        """Parameters of one layer of `kind` ('M', '*' or '-'), its pre-norm included."""
        h = self.hidden
        if kind == MAMBA:
            in_proj = h * (self.mamba_inner + self.conv_dim + self.mamba_heads)
            conv = self.conv_dim * self.conv_kernel + (self.conv_dim if self.conv_bias else 0)
            per_head = 3 * self.mamba_heads  # A_log, D, dt_bias
            return h + in_proj + conv + per_head + self.mamba_inner + self.mamba_inner * h
        if kind == ATTENTION:
            q = self.attention_heads * self.head_dim
            kv = self.kv_heads * self.head_dim
            return h + h * (q + 2 * kv) + q * h
        if kind == MLP:
            return h + 2 * h * self.ffn
        raise ValueError(f"layer kind {kind!r} is not one of 'M' (Mamba2), '*' (attention), '-' (MLP)")

    def parameter_groups(self) -> dict[str, int]:
        """Parameters by the group a quantization recipe names (see RECIPES); they sum to `parameters()`."""
        h, m, a = self.hidden, self.pattern.count(MAMBA), self.pattern.count(ATTENTION)
        q, kv = self.attention_heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "embeddings": self.vocab * h,
            "lm_head": 0 if self.tied else self.vocab * h,
            "norms": h * (len(self.pattern) + 1),
            "mamba_in_proj": m * h * (self.mamba_inner + self.conv_dim + self.mamba_heads),
            "mamba_out_proj": m * self.mamba_inner * h,
            "mamba_conv": m * (self.conv_dim * self.conv_kernel + (self.conv_dim if self.conv_bias else 0)),
            "mamba_other": m * (3 * self.mamba_heads + self.mamba_inner),  # A_log, D, dt_bias, the gated norm
            "attention": a * (h * (q + 2 * kv) + q * h),
            "mlp": self.pattern.count(MLP) * 2 * h * self.ffn,
        }

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.hidden + sum(self.layer_parameters(kind) for kind in self.pattern)

    def weight_bytes(self, dtype: str = "bf16", quant: str | None = None, recipe: str = DEFAULT_RECIPE,
                     tp: int = 1) -> int:
        """Bytes of the weights on one GPU of `tp`: all at `dtype`, or the groups `recipe` quantizes in the
        `quant` format. Under tensor parallelism every group is split but the embeddings and norms."""
        chosen = quantized_groups(quant, recipe) if quant is not None else ()
        total = 0.0
        for name, n in self.parameter_groups().items():
            share = n if name in ("embeddings", "norms") else n / tp
            total += share * (quant_bytes(quant) if name in chosen else _bytes_of(dtype))
        return int(total)

    def check_tp(self, tp: int) -> None:
        """Refuse a tensor-parallel size that does not divide every split dimension, with the numbers."""
        if tp < 1:
            raise ValueError(f"tensor-parallel size must be at least 1, got {tp}")
        dims = {"attention heads": self.attention_heads, "KV heads": self.kv_heads, "Mamba heads": self.mamba_heads,
                "Mamba groups": self.groups, "FFN width": self.ffn, "vocabulary": self.vocab}
        kinds = set(self.pattern)
        needed = {k: v for k, v in dims.items() if (k.startswith(("attention", "KV")) and ATTENTION in kinds)
                  or (k.startswith("Mamba") and MAMBA in kinds) or (k == "FFN width" and MLP in kinds) or k == "vocabulary"}
        bad = [f"{k} {v}" for k, v in needed.items() if v % tp]
        if bad:
            raise ValueError(f"tensor-parallel size {tp} does not divide the {', '.join(bad)}")


def format_count(n: float) -> str:
    """A parameter count as people write it: 8.888B, 146.982M."""
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.3f}M"


def parameter_count(config: Any) -> int:
    """Parameters of a NemotronH model described by `config` (dict or transformers config)."""
    return Shape.of(config).parameters()


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a model needs on one GPU, by component, and whether they fit the target."""

    weights: int
    kv_cache: int
    ssm_state: int
    conv_state: int
    workspace: int
    overhead: int
    usable: int
    context: int
    batch: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.ssm_state + self.conv_state + self.workspace + self.overhead

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    def as_dict(self) -> dict:
        return dict(asdict(self), total=self.total, fits=self.fits)


def usable_bytes(target: str | float) -> int:
    """Usable memory of a named target (see TARGETS), or a number of GiB."""
    if isinstance(target, (int, float)):
        return int(target * GIB)
    name = target.lower()
    if name not in TARGETS:
        raise ValueError(f"unknown GPU {target!r}; known: {', '.join(TARGETS)} (or a number of GiB)")
    return int(TARGETS[name] * GIB)


def _bytes_of(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def quant_bytes(quant: str) -> float:
    """Bytes per weight of a quantized format (scales included)."""
    if quant not in QUANT_FORMATS:
        raise ValueError(f"unknown quantization {quant!r}; known: {', '.join(QUANT_FORMATS)}")
    return DTYPE_BYTES[QUANT_FORMATS[quant][0]]


def check_quant_runs_on(quant: str, target: str) -> None:
    """Refuse a quantized format that the target's GPU generation has no kernels for."""
    quant_bytes(quant)
    arch = ARCHITECTURES.get(target.lower())
    if arch is not None and arch not in QUANT_FORMATS[quant][1]:
        runs = [q for q, (_, archs) in QUANT_FORMATS.items() if arch in archs]
        raise ValueError(f"{quant} does not run on {target} ({arch.capitalize()}: no kernels for it); "
                         f"quantizations that do: {', '.join(runs)}")


def plan(
    config: Any,
    target: str | float,
    context: int,
    batch: int = 1,
    weight_dtype: str = "bf16",
    kv_dtype: str = "bf16",
    ssm_dtype: str = "fp32",
    activation_dtype: str = "bf16",
    quant: str | None = None,
    recipe: str = DEFAULT_RECIPE,
    tp: int = 1,
) -> MemoryPlan:
    """The memory `config` needs on each GPU of `target` for `batch` sequences of `context` tokens,
    under tensor parallelism `tp` (heads, channels and the head split; embeddings and norms whole);
    with `quant`, the weights `recipe` quantizes are in that format (see RECIPES), the rest at `weight_dtype`."""
    if context < 1 or batch < 1:
        raise ValueError(f"context and batch must be at least 1, got context={context}, batch={batch}")
    if family(config) == "decilm":
        return _plan_decilm(config, target, context, batch, weight_dtype, kv_dtype, activation_dtype, quant, tp)
    s = Shape.of(config)
    s.check_tp(tp)
    mamba_layers, attention_layers = s.pattern.count(MAMBA), s.pattern.count(ATTENTION)
    act = _bytes_of(activation_dtype)
    kv = attention_layers * 2 * s.kv_heads * s.head_dim * context * batch * _bytes_of(kv_dtype)
    ssm = mamba_layers * s.mamba_heads * s.mamba_head_dim * s.state * batch * _bytes_of(ssm_dtype)
    conv = mamba_layers * s.conv_dim * (s.conv_kernel - 1) * batch * act
    # One prefill call through the widest layer: its input, norm and residual, the projections, and
    # the chunk scan's per-chunk states (fp32, twice: the chunk states and the passed-on states).
    tokens = min(context, prefill_chunk(batch)) * batch
    mamba_width = (s.mamba_inner + s.conv_dim + s.mamba_heads) + s.conv_dim + 2 * s.mamba_inner if mamba_layers else 0
    widest = max(mamba_width, 2 * s.ffn if MLP in s.pattern else 0, (s.attention_heads + 2 * s.kv_heads) * s.head_dim)
    chunk_states = 2 * (tokens // 128 + 1) * s.mamba_heads * s.mamba_head_dim * s.state * 4 if mamba_layers else 0
    workspace = tokens * (widest / tp + 3 * s.hidden) * act + chunk_states / tp
    return MemoryPlan(
        weights=s.weight_bytes(weight_dtype, quant, recipe, tp),
        kv_cache=int(kv / tp),
        ssm_state=int(ssm / tp),
        conv_state=int(conv / tp),
        workspace=int(workspace),
        overhead=OVERHEAD_BYTES,
        usable=usable_bytes(target),
        context=context,
        batch=batch,
    )


def decilm_check_tp(config, tp: int) -> None:
    """Refuse a tensor-parallel size that does not divide the heads, a layer's KV heads or FFN width."""
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be at least 1, got {tp}")
    if config.heads % tp:
        raise ValueError(f"tensor-parallel size {tp} does not divide the {config.heads} attention heads")
    for i, b in enumerate(config.blocks):
        if b.attention == "gqa" and b.kv_heads % tp:
            raise ValueError(f"tensor-parallel size {tp} does not divide layer {i}'s {b.kv_heads} KV heads")
        if b.ffn == "gated" and b.intermediate % tp:
            raise ValueError(f"tensor-parallel size {tp} does not divide layer {i}'s FFN width {b.intermediate}")


def decilm_weight_bytes(config, dtype: str = "bf16", quant: str | None = None, tp: int = 1) -> int:
    """Bytes of a DeciLM's weights on one GPU of `tp`: every layer's linear weights split (in the `quant`
    format if given), the embeddings whole, the head split by vocabulary, norms whole."""
    per = _bytes_of(dtype)
    linear = quant_bytes(quant) if quant else per
    layers = sum(config.block_parameters(b)["attention"] + config.block_parameters(b)["ffn"] for b in config.blocks)
    norms = sum(config.block_parameters(b)["norms"] for b in config.blocks) + config.hidden
    head = 0 if config.tied else config.vocab * config.hidden / tp
    return int(layers / tp * linear + (config.vocab * config.hidden + head + norms) * per)


def _plan_decilm(config, target, context, batch, weight_dtype, kv_dtype, activation_dtype, quant, tp) -> MemoryPlan:
    from .decilm_config import DeciConfig

    c = config if isinstance(config, DeciConfig) else DeciConfig.of(config)
    decilm_check_tp(c, tp)
    act = _bytes_of(activation_dtype)
    kv = sum(2 * b.kv_heads // tp * c.head_dim for b in c.blocks if b.attention == "gqa") * context * batch
    tokens = min(context, prefill_chunk(batch)) * batch
    widest = max([2 * b.intermediate for b in c.blocks] + [(c.heads + 2 * max(b.kv_heads, 1)) * c.head_dim
                                                           for b in c.blocks])
    workspace = tokens * (widest / tp + 3 * c.hidden) * act + batch * c.vocab / tp * 4  # and the last logits, fp32
    return MemoryPlan(
        weights=decilm_weight_bytes(c, weight_dtype, quant, tp),
        kv_cache=int(kv * _bytes_of(kv_dtype)),
        ssm_state=0,
        conv_state=0,
        workspace=int(workspace),
        overhead=OVERHEAD_BYTES,
        usable=usable_bytes(target),
        context=context,
        batch=batch,
    )


def largest(fits_at, upper: int) -> int:
    """The largest n in 1..upper with `fits_at(n)` true (it is monotone), or 0 if none."""
    if not fits_at(1):
        return 0
    low, high = 1, upper
    while low < high:
        middle = (low + high + 1) // 2
        if fits_at(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class Fit:
    """A plan with what to change when it does not fit: the largest context and batch that do, and
    the quantizations (format, recipe) that fit at the asked context on this target's generation."""

    plan: MemoryPlan
    max_context: int
    max_batch: int
    quantizations: tuple[tuple[str, str], ...]

    @property
    def shortfall(self) -> int:
        """Bytes over the usable memory (0 when it fits)."""
        return max(0, self.plan.total - self.plan.usable)

    def advice(self) -> str:
        """One sentence on what would fit, for an error message."""
        options = []
        if self.max_context:
            options.append(f"a context of at most {self.max_context} tokens")
        if self.plan.batch > 1 and self.max_batch:
            options.append(f"a batch of at most {self.max_batch}")
        options += [f"--quant {q}" + (f" --recipe {r}" if r else "") for q, r in self.quantizations[:2]]
        return ("it would fit with " + " or ".join(options)) if options else "nothing fits this target; choose a larger GPU"


def fit(config: Any, target: str | float, context: int, batch: int = 1, max_context: int | None = None,
        **options) -> Fit:
    """`plan(...)` with the largest context (up to `max_context`) and batch that fit, and the
    quantizations that would make the asked context fit."""
    result = plan(config, target, context, batch, **options)
    best_context = largest(lambda n: plan(config, target, n, batch, **options).fits, max(max_context or context, context))
    best_batch = largest(lambda n: plan(config, target, context, n, **options).fits, 4096)
    arch = ARCHITECTURES.get(str(target).lower())
    recipes = (None,) if family(config) == "decilm" else RECIPES  # a DeciLM quantizes every layer's linears: no recipe
    quantizations = tuple(
        (quant, recipe) for recipe in recipes for quant, (_, archs) in QUANT_FORMATS.items()
        if (arch is None or arch in archs) and quant != options.get("quant")
        and plan(config, target, context, batch, **dict(options, quant=quant, recipe=recipe or DEFAULT_RECIPE)).fits
    )
    return Fit(result, best_context, best_batch, quantizations)


def jetson_plan(config: Any, board: str, context: int, batch: int = 1, precision: str = "fp16",
                ssm_dtype: str = "fp32") -> MemoryPlan:
    """`plan` for a Jetson route: the linear layers at `precision`, the rest of the weights, the KV
    cache and activations in fp16, the SSM state in `ssm_dtype` (fp32 on the ONNX route; TensorRT
    Edge-LLM keeps it in fp16)."""
    if family(config) == "decilm":  # no embedding split here: every weight at the precision
        return plan(config, board, context, batch, weight_dtype=precision, kv_dtype="fp16", activation_dtype="fp16")
    base = plan(config, board, context, batch, weight_dtype="fp16", kv_dtype="fp16", ssm_dtype=ssm_dtype,
                activation_dtype="fp16")
    if precision == "fp16":
        return base
    groups = Shape.of(config).parameter_groups()
    weights = sum(n * _bytes_of(precision if name in JETSON_QUANTIZED else "fp16") for name, n in groups.items())
    return replace(base, weights=int(weights))


def jetson_options(config: Any, batch: int = 1, ssm_dtype: str = "fp32") -> list[dict]:
    """For every Jetson board and each precision it runs: the weights (`jetson_plan`), and the
    longest context that fits for `batch` sequences (0: none)."""
    limit = _get(config, "max_position_embeddings") or 131072
    rows = []
    for board in (name for name in TARGETS if name.startswith(("orin", "thor"))):
        for precision in JETSON_PRECISIONS[ARCHITECTURES[board]]:
            at = lambda n: jetson_plan(config, board, n, batch, precision, ssm_dtype)  # noqa: E731
            longest = largest(lambda n: at(n).fits, limit)
            rows.append(dict(board=board, usable_gib=TARGETS[board], precision=precision,
                             weights_gib=round(at(1).weights / GIB, 2), max_context=longest,
                             full_context=longest == limit))
    return rows


# Bytes per vocabulary entry and slot that an engine's decode step holds beside the model: the fp32
# logits, the sampler's probabilities, their sorted copy and order, its noise and the race.
SAMPLER_BYTES_PER_LOGIT = 32


def engine_plan(config: Any, target: str | float, context: int, slots: int, prefix_cache: int = 0,
                prefill_rows: int = PREFILL_ROWS, **options) -> MemoryPlan:
    """The memory of a continuous-batching engine (`nano.engine`): `slots` request slots of `context`
    tokens each (KV, SSM and conv state); one prefill call of one chunk's tokens, with, where it
    prefills up to `prefill_rows` prompts together, their state before it moves into their slots and
    the caches and graphs of its short-prompt buckets;
    the decode step's logits and sampler for every slot; and `prefix_cache` bytes of prefix
    snapshots (counted with the overhead)."""
    full = plan(config, target, context, slots, **options)
    full = replace(full, kv_cache=full.kv_cache * cache_columns(context + 1) // context)  # what the engine allocates
    one = plan(config, target, context, 1, **options)
    vocab = int(_get(config, "vocab_size"))
    workspace = one.workspace + slots * vocab * SAMPLER_BYTES_PER_LOGIT
    rows = min(prefill_rows, slots)
    if rows > 1:  # one prompt alone goes straight into its slot
        together = plan(config, target, 1, rows, **options)
        workspace += one.kv_cache * min(context, PREFILL_CHUNK) / context + together.ssm_state + together.conv_state
        # Short prompts prefill in buckets (`HybridRuntime.bucket_prefills`) on caches of their own, each
        # bucket's graph in one shared pool as large as the largest call, holding its logits (fp32) too.
        held = plan(config, target, cache_columns(max(PREFILL_BUCKET_WIDTHS) + 1), rows, **options)
        workspace += held.kv_cache + held.ssm_state + held.conv_state
        workspace += plan(config, target, PREFILL_BUCKET_TOKENS, 1, **options).workspace
        workspace += sum(r for r, _ in prefill_buckets(rows)) * vocab * 4
    return replace(full, workspace=int(workspace), overhead=full.overhead + int(prefix_cache))


def engine_slots(config: Any, target: str | float, context: int, prefix_cache: int = 0, most: int = 64,
                 prefill_rows: int = PREFILL_ROWS, **options) -> int:
    """The most request slots (up to `most`) of `context` tokens an engine can hold on `target`; 0 if
    not even one fits."""
    return largest(lambda n: engine_plan(config, target, context, n, prefix_cache, prefill_rows, **options).fits,
                   most)


def engine_size(config: Any, target: str | float, context: int, prefix_cache: int = 0, most: int = 64,
                **options) -> tuple[int, int]:
    """(slots, prefill_rows) for an engine on `target`: prompts prefilled PREFILL_ROWS at a time,
    unless prefilling them one at a time leaves room for more slots (a slot more is worth more)."""
    batched = engine_slots(config, target, context, prefix_cache, most, PREFILL_ROWS, **options)
    alone = engine_slots(config, target, context, prefix_cache, most, 1, **options)
    return (alone, 1) if alone > batched else (batched, PREFILL_ROWS)
