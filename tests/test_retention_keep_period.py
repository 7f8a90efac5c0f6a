"""``keep_period``: numbered checkpoints whose step is a multiple of it are never
deleted by retention and do not count toward ``max_to_keep``."""

from __future__ import annotations

import inspect

import pytest
from helpers import assert_tree_equal, numbered_steps, small_state

from learnax.checkpoint import Checkpointer


def save_steps(ckpt, steps) -> None:
    for step in steps:
        ckpt.maybe_save_checkpoints(small_state(step), step)


def test_period_steps_are_kept_besides_the_max_to_keep_newest(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=2, keep_period=5)
    save_steps(ckpt, range(13))
    assert numbered_steps(ckpt) == [0, 5, 10, 11, 12]


def test_period_steps_do_not_count_toward_max_to_keep(make_checkpointer):
    # Steps 0, 2 and 4 are kept for the period; max_to_keep=1 still keeps step 5,
    # the newest of the others, although step 4 is newer than step 3.
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=1, keep_period=2)
    save_steps(ckpt, range(6))
    assert numbered_steps(ckpt) == [0, 2, 4, 5]


def test_kept_period_checkpoints_load_what_was_saved(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=2, keep_period=5)
    save_steps(ckpt, range(13))
    for step in (0, 5, 10):
        loaded = ckpt.load_checkpoint(step)
        assert loaded["step"] == step
        assert_tree_equal(small_state(step), loaded["state"])


def test_keep_period_works_with_save_checkpoint_called_directly(make_checkpointer):
    ckpt = make_checkpointer(max_to_keep=2, keep_period=5)
    for step in range(13):
        ckpt.save_checkpoint(small_state(step), step=step)
    assert numbered_steps(ckpt) == [0, 5, 10, 11, 12]


def test_keep_period_works_in_async_mode(make_checkpointer):
    ckpt = make_checkpointer(
        save_every=None, checkpoint_every=1, max_to_keep=2, keep_period=5, async_save=True
    )
    save_steps(ckpt, range(13))
    ckpt.wait_until_finished()
    assert numbered_steps(ckpt) == [0, 5, 10, 11, 12]
    ckpt.close()


def test_keep_period_without_max_to_keep_keeps_everything(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, keep_period=5)
    save_steps(ckpt, range(7))
    assert numbered_steps(ckpt) == list(range(7))


def test_keep_period_leaves_latest_and_best_alone(make_checkpointer):
    ckpt = make_checkpointer(
        save_every=1, checkpoint_every=1, max_to_keep=1, keep_period=5, keep_best=True
    )
    for step in range(7):
        ckpt.maybe_save_checkpoints(small_state(step), step, {"val/loss": 1.0 / (step + 1)})
    listing = ckpt.list_available_checkpoints()
    assert set(listing) == {"latest", "best", "step_0", "step_5", "step_6"}
    assert ckpt.load_latest()["step"] == 6
    assert ckpt.load_best()["step"] == 6


@pytest.mark.parametrize("keep_period", [None, 0])
def test_keep_period_none_or_zero_is_off(make_checkpointer, keep_period):
    ckpt = make_checkpointer(
        save_every=None, checkpoint_every=1, max_to_keep=2, keep_period=keep_period
    )
    save_steps(ckpt, range(13))
    assert numbered_steps(ckpt) == [11, 12]


def test_keep_period_defaults_to_off(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=2)
    save_steps(ckpt, range(13))
    assert numbered_steps(ckpt) == [11, 12]


@pytest.mark.parametrize("keep_period", [-1, -5])
def test_negative_keep_period_raises_value_error(make_checkpointer, keep_period):
    with pytest.raises(ValueError):
        make_checkpointer(keep_period=keep_period)


@pytest.mark.parametrize("keep_period", [2.5, 5.0, "5"])
def test_non_integer_keep_period_raises_type_error(make_checkpointer, keep_period):
    with pytest.raises(TypeError):
        make_checkpointer(keep_period=keep_period)


def test_keep_period_is_keyword_only_and_off_by_default():
    keep_period = inspect.signature(Checkpointer).parameters["keep_period"]
    assert keep_period.kind is inspect.Parameter.KEYWORD_ONLY
    assert keep_period.default is None
