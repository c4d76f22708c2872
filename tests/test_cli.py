"""`nanokit generate` on the command line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nano.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_generate_prints_reasoning_answer_and_counts(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--budget", "8", "--max-new-tokens", "30", "What is 2+2?"]) == 0
    out = capsys.readouterr().out
    assert out.index("── reasoning ──") < out.index("── answer ──")
    counts = re.search(r"reasoning (\d+) tokens \(budget 8, grace 1(; cut by the controller)?\) · answer (\d+) tokens", out)
    assert counts and int(counts.group(1)) <= 9


def test_stream(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--budget", "4", "--stream", "--max-new-tokens", "20", "hi"]) == 0
    out = capsys.readouterr().out
    assert "── reasoning ──" in out and "reasoning 5 tokens (budget 4, grace 1; cut by the controller)" in out


def test_no_think(tiny_dir, capsys):
    assert main(["generate", "--model", str(tiny_dir), "--no-think", "--max-new-tokens", "10", "hi"]) == 0
    out = capsys.readouterr().out
    assert "── reasoning ──" not in out and "reasoning 0 tokens" in out


def test_default_model_is_nano_tiny_and_says_so(capsys):
    assert main(["generate", "--budget", "16", "--max-new-tokens", "40", "What is 2 + 3?"]) == 0
    captured = capsys.readouterr()
    assert "using nano-tiny" in captured.err
    assert "2+3" in captured.out  # the trace starts by restating the expression
    reasoning = int(re.search(r"reasoning (\d+) tokens \(budget 16, grace 1", captured.out).group(1))
    assert reasoning <= 17


def test_bad_budget_is_refused(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", "--budget", "-2", "hi"])
    assert exit.value.code == 2
    assert "expected a number >= 0, got -2" in capsys.readouterr().err


def test_bad_model_folder_is_an_error_not_a_traceback(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "hi"]) == 2
    assert f"nanokit generate: error: {tmp_path}: no config.json" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("nanokit") is None, reason="the console script is installed with the package")
def test_console_script(tiny_dir):
    done = subprocess.run(
        ["nanokit", "generate", "--model", str(tiny_dir), "--budget", "3", "--max-new-tokens", "10", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "reasoning 4 tokens" in done.stdout


def test_module_entry(tiny_dir):
    done = subprocess.run(
        [sys.executable, "-m", "nano.cli", "generate", "--model", str(tiny_dir), "--budget", "0", "--max-new-tokens", "5", "hi"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr


_WITHOUT_TORCH = """
import builtins, sys
real = builtins.__import__
def refuse(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
        raise ImportError("torch imported")
    return real(name, *args, **kwargs)
builtins.__import__ = refuse
from nano.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_planner_and_dry_runs_start_without_torch(tmp_path):
    from nano.shapes import shape_config

    nine = tmp_path / "nano-9b"
    shape_config("nano-9b-v2").save_pretrained(nine)
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(ROOT / "nano" / "models" / "nano-tiny" / name, nine / name)
    commands = [
        ["--help"],
        ["plan", "--config", str(nine / "config.json"), "--gpu", "a10g"],
        ["plan", "--model", str(nine), "--jetson"],
        ["plan", "--config", str(ROOT / "tests" / "data" / "ultra_config.json"), "--gpu", "h100", "--tp", "8"],
        ["export", "trtllm", "--model", str(nine), "--gpu", "a10g", "--dry-run"],
        ["export", "trtllm", "--model", "nano-tiny", "--gpu", "l4", "--dry-run"],
        ["export", "edgellm", "--model", str(nine), "--quant", "int4_awq", "--dry-run"],
        ["prune", "--teacher", str(nine), "--hidden", "4096", "--ffn", "12288", "--dry-run"],
        ["prune", "--teacher", str(nine), "--params", "7e9", "--layers", "52", "--dry-run"],
        ["prune", "--teacher", "nano-tiny", "--layers", "4", "--dry-run"],
    ]
    for command in commands:
        done = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH, *command], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
