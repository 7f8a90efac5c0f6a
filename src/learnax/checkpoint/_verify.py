"""Checking stored checkpoints completely: every manifest, every data file's size and
header, and the checksum of every byte, in batches so that memory stays bounded."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import _tree
from ._errors import CheckpointCorruptedError
from ._inspect import checkpoints_under
from ._manifest import MANIFEST
from ._metrics import decode_metrics
from ._read import CheckpointReader, read_consistent
from ._storage import open_storage
from ._storage.counted import CountedStorage

if TYPE_CHECKING:
    from ._storage import Storage

# verify reads at most this many bytes of arrays at once.
_VERIFY_BATCH = 256 << 20
_UNCOMMITTED = "no manifest.json: not committed"


def verify(
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    report: Callable[[str, str | None], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> list[tuple[str, str]]:
    """Read every byte of the checkpoints under ``path`` and check every checksum.

    **Arguments:**

    - `path`: a checkpoint, a run (``<registry>/<run_id>``) or a whole registry.
    - `storage_options`: options for the fsspec filesystem of a URL.
    - `report`: called after each checkpoint with its path and the problem found
      (``None`` when intact).
    - `progress`: called as bytes are read, ``progress("verify", nbytes, total)``:
      `nbytes` just read, `total` the size of all the checkpoints' files (a guide: the
      count may end a little short of it or past it), e.g. for a progress bar.

    **Returns:** ``(checkpoint path, problem)`` for each damaged checkpoint; an empty
    list when all are intact. Raises ``FileNotFoundError`` when ``path`` holds nothing.

    **Example:** `assert not verify("runs/mlp"), "a checkpoint is damaged"`
    """
    storage, path = open_storage(str(path), storage_options)
    damaged = []
    checkpoints = checkpoints_under(storage, path)
    if progress is not None:
        total = sum(storage.usage(checkpoint)[0] for checkpoint in checkpoints)
        progress("verify", 0, total)
        storage = CountedStorage(storage, lambda n: progress("verify", n, total))  # type: ignore[assignment]
    for checkpoint in checkpoints:
        problem = _verify_live(storage, checkpoint)
        if problem == "gone" or (problem == _UNCOMMITTED and checkpoint != path):
            # Listed as committed, its manifest gone since: deleted by a live run's
            # retention while we looked. Nothing to check.
            continue
        if problem is not None:
            damaged.append((checkpoint, problem))
        if report is not None:
            report(checkpoint, problem)
    return damaged


def _verify_live(storage: Storage, path: str) -> str | None:
    """The problem with a checkpoint, ``None`` when intact, ``"gone"`` when it was
    deleted meanwhile. A run still training may replace a checkpoint while it is read:
    the reader sees the old one or the new one whole (``read_consistent``)."""
    try:
        read_consistent(storage, path, verify_reader, keys_as_data=True)
    except FileNotFoundError:
        return "gone" if not storage.isdir(path) else _UNCOMMITTED
    except CheckpointCorruptedError as e:
        return str(e)
    return None


def verify_checkpoint(storage: Storage, path: str) -> None:
    """Check one checkpoint completely: its manifest, every data file's size and header,
    and the checksum of every byte of every array (read in batches, so memory stays
    bounded). Raises :class:`CheckpointCorruptedError` naming the file."""
    read_consistent(storage, path, verify_reader, keys_as_data=True)


def verify_reader(reader: CheckpointReader) -> None:
    """Check everything ``reader``'s checkpoint holds (see :func:`verify_checkpoint`)."""
    manifest = reader.manifest
    where = reader.storage.join(reader.directory, MANIFEST)
    reader.check_files()
    decode_metrics(manifest["metrics"], where)  # as every load and read_info does
    try:
        in_tree = set(_tree.array_names(manifest["tree"]))
    except _tree.MalformedTreeError as e:
        raise CheckpointCorruptedError(f"{where}: invalid tree: {e}") from None
    missing = in_tree - set(manifest["arrays"])
    if missing:
        raise CheckpointCorruptedError(
            f"{where}: the tree names unknown arrays {sorted(missing)[:3]}"
        )
    batch: list[str] = []
    size = 0
    for name in manifest["arrays"]:
        dtype, shape, _ = reader.info(name)
        batch.append(name)
        size += math.prod(shape) * dtype.itemsize
        if size >= _VERIFY_BATCH:
            _read_and_drop(reader, batch)
            batch, size = [], 0
    _read_and_drop(reader, batch)


def _read_and_drop(reader: CheckpointReader, names: list[str]) -> None:
    reader.prefetch(names)
    for name in names:
        reader.array(name)
