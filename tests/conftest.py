import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))  # the test helpers (scripted.py, twins/, ...)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random-weight NemotronH checkpoint folder (all three layer kinds), built once."""
    from nano.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    import nano

    return nano.load(tiny_dir)
