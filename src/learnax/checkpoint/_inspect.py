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
from ._errors import CheckpointCorruptedError
from ._storage import open_storage

_PREFIX = "state_"
# verify reads at most this many bytes of arrays at once.
_VERIFY_BATCH = 256 << 20


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of a stored tree, as the manifest describes it.

    **Arguments** (its fields): `path` (keys joined by "/"), `dtype` (a NumPy dtype
    name, ``key<impl>`` for a PRNG key, or the kind of a Python leaf: ``int``,
    ``float``, ``str``, ``callable``...), `shape`, `nbytes`, `value` (of a Python leaf),
    `keys` (the path as a tuple of keys).

    **Example:** `[(leaf.path, leaf.shape) for leaf in read_info(path).leaves]`
    """

    path: str  # keys joined by "/", e.g. "params/Dense_0/kernel"
    dtype: str  # a NumPy dtype name, "key<impl>" for a PRNG key, or the Python type
    shape: tuple[int, ...]
    nbytes: int
    value: Any = None  # the value of a Python scalar or str leaf
    keys: tuple[Any, ...] = ()  # the path as keys (a str key "1" and an int key 1 differ)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its manifest alone (see :func:`read_info`).

    **Arguments** (its fields): `path`, `step`, `time` (seconds since the epoch),
    `metrics`, `leaves` (a :class:`LeafInfo` per leaf, in tree order), `nbytes` (all
    its files on storage), `best` (for ``state_best``: the metric, value and direction
    that chose it), `files` (its data files with their sizes).

    **Example:** `print(read_info("runs/mlp/checkpoints/state_best").best)`
    """

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
        return LeafInfo(path, "None", (), 0, keys=keys)
    if "array" not in node:
        tag = next(t for t in _tree.SCALAR_TAGS if t in node)
        # A scalar: no array to read. A function was not stored: its name is shown.
        value = node[tag] if tag == "callable" else _tree.decode_tree(node, lambda name: None)
        return LeafInfo(path, tag, (), 0, value, keys)
    dtype, _ = _format.check_array_entry(manifest, node["array"], where)
    entry = manifest["arrays"][node["array"]]
    shape = tuple(entry["shape"])
    nbytes = math.prod(shape) * dtype.itemsize
    if entry.get("kind") == "key":  # stored as its key data: one more axis
        return LeafInfo(path, f"key<{entry['impl']}>", shape[:-1], nbytes, keys=keys)
    return LeafInfo(path, str(dtype), shape, nbytes, keys=keys)


# --------------------------------------------------------------------------- where


def path_kind(storage: Any, path: str) -> str:
    """``"checkpoint"``, ``"run"`` or ``"registry"``: what ``path`` points at.
    Raises ``FileNotFoundError`` when nothing is there."""
    parent, _, name = path.rstrip("/").rpartition("/")
    if storage.isfile(storage.join(path, _format.MANIFEST)):
        return "checkpoint"
    if not storage.isdir(path):
        if storage.isfile(path):
            raise FileNotFoundError(f"{path} is a file, not a checkpoint, run or registry")
        raise FileNotFoundError(f"No such checkpoint, run or registry: {path}")
    # A run may well be called "state_space": its checkpoints directory decides.
    if name == "checkpoints" or storage.isdir(storage.join(path, "checkpoints")):
        return "run"
    if name.startswith(_PREFIX) and parent.rpartition("/")[2] == "checkpoints":
        return "checkpoint"  # one without a manifest: reading it says so
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
        problem = _verify_live(storage, checkpoint)
        if problem == "gone":  # deleted by retention while we looked: nothing to check
            continue
        if problem is not None:
            damaged.append((checkpoint, problem))
        if report is not None:
            report(checkpoint, problem)
    return damaged


def _verify_live(storage: Any, path: str) -> str | None:
    """The problem with a checkpoint, ``None`` when intact, ``"gone"`` when it was
    deleted meanwhile. A run still training may replace a checkpoint while it is read
    (its old files are removed after the new manifest): then it is read again."""
    try:
        _format.read_consistent(storage, path, lambda m: verify_checkpoint(storage, path, m))
    except FileNotFoundError:
        return "gone" if not storage.isdir(path) else "no manifest.json: not committed"
    except CheckpointCorruptedError as e:
        return str(e)
    return None


def verify_checkpoint(storage: Any, path: str, manifest: dict[str, Any] | None = None) -> None:
    """Check one checkpoint completely: its manifest, every data file's size and header,
    and the checksum of every byte of every array (read in batches, so memory stays
    bounded). Raises :class:`CheckpointCorruptedError` naming the file."""
    if manifest is None:
        manifest = _format.read_manifest(storage, path)
    where = storage.join(path, _format.MANIFEST)
    reader = _format.CheckpointReader(storage, path, manifest, keys_as_data=True)
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

    **Arguments:**

    - `a`, `b`: the two checkpoint directories (local paths or URLs).
    - `storage_options`: options for the fsspec filesystem of URLs.

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
        reader = _format.CheckpointReader(storage, path, manifest, keys_as_data=True)
        leaves = {leaf.keys: (leaf, node) for leaf, node in _leaves(storage, path, manifest)}
        sides.append((reader, leaves))
    (reader_a, leaves_a), (reader_b, leaves_b) = sides
    out: dict[str, Any] = {
        "added": [leaf.path for k, (leaf, _) in leaves_b.items() if k not in leaves_a],
        "removed": [leaf.path for k, (leaf, _) in leaves_a.items() if k not in leaves_b],
        "changed": [],
        "different": [],
        "identical": 0,
    }
    for keys, (leaf_a, node_a) in leaves_a.items():
        if keys not in leaves_b:
            continue
        path = leaf_a.path
        leaf_b, node_b = leaves_b[keys]
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
    return np.asarray(value)  # PRNG keys are read as their key data (keys_as_data)


def _difference(x: Any, y: Any) -> dict[str, float] | None:
    """Max absolute and relative difference (relative to the larger magnitude of the
    two), or None when equal; NaN equals NaN, a NaN against a number differs by inf."""
    if isinstance(x, str) or isinstance(y, str):
        return None if x == y else {"max_abs": math.nan, "max_rel": math.nan}
    if type(x) is int and type(y) is int:  # Python ints of any size, exactly
        if x == y:
            return None
        return {"max_abs": float(abs(x - y)), "max_rel": abs(x - y) / max(abs(x), abs(y))}
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind in "biu" and y.dtype.kind in "biu":
        # Exactly, in Python ints: float64 would merge 2**53 and 2**53 + 1.
        if np.array_equal(x, y):
            return None
        a, b = x.astype(object).ravel(), y.astype(object).ravel()
        diffs = [abs(int(p) - int(q)) for p, q in zip(a, b, strict=True)]
        scales = [max(abs(int(p)), abs(int(q))) for p, q in zip(a, b, strict=True)]
        return {
            "max_abs": float(max(diffs)),
            "max_rel": max((d / s if d else 0.0) for d, s in zip(diffs, scales, strict=True)),
        }
    wide = np.complex128 if "c" in (x.dtype.kind, y.dtype.kind) else np.float64
    x, y = x.astype(wide), y.astype(wide)
    nan_x, nan_y = np.isnan(x), np.isnan(y)
    same = (x == y) | (nan_x & nan_y)
    if bool(np.all(same)):
        return None
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        abs_diff = np.where(same, 0.0, np.abs(x - y))
        abs_diff = np.where(~same & (nan_x | nan_y), np.inf, abs_diff)  # NaN vs a number
        abs_diff = np.where(np.isnan(abs_diff), np.inf, abs_diff)  # inf vs -inf
        scale = np.maximum(np.abs(x), np.abs(y))
        rel = np.where(same, 0.0, np.minimum(abs_diff / scale, 2.0))
        rel = np.where(~same & (np.isinf(scale) | np.isnan(rel)), 1.0, rel)
    return {"max_abs": float(abs_diff.max()), "max_rel": float(rel.max())}


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
    best and other names are never touched. Each deletion takes the run's lock, as a
    training run's retention does.

    **Arguments:**

    - `run`: the run, ``<registry>/<run_id>`` (a local path or a URL).
    - `keep`: how many numbered checkpoints to keep (>= 1).
    - `keep_period`: also keep, without counting them, steps that are multiples of it.
    - `dry_run`: only say what would be deleted.
    - `storage_options`: options for the fsspec filesystem of a URL.

    **Returns:** the paths deleted (with ``dry_run``: that would be deleted). Raises
    ``OSError`` naming those that could not be deleted.

    **Example:** `prune("runs/mlp", keep=3, dry_run=True)`
    """
    from ._policy import retention_victims
    from ._run import RunDirectory, checkpoint_name

    for name, value, low in (("keep", keep, 1), ("keep_period", keep_period, 1)):
        if value is None and name == "keep_period":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    storage, run = open_storage(str(run), storage_options)
    if path_kind(storage, run) != "run":
        raise FileNotFoundError(f"Not a run (no checkpoints directory): {run}")
    directory = RunDirectory(storage, checkpoints_dir(storage, run))
    names = [checkpoint_name(s) for s in retention_victims(directory.numbered_steps(), keep, keep_period)]
    if dry_run:
        return [directory.join(n) for n in names]
    failed = [n for n in names if not directory.delete(n)]
    if failed:
        raise OSError(f"could not delete {', '.join(directory.join(n) for n in failed)}")
    return [directory.join(n) for n in names]
