"""The dtypes learnax stores, by name, and their safetensors codes; and the names of
the PRNG key implementations whose key data it stores.

Names read from a file are looked up in a fixed table, never passed to ``np.dtype``:
a crafted file cannot ask for an object array. Dtypes that safetensors has no code for
(int4, the fnuz float8 variants, complex128, ...) are stored as raw bytes (``U8`` with
one more axis of the item size), and the manifest keeps the true dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

# Each stored dtype name and its item size in bytes. NumPy's dtypes come first, then
# those of ml_dtypes (a name the installed ml_dtypes lacks is stored by none and read as
# unknown). The sizes let a manifest be checked without importing NumPy or ml_dtypes,
# which takes most of a second: `learnax ls` and `show` read manifests only.
ITEMSIZES: dict[str, int] = {
    "bool": 1,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "uint16": 2,
    "uint32": 4,
    "uint64": 8,
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
    "bfloat16": 2,
    "float8_e3m4": 1,
    "float8_e4m3": 1,
    "float8_e4m3fn": 1,
    "float8_e4m3fnuz": 1,
    "float8_e4m3b11fnuz": 1,
    "float8_e5m2": 1,
    "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "float4_e2m1fn": 1,
    "float6_e2m3fn": 1,
    "float6_e3m2fn": 1,
    "int2": 1,
    "int4": 1,
    "uint2": 1,
    "uint4": 1,
}
_FIRST_ML_DTYPE = "bfloat16"
_ML_DTYPES_START = list(ITEMSIZES).index(_FIRST_ML_DTYPE)

# Name -> dtype and back, filled on first use (see _fill_tables): a miss in either is
# the signal to fill them, so that a lookup stays one dict access.
DTYPES: dict[str, np.dtype] = {}
_NAMES: dict[np.dtype, str] = {}
_FILLED: set[str] = set()  # the parts filled: "numpy", "ml_dtypes"


def _fill_tables(ml_dtypes_too: bool = True) -> None:
    """Fill the tables with NumPy's dtypes and, unless not needed, those of ml_dtypes
    (whose import alone takes most of a second)."""
    import numpy as np

    names, split = list(ITEMSIZES), _ML_DTYPES_START
    if "numpy" not in _FILLED:
        _add({name: np.dtype(name) for name in names[:split]})
        _FILLED.add("numpy")
    if ml_dtypes_too and "ml_dtypes" not in _FILLED:
        import ml_dtypes

        _add(
            {
                name: np.dtype(getattr(ml_dtypes, name))
                for name in names[split:]
                if hasattr(ml_dtypes, name)
            }
        )
        _FILLED.add("ml_dtypes")


def _add(dtypes: dict[str, np.dtype]) -> None:
    _NAMES.update({dtype: name for name, dtype in dtypes.items()})
    DTYPES.update(dtypes)


# Codes from the safetensors format; only those every safetensors release understands.
SAFETENSORS_CODES: dict[str, str] = {
    "bool": "BOOL",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float16": "F16",
    "float32": "F32",
    "float64": "F64",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "complex64": "C64",
}


# The PRNG key implementations a checkpoint may name: jax's built-in ones.
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# Older jax (0.4.30) prints an implementation by its short tag, ``str(key_impl(key))``
# being "fry"; the tags stand for the names above, which is what is stored.
_PRNG_TAGS = {"fry": "threefry2x32", "urbg": "unsafe_rbg"}


def dtype_name(dtype: np.dtype) -> str:
    """The stored name of a supported dtype (any byte order)."""
    name = _NAMES.get(dtype)
    if name is None:
        _fill_tables()
        name = _NAMES.get(dtype) or _NAMES[dtype.newbyteorder("=")]
    return name


def is_supported_dtype(dtype: np.dtype) -> bool:
    # A dict lookup first: this runs once per leaf of every save.
    if dtype in _NAMES:
        return True
    _fill_tables()
    return dtype in _NAMES or (dtype.byteorder == ">" and dtype.newbyteorder("=") in _NAMES)


def dtype_from_name(name: object) -> np.dtype:
    """The dtype for a stored name; ``ValueError`` for anything not in the table."""
    dtype = DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None and isinstance(name, str) and name in ITEMSIZES:
        _fill_tables(ml_dtypes_too=list(ITEMSIZES).index(name) >= _ML_DTYPES_START)
        dtype = DTYPES.get(name)
    if dtype is None:
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def itemsize_of_name(name: object) -> int:
    """The item size of a stored dtype name, without importing NumPy; ``ValueError``
    for anything not in the table."""
    if not isinstance(name, str) or name not in ITEMSIZES:
        raise ValueError(f"unknown dtype {name!r}")
    return ITEMSIZES[name]


def safetensors_layout(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, list[int]]:
    """The (dtype code, shape) under which an array is written in a safetensors file."""
    if dtype not in _NAMES:
        _fill_tables()
    code = SAFETENSORS_CODES.get(_NAMES.get(dtype, ""))
    if code is not None:
        return code, list(shape)
    return "U8", [*shape, dtype.itemsize]


def prng_impl_name(name: object) -> str | None:
    """The stored name of a PRNG implementation given by its name or its tag (``"fry"``
    from older jax); ``None`` when it is none of jax's built-in ones."""
    name = _PRNG_TAGS.get(name, name) if isinstance(name, str) else None
    return name if name in PRNG_IMPLS else None
