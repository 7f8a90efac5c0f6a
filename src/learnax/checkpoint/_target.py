"""Restoring a checkpoint into the caller's own pytree (``target=``).

The target fixes the types and structure of what comes back: its treedef is reused,
so static fields (a flax ``TrainState``'s ``apply_fn`` and ``tx``, an equinox module's
static fields) come from the target, and each leaf is taken from the checkpoint by
its path. Arrays land where the target's leaves live: a ``jax.Array`` or a
``jax.ShapeDtypeStruct`` with a sharding gives a jax array on that sharding, a numpy
leaf gives numpy. Only the arrays the target needs are read, so a target that is a
part of the saved tree (just ``params``) reads just that part.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np

from . import _tree

try:  # weak-typed scalars (e.g. an injected learning rate) must stay weak to resume exactly
    from jax._src.lax.lax import _convert_element_type as _convert_weak
except ImportError:  # pragma: no cover - private API moved
    _convert_weak = None


def restore_into_target(
    tree: _tree.Node, target: Any, read_nodes: Callable[[list[_tree.Node]], list[Any]]
) -> Any:
    """Build a pytree shaped like ``target`` from the stored ``tree``.

    ``read_nodes`` turns stored nodes into their values, reading their arrays (all in
    one batch, so that the reads run in parallel). Raises ``ValueError`` naming the
    leaf path on any mismatch.
    """
    saved, inner = _tree.index_tree(tree)
    flat, treedef = jtu.tree_flatten_with_path(target)
    wanted = [tuple(_tree.plain_key(k) for k in path) for path, _ in flat]
    prefix = _tree.find_prefix(saved, inner, wanted)
    values = read_nodes([saved[(*prefix, *plain)] for plain in wanted])
    leaves = [
        _as_target_leaf(value, like, _tree.keystr(path))
        for (path, like), value in zip(flat, values, strict=True)
    ]
    return jtu.tree_unflatten(treedef, leaves)


def _as_target_leaf(value: Any, like: Any, where: str) -> Any:
    if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
        return _to_jax(value, like, where)
    if isinstance(like, (np.ndarray, np.generic)):
        arr = _checked_array(value, like.shape, np.dtype(like.dtype), where)
        return arr[()] if isinstance(like, np.generic) else arr
    if isinstance(like, (bool, int, float, complex)):
        if isinstance(value, (np.ndarray, np.generic)) and np.shape(value) == ():
            value = value.item()
        if not isinstance(value, (bool, int, float, complex)):
            raise ValueError(
                f"Leaf at {where}: the target has a {type(like).__name__}, the checkpoint "
                f"has {_describe(value)}"
            )
        return type(like)(value)
    if isinstance(like, str) and not isinstance(value, str):
        raise ValueError(
            f"Leaf at {where}: the target has a str, the checkpoint {_describe(value)}"
        )
    if isinstance(value, (dict, list, tuple)) and not isinstance(like, (dict, list, tuple)):
        raise ValueError(f"Leaf at {where}: the checkpoint has a subtree here, not a leaf")
    return value


def _to_jax(value: Any, like: Any, where: str) -> jax.Array:
    dtype = like.dtype
    is_key = jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    if is_key:
        if not (isinstance(value, jax.Array) and value.dtype == dtype):
            raise ValueError(
                f"Leaf at {where}: the target is a PRNG key of {dtype}, the checkpoint has {_describe(value)}"
            )
        if value.shape != tuple(like.shape):
            raise ValueError(
                f"Leaf at {where}: shape {value.shape} in the checkpoint, {tuple(like.shape)} in the target"
            )
        host = value
    else:
        host = _checked_array(value, tuple(like.shape), np.dtype(dtype), where)
    sharding = getattr(like, "sharding", None)
    if getattr(like, "weak_type", False) and _convert_weak is not None and not is_key:
        host = _convert_weak(host, weak_type=True)
    return jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)


def _checked_array(value: Any, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    if isinstance(value, (bool, int, float, complex)):
        # A Python scalar saved where the target now has a 0-d array (a step counter).
        arr = np.asarray(value)
        if shape != () or not np.can_cast(arr, dtype, casting="same_kind"):
            raise ValueError(
                f"Leaf at {where}: the checkpoint has {value!r}, the target a {dtype}{list(shape)} array"
            )
        return arr.astype(dtype)
    if not isinstance(value, (np.ndarray, np.generic)):
        raise ValueError(
            f"Leaf at {where}: the target has an array, the checkpoint has {_describe(value)}"
        )
    arr = np.asarray(value)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"Leaf at {where}: shape {arr.shape} in the checkpoint, {tuple(shape)} in the target"
        )
    if arr.dtype != dtype:
        raise ValueError(
            f"Leaf at {where}: dtype {arr.dtype} in the checkpoint, {dtype} in the target"
        )
    return arr


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return f"a {value.dtype}{list(np.shape(value))} array"
    return f"a {type(value).__name__}"
