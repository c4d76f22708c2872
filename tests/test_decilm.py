"""The Llama-Nemotron NAS (DeciLM) definition: logits against a straightforward reference, the cached
decoder against whole-sequence forwards, loading and its errors, generation with the budget and the
"detailed thinking on/off" switch, and the published Super and Ultra configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from twins.decilm import reference_logits
from safetensors.torch import load_file, save_file

import nano
from nano.checkpoint import CheckpointError
from nano.cli import main
from nano.decilm import DeciConfig, ffn_width
from nano.tiny import build_tiny_decilm_checkpoint, tiny_decilm_config

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_decilm_checkpoint(tmp_path_factory.mktemp("decilm") / "tiny", seed=3)


@pytest.fixture(scope="module")
def model(folder):
    return nano.load(folder, device="cpu", dtype=torch.float64)


def test_logits_match_the_reference(folder, model):
    config = json.loads((folder / "config.json").read_text())
    kinds = {(tuple(sorted(b["attention"])), tuple(sorted(b["ffn"]))) for b in config["block_configs"]}
    assert len(kinds) >= 5  # every block kind is in the tiny model
    ids = torch.randint(3, 267, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.model(ids)
    state = load_file(folder / "model.safetensors")
    for row in range(2):
        expected = reference_logits(config, state, ids[row].tolist())
        assert torch.allclose(logits[row], expected, atol=1e-5, rtol=0)  # RoPE angles in fp32, as HF computes them


def test_the_cached_decoder_equals_whole_sequence_forwards(model):
    from nano.decilm import DeciLMDecoder

    g = torch.Generator().manual_seed(1)
    lengths = [9, 5, 7]  # left-padded to 9
    rows = [torch.randint(3, 267, (n,), generator=g) for n in lengths]
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, 9 - len(r):] = r
        mask[i, 9 - len(r):] = 1
    decoder = DeciLMDecoder(model.model, 3, 16)
    outputs = [decoder.prefill(ids, mask)]
    extra = torch.randint(3, 267, (3, 4), generator=g)
    for t in range(4):
        outputs.append(decoder.step(extra[:, t]))
    for i, r in enumerate(rows):
        full = torch.cat([r, extra[i]])
        with torch.no_grad():
            alone = model.model(full[None])[0]
        expected = alone[len(r) - 1 :]  # the last prompt position, then each new token
        got = torch.stack([o[i] for o in outputs])
        assert torch.allclose(got, expected.float(), atol=1e-6), i


def test_generation_with_a_budget_and_the_thinking_switch(folder):
    model = nano.load(folder, device="cpu")
    assert model.chat.style == "ultra"
    on = [{"role": "system", "content": "detailed thinking on"}, {"role": "user", "content": "hi"}]
    cut = nano.generate(model, on, budget=8, grace=2, max_new_tokens=40)
    assert cut.budget_hit and 8 <= cut.reasoning_tokens <= 10 and cut.answer_tokens > 0
    free = nano.generate(model, on, max_new_tokens=30)
    assert free.reasoning_tokens > cut.reasoning_tokens or free.finish_reason == "length"
    off = [{"role": "system", "content": "detailed thinking off"}, {"role": "user", "content": "hi"}]
    text, reasoning = model.chat.render(off)
    assert not reasoning and text.endswith("<think></think>") and "detailed thinking off" in text
    assert nano.generate(model, off, max_new_tokens=10).reasoning_tokens == 0
    assert main(["generate", "--model", str(folder), "--budget", "4", "--max-new-tokens", "12", "hi"]) == 0


def test_loading_names_what_is_wrong(folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    state = load_file(broken / "model.safetensors")
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:-1]
    del state["model.layers.2.self_attn.linear_attn.weight"]
    save_file(state, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="'model.layers.2.self_attn.linear_attn.weight'"):
        nano.load(broken, device="cpu")
    config = json.loads((folder / "config.json").read_text())
    config["block_configs"][0]["attention"]["n_heads_in_group"] = 3
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"block_configs\[0\].attention.n_heads_in_group is 3; it must divide "
                                              r"num_attention_heads 8"):
        nano.load(broken, device="cpu")
    config["block_configs"][0]["attention"] = {"n_heads_in_group": 2, "window_length": 1024}
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"window_length = 1024 is not supported"):
        nano.load(broken, device="cpu")


def test_the_published_configs():
    ultra = DeciConfig.of(json.loads((DATA / "ultra_config.json").read_text()))
    assert len(ultra.blocks) == 162 and ultra.parameters() == 253_401_268_224  # "253B"
    super_ = DeciConfig.of(json.loads((DATA / "super_config.json").read_text()))
    assert len(super_.blocks) == 80 and super_.parameters() == 49_867_145_216  # "49B"
    assert ffn_width(4.875, 16384) == 53248 and ffn_width(0.4875, 16384) == 5376
    assert {b.kv_heads for b in ultra.blocks if b.attention == "gqa"} == {8}


def test_tiny_config_is_what_the_builder_writes(folder):
    assert json.loads((folder / "config.json").read_text()) == tiny_decilm_config()


def test_rope_frequencies_follow_llama_3_1_in_all_three_bands():
    from twins.decilm import _frequencies

    from nano.decilm import rope_frequencies

    config = json.loads((DATA / "ultra_config.json").read_text())
    ultra = DeciConfig.of(config)
    ours, theirs = rope_frequencies(ultra), _frequencies(config, ultra.head_dim).float()
    assert torch.allclose(ours, theirs, rtol=1e-6)
    wavelength = 2 * torch.pi / (1.0 / 500000.0 ** (torch.arange(0, 128, 2) / 128))
    assert (wavelength > 8192).any() and ((wavelength > 2048) & (wavelength < 8192)).any() and (wavelength < 2048).any()
