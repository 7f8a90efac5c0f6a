"""A registry on a read-only mount (an evaluation job on a frozen copy): a Checkpointer
opens, lists and loads; saves return ``None`` with one clear log line. The mount is a
real read-only bind mount; where this machine does not allow one, the tests skip."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid

import pytest
from helpers import assert_tree_equal, small_state

from learnax.checkpoint import Checkpointer, verify


@pytest.fixture
def frozen(tmp_path):
    """(writable registry, the same registry mounted read-only)."""
    source, mount = tmp_path / "registry", tmp_path / f"ro-{uuid.uuid4().hex[:8]}"
    source.mkdir()
    mount.mkdir()
    bind = subprocess.run(["mount", "--bind", str(source), str(mount)], capture_output=True)
    if bind.returncode != 0:
        pytest.skip(f"no bind mounts here: {bind.stderr.decode().strip()}")
    try:
        ro = subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(mount)], capture_output=True, text=True
        )
        if ro.returncode != 0:
            pytest.skip(f"no read-only remount here: {ro.stderr.strip()}")
        yield str(source), str(mount)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _fill(registry: str) -> None:
    ckpt = Checkpointer(registry, "run", keep_best=True)
    ckpt.save_checkpoint(small_state(1), step=1)
    ckpt.save_latest(small_state(2), step=2)
    ckpt.update_best_checkpoint(small_state(2), 0.5, step=2)
    # What an interrupted save leaves: the frozen copy's Checkpointer must not try to clean it.
    os.makedirs(os.path.join(ckpt.checkpoint_dir, "state_3"))


def test_a_checkpointer_on_a_read_only_registry_lists_and_loads(frozen, caplog):
    source, mount = frozen
    _fill(source)
    with pytest.raises(OSError):
        open(os.path.join(mount, "probe"), "w")  # the mount really is read-only
    ckpt = Checkpointer(mount, "run", keep_best=True, save_every=1, checkpoint_every=1)
    assert set(ckpt.list_available_checkpoints()) == {"latest", "best", "step_1"}
    assert_tree_equal(small_state(2), ckpt.load_latest()["state"])
    assert ckpt.load_checkpoint(1)["step"] == 1
    assert ckpt.best_metric_value == 0.5
    assert verify(mount) == []

    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="learnax"):
        assert ckpt.save_checkpoint(small_state(3), step=3) is None
        assert ckpt.maybe_save_checkpoints(small_state(4), 4, {"val/loss": 0.1}) == {}
        assert ckpt.save_latest(small_state(5), step=5) is None
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "not writable (Read-only file system)" in errors[0].getMessage()
    assert ckpt.load_latest()["step"] == 2  # nothing changed


def test_a_run_missing_from_a_read_only_registry_opens_empty(frozen):
    _, mount = frozen
    ckpt = Checkpointer(mount, "absent")
    assert ckpt.list_available_checkpoints() == {}
    assert ckpt.load_latest() is None


def test_the_command_line_reads_a_read_only_registry(frozen):
    source, mount = frozen
    _fill(source)
    for command in (["ls", mount], ["verify", mount], ["show", f"{mount}/run/checkpoints/state_1"]):
        done = subprocess.run(
            [sys.executable, "-m", "learnax", *command], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
