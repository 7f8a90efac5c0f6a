"""Saving one snapshot of a train state as the checkpoints due at its step (latest,
numbered, best), each committed whole on its own, and what follows each commit: the new
best value, and retention after a numbered checkpoint.

A failed write is an ``OSError`` here, turned into a ``None`` result and a log line: a
save never fails the training loop for I/O, and every checkpoint committed before stays
as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _write
from ._errors import CheckpointSaveError
from ._manifest import MANIFEST
from ._multihost import Coordinator, save_multihost
from ._reuse import Plan, Reuse
from ._run import RunDirectory
from ._storage import NOT_WRITABLE_ERRNOS, UncertainWriteError

logger = logging.getLogger("learnax")


@dataclass
class PlannedWrite:
    """One checkpoint to write from a snapshot, and what to do once it is committed."""

    key: str  # the key of maybe_save_checkpoints' result: "latest", "numbered", "best"
    name: str  # the directory, "state_<...>"
    metrics: dict[str, Any]  # already encoded for JSON
    extra: dict[str, Any] | None = None  # more manifest fields (the best record)
    best_value: float | None = None  # becomes best_metric_value once committed
    retention: bool = False  # a numbered checkpoint: prune the old ones after it
    error: BaseException | None = None
    exchange: str = ""  # multi-host: the key under which the processes agree on it


class Saver:
    """Writes planned checkpoints of one run, on one process or across all of a
    multi-host run, and reports each commit: ``on_commit(name, step)`` after each,
    ``on_best(value)`` when a best checkpoint is committed, ``retain()`` after a
    numbered one (on process 0 only)."""

    def __init__(
        self,
        run: RunDirectory,
        coord: Coordinator | None,
        *,
        on_best: Callable[[float | None], None],
        retain: Callable[[], None],
        on_commit: Callable[[str, int], None] | None = None,
    ) -> None:
        self.run = run
        self.coord = coord
        self._on_best = on_best
        self._retain = retain
        self._on_commit = on_commit  # (name, step) of each checkpoint committed
        # Leftovers of interrupted saves are removed by the writer, after its first
        # commit: never by a reader (an evaluation job opening the run while training
        # uploads), and at a moment when this job is not writing (multi-host: the other
        # processes wait for process 0's word then).
        self._cleaned = False
        self._read_only = False  # a save found the registry not writable (logged once)
        # What a save takes from the last commit instead of writing it (one host only:
        # a multi-host checkpoint's files are each process's own).
        self._reuse = Reuse(run.storage) if coord is None else None

    def plan(self, leaves: list[Any]) -> Plan:
        """What a save of ``leaves`` takes from the last commit; call it before the
        leaves are snapshotted (what is taken needs no copy)."""
        return self._reuse.plan(leaves) if self._reuse is not None else Plan()

    def write(
        self, write: PlannedWrite, tree: Any, leaves: list[Any], step: int, plan: Plan
    ) -> str | None:
        """Write and commit one checkpoint; on an I/O failure log it and return None."""
        directory = self.run.join(write.name)
        try:
            self._commit(write, tree, leaves, step, plan)
        except OSError as e:
            self._log_failure(directory, step, e)
            write.error = e
            if isinstance(e, UncertainWriteError) and self._reuse is not None:
                self._reuse.forget()
            if _write.may_be_committed(e) and write.best_value is not None:
                # state_best is (or may be) the new one now: never let a worse value
                # replace it; when nobody can tell, the value is read again later.
                visible = isinstance(e, _write.VisibleNotDurableError)
                self._on_best(write.best_value if visible else None)
            return None
        logger.debug("Saved checkpoint %s (step %d)", directory, step)
        if self._on_commit is not None:
            self._on_commit(write.name, step)
        if write.best_value is not None:
            self._on_best(write.best_value)
        if write.retention and (self.coord is None or self.coord.leader):
            self._retain()
            if self._reuse is not None and not self._still_there(write.name):
                # Retention removed the checkpoint just saved (a resumed run saving a
                # step below the kept ones): nothing can be taken from it.
                self._reuse.forget()
        return directory

    def _still_there(self, name: str) -> bool:
        try:
            return self.run.is_committed(name)
        except OSError:
            return False

    def _log_failure(self, directory: str, step: int, error: OSError) -> None:
        if error.errno in NOT_WRITABLE_ERRNOS:
            # Said once: every save fails alike from now on.
            log = logger.debug if self._read_only else logger.error
            self._read_only = True
            log(
                "Cannot save %s (step %d): the registry is not writable (%s). Saves return "
                "None; listing and loading work.",
                directory,
                step,
                error.strerror,
            )
            return
        if isinstance(error, UncertainWriteError):
            logger.error(
                "Saving checkpoint %s (step %d) may or may not have been committed: %s. "
                "It holds this save or the one before, whole; nothing was removed.",
                directory,
                step,
                error,
            )
            return
        logger.error(
            "Saving checkpoint %s (step %d) failed: %s. Earlier checkpoints are intact.",
            directory,
            step,
            error,
        )

    def _commit(
        self, write: PlannedWrite, tree: Any, leaves: list[Any], step: int, plan: Plan
    ) -> None:
        if self.coord is not None:
            save_multihost(
                self.coord,
                self.run,
                write.name,
                step,
                tree=tree,
                leaves=leaves,
                metrics=write.metrics,
                extra=write.extra,
                exchange=write.exchange,
                after_commit=self._clean_once,
            )
            return
        directory = self.run.join(write.name)
        assert self._reuse is not None
        taken, apart = self._reuse.taken_files(leaves, plan)
        with self.run.storage.lock(self.run.path):
            part = _write.write_checkpoint(
                self.run.storage,
                directory,
                tree=tree,
                leaves=leaves,
                step=step,
                metrics=write.metrics,
                extra=write.extra,
                taken=taken,
                apart=apart,
                elsewhere=self.run.copies_of,
            )
        self._reuse.committed(directory, part, plan)
        self._clean_once(directory)

    def _clean_once(self, committed: str) -> None:
        """After this writer's first commit (``committed``, a checkpoint directory),
        remove the run's leftovers, aged by the storage's clock at that commit."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            now = self.run.storage.mtime(self.run.storage.join(committed, MANIFEST))
        except OSError as e:
            logger.warning("Not cleaning up leftovers in %s: %s", self.run.path, e)
            return
        self.run.clean_leftovers(now)

    def write_all(
        self, tree: Any, leaves: list[Any], step: int, writes: list[PlannedWrite], plan: Plan
    ) -> dict[str, str | None]:
        """Each of ``writes`` in turn (the first written, the others taking its files);
        the path of each by its key (``None``: failed)."""
        return {w.key: self.write(w, tree, leaves, step, plan) for w in writes}

    def write_in_background(
        self, tree: Any, leaves: list[Any], step: int, writes: list[PlannedWrite], plan: Plan
    ) -> None:
        """Each of ``writes`` in turn, on the worker thread: raises
        :class:`CheckpointSaveError` naming those that failed."""
        failed = []
        for write in writes:
            try:
                if self.write(write, tree, leaves, step, plan) is None:
                    failed.append(write)
            except BaseException as e:  # a bug, not I/O: still reported to the caller
                logger.exception("Background save of %s failed", write.name)
                write.error = e
                failed.append(write)
        if failed:
            names = ", ".join(w.name for w in failed)
            raise CheckpointSaveError(
                f"Background save of {names} (step {step}) in {self.run.path} failed: "
                f"{failed[0].error}. Earlier checkpoints are intact."
            ) from failed[0].error
