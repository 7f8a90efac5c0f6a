"""What each global a pickle names becomes, for the restricted unpickler (``_unpickle``).

A pickle builds objects by naming globals (``module.name``) and calling them. Here
every global gets an answer of learnax's own, never a function or class of the
running process: NumPy arrays, dtypes and scalars (and jax arrays, which pickle as
NumPy data) are rebuilt from their bytes; builtin containers by constructors that check
their arguments (no ``bytearray(10**12)``); a class of a module that is not imported,
or a NamedTuple class, by a stand-in that only records what the pickle gives it. A
function, or a class of an imported module that is not a NamedTuple, raises
:class:`NeedsCode` naming it. The objects handed out refuse BUILD, so that no state
from a file reaches NumPy's ``__setstate__`` or changes how the next file is read.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from . import _tree

# What the constructors below copy, against a budget of the pickle's own size: each
# array's bytes sit once in the file, so a file that copies more (the same bytes
# rebuilt again and again) is refused instead of allocating many times its size.
_budget: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "learnax_unpickle_budget", default=None
)


@contextlib.contextmanager
def byte_budget(nbytes: int) -> Iterator[None]:
    """Let the constructors copy at most ``nbytes`` in all while the block runs."""
    token = _budget.set([nbytes])
    try:
        yield
    finally:
        _budget.reset(token)


def _spend(nbytes: int) -> None:
    budget = _budget.get()
    if budget is None:
        return
    budget[0] -= nbytes
    if budget[0] < 0:
        raise ValueError("the pickle rebuilds more bytes than it holds")


class NeedsCode(Exception):
    """A pickle names something that only running code could rebuild; the message says
    what ("it names posix.system, a function")."""


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
    obj = static_lookup(module, name)
    if obj is MISSING or is_namedtuple_class(obj):
        return stand_in_class(module, name)
    is_class = issubclass(type(obj), type)
    what = "a class that is not a NamedTuple" if is_class else "a function"
    if not is_class and not callable(obj):
        what = "an object"
    raise NeedsCode(f"it names {module}.{name}, {what}")


MISSING = object()


def static_lookup(module: str, qualname: str) -> Any:
    """``module.qualname`` if the module is already imported, found without running
    anything (no import, no ``__getattr__``); ``MISSING`` otherwise."""
    obj: Any = sys.modules.get(module, MISSING)
    for part in qualname.split("."):
        if obj is MISSING:
            break
        obj = inspect.getattr_static(obj, part, MISSING)
    return obj


def is_namedtuple_class(obj: Any) -> bool:
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


class ScalarType(_Marker):
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


def _scalar_type(module: str, name: str) -> ScalarType | None:
    if module not in ("numpy", "ml_dtypes"):
        return None
    cls = static_lookup(module, name)
    if isinstance(cls, type) and issubclass(cls, np.generic):
        return ScalarType(f"{module}.{name}", cls)
    return None


class DTypeBuilder:
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


class Built:
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
    if isinstance(x, DTypeBuilder):
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
    _spend(len(raw))
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


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> Built:
    # numpy pickles every array as _reconstruct(ndarray, (0,), b"b") + its state.
    if not (isinstance(cls, _Marker) and cls.name == "numpy.ndarray") or shape != (0,):
        raise NeedsCode("it calls numpy's _reconstruct with other than an empty ndarray")
    return Built()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> Built:
    # Protocol 5: numpy pickles a contiguous array as _frombuffer(data, dtype, shape, order).
    if order not in ("C", "F"):
        raise ValueError(f"invalid array order {order!r:.20}")
    return Built(_array_from_bytes(buffer, dtype, shape, order))


def _scalar(dtype: Any, data: Any) -> Built:
    dtype = _dtype_of(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise ValueError(f"invalid data for a {dtype} scalar")
    return Built(np.frombuffer(data, dtype)[0])


def _dtype(code: Any, align: Any = False, copy: Any = False) -> DTypeBuilder:
    if isinstance(code, ScalarType):
        code = code.cls
    elif not isinstance(code, str) or len(code) > 64:
        raise ValueError(f"invalid dtype code {code!r:.80}")
    return DTypeBuilder(np.dtype(code))


def _jax_array(fun: Any, args: Any, array_state: Any, aval_state: Any) -> Built:
    # jax.Array.__reduce__: numpy's _reconstruct(*args), its __setstate__(array_state),
    # then a device_put. Only the NumPy data is kept: loads return NumPy arrays.
    if fun is not _ALLOWED[("numpy._core.multiarray", "_reconstruct")]:
        raise NeedsCode("it rebuilds a jax array with other than numpy's _reconstruct")
    if not isinstance(args, tuple) or not isinstance(aval_state, dict):
        raise ValueError("invalid jax array")
    _reconstruct(*args)
    return Built(_array_from_state(array_state))


# --------------------------------------------------------------------------- builtins


def _items(x: Any, what: str) -> Any:
    if not isinstance(x, (list, tuple, set, frozenset)):
        raise NeedsCode(f"it builds a {what} from {type(x).__name__}")
    return x


def _bytearray(*args: Any) -> bytearray:
    if args == () or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
        _spend(len(args[0]) if args else 0)
        return bytearray(*args)
    if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
        _spend(len(args[0]))
        return bytearray(args[0], "latin-1")
    raise NeedsCode("it calls builtins.bytearray with other than bytes")


def _bytes(*args: Any) -> bytes:
    if args == () or (len(args) == 1 and isinstance(args[0], (bytes, bytearray))):
        _spend(len(args[0]) if args else 0)
        return bytes(*args)
    raise NeedsCode("it calls builtins.bytes with other than bytes")


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(their latin-1 text, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise NeedsCode("it calls _codecs.encode with other than latin-1 text")
    _spend(len(text))
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
