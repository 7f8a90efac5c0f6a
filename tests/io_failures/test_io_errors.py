"""I/O failures during a save: the save returns None, the cause is logged on the
``learnax`` logger, and every earlier checkpoint stays intact and loadable."""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

import pytest
from helpers import assert_tree_equal, checkpoint_dir_entries, learnax_errors, small_state

from learnax.checkpoint import Checkpointer

# Each entry patches the os functions a local commit must go through: flushing the
# data to disk, or the atomic rename that makes it visible.
FAILURES = {
    "disk-full-on-fsync": ("fsync", "fdatasync"),
    "disk-full-on-rename": ("replace", "rename"),
}


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(params=sorted(FAILURES))
def failing_disk(request, monkeypatch):
    """Calling the fixture value breaks the disk; calling ``.undo()`` repairs it."""

    class Disk:
        def fail(self):
            for name in FAILURES[request.param]:
                if hasattr(os, name):
                    monkeypatch.setattr(os, name, _enospc)

        def undo(self):
            monkeypatch.undo()

    return Disk()


def test_failed_save_returns_none_and_logs_on_learnax_logger(
    make_checkpointer, failing_disk, caplog
):
    ckpt = make_checkpointer()
    failing_disk.fail()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        assert ckpt.save_checkpoint(small_state(), step=1) is None
    assert learnax_errors(caplog)


def test_failed_save_leaves_earlier_checkpoints_loadable_and_listed(
    make_checkpointer, failing_disk
):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    ckpt.save_latest(small_state(1), step=1)
    listing = ckpt.list_available_checkpoints()

    failing_disk.fail()
    assert ckpt.save_checkpoint(small_state(2), step=2) is None
    failing_disk.undo()

    assert ckpt.list_available_checkpoints() == listing
    assert ckpt.load_checkpoint(2) is None
    assert_tree_equal(small_state(1), ckpt.load_checkpoint(1)["state"])
    assert ckpt.load_latest()["step"] == 1


def test_failed_overwrite_of_latest_keeps_the_previous_latest(make_checkpointer, failing_disk):
    ckpt = make_checkpointer()
    ckpt.save_latest(small_state(1), step=1)

    failing_disk.fail()
    assert ckpt.save_latest(small_state(2), step=2) is None
    failing_disk.undo()

    loaded = ckpt.load_latest()
    assert loaded["step"] == 1
    assert_tree_equal(small_state(1), loaded["state"])


def test_save_works_again_once_the_disk_is_repaired(make_checkpointer, failing_disk):
    ckpt = make_checkpointer()
    failing_disk.fail()
    assert ckpt.save_checkpoint(small_state(2), step=2) is None
    failing_disk.undo()

    path = ckpt.save_checkpoint(small_state(2), step=2)
    assert path is not None
    assert list(ckpt.list_available_checkpoints()) == ["step_2"]
    assert_tree_equal(small_state(2), ckpt.load_checkpoint(2)["state"])


def test_failed_save_is_cleaned_up_by_the_next_checkpointer(make_checkpointer, failing_disk):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    failing_disk.fail()
    assert ckpt.save_checkpoint(small_state(2), step=2) is None
    failing_disk.undo()

    restarted = make_checkpointer()
    assert checkpoint_dir_entries(restarted.checkpoint_dir) == {"state_1"}


def test_maybe_save_checkpoints_reports_no_key_for_a_failed_save(make_checkpointer, failing_disk):
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1)
    failing_disk.fail()
    assert ckpt.maybe_save_checkpoints(small_state(), 1) == {}


def test_failed_best_save_does_not_change_best_metric_value(make_checkpointer, failing_disk):
    ckpt = make_checkpointer(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(1), 0.5, step=1) is True

    failing_disk.fail()
    assert ckpt.update_best_checkpoint(small_state(2), 0.1, step=2) is False
    assert ckpt.best_metric_value == 0.5
    failing_disk.undo()

    assert ckpt.load_best()["step"] == 1
    assert ckpt.update_best_checkpoint(small_state(3), 0.1, step=3) is True
    assert ckpt.best_metric_value == 0.1


def test_checkpoint_dir_replaced_by_a_file_makes_saves_return_none(make_checkpointer, caplog):
    ckpt = make_checkpointer()
    shutil.rmtree(ckpt.checkpoint_dir)
    Path(ckpt.checkpoint_dir).write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="learnax"):
        assert ckpt.save_checkpoint(small_state(), step=1) is None
        assert ckpt.save_latest(small_state(), step=1) is None
    assert learnax_errors(caplog)


def test_registry_path_through_a_regular_file_raises_os_error_at_construction(tmp_path):
    # The checkpoint directory cannot be created: the Checkpointer refuses at once
    # rather than failing every later save.
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(OSError):
        Checkpointer(str(blocker / "registry"), "run")
    assert blocker.read_text() == "a file where a directory should be"


def test_failure_of_an_early_flush_while_writing_a_large_state_fails_the_save(
    make_checkpointer, monkeypatch, caplog
):
    """A state of tens of MB is flushed to disk by a helper thread while it is still
    being written; an I/O error there fails the save like one in the final fsync."""
    import numpy as np

    ckpt = make_checkpointer()
    # 96 MiB in 24 leaves: written in batches, flushed between them.
    big = {f"w{i}": np.full(1 << 20, i, dtype=np.float32) for i in range(24)}
    before = ckpt.save_checkpoint(small_state(1), step=1)
    flushes = []

    def failing_fdatasync(fd):
        flushes.append(fd)
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    with caplog.at_level(logging.WARNING, logger="learnax"):
        assert ckpt.save_checkpoint(big, step=2) is None
    assert flushes, "the early flush never ran: the state is too small to test it"
    assert "Input/output error" in " ".join(r.getMessage() for r in learnax_errors(caplog))
    assert ckpt.list_available_checkpoints() == {"step_1": before}
    monkeypatch.undo()
    assert ckpt.save_checkpoint(big, step=2) is not None
    assert_tree_equal(big, ckpt.load_checkpoint(2)["state"])
