"""`nanokit generate` on the command line."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from nano.cli import main


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


def test_default_model_is_a_tiny_random_one_and_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert main(["generate", "--budget", "4", "--max-new-tokens", "12", "hi"]) == 0
    captured = capsys.readouterr()
    assert "RANDOM weights" in captured.err
    assert (tmp_path / "nanokit" / "tiny-random-v1" / "config.json").exists()


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
