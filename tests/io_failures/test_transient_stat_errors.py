"""Transient errors of stat, open and listing on a shared filesystem (issue 15).

On NFS and Lustre, ``stat``, ``lstat``, ``open`` or ``scandir`` of a path that exists
can fail for a while with EIO, ESTALE or ETIMEDOUT. Such an error says nothing about
whether the path is there: learnax must never read it as "absent". Each test here
makes chosen ``os`` calls fail, only for paths of the test run's ``checkpoints``
directory that match a pattern (``state_*/manifest.json``, ``state_latest``, ``.`` for
the directory itself), for a number of calls or until the test repairs the disk, on a
run holding latest (step 5), numbered checkpoints 2, 3 and 4 (``max_to_keep=3``) and
best (step 2, ``val/loss`` 0.4). Then:

- opening the run deletes nothing, and the best value is never reset: while it cannot
  be read, ``best_metric_value`` raises and no best decision replaces ``state_best``;
- listing and loading raise ``OSError``: never ``None``, ``{}``, a shorter listing or an
  older checkpoint than the newest;
- a save that cannot examine its checkpoint returns ``None`` and logs, and a save
  whose manifest rename may or may not have happened never deletes the files a
  visible manifest names;
- retention never deletes a checkpoint among the newest ``max_to_keep``.

Every error number is tried: ESTALE and ETIMEDOUT behave like EIO.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import assert_tree_equal, learnax_errors, small_state

from learnax.checkpoint import Checkpointer

TRANSIENT = {"EIO": errno.EIO, "ESTALE": errno.ESTALE, "ETIMEDOUT": errno.ETIMEDOUT}

# The run every test starts from: numbered steps with their val/loss (the first is
# removed by retention), then latest at step 5.
LOSSES = {1: 0.9, 2: 0.4, 3: 0.6, 4: 0.5}
MAX_TO_KEEP = 3
LATEST_STEP = 5
BEST_STEP, BEST_VALUE = 2, 0.4
# What each name loads: the step, whose small_state(step) it holds.
COMMITTED = {"latest": LATEST_STEP, "best": BEST_STEP, 2: 2, 3: 3, 4: 4}
LISTING = {"latest", "best", "step_2", "step_3", "step_4"}


def open_run(registry, **kwargs) -> Checkpointer:
    settings = {"max_to_keep": MAX_TO_KEEP, "keep_best": True, "metric_name": "val/loss"}
    return Checkpointer(registry, "run", **{**settings, **kwargs})


def checkpoints_dir(registry) -> str:
    return os.path.join(registry, "run", "checkpoints")


# --------------------------------------------------------------------------- faults


def _fd_path(fd: Any) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{int(fd)}")
    except (OSError, TypeError, ValueError):
        return ""


class StatFault:
    """Makes ``os.<function>`` raise ``OSError(err)`` for the paths under a run's
    checkpoints directory whose path relative to it matches ``pattern`` (``"."``: the
    directory itself): the next ``times`` matching calls, or every one until
    :meth:`repair`. A path is what the call names (a descriptor or a ``dir_fd`` is traced
    back to its path through ``/proc/self/fd``), never resolved through links: resolving
    would call ``lstat`` itself."""

    def __init__(
        self,
        monkeypatch,
        checkpoint_dir: str,
        functions: tuple[str, ...],
        pattern: str,
        err: int,
        times: int | None = None,
    ):
        self.roots = {os.path.abspath(checkpoint_dir), os.path.realpath(checkpoint_dir)}
        self.pattern = pattern
        self.err = err
        self.times = times
        self.fired = 0
        self._armed = False
        self._lock = threading.Lock()
        for name in functions:
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name)))

    def _wrap(self, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self._armed:
                path = _path_of(args, kwargs)
                if self._matches(path):
                    with self._lock:
                        fire = self._armed and (self.times is None or self.fired < self.times)
                        if fire:
                            self.fired += 1
                    if fire:
                        raise OSError(self.err, os.strerror(self.err), path)
            return real(*args, **kwargs)

        return call

    def _matches(self, path: str) -> bool:
        for root in self.roots:
            if path == root or path.startswith(root + os.sep):
                return fnmatch.fnmatchcase(os.path.relpath(path, root), self.pattern)
        return False

    def arm(self) -> StatFault:
        self._armed = True
        return self

    def repair(self) -> None:
        self._armed = False


def _path_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    target = args[0] if args else kwargs.get("path", ".")
    if isinstance(target, int):
        return _fd_path(target)
    if not isinstance(target, (str, bytes, os.PathLike)):
        return ""
    path = os.fsdecode(target)
    dir_fd = kwargs.get("dir_fd")
    if dir_fd is not None and not os.path.isabs(path):
        return os.path.join(_fd_path(dir_fd), path)
    return os.path.abspath(path)


# --------------------------------------------------------------------------- the run


@pytest.fixture(params=list(TRANSIENT))
def err(request) -> int:
    return TRANSIENT[request.param]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The run, saved once per module; each test works on a copy."""
    registry = tmp_path_factory.mktemp("template") / "registry"
    ckpt = open_run(str(registry))
    for step, loss in LOSSES.items():
        assert ckpt.save_checkpoint(small_state(step), step=step) is not None
        ckpt.update_best_checkpoint(small_state(step), loss, step=step)
    assert ckpt.save_latest(small_state(LATEST_STEP), step=LATEST_STEP) is not None
    assert ckpt.best_metric_value == BEST_VALUE
    assert set(ckpt.list_available_checkpoints()) == LISTING
    return registry


@pytest.fixture
def run(template, registry) -> str:
    shutil.copytree(template, registry)
    return registry


def fault(monkeypatch, registry, functions, pattern, err, times=None) -> StatFault:
    return StatFault(monkeypatch, checkpoints_dir(registry), functions, pattern, err, times)


def disk_fingerprint(registry) -> set[tuple[str, int]]:
    """Every path under the registry with its size."""
    return {
        (str(p.relative_to(registry)), p.stat().st_size if p.is_file() else 0)
        for p in Path(registry).rglob("*")
    }


def assert_loads(loaded, step: int) -> None:
    assert loaded is not None, f"step {step} did not load"
    assert loaded["step"] == step
    assert_tree_equal(small_state(step), loaded["state"])


def assert_every_committed_checkpoint_loads(registry, *, more: dict | None = None) -> None:
    """Once repaired, a fresh Checkpointer lists and loads every checkpoint of the run
    (and ``more``: name -> step) and knows the stored best value."""
    ckpt = open_run(registry)
    expected = {**COMMITTED, **(more or {})}
    listing = ckpt.list_available_checkpoints()
    assert {f"step_{k}" if isinstance(k, int) else k for k in expected} <= set(listing)
    for name, step in expected.items():
        assert_loads(ckpt.load_checkpoint(name), step)
    assert ckpt.best_metric_value == BEST_VALUE


def loads_newest_or_raises(call: Callable[[], Any], step: int) -> None:
    """``call()`` raises ``OSError`` or returns checkpoint ``step``, whole: never ``None``
    and never another checkpoint."""
    try:
        loaded = call()
    except OSError:
        return
    assert_loads(loaded, step)


def warnings_of(caplog) -> str:
    return " | ".join(r.getMessage() for r in learnax_errors(caplog))


# --------------------------------------------------------------------------- opening the run

# Manifests that cannot be examined: (os functions, path pattern).
MANIFEST_FAULTS = {
    "lstat-every-manifest": (("lstat",), "state_*/manifest.json"),
    "open-every-manifest": (("open",), "state_*/manifest.json"),
    "stat-lstat-open-every-manifest": (("stat", "lstat", "open"), "state_*/manifest.json"),
    "lstat-best-manifest": (("lstat",), "state_best/manifest.json"),
    "open-best-manifest": (("open",), "state_best/manifest.json"),
}
BEST_MANIFEST_FAULTS = ["lstat-best-manifest", "open-best-manifest"]


@pytest.mark.parametrize("where", list(MANIFEST_FAULTS))
def test_opening_the_run_while_manifests_cannot_be_read_deletes_nothing(
    run, monkeypatch, err, where
):
    """A Checkpointer opened while the manifests fail to stat or open (whether it
    then raises or not) removes no file: every checkpoint loads once repaired."""
    before = disk_fingerprint(run)
    broken = fault(monkeypatch, run, *MANIFEST_FAULTS[where], err).arm()
    with contextlib.suppress(OSError):
        open_run(run)
    broken.repair()

    assert broken.fired
    assert disk_fingerprint(run) == before
    assert_every_committed_checkpoint_loads(run)


@pytest.mark.parametrize("where", BEST_MANIFEST_FAULTS)
def test_opening_the_run_while_the_best_manifest_cannot_be_read_only_warns(
    run, monkeypatch, caplog, err, where
):
    """The stored best value is read at construction: its failure is logged, not raised
    (the run can still train and save)."""
    broken = fault(monkeypatch, run, *MANIFEST_FAULTS[where], err).arm()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        open_run(run)
    broken.repair()

    assert os.strerror(err) in warnings_of(caplog)


@pytest.mark.parametrize("where", BEST_MANIFEST_FAULTS)
def test_best_metric_value_raises_while_the_best_manifest_cannot_be_read_and_returns_it_once_repaired(
    run, monkeypatch, err, where
):
    """The best value is unknown, not ``inf``, while ``state_best`` cannot be read."""
    broken = fault(monkeypatch, run, *MANIFEST_FAULTS[where], err).arm()
    ckpt = open_run(run)
    with pytest.raises(OSError):
        ckpt.best_metric_value  # noqa: B018
    broken.repair()

    assert ckpt.best_metric_value == BEST_VALUE


def _decide_best(ckpt: Checkpointer, how: str, value: float, step: int) -> bool:
    """Whether the best decision of ``how`` saved a new state_best."""
    if how == "update_best_checkpoint":
        return ckpt.update_best_checkpoint(small_state(step), value, step=step)
    return "best" in ckpt.maybe_save_checkpoints(small_state(step), step, {"val/loss": value})


@pytest.mark.parametrize("how", ["update_best_checkpoint", "maybe_save_checkpoints"])
@pytest.mark.parametrize("where", BEST_MANIFEST_FAULTS)
def test_a_worse_metric_while_the_best_is_unknown_does_not_replace_state_best(
    run, monkeypatch, caplog, err, where, how
):
    """0.7 is worse than the stored 0.4 but better than ``inf``: a Checkpointer that took
    the unreadable best for "no best" would overwrite state_best with it."""
    broken = fault(monkeypatch, run, *MANIFEST_FAULTS[where], err).arm()
    ckpt = open_run(run, save_every=None, checkpoint_every=None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        saved = _decide_best(ckpt, how, 0.7, step=6)
    broken.repair()

    assert saved is False
    assert learnax_errors(caplog), "no warning says why the best was not decided"
    assert_loads(ckpt.load_best(), BEST_STEP)
    assert ckpt.best_metric_value == BEST_VALUE
    assert_every_committed_checkpoint_loads(run)


@pytest.mark.parametrize("where", BEST_MANIFEST_FAULTS)
def test_a_best_decision_after_repair_compares_with_the_stored_value(run, monkeypatch, err, where):
    """A Checkpointer opened during the fault re-reads the best once the disk works:
    a worse value is refused, a better one saved."""
    broken = fault(monkeypatch, run, *MANIFEST_FAULTS[where], err).arm()
    ckpt = open_run(run)
    broken.repair()

    assert ckpt.update_best_checkpoint(small_state(6), 0.7, step=6) is False
    assert_loads(ckpt.load_best(), BEST_STEP)
    assert ckpt.update_best_checkpoint(small_state(7), 0.1, step=7) is True
    assert ckpt.best_metric_value == 0.1
    assert_loads(ckpt.load_best(), 7)


# --------------------------------------------------------------------------- listing and loading

LISTING_FAULTS = {
    "scandir-checkpoints-dir": (("scandir", "listdir"), "."),
    "lstat-every-manifest": (("lstat",), "state_*/manifest.json"),
    "lstat-one-old-manifest": (("lstat",), "state_3/manifest.json"),
    "lstat-best-manifest": (("lstat",), "state_best/manifest.json"),
    "stat-lstat-one-checkpoint-dir": (("stat", "lstat"), "state_3"),
}


@pytest.mark.parametrize("where", ["scandir-checkpoints-dir", "lstat-every-manifest"])
def test_load_latest_raises_while_the_run_cannot_be_listed(run, monkeypatch, err, where):
    """``None`` would tell the training script to start from step 0."""
    ckpt = open_run(run)
    broken = fault(monkeypatch, run, *LISTING_FAULTS[where], err).arm()
    with pytest.raises(OSError) as excinfo:
        ckpt.load_latest()
    broken.repair()

    assert broken.fired
    assert checkpoints_dir(run) in str(excinfo.value), "the error does not name the path"
    assert_loads(ckpt.load_latest(), LATEST_STEP)


NEWEST_FAULTS = {
    "open-newest-manifest-once": (("open",), "state_latest/manifest.json", 1),
    "open-newest-manifest-always": (("open",), "state_latest/manifest.json", None),
    "lstat-newest-manifest-once": (("lstat",), "state_latest/manifest.json", 1),
    "lstat-newest-manifest-always": (("lstat",), "state_latest/manifest.json", None),
    "stat-lstat-newest-dir-always": (("stat", "lstat"), "state_latest", None),
}


@pytest.mark.parametrize("where", list(NEWEST_FAULTS))
def test_load_latest_never_returns_an_older_checkpoint_while_the_newest_cannot_be_read(
    run, monkeypatch, err, where
):
    """Step 4 loads fine, but resuming from it would silently redo a step."""
    ckpt = open_run(run)
    functions, pattern, times = NEWEST_FAULTS[where]
    broken = fault(monkeypatch, run, functions, pattern, err, times).arm()
    loads_newest_or_raises(ckpt.load_latest, LATEST_STEP)
    broken.repair()

    assert_loads(ckpt.load_latest(), LATEST_STEP)


@pytest.mark.parametrize("where", list(LISTING_FAULTS))
def test_list_available_checkpoints_raises_instead_of_listing_fewer(run, monkeypatch, err, where):
    """A listing without step_3 (or {}) reads as "deleted"; whoever acts on it is wrong."""
    ckpt = open_run(run)
    broken = fault(monkeypatch, run, *LISTING_FAULTS[where], err).arm()
    try:
        listing = ckpt.list_available_checkpoints()
    except OSError:
        listing = None
    broken.repair()

    if where == "scandir-checkpoints-dir":
        assert listing is None, "listed a directory that cannot be listed"
    elif listing is not None:
        assert set(listing) == LISTING
    assert set(ckpt.list_available_checkpoints()) == LISTING


# How a load names a checkpoint: (the call, the step it loads, its directory).
LOADS = {
    "load_checkpoint-latest": (lambda c: c.load_checkpoint("latest"), LATEST_STEP, "state_latest"),
    "load_checkpoint-numbered-step": (lambda c: c.load_checkpoint(3), 3, "state_3"),
    "load_checkpoint-step-of-latest": (lambda c: c.load_checkpoint(5), LATEST_STEP, "state_latest"),
    "load_best": (lambda c: c.load_best(), BEST_STEP, "state_best"),
}
# What fails, on the loaded checkpoint's directory: (os functions, pattern in it, must raise).
LOAD_FAULTS = {
    "open-manifest": (("open",), "manifest.json", True),
    "lstat-manifest": (("lstat",), "manifest.json", False),
    "stat-lstat-directory": (("stat", "lstat"), "", False),
}


@pytest.mark.parametrize("where", list(LOAD_FAULTS))
@pytest.mark.parametrize("load", list(LOADS))
def test_loading_one_checkpoint_raises_instead_of_returning_none(
    run, monkeypatch, err, load, where
):
    """``None`` means "no such checkpoint"; a load that cannot tell raises (or, where it
    did not need the failing call, returns the right checkpoint)."""
    ckpt = open_run(run)
    call, step, directory = LOADS[load]
    functions, in_directory, must_raise = LOAD_FAULTS[where]
    pattern = f"{directory}/{in_directory}" if in_directory else directory
    broken = fault(monkeypatch, run, functions, pattern, err).arm()
    if must_raise:
        with pytest.raises(OSError):
            call(ckpt)
    else:
        loads_newest_or_raises(lambda: call(ckpt), step)
    broken.repair()

    assert_loads(call(ckpt), step)


# --------------------------------------------------------------------------- saving

# A save of each kind: (the call, what it returned when nothing was saved, its directory).
SAVES = {
    "latest": (lambda c: c.save_latest(small_state(6), step=6), None, "state_latest"),
    "numbered": (lambda c: c.save_checkpoint(small_state(6), step=6), None, "state_6"),
    "best": (lambda c: c.update_best_checkpoint(small_state(6), 0.1, step=6), False, "state_best"),
}


@pytest.mark.parametrize("kind", list(SAVES))
def test_a_save_that_cannot_examine_its_checkpoint_directory_returns_none_and_loses_nothing(
    run, monkeypatch, caplog, err, kind
):
    """Whether the directory holds a checkpoint, a link or nothing decides how to write
    it; when that cannot be told the save fails and the disk works again later."""
    ckpt = open_run(run)
    save, nothing, directory = SAVES[kind]
    broken = fault(monkeypatch, run, ("stat", "lstat"), directory, err).arm()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        result = save(ckpt)
    broken.repair()

    assert broken.fired
    assert result is nothing
    assert os.strerror(err) in warnings_of(caplog)
    assert ckpt.best_metric_value == BEST_VALUE
    assert_every_committed_checkpoint_loads(run)
    assert save(ckpt) not in (None, False)
    assert_loads(ckpt.load_checkpoint(kind if kind != "numbered" else 6), 6)


class LostRenameReply:
    """``os.replace`` onto the run's ``manifest.json`` files happens, then reports
    ``err``: an NFS rename whose reply was lost after the server applied it. With
    ``applied=False`` the rename fails before it happens, reporting the same error."""

    def __init__(self, monkeypatch, registry, err: int, *, applied: bool = True):
        self.root = os.path.abspath(checkpoints_dir(registry))
        self.err = err
        self.fired = 0
        real = os.replace

        def replace(src, dst, *args, **kwargs):
            path = os.path.abspath(os.fsdecode(dst))
            if path.startswith(self.root + os.sep) and os.path.basename(path) == "manifest.json":
                if applied:
                    real(src, dst, *args, **kwargs)
                self.fired += 1
                raise OSError(self.err, os.strerror(self.err), path)
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)


def test_a_manifest_rename_reported_failed_but_applied_is_read_back_as_saved(run, monkeypatch, err):
    """The manifest read back is this save's: the save succeeded, and its data files,
    which that manifest names, stay."""
    ckpt = open_run(run)
    lost = LostRenameReply(monkeypatch, run, err)
    path = ckpt.save_latest(small_state(6), step=6)
    monkeypatch.undo()

    assert lost.fired
    assert path == os.path.join(checkpoints_dir(run), "state_latest")
    assert_loads(ckpt.load_latest(), 6)


def test_a_manifest_rename_whose_outcome_cannot_be_read_back_returns_none_and_deletes_nothing(
    run, monkeypatch, caplog, err
):
    """The rename may have happened: neither the new data files nor the old ones may go,
    since either manifest may be the one on disk."""
    ckpt = open_run(run)
    lost = LostRenameReply(monkeypatch, run, err)
    broken = fault(monkeypatch, run, ("stat", "lstat", "open"), "state_latest/manifest.json", err)
    old_files = set(Path(checkpoints_dir(run), "state_latest").glob("data-*"))
    broken.arm()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        path = ckpt.save_latest(small_state(6), step=6)
    broken.repair()
    monkeypatch.undo()

    assert lost.fired
    assert broken.fired, "the save did not read its manifest back"
    assert path is None
    assert os.strerror(err) in warnings_of(caplog)
    assert old_files <= set(Path(checkpoints_dir(run), "state_latest").glob("data-*"))
    assert_loads(ckpt.load_latest(), 6)  # the rename did happen: the new one, whole
    assert_every_committed_checkpoint_loads(run, more={"latest": 6})


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_a_best_whose_commit_cannot_be_read_back_is_read_again_before_the_next_decision(
    run, monkeypatch, err, applied
):
    """A new best (0.1) whose manifest rename reports an error and cannot be read back:
    nobody knows whether state_best holds it or the old best (0.4). The next best
    decision, once the disk answers, reads state_best again and compares with what it
    holds: 0.2 is refused if the rename was applied (0.1 is stored), and saved if it
    was not (0.4 is)."""
    ckpt = open_run(run)
    lost = LostRenameReply(monkeypatch, run, err, applied=applied)
    broken = fault(monkeypatch, run, ("stat", "lstat", "open"), "state_best/manifest.json", err)
    broken.arm()
    saved = ckpt.update_best_checkpoint(small_state(6), 0.1, step=6)
    broken.repair()
    monkeypatch.undo()

    assert lost.fired
    assert broken.fired, "the save did not read its manifest back"
    assert saved is False  # the outcome is unknown: not reported as saved
    stored_step, stored_value = (6, 0.1) if applied else (BEST_STEP, BEST_VALUE)
    assert_loads(ckpt.load_best(), stored_step)

    replaced = ckpt.update_best_checkpoint(small_state(7), 0.2, step=7)

    assert replaced is not applied, f"0.2 decided against a stale best (stored: {stored_value})"
    assert_loads(ckpt.load_best(), stored_step if applied else 7)
    assert ckpt.best_metric_value == (stored_value if applied else 0.2)


# --------------------------------------------------------------------------- retention

OLD_CHECKPOINT_FAULTS = {
    "lstat-manifest": (("lstat",), "state_3/manifest.json"),
    "open-manifest": (("open",), "state_3/manifest.json"),
    "scandir-directory": (("scandir", "listdir"), "state_3"),
}


@pytest.mark.parametrize("where", list(OLD_CHECKPOINT_FAULTS))
def test_retention_while_an_old_checkpoint_cannot_be_examined_keeps_the_newest_max_to_keep(
    run, monkeypatch, err, where
):
    """A writer opens the run and saves step 6 while state_3 cannot be examined: its
    first commit (leftover cleanup, retention) must not take state_3 for a leftover,
    and steps 3, 4 and 6 are the newest three."""
    broken = fault(monkeypatch, run, *OLD_CHECKPOINT_FAULTS[where], err).arm()
    ckpt = open_run(run)
    path = ckpt.save_checkpoint(small_state(6), step=6)
    broken.repair()

    assert path is not None
    for step in (3, 4, 6):
        assert_loads(ckpt.load_checkpoint(step), step)
    assert_loads(ckpt.load_latest(), 6)
    assert_loads(ckpt.load_best(), BEST_STEP)
    if "step_2" in ckpt.list_available_checkpoints():
        assert_loads(ckpt.load_checkpoint(2), 2)


@pytest.mark.parametrize("applied", [True, False], ids=["applied", "not-applied"])
def test_fsspec_filesystem_with_directories_reads_a_lost_move_reply_back(tmp_path, applied):
    """On an fsspec filesystem with directories (sftp, hdfs, smb...) the manifest is
    written beside its place and moved over it. A move that reports an error after it
    was applied (a lost reply) is a commit: the save returns its path and its data
    files stay. One that was not applied fails the save and the old checkpoint loads."""
    fsspec = pytest.importorskip("fsspec")
    from fsspec.implementations.local import LocalFileSystem

    class LostMoveReply(LocalFileSystem):
        protocol = "lostmove"
        root_marker = "/"
        armed = False

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(path.replace("lostmove://", "/", 1))

        def mv(self, path1, path2, **kwargs):
            if LostMoveReply.armed and str(path2).endswith("manifest.json"):
                LostMoveReply.armed = False
                if applied:
                    super().mv(path1, path2, **kwargs)
                raise OSError(errno.EIO, "Input/output error (the reply was lost)")
            return super().mv(path1, path2, **kwargs)

    fsspec.register_implementation("lostmove", LostMoveReply, clobber=True)
    registry = "lostmove://" + str(tmp_path / "registry").lstrip("/")
    ckpt = Checkpointer(registry, "run")
    assert ckpt.save_latest(small_state(1), step=1) is not None
    LostMoveReply.armed = True
    path = ckpt.save_latest(small_state(2), step=2)
    assert not LostMoveReply.armed, "the move was never made"
    step = 2 if applied else 1
    assert (path is not None) == applied
    loaded = Checkpointer(str(tmp_path / "registry"), "run").load_checkpoint("latest")
    assert_loads(loaded, step)
