"""Nano toolkit: load, budget-controlled generation and deployment for NVIDIA's small Nemotron models.

The names below are imported on first use, so that what needs no model (the planner, `--dry-run`,
`--help`) starts without torch and transformers.
"""

from __future__ import annotations

from importlib import import_module

_HOMES = {
    "load": "checkpoint", "Model": "checkpoint", "CheckpointError": "checkpoint",
    "generate": "generation", "Generation": "generation", "Event": "generation", "Stream": "generation",
    "ChatFormat": "chat", "ChatError": "chat",
    "ConfigError": "config",
}

__all__ = list(_HOMES)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nano' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_HOMES])
