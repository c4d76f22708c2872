"""Nano toolkit: load, budget-controlled generation and deployment for NVIDIA's small Nemotron models."""

from .chat import ChatError, ChatFormat
from .checkpoint import CheckpointError, Model, load
from .config import ConfigError
from .generate import Event, Generation, Stream, generate

__all__ = [
    "load",
    "generate",
    "Model",
    "Generation",
    "Event",
    "Stream",
    "ChatFormat",
    "CheckpointError",
    "ChatError",
    "ConfigError",
]
__version__ = "0.1.0"
