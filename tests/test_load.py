"""`nano.load` reads what `save_pretrained` writes, and the reverse; bad folders get errors naming file and field."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import nano
from nano.tiny import build_tiny_checkpoint, tiny_tokenizer

PROMPT_IDS = torch.tensor([[1, 40, 50, 60, 70, 80, 90, 100, 110, 120]])


def logits(model, ids=PROMPT_IDS):
    with torch.no_grad():
        return model(input_ids=ids.to(model.device)).logits


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_load_gives_the_model_tokenizer_and_config(tiny):
    from transformers import NemotronHForCausalLM

    assert isinstance(tiny.model, NemotronHForCausalLM)
    assert tiny.config.hybrid_override_pattern == "M-M*-M-"
    assert {"M", "*", "-"} <= set(tiny.config.hybrid_override_pattern)
    assert tiny.tokenizer.convert_tokens_to_ids("<think>") == tiny.chat.think.open
    assert tiny.device.type == "cpu" and tiny.dtype == torch.float32


def test_reads_what_save_pretrained_writes(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "saved")
    tiny.tokenizer.save_pretrained(tmp_path / "saved")
    again = nano.load(tmp_path / "saved")
    assert torch.equal(logits(again.model), logits(tiny.model))


def test_from_pretrained_reads_what_nano_saves(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny.save(tmp_path / "out")
    assert not [p.name for p in tmp_path.iterdir() if p.name != "out"], "no temporary folder left behind"
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(logits(hf), logits(tiny.model))
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template == tiny.tokenizer.chat_template


def test_save_refuses_to_overwrite_unless_asked(tiny, tmp_path):
    tiny.save(tmp_path / "out")
    with pytest.raises(FileExistsError, match="out"):
        tiny.save(tmp_path / "out")
    tiny.save(tmp_path / "out", overwrite=True)
    assert nano.load(tmp_path / "out").config.hybrid_override_pattern == "M-M*-M-"


def test_sharded_checkpoint(tiny, tmp_path):
    tiny.model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    tiny.tokenizer.save_pretrained(tmp_path / "sharded")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = nano.load(tmp_path / "sharded")
    assert torch.equal(logits(again.model), logits(tiny.model))


def test_hybrid_override_pattern_and_model_prefix(tiny_dir, tmp_path):
    # The layout as NVIDIA's configs spell it, and tensor names as transformers' modules name them.
    folder = copy(tiny_dir, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    del config["layers_block_type"]
    config["hybrid_override_pattern"] = "M-M*-M-"
    (folder / "config.json").write_text(json.dumps(config))
    tensors = load_file(folder / "model.safetensors")
    save_file({k.replace("backbone.", "model.", 1): v for k, v in tensors.items()}, folder / "model.safetensors")
    model = nano.load(folder)
    assert model.config.hybrid_override_pattern == "M-M*-M-"
    assert torch.equal(logits(model.model), logits(nano.load(tiny_dir).model))


def test_bfloat16(tiny_dir):
    model = nano.load(tiny_dir, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert nano.generate(model, "hi", budget=4, max_new_tokens=8).token_ids


# Errors: each names the file and the field at fault.


def test_missing_folder(tmp_path):
    with pytest.raises(nano.CheckpointError, match="nowhere.*not a checkpoint folder"):
        nano.load(tmp_path / "nowhere")


def test_missing_config(tiny_dir, tmp_path):
    folder = copy(tiny_dir, tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(nano.CheckpointError, match="no config.json"):
        nano.load(folder)


def test_config_not_json(tiny_dir, tmp_path):
    folder = copy(tiny_dir, tmp_path / "c")
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(nano.CheckpointError, match="config.json: not valid JSON"):
        nano.load(folder)


def test_unsupported_architecture(tiny_dir, tmp_path):
    folder = copy(tiny_dir, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(nano.CheckpointError, match=r"config.json: model_type 'llama' \(architectures \['LlamaForCausalLM'\]\) is not supported"):
        nano.load(folder)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: (c.pop("layers_block_type"), c.pop("hybrid_override_pattern")),
         "neither hybrid_override_pattern nor layers_block_type"),
        (lambda c: c.update(layers_block_type=["mamba", "conv"]), r"layers_block_type\[1\] is 'conv'"),
        (lambda c: c.update(hybrid_override_pattern="M" * len(c["layers_block_type"])),
         "hybrid_override_pattern 'M+' disagrees with layers_block_type"),
        (lambda c: (c.pop("layers_block_type"), c.update(hybrid_override_pattern="M-X")), "hybrid_override_pattern has 'X' at layer 2"),
    ],
)
def test_bad_layer_pattern(tiny_dir, tmp_path, edit, message):
    folder = copy(tiny_dir, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(nano.CheckpointError, match="config.json: " + message):
        nano.load(folder)


def test_missing_weights(tiny_dir, tmp_path):
    folder = copy(tiny_dir, tmp_path / "c")
    (folder / "model.safetensors").unlink()
    with pytest.raises(nano.CheckpointError, match="no weights.*model.safetensors.*model.safetensors.index.json"):
        nano.load(folder)


@pytest.fixture
def sharded(tiny, tmp_path):
    folder = tmp_path / "sharded"
    tiny.model.save_pretrained(folder, max_shard_size="40KB")
    tiny.tokenizer.save_pretrained(folder)
    return folder


def test_missing_shard(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (sharded / shard).unlink()
    with pytest.raises(nano.CheckpointError, match=f"model.safetensors.index.json: weight_map names shard '{shard}'.*does not exist"):
        nano.load(sharded)


def test_shard_that_does_not_match_the_index(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first, second = sorted(set(index["weight_map"].values()))[:2]
    shutil.copy(sharded / first, sharded / second)  # a shard from elsewhere under the expected name
    with pytest.raises(nano.CheckpointError, match=f"{second}: .* are not in it"):
        nano.load(sharded)


def test_tensor_with_the_wrong_shape(tiny_dir, tmp_path):
    other = build_tiny_checkpoint(tmp_path / "wide", hidden_size=96)
    folder = copy(tiny_dir, tmp_path / "c")
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    with pytest.raises(nano.CheckpointError, match=r"model.safetensors: tensor 'model.embeddings.weight' has shape \[288, 96\], but config.json implies \[288, 64\]"):
        nano.load(folder)


def test_tensor_missing_from_the_weights(tiny_dir, tmp_path):
    folder = copy(tiny_dir, tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    del tensors["backbone.layers.3.mixer.q_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(nano.CheckpointError, match="'model.layers.3.mixer.q_proj.weight'"):
        nano.load(folder)


def test_missing_tokenizer(tiny_dir, tmp_path):
    folder = copy(tiny_dir, tmp_path / "c")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(nano.CheckpointError, match="no tokenizer"):
        nano.load(folder)


def test_tokenizer_without_think_tokens(tiny_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = copy(tiny_dir, tmp_path / "c")
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="Ā", chat_template=tiny_tokenizer().chat_template)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    plain.save_pretrained(folder)
    with pytest.raises(nano.ChatError, match="the tokenizer has no '<think>' token"):
        nano.load(folder)


def test_tokenizer_without_chat_template(tiny_dir, tmp_path):
    folder = copy(tiny_dir, tmp_path / "c")
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(nano.ChatError, match="no chat_template"):
        nano.load(folder)
