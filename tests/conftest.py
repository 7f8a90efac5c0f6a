"""Shared fixtures of the learnax.checkpoint test suite (helpers are in helpers.py).

Every test gets its own registry under pytest's ``tmp_path``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Most tests check what a run directory holds once superseded data files are gone:
# remove them at once, here and in the processes tests start. The tests of readers
# racing a writer set a grace time of their own (tests/test_live_readers.py).
os.environ.setdefault("LEARNAX_SUPERSEDED_GRACE_S", "0")

from learnax.checkpoint import Checkpointer  # noqa: E402


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


@pytest.fixture(scope="session")
def moto_server():
    """A moto S3 server on 127.0.0.1 for the whole session (tests/moto_server.py)."""
    from moto_server import MotoServer

    server = MotoServer().start()
    yield server
    server.close()
