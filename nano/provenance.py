"""Where a measurement came from: the commit of the code that ran and the device it ran on."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit(root: str | os.PathLike = ROOT) -> str:
    """The commit measured: $NANO_COMMIT where set (the GPU machines get a copy whose git metadata
    is not the tree's), else git's HEAD at `root`, marked +uncommitted if tracked files changed."""
    if os.environ.get("NANO_COMMIT"):
        return os.environ["NANO_COMMIT"]
    try:
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout
        return head + ("+uncommitted" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: str) -> str:
    """The GPU's name for a CUDA device; the processor, cores and torch version otherwise."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"
