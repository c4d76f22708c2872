"""What made a small prune fast (issue 17) gives what it replaced: the layer ranking with its
candidates side by side against the same ranking run one candidate at a time, the runtime's calls
of fewer rows than it holds against a runtime of exactly those rows; and `nanokit prune` telling
the user when the calibration text is short. No timings here: bench/prune_small.py measures."""

from __future__ import annotations

import json

import pytest
import torch
from twins.importance import rank_layers_one_by_one

import nano
from nano.cli import main
from nano.data import token_samples
from nano.runtime import HybridRuntime
from nano.tiny import build_tiny_checkpoint
from prune.importance import rank_layers

PATTERN = "M-M*-M-M*-M-M-*M-M-"
SHAPE = dict(hybrid_override_pattern=PATTERN, hidden_size=64, intermediate_size=128, mamba_num_heads=8,
             mamba_head_dim=16, n_groups=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("speed") / "teacher", seed=7, **SHAPE)


@pytest.fixture(scope="module")
def teacher(teacher_dir):
    return nano.load(teacher_dir, device="cpu")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(3, 267, (5, 24), generator=torch.Generator().manual_seed(3))


def same_steps(fast, slow) -> bool:
    """The same layers removed in the same order, every candidate's score within float noise."""
    return [s.layer for s in fast] == [s.layer for s in slow] and all(
        a.scores.keys() == b.scores.keys()
        and all(abs(a.scores[i] - b.scores[i]) <= 1e-6 * max(1e-6, abs(b.scores[i])) for i in a.scores)
        for a, b in zip(fast, slow))


# 100 tokens a call: every batch its own pass, two or four candidates a call; the default: one call a layer.
@pytest.mark.parametrize("tokens_per_call", [100, None])
@pytest.mark.parametrize("metric", ["kl", "loss"])
def test_side_by_side_ranking_is_the_one_by_one_ranking(teacher, tokens, metric, tokens_per_call):
    options = {} if tokens_per_call is None else dict(tokens_per_call=tokens_per_call)
    fast = rank_layers(teacher.model, tokens, 4, metric=metric, **options)
    slow = rank_layers_one_by_one(teacher.model, tokens, 4, metric=metric)
    assert len(fast) == 4 and same_steps(fast, slow)


def test_candidates_in_groups_rank_as_all_side_by_side(teacher, tokens, monkeypatch):
    """With room for one or two candidate streams at a time, the candidates go in groups: the
    ranking and every score stay those of running each candidate alone."""
    import prune.importance as importance

    groups, real = [], importance._without_each

    def counted(runtime, stream, active, candidates, per_call, group):
        groups.append((group, len(candidates)))
        yield from real(runtime, stream, active, candidates, per_call, group)

    monkeypatch.setattr(importance, "_without_each", counted)
    slow = rank_layers_one_by_one(teacher.model, tokens[:3], 4, batch_size=1)
    stream = tokens.shape[1] * teacher.config.hidden_size * 4  # one sample's residual stream, fp32
    for room, group in ((1, 1), (3, 2)):
        groups.clear()
        fast = rank_layers(teacher.model, tokens[:3], 4, batch_size=1, tokens_per_call=100,
                           stream_bytes=room * stream)
        assert {g for g, _ in groups} == {group} and max(n for _, n in groups) > group
        assert same_steps(fast, slow), room


def test_side_by_side_ranking_keeps_the_quota_per_kind(teacher, tokens):
    remove = {"M": 2, "*": 1, "-": 1}
    fast = rank_layers(teacher.model, tokens[:3], remove, batch_size=1, tokens_per_call=80)
    slow = rank_layers_one_by_one(teacher.model, tokens[:3], remove, batch_size=1)
    assert sorted(s.kind for s in fast) == ["*", "-", "M", "M"] and same_steps(fast, slow)


def test_runtime_runs_fewer_rows_than_it_holds_as_a_runtime_of_those_rows(teacher, tokens):
    model = teacher.model
    stream = model.model.embeddings(tokens[:2])
    layers = range(len(PATTERN))
    wide = HybridRuntime(model, 4, tokens.shape[1] + 1, prefill_chunk=tokens.shape[1])
    wide.run_layers(model.model.embeddings(tokens[1:5]), layers)  # leaves state in all four rows' caches
    exact = HybridRuntime(model, 2, tokens.shape[1] + 1, prefill_chunk=tokens.shape[1])
    assert torch.equal(wide.run_layers(stream, layers), exact.run_layers(stream, layers))
    with pytest.raises(ValueError, match="5 x 24 tokens do not fit 4 rows x 25"):
        wide.run_layers(model.model.embeddings(tokens), layers)


# Short calibration text.

def _prune(teacher_dir, calib, out, samples: int, length: int) -> int:
    return main(["prune", "--teacher", str(teacher_dir), "--layers", "18", "--calib", str(calib),
                 "--samples", str(samples), "--length", str(length), "--out", str(out)])


def test_text_shorter_than_one_sample_is_met_with_the_numbers_that_would_do(teacher_dir, teacher, tmp_path, capsys):
    text = "x = 1\n" * 20  # byte-level: 120 tokens, and the end-of-sequence token
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.py").write_text(text)
    with pytest.raises(ValueError, match="the text makes 121 tokens .* fewer than length=128"):
        token_samples(tmp_path / "calib", teacher.tokenizer, samples=4, length=128)
    assert _prune(teacher_dir, tmp_path / "calib", tmp_path / "out", samples=4, length=128) == 2
    err = capsys.readouterr().err
    assert "the calibration data makes 121 tokens, fewer than one sample of --length 128" in err
    assert "--length 30 gives all 4 samples" in err
    assert "--samples 1 --length 121" in err
    assert "--samples 4 of --length 128 take 512 tokens" in err
    assert not (tmp_path / "out").exists()
    # The same text as a token store meets the same advice.
    from nano.tokenize import tokenize

    tokenize(teacher_dir, [tmp_path / "calib"], tmp_path / "store" / "calib", workers=1)
    assert _prune(teacher_dir, tmp_path / "store" / "calib", tmp_path / "out", samples=4, length=128) == 2
    assert "makes 121 tokens, fewer than one sample of --length 128" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fewer_samples_than_asked_is_said_on_stderr_naming_both_counts(teacher_dir, tmp_path, capsys):
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "a.py").write_text("y = 2\n" * 10)  # 61 tokens: 3 samples of 16
    assert _prune(teacher_dir, tmp_path / "calib", tmp_path / "out", samples=8, length=16) == 0
    err = capsys.readouterr().err
    assert "makes 3 samples of --length 16, fewer than --samples 8; pruning with those 3" in err
    assert "--length 6" in err
    record = json.loads((tmp_path / "out" / "pruning.json").read_text())
    assert record["calibration"]["samples"] == 3
