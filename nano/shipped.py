"""The checkpoints shipped inside the package, found by short name ("nano-tiny").

No torch here: a `--model nano-tiny` is resolved before anything is loaded (the planner, `--dry-run`).
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

SHIPPED = {"nano-tiny": "models/nano-tiny"}


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint folder: `path` itself, or a shipped checkpoint's folder for its short name."""
    if str(path) in SHIPPED and not Path(path).exists():
        return Path(str(resources.files("nano").joinpath(SHIPPED[str(path)])))
    return Path(path)
