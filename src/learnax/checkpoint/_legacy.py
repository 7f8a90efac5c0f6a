"""Checkpoints of the original learnax: ``state_<name>.pyd`` pickle files.

They are recognised so that a run started with the original learnax is not silently
restarted from scratch, but unpickling runs code named by the file, so they are only
read when the caller passes ``allow_pickle=True``.
"""

from __future__ import annotations

import logging
import math
import pickle
from typing import Any

from ._errors import CheckpointCorruptedError, LegacyPickleError

logger = logging.getLogger("learnax")

SUFFIX = ".pyd"


def load_legacy(storage: Any, path: str, allow_pickle: bool) -> dict[str, Any]:
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


def legacy_step(name: str) -> float:
    """The step a legacy file name stands for (``state_1000.pyd`` -> 1000); -inf when
    the name carries none (``state_latest.pyd``)."""
    stem = name[len("state_") : -len(SUFFIX)]
    return float(stem) if stem.isdigit() else -math.inf
