"""The tables the planner and the exporters share: where a model may run and in which number formats.

GPUs and Jetson boards with the memory a deployment may use and their generation; the bytes of each
number format; the quantization formats and the generations with kernels for them; the recipes (which
parameter groups a quantization takes); what each Jetson generation runs; and the runtime's prefill
limits. Data only: `nano.memory` is the arithmetic over them.
"""

from __future__ import annotations

# Bytes per value. Quantized weights carry a scale per group of 128 (int4) or 16 (nvfp4) values.
DTYPE_BYTES = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5 + 2 / 128,
    "nvfp4": 0.5 + 1 / 16,
}

# Memory a deployment may use on each target (GiB): the card's memory less what the CUDA context,
# the driver and a display or the OS (on Jetson, where memory is shared) keep.
TARGETS = {
    "a10g": 22.0,
    "l4": 22.0,
    "l40s": 44.0,
    "rtx4090": 22.0,
    "a100-40": 38.0,
    "a100-80": 77.0,
    "h100": 77.0,
    "h200": 137.0,
    "orin-8": 5.5,
    "orin-16": 12.5,
    "orin-32": 27.0,
    "orin-64": 56.0,
    "thor": 110.0,
}

# The GPU generation of each target, which decides the quantized formats it has kernels for.
ARCHITECTURES = {
    "a10g": "ampere", "l4": "ada", "l40s": "ada", "rtx4090": "ada", "a100-40": "ampere", "a100-80": "ampere",
    "h100": "hopper", "h200": "hopper", "orin-8": "ampere", "orin-16": "ampere", "orin-32": "ampere",
    "orin-64": "ampere", "thor": "blackwell",
}

# Quantized formats: the bytes of their weights (a DTYPE_BYTES key) and the generations that run them
# (FP8 tensor cores from Ada on, FP4 on Blackwell; INT4 AWQ is weight-only and runs on Ampere too).
QUANT_FORMATS = {
    "fp8": ("fp8", ("ada", "hopper", "blackwell")),
    "int4_awq": ("int4", ("ampere", "ada", "hopper", "blackwell")),
    "nvfp4": ("nvfp4", ("blackwell",)),
}

# The parameter groups each recipe quantizes. "mamba-mlp" is the recipe of NVIDIA's published Nano 2
# FP8 and NVFP4 checkpoints: the Mamba projections and the MLPs quantized, attention, the conv,
# embeddings and the head kept in 16 bits. "mlp" quantizes the MLPs alone (modelopt's conservative
# Mamba preset).
RECIPES = {
    "mamba-mlp": ("mlp", "mamba_in_proj", "mamba_out_proj"),
    "mlp": ("mlp",),
}
DEFAULT_RECIPE = "mamba-mlp"

# What each Jetson generation runs (Orin: no FP8; Thor, Blackwell: FP8 and FP4 too), most precise first.
JETSON_PRECISIONS = {"ampere": ("fp16", "int8", "int4"), "blackwell": ("fp16", "fp8", "int4", "nvfp4")}
# What a Jetson route stores at the precision: every linear layer but the head. The embeddings, the head,
# the norms and the conv stay in fp16 (nanokit's ONNX INT4 and TensorRT Edge-LLM's quantizer alike).
JETSON_QUANTIZED = ("mamba_in_proj", "mamba_out_proj", "attention", "mlp")

PREFILL_CHUNK = 4096
PREFILL_ROWS = 8  # the most fresh prompts the engine prefills together in one call
# The shapes of short prefills (`HybridRuntime.bucket_prefills`): widths, and the most tokens of one.
PREFILL_BUCKET_WIDTHS = (16, 32, 64, 128, 256)
PREFILL_BUCKET_TOKENS = 1024
# Tokens of one prefill call over all rows: mamba-ssm's Triton chunk scan indexes its inputs with 32-bit
# offsets, and the Mamba in_proj output (22656 wide at the Nano shapes) passes 2**31 past 94k tokens.
PREFILL_TOKENS = 65536


def prefill_chunk(rows: int, chunk: int = PREFILL_CHUNK) -> int:
    """Tokens per row in one prefill call: `chunk`, fewer when `rows` of it would pass PREFILL_TOKENS
    (a multiple of the scan's 128-token chunks, at least one)."""
    return max(128, min(chunk, PREFILL_TOKENS // rows // 128 * 128))


def powers_of_two(limit: int) -> list[int]:
    """1, 2, 4, ... up to `limit`, and `limit` itself: the sizes a batch of up to `limit` rows is padded to."""
    return sorted({1 << k for k in range(limit.bit_length()) if 1 << k <= limit} | {limit})


def prefill_buckets(rows: int) -> list[tuple[int, int]]:
    """The (rows, width) shapes that short prefills of up to `rows` prompts are padded to, smallest
    first: rows a power of two (or `rows`), widths PREFILL_BUCKET_WIDTHS, at most PREFILL_BUCKET_TOKENS."""
    return [(r, w) for r in powers_of_two(rows) for w in PREFILL_BUCKET_WIDTHS if r * w <= PREFILL_BUCKET_TOKENS]


# The KV caches' width is a multiple of this many columns: with a width of 1025 (the engine's context
# and its scratch column) cuBLAS ran the decode attention's matmuls on unaligned fallbacks, 1.7 ms of
# a 13.4 ms step at 64 slots on an H200 (bench/results/profile-engine-step-nano-9b-v2-64-h200-unaligned.json).
CACHE_ALIGN = 64


def round_up(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def cache_columns(capacity: int) -> int:
    """The width of KV caches for sequences of up to `capacity` tokens: capacity rounded up to a
    multiple of CACHE_ALIGN. The columns past the capacity are never attended to."""
    return round_up(capacity, CACHE_ALIGN)
