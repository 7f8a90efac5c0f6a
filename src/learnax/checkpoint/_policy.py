"""The save policy, as pure decisions without I/O: which checkpoints are due at a step,
whether a metric value beats the best, which values rank among the k best
(``keep_top_k``), which numbered checkpoints retention removes, and the checks of the
arguments these decisions take. Everything here can be tested without a disk, and the
Checkpointer, ``learnax prune`` and the tests share it.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from ._lazy_import import LazyModule
from ._metrics import python_scalar

# Imported on first use (see _lazy_import): listing and showing need none of them.
jax = LazyModule("jax", globals())
np = LazyModule("numpy", globals(), "np")


def is_due(step: int, every: int | None) -> bool:
    """Whether ``step`` is due for a checkpoint kept every ``every`` steps (``None``:
    never)."""
    return bool(every) and step % every == 0


def reports_metric(metrics: Mapping[str, Any] | None, metric_name: str) -> bool:
    """Whether ``metrics`` holds a value of the metric that decides the best."""
    return bool(metrics) and metric_name in metrics


def initial_best(minimize: bool) -> float:
    """The best value before any: the worst there is."""
    return math.inf if minimize else -math.inf


def is_better(value: float, best: float, minimize: bool) -> bool:
    """Whether ``value`` is strictly better than ``best``; NaN never is."""
    if math.isnan(value):
        return False
    return value < best if minimize else value > best


def top_k_steps(values: Mapping[int, float], k: int, minimize: bool) -> set[int]:
    """The steps of the ``k`` best ``values`` (step -> metric value). NaN never ranks; of
    equal values the earlier step ranks first (a later one must be strictly better)."""
    ranked = sorted(
        (v if minimize else -v, step) for step, v in values.items() if not math.isnan(v)
    )
    return {step for _, step in ranked[:k]}


def ranks_in_top_k(
    value: float, step: int, values: Mapping[int, float], k: int, minimize: bool
) -> bool:
    """Whether a checkpoint of ``value`` at ``step`` would be among the ``k`` best of
    ``values`` (whose own entry for ``step``, if any, it replaces)."""
    return not math.isnan(value) and step in top_k_steps({**values, step: value}, k, minimize)


def keeps_newest(max_to_keep: int | None, keep_top_k: int | None) -> bool:
    """Whether retention keeps the newest numbered checkpoint: always, unless only the
    ``keep_top_k`` best are kept (``max_to_keep=None`` beside ``keep_top_k``)."""
    return max_to_keep is not None or keep_top_k is None


def retention_victims(
    steps: list[int],
    max_to_keep: int | None,
    keep_period: int | None,
    top_k: Collection[int] | None = None,
) -> list[int]:
    """The numbered steps that retention deletes. Kept: the newest ``max_to_keep``
    (``None``: all, or none when ``top_k`` is given), the steps in ``top_k`` (the k
    best by the metric, when ranked) and the multiples of ``keep_period`` (those do not
    count toward ``max_to_keep``)."""
    if max_to_keep is None and top_k is None:
        return []
    counted = sorted(s for s in steps if not (keep_period and s % keep_period == 0))
    older = counted[: max(len(counted) - max_to_keep, 0)] if max_to_keep is not None else counted
    return [s for s in older if top_k is None or s not in top_k]


# --------------------------------------------------------------------------- checks


def check_interval(value: Any, name: str) -> int | None:
    """An interval in steps: a positive int, or ``None`` for never (0 too)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 or None: never), got {value}")
    return int(value) or None


def check_max_to_keep(value: Any) -> int | None:
    """How many numbered checkpoints to keep: an int >= 1, or ``None`` for all (inf too)."""
    if value is None or value == math.inf:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"max_to_keep must be a positive int, None or inf, got {value!r}")
    if value < 1:
        raise ValueError(
            f"max_to_keep must be >= 1 (None or inf: keep all), got {value}; to save no "
            "numbered checkpoints, pass checkpoint_every=None"
        )
    return int(value)


def check_top_k(value: Any, metric_name: Any) -> int | None:
    """How many of the best numbered checkpoints to keep: an int >= 1 ranked by
    ``metric_name`` (which must then name a metric), or ``None`` for no ranking."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"keep_top_k must be a positive int or None, got {value!r}")
    if value < 1:
        raise ValueError(
            f"keep_top_k must be >= 1 (None: rank nothing), got {value}; to keep only "
            "state_best, pass keep_best=True"
        )
    if not isinstance(metric_name, str) or not metric_name:
        raise ValueError(
            f"keep_top_k={value} ranks numbered checkpoints by metric_name, which is "
            f"{metric_name!r}: pass the key of the metric in maybe_save_checkpoints' "
            "metrics, e.g. metric_name='val/loss'"
        )
    return int(value)


def check_timeout(value: Any, name: str) -> float:
    """A number of seconds, > 0 and finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be > 0 and finite, got {value}")
    return float(value)


def as_step(step: Any) -> int:
    """A step as a Python int >= 0: from an int, a NumPy integer or an integer 0-d
    (jax or NumPy) array; anything else is a ``TypeError``."""
    if type(step) is int:  # the per-step fast path
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step
    if isinstance(step, (bool, np.bool_)) or not (
        isinstance(step, (int, np.integer))
        or (
            isinstance(step, (np.ndarray, jax.Array))
            and step.shape == ()
            and np.issubdtype(step.dtype, np.integer)
        )
    ):
        raise TypeError(f"step must be an integer, got {step!r}")
    return as_step(int(step))


def step_of(train_state: Any, step: Any) -> int:
    """``step``, or when it is ``None`` the state's own ``step`` field (an attribute, or
    a key of a dict state)."""
    if step is None:
        step = getattr(train_state, "step", None)
        if step is None and isinstance(train_state, dict):
            step = train_state.get("step")
        if step is None:
            raise ValueError("No step given and the train state has no 'step' field; pass step=.")
    return as_step(step)


def metric_float(value: Any, name: str) -> float:
    """A metric value as a float to compare, else a ``TypeError`` naming the metric."""
    value = python_scalar(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            pass
    raise TypeError(f"Metric {name!r} must be a real scalar number to compare, got {value!r:.80}")
