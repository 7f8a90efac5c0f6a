"""Checkpoints of the original learnax: ``state_<name>.pyd`` pickle files.

The original Trainer pickled ``{"state": train_state, "step", "time", "metrics"}``
with a ``learnax.trainer.TrainState`` of NumPy arrays and optax states. Those files are
read by default, by the restricted unpickler of ``_unpickle``, which runs nothing from
them; a file that needs more raises :class:`LegacyPickleError`, and is unpickled by
Python only when the caller passes ``allow_pickle=True``. This module knows the shape
of those files and which of a run's files ``load_latest`` falls back to.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import _tree, _unpickle
from ._errors import CheckpointCorruptedError, LegacyPickleError
from ._read import LoadedCheckpoint
from ._run import BEST, LATEST, LEGACY_SUFFIX, checkpoint_name, legacy_step
from ._storage import Storage, UnsafeFileError
from ._target import restore_into_target

logger = logging.getLogger("learnax")

SUFFIX = LEGACY_SUFFIX


def load_legacy(
    storage: Storage, path: str, allow_pickle: bool, target: Any = None, allow_cast: bool = False
) -> LoadedCheckpoint:
    """Read the legacy pickle checkpoint at ``path``.

    Returns the ``{"state", "step", "time", "metrics"}`` dict of a load, the state
    restored into ``target`` when one is given (dtypes cast where ``allow_cast``
    allows, see ``_target``). Raises :class:`LegacyPickleError` when
    the file needs code to be rebuilt and ``allow_pickle`` is false,
    :class:`CheckpointCorruptedError` when it is not a readable checkpoint.
    """
    try:
        return _load(storage, path, allow_pickle, target, allow_cast)
    except _unpickle.NeedsCode as e:
        raise LegacyPickleError(
            f"{path} is a pickle checkpoint that cannot be read without running code "
            f"from it: {e}. Without running anything, learnax reads NumPy "
            "and jax arrays, builtin containers and NamedTuples from a pickle. If you "
            "trust the file, pass allow_pickle=True; to convert it once and for all: "
            f"learnax convert {path} {converted_path(path)} --allow-pickle"
        ) from None


def converted_path(path: str) -> str:
    """Where ``learnax convert`` writes the checkpoint of legacy file ``path`` beside it:
    ``state_1000.pyd`` -> ``state_1000``."""
    return path[: -len(SUFFIX)] if path.endswith(SUFFIX) else path


# A pickle holds the whole state; this only bounds what a crafted size could claim.
_MAX_PICKLE = 1 << 40


def _load(
    storage: Storage, path: str, allow_pickle: bool, target: Any, allow_cast: bool
) -> LoadedCheckpoint:
    """:func:`load_legacy`, a pickle that needs code raising ``_unpickle.NeedsCode``."""
    obj = _unpickle.load(read_bounded(storage, path), path, allow_pickle)
    try:
        loaded = _as_loaded(obj, storage, path)
    except (TypeError, ValueError, OverflowError, AttributeError, KeyError) as e:
        # What a crafted pickle put where the step, time or metrics go.
        raise CheckpointCorruptedError(f"{path}: {type(e).__name__}: {e}") from None
    if target is not None:
        loaded["state"] = _restore(loaded["state"], target, path, allow_cast)
    return loaded


def read_bounded(storage: Storage, path: str) -> bytes:
    """The bytes of regular file ``path``: never more than its size said when opened
    (a link, a FIFO or a device is damage, not something to follow or wait on)."""
    try:
        return storage.read_bytes(path, _MAX_PICKLE)
    except UnsafeFileError as e:
        raise CheckpointCorruptedError(f"{path}: {e.strerror}") from None


def _as_loaded(obj: Any, storage: Storage, path: str) -> LoadedCheckpoint:
    """A load's dict from what the file held: the original's dict, or a bare state."""
    if isinstance(obj, dict) and "state" in obj:
        metrics = obj.get("metrics")
        if metrics is not None and not isinstance(metrics, Mapping):
            raise CheckpointCorruptedError(f"{path}: 'metrics' is {type(metrics).__name__}")
        when = obj.get("time")
        return {
            "state": obj["state"],
            "step": _step(obj.get("step"), path),
            "time": storage.mtime(path) if when is None else _time(when, path),
            "metrics": dict(metrics or {}),
        }
    step = obj.get("step") if isinstance(obj, dict) else getattr(obj, "step", None)
    return {"state": obj, "step": _step(step, path), "time": storage.mtime(path), "metrics": {}}


def _step(value: Any, path: str) -> int | None:
    """The step a file records: an int, a NumPy or jax integer (a train state's step),
    or ``None`` when it recorded none."""
    if value is None or type(value) is int:
        return value
    if isinstance(value, (np.integer, np.ndarray)) and np.ndim(value) == 0:
        if np.issubdtype(np.asarray(value).dtype, np.integer):
            return int(value)
    raise CheckpointCorruptedError(f"{path}: the step is not an int: {value!r:.60}")


def _time(value: Any, path: str) -> float:
    if not isinstance(value, (bool, complex, np.complexfloating)) and isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        try:
            return float(value)
        except OverflowError:
            pass
    raise CheckpointCorruptedError(f"{path}: the time is not a number: {value!r:.60}")


def _restore(state: Any, target: Any, path: str, allow_cast: bool) -> Any:
    """``state`` (read from a pickle) in the types and structure of ``target``, as the
    same target restores a learnax checkpoint."""
    try:
        tree, leaves = _tree.encode_tree(state)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot restore into the target: {e}") from None
    arrays = _InMemoryArrays({leaf.name: np.asarray(leaf.value) for leaf in leaves})

    def read_nodes(nodes: list[Any]) -> list[Any]:
        return [_tree.decode_tree(node, arrays.array) for node in nodes]

    return restore_into_target(tree, target, read_nodes, arrays, allow_cast=allow_cast)


class _InMemoryArrays:
    """The arrays of a state already in memory, read as a target restore reads a
    checkpoint's."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def array(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...], str]:
        return self.arrays[name].dtype, self.arrays[name].shape, "array"

    def read_region(self, name: str, region: tuple[slice, ...]) -> np.ndarray:
        return self.arrays[name][region]


# --------------------------------------------------------------------------- a run's


def load_newest_legacy(
    storage: Storage,
    directory: str,
    entries: list[str],
    allow_pickle: bool,
    target: Any = None,
    allow_cast: bool = False,
) -> LoadedCheckpoint | None:
    """The newest of the legacy pickle files ``entries`` of a run's ``directory`` (what
    ``load_latest`` falls back to); ``None`` when none can be read.

    Reads as few as it can: latest, whose step only the file knows, then the numbered
    ones newest first until one is read, unless latest is at least as new (with
    neither, the other names, the last by name first). A damaged file is skipped with a
    warning on logger ``learnax``. One that needs code (unless ``allow_pickle``) raises
    :class:`LegacyPickleError` naming it and ``learnax convert``: without it the newest
    cannot be known.
    """
    latest = checkpoint_name(LATEST) + SUFFIX
    numbered = sorted((e for e in entries if legacy_step(e) >= 0), key=legacy_step, reverse=True)
    loaded: list[LoadedCheckpoint] = []
    if latest in entries:
        loaded += _read_or_skip(
            storage, directory, entries, latest, allow_pickle, target, allow_cast
        )
    for entry in numbered:
        if loaded and _step_or_minus_one(loaded[0]) >= legacy_step(entry):
            break
        found = _read_or_skip(storage, directory, entries, entry, allow_pickle, target, allow_cast)
        if found:
            loaded += found
            break
    if latest not in entries and not numbered:
        others = sorted(e for e in entries if e != checkpoint_name(BEST) + SUFFIX)
        for entry in reversed(others):
            loaded = _read_or_skip(
                storage, directory, entries, entry, allow_pickle, target, allow_cast
            )
            if loaded:
                break
    return max(loaded, key=_step_or_minus_one, default=None)


def _step_or_minus_one(loaded: LoadedCheckpoint) -> float:
    return -1 if loaded["step"] is None else loaded["step"]


def _read_or_skip(
    storage: Storage,
    directory: str,
    entries: list[str],
    entry: str,
    allow_pickle: bool,
    target: Any,
    allow_cast: bool,
) -> list[LoadedCheckpoint]:
    """One legacy file of the run, as a list: empty (warned) when it is damaged."""
    path = storage.join(directory, entry)
    try:
        return [_load(storage, path, allow_pickle, target, allow_cast)]
    except CheckpointCorruptedError as e:
        logger.warning("Skipping damaged legacy checkpoint %s: %s", path, e)
        return []
    except _unpickle.NeedsCode as e:
        raise LegacyPickleError(
            f"{directory} holds only pickle checkpoints of the original learnax "
            f"({', '.join(sorted(entries))}), and {entry} cannot be read without running "
            f"code from it: {e}. If you trust it, pass allow_pickle=True to resume from "
            "it; to convert the run's pickles once and for all, one command per file: "
            f"learnax convert {path} {converted_path(path)} --allow-pickle"
        ) from None
