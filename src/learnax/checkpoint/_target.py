"""Restoring a checkpoint into the caller's own pytree (``target=``).

The target fixes the types and structure of what comes back: its treedef is reused,
so static fields (a flax ``TrainState``'s ``apply_fn`` and ``tx``, an equinox module's
static fields) come from the target, and each leaf is taken from the checkpoint by
its path. Arrays land where the target's leaves live: a ``jax.Array`` or a
``jax.ShapeDtypeStruct`` with a sharding gives a jax array on that sharding, a numpy
leaf gives numpy. Only the arrays the target needs are read, so a target that is a
part of the saved tree (just ``params``) reads just that part.

A dtype that differs from the target's raises, unless the caller allowed a cast
(``allow_cast=True``): then a numeric array is cast to the target's dtype on the host,
before it goes to a device, as numpy's ``astype`` does it (ml_dtypes' for bfloat16 and
float8), within the casts :func:`cast_allowed` admits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

from . import _tree
from ._lazy_import import LazyModule

# Imported on first use (see _lazy_import): listing and showing need none of them.
jax = LazyModule("jax", globals())
jtu = LazyModule("jax.tree_util", globals(), "jtu")
np = LazyModule("numpy", globals(), "np")
ml_dtypes = LazyModule("ml_dtypes", globals())


@functools.cache
def _weak_converter() -> Callable[..., Any] | None:
    """jax's converter that keeps a weak-typed scalar (e.g. an injected learning rate)
    weak, so that a resume is exact; ``None`` if that private API moved."""
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # pragma: no cover - private API moved
        return None
    return _convert_element_type


def restore_into_target(
    tree: _tree.Node,
    target: Any,
    read_nodes: Callable[[list[_tree.Node]], list[Any]],
    reader: RegionReader,
    *,
    allow_cast: bool = False,
) -> Any:
    """Build a pytree shaped like ``target`` from the stored ``tree``.

    ``read_nodes`` turns stored nodes into their values, reading their arrays (all in
    one batch, so that the reads run in parallel). A leaf whose sharding spans several
    processes is read piece by piece through ``reader``: each process reads only the
    parts its own devices hold. Raises ``ValueError`` naming the leaf path on any
    mismatch, of dtype too unless ``allow_cast`` and :func:`cast_allowed` admit it.
    """
    saved, inner = _tree.index_tree(tree)
    flat, treedef = jtu.tree_flatten_with_path(target)
    wanted = [tuple(_tree.plain_key(k) for k in path) for path, _ in flat]
    prefix = _tree.find_prefix(saved, inner, wanted)
    nodes = [saved[(*prefix, *plain)] for plain in wanted]
    leaves: list[Any] = [None] * len(flat)
    whole = []
    for i, ((path, like), node) in enumerate(zip(flat, nodes, strict=True)):
        name = _spanning_array(node, like, reader)
        if name is None:
            whole.append(i)
        else:
            leaves[i] = _read_spanning(reader, name, like, _tree.keystr(path), allow_cast)
    values = read_nodes([nodes[i] for i in whole])
    to_device: list[tuple[int, Any, Any]] = []  # (leaf index, host array, sharding)
    for i, value in zip(whole, values, strict=True):
        path, like = flat[i]
        if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
            host = _host_for(value, like, _tree.keystr(path), allow_cast)
            to_device.append((i, host, getattr(like, "sharding", None)))
        else:
            leaves[i] = _as_target_leaf(value, like, _tree.keystr(path), allow_cast)
    for i, array in _device_put_all(to_device):
        leaves[i] = array
    return jtu.tree_unflatten(treedef, leaves)


def _device_put_all(pending: list[tuple[int, Any, Any]]) -> list[tuple[int, jax.Array]]:
    """Each host array on its sharding (or the default device), in one ``device_put``
    per kind: called leaf by leaf it costs ~60 us of dispatch each (4,000 leaves of a
    transformer and its Adam state: 240 ms of a 350 ms load, measured here)."""
    placed = [(i, host, s) for i, host, s in pending if s is not None]
    default = [(i, host) for i, host, s in pending if s is None]
    out: list[tuple[int, jax.Array]] = []
    if placed:
        arrays = jax.device_put([h for _, h, _ in placed], [s for _, _, s in placed])
        out += [(i, a) for (i, _, _), a in zip(placed, arrays, strict=True)]
    if default:
        arrays = jax.device_put([h for _, h in default])
        out += [(i, a) for (i, _), a in zip(default, arrays, strict=True)]
    return out


class RegionReader(Protocol):
    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...], str]: ...

    def read_region(self, name: str, region: tuple[slice, ...]) -> np.ndarray: ...


def _spanning_array(node: Any, like: Any, reader: RegionReader) -> str | None:
    """The stored array's name when ``like`` asks for a jax array sharded over several
    processes and the checkpoint has a plain array there; otherwise None."""
    sharding = getattr(like, "sharding", None)
    if not (
        isinstance(like, (jax.Array, jax.ShapeDtypeStruct))
        and isinstance(sharding, jax.sharding.Sharding)
        and not sharding.is_fully_addressable
        and isinstance(node, dict)
        and isinstance(node.get("array"), str)
    ):
        return None
    name = node["array"]
    return name if reader.info(name)[2] == "array" else None


def _read_spanning(
    reader: RegionReader, name: str, like: Any, where: str, allow_cast: bool
) -> jax.Array:
    dtype, shape, _ = reader.info(name)
    if shape != tuple(like.shape):
        raise ValueError(
            f"Leaf at {where}: shape {shape} in the checkpoint, {tuple(like.shape)} in the target"
        )
    wanted = np.dtype(like.dtype)
    if dtype != wanted:
        _check_cast(dtype, wanted, where, allow_cast)
    pieces: dict[Any, np.ndarray] = {}

    def piece(index: tuple[slice, ...]) -> np.ndarray:
        # Devices holding the same part (replicas) share one read.
        key = tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))
        if key not in pieces:
            pieces[key] = _cast(reader.read_region(name, index), wanted, where)
        return pieces[key]

    return jax.make_array_from_callback(shape, like.sharding, piece)


def _as_target_leaf(value: Any, like: Any, where: str, allow_cast: bool) -> Any:
    if isinstance(like, (jax.Array, jax.ShapeDtypeStruct)):
        return _to_jax(value, like, where, allow_cast)
    if isinstance(like, (np.ndarray, np.generic)):
        arr = _checked_array(value, like.shape, np.dtype(like.dtype), where, allow_cast)
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
    if value is None and callable(like) and not isinstance(like, type):
        return like  # a function is not stored (its placeholder reads as None): the target's
    return value


def _to_jax(value: Any, like: Any, where: str, allow_cast: bool) -> jax.Array:
    sharding = getattr(like, "sharding", None)
    host = _host_for(value, like, where, allow_cast)
    return jax.device_put(host, sharding) if sharding is not None else jax.device_put(host)


def _host_for(value: Any, like: Any, where: str, allow_cast: bool) -> Any:
    """What goes to the device for target leaf ``like``: the checked host array (cast
    to its dtype where allowed; a weak-typed one where the target's is weak), or the
    key array of a typed key (never cast)."""
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
        host = _checked_array(value, tuple(like.shape), np.dtype(dtype), where, allow_cast)
    convert_weak = _weak_converter() if getattr(like, "weak_type", False) else None
    if convert_weak is not None and not is_key:
        host = convert_weak(host, weak_type=True)
    return host


def _checked_array(
    value: Any, shape: tuple[int, ...], dtype: np.dtype, where: str, allow_cast: bool = False
) -> np.ndarray:
    if isinstance(value, (bool, int, float, complex)) and not isinstance(value, np.generic):
        # A Python scalar saved where the target now has a 0-d array (a step counter).
        # (A NumPy scalar has a dtype of its own: it is checked as an array, below.)
        if shape != ():
            raise ValueError(
                f"Leaf at {where}: the checkpoint has {value!r}, the target a {dtype}{list(shape)} array"
            )
        return _python_scalar_as(value, dtype, where, allow_cast)
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
        _check_cast(arr.dtype, dtype, where, allow_cast)
        return _cast(arr, dtype, where)
    return arr


def _python_scalar_as(value: Any, dtype: np.dtype, where: str, allow_cast: bool) -> np.ndarray:
    """Python scalar ``value`` as a 0-d array of ``dtype``. A Python scalar has no width
    of its own, and jax gives it the dtype of what it meets (a weak type): so it
    restores, without ``allow_cast``, into any dtype of a kind that holds it (as before
    and as ``jnp.asarray(value, dtype)``: a ``bool`` into numbers, an ``int`` into
    floats, a ``float`` rounded into a narrower float). Never into another number: an
    ``int`` that does not fit an integer ``dtype`` raises with or without
    ``allow_cast`` (as an array's does), and a finite value that would become ``inf``
    needs ``allow_cast``. Other kinds (a ``float`` into an integer, a ``complex`` into
    a real) follow the table for arrays."""
    kinds = ((bool, np.bool_), (int, np.int64), (float, np.float64), (complex, np.complex128))
    source = np.dtype(next(d for t, d in kinds if isinstance(value, t)))
    int_into_int = source == np.int64 and jax.dtypes.issubdtype(dtype, np.integer)
    if not int_into_int and not np.can_cast(source, dtype, casting="same_kind"):
        _check_cast(source, dtype, where, allow_cast)  # raises unless allowed
    if int_into_int:  # signed or not, any width: the value decides
        info = ml_dtypes.iinfo(dtype)  # numpy's knows no int4/uint4/int2/uint2
        if not info.min <= value <= info.max:
            raise ValueError(
                f"Leaf at {where}: the value {value} in the checkpoint does not fit the "
                f"target's {dtype}"
            )
        return np.asarray(value, dtype)
    with np.errstate(over="ignore"):  # too large for the target: inf, as astype gives
        try:
            arr = np.asarray(value, dtype)
        except OverflowError:  # an int beyond any float
            arr = np.asarray(np.inf if value > 0 else -np.inf, dtype)
    finite = not isinstance(value, (float, complex)) or np.isfinite(value)
    if finite and dtype != np.bool_ and not np.all(np.isfinite(arr)) and not allow_cast:
        raise ValueError(
            f"Leaf at {where}: the value {value!r} in the checkpoint overflows the "
            f"target's {dtype} (pass allow_cast=True to cast it: inf, or NaN in a type without inf)"
        )
    return arr


def cast_allowed(source: np.dtype, dest: np.dtype) -> bool:
    """Whether ``allow_cast=True`` may restore an array of dtype ``source`` into a
    target leaf of dtype ``dest``: numbers to a kind that holds them, integer to
    integer, integer to floating, floating to floating (bfloat16 and float8 included),
    any of these to complex. Never ``bool`` either way (a mask is not a number), never
    floating or complex to integer or complex to real (that drops a part of every
    value), never a PRNG key (its bits are not a number)."""
    rank = {kind: i for i, kind in enumerate(_NUMERIC_KINDS)}
    a, b = _numeric_kind(source), _numeric_kind(dest)
    return a is not None and b is not None and rank[a] <= rank[b]


_NUMERIC_KINDS = ("integer", "floating", "complexfloating")


def _numeric_kind(dtype: np.dtype) -> str | None:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == np.bool_:
        return None
    return next((k for k in _NUMERIC_KINDS if jax.dtypes.issubdtype(dtype, getattr(np, k))), None)


def _check_cast(source: np.dtype, dest: np.dtype, where: str, allow_cast: bool) -> None:
    """Raise ``ValueError`` naming the leaf unless a cast from ``source`` to ``dest``
    was asked for and is one :func:`cast_allowed` admits."""
    if not allow_cast:
        raise ValueError(
            f"Leaf at {where}: dtype {source} in the checkpoint, {dest} in the target "
            "(pass allow_cast=True to cast it)"
        )
    if not cast_allowed(source, dest):
        raise ValueError(
            f"Leaf at {where}: dtype {source} in the checkpoint, {dest} in the target: "
            "allow_cast casts numbers between integer, floating and complex types toward "
            "the wider kind only, never bool or PRNG keys"
        )


def _cast(arr: np.ndarray, dtype: np.dtype, where: str) -> np.ndarray:
    """``arr`` as ``dtype``; an integer too large for a narrower integer dtype raises
    rather than wrapping around."""
    if arr.dtype == dtype:
        return arr
    if jax.dtypes.issubdtype(dtype, np.integer) and arr.size:
        info = ml_dtypes.iinfo(dtype)  # numpy's knows no int4/uint4/int2/uint2
        low, high = arr.min(), arr.max()
        if low < info.min or high > info.max:
            raise ValueError(
                f"Leaf at {where}: values from {low} to {high} in the checkpoint do not "
                f"fit the target's {dtype}"
            )
    return arr.astype(dtype)


def _describe(value: Any) -> str:
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        return f"a {value.dtype}{list(np.shape(value))} array"
    return f"a {type(value).__name__}"
