"""The best value: NaN is never one, infinities are, and a stored value is carried over
a restart only when it is a real best of the same metric in the same direction."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from helpers import learnax_errors, read_manifest_file, rewrite_manifest, small_state


def _best_path(ckpt) -> Path:
    return Path(ckpt.checkpoint_dir) / "state_best"


@pytest.mark.parametrize("minimize", [True, False])
def test_best_saved_by_hand_with_nan_metric_is_saved_but_is_not_the_best_value(
    make_checkpointer, minimize
):
    ckpt = make_checkpointer(keep_best=True, minimize_metric=minimize)
    before = ckpt.best_metric_value
    path = ckpt.save_checkpoint(small_state(), 3, metrics={"val/loss": math.nan}, is_best=True)
    assert Path(path) == _best_path(ckpt)
    assert ckpt.load_best()["step"] == 3
    assert ckpt.best_metric_value == before


def test_best_saved_by_hand_with_nan_metric_keeps_the_earlier_best_value(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(1), 0.5, step=1)
    ckpt.save_checkpoint(small_state(2), 2, metrics={"val/loss": math.nan}, is_best=True)
    assert ckpt.best_metric_value == 0.5


def test_a_later_better_value_is_saved_after_a_nan_best_by_hand(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True, save_every=None, checkpoint_every=None)
    ckpt.save_checkpoint(small_state(1), 1, metrics={"val/loss": math.nan}, is_best=True)
    assert ckpt.update_best_checkpoint(small_state(2), 0.7, step=2) is True
    assert ckpt.maybe_save_checkpoints(small_state(3), 3, {"val/loss": 0.6}) == {
        "best": str(_best_path(ckpt))
    }
    assert ckpt.best_metric_value == 0.6
    assert ckpt.load_best()["step"] == 3


def test_a_nan_best_by_hand_with_async_save_does_not_block_later_bests(make_checkpointer):
    with make_checkpointer(keep_best=True, async_save=True) as ckpt:
        ckpt.save_checkpoint(small_state(1), 1, metrics={"val/loss": math.nan}, is_best=True)
        assert ckpt.update_best_checkpoint(small_state(2), 0.7, step=2) is True
        ckpt.wait_until_finished()
        assert ckpt.best_metric_value == 0.7


def test_restart_after_a_nan_best_by_hand_does_not_read_nan_back(make_checkpointer):
    first = make_checkpointer(keep_best=True)
    first.save_checkpoint(small_state(1), 1, metrics={"val/loss": math.nan}, is_best=True)
    first.close()

    restarted = make_checkpointer(keep_best=True)
    assert restarted.best_metric_value == math.inf
    assert restarted.update_best_checkpoint(small_state(2), 0.9, step=2) is True
    assert restarted.load_best()["step"] == 2


def test_nan_best_by_hand_stores_no_best_record(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    ckpt.save_checkpoint(small_state(1), 1, metrics={"val/loss": math.nan}, is_best=True)
    text, start, end = read_manifest_file(_best_path(ckpt))
    manifest = json.loads(text[start:end])
    assert "best" not in manifest
    assert math.isnan(ckpt.load_best()["metrics"]["val/loss"])


def test_a_stored_nan_best_record_is_ignored_with_a_warning(make_checkpointer, caplog):
    first = make_checkpointer(keep_best=True)
    first.update_best_checkpoint(small_state(1), 0.25, step=1)
    first.close()
    rewrite_manifest(_best_path(first), lambda m: m["best"].update(value="NaN"))

    with caplog.at_level(logging.WARNING, logger="learnax"):
        restarted = make_checkpointer(keep_best=True)
    assert restarted.best_metric_value == math.inf
    assert any("NaN" in r.getMessage() for r in learnax_errors(caplog))
    assert restarted.update_best_checkpoint(small_state(2), 0.9, step=2) is True


@pytest.mark.parametrize("minimize", [True, False])
@pytest.mark.parametrize("value", [math.inf, -math.inf])
def test_an_infinite_best_by_hand_is_the_best_value_now_and_after_a_restart(
    make_checkpointer, minimize, value
):
    first = make_checkpointer(keep_best=True, minimize_metric=minimize)
    first.save_checkpoint(small_state(1), 1, metrics={"val/loss": value}, is_best=True)
    assert first.best_metric_value == value
    first.close()

    restarted = make_checkpointer(keep_best=True, minimize_metric=minimize)
    assert restarted.best_metric_value == value
    # A finite value beats the worst infinity and never the best one.
    worst = math.inf if minimize else -math.inf
    assert restarted.update_best_checkpoint(small_state(2), 0.5, step=2) is (value == worst)


def test_a_best_chosen_in_the_other_direction_is_not_carried_over(make_checkpointer, caplog):
    first = make_checkpointer(keep_best=True, minimize_metric=False)
    first.update_best_checkpoint(small_state(1), 0.9, step=1)
    first.close()

    with caplog.at_level(logging.WARNING, logger="learnax"):
        restarted = make_checkpointer(keep_best=True, minimize_metric=True)
    assert restarted.best_metric_value == math.inf
    assert any("minimize" in r.getMessage() for r in learnax_errors(caplog))
