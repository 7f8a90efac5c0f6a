"""The dtypes learnax stores, by name, and their safetensors codes; and the names of
the PRNG key implementations whose key data it stores.

Names read from a file are looked up in a fixed table, never passed to ``np.dtype``:
a crafted file cannot ask for an object array. Dtypes that safetensors has no code for
(int4, the fnuz float8 variants, complex128, ...) are stored as raw bytes (``U8`` with
one more axis of the item size), and the manifest keeps the true dtype.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

_NUMPY_NAMES = (
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
    "complex64",
    "complex128",
)
_ML_DTYPES_NAMES = (
    "bfloat16",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e4m3b11fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn",
    "float6_e2m3fn",
    "float6_e3m2fn",
    "int2",
    "int4",
    "uint2",
    "uint4",
)

DTYPES: dict[str, np.dtype] = {name: np.dtype(name) for name in _NUMPY_NAMES}
DTYPES.update(
    {
        name: np.dtype(getattr(ml_dtypes, name))
        for name in _ML_DTYPES_NAMES
        if hasattr(ml_dtypes, name)
    }
)

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


_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}

# The PRNG key implementations a checkpoint may name: jax's built-in ones.
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# Older jax (0.4.30) prints an implementation by its short tag, ``str(key_impl(key))``
# being "fry"; the tags stand for the names above, which is what is stored.
_PRNG_TAGS = {"fry": "threefry2x32", "urbg": "unsafe_rbg"}


def dtype_name(dtype: np.dtype) -> str:
    """The stored name of a supported dtype (any byte order)."""
    name = _NAMES.get(dtype)
    return name if name is not None else _NAMES[dtype.newbyteorder("=")]


def is_supported_dtype(dtype: np.dtype) -> bool:
    # A dict lookup first: this runs once per leaf of every save.
    return dtype in _NAMES or (dtype.byteorder == ">" and dtype.newbyteorder("=") in _NAMES)


def dtype_from_name(name: object) -> np.dtype:
    """The dtype for a stored name; ``ValueError`` for anything not in the table."""
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}")
    return DTYPES[name]


def safetensors_layout(dtype: np.dtype, shape: tuple[int, ...]) -> tuple[str, list[int]]:
    """The (dtype code, shape) under which an array is written in a safetensors file."""
    code = SAFETENSORS_CODES.get(_NAMES.get(dtype, ""))
    if code is not None:
        return code, list(shape)
    return "U8", [*shape, dtype.itemsize]


def prng_impl_name(name: object) -> str | None:
    """The stored name of a PRNG implementation given by its name or its tag (``"fry"``
    from older jax); ``None`` when it is none of jax's built-in ones."""
    name = _PRNG_TAGS.get(name, name) if isinstance(name, str) else None
    return name if name in PRNG_IMPLS else None
