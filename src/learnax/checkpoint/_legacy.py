"""Checkpoints of the original learnax: ``state_<name>.pyd`` pickle files.

They are recognised so that a run started with the original learnax is not silently
restarted from scratch, but unpickling runs code named by the file, so they are only
read when the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import logging
import pickle

from ._errors import CheckpointCorruptedError, LegacyPickleError
from ._read import LoadedCheckpoint
from ._run import BEST, LATEST, LEGACY_SUFFIX, checkpoint_name, legacy_step
from ._storage import Storage

logger = logging.getLogger("learnax")

SUFFIX = LEGACY_SUFFIX


def load_legacy(storage: Storage, path: str, allow_pickle: bool) -> LoadedCheckpoint:
    """Read a legacy pickle checkpoint, only if ``allow_pickle``.

    Returns the ``{"state", "step", "time", "metrics"}`` dict of a load.
    """
    if not allow_pickle:
        raise LegacyPickleError(
            f"{path} is a pickle checkpoint of the original learnax. Loading it would run "
            "code from the file. If you trust it, pass allow_pickle=True; to convert it once "
            f"and for all: learnax convert {path} <checkpoints dir>/state_<step> --allow-pickle"
        )
    logger.warning(
        "Unpickling legacy checkpoint %s (allow_pickle=True): this runs code from the file", path
    )
    with storage.open_stream(path) as f:
        try:
            obj = pickle.load(f)  # noqa: S301 - explicitly allowed by the caller
        except Exception as e:
            raise CheckpointCorruptedError(f"{path}: cannot unpickle ({e})") from e
    if isinstance(obj, dict) and "state" in obj:
        step = obj.get("step")
        return {
            "state": obj["state"],
            "step": int(step) if step is not None else None,
            "time": obj.get("time", storage.mtime(path)),
            "metrics": dict(obj.get("metrics") or {}),
        }
    step = getattr(obj, "step", None)
    return {
        "state": obj,
        "step": int(step) if step is not None else None,
        "time": storage.mtime(path),
        "metrics": {},
    }


def load_newest_legacy(
    storage: Storage, directory: str, entries: list[str], allow_pickle: bool
) -> LoadedCheckpoint | None:
    """The newest of the legacy pickle files ``entries`` of a run's ``directory`` (what
    ``load_latest`` falls back to); ``None`` when there are none. Unpickles as little as
    possible: the highest numbered file, and latest (whose step only the file itself
    knows). Without ``allow_pickle``: :class:`LegacyPickleError` naming them."""
    entries = [e for e in entries if e != checkpoint_name(BEST) + SUFFIX]
    if not entries:
        return None
    if not allow_pickle:
        raise LegacyPickleError(
            f"{directory} holds only pickle checkpoints of the original learnax "
            f"({', '.join(sorted(entries))}). Loading them would run code from the files; "
            "if you trust them, pass allow_pickle=True."
        )
    numbered = max((e for e in entries if legacy_step(e) >= 0), key=legacy_step, default=None)
    latest = checkpoint_name(LATEST) + SUFFIX
    chosen = [e for e in (numbered, latest) if e is not None and e in entries]
    if not chosen:  # only other suffixes
        chosen = sorted(entries)[-1:]
    loaded = [load_legacy(storage, storage.join(directory, e), True) for e in chosen]
    return max(loaded, key=lambda c: -1 if c["step"] is None else c["step"])
