"""Heavy modules imported on first use, so that the ``learnax`` command starts at once.

Importing jax takes seconds (ml_dtypes alone most of a second) and ``learnax ls``,
``show``, ``diff`` of manifests or ``prune`` never need it. A module that uses jax or
NumPy only inside functions binds the name to a :class:`LazyModule` instead of
importing it: the first attribute read imports the module and puts it in the binding's
place, so every later use is a plain global lookup, as cheap as after ``import jax``.
"""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """A stand-in for ``import <name> as <alias>`` in the module whose globals are
    ``namespace``, replaced there by the module itself on the first attribute read.

    **Arguments:** `name` (the module, e.g. ``"jax.tree_util"``), `namespace` (the
    importing module's ``globals()``), `alias` (the name bound there; by default the
    last part of `name`).

    **Example:** `jax = LazyModule("jax", globals())`, then `jax.Array` as usual.
    """

    __slots__ = ("_alias", "_name", "_namespace")

    def __init__(self, name: str, namespace: dict[str, Any], alias: str | None = None) -> None:
        self._name = name
        self._namespace = namespace
        self._alias = alias or name.rpartition(".")[2]

    def __getattr__(self, attribute: str) -> Any:
        module = importlib.import_module(self._name)
        if self._namespace.get(self._alias) is self:
            self._namespace[self._alias] = module
        return getattr(module, attribute)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use>"
