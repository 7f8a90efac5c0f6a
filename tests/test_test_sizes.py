"""The suite's two sizes (tests/conftest.py): a quick default, and the full strength CI
runs with ``LEARNAX_FULL_TESTS=1`` or ``--runslow``. If the switch broke, CI would
quietly run the quick size, so it is tested here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FULL_TESTS_VARIABLE, full_tests, scaled
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent
PROBE_VARIABLE = "LEARNAX_TEST_SIZES_PROBE"


@pytest.mark.parametrize(
    "value, full",
    [(None, False), ("", False), ("0", False), ("false", False), ("No", False)]
    + [("1", True), ("yes", True), ("true", True)],
)
def test_the_variable_turns_the_full_sweep_on(monkeypatch, value, full):
    if value is None:
        monkeypatch.delenv(FULL_TESTS_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(FULL_TESTS_VARIABLE, value)
    assert full_tests() is full
    assert scaled("quick", "full") == ("full" if full else "quick")


def test_hypothesis_profile_follows_the_size(pytestconfig):
    if pytestconfig.getoption("hypothesis_profile", None):
        pytest.skip("a Hypothesis profile was chosen on the command line")
    assert settings.default.max_examples == (100 if full_tests() else 50)


@pytest.mark.skipif(not os.environ.get(PROBE_VARIABLE), reason="run by the test below")
def test_probe_prints_the_sizes_it_runs_at():
    child = subprocess.run(
        [sys.executable, "-c", f"import os; print(os.environ.get('{FULL_TESTS_VARIABLE}'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    sizes = {
        "full": full_tests(),
        "max_examples": settings.default.max_examples,
        "child": child.stdout.strip(),
    }
    print("PROBE", json.dumps(sizes))


def test_runslow_runs_the_full_sweep_here_and_in_the_processes_tests_start():
    env = {k: v for k, v in os.environ.items() if k != FULL_TESTS_VARIABLE}
    env[PROBE_VARIABLE] = "1"
    probe = f"{Path(__file__).relative_to(ROOT)}::test_probe_prints_the_sizes_it_runs_at"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-s",
            "-p",
            "no:cacheprovider",
            "-n",
            "0",  # in this process: -s shows the probe's line
            "--runslow",
            probe,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("PROBE "))
    assert json.loads(line.removeprefix("PROBE ")) == {
        "full": True,
        "max_examples": 100,
        "child": "1",
    }
    assert "at full strength" in done.stdout
