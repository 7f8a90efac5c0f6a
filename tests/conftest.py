"""Shared fixtures of the learnax.checkpoint test suite (helpers are in helpers.py).

Every test gets its own registry under pytest's ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from learnax.checkpoint import Checkpointer


@pytest.fixture
def registry(tmp_path: Path) -> str:
    """A fresh registry directory (not created yet: the Checkpointer creates it)."""
    return str(tmp_path / "registry")


@pytest.fixture
def make_checkpointer(registry):
    """``make_checkpointer(run_id="run", **kwargs)`` -> Checkpointer on the test registry."""

    def make(run_id: str = "run", **kwargs) -> Checkpointer:
        return Checkpointer(registry, run_id, **kwargs)

    return make
