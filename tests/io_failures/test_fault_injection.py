"""Disk full and I/O errors at every step of a save, and during retention.

Each case makes one ``os`` call of the save fail with ENOSPC, EIO or EACCES, but only
for the files and directories of the test's registry (file descriptors are traced
back to their paths through ``/proc/self/fd``), and keeps it failing until the test
repairs the disk. Then, whatever the step:

- the save returns ``None`` (async: ``wait_until_finished()`` raises
  ``CheckpointSaveError``) and the ``learnax`` logger says why;
- every earlier checkpoint (numbered, latest, best) is listed as before and loads
  bit-identical; no partial checkpoint is listed and no stray file is left, neither in
  the committed checkpoint directories nor beside them;
- once the disk is repaired, the same save works.

A failure to delete an old checkpoint during retention only logs a warning: the old
checkpoint is then either still listed and loadable, or gone from the listing, never
listed but broken. The last test fills a real (small tmpfs) filesystem.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import os
import shutil
import stat
import subprocess
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    assert_tree_equal,
    checkpoint_dir_entries,
    learnax_errors,
    nothing_damaged,
    small_state,
)

from learnax.checkpoint import Checkpointer, CheckpointSaveError

ERRNOS = {
    "ENOSPC": errno.ENOSPC,
    "EIO": errno.EIO,
    "EACCES": errno.EACCES,
}

# A state above the 16 MB after which the writer flushes with fdatasync from a helper
# thread while it goes on writing: 48 MiB in 12 leaves.
_BIG_LEAVES = 12


def big_state(seed: int) -> dict:
    return {f"w{i}": np.full(1 << 20, seed * 100 + i, dtype=np.float32) for i in range(_BIG_LEAVES)}


def _fd_path(fd) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{int(fd)}")
    except (OSError, TypeError, ValueError):
        return ""


def _is_dir_fd(fd) -> bool:
    try:
        return stat.S_ISDIR(os.fstat(fd).st_mode)
    except OSError:
        return False


def _name_is(path: str, pattern: str) -> bool:
    return fnmatch.fnmatch(os.path.basename(os.fspath(path)), pattern)


# Where a save can fail: (os function, which of its calls fail). Each predicate gets
# the registry's real path and the call's arguments.
POINTS = {
    "lock-open": (
        "open",
        lambda root, path, *a, **k: _name_is(path, ".learnax.lock"),
    ),
    "mkdir-checkpoint-dir": (
        "mkdir",
        lambda root, path, *a, **k: _name_is(path, "state_*"),
    ),
    "open-data-file": (
        "open",
        lambda root, path, *a, **k: _name_is(path, "data-*.safetensors"),
    ),
    "writev-data-file": (
        "writev",
        lambda root, fd, *a, **k: _name_is(_fd_path(fd), "data-*.safetensors"),
    ),
    "fsync-data-file": (
        "fsync",
        lambda root, fd, *a, **k: _name_is(_fd_path(fd), "data-*.safetensors"),
    ),
    "fdatasync-data-file": (
        "fdatasync",
        lambda root, fd, *a, **k: _name_is(_fd_path(fd), "data-*.safetensors"),
    ),
    "close-data-file": (
        "close",
        lambda root, fd, *a, **k: _name_is(_fd_path(fd), "data-*.safetensors"),
    ),
    "open-temp-manifest": (
        "open",
        lambda root, path, *a, **k: _name_is(path, ".manifest-*.tmp"),
    ),
    "writev-temp-manifest": (
        "writev",
        lambda root, fd, *a, **k: _name_is(_fd_path(fd), ".manifest-*.tmp"),
    ),
    "fsync-temp-manifest": (
        "fsync",
        lambda root, fd, *a, **k: _name_is(_fd_path(fd), ".manifest-*.tmp"),
    ),
    "replace-manifest": (
        "replace",
        lambda root, src, dst, *a, **k: _name_is(dst, "manifest.json"),
    ),
    # A new checkpoint directory is made durable in its parent (fsync of checkpoints/).
    "open-parent-directory-for-fsync": (
        "open",
        lambda root, path, *a, **k: os.path.isdir(path) and _name_is(path, "checkpoints"),
    ),
    "fsync-parent-directory": (
        "fsync",
        lambda root, fd, *a, **k: _is_dir_fd(fd) and _name_is(_fd_path(fd), "checkpoints"),
    ),
    # Before the rename of the manifest (the data files' entries) and after it (the
    # rename itself), the checkpoint directory is fsynced.
    "open-checkpoint-directory-for-fsync": (
        "open",
        lambda root, path, *a, **k: os.path.isdir(path) and _name_is(path, "state_*"),
    ),
    "fsync-checkpoint-directory": (
        "fsync",
        lambda root, fd, *a, **k: _is_dir_fd(fd) and _name_is(_fd_path(fd), "state_*"),
    ),
}

# Points a given kind of save does not reach: only a new directory is created.
UNREACHED = {
    (point, kind)
    for point in (
        "mkdir-checkpoint-dir",
        "open-parent-directory-for-fsync",
        "fsync-parent-directory",
    )
    for kind in ("latest", "best")
}

# Points around the atomic rename (the directory is fsynced before and after it): a
# failure there may leave either the old or the new checkpoint, each complete (as a
# crash would), but never a manifest whose files are gone.
AFTER_COMMIT = {"open-checkpoint-directory-for-fsync", "fsync-checkpoint-directory"}


class Fault:
    """Makes the chosen calls under ``root`` raise ``OSError(err)`` while armed."""

    def __init__(self, monkeypatch, root: str, point: str, err: int):
        self.root = os.path.realpath(root)
        self.err = err
        self.fired = 0
        self._armed = False
        self._lock = threading.Lock()
        name, self._matches = POINTS[point]
        self._real = getattr(os, name)
        self._close = name == "close"
        monkeypatch.setattr(os, name, self._patched)
        if name == "fdatasync":
            # The early flush runs in a helper thread that the writer only wakes; give
            # it time to get there while the rest of the state is written, so that the
            # fault is reached on a busy machine too (no timing is asserted).
            real_writev = os.writev

            def unhurried_writev(fd, *args, **kwargs):
                if self._armed and _name_is(_fd_path(fd), "data-*.safetensors"):
                    time.sleep(0.02)
                return real_writev(fd, *args, **kwargs)

            monkeypatch.setattr(os, "writev", unhurried_writev)

    def _under_root(self, args) -> bool:
        first = args[0] if args else None
        if isinstance(first, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(first))
        else:
            path = _fd_path(first)
        return path == self.root or path.startswith(self.root + os.sep)

    def _patched(self, *args, **kwargs):
        if self._armed and self._under_root(args) and self._matches(self.root, *args, **kwargs):
            with self._lock:
                self.fired += 1
            if self._close:  # the descriptor is gone either way, as with a real EIO
                self._real(*args, **kwargs)
            raise OSError(self.err, os.strerror(self.err))
        return self._real(*args, **kwargs)

    def arm(self) -> None:
        self._armed = True

    def repair(self) -> None:
        self._armed = False


def committed_dirs_are_clean(checkpoint_dir) -> None:
    """Every committed checkpoint holds its manifest and the files it names, nothing else."""
    for entry in Path(checkpoint_dir).iterdir():
        if not entry.is_dir():
            continue
        manifest = json.loads((entry / "manifest.json").read_text())["manifest"]
        assert {p.name for p in entry.iterdir()} == {"manifest.json", *manifest["files"]}, entry


def load_without_warnings(ckpt, what):
    with nothing_damaged():
        return ckpt.load_checkpoint(what)


class Scenario:
    """A run with numbered, latest and best checkpoints at step 1, and one more save."""

    def __init__(self, ckpt: Checkpointer, kind: str, big: bool):
        self.ckpt = ckpt
        self.kind = kind
        self.old = small_state(1)
        self.new = big_state(2) if big else small_state(2)
        self._save(self.old, 1, 0.5)
        assert self.ckpt.best_metric_value == 0.5
        self.listing = ckpt.list_available_checkpoints()
        assert set(self.listing) == {"latest", "best", "step_1"}
        self.entries = checkpoint_dir_entries(ckpt.checkpoint_dir)

    def _save(self, state, step, value):
        ckpt = self.ckpt
        assert ckpt.save_checkpoint(state, step=step) is not None
        assert ckpt.save_latest(state, step=step) is not None
        assert ckpt.update_best_checkpoint(state, value, step=step) is True
        ckpt.wait_until_finished()

    def save_new(self):
        """The save under test; returns what the call returned."""
        if self.kind == "numbered":
            return self.ckpt.save_checkpoint(self.new, step=2)
        if self.kind == "latest":
            return self.ckpt.save_latest(self.new, step=2)
        return self.ckpt.update_best_checkpoint(self.new, 0.1, step=2)

    def saved_name(self) -> str:
        return {"numbered": 2, "latest": "latest", "best": "best"}[self.kind]

    def check_nothing_changed(self, *, or_new: bool = False) -> None:
        """Every earlier checkpoint loads as saved, nothing else is listed or left over.
        With ``or_new``, the checkpoint being saved may instead be the new one, whole."""
        ckpt = self.ckpt
        if or_new:
            # A failure around the commit may leave leftovers (superseded files kept in
            # case the rename does not survive, a directory the failing disk would not
            # let go): the next Checkpointer on the run cleans them.
            Checkpointer(ckpt.registry_path, ckpt.run_id)
        for name in (1, "latest", "best"):
            loaded = load_without_warnings(ckpt, name)
            assert loaded is not None, name
            if or_new and name == self.saved_name() and loaded["step"] == 2:
                assert_tree_equal(self.new, loaded["state"])
                continue
            assert loaded["step"] == 1, name
            assert_tree_equal(self.old, loaded["state"])
        listing = ckpt.list_available_checkpoints()
        entries = checkpoint_dir_entries(ckpt.checkpoint_dir)
        if or_new and "step_2" in listing:
            assert_tree_equal(self.new, load_without_warnings(ckpt, 2)["state"])
            listing.pop("step_2")
            entries.discard("state_2")
        else:
            # An int is a step: with the new latest/best committed, step 2 is that one.
            by_step = ckpt.load_checkpoint(2)
            if or_new and by_step is not None and self.kind != "numbered":
                assert_tree_equal(self.new, by_step["state"])
            else:
                assert by_step is None
        assert listing == self.listing
        assert entries == self.entries
        committed_dirs_are_clean(ckpt.checkpoint_dir)
        assert ckpt.best_metric_value in ((0.5, 0.1) if or_new else (0.5,))

    def check_saved(self) -> None:
        ckpt = self.ckpt
        loaded = load_without_warnings(ckpt, self.saved_name())
        assert loaded["step"] == 2
        assert_tree_equal(self.new, loaded["state"])
        committed_dirs_are_clean(ckpt.checkpoint_dir)
        if self.kind == "best":
            assert ckpt.best_metric_value == 0.1


def fault_cases(kinds):
    cases = []
    for point in POINTS:
        for kind in kinds:
            if (point, kind) in UNREACHED:
                continue
            for err_name in ERRNOS:
                cases.append(pytest.param(point, kind, err_name, id=f"{point}-{kind}-{err_name}"))
    return cases


def _failure_messages(caplog) -> str:
    return " | ".join(r.getMessage() for r in learnax_errors(caplog))


@pytest.mark.parametrize("point, kind, err_name", fault_cases(["numbered", "latest", "best"]))
def test_io_error_during_a_save_returns_none_logs_and_keeps_every_earlier_checkpoint(
    registry, monkeypatch, caplog, point, kind, err_name
):
    err = ERRNOS[err_name]
    ckpt = Checkpointer(registry, "run", keep_best=True)
    scenario = Scenario(ckpt, kind, big=point == "fdatasync-data-file")
    fault = Fault(monkeypatch, registry, point, err)

    fault.arm()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        result = scenario.save_new()
    fault.repair()

    assert fault.fired, f"the save never reached {point}"
    assert result in (None, False), f"a save that hit {err_name} at {point} reported success"
    assert os.strerror(err) in _failure_messages(caplog)
    scenario.check_nothing_changed(or_new=point in AFTER_COMMIT)

    # Once the disk works again, the same save goes through; except a best whose
    # new checkpoint already became visible: it is the best now, so the same value
    # is not strictly better (a worse one must never replace it).
    retried = scenario.save_new()
    if not (point in AFTER_COMMIT and kind == "best" and ckpt.best_metric_value == 0.1):
        assert retried not in (None, False)
    scenario.check_saved()


@pytest.mark.parametrize("point, kind, err_name", fault_cases(["numbered", "latest"]))
def test_io_error_during_an_async_save_is_raised_by_wait_until_finished_and_keeps_every_earlier_checkpoint(
    registry, monkeypatch, caplog, point, kind, err_name
):
    err = ERRNOS[err_name]
    ckpt = Checkpointer(registry, "run", keep_best=True, async_save=True)
    try:
        scenario = Scenario(ckpt, kind, big=point == "fdatasync-data-file")
        fault = Fault(monkeypatch, registry, point, err)

        fault.arm()
        with caplog.at_level(logging.WARNING, logger="learnax"):
            assert scenario.save_new() is not None  # scheduled
            with pytest.raises(CheckpointSaveError) as excinfo:
                ckpt.wait_until_finished()
        fault.repair()

        assert fault.fired, f"the save never reached {point}"
        assert os.strerror(err) in str(excinfo.value)
        assert os.strerror(err) in _failure_messages(caplog)
        scenario.check_nothing_changed(or_new=point in AFTER_COMMIT)

        assert scenario.save_new() is not None
        ckpt.wait_until_finished()
        scenario.check_saved()
    finally:
        ckpt.close()


def test_async_best_save_failure_keeps_best_and_its_metric_value(registry, monkeypatch, caplog):
    ckpt = Checkpointer(registry, "run", keep_best=True, async_save=True)
    try:
        scenario = Scenario(ckpt, "best", big=False)
        fault = Fault(monkeypatch, registry, "fsync-data-file", errno.ENOSPC)
        fault.arm()
        assert scenario.save_new() is True  # scheduled
        with pytest.raises(CheckpointSaveError):
            ckpt.wait_until_finished()
        fault.repair()
        assert fault.fired
        scenario.check_nothing_changed()
        assert scenario.save_new() is True
        ckpt.wait_until_finished()
        scenario.check_saved()
    finally:
        ckpt.close()


def test_io_error_in_maybe_save_checkpoints_reports_nothing_saved_and_keeps_every_earlier_checkpoint(
    registry, monkeypatch, caplog
):
    ckpt = Checkpointer(registry, "run", save_every=2, checkpoint_every=2, keep_best=True)
    first = ckpt.maybe_save_checkpoints(small_state(1), 2, {"val/loss": 0.5})
    assert set(first) == {"latest", "numbered", "best"}
    listing = ckpt.list_available_checkpoints()
    entries = checkpoint_dir_entries(ckpt.checkpoint_dir)
    fault = Fault(monkeypatch, registry, "replace-manifest", errno.ENOSPC)

    fault.arm()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        assert ckpt.maybe_save_checkpoints(small_state(2), 4, {"val/loss": 0.1}) == {}
    fault.repair()

    assert fault.fired == 3  # latest, numbered and best each tried to commit
    assert len(learnax_errors(caplog)) >= 3
    assert ckpt.list_available_checkpoints() == listing
    assert checkpoint_dir_entries(ckpt.checkpoint_dir) == entries
    assert ckpt.best_metric_value == 0.5
    for name in ("latest", "best", 2):
        assert_tree_equal(small_state(1), ckpt.load_checkpoint(name)["state"])
    assert set(ckpt.maybe_save_checkpoints(small_state(2), 4, {"val/loss": 0.1})) == {
        "latest",
        "numbered",
        "best",
    }


# --- retention: a failed deletion only logs -------------------------------------------------


def _in_state_1(path) -> bool:
    return os.path.basename(os.path.dirname(os.fspath(path))) == "state_1"


DELETE_POINTS = {
    # the manifest is removed first: the deletion's commit point
    "remove-manifest": (
        "os",
        "remove",
        lambda path, *a, **k: _in_state_1(path) and _name_is(path, "manifest.json"),
    ),
    "fsync-directory": (
        "os",
        "fsync",
        lambda fd, *a, **k: _is_dir_fd(fd) and _name_is(_fd_path(fd), "state_1"),
    ),
    "rmtree": (
        "shutil",
        "rmtree",
        lambda path, *a, **k: _name_is(path, "state_1"),
    ),
    # inside shutil.rmtree: one data file cannot be unlinked, the directory stays
    "unlink-data-file-in-rmtree": (
        "os",
        "unlink",
        lambda path, *a, **k: _name_is(path, "data-*.safetensors"),
    ),
    "rmdir": (
        "os",
        "rmdir",
        lambda path, *a, **k: _name_is(path, "state_1"),
    ),
}


class DeleteFault:
    def __init__(self, monkeypatch, point: str, err: int):
        module_name, name, self._matches = DELETE_POINTS[point]
        module = {"os": os, "shutil": shutil}[module_name]
        self._real = getattr(module, name)
        self.err = err
        self.fired = 0
        self._armed = False
        monkeypatch.setattr(module, name, self._patched)

    def _patched(self, *args, **kwargs):
        if self._armed and args and self._matches(*args, **kwargs):
            self.fired += 1
            raise OSError(self.err, os.strerror(self.err))
        return self._real(*args, **kwargs)

    def arm(self) -> None:
        self._armed = True

    def repair(self) -> None:
        self._armed = False


def delete_cases():
    return [
        pytest.param(point, err_name, id=f"{point}-{err_name}")
        for point in DELETE_POINTS
        for err_name in ERRNOS
    ]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("point, err_name", delete_cases())
def test_failed_deletion_during_retention_only_warns_and_never_leaves_half_a_checkpoint(
    registry, monkeypatch, caplog, point, err_name, async_save
):
    err = ERRNOS[err_name]
    ckpt = Checkpointer(registry, "run", max_to_keep=1, async_save=async_save)
    try:
        assert ckpt.save_checkpoint(small_state(1), step=1) is not None
        ckpt.wait_until_finished()
        fault = DeleteFault(monkeypatch, point, err)

        fault.arm()
        with caplog.at_level(logging.WARNING, logger="learnax"):
            path = ckpt.save_checkpoint(small_state(2), step=2)
            ckpt.wait_until_finished()  # a failed deletion is no failed save
        fault.repair()

        assert fault.fired, f"retention never reached {point}"
        assert path is not None
        assert_tree_equal(small_state(2), load_without_warnings(ckpt, 2)["state"])
        warnings_logged = [r for r in learnax_errors(caplog) if r.levelno == logging.WARNING]
        assert any(os.strerror(err) in r.getMessage() for r in warnings_logged)
        assert not [r for r in learnax_errors(caplog) if r.levelno > logging.WARNING]

        # state_1 is listed and loads, or is not listed and does not load: never half.
        if "step_1" in ckpt.list_available_checkpoints():
            assert_tree_equal(small_state(1), load_without_warnings(ckpt, 1)["state"])
        else:
            assert ckpt.load_checkpoint(1) is None

        # The next writer clears what the failed deletion left after its first commit;
        # its retention pass deletes what the failed one could not.
        restarted = Checkpointer(registry, "run", max_to_keep=1)
        assert checkpoint_dir_entries(restarted.checkpoint_dir) <= {"state_1", "state_2"}
        assert restarted.save_checkpoint(small_state(3), step=3) is not None
        assert list(restarted.list_available_checkpoints()) == ["step_3"]
        assert checkpoint_dir_entries(restarted.checkpoint_dir) == {"state_3"}
        committed_dirs_are_clean(restarted.checkpoint_dir)
    finally:
        ckpt.close()


@pytest.mark.parametrize("err_name", list(ERRNOS))
def test_failed_removal_of_the_superseded_data_file_keeps_the_new_latest_and_is_cleaned_later(
    registry, monkeypatch, err_name
):
    """After latest is overwritten, the previous save's data file is garbage: a failure
    to remove it does not fail the committed save; the next writer removes it."""
    ckpt = Checkpointer(registry, "run")
    old_dir = Path(ckpt.save_latest(small_state(1), step=1))
    (old_file,) = old_dir.glob("data-*.safetensors")
    real_remove = os.remove
    fired = []

    def failing_remove(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) == old_file.name:
            fired.append(path)
            raise OSError(ERRNOS[err_name], os.strerror(ERRNOS[err_name]))
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", failing_remove)
    assert ckpt.save_latest(small_state(2), step=2) is not None
    monkeypatch.undo()

    assert fired
    loaded = load_without_warnings(ckpt, "latest")
    assert loaded["step"] == 2
    assert_tree_equal(small_state(2), loaded["state"])
    restarted = Checkpointer(registry, "run")
    assert old_file.exists()  # opening the run deletes nothing
    # The next writer's first commit (a numbered checkpoint, which supersedes nothing
    # in state_latest) removes it.
    assert restarted.save_checkpoint(small_state(3), step=3) is not None
    assert not old_file.exists()
    committed_dirs_are_clean(restarted.checkpoint_dir)
    assert_tree_equal(small_state(2), restarted.load_checkpoint("latest")["state"])


def test_failed_listing_after_the_commit_keeps_the_new_latest_whole(registry, monkeypatch):
    """Listing the directory to remove superseded files comes after the manifest was
    replaced: its failure must neither fail the save nor remove the new data files."""
    ckpt = Checkpointer(registry, "run")
    latest = ckpt.save_latest(small_state(1), step=1)
    real_listdir = os.listdir

    def failing_listdir(path="."):
        if os.fspath(path) == latest:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", failing_listdir)
    assert ckpt.save_latest(small_state(2), step=2) == latest
    monkeypatch.undo()

    loaded = load_without_warnings(ckpt, "latest")
    assert loaded["step"] == 2
    assert_tree_equal(small_state(2), loaded["state"])


def test_failed_listing_during_retention_only_warns(registry, monkeypatch, caplog):
    ckpt = Checkpointer(registry, "run", max_to_keep=1)
    ckpt.save_checkpoint(small_state(1), step=1)
    real_listdir, real_scandir = os.listdir, os.scandir

    def failing(real):
        def listing(path="."):
            if os.fspath(path) == ckpt.checkpoint_dir:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(path)

        return listing

    monkeypatch.setattr(os, "listdir", failing(real_listdir))
    monkeypatch.setattr(os, "scandir", failing(real_scandir))
    with caplog.at_level(logging.WARNING, logger="learnax"):
        assert ckpt.save_checkpoint(small_state(2), step=2) is not None
    monkeypatch.undo()

    assert "retention" in caplog.text
    assert_tree_equal(small_state(2), load_without_warnings(ckpt, 2)["state"])


# --- a real full filesystem -----------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mount_point = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command on this machine")
    try:
        proc = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def one_mib_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(1 << 18).astype(np.float32)}  # 1 MiB


def test_full_tmpfs_fails_the_save_keeps_earlier_checkpoints_and_works_once_space_is_freed(
    small_tmpfs, caplog
):
    ckpt = Checkpointer(str(small_tmpfs / "registry"), "run", keep_best=True)
    assert ckpt.save_latest(one_mib_state(0), step=0) is not None
    assert ckpt.update_best_checkpoint(one_mib_state(0), 1.0, step=0) is True

    saved = []
    with caplog.at_level(logging.WARNING, logger="learnax"):
        for step in range(1, 20):
            if ckpt.save_checkpoint(one_mib_state(step), step=step) is None:
                failed_step = step
                break
            saved.append(step)
        else:
            pytest.fail("19 saves of 1 MiB fitted in an 8 MiB tmpfs")
        # Overwriting latest and best on the full disk fails too, and keeps them.
        assert ckpt.save_latest(one_mib_state(failed_step), step=failed_step) is None
        assert (
            ckpt.update_best_checkpoint(one_mib_state(failed_step), 0.5, step=failed_step) is False
        )

    assert saved, "not even one checkpoint fitted"
    assert os.strerror(errno.ENOSPC) in _failure_messages(caplog)
    assert ckpt.best_metric_value == 1.0
    listing = ckpt.list_available_checkpoints()
    assert listing.keys() == {"latest", "best", *(f"step_{s}" for s in saved)}
    assert checkpoint_dir_entries(ckpt.checkpoint_dir) == {
        "state_latest",
        "state_best",
        *(f"state_{s}" for s in saved),
    }
    committed_dirs_are_clean(ckpt.checkpoint_dir)
    for step in saved:
        assert_tree_equal(one_mib_state(step), load_without_warnings(ckpt, step)["state"])
    assert_tree_equal(one_mib_state(0), load_without_warnings(ckpt, "latest")["state"])
    assert_tree_equal(one_mib_state(0), load_without_warnings(ckpt, "best")["state"])

    # Free space the way a user would: delete the oldest numbered checkpoint.
    shutil.rmtree(listing[f"step_{saved[0]}"])
    assert ckpt.save_checkpoint(one_mib_state(failed_step), step=failed_step) is not None
    assert_tree_equal(one_mib_state(failed_step), ckpt.load_checkpoint(failed_step)["state"])
    committed_dirs_are_clean(ckpt.checkpoint_dir)
