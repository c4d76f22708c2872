"""The distillation trainer: its loss and schedule, exact resumption after SIGKILL, and FSDP2 over
two gloo processes giving what one process gives."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import nano
from nano.cli import main
from nano.tiny import build_tiny_checkpoint
from nano.samples import TensorSamples
from prune.distill import DistillConfig, kd_loss

SHAPE = dict(hybrid_override_pattern="M-M*-M-", hidden_size=64, intermediate_size=128, mamba_num_heads=8,
             mamba_head_dim=16, n_groups=2)
STUDENT = dict(SHAPE, hybrid_override_pattern="M*-M-", hidden_size=48, intermediate_size=96)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return build_tiny_checkpoint(root / "teacher", seed=1, **SHAPE), build_tiny_checkpoint(root / "student", seed=2, **STUDENT)


@pytest.fixture(scope="module")
def data():
    import jinja2

    return jinja2.__path__[0]


@pytest.fixture(scope="module")
def stores(data, tmp_path_factory):
    """A blend of two token stores (jinja2's source, split in two) as `--data` words."""
    from nano.tokenize import tokenize

    root = tmp_path_factory.mktemp("stores")
    files = sorted(Path(data).rglob("*.py"))
    tokenize("nano-tiny", files[::2], root / "even", workers=1)
    tokenize("nano-tiny", files[1::2], root / "odd", workers=1)
    return ["0.6", str(root / "even"), "0.4", str(root / "odd")]


@pytest.fixture(params=["text", "stores"])
def source(request, data, stores):
    """Training data read into memory (text), or read by memory map (a blend of stores)."""
    return [data] if request.param == "text" else stores


def test_kd_loss_is_the_forward_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    p = F.softmax(t, -1)
    manual = (p * (p.log() - F.log_softmax(s, -1))).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t), manual, atol=1e-6)
    assert kd_loss(t, t).abs() < 1e-6
    assert torch.allclose(kd_loss(s, t, top_k=11), manual, atol=1e-6)  # all logits: the same KL
    top = kd_loss(s, t, top_k=3)
    values, index = t.topk(3, -1)
    q = F.log_softmax(s, -1).gather(-1, index)
    pk = F.softmax(values, -1)
    assert torch.allclose(top, (pk * (pk.log() - q)).sum(-1).mean(), atol=1e-6)
    assert torch.allclose(kd_loss(s, t, temperature=2.0), 4 * kd_loss(s / 2, t / 2), atol=1e-6)


def test_schedules():
    cosine = DistillConfig(steps=100, lr=1.0, min_lr=0.1, warmup=10)
    assert cosine.learning_rate(0) == pytest.approx(0.1) and cosine.learning_rate(9) == pytest.approx(1.0)
    assert cosine.learning_rate(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine.learning_rate(99) == pytest.approx(0.1, abs=1e-3)
    wsd = DistillConfig(steps=100, lr=1.0, min_lr=0.0, warmup=10, schedule="wsd", decay_fraction=0.2)
    assert wsd.learning_rate(50) == 1.0 and wsd.learning_rate(79) == 1.0
    assert wsd.learning_rate(89) == pytest.approx(0.5) and wsd.learning_rate(99) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'wsd', got 'linear'"):
        DistillConfig(steps=1, schedule="linear")


def _batch_indices(step: int, samples: int, batch_size: int, seed: int) -> list[int]:
    """The draws of a step the obvious way: slices of one seeded randperm per epoch."""
    out, position = [], step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, samples)
        order = torch.randperm(samples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        take = order[offset : offset + batch_size - len(out)].tolist()
        out.extend(take)
        position += len(take)
    return out


def test_batches_come_from_the_step_number_alone():
    source = TensorSamples(torch.arange(10)[:, None].repeat(1, 3), seed=3)
    steps = [source.indices(range(s * 4, s * 4 + 4)) for s in range(5)]
    assert steps == [_batch_indices(s, 10, 4, seed=3) for s in range(5)]
    assert TensorSamples(source.tokens, seed=3).indices(range(8, 12)) == steps[2]  # no state carried over
    flat = sum(steps, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # epochs
    assert flat[:10] != flat[10:20]  # a new order per epoch
    assert torch.equal(source.take(range(4, 8))[:, 0], torch.tensor(steps[1]))


def _command(pair, data, out, steps, extra=()):
    teacher, student = pair
    return ["--teacher", str(teacher), "--student", str(student), "--data", *data, "--tokens", str(steps * 4 * 64),
            "--seq-len", "64", "--batch-size", "4", "--micro-batch", "2", "--eval-samples", "4",
            "--eval-every", "3", "--save-every", "3", "--out", str(out), "--device", "cpu", *extra]


def _run(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.Popen([sys.executable, "-m", "nano.cli", "distill", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_a_run_killed_and_resumed_ends_bitwise_where_an_uninterrupted_one_does(pair, source, tmp_path):
    data = source
    whole = _run(_command(pair, data, tmp_path / "whole", 12))
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    killed = _run(_command(pair, data, tmp_path / "cut", 12))
    checkpoints = tmp_path / "cut.checkpoints"
    deadline = time.time() + 300
    while not (checkpoints / "step-000003" / "trainer.json").exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "cut").exists()  # nothing half-written

    resumed = _run(_command(pair, data, tmp_path / "cut", 12, ["--resume"]))
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()
    a, b = (json.loads((tmp_path / name / "distill.json").read_text()) for name in ("whole", "cut"))
    assert b["resumed_from"] is not None and 3 <= b["resumed_from"] < 12
    assert [r["loss"] for r in a["steps"]] == [r["loss"] for r in b["steps"]]
    assert a["evals"] == b["evals"]
    wa, wb = (load_file(tmp_path / name / "model.safetensors") for name in ("whole", "cut"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    model = nano.load(tmp_path / "cut", device="cpu")
    assert nano.generate(model, "hi", max_new_tokens=4).finish_reason in ("length", "stop")


@pytest.mark.parametrize("options", [(), ("--replicate-teacher", "--checkpoint-kinds", "M")],
                         ids=["sharded-teacher", "whole-teacher-mamba-recomputed"])
def test_two_gloo_processes_with_fsdp2_match_one_process(pair, source, tmp_path, options):
    data = source
    one = _run(_command(pair, data, tmp_path / "one", 6))
    assert one.wait(timeout=600) == 0, one.stdout.read()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "nano.cli",
                          "distill", *_command(pair, data, tmp_path / "two", 6, options)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    a, b = (json.loads((tmp_path / name / "distill.json").read_text()) for name in ("one", "two"))
    assert b["processes"] == 2 and a["processes"] == 1
    for x, y in zip(a["steps"], b["steps"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    wa, wb = (load_file(tmp_path / name / "model.safetensors") for name in ("one", "two"))
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_checkpointing_chooses_layers_by_kind(pair):
    from prune.distill import _checkpointing

    model = nano.load(pair[0], device="cpu").model  # pattern M-M*-M-
    _checkpointing(model, True, "M*")
    assert [layer.gradient_checkpointing for layer in model.model.layers] == [True, False, True, True, False, True, False]
    _checkpointing(model, False)
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    with pytest.raises(ValueError, match=r"checkpoint_kinds takes pattern letters from 'M\*-E', got 'Mx'"):
        DistillConfig(steps=1, checkpoint_kinds="Mx")


def test_distill_command_errors(pair, data, tmp_path, capsys):
    teacher, student = pair
    base = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", data, "--seq-len", "64"]
    assert main([*base, "--tokens", "10", "--out", str(tmp_path / "x")]) == 2
    assert "--tokens 10 is less than one step of 8 x 64 tokens" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main([*base, "--tokens", "100000", "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_the_fast_training_forward_matches_transformers(pair):
    from prune.fast_training import use_fast_training

    ids = torch.randint(3, 260, (2, 40), generator=torch.Generator().manual_seed(4))
    plain, fast = (nano.load(pair[0], device="cpu").model for _ in range(2))
    assert "PyTorch" in use_fast_training(fast)
    losses = []
    for model in (plain, fast):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), name
