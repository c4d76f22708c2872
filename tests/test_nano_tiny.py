"""nano-tiny, the shipped arithmetic reasoner: loads by name, reasons, answers, obeys budgets."""

from __future__ import annotations

import random
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import nano
from nano.arithmetic import boxed, sample


@pytest.fixture(scope="module")
def tiny_reasoner():
    return nano.load("nano-tiny")


def test_loads_by_name_with_all_three_layer_kinds(tiny_reasoner):
    pattern = tiny_reasoner.config.hybrid_override_pattern
    assert set(pattern) == {"M", "*", "-"}
    weights = Path(tiny_reasoner.path) / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    assert (Path(tiny_reasoner.path) / "README.md").exists()


def test_solves_fresh_problems(tiny_reasoner):
    rng = random.Random(7)  # not a training seed
    problems = [sample(rng) for _ in range(24)]
    out = nano.generate(tiny_reasoner, [p.question for p in problems], max_new_tokens=4096)
    correct = sum(boxed(g.answer) == p.value for p, g in zip(problems, out))
    assert correct >= 20, f"{correct}/24 right"
    assert all(g.finish_reason == "eos" and g.reasoning.strip().endswith(str(p.value)) for p, g in zip(problems, out) if boxed(g.answer) == p.value)


def test_a_budget_cuts_the_trace_and_an_answer_follows(tiny_reasoner):
    g = nano.generate(tiny_reasoner, "What is 347 + 58 * 6 - 12?", budget=64)
    assert g.budget_hit and 64 <= g.reasoning_tokens <= 70
    assert boxed(g.answer) is not None and g.finish_reason == "eos"
    full = nano.generate(tiny_reasoner, "What is 347 + 58 * 6 - 12?")
    assert not full.budget_hit and boxed(full.answer) == 683


def test_reasoning_off_answers_directly(tiny_reasoner):
    for g in (nano.generate(tiny_reasoner, "What is 3 + 4?", think=False), nano.generate(tiny_reasoner, "What is 3 + 4? /no_think")):
        assert g.reasoning_tokens == 0 and boxed(g.answer) is not None


def test_the_wheel_ships_the_model(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(root)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("nanokit-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for file in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "README.md"):
        assert f"nano/models/nano-tiny/{file}" in names
