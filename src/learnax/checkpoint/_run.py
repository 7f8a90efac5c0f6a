"""What a run directory is: the one place that knows how checkpoints are named, listed,
found, deleted and cleaned up, and how ``state_best`` records the metric that chose it.

A registry holds runs; a run ``<registry>/<run_id>`` holds ``checkpoints/``, and that
directory holds one directory per checkpoint, ``state_<key>``: ``state_latest``,
``state_best``, ``state_<step>`` (numbered) or ``state_<suffix>``. A checkpoint is
committed when its ``manifest.json`` exists. The Checkpointer, inspection and the
command line all go through this module, so they agree on every one of these facts.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import _tree
from ._errors import CheckpointCorruptedError
from ._lazy_import import LazyModule
from ._manifest import MANIFEST, is_own_file, read_manifest
from ._policy import retention_victims
from ._storage import LOCK_NAME

# Imported on first use (see _lazy_import): listing and showing need none of them.
np = LazyModule("numpy", globals(), "np")

if TYPE_CHECKING:
    from ._storage import Storage

# What learnax itself keeps in a run's checkpoints directory beside the checkpoints.
_OWN_ENTRIES = frozenset({LOCK_NAME})

logger = logging.getLogger("learnax")

PREFIX = "state_"
LATEST = "latest"
BEST = "best"
CHECKPOINTS = "checkpoints"
# The key of a numbered checkpoint in list_available_checkpoints(): "step_<N>".
STEP_KEY = "step_"
# The original learnax's pickle checkpoints: state_<name>.pyd files beside ours.
LEGACY_SUFFIX = ".pyd"
_SAFE_KEY = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
# "step_<N>" is how list_available_checkpoints names numbered checkpoint N.
_STEP_ALIAS = re.compile(r"\Astep_[0-9]+\Z")
# A run id is one path component with no character that a filesystem, a URL or
# fsspec reads specially ('?' starts a version query on s3fs, '*' and '[' are globs).
_SAFE_RUN_ID = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.,=+@-]{0,254}\Z")


# --------------------------------------------------------------------------- names


def checkpoint_name(key: str | int) -> str:
    """The directory name of a checkpoint: ``state_latest``, ``state_1000``..."""
    return f"{PREFIX}{key}"


def checkpoint_key(entry: str) -> str | None:
    """The key of a directory entry with a canonical checkpoint name (``state_1000`` ->
    ``"1000"``), or ``None`` for any other entry. This is the one function that decides
    what is named like a checkpoint: :func:`checkpoint_name` of its key gives the entry
    back, and loading the key by name finds it."""
    if not entry.startswith(PREFIX):
        return None
    key = entry[len(PREFIX) :]
    return key if is_canonical_key(key) else None


def is_canonical_key(key: Any) -> bool:
    """Whether ``key`` names a checkpoint one way only: ASCII letters, digits, ``_``,
    ``-`` and ``.`` (no ``..``, not starting with ``.`` or ``-``, at most 128), a step
    in plain decimal (``"7"``, not ``"007"``), not ending like a legacy pickle
    (``.pyd``) or a temporary file, and not ``step_<N>`` (the listing's name of step N)."""
    if not isinstance(key, str) or not _SAFE_KEY.match(key) or ".." in key:
        return False
    if key.isdigit():
        return key == str(int(key))
    return not key.endswith((LEGACY_SUFFIX, ".tmp")) and not _STEP_ALIAS.match(key)


def numbered_step(key: str) -> int | None:
    """The step of a numbered checkpoint's key (``"1000"``), ``None`` for any other key;
    only the canonical spelling counts (``"007"`` is not step 7)."""
    if key.isascii() and key.isdigit() and (key == "0" or not key.startswith("0")):
        return int(key)
    return None


def check_suffix(suffix: Any, *, saving: bool = False) -> str:
    """``suffix`` if it is a safe checkpoint key, else ``ValueError``. A save may not take
    a key that would pass for a numbered checkpoint."""
    if saving and isinstance(suffix, str) and (suffix.isdigit() or suffix.startswith(STEP_KEY)):
        raise ValueError(
            f"Suffix {suffix!r} would pass for a numbered checkpoint: to save one, pass "
            "step= without a suffix."
        )
    if not is_canonical_key(suffix):
        raise ValueError(
            f"Checkpoint name {suffix!r} is not safe: use ASCII letters, digits, '_', '-' "
            "and '.' (not starting with '.' or '-', no '..', at most 128 characters, a "
            "step without leading zeros, not ending in '.pyd' or '.tmp', not 'step_<N>')"
        )
    return suffix


def check_run_id(run_id: Any) -> str:
    """``run_id`` if it is a safe path component on every storage, else ``ValueError``."""
    if not isinstance(run_id, str) or not _SAFE_RUN_ID.match(run_id):
        raise ValueError(
            "run_id must be one path component of ASCII letters, digits and '_.,=+@-' "
            f"(not starting with '.' or '-', at most 255 characters), got {run_id!r}"
        )
    return run_id


def key_of_name(text: str) -> str:
    """The checkpoint key a user means by ``text``: ``"latest"``, ``"state_best"``,
    ``"1000"``, ``"step_1000"`` (a key of list_available_checkpoints) or a legacy file
    name ``"state_1000.pyd"``. Raises ``ValueError`` for an unsafe name."""
    if text.endswith(LEGACY_SUFFIX):
        text = text[: -len(LEGACY_SUFFIX)]
    key = text.removeprefix(PREFIX)
    if key.startswith(STEP_KEY) and key[len(STEP_KEY) :].isdigit():
        key = key[len(STEP_KEY) :]
    return check_suffix(key)


def legacy_step(entry: str) -> float:
    """The step a legacy file name stands for (``state_1000.pyd`` -> 1000); -inf when
    the name carries none (``state_latest.pyd``)."""
    step = numbered_step(entry[len(PREFIX) : -len(LEGACY_SUFFIX)])
    return float(step) if step is not None else -math.inf


def _reading_order(key: str) -> tuple[int, int, str]:
    """Where checkpoint ``key`` comes when people read a listing: latest, best, the
    numbered ones by step, then any other key by name."""
    if key in (LATEST, BEST):
        return (0, (LATEST, BEST).index(key), "")
    step = numbered_step(key)
    return (1, step, "") if step is not None else (2, 0, key)


def legacy_key(entry: str) -> str | None:
    """The key of a canonical legacy pickle name (``state_1000.pyd`` -> ``"1000"``), or
    ``None``."""
    if not entry.endswith(LEGACY_SUFFIX):
        return None
    return checkpoint_key(entry[: -len(LEGACY_SUFFIX)])


# --------------------------------------------------------------------------- best record


@dataclass(frozen=True)
class BestRecord:
    """How ``state_best`` was chosen: by which metric, its value, and its direction."""

    metric: str
    value: float
    minimize: bool

    def to_manifest(self) -> dict[str, Any]:
        """The entry a best checkpoint's manifest carries (under ``"best"``)."""
        value = _tree.encode_float(self.value)
        return {"best": {"metric": self.metric, "value": value, "minimize": self.minimize}}

    @classmethod
    def of_manifest(
        cls,
        manifest: Mapping[str, Any],
        *,
        metric_name: str | None = None,
        minimize: bool = True,
    ) -> BestRecord | None:
        """The record in a best checkpoint's manifest; ``None`` when it has none or an
        unreadable one. A best saved by hand (``save_checkpoint(is_best=True)``) has no
        record: given ``metric_name``, its metrics' value of it stands in."""
        record = manifest.get("best")
        if not isinstance(record, dict):
            metrics = manifest.get("metrics")
            if metric_name is None or not isinstance(metrics, dict) or metric_name not in metrics:
                return None
            record = {"metric": metric_name, "value": metrics[metric_name], "minimize": minimize}
        metric, direction = record.get("metric"), record.get("minimize")
        if not isinstance(metric, str) or not isinstance(direction, bool):
            return None
        try:
            value = _tree.decode_float(record.get("value"), "best metric")
        except ValueError:
            return None
        return cls(metric, value, direction)


# --------------------------------------------------------------------------- registry


def checkpoints_dir(storage: Storage, run: str) -> str:
    """The ``checkpoints`` directory of a run given as ``<registry>/<run_id>`` or as that
    directory itself."""
    if run.rstrip("/").rpartition("/")[2] == CHECKPOINTS:
        return run.rstrip("/")
    return storage.join(run, CHECKPOINTS)


def run_dirs(storage: Storage, registry: str) -> list[str]:
    """The runs of a registry: its subdirectories that hold a ``checkpoints`` directory."""
    return [
        storage.join(registry, e)
        for e in sorted(storage.listdir(registry))
        if storage.isdir(storage.join(registry, e, CHECKPOINTS))
    ]


def _has_checkpoints(storage: Storage, directory: str) -> bool:
    """Whether a run's ``checkpoints`` directory holds a committed checkpoint or a
    legacy pickle (one listing, and a manifest check per checkpoint directory)."""
    for entry, kind in storage.scan(directory):
        if kind == "dir" and checkpoint_key(entry) is not None:
            if storage.isfile(storage.join(directory, entry, MANIFEST)):
                return True
        elif kind == "file" and legacy_key(entry) is not None:
            return True
    return False


def _without_digits(name: str) -> str:
    return re.sub(r"[0-9]+", "#", name)


def path_kind(storage: Storage, path: str) -> str:
    """``"checkpoint"``, ``"run"`` or ``"registry"``: what ``path`` points at.
    Raises ``FileNotFoundError`` when nothing is there."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if storage.isfile(storage.join(path, MANIFEST)):
        return "checkpoint"
    if not storage.isdir(path):
        if storage.isfile(path):
            raise FileNotFoundError(f"{path} is a file, not a checkpoint, run or registry")
        raise FileNotFoundError(f"No such checkpoint, run or registry: {path}")
    # A run may well be called "state_space": its checkpoints directory decides.
    if name == CHECKPOINTS or storage.isdir(storage.join(path, CHECKPOINTS)):
        return "run"
    if name.startswith(PREFIX) and parent.rpartition("/")[2] == CHECKPOINTS:
        return "checkpoint"  # one without a manifest: reading it says so
    return "registry"


# --------------------------------------------------------------------------- one run


class RunDirectory:
    """The ``checkpoints`` directory of one run on one storage."""

    def __init__(self, storage: Storage, path: str) -> None:
        self.storage = storage
        self.path = path
        self._warned: set[str] = set()  # foreign entries already warned about

    def scan(self) -> tuple[list[str], list[str]]:
        """The one listing of the run directory: the checkpoint directories (committed
        or not) and the legacy pickle files, by canonical name. Anything else is foreign
        (an odd name, a link, a file of another kind where a checkpoint would be): it is
        never read, written or deleted, and named in one warning."""
        directories, legacy = [], []
        for entry, kind in self.storage.scan(self.path):
            if entry in _OWN_ENTRIES:
                continue
            if kind == "dir" and checkpoint_key(entry) is not None:
                directories.append(entry)
            elif kind == "file" and legacy_key(entry) is not None:
                legacy.append(entry)
            else:
                self._warn_once(
                    entry,
                    "not a checkpoint learnax wrote (%s); it is never read, written or deleted",
                    "a link or a special file" if kind == "other" else "not a canonical name",
                )
        return directories, legacy

    def _warn_once(self, entry: str, why: str, *args: Any) -> None:
        """Say once per entry (per run directory) why it is ignored."""
        if entry not in self._warned:
            self._warned.add(entry)
            logger.warning("Ignoring %s: " + why, self.join(entry), *args)

    def is_foreign(self, name: str) -> bool:
        """Whether the entry where checkpoint ``name`` would be is something learnax did
        not make (a link, a file, a FIFO): never written through or deleted."""
        return self.storage.kind(self.join(name)) not in (None, "dir")

    def join(self, name: str) -> str:
        """The path of entry ``name`` (a checkpoint directory name)."""
        return self.storage.join(self.path, name)

    def is_committed(self, name: str) -> bool:
        return self.storage.isfile(self.storage.join(self.path, name, MANIFEST))

    def read_manifest(self, name: str) -> dict[str, Any]:
        """The verified manifest of checkpoint ``name`` (``FileNotFoundError`` when it is
        not committed, ``CheckpointCorruptedError`` when damaged)."""
        return read_manifest(self.storage, self.join(name))

    def names(self) -> list[str]:
        """The committed checkpoints (intact or not), in the order people read them:
        latest, best, the numbered ones by step, then any other key by name."""
        names = [entry for entry in self.scan()[0] if self.is_committed(entry)]
        return sorted(names, key=lambda entry: _reading_order(checkpoint_key(entry)))

    def copies_of(self, file: str) -> list[str]:
        """The paths a data file named ``file`` would have in each committed checkpoint
        (whether it is there or not: the caller tries them)."""
        try:
            return [self.storage.join(self.join(name), file) for name in self.names()]
        except OSError:
            return []

    def numbered_steps(self) -> list[int]:
        """The steps of the committed numbered checkpoints, ascending."""
        steps = (numbered_step(name[len(PREFIX) :]) for name in self.names())
        return [s for s in steps if s is not None]

    def available(self) -> dict[str, str]:
        """``list_available_checkpoints()``: ``"latest"``, ``"best"``, ``"step_<N>"`` per
        numbered checkpoint (ascending) and any other key, each mapped to its path."""
        found = {}
        for name in self.names():
            key = name[len(PREFIX) :]
            found[key if numbered_step(key) is None else STEP_KEY + key] = self.join(name)
        return found

    def newest_first(self) -> list[tuple[str, dict[str, Any] | None]]:
        """``state_latest`` and the numbered checkpoints, by step, newest first; on equal
        steps ``state_latest`` first. A latest whose manifest cannot be read comes first,
        so that loading it reports the damage. Each comes with its manifest where it was
        read already (latest's, read for its step), so a load need not read it again."""
        candidates = [(float(s), 0, checkpoint_name(s), None) for s in self.numbered_steps()]
        latest = checkpoint_name(LATEST)
        if self.is_committed(latest):
            try:
                manifest = self.read_manifest(latest)
                candidates.append((float(manifest["step"]), 1, latest, manifest))
            except CheckpointCorruptedError:
                candidates.append((math.inf, 1, latest, None))
            except FileNotFoundError:
                pass  # deleted since it was listed: not a candidate
        candidates.sort(key=lambda c: c[:2], reverse=True)
        return [(name, manifest) for *_, name, manifest in candidates]

    def latest_step(self) -> int | None:
        """The step :meth:`newest_first`'s first checkpoint with a readable manifest
        was saved at (what ``load_latest`` returns unless a data file of it is damaged);
        ``None`` when there is none. Reads manifests only, never a data file."""
        for name, manifest in self.newest_first():
            try:
                return (manifest or self.read_manifest(name))["step"]
            except (CheckpointCorruptedError, FileNotFoundError):
                continue  # damaged, or deleted by retention since it was listed
        return None

    def similar_runs(self, run_id: str) -> list[str]:
        """When this run has no checkpoint, the ids of runs beside it in the registry
        that have checkpoints and a name close to ``run_id``, closest first: a typo,
        probably. Runs whose names differ from it only in digits (``run-1`` beside a new
        ``run-3``) are siblings of a sweep, not typos, and are left out. ``[]`` when the
        run has checkpoints, when none is close, or when the registry cannot be listed."""
        registry = self.storage.dirname(self.storage.dirname(self.path))
        try:
            if _has_checkpoints(self.storage, self.path):
                return []
            others = [
                e
                for e in self.storage.listdir(registry)
                if e != run_id and _without_digits(e) != _without_digits(run_id)
            ]
        except OSError as e:  # only a hint: never worth failing a load
            logger.debug("Could not look for runs named like %r in %s: %s", run_id, registry, e)
            return []
        close = difflib.get_close_matches(run_id, others, n=10, cutoff=0.6)
        return [r for r in close if self._is_run_with_checkpoints(registry, r)][:3]

    def _is_run_with_checkpoints(self, registry: str, name: str) -> bool:
        """Whether entry ``name`` of the registry is a run with checkpoints; ``False``
        for one that cannot be read as a run (a log file beside the runs, an unreadable
        directory): that candidate is left out of the hint, not the others."""
        try:
            directory = checkpoints_dir(self.storage, self.storage.join(registry, name))
            return _has_checkpoints(self.storage, directory)
        except OSError as e:
            logger.debug("Not offering %r as a run named like this one: %s", name, e)
            return False

    def find_step(self, step: int) -> str | None:
        """The path of the committed checkpoint of ``step``: the numbered one, else
        latest or best when their manifest says that step."""
        if self.is_committed(checkpoint_name(step)):
            return self.join(checkpoint_name(step))
        for name in (checkpoint_name(LATEST), checkpoint_name(BEST)):
            try:
                if self.is_committed(name) and self.read_manifest(name)["step"] == step:
                    return self.join(name)
            except CheckpointCorruptedError:  # not this one, whatever its step was
                continue
        return None

    def resolve(self, path_or_index: Any) -> str | None:
        """The path a user means by ``path_or_index``, as ``load_checkpoint`` takes it: an
        ``int`` step (``None`` for ``-1``: the newest), a name (``"latest"``,
        ``"1000"``, ``"step_1000"``) or a path (anything with a separator). Raises
        ``TypeError`` for other types, ``ValueError`` for a negative step or an unsafe
        name."""
        if isinstance(path_or_index, (bool, np.bool_)):
            raise TypeError("path_or_index must be a step (int) or a name/path (str), not a bool")
        if isinstance(path_or_index, (int, np.integer)):
            step = int(path_or_index)
            if step == -1:
                return None
            if step < 0:
                raise ValueError(f"Step must be >= 0 (or -1 for the latest), got {step}")
            return self.find_step(step) or self.join(checkpoint_name(step))
        if isinstance(path_or_index, (str, os.PathLike)):
            text = os.fspath(path_or_index)
            if "/" in text or os.sep in text:
                return text
            return self.join(checkpoint_name(key_of_name(text)))
        raise TypeError(
            f"path_or_index must be an int or a str, got {type(path_or_index).__name__}"
        )

    def legacy_files(self) -> list[str]:
        """The original learnax's pickle checkpoints here (``state_<name>.pyd``), in the
        order of :meth:`names`: latest, best, the numbered ones by step, then others."""
        return sorted(self.scan()[1], key=lambda entry: _reading_order(legacy_key(entry)))

    def best_record(self, metric_name: str, minimize: bool) -> BestRecord | None:
        """The record of ``state_best``; ``None`` when there is none or it cannot be read
        (logged)."""
        name = checkpoint_name(BEST)
        if not self.is_committed(name):
            return None
        try:
            manifest = self.read_manifest(name)
        except CheckpointCorruptedError as e:
            logger.warning("Cannot read the best metric of this run: %s", e)
            return None
        record = BestRecord.of_manifest(manifest, metric_name=metric_name, minimize=minimize)
        if record is None and "best" in manifest:
            logger.warning("The best checkpoint of this run has an unreadable metric value")
        return record

    def apply_retention(
        self,
        max_to_keep: int | None,
        keep_period: int | None,
        top_k: Callable[[list[int]], set[int] | None] | None = None,
    ) -> None:
        """Delete the numbered checkpoints beyond the newest ``max_to_keep`` (multiples of
        ``keep_period`` kept, uncounted), but none of the steps ``top_k(steps)`` ranks
        among the best (with ``top_k``, ``max_to_keep=None`` keeps no others; a ``None``
        ranking, which could not be read, deletes nothing). Runs after a commit, so a
        failure here is logged, never a failed save."""
        if max_to_keep is None and top_k is None:
            return
        try:
            steps = self.numbered_steps()
        except OSError as e:
            logger.warning("Could not list %s to apply retention: %s", self.path, e)
            return
        best = top_k(steps) if top_k is not None else None
        if top_k is not None and best is None:
            return
        for step in retention_victims(steps, max_to_keep, keep_period, best):
            self.delete(checkpoint_name(step))

    def delete(self, name: str) -> bool:
        """Delete checkpoint ``name`` under the run's lock; ``False`` (logged) when it
        failed. Removing the manifest first makes the deletion atomic for readers: a
        crash halfway leaves a directory without manifest, a leftover, never a
        checkpoint with missing files."""
        directory = self.join(name)
        try:
            if checkpoint_key(name) is None or self.is_foreign(name):
                logger.warning(
                    "Not deleting %s: not a checkpoint directory learnax wrote", directory
                )
                return False
            with self.storage.lock(self.path):
                self.storage.remove(self.storage.join(directory, MANIFEST))
                self.storage.fsync_dir(directory)
                self.storage.rmtree(directory)
        except OSError as e:
            logger.warning("Could not delete old checkpoint %s: %s", directory, e)
            return False
        logger.debug("Deleted old checkpoint %s", directory)
        return True

    def clean_leftovers(self, now: float) -> None:
        """Remove what interrupted saves and deletions left behind: directories without
        a manifest, data files no manifest refers to, temporary manifests. Only a
        writer calls it, after its own first commit (a reader never deletes), and
        ``now`` is the storage's clock at that commit (see ``Storage.unused``). Skipped
        while another process is saving to this run (it holds the lock); anything the
        storage cannot answer about is left as it is."""
        with self.storage.lock(self.path, blocking=False) as locked:
            if not locked:
                return
            try:
                entries = self.scan()[0]
            except OSError as e:
                logger.warning("Could not list %s to clean up leftovers: %s", self.path, e)
                return
            for entry in entries:
                directory = self.join(entry)
                try:
                    self._clean_checkpoint_dir(entry, directory, now)
                except OSError as e:
                    logger.warning("Could not clean up leftovers in %s: %s", directory, e)

    def _clean_checkpoint_dir(self, entry: str, directory: str, now: float) -> None:
        storage = self.storage
        manifest_kind = storage.kind(storage.join(directory, MANIFEST))
        if manifest_kind not in (None, "file"):
            self._warn_once(entry, "its manifest is not a regular file")
            return
        if manifest_kind is None:
            if storage.unused(directory, now):
                logger.info(
                    "Removing incomplete checkpoint %s (an interrupted save or deletion)",
                    directory,
                )
                storage.rmtree(directory)
            return
        entries = storage.scan(directory)
        try:
            keep = set(self.read_manifest(entry)["files"])
        except CheckpointCorruptedError:
            # Damaged: keep its files for inspection; load_latest skips it.
            keep = {name for name, _ in entries if not name.endswith(".tmp")}
        for name, kind in entries:
            path = storage.join(directory, name)
            # Only what learnax writes there is ever removed: a file someone else put
            # in a checkpoint directory (notes, a link) stays.
            if (
                kind == "file"
                and is_own_file(name)
                and name not in keep
                and storage.unused(path, now)
            ):
                logger.info("Removing leftover file %s", path)
                storage.remove(path)

    def __repr__(self) -> str:
        return f"RunDirectory({self.path!r})"
