"""Pytrees to and from a JSON structure plus named array leaves.

A train state is split into two parts: a JSON description of its structure (dicts with
their key types, lists, tuples, NamedTuples, Python scalars, and the names of its
arrays) and the arrays themselves, which the format module stores in safetensors
files. Rebuilding the tree never imports a module or calls anything but the
constructor of a NamedTuple class that the loading process has already imported; every
other pytree node (flax struct dataclasses, equinox modules) comes back as a plain dict
or list of its children, unless the caller gives a ``target`` to restore into.
"""

from __future__ import annotations

import collections
import inspect
import keyword
import logging
import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._dtypes import PRNG_IMPLS, is_supported_dtype, prng_impl_name
from ._lazy_import import LazyModule

# Imported on first use (see _lazy_import): listing and showing need none of them.
jax = LazyModule("jax", globals())
jtu = LazyModule("jax.tree_util", globals(), "jtu")
np = LazyModule("numpy", globals(), "np")

logger = logging.getLogger("learnax")

# Deeper trees than this are refused on save and treated as corrupted on load: it
# keeps both directions far from Python's recursion limit.
MAX_DEPTH = 200

# Python refuses to print ints of more than 4,300 digits (sys.int_info); stay below.
_MAX_INT = 10**4000

KeyPath = tuple[Any, ...]
Node = Any  # JSON value describing a subtree


class MalformedTreeError(ValueError):
    """A stored tree structure that is not well formed (the caller turns it into
    ``CheckpointCorruptedError`` naming the file)."""


@dataclass
class ArrayLeaf:
    """One array of the tree: its tensor name in the data file and its value."""

    name: str
    keypath: KeyPath  # the jax key path, for messages
    value: Any  # numpy array, numpy scalar or jax.Array (for a PRNG key: its key data)
    kind: str  # "array", "scalar" (a numpy scalar) or "key" (a typed PRNG key array)
    impl: str | None = None  # PRNG implementation name for kind == "key"

    @property
    def path(self) -> str:
        """The readable tree path, e.g. ``['params']['w']``."""
        return keystr(self.keypath)


def keystr(path: KeyPath) -> str:
    """A tree path as jax prints it, e.g. ``['params']['w']`` or ``.opt_state[0]``."""
    return jtu.keystr(tuple(path)) if path else "<root>"


def plain_key(key: Any) -> Any:
    """The str or int a jax path key stands for, whatever its kind (dict key,
    attribute, sequence index), so that a dict target can match a NamedTuple."""
    if isinstance(key, jtu.DictKey):
        return key.key
    if isinstance(key, jtu.GetAttrKey):
        return key.name
    if isinstance(key, jtu.SequenceKey):
        return key.idx
    if isinstance(key, jtu.FlattenedIndexKey):
        return key.key
    return str(key)


# --------------------------------------------------------------------------- encode


def encode_tree(state: Any) -> tuple[Node, list[ArrayLeaf]]:
    """Split ``state`` into a JSON structure and its array leaves.

    Raises ``TypeError`` naming the leaf path for anything that cannot be stored
    safely (arbitrary objects, object arrays, functions).
    """
    leaves: list[ArrayLeaf] = []
    used_names: set[str] = set()
    node = _encode(state, (), "", leaves, used_names)
    return node, leaves


def _encode(x: Any, path: KeyPath, name: str, leaves: list[ArrayLeaf], used: set[str]) -> Node:
    # `name` is the tensor name of this subtree: its path keys joined with "/".
    if len(path) > MAX_DEPTH:
        raise ValueError(f"Train state is nested deeper than {MAX_DEPTH} levels at {keystr(path)}")
    if x is None:
        return None
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):  # np.float64 is a float too
        return {"array": _add_leaf(x, path, name, leaves, used)}
    if isinstance(x, (bool, int, float, complex, str)):
        return _encode_scalar(x, path)
    node = _encode_container(x, path, name, leaves, used)
    if node is not None:
        return node
    if callable(x) and not isinstance(x, type):
        # Functions cannot be stored safely (that would mean pickling code): recorded by
        # name only, and taken from the target on load, as equinox's own serialisation
        # does.
        name = getattr(x, "__qualname__", None) or getattr(x, "__name__", None) or type(x).__name__
        return {"callable": f"{getattr(x, '__module__', None) or ''}.{name}".lstrip(".")}
    raise TypeError(
        f"Leaf at {keystr(path)} has type {type(x).__module__}.{type(x).__qualname__}, "
        "which learnax cannot save. Supported leaves: numpy and jax arrays, numpy scalars, "
        "typed PRNG keys, int, float, bool, complex, str and None (and functions, which "
        "are not stored: a load takes them from its target), inside dicts, lists, tuples, "
        "NamedTuples and registered pytree nodes. Convert it, or drop it in prepare_fn."
    )


def _encode_scalar(x: bool | int | float | complex | str, path: KeyPath) -> Node:
    if isinstance(x, bool):
        return {"bool": x}
    if isinstance(x, int):
        if not -_MAX_INT < x < _MAX_INT:
            raise ValueError(
                f"Int at {keystr(path)} has more than 4,000 digits: too large for the JSON "
                "structure of a checkpoint. Store it as a str or an array."
            )
        return {"int": int(x)}
    if isinstance(x, float):
        return {"float": encode_float(x)}
    if isinstance(x, complex):
        return {"complex": [encode_float(x.real), encode_float(x.imag)]}
    return {"str": x}


def _encode_container(
    x: Any, path: KeyPath, name: str, leaves: list[ArrayLeaf], used: set[str]
) -> Node | None:
    """The node of a dict, NamedTuple, list, tuple or registered pytree node; ``None``
    when ``x`` is none of these."""
    if isinstance(x, dict):
        items = []
        for k, v in x.items():
            if not isinstance(k, (str, int)):
                raise TypeError(
                    f"Dict key {k!r} of type {type(k).__name__} at {keystr(path)} cannot be "
                    "saved: learnax stores dict keys that are str or int."
                )
            items.append([k, _encode(v, (*path, jtu.DictKey(k)), _child(name, k), leaves, used)])
        return {"dict": items}
    if isinstance(x, tuple) and _is_namedtuple_class(type(x)):
        cls = type(x)
        return {
            "namedtuple": [
                _encode(v, (*path, jtu.GetAttrKey(f)), _child(name, f), leaves, used)
                for f, v in zip(cls._fields, x, strict=True)
            ],
            "module": cls.__module__,
            "class": cls.__qualname__,
            "fields": list(cls._fields),
        }
    if isinstance(x, (list, tuple)):
        kind = "list" if isinstance(x, list) else "tuple"
        return {
            kind: [
                _encode(v, (*path, jtu.SequenceKey(i)), _child(name, i), leaves, used)
                for i, v in enumerate(x)
            ]
        }
    children = _node_children(x)
    if children is not None:
        items = []
        for key, child in children:
            k = plain_key(key)
            items.append([k, _encode(child, (*path, key), _child(name, k), leaves, used)])
        cls = type(x)
        return {"node": items, "type": f"{cls.__module__}.{cls.__qualname__}"}
    return None


def _node_children(x: Any) -> list[tuple[Any, Any]] | None:
    """The children of a registered pytree node, each with its jax path key; ``None``
    when ``x`` is not one."""
    flatten = getattr(jtu.default_registry, "flatten_one_level_with_keys", None)
    if flatten is None:  # jax before 0.4.31
        return node_children_by_path(x)
    flat = flatten(x)
    return None if flat is None else list(flat[0])


def node_children_by_path(x: Any) -> list[tuple[Any, Any]] | None:
    """``_node_children`` for jax without ``flatten_one_level_with_keys``: one level of
    ``tree_flatten_with_path``, with every child taken as a leaf."""
    flat, _ = jtu.tree_flatten_with_path(x, is_leaf=lambda child: child is not x)
    if len(flat) == 1 and flat[0][0] == () and flat[0][1] is x:
        return None  # a leaf, not a node
    return [(keys[0], child) for keys, child in flat]


def _add_leaf(x: Any, path: KeyPath, name: str, leaves: list[ArrayLeaf], used: set[str]) -> str:
    kind, impl = "array", None
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        # Stored as its key data (uint32); the implementation name rebuilds the key.
        kind, impl = "key", _prng_impl_of(x, path)
        x = jax.random.key_data(x)
    elif isinstance(x, np.generic):
        kind = "scalar"
    if kind != "key" and not is_supported_dtype(x.dtype):
        raise TypeError(
            f"Array at {keystr(path)} has dtype {x.dtype}, which learnax cannot save safely "
            "(numeric, bool and ml_dtypes arrays only)."
        )
    name = _unique_name(name, used)
    leaves.append(ArrayLeaf(name, path, x, kind, impl))
    return name


def _prng_impl_of(key: jax.Array, path: KeyPath) -> str:
    """The stored name of a typed key array's implementation ("threefry2x32", never the
    "fry" older jax prints); ``TypeError`` for one that is not built into jax, which a
    load could not rebuild."""
    printed = str(jax.random.key_impl(key))
    name = prng_impl_name(printed)
    if name is None:
        raise TypeError(
            f"PRNG key at {keystr(path)} has implementation {printed!r}, not one of jax's "
            f"built-in ones ({', '.join(PRNG_IMPLS)}): learnax could not rebuild it on "
            "load. Save jax.random.key_data(key) instead."
        )
    return name


def _child(name: str, key: Any) -> str:
    # Readable tensor names, the ones a safetensors user sees: "params/Dense_0/kernel".
    return f"{name}/{_name_part(key)}" if name else _name_part(key)


def _name_part(key: Any) -> str:
    """A key as part of a tensor name, always valid UTF-8: a lone surrogate (a key from
    ``os.fsdecode`` of a non-UTF-8 file name) is written as its escape ``\\udcff``, or
    the safetensors library refuses the whole file. Names only need to be unique (the
    tree stores the exact key and the name of each array), so this loses nothing."""
    text = str(key)
    if text.isascii():  # the usual case, without an encode
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _unique_name(base: str, used: set[str]) -> str:
    base = base or "_"
    name, n = base, 1
    while name in used or name == "__metadata__":
        n += 1
        name = f"{base}~{n}"
    used.add(name)
    return name


def encode_float(x: float) -> float | str:
    """JSON has no NaN or infinity; those are stored as strings."""
    if math.isfinite(x):
        return x
    return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def decode_float(x: Any, where: str) -> float:
    if isinstance(x, bool):
        raise ValueError(f"{where}: expected a number, got {x!r}")
    if isinstance(x, (int, float)):
        return float(x)
    if x in ("NaN", "Infinity", "-Infinity"):
        return float(x.replace("Infinity", "inf"))
    raise ValueError(f"{where}: expected a number, got {x!r}")


def _is_namedtuple_class(cls: type) -> bool:
    fields = inspect.getattr_static(cls, "_fields", None)
    return isinstance(fields, tuple) and all(isinstance(f, str) for f in fields)


# --------------------------------------------------------------------------- decode

ArrayGetter = Callable[[str], Any]
# Leaves stored in the tree itself. "callable" is a placeholder: a function in the tree
# (an equinox module's activation) is not stored; a load takes it from the target.
SCALAR_TAGS = ("bool", "int", "float", "complex", "str", "callable")
_SCALAR_TAGS = SCALAR_TAGS


def decode_tree(node: Node, get_array: ArrayGetter) -> Any:
    """Rebuild the saved tree from its JSON structure; arrays come from ``get_array``.

    Raises ``ValueError`` for a malformed structure (the format module turns that into
    ``CheckpointCorruptedError`` naming the file).
    """
    return _decode(node, get_array, ())


def _decode(node: Node, get_array: ArrayGetter, path: KeyPath) -> Any:
    if len(path) > MAX_DEPTH:
        raise MalformedTreeError(f"tree nested deeper than {MAX_DEPTH} levels at {keystr(path)}")
    if node is None:
        return None
    tag = _tag(node, path)
    value = node[tag]
    if tag in _SCALAR_TAGS:
        return _decode_scalar(tag, value, path)
    if tag == "array":
        return get_array(_expect(value, str, path))
    if tag in ("list", "tuple"):
        children = [
            _decode(c, get_array, (*path, jtu.SequenceKey(i)))
            for i, c in enumerate(_expect(value, list, path))
        ]
        return children if tag == "list" else tuple(children)
    if tag == "namedtuple":
        cls = _namedtuple_class(node, path)
        children = [
            _decode(c, get_array, (*path, jtu.GetAttrKey(f)))
            for f, c in zip(cls._fields, _expect(value, list, path), strict=False)
        ]
        if len(children) != len(cls._fields) or len(value) != len(cls._fields):
            raise MalformedTreeError(f"NamedTuple at {keystr(path)} has the wrong number of fields")
        return cls(*children)
    # "dict" or "node": pairs of key and child
    items = _pairs(value, path)
    result = {k: _decode(c, get_array, (*path, jtu.DictKey(k))) for k, c in items}
    if tag == "node" and result and all(isinstance(k, int) for k in result):
        if sorted(result) == list(range(len(result))):
            return [result[i] for i in range(len(result))]
    return result


def array_names(node: Node) -> list[str]:
    """The names of the arrays in a stored subtree, in tree order."""
    return [n["array"] for _, n in leaf_nodes(node) if n is not None and "array" in n]


def _tag(node: Node, path: KeyPath) -> str:
    if not isinstance(node, dict):
        raise MalformedTreeError(f"malformed tree node at {keystr(path)}: {type(node).__name__}")
    for tag in ("array", "dict", "list", "tuple", "namedtuple", "node", *_SCALAR_TAGS):
        if tag in node:
            return tag
    raise MalformedTreeError(f"unknown tree node at {keystr(path)}: keys {sorted(node)[:5]}")


def _expect(value: Any, kind: type, path: KeyPath) -> Any:
    if not isinstance(value, kind):
        raise MalformedTreeError(f"malformed tree node at {keystr(path)}")
    return value


def _pairs(value: Any, path: KeyPath) -> list[tuple[Any, Node]]:
    pairs = []
    seen = set()
    for item in _expect(value, list, path):
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))):
            raise MalformedTreeError(f"malformed dict entry at {keystr(path)}")
        key = item[0]
        if key in seen:
            raise MalformedTreeError(f"duplicate dict key {key!r} at {keystr(path)}")
        seen.add(key)
        pairs.append((key, item[1]))
    return pairs


def _decode_scalar(tag: str, value: Any, path: KeyPath) -> Any:
    where = f"value at {keystr(path)}"
    if tag == "bool":
        return _expect(value, bool, path)
    if tag == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise MalformedTreeError(f"{where}: expected an int")
        return value
    try:
        if tag == "float":
            return decode_float(value, where)
        if tag == "complex":
            if not (isinstance(value, list) and len(value) == 2):
                raise ValueError(f"{where}: expected [real, imag]")
            return complex(decode_float(value[0], where), decode_float(value[1], where))
    except ValueError as e:
        raise MalformedTreeError(str(e)) from None
    if tag == "callable":
        _expect(value, str, path)
        return None  # not stored: a target supplies it
    return _expect(value, str, path)


def _namedtuple_class(node: Mapping[str, Any], path: KeyPath) -> type:
    """The NamedTuple class of a stored node (see :func:`namedtuple_class`)."""
    module, qualname, fields = node.get("module"), node.get("class"), node.get("fields")
    if not (isinstance(module, str) and isinstance(qualname, str) and isinstance(fields, list)):
        raise MalformedTreeError(f"malformed NamedTuple at {keystr(path)}")
    if not valid_field_names(fields):
        raise MalformedTreeError(f"NamedTuple at {keystr(path)} has invalid field names")
    return namedtuple_class(module, qualname, fields)


def valid_field_names(fields: list[Any]) -> bool:
    """Whether ``fields`` can name the fields of a namedtuple: distinct identifiers, none
    a keyword or starting with "_"."""
    return all(
        isinstance(f, str) and f.isidentifier() and not keyword.iskeyword(f) and f[0] != "_"
        for f in fields
    ) and len(set(fields)) == len(fields)


def namedtuple_class(module: str, qualname: str, fields: list[str]) -> type:
    """The NamedTuple class to rebuild, without importing or calling anything.

    The original class is used when its module is already imported and the class found
    there (by static lookup) has the same fields; otherwise an equivalent namedtuple of
    the same name, module and ``fields`` (which must pass :func:`valid_field_names`).
    """
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            break
        obj = inspect.getattr_static(obj, part, None)
    if (
        issubclass(type(obj), type)  # not isinstance: it would read obj.__class__
        and issubclass(obj, tuple)
        and inspect.getattr_static(obj, "_fields", None) == tuple(fields)
    ):
        return obj
    name = qualname.rsplit(".", 1)[-1]
    if not name.isidentifier() or keyword.iskeyword(name):
        name = "RestoredNamedTuple"
    return collections.namedtuple(name, fields, module=module)  # type: ignore[misc]


# --------------------------------------------------------------------------- targets


def index_tree(node: Node) -> tuple[dict[KeyPath, Node], list[KeyPath]]:
    """Every stored value by its plain-key path, and the paths of inner nodes.

    NamedTuple children are reachable by field name and by position, so that a tuple
    target matches a NamedTuple checkpoint and a dict target matches its fields.
    """
    values: dict[KeyPath, Node] = {}
    inner: list[KeyPath] = []
    # (path, node, canonical): aliases (a NamedTuple child by position) are matchable
    # but are not offered as subtree positions, or every subtree would be ambiguous.
    stack: list[tuple[KeyPath, Node, bool]] = [((), node, True)]
    while stack:
        path, n, canonical = stack.pop()
        if len(path) > MAX_DEPTH:
            raise MalformedTreeError(f"tree nested deeper than {MAX_DEPTH} levels")
        values[path] = n
        if n is None:
            continue
        tag = _tag(n, path)
        if tag in _SCALAR_TAGS or tag == "array":
            continue
        if canonical:
            inner.append(path)
        if tag in ("list", "tuple"):
            children = _expect(n[tag], list, path)
            stack.extend(((*path, i), c, canonical) for i, c in enumerate(children))
        elif tag == "namedtuple":
            children = _expect(n[tag], list, path)
            fields = n.get("fields") or []
            if not isinstance(fields, list):
                raise MalformedTreeError(f"the fields of a NamedTuple are {type(fields).__name__}")
            for i, c in enumerate(children):
                stack.append(((*path, i), c, False))
                if i < len(fields) and isinstance(fields[i], str):
                    stack.append(((*path, fields[i]), c, canonical))
        else:
            stack.extend(((*path, k), c, canonical) for k, c in _pairs(n[tag], path))
    return values, inner


def find_prefix(
    saved: Mapping[KeyPath, Node], inner: list[KeyPath], wanted: list[KeyPath]
) -> KeyPath:
    """Where in the saved tree the target sits: the root when all its leaves are found
    there, else the shallowest inner node under which they all are. Raises
    ``ValueError`` when there is no such node, or more than one at that depth."""
    if all(p in saved for p in wanted):
        return ()
    candidates = [q for q in inner if q and all((*q, *p) in saved for p in wanted)]
    if not candidates:
        missing = next(p for p in wanted if p not in saved)
        raise ValueError(
            f"Target leaf {_plain_keystr(missing)} is not in the checkpoint, neither at its "
            "root nor under any of its subtrees."
        )
    # The shallowest wins: "params" of a TrainState, not the "mu" of Adam (same shape).
    depth = min(len(q) for q in candidates)
    best = [q for q in candidates if len(q) == depth]
    if len(candidates) > 1 and len(best) == 1:
        logger.info(
            "Target matched %s (the shallowest of %d matching subtrees)",
            _plain_keystr(best[0]),
            len(candidates),
        )
    if len(best) > 1:
        shown = ", ".join(_plain_keystr(q) for q in best[:4])
        raise ValueError(
            f"Target matches several subtrees of the checkpoint ({shown}); pass a target "
            "that starts at the root, e.g. {'params': ...}."
        )
    return best[0]


def _plain_keystr(path: KeyPath) -> str:
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def leaf_nodes(node: Node) -> list[tuple[KeyPath, Node]]:
    """The leaves of a stored tree (arrays, scalars, ``None``) in tree order, each with
    its path of plain keys (NamedTuple fields by name), without reading any array."""
    out: list[tuple[KeyPath, Node]] = []
    stack: list[tuple[KeyPath, Node]] = [((), node)]
    while stack:
        path, n = stack.pop()
        if len(path) > MAX_DEPTH:
            raise MalformedTreeError(f"tree nested deeper than {MAX_DEPTH} levels")
        if n is None:
            out.append((path, None))
            continue
        tag = _tag(n, path)
        if tag == "array":
            _expect(n[tag], str, path)
        if tag in _SCALAR_TAGS or tag == "array":
            out.append((path, n))
            continue
        if tag in ("list", "tuple", "namedtuple"):
            children: list[tuple[Any, Node]] = list(enumerate(_expect(n[tag], list, path)))
            fields = n.get("fields") if tag == "namedtuple" else None
            if isinstance(fields, list) and len(fields) == len(children):
                children = [(f, c) for f, (_, c) in zip(fields, children, strict=True)]
        else:
            children = _pairs(n[tag], path)
        stack.extend(((*path, k), c) for k, c in reversed(children))
    return out
