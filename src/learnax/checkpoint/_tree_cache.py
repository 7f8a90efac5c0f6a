"""Encoding a train state again at the next save: the structure is usually the same.

``_tree.encode_tree`` walks the whole state in Python, about 12 us a leaf. A training
run saves the same structure every time with new arrays in it, so :class:`TreeCache`
keeps the encoded structure of the last save and, when jax's own (C++) flattening gives
an equal treedef, only puts the new arrays into the kept leaf names and paths. Anything
that could make the encoding differ (a leaf of another type or dtype, a Python scalar,
string or function leaf with another value, a dict whose keys come in another order)
falls back to the full encoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np

from ._tree import ArrayLeaf, Node, _node_children, encode_tree


class TreeCache:
    """The last encoded structure of one Checkpointer's saves."""

    def __init__(self) -> None:
        self._treedef: Any = None
        self._node: Node = None
        # One per array leaf: its position among jax's flat leaves, its tensor name and
        # path, and the type and dtype of its value (never the value itself).
        self._arrays: list[tuple[int, ArrayLeaf, type, np.dtype]] = []
        # Positions of the other flat leaves (scalars, strings, functions) and values.
        self._constants: list[tuple[int, Any]] = []
        self._orders: list[tuple[Any, ...]] = []  # every dict's keys and their types

    def encode(self, state: Any) -> tuple[Node, list[ArrayLeaf]]:
        """``_tree.encode_tree(state)``, reusing the last structure where it is equal."""
        if self._treedef is not None:  # (jax flattens only what encoded well before)
            flat = self._same_structure(state)
            if flat is not None:
                leaves = self._refill(flat)
                if leaves is not None:
                    return self._node, leaves
        node, leaves = encode_tree(state)
        self._remember(state, node, leaves)
        return node, leaves

    def _same_structure(self, state: Any) -> list[Any] | None:
        """jax's flat leaves of ``state`` if its structure is the kept one, else ``None``."""
        try:
            flat, treedef = jtu.tree_flatten(state)
            # A treedef's equality compares static fields, which raises for an array
            # kept in one; then the full encoding decides what the state is.
            if treedef == self._treedef and _dict_orders(state) == self._orders:
                return flat
        except Exception:  # what jax cannot flatten (dict keys it cannot sort)
            pass
        return None

    def _refill(self, flat: list[Any]) -> list[ArrayLeaf] | None:
        """The leaves of ``flat`` under the kept names, or ``None`` if anything differs."""
        for position, value in self._constants:
            if not _same_constant(flat[position], value):
                return None
        leaves = []
        for position, kept, kind, dtype in self._arrays:
            x = flat[position]
            # An equal dtype also means the same PRNG implementation for a key array.
            if type(x) is not kind or x.dtype != dtype:
                return None
            if kept.kind == "key":
                x = jax.random.key_data(x)
            leaves.append(ArrayLeaf(kept.name, kept.keypath, x, kept.kind, kept.impl))
        return leaves

    def _remember(self, state: Any, node: Node, leaves: list[ArrayLeaf]) -> None:
        self._treedef = None
        try:
            pairs, treedef = jtu.tree_flatten_with_path(state)
        except Exception:
            return
        where = {tuple(path): i for i, (path, _) in enumerate(pairs)}
        flat = [value for _, value in pairs]
        arrays = []
        for leaf in leaves:
            position = where.pop(tuple(leaf.keypath), None)
            if position is None:
                return  # paths that do not match jax's: never cached
            value = flat[position]
            kept = ArrayLeaf(leaf.name, leaf.keypath, None, leaf.kind, leaf.impl)
            arrays.append((position, kept, type(value), value.dtype))
        constants = []
        for position in where.values():
            value = flat[position]
            if isinstance(value, (np.ndarray, jax.Array, list, dict)):
                return
            constants.append((position, value))
        self._treedef, self._node, self._arrays, self._constants = treedef, node, arrays, constants
        self._orders = _dict_orders(state)


def _same_constant(now: Any, kept: Any) -> bool:
    """Whether a non-array leaf encodes as the kept one: of the same type and equal,
    where floats (and complex parts) also keep their sign (``-0.0 == 0.0`` in Python,
    but the checkpoint stores the sign) and a NaN is the same NaN."""
    if now is kept:
        return True
    if type(now) is not type(kept):
        return False
    if isinstance(now, (float, complex, np.inexact)):
        return repr(now) == repr(kept)
    try:
        return bool(now == kept)
    except Exception:  # an equality that is not a truth value
        return False


_ATOMS = (np.ndarray, np.generic, jax.Array, str, bytes, int, float, complex)


def _dict_orders(state: Any) -> list[tuple[Any, ...]]:
    """The keys of every dict in ``state``, in order and with their types: jax's treedef
    sorts them and takes ``1``, ``1.0`` and ``True`` for one key, but a checkpoint
    keeps a dict's own order and each key's type, so two states of one treedef may
    still encode differently. A walk of the containers only, about 0.5 us a leaf."""
    orders: list[tuple[Any, ...]] = []
    stack = [state]
    while stack:
        x = stack.pop()
        if x is None or isinstance(x, _ATOMS):
            continue
        if isinstance(x, dict):
            keys = tuple(x)
            orders.append(keys)
            orders.append(tuple(map(type, keys)))  # (1,) == (True,): the types apart
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        else:
            children = _node_children(x)
            if children:
                stack.extend(child for _, child in children)
    return orders
