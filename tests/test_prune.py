"""Minitron pruning on tiny models: importance against its transformers twin, slicing against a
hand-sliced reference, planted dead parts going first, and the `nanokit prune` command."""

from __future__ import annotations

import json

import pytest
import torch

import nano
from nano.cli import main
from nano.memory import GIB, parameter_count, plan
from nano.shapes import SHAPES, shape_config
from nano.tiny import build_tiny_checkpoint
from nano.data import token_samples
from prune.importance import (
    Importance,
    rank_layers,
    width_importance,
)
from prune.pipeline import prune
from prune.search import Budget
from prune.slicing import slice_model
from prune.targets import Plan
from prune.targets import Sizes, preset
from twins.importance import rank_layers_reference, width_importance_reference

PATTERN = "M-M*-M-M*-M-"
SHAPE = dict(hybrid_override_pattern=PATTERN, hidden_size=64, intermediate_size=128, mamba_num_heads=8,
             mamba_head_dim=16, n_groups=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("prune") / "teacher", seed=5, **SHAPE)


@pytest.fixture()
def teacher(teacher_dir):
    return nano.load(teacher_dir, device="cpu")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 267, (6, 48), generator=torch.Generator().manual_seed(0))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# Importance: the fast path against transformers' forward with hooks.

def test_width_importance_matches_the_transformers_twin(teacher, tokens):
    fast = width_importance(teacher.model, tokens, batch_size=4)
    slow = width_importance_reference(teacher.model, tokens, batch_size=4)
    assert fast.samples == slow.samples == 6
    assert close(fast.hidden, slow.hidden)
    for name in ("ffn", "mamba_heads", "attention_heads"):
        a, b = getattr(fast, name), getattr(slow, name)
        assert sorted(a) == sorted(b) and a
        assert all(close(a[i], b[i]) for i in a), name
    assert sorted(fast.mamba_heads) == [i for i, k in enumerate(PATTERN) if k == "M"]
    assert fast.mamba_heads[0].shape == (8,) and fast.ffn[1].shape == (128,) and fast.hidden.shape == (64,)


@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_layer_ranking_matches_the_transformers_twin(teacher, tokens, metric):
    fast = rank_layers(teacher.model, tokens[:4], 3, metric=metric)
    slow = rank_layers_reference(teacher.model, tokens[:4], 3, metric=metric)
    assert [s.layer for s in fast] == [s.layer for s in slow]
    for a, b in zip(fast, slow):
        assert a.scores.keys() == b.scores.keys()
        assert all(abs(a.scores[i] - b.scores[i]) <= 1e-4 * max(1.0, abs(b.scores[i])) for i in a.scores)


def test_layer_ranking_respects_the_quota_per_kind(teacher, tokens):
    steps = rank_layers(teacher.model, tokens[:2], {"M": 1, "*": 1, "-": 2})
    assert sorted(s.kind for s in steps) == ["*", "-", "-", "M"]
    assert all(PATTERN[s.layer] == s.kind for s in steps)
    assert len({s.layer for s in steps}) == 4
    with pytest.raises(ValueError, match="cannot remove 3 layers of kind '\\*'"):
        rank_layers(teacher.model, tokens[:2], {"*": 3})


# Planted dead parts go first.

def test_planted_dead_parts_are_the_first_to_go(teacher, tokens):
    model = teacher.model
    dead_neuron, dead_channel, dead_head, identity_layer = 37, 11, 5, 6
    with torch.no_grad():
        model.model.layers[1].mixer.up_proj.weight[dead_neuron] = 0
        model.model.embeddings.weight[:, dead_channel] = 0
        for layer in model.model.layers:
            layer.norm.weight[dead_channel] = 0
        mixer = model.model.layers[0].mixer
        inner = mixer.num_heads * mixer.head_dim
        x_rows = slice(inner + dead_head * mixer.head_dim, inner + (dead_head + 1) * mixer.head_dim)
        mixer.in_proj.weight[x_rows] = 0
        model.model.layers[identity_layer].mixer.down_proj.weight.zero_()

    importance = width_importance(model, tokens)
    assert importance.hidden.argmin() == dead_channel
    assert importance.ffn[1].argmin() == dead_neuron
    assert importance.mamba_heads[0].argmin() == dead_head
    steps = rank_layers(model, tokens[:2], 1)
    assert steps[0].layer == identity_layer and steps[0].score < 1e-6

    pruned = slice_model(model, importance, Plan(hidden=63, ffn=127, mamba_heads=6, attention_heads=4,
                                                 drop=(identity_layer,)))
    # The dead parts were all zeros; nothing of them is left.
    assert (model.model.embeddings.weight == 0).all(dim=0).sum() == 1
    assert pruned.config.hidden_size == 63 and not (pruned.model.embeddings.weight == 0).all(dim=0).any()
    assert not (pruned.model.layers[1].mixer.up_proj.weight == 0).all(dim=1).any()
    x_part = pruned.model.layers[0].mixer.in_proj.weight[6 * 16 : 12 * 16]
    assert not (x_part.view(6, 16, -1) == 0).all(dim=(1, 2)).any()
    assert pruned.config.hybrid_override_pattern == PATTERN[:identity_layer] + PATTERN[identity_layer + 1 :]


# Slicing against a reference written the obvious way: masks over every tensor's rows and columns.

def _reference_slice(model, keep: dict, drop: set) -> dict[str, torch.Tensor]:
    config = model.config
    hidden = torch.zeros(config.hidden_size, dtype=torch.bool)
    hidden[keep["hidden"]] = True
    out = {
        "model.embeddings.weight": model.model.embeddings.weight[:, hidden],
        "model.norm_f.weight": model.model.norm_f.weight[hidden],
        "lm_head.weight": model.lm_head.weight[:, hidden],
    }
    new = 0
    for i, (kind, layer) in enumerate(zip(config.hybrid_override_pattern, model.model.layers)):
        if i in drop:
            continue
        p = f"model.layers.{new}."
        new += 1
        m = layer.mixer
        out[p + "norm.weight"] = layer.norm.weight[hidden]
        if kind == "-":
            neurons = torch.zeros(config.intermediate_size, dtype=torch.bool)
            neurons[keep["ffn"][i]] = True
            out[p + "mixer.up_proj.weight"] = m.up_proj.weight[neurons][:, hidden]
            out[p + "mixer.down_proj.weight"] = m.down_proj.weight[hidden][:, neurons]
        elif kind == "M":
            heads, hd = set(keep["mamba"][i]), m.head_dim
            inner, bc = m.num_heads * hd, 2 * m.n_groups * m.ssm_state_size

            def row_kept(r):  # the input projection: z, x, B and C, dt
                if r < 2 * inner:
                    return (r % inner) // hd in heads
                if r < 2 * inner + bc:
                    return True
                return (r - 2 * inner - bc) in heads

            rows = torch.tensor([row_kept(r) for r in range(m.in_proj.weight.shape[0])])
            conv = torch.tensor([(c // hd in heads) if c < inner else True for c in range(m.conv1d.weight.shape[0])])
            channels = torch.tensor([c // hd in heads for c in range(inner)])
            head_mask = torch.tensor([h in heads for h in range(m.num_heads)])
            out[p + "mixer.in_proj.weight"] = m.in_proj.weight[rows][:, hidden]
            out[p + "mixer.conv1d.weight"] = m.conv1d.weight[conv]
            out[p + "mixer.conv1d.bias"] = m.conv1d.bias[conv]
            out[p + "mixer.out_proj.weight"] = m.out_proj.weight[hidden][:, channels]
            out[p + "mixer.norm.weight"] = m.norm.weight[channels]
            for name in ("A_log", "D", "dt_bias"):
                out[p + "mixer." + name] = getattr(m, name)[head_mask]
        else:
            heads = set(keep["attention"][i])
            q = torch.tensor([c // m.head_dim in heads for c in range(m.q_proj.weight.shape[0])])
            out[p + "mixer.q_proj.weight"] = m.q_proj.weight[q][:, hidden]
            out[p + "mixer.k_proj.weight"] = m.k_proj.weight[:, hidden]
            out[p + "mixer.v_proj.weight"] = m.v_proj.weight[:, hidden]
            out[p + "mixer.o_proj.weight"] = m.o_proj.weight[hidden][:, q]
    return out


def _top_in_groups(scores: torch.Tensor, groups: int, k: int) -> list[int]:
    size = len(scores) // groups
    kept = []
    for g in range(groups):
        part = scores[g * size : (g + 1) * size]
        kept += [g * size + int(j) for j in torch.topk(part, k // groups).indices]
    return sorted(kept)


def test_slicing_matches_a_hand_sliced_reference_tensor_by_tensor(teacher):
    model, config = teacher.model, teacher.model.config
    g = torch.Generator().manual_seed(1)
    rand = lambda n: torch.rand(n, generator=g)  # noqa: E731
    importance = Importance(
        hidden=rand(64),
        ffn={i: rand(128) for i, k in enumerate(PATTERN) if k == "-"},
        mamba_heads={i: rand(8) for i, k in enumerate(PATTERN) if k == "M"},
        attention_heads={i: rand(4) for i, k in enumerate(PATTERN) if k == "*"},
    )
    target = Plan(hidden=40, ffn=72, mamba_heads=4, attention_heads=2, drop=(2, 9))
    keep = dict(
        hidden=sorted(torch.topk(importance.hidden, 40).indices.tolist()),
        ffn={i: sorted(torch.topk(s, 72).indices.tolist()) for i, s in importance.ffn.items()},
        mamba={i: _top_in_groups(s, config.n_groups, 4) for i, s in importance.mamba_heads.items()},
        attention={i: _top_in_groups(s, config.num_key_value_heads, 2) for i, s in importance.attention_heads.items()},
    )
    expected = _reference_slice(model, keep, {2, 9})
    pruned = slice_model(model, importance, target)
    got = pruned.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    assert pruned.config.hybrid_override_pattern == "M-*-M-M*M-"
    assert parameter_count(pruned.config) == sum(t.numel() for t in got.values())
    pruned(input_ids=torch.tensor([[5, 6, 7, 8]]))  # and it runs


def test_pruning_nothing_gives_identical_logits(teacher, tokens):
    result = prune(teacher.model, tokens, Sizes())
    assert result.layer_steps == [] and result.plan.drop == ()
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=tokens).logits, teacher.model(input_ids=tokens).logits)


def test_slicing_refuses_impossible_sizes_naming_the_value(teacher):
    importance = width_importance(teacher.model, torch.randint(3, 200, (2, 16)))
    for target, message in [
        (Plan(64, 128, 7, 4), "mamba_heads=7 is not possible: .* multiple of 2"),
        (Plan(65, 128, 8, 4), "hidden=65 is not possible: it must be between 1 and 64"),
        (Plan(64, 128, 8, 3), "attention_heads=3 is not possible"),
        (Plan(64, 128, 8, 4, drop=(12,)), "layers to drop \\[12\\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            slice_model(teacher.model, importance, target)


# Targets and the memory model.

def test_the_preset_turns_the_12b_into_the_9b_shapes():
    config = shape_config("nano-12b-v2-base")
    sizes = preset("nano-9b-v2", config)
    assert (sizes.hidden, sizes.ffn, sizes.mamba_heads) == (4480, 15680, 128)
    assert sizes.removal(config.hybrid_override_pattern) == {"M": 1, "*": 2, "-": 3}
    with pytest.raises(ValueError, match="needs vocab_size=131072; the teacher has vocab_size=288"):
        preset("nano-9b-v2", nano.tiny.tiny_config())


def test_parameter_counts_and_memory_agree_with_the_published_shapes():
    from transformers import NemotronHForCausalLM

    for name, params in (("nano-12b-v2-base", 12.31e9), ("nano-9b-v2", 8.888e9)):
        config = shape_config(name)
        with torch.device("meta"):
            module = NemotronHForCausalLM(config)
        assert parameter_count(config) == parameter_count(SHAPES[name]) == sum(p.numel() for p in module.parameters())
        assert abs(parameter_count(config) - params) / params < 5e-4
    nine = plan(SHAPES["nano-9b-v2"], "a10g", 131072)
    assert nine.fits and abs(nine.weights / GIB - 16.56) < 0.01
    assert nine.kv_cache == 2 * GIB and abs(nine.ssm_state / GIB - 0.13) < 0.01
    assert not plan(SHAPES["nano-12b-v2-base"], "a10g", 131072).fits
    with pytest.raises(ValueError, match="unknown GPU 'a11g'"):
        plan(SHAPES["nano-9b-v2"], "a11g", 1024)


# Calibration data.

def test_calibration_reads_text_jsonl_and_token_tensors(tmp_path, teacher):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.py").write_text("def f(x):\n    return x + 1\n" * 40)
    (tmp_path / "text" / "b.jsonl").write_text(json.dumps({"text": "hello world " * 30}) + "\n")
    tokens = token_samples(tmp_path / "text", teacher.tokenizer, samples=5, length=64)
    assert tokens.shape == (5, 64) and tokens.dtype == torch.long
    saved = torch.randint(0, 100, (3, 32))
    torch.save(saved, tmp_path / "ids.pt")
    assert torch.equal(token_samples(tmp_path / "ids.pt", teacher.tokenizer, samples=2, length=16), saved[:2, :16])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match="no text found"):
        token_samples(tmp_path / "empty", teacher.tokenizer)
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a jsonl line needs a string field 'text'"):
        token_samples(tmp_path / "bad.jsonl", teacher.tokenizer)


# The command.

@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    import jinja2

    return jinja2.__path__[0]  # Python source already on the machine


def test_prune_command_writes_a_checkpoint_that_transformers_and_nano_load(teacher_dir, calib, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    code = main(["prune", "--teacher", str(teacher_dir), "--hidden", "48", "--ffn", "96", "--layers", "10",
                 "--mamba-heads", "6", "--calib", calib, "--samples", "8", "--length", "64", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "pruning.json").read_text())
    assert record["plan"]["hidden"] == 48 and len(record["plan"]["dropped_layers"]) == 2
    assert record["parameters"] == parameter_count(json.loads((out / "config.json").read_text()))
    assert set(record["seconds"]) == {"importance", "layers", "slicing"}
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.hidden_size == 48 and len(loaded.model.layers) == 10
    model = nano.load(out, device="cpu")
    assert model.config.mamba_num_heads == 6
    generation = nano.generate(model, "What is 1 + 1?", max_new_tokens=8)
    assert generation.finish_reason == "length"
    # An existing output is refused and left as it was.
    before = sorted(p.name for p in out.iterdir())
    assert main(["prune", "--teacher", str(teacher_dir), "--hidden", "40", "--calib", calib, "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == before


def test_prune_dry_run_on_the_12b_config_prints_the_9b(tmp_path, capsys):
    shape_config("nano-12b-v2-base").save_pretrained(tmp_path)  # config.json only: no weights
    assert main(["prune", "--teacher", str(tmp_path), "--preset", "nano-9b-v2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "teacher: 62 layers (28 M, 6 *, 28 -), hidden 5120, ffn 20480" in out and "12.310B" in out
    assert "pruned:  56 layers (27 M, 4 *, 25 -), hidden 4480, ffn 15680, mamba heads 128" in out
    assert "8.888B parameters" in out


def test_the_config_read_without_transformers_matches_transformers(tmp_path):
    """The dry-run and the targets read config.json through nano.config.HybridConfig: its numbers,
    the defaults for missing keys among them, are transformers' own."""
    from transformers import NemotronHConfig

    from nano.config import NEMOTRON_H_DEFAULTS, ConfigError, HybridConfig

    bare = NemotronHConfig()
    assert {k: getattr(bare, k) for k in NEMOTRON_H_DEFAULTS} == NEMOTRON_H_DEFAULTS
    for config in (shape_config("nano-12b-v2-base"), nano.tiny.tiny_config()):
        config.save_pretrained(tmp_path)
        ours, theirs = HybridConfig.read(tmp_path), NemotronHConfig.from_pretrained(tmp_path)
        for key in (*NEMOTRON_H_DEFAULTS, "hybrid_override_pattern", "num_hidden_layers"):
            assert getattr(ours, key) == getattr(theirs, key), key
        assert parameter_count(ours) == parameter_count(theirs)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama'"):
        HybridConfig.read(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        HybridConfig.read(tmp_path / "elsewhere")


def test_the_dry_runs_arithmetic_counts_what_transformers_builds():
    """The dry-run prints counts from arithmetic alone; transformers' module on the meta device,
    built from the pruned config, has exactly that many parameters."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from nano.config import HybridConfig
    from prune.targets import parameter_range, pruned_config_dict, pruned_counts

    twelve = HybridConfig(shape_config("nano-12b-v2-base").to_dict())
    tiny = HybridConfig(nano.tiny.tiny_config().to_dict())
    for config, sizes in ((twelve, preset("nano-9b-v2", twelve)),
                          (tiny, Sizes(hidden=40, ffn=96, mamba_heads=tiny.mamba_num_heads - tiny.n_groups)),
                          (tiny, Sizes(hidden=48, remove=(("M", 1), ("-", 1))))):
        low, high = parameter_range(config, sizes)
        counts = pruned_counts(config, sizes)
        fields = pruned_config_dict(config, sizes.plan(config))
        if "layers" not in counts:  # removed per kind: the kinds' order does not change the count
            fields["hybrid_override_pattern"] = "".join(k * counts[k] for k in ("M", "*", "-"))
        with torch.device("meta"):
            module = NemotronHForCausalLM(NemotronHConfig(**fields))
        assert low == high == sum(p.numel() for p in module.parameters()), sizes


def test_prune_command_errors_name_the_value(teacher_dir, tmp_path, capsys):
    cases = [
        (["--mamba-heads", "5", "--dry-run"], "mamba_heads=5 is not possible"),
        (["--preset", "nano-9b-v2", "--hidden", "32", "--dry-run"], "name one target, not --preset and sizes (--hidden)"),
        (["--preset", "nano-9b-v2", "--dry-run"], "needs vocab_size=131072"),
        (["--memory", "a11g:1024", "--dry-run"], "unknown GPU 'a11g'"),
        (["--dry-run"], "name a target"),
    ]
    for extra, message in cases:
        assert main(["prune", "--teacher", str(teacher_dir), *extra]) == 2
        assert message in capsys.readouterr().err, extra


def test_budget_search_keeps_the_best_candidate_under_the_budget(teacher, calib):
    tokens = token_samples(calib, teacher.tokenizer, samples=12, length=64)
    budget = 0.75 * parameter_count(teacher.config)
    result = prune(teacher.model, tokens, Budget(params=budget), heldout=4,
                   search_options=dict(screen=4, finalists=2, proxy_steps=3, batch_size=2))
    assert (1 - 0.02) * budget <= parameter_count(result.model.config) <= budget
    finalists = [c for c in result.candidates if c.proxy_loss is not None]
    assert len(result.candidates) == 4 and len(finalists) == 2
    assert sorted(c.zero_shot_loss for c in finalists) == sorted(c.zero_shot_loss for c in result.candidates)[:2]
    chosen = [c for c in result.candidates if c.chosen]
    assert len(chosen) == 1 and chosen[0].proxy_loss == min(c.proxy_loss for c in finalists)
    assert result.plan.hidden == chosen[0].sizes.hidden and result.plan.ffn == chosen[0].sizes.ffn
