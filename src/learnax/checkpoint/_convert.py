"""Checkpoints in from other formats, and out to one safetensors file.

Sources: a legacy ``state_*.pyd`` pickle of the original learnax (read without running
anything from it; unpickled only when the caller allows it), an Orbax checkpoint
directory (``_orbax``: every item of a step), a safetensors file, or a learnax
checkpoint. The state is loaded into host memory and written as a learnax checkpoint,
or its arrays as one safetensors file.

A safetensors export names each array by its tree path, keys joined by "/"; inside a
key, "%" is written "%25" and "/" "%2F", and an empty key "%00", so that converting the
file back nests the names into the same dicts again.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _legacy, _orbax, _tree
from ._dtypes import SAFETENSORS_CODES, dtype_from_name, dtype_name
from ._errors import CheckpointCorruptedError
from ._manifest import MANIFEST
from ._metrics import encode_metrics
from ._read import read_checkpoint
from ._run import checkpoint_key
from ._safetensors import read_into, read_safetensors_header
from ._storage import Storage, open_storage
from ._storage.counted import CountedStorage
from ._write import write_checkpoint, write_tensors_file

logger = logging.getLogger("learnax")

_FROM_CODE = {code: dtype_from_name(name) for name, code in SAFETENSORS_CODES.items()}


def convert(
    src: str,
    dst: str,
    *,
    allow_pickle: bool = False,
    step: int | None = None,
    only: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> str:
    """Convert the checkpoint at ``src`` and write it to ``dst``.

    **Arguments:**

    - `src`: a legacy ``state_*.pyd`` pickle, an Orbax checkpoint directory (an item,
      or a ``CheckpointManager`` step with all its items: several come in as
      ``{item: value}``, the manager's metrics as the checkpoint's), a ``.safetensors``
      file (its tensors nested by the "/" in their names), or a learnax checkpoint
      directory.
    - `dst`: a learnax checkpoint directory (``<registry>/<run>/checkpoints/state_<name>``,
      loadable with ``Checkpointer(registry, run).load_checkpoint(name)``), or a path
      ending in ``.safetensors`` that does not exist yet: the arrays in one file, named by tree path (keys
      joined by "/"; in a key "%" is written "%25", "/" "%2F" and the empty key
      "%00"). Converting such a file back nests its names into the same dicts.
    - `allow_pickle`: for a legacy pickle that cannot be read without running code
      from it: unpickle it anyway (only for files you trust). The original learnax's
      own pickles need no such permission.
    - `step`: the step to store when the source has none (else 0).
    - `only`: a subtree to keep, as keys joined by "/" (e.g. ``"params"``).
    - `storage_options`: options for the fsspec filesystem of URLs.
    - `progress`: called as bytes move, ``progress(stage, nbytes, total)``: `stage` is
      ``"read"`` (the source; an Orbax checkpoint, read by orbax, is not counted) or
      ``"write"``, `nbytes` the bytes just read or written, `total` the stage's
      expected bytes (a guide: a stage may end a little short of it or past it).

    **Returns:** the path written.

    **Example:** `convert("old/state_1000.pyd", "runs/x/checkpoints/state_1000")`
    """
    state, found_step, metrics = load_source(
        src, allow_pickle=allow_pickle, storage_options=storage_options, progress=progress
    )
    if only:
        state = subtree(state, only)
    storage, dst = open_storage(str(dst), storage_options)
    if dst.endswith(".safetensors"):
        arrays = named_arrays(state, prefix=only or "")
        if not arrays:
            raise ValueError(f"{src}: no arrays to export{f' under {only!r}' if only else ''}")
        if storage.kind(dst) is not None:  # never over a file of the user's
            raise FileExistsError(f"{dst} exists already; remove it first")
        if storage.dirname(dst):
            storage.makedirs(storage.dirname(dst))
        total = sum(a.nbytes for a in arrays.values())
        write_safetensors(_counted(storage, progress, "write", total), dst, arrays)
        return dst
    final_step = found_step if found_step is not None else (step or 0)
    if isinstance(final_step, bool) or not isinstance(final_step, int) or final_step < 0:
        raise ValueError(f"{src}: step {final_step!r} is not an int >= 0; pass --step")
    _write_learnax(storage, dst, state, final_step, metrics, progress)
    return dst


def _counted(
    storage: Storage, progress: Callable[[str, int, int], None] | None, stage: str, total: int
) -> Storage:
    """``storage``, reporting the bytes moved to ``progress`` as ``stage`` (if given)."""
    if progress is None:
        return storage
    progress(stage, 0, total)
    return CountedStorage(storage, lambda n: progress(stage, n, total))  # type: ignore[return-value]


def _write_learnax(
    storage: Storage,
    dst: str,
    state: Any,
    step: int,
    metrics: dict[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
) -> None:
    """``state`` as a new learnax checkpoint at ``dst``, a directory named like one."""
    if checkpoint_key(dst.rstrip("/").rpartition("/")[2]) is None:
        raise ValueError(
            f"{dst}: the destination must be a checkpoint directory "
            "<registry>/<run>/checkpoints/state_<name>, or a .safetensors file"
        )
    if storage.isfile(storage.join(dst, MANIFEST)):
        raise FileExistsError(f"{dst} already holds a checkpoint; remove it first")
    tree, leaves = _tree.encode_tree(state)
    storage = _counted(storage, progress, "write", sum(leaf.value.nbytes for leaf in leaves))
    write_checkpoint(
        storage, dst, tree=tree, leaves=leaves, step=step, metrics=encode_metrics(metrics)
    )


def load_source(
    src: str,
    *,
    allow_pickle: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[Any, int | None, dict[str, Any]]:
    """The state, step (None when unknown) and metrics of a checkpoint in any format
    ``convert`` reads; arrays as NumPy. ``progress`` as for :func:`convert`."""
    storage, src = open_storage(str(src), storage_options)
    if progress is not None:
        kind = storage.kind(src)
        size = storage.size(src) if kind == "file" else storage.usage(src)[0] if kind else 0
        storage = _counted(storage, progress, "read", size)
    if src.endswith(_legacy.SUFFIX):
        loaded = _legacy.load_legacy(storage, src, allow_pickle)
        return jax.device_get(loaded["state"]), loaded["step"], loaded["metrics"]
    if src.endswith(".safetensors"):
        return nest_names(read_safetensors(storage, src), src), None, {}
    if storage.isfile(storage.join(src, MANIFEST)):
        return _load_learnax(storage, src)
    if storage.isdir(src):
        if not _orbax.looks_like_orbax(src):
            raise ValueError(
                f"{src} is a directory but neither a learnax checkpoint (no manifest.json) "
                "nor an Orbax one (no _METADATA or _CHECKPOINT_METADATA)"
            )
        if "://" in src:
            raise ValueError(f"{src}: Orbax checkpoints are converted from local paths only")
        return _orbax.load_orbax(os.path.abspath(src))  # orbax wants absolute paths
    raise FileNotFoundError(f"No checkpoint at {src}")


def _load_learnax(storage: Storage, path: str) -> tuple[Any, int, dict[str, Any]]:
    loaded = read_checkpoint(storage, path)
    return loaded["state"], loaded["step"], loaded["metrics"]


def subtree(state: Any, only: str) -> Any:
    """The part of ``state`` at ``only`` (keys joined by "/"): dict keys, attributes
    (a flax TrainState's ``params``) or sequence indices."""
    node = state
    for key in only.strip("/").split("/"):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, (list, tuple)) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif hasattr(node, key) and not isinstance(node, (dict, list)):
            node = getattr(node, key)
        else:
            raise KeyError(f"--only {only!r}: no {key!r} in the checkpoint")
    return node


def named_arrays(state: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """The arrays of a tree by path (keys escaped by :func:`escape_key` and joined by
    "/", under ``prefix``). Python scalars and strings, which safetensors cannot hold,
    are left out (logged); an array of a dtype that safetensors has no code for, or two
    leaves that would get one name (the int key 0 and the str key "0"), raise
    ``ValueError`` naming them."""
    tree, leaves = _tree.encode_tree(state)
    base = [escape_key(k) for k in prefix.strip("/").split("/")] if prefix.strip("/") else []
    out: dict[str, np.ndarray] = {}
    paths: dict[str, str] = {}
    for leaf in leaves:
        _check_exportable(leaf)
        keys = [escape_key(str(_tree.plain_key(k))) for k in leaf.keypath]
        name = "/".join([*base, *keys]) or "_"  # a lone array without prefix: "_"
        if name == "__metadata__":
            raise ValueError(
                f"Leaf at {leaf.path} would be named '__metadata__', which safetensors "
                "reserves; export the other leaves with --only"
            )
        if name in paths:
            raise ValueError(
                f"Leaves at {paths[name]} and {leaf.path} would get the same "
                f"name {name!r} in the safetensors file; export them apart with --only"
            )
        out[name], paths[name] = np.asarray(leaf.value), leaf.path
    _log_left_out(tree)
    return out


def _check_exportable(leaf: _tree.ArrayLeaf) -> None:
    if leaf.kind == "key":
        raise ValueError(f"Leaf at {leaf.path} is a PRNG key: safetensors cannot hold it")
    if dtype_name(leaf.value.dtype) not in SAFETENSORS_CODES:
        raise ValueError(
            f"Leaf at {leaf.path} has dtype {leaf.value.dtype}, which safetensors has no "
            "code for; export the other leaves with --only"
        )


def _log_left_out(tree: _tree.Node) -> None:
    skipped = [
        path for path, node in _tree.leaf_nodes(tree) if node is not None and "array" not in node
    ]
    if skipped:
        logger.warning(
            "Left out of the safetensors file (not arrays): %s",
            ", ".join("/".join(map(str, p)) for p in skipped[:10]),
        )


_ESCAPES = {"%25": "%", "%2F": "/"}


def escape_key(key: str) -> str:
    """One key of a tensor name: "%" as "%25", "/" as "%2F", the empty key as "%00"."""
    return "%00" if key == "" else key.replace("%", "%25").replace("/", "%2F")


def unescape_key(part: str) -> str:
    """The key :func:`escape_key` wrote as ``part``; other "%" sequences stay as they
    are (names written by other tools)."""
    if part == "%00":
        return ""
    return re.sub("%25|%2F", lambda m: _ESCAPES[m.group()], part)


def nest_names(arrays: dict[str, np.ndarray], where: str) -> dict[str, Any]:
    """Tensors named by "/"-joined paths as nested dicts (``{"params/w": x}`` ->
    ``{"params": {"w": x}}``). Names that do not form a tree (``a`` and ``a/b``) are
    kept flat, with a warning."""
    root: dict[str, Any] = {}
    for name, value in arrays.items():
        *parents, last = [unescape_key(p) for p in name.split("/")]
        node = root
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        if not isinstance(node, dict) or last in node:
            logger.warning(
                "%s: the tensor names do not form a tree (%r clashes with another name): "
                "its tensors are kept by their full names",
                where,
                name,
            )
            return dict(arrays)
        node[last] = value
    return root


def write_safetensors(storage: Storage, path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as one safetensors file (durably)."""
    leaves = [_tree.ArrayLeaf(name, (), value, "array") for name, value in arrays.items()]
    write_tensors_file(storage, path, leaves)


def read_safetensors(storage: Storage, path: str) -> dict[str, np.ndarray]:
    """The arrays of a safetensors file, with the same checks learnax makes on its own
    files (header size and JSON, tensors tiling the data section); works on URLs."""
    size = storage.size(path)
    f = storage.open_read(path)
    try:
        data_start, header = read_safetensors_header(f, size, path)
        out = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            code, shape = entry.get("dtype"), entry.get("shape")
            dtype = _FROM_CODE.get(code) if isinstance(code, str) else None
            if dtype is None:
                raise CheckpointCorruptedError(
                    f"{path}: tensor {name!r}: unsupported dtype {code!r:.40}"
                )
            if not (
                isinstance(shape, list)
                and len(shape) <= 64
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            ):
                raise CheckpointCorruptedError(
                    f"{path}: tensor {name!r}: invalid shape {shape!r:.80}"
                )
            begin, end = entry["data_offsets"]  # checked by check_tiling
            if math.prod(shape) * dtype.itemsize != end - begin:  # Python ints: no overflow
                raise CheckpointCorruptedError(f"{path}: tensor {name!r}: size does not match")
            out[name] = np.empty(shape, dtype)
            read_into(f, [out[name].reshape(-1).view(np.uint8)], data_start + begin, path)
        return out
    finally:
        f.close()
