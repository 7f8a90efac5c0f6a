"""Looking at stored checkpoints without a training loop: which runs and checkpoints
there are, what one holds, whether it is intact, how two differ, and retention applied
offline. The ``learnax`` command line is a thin layer over these functions.

Everything here reads manifests (small JSON files) unless it says otherwise: listing
and showing never read array data, so they are fast on object storage too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import _format, _tree
from ._dtypes import dtype_from_name
from ._errors import CheckpointCorruptedError
from ._storage import open_storage

_PREFIX = "state_"
# verify reads at most this many bytes of arrays at once.
_VERIFY_BATCH = 256 << 20


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of a stored tree, as the manifest describes it."""

    path: str  # keys joined by "/", e.g. "params/Dense_0/kernel"
    dtype: str  # a NumPy dtype name, "key<impl>" for a PRNG key, or the Python type
    shape: tuple[int, ...]
    nbytes: int
    value: Any = None  # the value of a Python scalar or str leaf


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its manifest alone."""

    path: str
    step: int
    time: float
    metrics: dict[str, Any]
    leaves: list[LeafInfo]
    nbytes: int  # all its files on storage
    best: dict[str, Any] | None = None  # how state_best was chosen: metric, value, minimize
    files: dict[str, Any] = field(default_factory=dict)


def read_info(path: str, *, storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """Read what a checkpoint holds without reading its arrays.

    **Arguments:**

    - `path`: a checkpoint directory (``.../checkpoints/state_1000``), local or a URL.
    - `storage_options`: options for the fsspec filesystem of a URL.

    **Returns:** a :class:`CheckpointInfo`: step, time, metrics, and every leaf's path,
    dtype, shape and size.

    Raises ``FileNotFoundError`` when there is no committed checkpoint at ``path`` and
    :class:`CheckpointCorruptedError` when its manifest fails verification.

    **Example:**

    ```python
    info = read_info("runs/mlp/checkpoints/state_latest")
    print(info.step, sum(leaf.nbytes for leaf in info.leaves))
    ```
    """
    storage, path = open_storage(str(path), storage_options)
    return checkpoint_info(storage, path)


def checkpoint_info(storage: Any, path: str) -> CheckpointInfo:
    manifest = _format.read_manifest(storage, path)
    leaves = [leaf for leaf, _ in _leaves(storage, path, manifest)]
    best = manifest.get("best")
    return CheckpointInfo(
        path=path,
        step=manifest["step"],
        time=manifest["time"],
        metrics=_format.decode_metrics(manifest["metrics"], path),
        leaves=leaves,
        nbytes=storage.usage(path)[0],
        best=best if isinstance(best, dict) else None,
        files=manifest["files"],
    )


def _leaves(storage: Any, path: str, manifest: dict[str, Any]) -> list[tuple[LeafInfo, Any]]:
    """Each leaf's description and its stored node, in tree order."""
    where = storage.join(path, _format.MANIFEST)
    try:
        return [
            (_leaf_info(manifest, keys, node, where), node)
            for keys, node in _tree.leaf_nodes(manifest["tree"])
        ]
    except _tree.MalformedTreeError as e:
        raise CheckpointCorruptedError(f"{where}: invalid tree: {e}") from None


def _leaf_info(manifest: dict[str, Any], keys: tuple, node: Any, where: str) -> LeafInfo:
    path = "/".join(str(k) for k in keys) or "<root>"
    if node is None:
        return LeafInfo(path, "None", (), 0)
    if "array" not in node:
        tag = next(t for t in _tree.SCALAR_TAGS if t in node)
        return LeafInfo(path, tag, (), 0, node[tag])
    dtype, _ = _format.check_array_entry(manifest, node["array"], where)
    entry = manifest["arrays"][node["array"]]
    shape = tuple(entry["shape"])
    name = f"key<{entry['impl']}>" if entry.get("kind") == "key" else dtype_name_of(entry)
    return LeafInfo(path, name, shape, math.prod(shape) * dtype.itemsize)


def dtype_name_of(entry: dict[str, Any]) -> str:
    return str(dtype_from_name(entry["dtype"]))


# --------------------------------------------------------------------------- where


def path_kind(storage: Any, path: str) -> str:
    """``"checkpoint"``, ``"run"`` or ``"registry"``: what ``path`` points at.
    Raises ``FileNotFoundError`` when nothing is there."""
    name = path.rstrip("/").rpartition("/")[2]
    if storage.isfile(storage.join(path, _format.MANIFEST)):
        return "checkpoint"
    if not storage.isdir(path):
        raise FileNotFoundError(f"No such checkpoint, run or registry: {path}")
    if name.startswith(_PREFIX):
        return "checkpoint"  # one without a manifest: reading it says so
    if name == "checkpoints" or storage.isdir(storage.join(path, "checkpoints")):
        return "run"
    return "registry"


def checkpoints_dir(storage: Any, run: str) -> str:
    """The ``checkpoints`` directory of a run given as ``<registry>/<run_id>`` or as that
    directory itself."""
    if run.rstrip("/").rpartition("/")[2] == "checkpoints":
        return run.rstrip("/")
    return storage.join(run, "checkpoints")


def checkpoint_names(storage: Any, directory: str) -> list[str]:
    """The checkpoints with a manifest in a run's ``checkpoints`` directory (intact or
    not): latest, best, the numbered ones by step, then any other name."""
    names = [
        e[len(_PREFIX) :]
        for e in storage.listdir(directory)
        if e.startswith(_PREFIX) and storage.isfile(storage.join(directory, e, _format.MANIFEST))
    ]
    fixed = [n for n in ("latest", "best") if n in names]
    numbered = sorted((n for n in names if n.isdigit()), key=int)
    others = sorted(n for n in names if n not in fixed and not n.isdigit())
    return [_PREFIX + n for n in (*fixed, *numbered, *others)]


def run_dirs(storage: Any, registry: str) -> list[str]:
    """The runs of a registry: its subdirectories that hold a ``checkpoints`` directory."""
    return [
        storage.join(registry, e)
        for e in sorted(storage.listdir(registry))
        if storage.isdir(storage.join(registry, e, "checkpoints"))
    ]


def checkpoints_under(storage: Any, path: str) -> list[str]:
    """Every checkpoint directory under ``path`` (a checkpoint, a run or a registry)."""
    kind = path_kind(storage, path)
    if kind == "checkpoint":
        return [path]
    runs = [path] if kind == "run" else run_dirs(storage, path)
    out = []
    for run in runs:
        directory = checkpoints_dir(storage, run)
        out += [storage.join(directory, n) for n in checkpoint_names(storage, directory)]
    return out


# --------------------------------------------------------------------------- verify


def verify(
    path: str,
    *,
    storage_options: dict[str, Any] | None = None,
    report: Callable[[str, str | None], None] | None = None,
) -> list[tuple[str, str]]:
    """Read every byte of the checkpoints under ``path`` and check every checksum.

    **Arguments:**

    - `path`: a checkpoint, a run (``<registry>/<run_id>``) or a whole registry.
    - `storage_options`: options for the fsspec filesystem of a URL.
    - `report`: called after each checkpoint with its path and the problem found
      (``None`` when intact), e.g. to show progress.

    **Returns:** ``(checkpoint path, problem)`` for each damaged checkpoint; an empty
    list when all are intact. Raises ``FileNotFoundError`` when ``path`` holds nothing.

    **Example:** `assert not verify("runs/mlp"), "a checkpoint is damaged"`
    """
    storage, path = open_storage(str(path), storage_options)
    damaged = []
    for checkpoint in checkpoints_under(storage, path):
        try:
            verify_checkpoint(storage, checkpoint)
            problem = None
        except CheckpointCorruptedError as e:
            problem = str(e)
        except FileNotFoundError:
            problem = "no manifest.json: not a committed checkpoint"
        if problem is not None:
            damaged.append((checkpoint, problem))
        if report is not None:
            report(checkpoint, problem)
    return damaged


def verify_checkpoint(storage: Any, path: str) -> None:
    """Check one checkpoint completely: its manifest, every data file's size and header,
    and the checksum of every byte of every array (read in batches, so memory stays
    bounded). Raises :class:`CheckpointCorruptedError` naming the file."""
    manifest = _format.read_manifest(storage, path)
    where = storage.join(path, _format.MANIFEST)
    reader = _format.CheckpointReader(storage, path, manifest)
    reader.check_files()
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


def _read_and_drop(reader: _format.CheckpointReader, names: list[str]) -> None:
    reader.prefetch(names)
    for name in names:
        reader.array(name)


# --------------------------------------------------------------------------- diff


def diff(a: str, b: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare two checkpoints leaf by leaf (one leaf's arrays in memory at a time).

    **Returns:** ``{"added": [paths only in b], "removed": [paths only in a],
    "changed": [{"path", "a", "b"}] (shape, dtype or kind differs), "different":
    [{"path", "max_abs", "max_rel"}] (same shape and dtype, other values; relative to
    the larger magnitude of the two), "identical": count}``.

    **Example:** `d = diff("runs/a/checkpoints/state_100", "runs/a/checkpoints/state_200")`
    """
    storage_a, a = open_storage(str(a), storage_options)
    storage_b, b = open_storage(str(b), storage_options)
    sides = []
    for storage, path in ((storage_a, a), (storage_b, b)):
        manifest = _format.read_manifest(storage, path)
        reader = _format.CheckpointReader(storage, path, manifest)
        leaves = {leaf.path: (leaf, node) for leaf, node in _leaves(storage, path, manifest)}
        sides.append((reader, leaves))
    (reader_a, leaves_a), (reader_b, leaves_b) = sides
    out: dict[str, Any] = {
        "added": [p for p in leaves_b if p not in leaves_a],
        "removed": [p for p in leaves_a if p not in leaves_b],
        "changed": [],
        "different": [],
        "identical": 0,
    }
    for path, (leaf_a, node_a) in leaves_a.items():
        if path not in leaves_b:
            continue
        leaf_b, node_b = leaves_b[path]
        if (leaf_a.dtype, leaf_a.shape) != (leaf_b.dtype, leaf_b.shape):
            out["changed"].append({"path": path, "a": _kind(leaf_a), "b": _kind(leaf_b)})
            continue
        if isinstance(node_a, dict) and "array" in node_a:
            x, y = (
                _numeric(reader_a.array(node_a["array"])),
                _numeric(reader_b.array(node_b["array"])),
            )
        else:
            x, y = leaf_a.value, leaf_b.value
        delta = _difference(x, y)
        if delta is None:
            out["identical"] += 1
        else:
            out["different"].append({"path": path, **delta})
    return out


def _kind(leaf: LeafInfo) -> str:
    return f"{leaf.dtype}{list(leaf.shape)}" if leaf.shape or leaf.nbytes else leaf.dtype


def _numeric(value: Any) -> np.ndarray:
    import jax

    if isinstance(value, jax.Array):  # a typed PRNG key: compare its key data
        value = np.asarray(jax.random.key_data(value))
    return np.asarray(value)


def _difference(x: Any, y: Any) -> dict[str, float] | None:
    """Max absolute and relative difference, or None when equal (NaNs equal NaNs)."""
    if not isinstance(x, np.ndarray):
        if x == y or (
            isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
        ):
            return None
        if isinstance(x, (int, float)) and isinstance(y, (int, float)):
            x, y = np.asarray(x), np.asarray(y)
        else:
            return {"max_abs": math.nan, "max_rel": math.nan}
    # Compared in float64 (complex128): exact for every stored dtype but 64-bit ints
    # beyond 2**53, which are compared exactly first.
    if np.array_equal(x, y):
        return None
    wide = np.complex128 if np.asarray(x).dtype.kind == "c" else np.float64
    x, y = np.asarray(x).astype(wide), np.asarray(y).astype(wide)
    both_nan = np.isnan(x) & np.isnan(y)
    if bool(np.all((x == y) | both_nan)):
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        abs_diff = np.where(both_nan, 0, np.abs(x - y))
        scale = np.maximum(np.abs(x), np.abs(y))
        rel = np.where(abs_diff == 0, 0, abs_diff / scale)
    return {"max_abs": float(np.nanmax(abs_diff)), "max_rel": float(np.nanmax(rel))}


# --------------------------------------------------------------------------- prune


def prune(
    run: str,
    keep: int,
    *,
    keep_period: int | None = None,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Apply retention to a run offline: delete the numbered checkpoints beyond the
    newest ``keep`` (multiples of ``keep_period`` are kept and not counted); latest,
    best and other names are never touched.

    **Returns:** the paths deleted (with ``dry_run``: that would be deleted).

    **Example:** `prune("runs/mlp", keep=3, dry_run=True)`
    """
    from ._checkpointer import Checkpointer, retention_victims

    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if keep_period is not None and (
        isinstance(keep_period, bool) or not isinstance(keep_period, int) or keep_period < 1
    ):
        raise ValueError(f"keep_period must be an int >= 1, got {keep_period!r}")
    storage, run = open_storage(str(run), storage_options)
    if path_kind(storage, run) != "run":
        raise FileNotFoundError(f"Not a run (no checkpoints directory): {run}")
    directory = checkpoints_dir(storage, run)
    steps = [
        int(n[len(_PREFIX) :])
        for n in checkpoint_names(storage, directory)
        if n[len(_PREFIX) :].isdigit()
    ]
    victims = [
        storage.join(directory, f"{_PREFIX}{s}")
        for s in retention_victims(steps, keep, keep_period)
    ]
    if dry_run or not victims:
        return victims
    run_dir = storage.dirname(directory)
    ckpt = Checkpointer(
        storage.dirname(run_dir),
        run_dir.rstrip("/").rpartition("/")[2],
        save_every=None,
        checkpoint_every=None,
        storage_options=storage_options,
    )
    for victim in victims:
        ckpt._delete(victim.rpartition("/")[2])
    return [v for v in victims if not storage.isfile(storage.join(v, _format.MANIFEST))]
