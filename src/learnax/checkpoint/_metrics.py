"""Metrics as they are stored in a manifest: scalar numbers only, as JSON values.

Python, numpy and 0-d jax numbers are accepted; non-finite floats are stored the way
the tree encoder stores them (``_tree.encode_float``), so a ``nan`` loss survives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _tree
from ._errors import CheckpointCorruptedError
from ._lazy_import import LazyModule

# Imported on first use (see _lazy_import): listing and showing need none of them.
jax = LazyModule("jax", globals())
np = LazyModule("numpy", globals(), "np")


def encode_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON values; ``TypeError`` naming the metric for anything that is not a
    scalar number (Python, numpy or a 0-d jax array)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of str to number, got {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"Metric name {key!r} must be a str")
        out[key] = _encode_metric(key, value)
    return out


def _encode_metric(key: str, value: Any) -> Any:
    if isinstance(value, bool) or (
        isinstance(value, int) and -_tree._MAX_INT < value < _tree._MAX_INT
    ):
        return value
    if isinstance(value, float):
        return _tree.encode_float(value)
    scalar = python_scalar(value)
    if scalar is not value and isinstance(scalar, (bool, int, float)):
        return _encode_metric(key, scalar)
    raise TypeError(f"Metric {key!r} is {_describe(value)}: metrics must be scalar numbers.")


def _describe(value: Any) -> str:
    """What a metric that cannot be stored is, for its error message."""
    if isinstance(value, int):
        return f"an int too large to store ({value.bit_length()} bits)"
    if hasattr(value, "shape"):
        return f"a {type(value).__name__} of shape {tuple(np.shape(value))}"
    return f"a {type(value).__name__}"


def python_scalar(value: Any) -> Any:
    """A 0-d numpy or jax array (a metric computed in jax) as its Python scalar;
    anything else as it is."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.shape(value) == ():
        return np.asarray(value).item()
    return value


def decode_metrics(raw: Any, where: str) -> dict[str, Any]:
    """Stored metrics back as Python numbers; ``CheckpointCorruptedError`` naming
    ``where`` for anything that is not a stored number."""
    if not isinstance(raw, dict):
        raise CheckpointCorruptedError(f"{where}: 'metrics' is not an object")
    out = {}
    for key, value in raw.items():
        if isinstance(value, (bool, int)):
            out[key] = value
        else:
            try:
                out[key] = _tree.decode_float(value, f"{where}: metric {key!r}")
            except ValueError as e:
                raise CheckpointCorruptedError(str(e)) from None
    return out
