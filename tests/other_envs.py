"""Virtual environments holding the real consumers of our outputs, at the releases users run.

TensorRT-LLM 1.2.1 pins transformers 4.57.3, and TensorRT Edge-LLM's exporter pins transformers
5.14.1; neither fits beside nanokit's own transformers, so each gets a virtual environment of its
own, made once per machine under `$NANOKIT_TEST_ENVS` (default `~/.cache/nanokit/test-envs`) and
reused. A folder counts as made only once its installs finished (a marker written last), so an
interrupted set-up is made again. Where the packages cannot be installed (no registry), the tests
that need them skip and say why.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("NANOKIT_TEST_ENVS", Path.home() / ".cache" / "nanokit" / "test-envs"))
DONE = ".installed"

TRANSFORMERS_4 = ("transformers==4.57.3", "jinja2")  # TensorRT-LLM 1.2.1's pin; jinja2 for chat templates
# Edge-LLM 0.11.0 with its export pins, and its quantizer's (the [tools] extra's pins of what quantize.py imports).
EDGELLM = ("torch==2.13.0", "tensorrt-edgellm[export]==0.11.0", "nvidia-modelopt==0.45.0", "datasets==5.0.0",
           "tqdm==4.69.0", "einops==0.8.2")


def python_with(name: str, requirements: tuple[str, ...], timeout: float = 1800) -> Path:
    """The interpreter of the environment `name` holding `requirements`; made here if need be.
    Skips the calling test where it cannot be made."""
    key = hashlib.sha256("\n".join(requirements).encode()).hexdigest()[:10]
    folder = ROOT / f"{name}-{key}"
    python = folder / "bin" / "python"
    if (folder / DONE).exists():
        return python
    folder.parent.mkdir(parents=True, exist_ok=True)
    log = folder.with_suffix(".log")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True, capture_output=True,
                       timeout=timeout)
        with open(log, "w") as out:
            subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *requirements],
                           check=True, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as e:
        tail = log.read_text()[-800:] if log.exists() else ""
        pytest.skip(f"could not make the {name} environment ({' '.join(requirements)}): {e}\n{tail}")
    (folder / DONE).write_text("\n".join(requirements) + "\n")
    return python


def run_in(python: Path, code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `code` in that environment (its own site-packages only: nanokit is not on its path)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run([str(python), "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(ROOT))
