"""The local back-end on other POSIX systems: without ``os.fdatasync`` (macOS) the
early flush of a large file uses ``os.fsync``, and where ``fcntl.F_FULLFSYNC`` exists
(macOS, whose ``fsync`` leaves data in the drive's cache) it makes files durable, with
``fsync`` as the fallback on filesystems that do not support it."""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest
from helpers import assert_tree_equal, small_state

fcntl = pytest.importorskip("fcntl")

F_FULLFSYNC = 51  # its value on macOS; Linux has none, so the tests lend it one

# 96 MiB in 24 leaves: written in batches and flushed by the helper thread meanwhile.
BIG = {f"w{i}": np.full(1 << 20, i, dtype=np.float32) for i in range(24)}


@pytest.fixture
def fsync_calls(monkeypatch) -> list[str]:
    """``os.fsync`` still syncs, and records the name of the thread calling it."""
    calls: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(threading.current_thread().name)
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


@pytest.fixture
def thread_errors(monkeypatch) -> list[BaseException]:
    """Exceptions that ended a thread (a helper thread dying is otherwise silent)."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


def _fake_fcntl(monkeypatch, outcome: OSError | None) -> list[int]:
    """Lend ``fcntl`` an ``F_FULLFSYNC`` that succeeds (``outcome`` None) or raises
    ``outcome``; other fcntl commands work as before. Returns the fds it was called on."""
    calls: list[int] = []
    real_fcntl = fcntl.fcntl

    def fake(fd, cmd, *args):
        if cmd != F_FULLFSYNC:
            return real_fcntl(fd, cmd, *args)
        calls.append(fd)
        if outcome is not None:
            raise outcome
        return 0

    monkeypatch.setattr(fcntl, "F_FULLFSYNC", F_FULLFSYNC, raising=False)
    monkeypatch.setattr(fcntl, "fcntl", fake)
    return calls


def test_without_fdatasync_the_early_flush_falls_back_to_fsync(
    make_checkpointer, monkeypatch, fsync_calls, thread_errors
):
    monkeypatch.delattr(os, "fdatasync", raising=False)
    ckpt = make_checkpointer()
    assert ckpt.save_checkpoint(BIG, step=1) is not None
    assert thread_errors == []
    assert "learnax-flush" in fsync_calls, "the early flush did not use os.fsync"
    assert_tree_equal(BIG, ckpt.load_checkpoint(1)["state"])


def test_without_fdatasync_async_saves_work(make_checkpointer, monkeypatch, thread_errors):
    monkeypatch.delattr(os, "fdatasync", raising=False)
    with make_checkpointer(async_save=True) as ckpt:
        ckpt.save_checkpoint(BIG, step=1)
    assert thread_errors == []
    assert_tree_equal(BIG, ckpt.load_checkpoint(1)["state"])


def test_f_fullfsync_makes_files_durable_where_it_exists(make_checkpointer, monkeypatch):
    full_syncs = _fake_fcntl(monkeypatch, None)
    ckpt = make_checkpointer()
    assert ckpt.save_checkpoint(small_state(), step=1) is not None
    # The data file, the manifest, and the directory before and after the rename.
    assert len(full_syncs) >= 4
    assert_tree_equal(small_state(), ckpt.load_checkpoint(1)["state"])


@pytest.mark.parametrize("code", [errno.ENOTSUP, errno.EINVAL, errno.ENOTTY])
def test_f_fullfsync_unsupported_by_the_filesystem_falls_back_to_fsync(
    make_checkpointer, monkeypatch, fsync_calls, code
):
    full_syncs = _fake_fcntl(monkeypatch, OSError(code, os.strerror(code)))
    ckpt = make_checkpointer()
    assert ckpt.save_checkpoint(small_state(), step=1) is not None
    assert full_syncs and len(fsync_calls) >= len(full_syncs)
    assert_tree_equal(small_state(), ckpt.load_checkpoint(1)["state"])


def test_an_io_error_of_f_fullfsync_fails_the_save(make_checkpointer, monkeypatch):
    ckpt = make_checkpointer()
    before = ckpt.save_checkpoint(small_state(1), step=1)
    _fake_fcntl(monkeypatch, OSError(errno.EIO, "Input/output error"))
    assert ckpt.save_checkpoint(small_state(2), step=2) is None
    assert ckpt.list_available_checkpoints() == {"step_1": before}
