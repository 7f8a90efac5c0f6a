"""Data files a commit superseded, removed after a grace time instead of at once.

A save over an existing checkpoint (the rolling ``latest``, ``best``) commits a new
manifest; the old one's data files are garbage from then on, but a reader that read the
old manifest an instant before may still be about to open them (``_read.read_consistent``
opens them right after the manifest; on an object store it reads them for as long as
the load takes). So they stay for ``SUPERSEDED_GRACE_S`` seconds, then a daemon thread
removes them. A file's name can be committed again meanwhile: a later save may take a
data file of the checkpoint it replaces as it is (``_reuse``), and a second writer of
the run may take back the very file this one retired. So the thread removes a file
only if, under the run's lock, the checkpoint's manifest does not name it then.
What a process leaves when it exits is removed at exit; what a killed process leaves,
the next writer removes after its first commit (``_run.RunDirectory.clean_leftovers``).
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import logging
import os
import threading
import time

from ._storage import Storage

logger = logging.getLogger("learnax")

# Long enough for a reader to open the files it just found in a manifest (local disks
# keep an open file readable), and for a load from an object store to finish. The
# environment variable sets it for a whole job (0: remove at once, as a run with no
# concurrent readers may prefer for disk space).
SUPERSEDED_GRACE_S = float(os.environ.get("LEARNAX_SUPERSEDED_GRACE_S", "60"))

_lock = threading.Condition()
# (deadline, order, storage, checkpoint directory, paths of its files)
_pending: list[tuple[float, int, Storage, str, list[str]]] = []
_order = itertools.count()
_thread: threading.Thread | None = None


def retire(storage: Storage, directory: str, paths: list[str]) -> None:
    """Remove the files ``paths`` of checkpoint ``directory``, which its manifest just
    stopped naming, once the grace time has passed (then only those it does not name
    again). Without a grace time, or when no thread can be started (a save while the
    interpreter exits), they are removed at once: the caller holds the run's lock and
    has just committed the manifest that does not name them."""
    if not paths:
        return
    if SUPERSEDED_GRACE_S > 0:
        deadline = time.monotonic() + SUPERSEDED_GRACE_S
        with _lock:
            if _thread is not None or _start_thread():
                heapq.heappush(_pending, (deadline, next(_order), storage, directory, paths))
                _lock.notify()
                return
    _remove(storage, paths)


def _start_thread() -> bool:
    """Start the removing thread (the lock held); ``False`` when no thread can start."""
    global _thread
    thread = threading.Thread(target=_run, name="learnax-superseded", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # interpreter shutdown
        return False
    _thread = thread
    # Registered now, after the storage's own library was imported: exit handlers run
    # last-in first-out, so this one runs while fsspec's event loop still works
    # (removing objects after it stopped would hang).
    atexit.register(remove_now)
    return True


def remove_now() -> None:
    """Remove every retired file now, whatever its grace time (at exit). A run whose
    lock another process holds is skipped: its next writer removes them."""
    with _lock:
        due = [entry[2:] for entry in _pending]
        _pending.clear()
    for storage, directory, paths in due:
        _remove_unnamed(storage, directory, paths, blocking=False)


def _run() -> None:
    while True:
        with _lock:
            while not _pending or _pending[0][0] > time.monotonic():
                _lock.wait(None if not _pending else _pending[0][0] - time.monotonic())
            _, _, storage, directory, paths = heapq.heappop(_pending)
        _remove_unnamed(storage, directory, paths, blocking=True)


def _remove_unnamed(storage: Storage, directory: str, paths: list[str], *, blocking: bool) -> None:
    """Remove those of ``paths`` that the manifest of ``directory`` does not name now,
    holding the run's lock (a save in progress cannot commit meanwhile)."""
    try:
        with storage.lock(storage.dirname(directory), blocking=blocking) as locked:
            if not locked:
                return
            named = _named(storage, directory)
            if named is None:
                return  # left for the next writer's cleanup, which reads it again
            _remove(storage, [p for p in paths if p.rpartition("/")[2] not in named])
    except OSError as e:  # the lock cannot be taken (the run was deleted, a read-only copy)
        logger.info("Not removing the superseded files of %s: %s", directory, e)


def _named(storage: Storage, directory: str) -> set[str] | None:
    """The data files the manifest of ``directory`` names now (none when it has no
    manifest), or ``None`` when it cannot be read: then nothing may be removed."""
    from ._errors import CheckpointCorruptedError
    from ._manifest import read_manifest

    try:
        return set(read_manifest(storage, directory)["files"])
    except FileNotFoundError:
        return set()
    except (OSError, CheckpointCorruptedError) as e:
        logger.info("Not removing the superseded files of %s: %s", directory, e)
        return None


def _remove(storage: Storage, paths: list[str]) -> None:
    for path in paths:
        try:
            storage.remove(path)
        except OSError as e:
            logger.warning(
                "Could not remove superseded file %s (the next Checkpointer will): %s", path, e
            )


def _forget_after_fork() -> None:
    # The child has no removal thread; the parent still removes what it retired.
    global _lock, _thread
    _lock = threading.Condition()
    _pending.clear()
    _thread = None


with contextlib.suppress(AttributeError):  # no fork on Windows
    os.register_at_fork(after_in_child=_forget_after_fork)
