"""The TensorRT-LLM checkpoint of a Llama-Nemotron NAS (DeciLM) model, split for tensor parallelism.

What `trtllm-build` reads for `DeciLMForCausalLM` (the classic engine path, which still serves
Ultra): a `config.json` with the architecture, dtype, `mapping` and one `layer_configs` entry per
layer, and one `rank{N}.safetensors` per rank. Per rank r of tp (TensorRT-LLM's nemotron_nas
converter does the same):

    transformer.vocab_embedding.weight       whole (use_parallel_embedding false)
    transformer.layers.{i}.input_layernorm   whole
    transformer.layers.{i}.attention.qkv     rows [q_r; k_r; v_r]: this rank's query and KV heads (column-parallel)
    transformer.layers.{i}.attention.dense   o_proj's columns of this rank's heads (row-parallel: partial sums)
    transformer.layers.{i}.attention.weight  a linear attention's output rows r (column-parallel, gathered)
    transformer.layers.{i}.post_layernorm    whole
    transformer.layers.{i}.ffn.fc / .gate    gate_proj / up_proj rows r (column-parallel)
    transformer.layers.{i}.ffn.proj          down_proj columns r (row-parallel: partial sums)
    transformer.layers.{i}.ffn.weight        a linear FFN's output rows r (column-parallel, gathered)
    transformer.ln_f.weight                  whole
    lm_head.weight                           vocabulary rows r, zero-padded to a multiple of tp

No-op sub-blocks have no tensors. Tensors are read slice by slice from the Hugging Face safetensors,
so a rank costs its own share of memory, not the whole model's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from nano.decilm_config import GATED, GQA, LINEAR, NONE, DeciConfig
from nano.hardware import round_up
from nano.memory import decilm_check_tp

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Reads a Hugging Face tensor by name, only rows (dim 0) or columns (dim 1) [start, stop) when given.
Reader = Callable[[str, int | None, int, int], torch.Tensor]


def padded_vocab(vocab: int, tp: int) -> int:
    return round_up(vocab, tp)


def trtllm_config(config: DeciConfig, raw: dict, dtype: str, tp: int) -> dict:
    """The checkpoint's config.json."""
    attention_impl = {GQA: "attention", LINEAR: "linear", NONE: "no_op"}
    ffn_impl = {GATED: "mlp", LINEAR: "linear", NONE: "no_op"}
    layers = [{"attention": {"impl": attention_impl[b.attention], "num_key_value_heads": b.kv_heads or None},
               "ffn": {"impl": ffn_impl[b.ffn], "intermediate_size": b.intermediate or None}} for b in config.blocks]
    return {
        "architecture": "DeciLMForCausalLM",
        "dtype": dtype,
        "vocab_size": config.vocab,
        "hidden_size": config.hidden,
        "num_hidden_layers": len(config.blocks),
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.heads,  # per layer in layer_configs; this is only the fallback
        "head_size": config.head_dim,
        "intermediate_size": max([b.intermediate for b in config.blocks] + [4 * config.hidden]),
        "hidden_act": raw.get("hidden_act", "silu"),
        "norm_epsilon": config.eps,
        "logits_dtype": "float32",
        "max_position_embeddings": config.max_positions,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": config.rope_theta,
        "rotary_scaling": config.rope_scaling,
        "mapping": {"world_size": tp, "tp_size": tp, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "qk_layernorm": False,
        "layer_configs": layers,
    }


def rank_tensors(read: Reader, config: DeciConfig, tp: int, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of rank `rank` of `tp`, with TensorRT-LLM's names."""
    decilm_check_tp(config, tp)

    def part(name: str, dim: int | None = None, size: int | None = None) -> torch.Tensor:
        if dim is None:
            return read(name, None, 0, 0).to(dtype)
        share = size // tp
        return read(name, dim, rank * share, (rank + 1) * share).to(dtype)

    h, d = config.hidden, config.head_dim
    out = {"transformer.vocab_embedding.weight": part("model.embed_tokens.weight"),
           "transformer.ln_f.weight": part("model.norm.weight")}
    head_name = "model.embed_tokens.weight" if config.tied else "lm_head.weight"
    head = read(head_name, None, 0, 0).to(dtype)
    vocab = padded_vocab(config.vocab, tp)
    if vocab != config.vocab:
        head = torch.cat([head, head.new_zeros(vocab - config.vocab, h)])
    share = vocab // tp
    out["lm_head.weight"] = head[rank * share : (rank + 1) * share].clone()
    for i, b in enumerate(config.blocks):
        hf, trt = f"model.layers.{i}.", f"transformer.layers.{i}."
        if b.attention != NONE:
            out[trt + "input_layernorm.weight"] = part(hf + "input_layernorm.weight")
        if b.attention == GQA:
            q = part(hf + "self_attn.q_proj.weight", 0, config.heads * d)
            k = part(hf + "self_attn.k_proj.weight", 0, b.kv_heads * d)
            v = part(hf + "self_attn.v_proj.weight", 0, b.kv_heads * d)
            out[trt + "attention.qkv.weight"] = torch.cat([q, k, v])
            out[trt + "attention.dense.weight"] = part(hf + "self_attn.o_proj.weight", 1, config.heads * d)
        elif b.attention == LINEAR:
            out[trt + "attention.weight"] = part(hf + "self_attn.linear_attn.weight", 0, h)
        if b.ffn != NONE:
            out[trt + "post_layernorm.weight"] = part(hf + "post_attention_layernorm.weight")
        if b.ffn == GATED:
            out[trt + "ffn.fc.weight"] = part(hf + "mlp.gate_proj.weight", 0, b.intermediate)
            out[trt + "ffn.gate.weight"] = part(hf + "mlp.up_proj.weight", 0, b.intermediate)
            out[trt + "ffn.proj.weight"] = part(hf + "mlp.down_proj.weight", 1, b.intermediate)
        elif b.ffn == LINEAR:
            out[trt + "ffn.weight"] = part(hf + "mlp.linear_mlp.weight", 0, h)
    return {k: v.contiguous() for k, v in out.items()}


def safetensors_reader(folder: Path) -> Reader:
    """Reads tensors (or just their row or column slices) from a Hugging Face checkpoint folder."""
    from safetensors import safe_open

    from nano.checkpoint import checkpoint_tensors

    where = {name: folder / file for name, (file, _) in checkpoint_tensors(folder).items()}
    handles = {}

    def read(name: str, dim: int | None, start: int, stop: int) -> torch.Tensor:
        file = where[name]
        if file not in handles:
            handles[file] = safe_open(str(file), framework="pt")
        view = handles[file].get_slice(name)
        if dim is None:
            return view[:]
        return view[start:stop] if dim == 0 else view[:, start:stop]

    return read


def write_trtllm_checkpoint(model: Path, out: Path, config: DeciConfig, raw: dict, tp: int, dtype: str = "bfloat16",
                            progress: bool = False) -> list[Path]:
    """config.json and rank{N}.safetensors for every rank into `out` (an existing, empty folder)."""
    import json

    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    read = safetensors_reader(Path(model))
    (out / "config.json").write_text(json.dumps(trtllm_config(config, raw, dtype, tp), indent=2) + "\n")
    files = []
    for rank in tqdm(range(tp), desc="ranks", unit="rank", disable=not progress):
        path = out / f"rank{rank}.safetensors"
        save_file(rank_tensors(read, config, tp, rank, DTYPES[dtype]), path, metadata={"format": "pt"})
        files.append(path)
    return files
