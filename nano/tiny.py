"""Tiny checkpoints built on the spot (to try a pipeline offline, and for the tests), and nano-tiny's tokenizer.

The tokenizer is byte-level (every text encodes, every id decodes) with the special tokens of the
Nano 2 chat format; the chat template follows Nano 2's. The model has all three layer kinds in a
pattern shaped like the 12B's, scaled down to run in milliseconds on a CPU. Its weights are
random: what it writes is noise, but every code path that a real checkpoint takes is taken.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .atomic import atomic_dir

SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>",
    "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>",
    "<think>", "</think>", "<TOOLCALL>", "</TOOLCALL>",
]
END_OF_TURN = "<SPECIAL_12>"

# Both templates end alike: earlier assistant turns without their reasoning, and the assistant turn opened
# with `<think>\n` (reasoning on) or an empty `<think></think>`.
_TEMPLATE_TAIL = (
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '<SPECIAL_11>Assistant\\n' + m['content'].split('</think>')[-1].strip() + '\\n<SPECIAL_12>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<SPECIAL_11>Assistant\\n' + ('<think>\\n' if ns.think else '<think></think>') -}}"
    "{%- endif -%}"
)

# Modelled on Nemotron Nano 2's template: a System header always, `/think` and `/no_think` read from
# system and user turns (the last one wins) and removed from the text, reasoning of earlier
# assistant turns dropped, and the assistant turn opened with `<think>\n` or an empty `<think></think>`.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(think=true) -%}"
    "{%- for m in messages -%}{%- if m['role'] in ['system', 'user'] -%}"
    "{%- if '/no_think' in m['content'] -%}{%- set ns.think = false -%}"
    "{%- elif '/think' in m['content'] -%}{%- set ns.think = true -%}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<SPECIAL_10>System\\n' + messages[0]['content'].replace('/no_think', '').replace('/think', '').strip() + '\\n' -}}"
    "{%- set turns = messages[1:] -%}"
    "{%- else -%}{{- '<SPECIAL_10>System\\n\\n' -}}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<SPECIAL_11>User\\n' + m['content'].replace('/no_think', '').replace('/think', '').strip() + '\\n' -}}"
    + _TEMPLATE_TAIL
)

TINY_CONFIG = dict(
    hybrid_override_pattern="M-M*-M-",
    vocab_size=288,  # a little more than the tokenizer's 267, as real checkpoints pad their vocabulary
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    mamba_num_heads=8,
    mamba_head_dim=16,
    n_groups=2,
    ssm_state_size=16,
    conv_kernel=4,
    chunk_size=16,
    max_position_embeddings=4096,
    initializer_range=0.2,  # larger than trained models use, so that greedy choices are clear-cut
    layer_norm_epsilon=1e-5,
)


def tiny_tokenizer(model_max_length: int = TINY_CONFIG["max_position_embeddings"]):
    """A byte-level tokenizer with the Nano 2 special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + i for i, symbol in enumerate(byte_symbols)})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token=END_OF_TURN,
        pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
    )


def tiny_config(**overrides):
    from transformers import NemotronHConfig

    tokenizer_ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    fields = dict(TINY_CONFIG, **overrides)
    fields.setdefault("bos_token_id", tokenizer_ids["<s>"])
    fields.setdefault("eos_token_id", [tokenizer_ids[END_OF_TURN], tokenizer_ids["</s>"]])
    fields.setdefault("pad_token_id", tokenizer_ids["<pad>"])
    return NemotronHConfig(**fields)


def build_tiny_checkpoint(path: str | os.PathLike, seed: int = 0, overwrite: bool = False, **overrides) -> Path:
    """Write a tiny random-weight NemotronH checkpoint folder at `path` (all at once)."""
    from transformers import NemotronHForCausalLM

    from .checkpoint import write_checkpoint

    config = tiny_config(**overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = NemotronHForCausalLM(config)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, model, tiny_tokenizer())
    return Path(path)


# A Llama-Nemotron (Ultra, Super) style template: the system prompt verbatim, where "detailed thinking
# on" or "off" switches reasoning; with it on, the assistant turn opens `<think>\n`.
ULTRA_CHAT_TEMPLATE = (
    "{%- set ns = namespace(think=false) -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set ns.think = 'detailed thinking on' in messages[0]['content'] -%}"
    "{{- '<SPECIAL_10>System\\n' + messages[0]['content'] + '\\n' -}}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- if m['role'] == 'user' -%}{{- '<SPECIAL_11>User\\n' + m['content'] + '\\n' -}}"
    + _TEMPLATE_TAIL
)

# Every block kind of the family: GQA with two group sizes, a linear attention, a no-op attention;
# gated FFNs of two widths, a linear FFN, a no-op FFN.
TINY_DECILM_BLOCKS = [
    {"attention": {"n_heads_in_group": 2}, "ffn": {"ffn_mult": 1.5}},
    {"attention": {"no_op": True}, "ffn": {"ffn_mult": 3.0}},
    {"attention": {"replace_with_linear": True}, "ffn": {"replace_with_linear": True}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 1}, "ffn": {"ffn_mult": 1.0}},
    {"attention": {"no_op": True}, "ffn": {"no_op": True}},
]


def tiny_decilm_config(**overrides) -> dict:
    """config.json of a tiny Llama-Nemotron NAS (DeciLM) model with every block kind."""
    ids = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    blocks = overrides.pop("block_configs", TINY_DECILM_BLOCKS)
    return {
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas", "vocab_size": 288, "hidden_size": 64,
        "num_attention_heads": 8, "head_dim": 16, "num_hidden_layers": len(blocks), "block_configs": blocks,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 512},
        "bos_token_id": ids["<s>"], "eos_token_id": [ids[END_OF_TURN], ids["</s>"]], "torch_dtype": "float32",
        **overrides,
    }


def build_tiny_decilm_checkpoint(path: str | os.PathLike, seed: int = 0, overwrite: bool = False, std: float = 0.2,
                                 **overrides) -> Path:
    """Write a tiny random-weight DeciLM checkpoint folder (config.json, model.safetensors, tokenizer)."""
    import json

    from safetensors.torch import save_file

    from .checkpoint import complete_checkpoint
    from .decilm import DeciConfig, DeciLMForCausalLM

    config = tiny_decilm_config(**overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DeciLMForCausalLM(DeciConfig.of(config))
        for name, p in model.named_parameters():
            with torch.no_grad():
                p.copy_(torch.ones_like(p) + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else std * torch.randn_like(p))
    tokenizer = tiny_tokenizer(config["max_position_embeddings"])
    tokenizer.chat_template = ULTRA_CHAT_TEMPLATE
    with atomic_dir(path, overwrite=overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        complete_checkpoint(tmp)
    return Path(path)
