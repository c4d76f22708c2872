"""The bundles against what TensorRT-LLM 1.2.1 reads, with the transformers it pins (4.57.3) itself.

The list of what it reads, with where in its sources each item is read, is test data:
tests/data/trtllm_1_2_1_reads.json (read with the search tools; the 1.2.1 tag is commit 376f7e1 by
the Triton backend's submodule pin, whose files the index does not hold: the files were read at
1.2.0rc2, b35ac1b6, and at stored versions before and after it, each named there). Each bundle's
checkpoint is read in a virtual environment with transformers 4.57.3 (tests/other_envs.py) the way
the PyTorch backend reads it (tests/trtllm_config_probe.py), through this project's configuration
code and through TensorRT-LLM's empty stand-in config alike, and every attribute on the list must
come back with the value transformers 5 reads from the source checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nano.cli import main
from nano.tiny import build_tiny_checkpoint
from other_envs import TRANSFORMERS_4, python_with, run_in

DATA = Path(__file__).parent / "data"
READS = json.loads((DATA / "trtllm_1_2_1_reads.json").read_text())
PROBE = Path(__file__).with_name("trtllm_config_probe.py")
MESSAGES = [{"role": "user", "content": "What is 12 + 7?"}]
SHAPE = dict(hybrid_override_pattern="M-M*-M-", hidden_size=128, intermediate_size=192, mamba_num_heads=8,
             mamba_head_dim=16, n_groups=2, head_dim=48)  # head_dim != hidden / heads, as in the 9B


def nemotron_h_attributes(pattern: str) -> list[str]:
    """What TensorRT-LLM's NemotronH reads for a model with these layers (MoE and MTP reads only with them)."""
    conditional = {"moe_intermediate_size", "moe_latent_size", "mlp_bias", "n_group", "n_routed_experts",
                   "n_shared_experts", "num_experts_per_tok", "routed_scaling_factor",
                   "moe_shared_expert_intermediate_size", "topk_group", "num_nextn_predict_layers",
                   "mtp_hybrid_override_pattern"}
    skip = {"auto_map", "model_type", "quantization_config", "rope_scaling"}  # checked apart, or absent here
    names = [a["name"] for a in READS["nemotron_h"]["config_attributes"]
             if a["name"] not in skip and (a["name"] not in conditional or "E" in pattern)]
    assert {"rms_norm_eps", "layer_norm_epsilon", "hybrid_override_pattern", "num_hidden_layers", "head_dim",
            "tie_word_embeddings", "torch_dtype", "n_groups", "chunk_size"} <= set(names)
    return names


@pytest.fixture(scope="module")
def transformers4():
    return python_with("transformers-4.57.3", TRANSFORMERS_4)


def probe(python: Path, folder: Path, names: list[str]) -> dict:
    done = run_in(python, PROBE.read_text(), str(folder), json.dumps(names), json.dumps(MESSAGES))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["transformers"] == "4.57.3"
    return report


def _truth(source: Path, name: str):
    """What transformers 5 reads from the source checkpoint, in the probe's plain form."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    if name == "rms_norm_eps":
        name = "layer_norm_epsilon"  # transformers 5 has the one name
    value = config.dtype if name == "torch_dtype" else getattr(config, name)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, (list, tuple)):
        return ["inf" if isinstance(v, float) and math.isinf(v) else v for v in value]
    return value


def check_nemotron_h_bundle(python: Path, bundle: Path, source: Path) -> dict:
    checkpoint = bundle / "checkpoint"
    config = json.loads((checkpoint / "config.json").read_text())
    names = nemotron_h_attributes(config["hybrid_override_pattern"])
    report = probe(python, checkpoint, names)
    for trust, how in (("True", "this project's configuration code"), ("False", "TensorRT-LLM's stand-in config")):
        read = report["configs"][trust]
        assert "error" not in read, f"{how}: {read.get('error')}"
        assert not read["missing"], f"{how}: missing {read['missing']}"
        assert "eps_error" not in read, read.get("eps_error")
        for name in names:
            # transformers 5 on the bundle's own checkpoint; on the source too but for the dtype (bf16 here)
            got, want = read["values"][name], _truth(checkpoint, name)
            if name == "torch_dtype":
                got = str(got).removeprefix("torch.")
            else:
                assert want == _truth(source, name), f"the bundle changed {name}"
            assert got == want, f"{how}: {name} is {got!r}, transformers 5 reads {want!r}"
    assert report["configs"]["True"]["class"].endswith("configuration_nemotron_h.NemotronHConfig")
    assert report["configs"]["False"]["class"].endswith("_StubNemotronHConfig")
    return report


def check_tokenizer(report: dict, source: Path) -> None:
    import nano

    tokenizer = report["tokenizer"]
    assert "error" not in tokenizer, tokenizer.get("error")
    assert tokenizer["class"] == "PreTrainedTokenizerFast"
    loaded = nano.load(source, device="cpu")
    text = loaded.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tokenizer["prompt"] == text and tokenizer["prompt_ids"] == loaded.chat.encode(text)
    # The default skip_special_tokens keeps the tags, for the reasoning parser to split on.
    assert tokenizer["decoded"] == "<think>\nstep\n</think>\nanswer"
    assert tokenizer["eos_token_id"] == loaded.tokenizer.eos_token_id
    assert "error" not in report["generation_config"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("compat") / "tiny", seed=2, **SHAPE)


def test_a_bf16_bundle_reads_in_transformers_4(transformers4, tiny, tmp_path):
    bundle = tmp_path / "bundle"
    assert main(["export", "trtllm", "--model", str(tiny), "--gpu", "a10g", "--context", "4096", "--batch", "2",
                 "--out", str(bundle)]) == 0
    report = check_nemotron_h_bundle(transformers4, bundle, tiny)
    check_tokenizer(report, tiny)
    read = report["configs"]["True"]["values"]
    assert read["head_dim"] == 48 != read["hidden_size"] // read["num_attention_heads"]
    assert read["num_hidden_layers"] == len(read["hybrid_override_pattern"]) == 7
    assert read["tie_word_embeddings"] is False


def test_the_shipped_nano_tiny_in_a_tensor_parallel_bundle(transformers4, tmp_path):
    from nano.shipped import resolve

    bundle = tmp_path / "tp2"
    assert main(["export", "trtllm", "--model", "nano-tiny", "--gpu", "l4", "--tp", "2", "--context", "8192",
                 "--out", str(bundle)]) == 0
    source = resolve("nano-tiny")
    report = check_nemotron_h_bundle(transformers4, bundle, source)
    check_tokenizer(report, source)


def test_a_quantized_bundle_reads_in_transformers_4(transformers4, tiny, tmp_path):
    pytest.importorskip("modelopt")
    bundle = tmp_path / "fp8"
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["export", "trtllm", "--model", str(tiny), "--gpu", "h100", "--context", "2048", "--quant", "fp8",
                 "--calib", str(calib), "--calib-samples", "4", "--calib-len", "64", "--out", str(bundle)]) == 0
    check_nemotron_h_bundle(transformers4, bundle, tiny)
    # With a quantization_config in config.json, TensorRT-LLM's LLM API requires hf_quant_config.json beside it.
    assert (bundle / "checkpoint" / "hf_quant_config.json").exists()
    assert json.loads((bundle / "checkpoint" / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"


def test_the_checkpoint_tensors_are_the_names_the_weight_mapper_reads(tiny, tmp_path):
    bundle = tmp_path / "bundle"
    assert main(["export", "trtllm", "--model", str(tiny), "--gpu", "a10g", "--context", "4096", "--out", str(bundle)]) == 0
    with safe_open(str(bundle / "checkpoint" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    pattern = SHAPE["hybrid_override_pattern"]
    expected = {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}
    per_kind = {"M": ["A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "in_proj.weight", "norm.weight",
                      "out_proj.weight"],
                "-": ["up_proj.weight", "down_proj.weight"],
                "*": ["q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"]}
    for i, kind in enumerate(pattern):
        expected.add(f"backbone.layers.{i}.norm.weight")
        expected |= {f"backbone.layers.{i}.mixer.{n}" for n in per_kind[kind]}
    assert names == expected
    # The mapper's A and D tests match any name with a capital A or D: none but A_log and D may have one.
    assert all(n.endswith(("A_log", ".D")) for n in names if "A" in n or "D" in n)


# --- Llama-Nemotron (DeciLM): the trtllm-build checkpoint and the PyTorch backend's Hugging Face folder ---


def test_the_decilm_engine_checkpoint_is_what_trtllm_build_reads(tmp_path):
    from nano.tiny import build_tiny_decilm_checkpoint

    source = build_tiny_decilm_checkpoint(tmp_path / "deci")
    bundle = tmp_path / "bundle"
    assert main(["export", "trtllm", "--model", str(source), "--gpu", "h100", "--tp", "2", "--context", "1024",
                 "--out", str(bundle)]) == 0
    spec = READS["decilm_trtllm_checkpoint"]
    config = json.loads((bundle / "trtllm_checkpoint" / "config.json").read_text())
    known = {k["key"] for k in spec["config_keys"]} - {"<any other key>"}
    assert set(config) <= known, f"keys TensorRT-LLM would set implicitly: {set(config) - known}"
    required = {k["key"] for k in spec["config_keys"] if k.get("required")}
    assert required <= set(config) and config["architecture"] == "DeciLMForCausalLM"
    assert config["hidden_act"] == "silu"  # DeciConfig's default is gelu
    assert len(config["layer_configs"]) == config["num_hidden_layers"]
    impls = {k["key"]: set(k["values"]) for k in spec["layer_config_keys"] if "values" in k}
    for layer in config["layer_configs"]:
        assert set(layer) == {"attention", "ffn"}
        assert set(layer["attention"]) == {"impl", "num_key_value_heads"} and set(layer["ffn"]) == {"impl", "intermediate_size"}
        assert layer["attention"]["impl"] in impls["attention.impl"] and layer["ffn"]["impl"] in impls["ffn.impl"]
    world = config["mapping"]["world_size"]
    assert sorted(p.name for p in (bundle / "trtllm_checkpoint").glob("rank*.safetensors")) == \
        [f"rank{r}.safetensors" for r in range(world)]
    allowed = ("transformer.vocab_embedding.weight", "lm_head.weight", "transformer.ln_f.weight")
    layer_parts = ("input_layernorm.weight", "attention.qkv.weight", "attention.dense.weight", "attention.weight",
                   "post_layernorm.weight", "ffn.fc.weight", "ffn.gate.weight", "ffn.proj.weight", "ffn.weight")
    with safe_open(str(bundle / "trtllm_checkpoint" / "rank1.safetensors"), "pt") as f:
        for name in f.keys():
            assert name in allowed or (name.startswith("transformer.layers.") and name.split(".", 3)[3] in layer_parts), name


def test_the_decilm_pytorch_folder_reads_in_transformers_4(transformers4, tmp_path):
    import nano
    from nano.tiny import build_tiny_decilm_checkpoint

    source = build_tiny_decilm_checkpoint(tmp_path / "deci")
    bundle = tmp_path / "bundle"
    assert main(["export", "trtllm", "--model", str(source), "--gpu", "h100", "--context", "1024", "--out", str(bundle)]) == 0
    folder = bundle / "pytorch_checkpoint"
    names = ["architectures", "block_configs", "num_attention_heads", "hidden_size", "vocab_size", "rms_norm_eps",
             "torch_dtype", "max_position_embeddings", "rope_theta", "rope_scaling", "head_dim", "tie_word_embeddings",
             "intermediate_size", "num_key_value_heads"]
    assert {a["name"] for a in READS["decilm_hf"]["config_attributes"]} >= set(names)  # what 1.2.1 reads
    report = probe(transformers4, folder, names)
    read = report["configs"]["True"]  # TensorRT-LLM always trusts remote code; there is no stand-in for DeciLM
    assert "error" not in read, read.get("error")
    assert read["class"].endswith("configuration_decilm.DeciLMConfig") and not read["missing"]
    raw = json.loads((source / "config.json").read_text())
    values = read["values"]
    for name in ("hidden_size", "num_attention_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                 "rope_theta", "head_dim", "tie_word_embeddings", "rope_scaling", "architectures"):
        assert values[name] == raw[name], name
    assert values["intermediate_size"] is None and values["num_key_value_heads"] is None  # per layer, as NVIDIA's
    for block, given in zip(values["block_configs"], raw["block_configs"], strict=True):
        for part in ("attention", "ffn"):
            fields = {"attention": ("no_op", "replace_with_linear", "n_heads_in_group"),
                      "ffn": ("no_op", "replace_with_linear", "ffn_mult")}[part]
            for field in fields:
                assert block[part][field] == given[part].get(field, False if field in ("no_op", "replace_with_linear") else None)
    assert "error" not in report["tokenizer"] and report["tokenizer"]["class"] == "PreTrainedTokenizerFast"
    # The weights are the source's, linked: the folder loads and generates what the source does.
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["files"]["pytorch_checkpoint/model.safetensors"] == {"link": str((source / "model.safetensors").resolve())}
    a, b = nano.load(folder, device="cpu"), nano.load(source, device="cpu")
    assert nano.generate(a, "Hi", max_new_tokens=8).token_ids == nano.generate(b, "Hi", max_new_tokens=8).token_ids
    serve = (bundle / "serve_pytorch.sh").read_text()
    assert "--reasoning_parser qwen3 --custom_module_dirs nanokit_serve_hook" in serve
    assert (bundle / "nanokit_budget" / "rule.py").exists()
