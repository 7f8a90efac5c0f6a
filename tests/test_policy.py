"""The policy: where checkpoints live, when they are saved, which are kept, which is best."""

from __future__ import annotations

import inspect
import math
import os
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_equal, small_state

from learnax.checkpoint import Checkpointer, RunIdWarning


class TrainState(NamedTuple):
    params: dict
    step: object


def state_dirs(ckpt: Checkpointer) -> set[str]:
    return {n for n in os.listdir(ckpt.checkpoint_dir) if n.startswith("state_")}


# --- construction -----------------------------------------------------------------


def test_checkpoint_dir_is_registry_run_id_checkpoints_and_is_created(tmp_path):
    registry = tmp_path / "reg"
    ckpt = Checkpointer(str(registry), "run-1")
    expected = registry / "run-1" / "checkpoints"
    assert Path(ckpt.checkpoint_dir) == expected
    assert expected.is_dir()


@pytest.mark.parametrize("run_id", ["", ".", "..", "a/b", "a\\b"])
def test_run_id_that_is_not_one_path_component_raises_value_error(tmp_path, run_id):
    registry = tmp_path / "reg"
    with pytest.raises(ValueError):
        Checkpointer(str(registry), run_id)
    assert not (tmp_path / "checkpoints").exists()
    assert not (tmp_path / "reg" / "checkpoints").exists()


def test_constructor_defaults_are_those_of_the_seed():
    params = inspect.signature(Checkpointer).parameters
    defaults = {name: p.default for name, p in params.items()}
    assert list(defaults)[:9] == [
        "registry_path",
        "run_id",
        "save_every",
        "checkpoint_every",
        "max_to_keep",
        "keep_best",
        "metric_name",
        "minimize_metric",
        "prepare_fn",
    ]
    assert defaults["save_every"] == 300
    assert defaults["checkpoint_every"] == 5000
    assert defaults["max_to_keep"] is None
    assert defaults["keep_best"] is False
    assert defaults["metric_name"] == "val/loss"
    assert defaults["minimize_metric"] is True
    assert defaults["prepare_fn"] is None


def test_attributes_after_default_construction(registry):
    ckpt = Checkpointer(registry, "run")
    assert ckpt.registry_path == registry
    assert ckpt.run_id == "run"
    assert ckpt.save_every == 300
    assert ckpt.checkpoint_every == 5000
    assert ckpt.max_to_keep is None
    assert ckpt.keep_best is False
    assert ckpt.metric_name == "val/loss"
    assert ckpt.minimize_metric is True
    assert ckpt.best_metric_value == math.inf
    assert callable(ckpt.prepare_fn)


def test_best_metric_value_starts_at_minus_inf_when_maximizing(make_checkpointer):
    ckpt = make_checkpointer(minimize_metric=False)
    assert ckpt.best_metric_value == -math.inf


def test_given_prepare_fn_is_stored_and_applied_before_writing(make_checkpointer):
    def double(state):
        return {"w": state["w"] * 2}

    ckpt = make_checkpointer(prepare_fn=double)
    assert ckpt.prepare_fn is double
    ckpt.save_checkpoint({"w": np.arange(3, dtype=np.float32)}, step=1)
    restored = ckpt.load_checkpoint(1)["state"]
    np.testing.assert_array_equal(restored["w"], np.array([0, 2, 4], np.float32))


@pytest.mark.parametrize("name", ["save_every", "checkpoint_every"])
def test_negative_interval_raises_value_error(make_checkpointer, name):
    with pytest.raises(ValueError):
        make_checkpointer(**{name: -1})


@pytest.mark.parametrize("name", ["save_every", "checkpoint_every"])
def test_non_integer_interval_raises_type_error(make_checkpointer, name):
    with pytest.raises(TypeError):
        make_checkpointer(**{name: 1.5})


@pytest.mark.parametrize("max_to_keep", [0, -1])
def test_max_to_keep_below_one_raises_value_error(make_checkpointer, max_to_keep):
    with pytest.raises(ValueError):
        make_checkpointer(max_to_keep=max_to_keep)


# --- when to save -----------------------------------------------------------------


def test_should_save_latest_is_true_on_multiples_of_save_every(make_checkpointer):
    ckpt = make_checkpointer(save_every=10)
    assert [s for s in range(35) if ckpt.should_save_latest(s)] == [0, 10, 20, 30]


def test_should_save_numbered_is_true_on_multiples_of_checkpoint_every(
    make_checkpointer,
):
    ckpt = make_checkpointer(checkpoint_every=7)
    assert [s for s in range(30) if ckpt.should_save_numbered(s)] == [0, 7, 14, 21, 28]


@pytest.mark.parametrize("interval", [None, 0])
def test_interval_none_or_zero_never_saves(make_checkpointer, interval):
    ckpt = make_checkpointer(save_every=interval, checkpoint_every=interval)
    assert not any(ckpt.should_save_latest(s) for s in range(20))
    assert not any(ckpt.should_save_numbered(s) for s in range(20))


@pytest.mark.parametrize("interval", [None, 0])
def test_maybe_save_checkpoints_with_disabled_intervals_saves_nothing(make_checkpointer, interval):
    ckpt = make_checkpointer(save_every=interval, checkpoint_every=interval)
    for step in range(5):
        assert ckpt.maybe_save_checkpoints(small_state(), step) == {}
    assert ckpt.list_available_checkpoints() == {}


def test_maybe_save_checkpoints_reports_what_was_saved_each_step(make_checkpointer):
    ckpt = make_checkpointer(save_every=2, checkpoint_every=4)
    keys_per_step = {}
    for step in range(1, 9):
        saved = ckpt.maybe_save_checkpoints(small_state(step), step)
        keys_per_step[step] = set(saved)
        for path in saved.values():
            assert os.path.isdir(path)
    assert keys_per_step == {
        1: set(),
        2: {"latest"},
        3: set(),
        4: {"latest", "numbered"},
        5: set(),
        6: {"latest"},
        7: set(),
        8: {"latest", "numbered"},
    }


def test_maybe_save_checkpoints_paths_are_the_checkpoint_directories(
    make_checkpointer,
):
    ckpt = make_checkpointer(save_every=5, checkpoint_every=5)
    saved = ckpt.maybe_save_checkpoints(small_state(), 5)
    assert Path(saved["latest"]) == Path(ckpt.checkpoint_dir) / "state_latest"
    assert Path(saved["numbered"]) == Path(ckpt.checkpoint_dir) / "state_5"


def test_maybe_save_checkpoints_saves_best_when_metric_improves(make_checkpointer):
    ckpt = make_checkpointer(save_every=100, checkpoint_every=100, keep_best=True)
    first = ckpt.maybe_save_checkpoints(small_state(1), 1, {"val/loss": 0.5})
    assert set(first) == {"best"}
    assert Path(first["best"]) == Path(ckpt.checkpoint_dir) / "state_best"
    worse = ckpt.maybe_save_checkpoints(small_state(2), 2, {"val/loss": 0.7})
    assert worse == {}
    better = ckpt.maybe_save_checkpoints(small_state(3), 3, {"val/loss": 0.2})
    assert set(better) == {"best"}
    best = ckpt.load_best()
    assert best["step"] == 3
    assert best["metrics"]["val/loss"] == 0.2
    assert_tree_equal(small_state(3), best["state"])


def test_maybe_save_checkpoints_ignores_metrics_without_the_metric_name(
    make_checkpointer,
):
    ckpt = make_checkpointer(save_every=100, checkpoint_every=100, keep_best=True)
    assert ckpt.maybe_save_checkpoints(small_state(), 1, {"train/loss": 0.1}) == {}
    assert ckpt.load_best() is None


def test_saved_metrics_are_stored_with_latest_and_numbered(make_checkpointer):
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1)
    ckpt.maybe_save_checkpoints(small_state(), 3, {"train/loss": 1.25})
    assert ckpt.load_checkpoint("latest")["metrics"] == {"train/loss": 1.25}
    assert ckpt.load_checkpoint(3)["metrics"] == {"train/loss": 1.25}


# --- retention --------------------------------------------------------------------


def test_max_to_keep_deletes_oldest_numbered_checkpoints_first(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=10, max_to_keep=2)
    for step in range(10, 60, 10):
        ckpt.maybe_save_checkpoints(small_state(step), step)
    assert state_dirs(ckpt) == {"state_40", "state_50"}
    assert ckpt.load_checkpoint(30) is None
    assert_tree_equal(small_state(40), ckpt.load_checkpoint(40)["state"])


def test_retention_never_deletes_latest_or_best(make_checkpointer):
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1, max_to_keep=1, keep_best=True)
    ckpt.maybe_save_checkpoints(small_state(1), 1, {"val/loss": 0.1})
    for step in range(2, 6):
        ckpt.maybe_save_checkpoints(small_state(step), step, {"val/loss": 1.0})
    assert state_dirs(ckpt) == {"state_latest", "state_best", "state_5"}
    assert ckpt.load_best()["step"] == 1
    assert ckpt.load_latest()["step"] == 5


@pytest.mark.parametrize("max_to_keep", [None, float("inf")])
def test_max_to_keep_none_or_inf_keeps_every_numbered_checkpoint(make_checkpointer, max_to_keep):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=max_to_keep)
    for step in range(1, 8):
        ckpt.maybe_save_checkpoints(small_state(), step)
    assert state_dirs(ckpt) == {f"state_{s}" for s in range(1, 8)}


# --- best checkpoint --------------------------------------------------------------


def test_update_best_requires_a_strictly_better_value(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(1), 0.5, step=1) is True
    assert ckpt.update_best_checkpoint(small_state(2), 0.5, step=2) is False
    assert ckpt.best_metric_value == 0.5
    assert ckpt.load_best()["step"] == 1


def test_update_best_when_minimizing_accepts_lower_values_only(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    results = [
        ckpt.update_best_checkpoint(small_state(i), value, step=i)
        for i, value in enumerate([3.0, 2.0, 2.5, 1.0], start=1)
    ]
    assert results == [True, True, False, True]
    assert ckpt.best_metric_value == 1.0
    assert ckpt.load_best()["step"] == 4


def test_update_best_when_maximizing_accepts_higher_values_only(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True, minimize_metric=False, metric_name="acc")
    results = [
        ckpt.update_best_checkpoint(small_state(i), value, step=i)
        for i, value in enumerate([0.5, 0.7, 0.6, 0.9], start=1)
    ]
    assert results == [True, True, False, True]
    assert ckpt.best_metric_value == 0.9
    best = ckpt.load_best()
    assert best["step"] == 4
    assert best["metrics"]["acc"] == 0.9


@pytest.mark.parametrize("minimize", [True, False])
def test_nan_metric_is_never_better(make_checkpointer, minimize):
    ckpt = make_checkpointer(keep_best=True, minimize_metric=minimize)
    assert ckpt.update_best_checkpoint(small_state(), math.nan, step=1) is False
    assert ckpt.load_best() is None
    assert ckpt.update_best_checkpoint(small_state(), 1.0, step=2) is True
    assert ckpt.update_best_checkpoint(small_state(), math.nan, step=3) is False
    assert ckpt.best_metric_value == 1.0
    assert ckpt.load_best()["step"] == 2


def test_keep_best_false_never_saves_best(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_best=False)
    assert ckpt.update_best_checkpoint(small_state(), 0.1, step=1) is False
    assert ckpt.maybe_save_checkpoints(small_state(), 2, {"val/loss": 0.01}) == {}
    assert ckpt.load_best() is None
    assert state_dirs(ckpt) == set()


def test_restarted_checkpointer_picks_up_the_stored_best_value(make_checkpointer):
    first = make_checkpointer(keep_best=True)
    first.update_best_checkpoint(small_state(1), 0.25, step=10)
    del first

    restarted = make_checkpointer(keep_best=True)
    assert restarted.best_metric_value == 0.25


def test_worse_metric_after_restart_does_not_overwrite_best(make_checkpointer):
    first = make_checkpointer(keep_best=True)
    first.update_best_checkpoint(small_state(1), 0.25, step=10)
    del first

    restarted = make_checkpointer(keep_best=True)
    assert restarted.update_best_checkpoint(small_state(2), 0.5, step=20) is False
    best = restarted.load_best()
    assert best["step"] == 10
    assert_tree_equal(small_state(1), best["state"])


# --- listing ----------------------------------------------------------------------


def test_list_available_checkpoints_is_empty_for_a_new_run(make_checkpointer):
    assert make_checkpointer().list_available_checkpoints() == {}


def test_list_available_checkpoints_names_latest_best_and_numbered_in_step_order(
    make_checkpointer,
):
    ckpt = make_checkpointer(keep_best=True)
    for step in (100, 2, 10):
        ckpt.save_checkpoint(small_state(), step=step)
    ckpt.save_latest(small_state(), step=100)
    ckpt.update_best_checkpoint(small_state(), 0.5, step=10)

    listing = ckpt.list_available_checkpoints()
    assert set(listing) == {"latest", "best", "step_2", "step_10", "step_100"}
    numbered = [k for k in listing if k.startswith("step_")]
    assert numbered == ["step_2", "step_10", "step_100"]
    root = Path(ckpt.checkpoint_dir)
    assert Path(listing["latest"]) == root / "state_latest"
    assert Path(listing["best"]) == root / "state_best"
    assert Path(listing["step_10"]) == root / "state_10"


def test_listed_paths_equal_the_paths_returned_by_saves(make_checkpointer):
    ckpt = make_checkpointer()
    numbered = ckpt.save_checkpoint(small_state(), step=7)
    latest = ckpt.save_latest(small_state(), step=7)
    assert ckpt.list_available_checkpoints() == {"latest": latest, "step_7": numbered}


# --- naming and step --------------------------------------------------------------


def test_save_checkpoint_with_step_writes_a_numbered_checkpoint(make_checkpointer):
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(small_state(), step=1000)
    assert Path(path) == Path(ckpt.checkpoint_dir) / "state_1000"
    assert ckpt.load_checkpoint(1000)["step"] == 1000


def test_save_checkpoint_is_best_writes_state_best(make_checkpointer):
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(small_state(), step=5, is_best=True)
    assert Path(path) == Path(ckpt.checkpoint_dir) / "state_best"
    assert "step_5" not in ckpt.list_available_checkpoints()
    assert ckpt.load_best()["step"] == 5


def test_save_checkpoint_suffix_names_the_checkpoint_and_wins_over_is_best(
    make_checkpointer,
):
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(small_state(), step=5, is_best=True, suffix="warmup")
    assert Path(path) == Path(ckpt.checkpoint_dir) / "state_warmup"
    assert ckpt.load_best() is None
    assert ckpt.load_checkpoint("warmup")["step"] == 5


def test_save_latest_writes_state_latest(make_checkpointer):
    ckpt = make_checkpointer()
    path = ckpt.save_latest(small_state(3), step=3, metrics={"loss": 2.0})
    assert Path(path) == Path(ckpt.checkpoint_dir) / "state_latest"
    loaded = ckpt.load_latest()
    assert loaded["step"] == 3
    assert loaded["metrics"] == {"loss": 2.0}
    assert_tree_equal(small_state(3), loaded["state"])


def test_save_latest_overwrites_the_previous_latest(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_latest(small_state(1), step=1)
    ckpt.save_latest(small_state(2), step=2)
    loaded = ckpt.load_latest()
    assert loaded["step"] == 2
    assert_tree_equal(small_state(2), loaded["state"])


def test_step_is_taken_from_train_state_step_when_not_given(make_checkpointer):
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(TrainState(params=small_state()["params"], step=42))
    assert Path(path) == Path(ckpt.checkpoint_dir) / "state_42"
    assert ckpt.load_checkpoint(42)["step"] == 42


def test_step_may_be_a_jax_scalar_on_the_train_state(make_checkpointer):
    ckpt = make_checkpointer()
    state = TrainState(params=small_state()["params"], step=jnp.asarray(17))
    path = ckpt.save_checkpoint(state)
    assert Path(path) == Path(ckpt.checkpoint_dir) / "state_17"
    loaded = ckpt.load_checkpoint(17)
    assert loaded["step"] == 17
    assert isinstance(loaded["step"], int)


@pytest.mark.parametrize("step", [-1, 1.5, True, "3"])
def test_bad_step_raises(make_checkpointer, step):
    ckpt = make_checkpointer()
    with pytest.raises((ValueError, TypeError)):
        ckpt.save_checkpoint(small_state(), step=step)
    assert ckpt.list_available_checkpoints() == {}


def test_missing_step_without_train_state_step_raises(make_checkpointer):
    ckpt = make_checkpointer()
    with pytest.raises((ValueError, TypeError)):
        ckpt.save_checkpoint(small_state())
    assert ckpt.list_available_checkpoints() == {}


# --- which checkpoint a load returns ----------------------------------------------


def test_load_checkpoint_accepts_step_name_and_path(make_checkpointer):
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(small_state(1000), step=1000)
    for key in (1000, "1000", "state_1000", path):
        loaded = ckpt.load_checkpoint(key)
        assert loaded["step"] == 1000, key
        assert_tree_equal(small_state(1000), loaded["state"])


def test_load_checkpoint_by_name_latest_and_best(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_latest(small_state(1), step=1)
    ckpt.save_checkpoint(small_state(2), step=2, is_best=True)
    assert ckpt.load_checkpoint("latest")["step"] == 1
    assert ckpt.load_checkpoint("best")["step"] == 2


def test_load_checkpoint_int_finds_latest_with_that_step(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_latest(small_state(), step=300)
    assert ckpt.load_checkpoint(300)["step"] == 300


def test_load_checkpoint_minus_one_is_load_latest(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(5), step=5)
    ckpt.save_latest(small_state(7), step=7)
    assert ckpt.load_checkpoint(-1)["step"] == 7
    assert_tree_equal(small_state(7), ckpt.load_checkpoint(-1)["state"])


def test_load_latest_returns_the_highest_step_among_latest_and_numbered(
    make_checkpointer,
):
    ckpt = make_checkpointer()
    ckpt.save_latest(small_state(10), step=10)
    ckpt.save_checkpoint(small_state(20), step=20)
    loaded = ckpt.load_latest()
    assert loaded["step"] == 20
    assert_tree_equal(small_state(20), loaded["state"])


def test_load_latest_prefers_state_latest_when_it_is_newest(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(20), step=20)
    ckpt.save_latest(small_state(30), step=30)
    assert ckpt.load_latest()["step"] == 30


def test_load_latest_ignores_best(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    ckpt.save_checkpoint(small_state(), step=3)
    ckpt.update_best_checkpoint(small_state(), 0.1, step=9)
    assert ckpt.load_latest()["step"] == 3


def test_a_new_checkpointer_loads_what_an_earlier_one_saved(make_checkpointer):
    make_checkpointer().save_checkpoint(small_state(4), step=4)
    loaded = make_checkpointer().load_latest()
    assert loaded["step"] == 4
    assert_tree_equal(small_state(4), loaded["state"])


def test_runs_in_one_registry_are_separate(make_checkpointer):
    make_checkpointer("run-a").save_checkpoint(small_state(), step=1)
    # run-b has no checkpoints and a run of a close name has: the mistyped-run-id hint.
    with pytest.warns(RunIdWarning, match="did you mean 'run-a'"):
        assert make_checkpointer("run-b").load_latest() is None


def test_best_value_is_picked_up_from_a_best_saved_by_hand(make_checkpointer):
    """A state_best written with save_checkpoint(is_best=True) carries its metric in
    `metrics`; a restarted Checkpointer starts from that value."""
    first = make_checkpointer(keep_best=True)
    first.save_checkpoint({"w": np.zeros(2)}, step=5, metrics={"val/loss": 0.25}, is_best=True)
    restarted = make_checkpointer(keep_best=True)
    assert restarted.best_metric_value == 0.25
    assert not restarted.update_best_checkpoint({"w": np.ones(2)}, 0.5, step=6)
    assert restarted.load_best()["step"] == 5


def test_best_saved_by_hand_is_the_best_to_beat(make_checkpointer):
    """save_checkpoint(is_best=True) with the metric in `metrics` sets
    best_metric_value, as a restarted process would read it: a worse value does not
    replace that best."""
    ckpt = make_checkpointer(keep_best=True)
    ckpt.save_checkpoint({"w": np.zeros(2)}, step=1, metrics={"val/loss": 0.1}, is_best=True)
    assert ckpt.best_metric_value == 0.1
    assert not ckpt.update_best_checkpoint({"w": np.ones(2)}, 0.5, step=2)
    assert ckpt.load_best()["step"] == 1


@pytest.mark.parametrize("suffix", ["100", "0005", "step_5"])
def test_suffix_that_would_pass_for_a_numbered_checkpoint_is_refused(make_checkpointer, suffix):
    ckpt = make_checkpointer()
    with pytest.raises(ValueError, match="numbered"):
        ckpt.save_checkpoint({"w": np.zeros(2)}, step=7, suffix=suffix)
    assert ckpt.list_available_checkpoints() == {}
