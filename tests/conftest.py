"""Shared fixtures of the learnax.checkpoint test suite (helpers are in helpers.py).

Every test gets its own registry under pytest's ``tmp_path``.

Two sizes: by default the long fuzzers, kill loops and live races run at a quick size
(fewer Hypothesis examples, kills and seconds; every case still runs), so that
``python -m pytest`` takes a few minutes on 2 cores. ``LEARNAX_FULL_TESTS=1`` or
``--runslow`` runs them at full strength, as CI does (``helpers.full_tests``,
``helpers.scaled``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Most tests check what a run directory holds once superseded data files are gone:
# remove them at once, here and in the processes tests start. The tests of readers
# racing a writer set a grace time of their own (tests/test_live_readers.py).
os.environ.setdefault("LEARNAX_SUPERSEDED_GRACE_S", "0")

from helpers import FULL_TESTS_VARIABLE, full_tests  # noqa: E402
from hypothesis import settings  # noqa: E402

from learnax.checkpoint import Checkpointer  # noqa: E402

# Hypothesis's examples for the tests that do not set their own (those that do scale
# them with helpers.scaled): its default of 100 in the full sweep, half by default.
settings.register_profile("learnax-quick", max_examples=50)
settings.register_profile("learnax-full", max_examples=100)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help=(
            f"run the long fuzzers, kill loops and live races at full strength "
            f"(as {FULL_TESTS_VARIABLE}=1 does; CI's run)"
        ),
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--runslow"):
        # Before the test modules are imported (their sizes are read then), and in the
        # environment, so the processes tests start run at full strength too.
        os.environ[FULL_TESTS_VARIABLE] = "1"
    if not config.getoption("hypothesis_profile", None):  # an explicit one wins
        settings.load_profile("learnax-full" if full_tests() else "learnax-quick")


def pytest_report_header(config: pytest.Config) -> str:
    return f"learnax: {_size_line()}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    terminalreporter.write_line(f"learnax: {_size_line()}")


def _size_line() -> str:
    if full_tests():
        return "the long fuzzers, kill loops and live races at full strength"
    return (
        "the long fuzzers, kill loops and live races at their quick size "
        f"({FULL_TESTS_VARIABLE}=1 or --runslow: full strength, as in CI)"
    )


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
