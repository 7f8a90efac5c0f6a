"""Reading a pickle without running anything from it: the original learnax's files.

A pickle is a small program: its opcodes name globals (``module.name``) and call them.
The restricted unpickler here answers every global itself, never with a function or
class of the running process. NumPy arrays, dtypes and scalars (and jax arrays, which pickle as
NumPy data) are rebuilt from their bytes by the code below; builtin containers by
constructors that check their arguments; any other class by a stand-in that only
records what the pickle gives it, and that becomes a namedtuple of the same name and
fields once the whole file is read (the original Trainer's
``learnax.trainer.TrainState``, optax's states). Whatever else a pickle names, a
function or a class with behaviour of its own, raises :class:`NeedsCode`
naming it. Before the unpickler runs, a scan of every opcode checks each length and
memo index against the size of the data, so nothing allocates more than that.

``allow_pickle=True`` is the caller's opt-in to Python's own unpickler for the pickles
the restricted one refuses; classes whose module cannot be imported still get stand-ins.
"""

from __future__ import annotations

import collections
import inspect
import io
import logging
import math
import pickle
import pickletools
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from . import _tree
from ._errors import CheckpointCorruptedError

logger = logging.getLogger("learnax")

# Deeper nesting than this is refused: finishing recurses, a few frames a level.
_MAX_DEPTH = 100

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


class NeedsCode(Exception):
    """A pickle names something that only running code could rebuild; the message says
    what ("it names posix.system, a function")."""


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
            self._stand_ins[(module, name)] = found
        return self._stand_ins[(module, name)]


def resolve_global(module: str, name: str) -> Any:
    """What the restricted unpickler gives for the global ``module.name``: a checked
    constructor, a marker, or a stand-in class; raises :class:`NeedsCode` for a
    function or class it does not rebuild."""
    allowed = _ALLOWED.get((module, name))
    if allowed is not None:
        return allowed
    scalar_type = _scalar_type(module, name)
    if scalar_type is not None:
        return scalar_type
    obj = _static_lookup(module, name)
    if obj is _MISSING or _is_namedtuple_class(obj):
        return stand_in_class(module, name)
    is_class = issubclass(type(obj), type)
    what = "a class that is not a NamedTuple" if is_class else "a function"
    if not is_class and not callable(obj):
        what = "an object"
    raise NeedsCode(f"it names {module}.{name}, {what}")


_MISSING = object()


def _static_lookup(module: str, qualname: str) -> Any:
    """``module.qualname`` if the module is already imported, found without running
    anything (no import, no ``__getattr__``); ``_MISSING`` otherwise."""
    obj: Any = sys.modules.get(module, _MISSING)
    for part in qualname.split("."):
        if obj is _MISSING:
            break
        obj = inspect.getattr_static(obj, part, _MISSING)
    return obj


def _is_namedtuple_class(obj: Any) -> bool:
    # type(obj), not isinstance(obj, type): that would read obj.__class__, maybe a property.
    return (
        issubclass(type(obj), type) and issubclass(obj, tuple) and _tree._is_namedtuple_class(obj)
    )


# --------------------------------------------------------------------------- stand-ins


class _StandInMeta(type):
    """Calling a stand-in class (REDUCE, INST) is allowed without arguments only: with
    them, only running the real global could tell whether it is a class."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs:
            raise NeedsCode(
                f"it calls {cls.__module__}.{cls.__qualname__} with arguments, which "
                "could be any function of that module"
            )
        return cls.__new__(cls)


class StandIn(metaclass=_StandInMeta):
    """An object of a class the pickle names: what the pickle gives it (the arguments
    of ``__new__``, the state of ``__setstate__``) is recorded, and
    :class:`_Finisher` turns it into a namedtuple."""

    __slots__ = ("args", "state")

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        if kwargs:
            raise NeedsCode(f"it builds {cls.__module__}.{cls.__qualname__} with keywords")
        obj = object.__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise ValueError(f"{type(self).__qualname__} given a state twice")
        self.state = state

    def _filled(self, *_: Any) -> None:
        raise NeedsCode(
            f"it fills {type(self).__module__}.{type(self).__qualname__} like a dict or "
            "a list: a subclass whose methods only running it could tell"
        )

    __setitem__ = append = extend = _filled


def stand_in_class(module: str, name: str) -> type:
    """A fresh stand-in class for the global ``module.name``."""
    return _StandInMeta(name, (StandIn,), {"__module__": module, "__qualname__": name})


# --------------------------------------------------------------------------- numpy


class _Frozen:
    """What a pickle may hold but never change: BUILD would set its attributes (and
    these objects outlive one load)."""

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise NeedsCode(f"it sets the state of {getattr(self, 'name', type(self).__name__)}")


class _Marker(_Frozen):
    """A global that is only an argument of another (``numpy.ndarray`` for
    ``_reconstruct``, ``builtins.object`` for ``copyreg._reconstructor``); as a type
    it would let NEWOBJ allocate at will."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


class _ScalarType(_Marker):
    """A NumPy or ml_dtypes scalar type, as the argument of ``numpy.dtype``."""

    __slots__ = ("cls",)

    def __init__(self, name: str, cls: type) -> None:
        super().__init__(name)
        self.cls = cls


class _Allowed(_Frozen):
    """A global the restricted unpickler may call: ``fn`` checks its arguments."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn: Callable[..., Any]) -> None:
        self.name, self.fn = name, fn

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _scalar_type(module: str, name: str) -> _ScalarType | None:
    if module not in ("numpy", "ml_dtypes"):
        return None
    cls = _static_lookup(module, name)
    if isinstance(cls, type) and issubclass(cls, np.generic):
        return _ScalarType(f"{module}.{name}", cls)
    return None


class _DTypeBuilder:
    """``numpy.dtype(code)``, completed by its pickled state (the byte order)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (8, 9)):
            raise ValueError(f"invalid dtype state {state!r:.80}")
        order, subarray, names, fields = state[1:5]
        if subarray is not None or names is not None or fields is not None:
            raise NeedsCode("it holds a structured dtype")
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)
        elif order not in ("|", "="):
            raise ValueError(f"invalid byte order {order!r:.20}")


class _Built:
    """A NumPy array or scalar the pickle made, which finishing unwraps. The pickle holds
    this, never the value itself, so that no state from the file reaches NumPy's own
    ``__setstate__``. Empty, it is the array of ``_reconstruct``, filled by its state."""

    __slots__ = ("value",)

    def __init__(self, value: np.ndarray | np.generic | None = None) -> None:
        self.value = value

    def __setstate__(self, state: Any) -> None:
        if self.value is not None:
            raise ValueError("a state given to an array or scalar that has its data")
        self.value = _array_from_state(state)


def _dtype_of(x: Any) -> np.dtype:
    if isinstance(x, _DTypeBuilder):
        x = x.dtype
    if not isinstance(x, np.dtype):
        raise ValueError(f"expected a dtype, got {type(x).__name__}")
    if x.hasobject or x.fields is not None or x.subdtype is not None or x.itemsize == 0:
        raise NeedsCode(f"it holds an array of dtype {x}, which only unpickling can fill")
    return x


def _array_from_bytes(raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    """A new array of ``shape`` from the bytes ``raw``, their size checked first."""
    dtype = _dtype_of(dtype)
    if not isinstance(raw, (bytes, bytearray)):
        raise ValueError(f"array data is {type(raw).__name__}, not bytes")
    if not (
        isinstance(shape, tuple)
        and len(shape) <= 64
        and all(type(d) is int and d >= 0 for d in shape)
    ):
        raise ValueError(f"invalid array shape {shape!r:.80}")
    if math.prod(shape) * dtype.itemsize != len(raw):
        raise ValueError(f"{len(raw)} bytes of data for an array {dtype}{list(shape)}")
    flat = np.frombuffer(raw, dtype)
    return flat.reshape(shape, order=order).copy(order="K")


def _array_from_state(state: Any) -> np.ndarray:
    """The array of ``ndarray.__setstate__``'s state: ``(version, shape, dtype,
    is_fortran, data)``, the version optional."""
    if isinstance(state, tuple) and len(state) == 5 and state[0] == 1:
        state = state[1:]
    if not (isinstance(state, tuple) and len(state) == 4 and isinstance(state[2], bool)):
        raise ValueError(f"invalid array state {type(state).__name__}")
    shape, dtype, fortran, raw = state
    return _array_from_bytes(raw, dtype, shape, "F" if fortran else "C")


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Built:
    # numpy pickles every array as _reconstruct(ndarray, (0,), b"b") + its state.
    if not (isinstance(cls, _Marker) and cls.name == "numpy.ndarray") or shape != (0,):
        raise NeedsCode("it calls numpy's _reconstruct with other than an empty ndarray")
    return _Built()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> _Built:
    # Protocol 5: numpy pickles a contiguous array as _frombuffer(data, dtype, shape, order).
    if order not in ("C", "F"):
        raise ValueError(f"invalid array order {order!r:.20}")
    return _Built(_array_from_bytes(buffer, dtype, shape, order))


def _scalar(dtype: Any, data: Any) -> _Built:
    dtype = _dtype_of(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"invalid data for a {dtype} scalar")
    return _Built(np.frombuffer(data, dtype)[0])


def _dtype(code: Any, align: Any = False, copy: Any = False) -> _DTypeBuilder:
    if isinstance(code, _ScalarType):
        code = code.cls
    elif not isinstance(code, str) or len(code) > 64:
        raise ValueError(f"invalid dtype code {code!r:.80}")
    return _DTypeBuilder(np.dtype(code))


def _jax_array(fun: Any, args: Any, array_state: Any, aval_state: Any) -> _Built:
    # jax.Array.__reduce__: numpy's _reconstruct(*args), its __setstate__(array_state),
    # then a device_put. Only the NumPy data is kept: loads return NumPy arrays.
    if fun is not _ALLOWED[("numpy._core.multiarray", "_reconstruct")]:
        raise NeedsCode("it rebuilds a jax array with other than numpy's _reconstruct")
    if not isinstance(args, tuple) or not isinstance(aval_state, dict):
        raise ValueError("invalid jax array")
    _reconstruct(*args)
    return _Built(_array_from_state(array_state))


# --------------------------------------------------------------------------- builtins


def _items(x: Any, what: str) -> Any:
    if not isinstance(x, (list, tuple, set, frozenset)):
        raise NeedsCode(f"it builds a {what} from {type(x).__name__}")
    return x


def _bytearray(*args: Any) -> bytearray:
    if args == () or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
        return bytearray(*args)
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        return bytearray(args[0], "latin-1")
    raise NeedsCode("it calls builtins.bytearray with other than bytes")


def _bytes(*args: Any) -> bytes:
    if args == () or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
        return bytes(*args)
    raise NeedsCode("it calls builtins.bytes with other than bytes")


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(their latin-1 text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise NeedsCode("it calls _codecs.encode with other than latin-1 text")
    return text.encode("latin-1")


def _numbers(*args: Any) -> tuple[Any, ...]:
    if not all(type(a) in (int, float) for a in args):
        raise NeedsCode("it calls builtins.complex with other than numbers")
    return args


def _indices(*args: Any) -> tuple[Any, ...]:
    if not all(a is None or type(a) is int for a in args):
        raise NeedsCode("it builds a slice or range of other than ints")
    return args


def _reconstructor(cls: Any, base: Any, state: Any) -> StandIn:
    # copyreg._reconstructor(cls, base, state): protocols 0 and 1 build instances of
    # classes this way; only the bases whose construction is data are allowed.
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise NeedsCode("it calls copyreg._reconstructor of other than a class")
    if isinstance(base, _Marker) and base.name == "builtins.object" and state is None:
        return cls.__new__(cls)
    if isinstance(base, _Marker) and base.name == "builtins.tuple" and isinstance(state, tuple):
        return cls.__new__(cls, *state)
    raise NeedsCode("it calls copyreg._reconstructor with a base class that runs code")


def _frozen_dict(mapping: Any) -> dict:
    # flax's FrozenDict pickles as FrozenDict(dict): it comes back as that dict.
    if not isinstance(mapping, dict):
        raise NeedsCode("it builds flax's FrozenDict from other than a dict")
    return mapping


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """``(module, name) ->`` what the restricted unpickler gives for that global."""
    table: dict[str, Callable[..., Any] | _Marker] = {
        "builtins.set": lambda items=(): set(_items(items, "set")),
        "builtins.frozenset": lambda items=(): frozenset(_items(items, "frozenset")),
        "builtins.complex": lambda *a: complex(*_numbers(*a)),
        "builtins.slice": lambda *a: slice(*_indices(*a)),
        "builtins.range": lambda *a: range(*_indices(*a)),
        "builtins.bytearray": _bytearray,
        "builtins.bytes": _bytes,
        "builtins.object": _Marker("builtins.object"),
        "builtins.tuple": _Marker("builtins.tuple"),
        "_codecs.encode": _encode,
        "copyreg._reconstructor": _reconstructor,
        "collections.OrderedDict": lambda items=(): collections.OrderedDict(_items(items, "dict")),
        "numpy.ndarray": _Marker("numpy.ndarray"),
        "numpy.dtype": _dtype,
        "flax.core.frozen_dict.FrozenDict": _frozen_dict,
        "jax._src.array._reconstruct_array": _jax_array,
    }
    for package in ("numpy.core", "numpy._core"):  # NumPy 1 and NumPy 2 names
        table[f"{package}.multiarray._reconstruct"] = _reconstruct
        table[f"{package}.multiarray.scalar"] = _scalar
        table[f"{package}.numeric._frombuffer"] = _frombuffer
    allowed = {}
    for name, entry in table.items():
        module, _, attr = name.rpartition(".")
        allowed[(module, attr)] = entry if isinstance(entry, _Marker) else _Allowed(name, entry)
    # One _reconstruct, so that a jax array can check it was given numpy's.
    allowed[("numpy.core.multiarray", "_reconstruct")] = allowed[
        ("numpy._core.multiarray", "_reconstruct")
    ]
    return allowed


_ALLOWED = _allowed_globals()


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
        if isinstance(x, _Built):
            if x.value is None:
                raise ValueError("an array without data")
            return x.value
        if isinstance(x, _DTypeBuilder):
            return x.dtype
        if isinstance(x, _ScalarType):
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
        if isinstance(x, list):
            x[:] = [self.finish(v, depth) for v in x]
        elif isinstance(x, dict):
            items = [(self.finish(k, depth), self.finish(v, depth)) for k, v in x.items()]
            x.clear()
            x.update(items)
        else:
            members = [self.finish(v, depth) for v in x]
            x.clear()
            x.update(members)
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
    real = _static_lookup(module, name)
    if _is_namedtuple_class(real) and len(real._fields) == count:
        return real._fields
    known = _KNOWN_FIELDS.get((module, name)) or _KNOWN_FIELDS.get((module.split(".")[0], name))
    if known is not None and len(known) == count:
        return known
    return tuple(f"field_{i}" for i in range(count))
