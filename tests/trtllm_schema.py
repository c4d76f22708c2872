"""What TensorRT-LLM accepts, written down from its sources, for testing the files we write against it.

TensorRT-LLM is not installable here, so its option schema is mirrored: the keys and types of
`TorchLlmArgs`, `KvCacheConfig` and `CudaGraphConfig` in `tensorrt_llm/llmapi/llm_args.py` that exist
both in the 1.0/1.1 releases and on main (all of them pydantic models with `extra="forbid"`: an
unknown key is an error), the `trtllm-serve` flags of `tensorrt_llm/commands/serve.py` spelled the
same in both, and how `QuantConfig.is_module_excluded_from_quantization` matches `exclude_modules`
(fnmatch on TensorRT-LLM's module names, after NemotronH's loader renames `backbone` to `model`).
"""

from __future__ import annotations

import fnmatch
import re

MAMBA_SSM_CACHE_DTYPES = ("auto", "float16", "bfloat16", "float32")

CUDA_GRAPH_CONFIG = {"batch_sizes": list, "max_batch_size": int, "enable_padding": bool}

KV_CACHE_CONFIG = {
    "enable_block_reuse": bool,
    "max_tokens": int,
    "max_attention_window": list,
    "sink_token_length": int,
    "free_gpu_memory_fraction": float,
    "host_cache_size": int,
    "onboard_blocks": bool,
    "cross_kv_cache_fraction": float,
    "secondary_offload_min_priority": int,
    "event_buffer_max_size": int,
    "enable_partial_reuse": bool,
    "copy_on_partial_reuse": bool,
    "dtype": str,
    "mamba_ssm_cache_dtype": str,
}

TORCH_LLM_ARGS = {
    "model": str,
    "tokenizer": str,
    "trust_remote_code": bool,
    "dtype": str,
    "tensor_parallel_size": int,
    "pipeline_parallel_size": int,
    "max_batch_size": int,
    "max_num_tokens": int,
    "max_seq_len": int,
    "max_input_len": int,
    "max_beam_width": int,
    "enable_chunked_prefill": bool,
    "kv_cache_config": KV_CACHE_CONFIG,
    "cuda_graph_config": CUDA_GRAPH_CONFIG,
    "disable_overlap_scheduler": bool,
    "enable_attention_dp": bool,
    "reasoning_parser": str,
    "backend": str,
}

# trtllm-serve flags spelled the same in 1.0 and on main.
SERVE_FLAGS = {"--host", "--port", "--backend", "--max_batch_size", "--max_num_tokens", "--max_seq_len", "--tp_size",
               "--pp_size", "--kv_cache_free_gpu_memory_fraction", "--extra_llm_api_options", "--trust_remote_code",
               "--tokenizer", "--reasoning_parser", "--custom_module_dirs"}
# --reasoning_parser is a click.Choice over the parsers registered in tensorrt_llm/llmapi/reasoning_parser.py;
# in the 1.2 line: "deepseek-r1", "qwen3" (both DeepSeekR1Parser, reasoning at the start or after a <think>)
# and "nano-v3" (NemotronV3ReasoningParser: reasoning at the start unless chat_template_kwargs.enable_thinking
# is false). --custom_module_dirs imports each folder as a package, its parent put on sys.path
# (tensorrt_llm/tools/importlib_utils.py, import_custom_module_from_dir).
REASONING_PARSERS = {"deepseek-r1", "qwen3", "nano-v3"}


# trtllm-build flags (tensorrt_llm/commands/build.py and its plugin arguments).
BUILD_FLAGS = {"--checkpoint_dir", "--output_dir", "--max_batch_size", "--max_input_len", "--max_seq_len",
               "--max_beam_width", "--max_num_tokens", "--opt_num_tokens", "--kv_cache_type", "--workers",
               "--logits_dtype", "--gemm_plugin", "--gpt_attention_plugin", "--context_fmha", "--use_paged_context_fmha",
               "--remove_input_padding", "--tokens_per_block"}

# Keyword arguments of the classic checkpoint's DeciConfig (tensorrt_llm/models/nemotron_nas/config.py).
DECI_CONFIG_KEYS = {"architecture", "dtype", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                    "hidden_act", "logits_dtype", "norm_epsilon", "position_embedding_type", "rotary_base",
                    "rotary_scaling", "max_position_embeddings", "num_key_value_heads", "intermediate_size", "mapping",
                    "quantization", "use_parallel_embedding", "embedding_sharding_dim", "head_size", "qk_layernorm",
                    "layer_configs", "block_configs"}
LAYER_CONFIG = {"attention": {"impl": ("attention", "linear", "no_op"), "num_key_value_heads": int},
                "ffn": {"impl": ("mlp", "linear", "no_op"), "intermediate_size": int}}


def validate(options: dict, schema: dict = TORCH_LLM_ARGS, where: str = "") -> list[str]:
    """Problems TensorRT-LLM's pydantic models would raise for `options` (an empty list: none)."""
    problems = []
    for key, value in options.items():
        if key not in schema:
            problems.append(f"{where}{key}: extra inputs are not permitted")
            continue
        expected = schema[key]
        if isinstance(expected, dict):
            if not isinstance(value, dict):
                problems.append(f"{where}{key}: expected a mapping")
            else:
                problems += validate(value, expected, f"{where}{key}.")
        elif value is not None and not (isinstance(value, expected) and not (expected is int and isinstance(value, bool))):
            if not (expected is float and isinstance(value, int) and not isinstance(value, bool)):
                problems.append(f"{where}{key}: expected {expected.__name__}, got {value!r}")
    kv = options.get("kv_cache_config", {}) if schema is TORCH_LLM_ARGS else {}
    if kv.get("mamba_ssm_cache_dtype", "auto") not in MAMBA_SSM_CACHE_DTYPES:
        problems.append(f"kv_cache_config.mamba_ssm_cache_dtype: {kv['mamba_ssm_cache_dtype']!r} not allowed")
    fraction = kv.get("free_gpu_memory_fraction")
    if fraction is not None and not 0 <= fraction <= 1:
        problems.append(f"kv_cache_config.free_gpu_memory_fraction: {fraction} outside [0, 1]")
    return problems


def trtllm_name(checkpoint_name: str) -> str:
    """A checkpoint module name as TensorRT-LLM's NemotronH names the module (its weight mapper)."""
    return checkpoint_name.replace("backbone", "model").replace("embeddings", "embed_tokens")


def is_excluded(module: str, exclude_modules: list[str]) -> bool:
    """TensorRT-LLM's test: after NemotronH rewrites `backbone` in the patterns, fnmatch on the full name."""
    patterns = [re.sub(r"(model\.layers\.)?backbone", "model", p) for p in exclude_modules]
    return any(fnmatch.fnmatchcase(module, p) for p in patterns)
