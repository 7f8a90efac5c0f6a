"""Reading a pickle without running anything from it: the original learnax's files.

A pickle is a small program: its opcodes name globals (``module.name``) and call them.
The restricted unpickler here is Python's own, with every global answered by
``_pickle_globals`` (NumPy data, checked builtin constructors, stand-ins for classes;
a refusal naming anything else). Before it runs, a scan of every opcode checks each
length and memo index against the size of the data, so nothing allocates more than
that. After it, finishing replaces what the globals built: arrays and dtypes by NumPy's,
stand-ins by namedtuples of the same name and fields (the original Trainer's
``learnax.trainer.TrainState``, optax's states), the imported class when there is one.

``allow_pickle=True`` is the caller's opt-in to Python's own unpickler for the pickles
the restricted one refuses; classes whose module cannot be imported still get stand-ins.
"""

from __future__ import annotations

import collections
import io
import logging
import pickle
import pickletools
from typing import Any

import numpy as np

from . import _tree
from ._errors import CheckpointCorruptedError
from ._pickle_globals import (
    Built,
    DTypeBuilder,
    NeedsCode,
    ScalarType,
    StandIn,
    byte_budget,
    is_namedtuple_class,
    resolve_global,
    stand_in_class,
    static_lookup,
)

logger = logging.getLogger("learnax")

# Deeper nesting than this is refused: finishing recurses, a few frames a level.
_MAX_DEPTH = 100
# More classes than this in one file is refused: each costs far more memory than the
# few bytes that name it (a train state has a dozen).
_MAX_CLASSES = 1000

# A NamedTuple pickles its values, not its field names. These are the fields of the
# classes the original learnax pickled, for when their module is not imported here:
# the original's TrainState, and optax's states (keyed by package: their modules moved).
_KNOWN_FIELDS: dict[tuple[str, str], tuple[str, ...]] = {
    ("learnax.trainer", "TrainState"): ("params", "opt_state", "step"),
    ("optax", "EmptyState"): (),
    ("optax", "ScaleByAdamState"): ("count", "mu", "nu"),
    ("optax", "ScaleByAmsgradState"): ("count", "mu", "nu", "nu_max"),
    ("optax", "ScaleByLionState"): ("count", "mu"),
    ("optax", "ScaleByRmsState"): ("nu",),
    ("optax", "ScaleByRssState"): ("sum_of_squares",),
    ("optax", "ScaleByScheduleState"): ("count",),
    ("optax", "TraceState"): ("trace",),
    ("optax", "MaskedState"): ("inner_state",),
    ("optax", "InjectHyperparamsState"): ("count", "hyperparams", "inner_state"),
    ("optax", "InjectStatefulHyperparamsState"): (
        "count",
        "hyperparams",
        "hyperparams_states",
        "inner_state",
    ),
}

# Python 2 names that Python 3 still writes in pickles of protocol < 3.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_PY2_NAMES = {("builtins", "xrange"): ("builtins", "range")}
# Opcodes that reach outside the pickle (persistent ids, out-of-band buffers).
_OUTSIDE_OPCODES = {"PERSID", "BINPERSID", "NEXT_BUFFER", "READONLY_BUFFER"}


# --------------------------------------------------------------------------- entry


def load(data: bytes, where: str, allow_pickle: bool) -> Any:
    """The object pickled in ``data`` (the bytes of file ``where``).

    Read by the restricted unpickler; a pickle it refuses raises :class:`NeedsCode`,
    damaged data :class:`CheckpointCorruptedError`. With ``allow_pickle`` a pickle the
    restricted unpickler cannot read goes to Python's unpickler (logged: that runs code
    from the file).
    """
    try:
        return restricted_load(data, where)
    except (NeedsCode, CheckpointCorruptedError):
        if not allow_pickle:
            raise
    logger.warning("Unpickling %s (allow_pickle=True): this runs code from the file", where)
    try:
        return _Finisher(strict=False).finish(_PermissiveUnpickler(io.BytesIO(data)).load())
    except Exception as e:
        raise CheckpointCorruptedError(f"{where}: cannot unpickle ({e})") from e


def restricted_load(data: bytes, where: str) -> Any:
    """The object pickled in ``data``, rebuilt without running anything from it.
    Raises :class:`NeedsCode` naming what only running code could rebuild,
    :class:`CheckpointCorruptedError` when the data is not a readable pickle."""
    try:
        _scan(data)
        unpickler = _RestrictedUnpickler(io.BytesIO(data))
        # Protocol 2 holds bytes as latin-1 text: encoded, then copied into an array.
        with byte_budget(2 * len(data) + (1 << 20)):
            return _Finisher(strict=True).finish(unpickler.load())
    except NeedsCode:
        raise
    except Exception as e:  # a damaged file may make the unpickler raise anything
        raise CheckpointCorruptedError(
            f"{where}: not a readable pickle ({type(e).__name__}: {e})"
        ) from None


def _scan(data: bytes) -> None:
    """Parse every opcode before unpickling: lengths past the end of ``data`` and memo
    indices beyond the opcodes so far (Python's unpickler would allocate for them
    first) raise ``ValueError``, as do opcodes that reach outside the pickle."""
    memo_slots = 0
    for op, arg, pos in pickletools.genops(data):
        if op.name in _OUTSIDE_OPCODES:
            raise ValueError(f"opcode {op.name} refers to data outside the pickle")
        if op.name == "FRAME" and arg > len(data) - pos:
            raise ValueError(f"a frame of {arg} bytes at offset {pos} runs past the end")
        if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
            if arg > memo_slots:
                raise ValueError(f"memo index {arg} at offset {pos} skips ahead")
            memo_slots += 1
        elif op.name == "MEMOIZE":
            memo_slots += 1


class _PermissiveUnpickler(pickle.Unpickler):
    """Python's unpickler (``allow_pickle=True``), with stand-ins for the classes of
    modules that cannot be imported, such as the original's ``learnax.trainer``."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return stand_in_class(module, name)


class _RestrictedUnpickler(pickle.Unpickler):
    """Python's unpickler, every global answered by :func:`resolve_global`."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        module, name = _PY2_NAMES.get((module, name), (module, name))
        if (module, name) not in self._stand_ins:
            found = resolve_global(module, name)
            if not isinstance(found, type):
                return found
            if len(self._stand_ins) >= _MAX_CLASSES:
                raise ValueError(f"more than {_MAX_CLASSES} classes")
            self._stand_ins[(module, name)] = found
        return self._stand_ins[(module, name)]


# --------------------------------------------------------------------------- finishing


class _Finisher:
    """Walks what the unpickler built and replaces its builders: arrays, dtypes and
    stand-ins become NumPy arrays, dtypes and namedtuples. Containers are changed in
    place (a pickle may share them or make cycles); each object is finished once.
    ``strict``: anything else is refused (:class:`NeedsCode`); otherwise (what
    Python's unpickler built) it is kept as it is."""

    _ATOMS = (type(None), bool, int, float, complex, str, bytes, bytearray, range, slice)

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.done: dict[int, Any] = {}  # by id: ...
        self.seen: list[Any] = []  # ... of objects kept alive, so that no id is reused
        self.classes: dict[tuple[str, str, tuple[str, ...]], type] = {}

    def finish(self, x: Any, depth: int = 0) -> Any:
        if isinstance(x, self._ATOMS) or isinstance(x, (np.ndarray, np.generic, np.dtype)):
            return x
        if depth > _MAX_DEPTH:
            raise ValueError(f"nested deeper than {_MAX_DEPTH} levels")
        if id(x) in self.done:
            found = self.done[id(x)]
            if found is _IN_PROGRESS:
                raise ValueError(f"{type(x).__qualname__} contains itself")
            return found
        self.done[id(x)] = _IN_PROGRESS
        self.seen.append(x)
        result = self._finish_one(x, depth + 1)
        self.done[id(x)] = result
        return result

    def _finish_one(self, x: Any, depth: int) -> Any:
        if isinstance(x, Built):
            if x.value is None:
                raise ValueError("an array without data")
            return x.value
        if isinstance(x, DTypeBuilder):
            return x.dtype
        if isinstance(x, ScalarType):
            return x.cls
        if isinstance(x, StandIn):
            return self._rebuild(x, depth)
        if type(x) in (list, dict, collections.OrderedDict, set):
            self.done[id(x)] = x  # its children may refer to it
            return self._finish_mutable(x, depth)
        if type(x) in (tuple, frozenset):
            return type(x)(self.finish(v, depth) for v in x)
        if not self.strict:
            return x
        name = getattr(x, "name", None) or getattr(x, "__qualname__", type(x).__qualname__)
        raise NeedsCode(f"it holds {name} itself, not data built with it")

    def _finish_mutable(self, x: Any, depth: int) -> Any:
        # The methods of the builtin types, never attributes of the instance: BUILD may
        # have given an OrderedDict a __dict__ whose "items" is the pickle's object.
        if getattr(x, "__dict__", None):
            raise NeedsCode(f"it sets attributes of a {type(x).__name__}")
        kind = type(x)  # exactly list, dict, OrderedDict or set (see finish)
        if kind is list:
            list.__setitem__(x, slice(None), [self.finish(v, depth) for v in list.__iter__(x)])
        elif kind is set:
            members = [self.finish(v, depth) for v in set.__iter__(x)]
            set.clear(x)
            set.update(x, members)
        else:
            items = [(self.finish(k, depth), self.finish(v, depth)) for k, v in kind.items(x)]
            kind.clear(x)
            kind.update(x, items)
        return x

    def _rebuild(self, obj: StandIn, depth: int) -> Any:
        """The namedtuple (or, for attribute names no namedtuple can have, the dict)
        that ``obj`` stands for."""
        cls = type(obj)
        module, name = cls.__module__, cls.__qualname__
        names, values = _fields_and_values(obj, module, name)
        values = [self.finish(v, depth) for v in values]
        if not _tree.valid_field_names(names):
            return dict(zip(names, values, strict=True))
        key = (module, name, tuple(names))
        if key not in self.classes:
            if len(self.classes) >= _MAX_CLASSES:
                raise ValueError(f"more than {_MAX_CLASSES} NamedTuple classes")
            self.classes[key] = _tree.namedtuple_class(module, name, names)
        # tuple.__new__, not the class: an imported class's own __new__ could run code.
        return tuple.__new__(self.classes[key], values)


_IN_PROGRESS = object()


def _fields_and_values(obj: StandIn, module: str, name: str) -> tuple[list[Any], list[Any]]:
    """The field names and values of a stand-in: from its ``__setstate__`` state (a
    dict, or the ``(dict, slots dict)`` pair of a class with ``__slots__``), else its
    positional values with the fields of the imported class, of a class the original
    learnax pickled, or ``field_0``, ``field_1``..."""
    state, args = obj.state, list(obj.args)
    if state is None:
        return list(_positional_fields(module, name, len(args))), args
    if args:
        raise NeedsCode(f"it builds {module}.{name} from both values and a state")
    if (
        isinstance(state, tuple)
        and len(state) == 2
        and all(s is None or isinstance(s, dict) for s in state)
    ):
        state = {**(state[0] or {}), **(state[1] or {})}
    if isinstance(state, dict):
        return list(state), list(state.values())
    raise NeedsCode(f"it sets a state of type {type(state).__name__} on {module}.{name}")


def _positional_fields(module: str, name: str, count: int) -> tuple[str, ...]:
    real = static_lookup(module, name)
    if is_namedtuple_class(real) and len(real._fields) == count:
        return real._fields
    known = _KNOWN_FIELDS.get((module, name)) or _KNOWN_FIELDS.get((module.split(".")[0], name))
    if known is not None and len(known) == count:
        return known
    return tuple(f"field_{i}" for i in range(count))
