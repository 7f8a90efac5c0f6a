"""The save policy as pure decisions (``_policy``): what is due at a step, what beats the
best, what retention removes, and the argument checks. No disk, no Checkpointer."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from learnax.checkpoint import _policy


@pytest.mark.parametrize(
    ("step", "every", "due"),
    [(0, 5, True), (5, 5, True), (7, 5, False), (10, None, False), (3, 1, True)],
)
def test_a_step_is_due_when_the_interval_divides_it(step, every, due):
    assert _policy.is_due(step, every) is due


@pytest.mark.parametrize("minimize", [True, False])
def test_nan_is_never_better_than_any_best(minimize):
    for best in (math.inf, -math.inf, 0.0, math.nan):
        assert not _policy.is_better(math.nan, best, minimize)


def test_better_is_strict_in_the_metric_direction():
    assert _policy.is_better(0.5, 1.0, minimize=True)
    assert not _policy.is_better(1.0, 1.0, minimize=True)
    assert _policy.is_better(2.0, 1.0, minimize=False)
    assert not _policy.is_better(0.5, 1.0, minimize=False)


def test_any_finite_value_beats_the_initial_best():
    assert _policy.is_better(1e300, _policy.initial_best(True), True)
    assert _policy.is_better(-1e300, _policy.initial_best(False), False)


def test_retention_removes_the_oldest_beyond_max_to_keep():
    assert _policy.retention_victims([30, 10, 20, 40], 2, None) == [10, 20]
    assert _policy.retention_victims([10, 20], 5, None) == []
    assert _policy.retention_victims([10, 20, 30], None, None) == []


def test_retention_keeps_multiples_of_keep_period_without_counting_them():
    # 100 and 200 are kept forever and do not count: of 150, 250, 350 the newest stays.
    assert _policy.retention_victims([100, 150, 200, 250, 350], 1, 100) == [150, 250]


@given(
    steps=st.sets(st.integers(0, 10_000), max_size=40),
    keep=st.one_of(st.none(), st.integers(1, 10)),
    period=st.one_of(st.none(), st.integers(1, 500)),
)
def test_retention_never_removes_a_kept_period_or_one_of_the_newest(steps, keep, period):
    steps = sorted(steps)
    victims = _policy.retention_victims(steps, keep, period)
    assert set(victims) <= set(steps)
    counted = [s for s in steps if not (period and s % period == 0)]
    if keep is None:
        assert victims == []
    else:
        assert sorted(set(counted) - set(victims)) == counted[-keep:]
    assert not any(period and s % period == 0 for s in victims)


@pytest.mark.parametrize("step", [3, np.int64(3), np.array(3), jnp.asarray(3, jnp.int32)])
def test_a_step_may_be_any_integer_scalar(step):
    assert _policy.as_step(step) == 3
    assert type(_policy.as_step(step)) is int


@pytest.mark.parametrize("step", [True, 3.0, "3", np.array([3]), np.array(3.0), None])
def test_a_step_of_another_kind_is_a_type_error(step):
    with pytest.raises(TypeError, match="step must be an integer"):
        _policy.as_step(step)


def test_a_negative_step_is_a_value_error():
    with pytest.raises(ValueError, match=">= 0"):
        _policy.as_step(-1)


def test_the_step_comes_from_the_state_when_not_given():
    class State:
        step = 12

    assert _policy.step_of(State(), None) == 12
    assert _policy.step_of({"step": 4}, None) == 4
    assert _policy.step_of({"step": 4}, 9) == 9
    with pytest.raises(ValueError, match="pass step="):
        _policy.step_of({"w": 1}, None)


@pytest.mark.parametrize(("value", "expected"), [(None, None), (0, None), (7, 7), (np.int32(7), 7)])
def test_intervals_of_none_or_zero_mean_never(value, expected):
    assert _policy.check_interval(value, "save_every") == expected


@pytest.mark.parametrize(
    ("value", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_bad_intervals_raise(value, error):
    with pytest.raises(error, match="save_every"):
        _policy.check_interval(value, "save_every")


@pytest.mark.parametrize(("value", "expected"), [(None, None), (math.inf, None), (3, 3)])
def test_max_to_keep_of_none_or_inf_keeps_all(value, expected):
    assert _policy.check_max_to_keep(value) == expected


@pytest.mark.parametrize("value", [math.nan, 0.0, -1.0, math.inf, True, "1"])
def test_timeouts_must_be_positive_finite_numbers(value):
    with pytest.raises((TypeError, ValueError), match="multihost_timeout"):
        _policy.check_timeout(value, "multihost_timeout")


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), jnp.asarray(0.5), np.array(2)])
def test_metric_values_are_any_real_scalar(value):
    assert _policy.metric_float(value, "val/loss") == float(np.asarray(value))


@pytest.mark.parametrize("value", ["0.5", True, 1j, None, [0.5], 10**400])
def test_metric_values_of_another_kind_name_the_metric(value):
    with pytest.raises(TypeError, match="val/loss"):
        _policy.metric_float(value, "val/loss")
