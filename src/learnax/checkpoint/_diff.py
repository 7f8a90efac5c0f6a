"""Comparing two stored checkpoints leaf by leaf: which leaves were added, removed or
changed kind, and by how much the values of the others differ."""

from __future__ import annotations

import contextlib
import math
from typing import Any

from ._inspect import LeafInfo, leaves_of
from ._lazy_import import LazyModule
from ._manifest import read_manifest
from ._read import CheckpointReader
from ._storage import open_storage

# Imported on first use (see _lazy_import): listing and showing need none of them.
np = LazyModule("numpy", globals(), "np")


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
    with contextlib.ExitStack() as stack:
        sides = []
        for storage, path in ((storage_a, a), (storage_b, b)):
            manifest = read_manifest(storage, path)
            reader = stack.enter_context(
                CheckpointReader(storage, path, manifest, keys_as_data=True)
            )
            reader.open_files()  # pinned: a live run replacing it cannot pull them away
            leaves = {leaf.keys: (leaf, node) for leaf, node in leaves_of(storage, path, manifest)}
            sides.append((reader, leaves))
        return _compare(*sides[0], *sides[1])


def _compare(
    reader_a: CheckpointReader,
    leaves_a: dict[Any, Any],
    reader_b: CheckpointReader,
    leaves_b: dict[Any, Any],
) -> dict[str, Any]:
    """The differences of two checkpoints, leaf by leaf (see :func:`diff`)."""
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
