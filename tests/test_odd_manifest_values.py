"""Odd values in a well-formed manifest (a valid checksum, so only the readers' own
checks stand between them and the user): a time far from now or not finite, huge
steps, extreme metrics. Inspection reports them or calls the checkpoint damaged, the
command line prints them, and nothing ends in a traceback. And a path that is a
regular file is no checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import rewrite_manifest, rewrite_manifest_text, scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnax import cli
from learnax.checkpoint import (
    CheckpointCorruptedError,
    Checkpointer,
    list_checkpoints,
    read_info,
)

SRC_DIR = Path(__file__).resolve().parent.parent / "src"

# Every kind of number JSON (and Python's reader, which takes NaN and Infinity) can hold.
_numbers = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(10**300), 10**300),
    st.sampled_from([0, -1, 1e300, -1e300, 2**63, -(2**63), 10**4000, 253402300800]),
)
_not_numbers = st.one_of(st.none(), st.booleans(), st.text(max_size=5), st.lists(st.none()))
# Mostly what a reader accepts, so that the values get as far as being printed.
_steps = st.one_of(st.integers(0, 10**4000), st.integers(0, 10**6), _numbers, _not_numbers)
_times = st.one_of(_numbers, _not_numbers)
_metrics = st.dictionaries(st.text(max_size=5), st.one_of(_numbers, _numbers, _not_numbers))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, bytes]:
    """A run with one checkpoint, and the pristine bytes of its manifest."""
    registry = tmp_path_factory.mktemp("odd")
    ckpt = Checkpointer(str(registry), "run")
    path = Path(ckpt.save_checkpoint({"w": np.arange(3.0)}, step=1, metrics={"loss": 0.5}))
    return path, (path / "manifest.json").read_bytes()


def _fresh_copy(saved: tuple[Path, bytes], tmp_path: Path) -> Path:
    """A copy of the saved checkpoint with its pristine manifest, in a run of its own."""
    path = tmp_path / "run" / "checkpoints" / "state_1"
    shutil.copytree(saved[0], path)
    (path / "manifest.json").write_bytes(saved[1])
    return path


def _run_cli_in_process(*args: str) -> tuple[int, str]:
    """``learnax ARGS`` in this process: its exit status and its output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = cli.main(list(args))
    return status, out.getvalue()


@settings(max_examples=scaled(15, 60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(time=_times, step=_steps, metrics=_metrics)
def test_odd_time_step_and_metrics_are_reported_or_damaged_never_raised(saved, time, step, metrics):
    path, pristine = saved
    (path / "manifest.json").write_bytes(pristine)
    rewrite_manifest(path, lambda m: m.update(time=time, step=step, metrics=metrics))

    (summary,) = list_checkpoints(str(path.parent.parent))
    assert summary.status in ("ok", "damaged")
    try:
        info = read_info(str(path))
    except CheckpointCorruptedError:
        assert summary.status == "damaged"
    else:
        assert summary.status == "ok"
        assert (info.step, info.time) == (step, time) or math.isnan(info.time)
    status, output = _run_cli_in_process("ls", str(path.parent.parent))
    assert status == 0, output  # a damaged checkpoint is a row of the listing
    status, output = _run_cli_in_process("show", str(path))
    assert status == (0 if summary.status == "ok" else 1), output


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param({"time": 1e300}, id="huge-time"),
        pytest.param({"time": -1e300}, id="huge-negative-time"),
        pytest.param({"time": -1.5e9}, id="negative-time"),
        pytest.param({"time": 10**300}, id="huge-int-time"),
        pytest.param({"step": 10**4000}, id="huge-step"),
        pytest.param({"metrics": {"big": 10**4000, "max": 1.7976931348623157e308}}, id="metrics"),
    ],
)
def test_the_command_line_prints_odd_values_without_a_traceback(saved, tmp_path, edit):
    path = _fresh_copy(saved, tmp_path)
    rewrite_manifest(path, lambda m: m.update(edit))
    listing, shown = (_run_cli_subprocess(*c) for c in (["ls", path.parent.parent], ["show", path]))
    for done in (listing, shown):
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
    assert [line.split()[0] for line in listing.stdout.splitlines()] == ["name", "1"]
    assert f"checkpoint  {path}" in shown.stdout


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_time_that_is_not_finite_prints_as_it_is(saved, tmp_path, literal):
    path = _fresh_copy(saved, tmp_path)
    rewrite_manifest_text(path, lambda body: body.replace('"time":', f'"time":{literal},"_":', 1))
    status, output = _run_cli_in_process("show", str(path))
    assert status == 0, output
    time_line = next(line for line in output.splitlines() if line.startswith("time"))
    assert time_line.split()[1] in ("nan", "inf", "-inf")


def _run_cli_subprocess(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(SRC_DIR)}
    return subprocess.run(
        [sys.executable, "-m", "learnax", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


# --- a path that is a regular file ---------------------------------------------------------


def test_load_checkpoint_of_a_regular_file_is_no_checkpoint(make_checkpointer, tmp_path):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint({"w": np.ones(2)}, step=1)
    plain = tmp_path / "notes.txt"
    plain.write_text("not a checkpoint")
    assert ckpt.load_checkpoint(str(plain)) is None
    assert ckpt.load_checkpoint(str(plain / "state_1")) is None
    assert ckpt.load_checkpoint(1)["step"] == 1


def test_read_info_of_a_regular_file_raises_file_not_found(tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("not a checkpoint")
    with pytest.raises(FileNotFoundError):
        read_info(str(plain))


def test_a_checkpoint_whose_manifest_is_a_directory_is_not_committed(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint({"w": np.ones(2)}, step=1)
    os.makedirs(Path(ckpt.checkpoint_dir) / "state_5" / "manifest.json")
    assert ckpt.load_checkpoint(5) is None
    assert ckpt.load_latest()["step"] == 1
