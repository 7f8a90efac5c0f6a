"""``async_save=True``: a save returns once the state is snapshotted and the write goes
on in one background thread. What lands on disk is what a synchronous save of the
same state would write; the caller may change or delete the state as soon as the call
returns; ``wait_until_finished()``, ``close()``, ``with`` and interpreter exit flush the
save in flight; a background failure is logged and raised once, later.

No timing assertions here: a state of a few MB makes it likely, not certain, that the
write is still running when the test touches the state again. Where a test needs the
write to be in flight for sure, it stalls the disk of the background thread."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import assert_tree_equal, learnax_errors, numbered_steps, small_state

import learnax
from learnax.checkpoint import Checkpointer, CheckpointError, CheckpointSaveError

# float32 elements in 4 MB: big enough that the background write takes a while.
FOUR_MB = 1 << 20
# How long a stalled background write waits for the test before it goes on anyway:
# a guard against a hung test, never reached when the library behaves.
STALL_GUARD_S = 30


@pytest.fixture
def make_async(make_checkpointer):
    """``make_async(run_id="run", **kwargs)`` -> an ``async_save=True`` Checkpointer,
    closed when the test ends (so no background write outlives its test)."""
    made = []

    def make(run_id: str = "run", **kwargs) -> Checkpointer:
        ckpt = make_checkpointer(run_id, async_save=True, **kwargs)
        made.append(ckpt)
        return ckpt

    yield make
    for ckpt in made:
        try:
            ckpt.close()
        except CheckpointSaveError:
            pass


def big_numpy_state() -> dict:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal(FOUR_MB, dtype=np.float32).reshape(1024, 1024),
        "b": np.arange(FOUR_MB, dtype=np.float32),
    }


def big_jax_state() -> dict:
    return {
        "w": jax.random.normal(jax.random.key(0), (1024, 1024), jnp.float32),
        "b": jnp.arange(FOUR_MB, dtype=jnp.float32),
    }


def host_copy(state):
    """A NumPy copy of every array leaf: what the checkpoint must hold."""
    return jax.tree.map(np.array, state)


# --- fault injection in the background thread ---------------------------------------


def _in_background() -> bool:
    return threading.current_thread() is not threading.main_thread()


class FullDisk:
    """Once armed, the next call of the patched ``os`` functions from a thread other
    than the main one raises ENOSPC; after that one failure the disk works again."""

    def __init__(self, monkeypatch, names):
        self.failures = 0
        self._armed = False
        self._lock = threading.Lock()
        for name in names:
            if hasattr(os, name):
                monkeypatch.setattr(os, name, self._failing(getattr(os, name)))

    def _failing(self, real):
        def patched(*args, **kwargs):
            if _in_background():
                with self._lock:
                    fire, self._armed = self._armed, False
                    self.failures += fire
                if fire:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)

        return patched

    def fail_next_write(self) -> None:
        self._armed = True


FAULTS = {
    "disk-full-on-fsync": ("fsync", "fdatasync"),
    "disk-full-on-rename": ("replace", "rename"),
}


@pytest.fixture(params=sorted(FAULTS))
def full_disk(request, monkeypatch) -> FullDisk:
    return FullDisk(monkeypatch, FAULTS[request.param])


class StalledDisk:
    """Once stalled, fsync from a background thread blocks until ``release()`` (or,
    should the test never release it, until the guard runs out)."""

    def __init__(self, monkeypatch):
        self.reached = threading.Event()  # a background write got to the disk
        self.guard_expired = False
        self._stalled = False
        self._released = threading.Event()
        for name in ("fsync", "fdatasync"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, self._stalling(getattr(os, name)))

    def _stalling(self, real):
        def patched(*args, **kwargs):
            if self._stalled and _in_background():
                self.reached.set()
                if not self._released.wait(STALL_GUARD_S):
                    self.guard_expired = True
            return real(*args, **kwargs)

        return patched

    def stall(self) -> None:
        self._stalled = True

    def release(self) -> None:
        self._stalled = False
        self._released.set()


@pytest.fixture
def stalled_disk(monkeypatch):
    disk = StalledDisk(monkeypatch)
    yield disk
    disk.release()


# --- the API ------------------------------------------------------------------------


def test_async_save_is_keyword_only_and_off_by_default():
    async_save = inspect.signature(Checkpointer).parameters["async_save"]
    assert async_save.kind is inspect.Parameter.KEYWORD_ONLY
    assert async_save.default is False


def test_checkpoint_save_error_is_a_checkpoint_error():
    assert issubclass(CheckpointSaveError, CheckpointError)


# --- what lands on disk is what a synchronous save writes ---------------------------


def _numpy_state():
    rng = np.random.default_rng(1)
    return {
        "w": rng.standard_normal((64, 32)).astype(np.float32),
        "ids": np.arange(10, dtype=np.int64),
        "scale": np.float32(0.5),
    }


def _jax_state():
    return {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.zeros(4, jnp.int32)}


def _optax_state():
    params = {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}
    return {"params": params, "opt_state": optax.adam(1e-3).init(params)}


def _bfloat16_state():
    return {
        "numpy": np.linspace(0, 1, 8, dtype=np.float32).astype(ml_dtypes.bfloat16),
        "jax": jnp.linspace(0, 1, 8, dtype=jnp.bfloat16),
    }


def _prng_state():
    return {"key": jax.random.key(0), "keys": jax.random.split(jax.random.key(1), 3)}


STATES = {
    "numpy": _numpy_state,
    "jax": _jax_state,
    "optax-namedtuples": _optax_state,
    "bfloat16": _bfloat16_state,
    "prng-keys": _prng_state,
}


@pytest.mark.parametrize("make_state", list(STATES.values()), ids=list(STATES))
def test_async_save_loads_the_same_as_a_sync_save(make_checkpointer, make_async, make_state):
    state = make_state()
    metrics = {"val/loss": 0.25}
    sync = make_checkpointer("sync")
    sync.save_checkpoint(state, step=3, metrics=metrics)
    ckpt = make_async("async")
    ckpt.save_checkpoint(state, step=3, metrics=metrics)
    ckpt.wait_until_finished()

    expected, loaded = sync.load_checkpoint(3), ckpt.load_checkpoint(3)
    assert_tree_equal(expected["state"], loaded["state"])
    assert_tree_equal(state, loaded["state"])
    assert loaded["step"] == expected["step"] == 3
    assert loaded["metrics"] == expected["metrics"]


def test_async_save_returns_the_path_the_checkpoint_will_have(make_async):
    ckpt = make_async()
    numbered = ckpt.save_checkpoint(small_state(), step=7)
    latest = ckpt.save_latest(small_state(), step=7)
    ckpt.wait_until_finished()
    assert ckpt.list_available_checkpoints() == {"latest": latest, "step_7": numbered}


def test_update_best_checkpoint_returns_true_when_the_best_save_is_scheduled(make_async):
    ckpt = make_async(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(), 0.5, step=1) is True
    ckpt.wait_until_finished()
    assert ckpt.load_best()["step"] == 1


def test_unsupported_leaf_raises_type_error_at_the_call(make_async):
    ckpt = make_async()
    with pytest.raises(TypeError, match="bad_leaf"):
        ckpt.save_checkpoint({"bad_leaf": object()}, step=1)
    ckpt.wait_until_finished()
    assert ckpt.list_available_checkpoints() == {}


@pytest.mark.parametrize("step", [-1, 1.5])
def test_bad_step_raises_at_the_call(make_async, step):
    ckpt = make_async()
    with pytest.raises((ValueError, TypeError)):
        ckpt.save_checkpoint(small_state(), step=step)
    ckpt.wait_until_finished()
    assert ckpt.list_available_checkpoints() == {}


# --- the caller may change or delete the state once the call returns ----------------


def test_numpy_arrays_changed_in_place_after_the_call_do_not_change_the_checkpoint(make_async):
    ckpt = make_async()
    state = big_numpy_state()
    expected = host_copy(state)
    ckpt.save_checkpoint(state, step=1)
    state["w"][:] = -1.0
    state["b"] *= 7.0
    ckpt.wait_until_finished()
    assert_tree_equal(expected, ckpt.load_checkpoint(1)["state"])


def test_containers_changed_after_the_call_do_not_change_the_checkpoint(make_async):
    ckpt = make_async()
    state = big_numpy_state()
    expected = host_copy(state)
    ckpt.save_checkpoint(state, step=1)
    state["w"] = np.zeros(3, np.float32)
    del state["b"]
    state["extra"] = np.ones(2, np.float32)
    ckpt.wait_until_finished()
    assert_tree_equal(expected, ckpt.load_checkpoint(1)["state"])


def test_jax_arrays_deleted_after_the_call_are_still_saved(make_async):
    ckpt = make_async()
    state = big_jax_state()
    expected = host_copy(state)
    ckpt.save_checkpoint(state, step=1)
    for leaf in jax.tree.leaves(state):
        leaf.delete()
    ckpt.wait_until_finished()
    assert_tree_equal(expected, ckpt.load_checkpoint(1)["state"])


@functools.partial(jax.jit, donate_argnums=0)
def _donating_train_step(state):
    return jax.tree.map(lambda x: x * 2.0 + 1.0, state)


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_state_donated_to_a_jitted_step_after_the_call_is_saved_as_it_was(make_async):
    ckpt = make_async()
    _donating_train_step(big_jax_state())  # compiled now, so the step below runs at once
    state = big_jax_state()
    expected = host_copy(state)
    ckpt.save_checkpoint(state, step=1)
    state = jax.block_until_ready(_donating_train_step(state))
    ckpt.wait_until_finished()
    assert_tree_equal(expected, ckpt.load_checkpoint(1)["state"])


def test_async_save_leaves_the_callers_jax_arrays_usable(make_async):
    ckpt = make_async()
    state = big_jax_state()
    expected = host_copy(state)
    ckpt.save_checkpoint(state, step=1)
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))
    assert_tree_equal(expected, state)
    ckpt.wait_until_finished()


def test_snapshot_copies_every_leaf_but_never_touches_those_it_is_told_to_skip():
    """The leaves whose data a save takes from an earlier checkpoint's files are not
    read, so not copied (a frozen base stays one copy in memory)."""
    from learnax.checkpoint._background import snapshot
    from learnax.checkpoint._tree import ArrayLeaf

    values = {
        "numpy": np.arange(4.0),
        "small_jax": jnp.arange(4.0),
        "big_jax": jnp.arange(FOUR_MB, dtype=jnp.float32),
    }
    for skipped in values:
        leaves = [ArrayLeaf(name, (), value, "array") for name, value in values.items()]
        snapshot(leaves, skip={skipped})
        for leaf in leaves:
            assert (leaf.value is values[leaf.name]) == (leaf.name == skipped), leaf.name
            np.testing.assert_array_equal(np.asarray(leaf.value), np.asarray(values[leaf.name]))


# --- at most one save in flight -----------------------------------------------------


def test_numbered_saves_in_a_row_all_commit(make_async):
    ckpt = make_async()
    paths = {f"step_{s}": ckpt.save_checkpoint(small_state(s), step=s) for s in range(1, 6)}
    ckpt.wait_until_finished()
    listing = ckpt.list_available_checkpoints()
    assert listing == paths
    assert list(listing) == [f"step_{s}" for s in range(1, 6)]
    for step in range(1, 6):
        assert_tree_equal(small_state(step), ckpt.load_checkpoint(step)["state"])


def test_saves_of_latest_in_a_row_commit_in_call_order(make_async):
    ckpt = make_async()
    for step in range(1, 6):
        ckpt.save_latest(small_state(step), step=step)
    ckpt.wait_until_finished()
    loaded = ckpt.load_checkpoint("latest")
    assert loaded["step"] == 5
    assert_tree_equal(small_state(5), loaded["state"])


def test_load_latest_after_wait_returns_the_last_save(make_async):
    ckpt = make_async()
    for step in range(1, 4):
        ckpt.save_checkpoint(small_state(step), step=step)
    ckpt.save_latest(small_state(4), step=4)
    ckpt.wait_until_finished()
    loaded = ckpt.load_latest()
    assert loaded["step"] == 4
    assert_tree_equal(small_state(4), loaded["state"])


def test_a_checkpoint_still_being_written_is_invisible_to_other_readers(
    make_checkpointer, make_async, stalled_disk
):
    ckpt = make_async()
    first = ckpt.save_checkpoint(small_state(1), step=1)
    ckpt.wait_until_finished()

    stalled_disk.stall()
    second = ckpt.save_checkpoint(small_state(2), step=2)
    assert stalled_disk.reached.wait(STALL_GUARD_S), "the save never reached the disk"
    reader = make_checkpointer()  # e.g. an evaluation job watching the run
    assert reader.list_available_checkpoints() == {"step_1": first}
    assert reader.load_latest()["step"] == 1
    assert not stalled_disk.guard_expired

    stalled_disk.release()
    ckpt.wait_until_finished()
    assert reader.list_available_checkpoints() == {"step_1": first, "step_2": second}
    assert_tree_equal(small_state(2), reader.load_checkpoint(2)["state"])


def test_a_step_with_nothing_due_does_not_wait_for_the_save_in_flight(make_async, stalled_disk):
    ckpt = make_async(save_every=10, checkpoint_every=None)
    stalled_disk.stall()
    saved = ckpt.maybe_save_checkpoints(small_state(0), 0)
    assert stalled_disk.reached.wait(STALL_GUARD_S), "the save never reached the disk"
    assert ckpt.maybe_save_checkpoints(small_state(1), 1) == {}
    # Had the call waited for the save, the stall guard would have run out.
    assert not stalled_disk.guard_expired

    stalled_disk.release()
    ckpt.wait_until_finished()
    assert ckpt.list_available_checkpoints() == {"latest": saved["latest"]}


def test_a_step_reporting_a_metric_that_is_not_better_does_not_wait_for_the_save_in_flight(
    make_async, stalled_disk
):
    """With val/loss reported every step, only a better value saves, and the decision
    is made against the best still being written: the other steps never block."""
    ckpt = make_async(save_every=None, checkpoint_every=None, keep_best=True)
    stalled_disk.stall()
    saved = ckpt.maybe_save_checkpoints(small_state(0), 0, {"val/loss": 0.5})
    assert stalled_disk.reached.wait(STALL_GUARD_S), "the save never reached the disk"
    assert ckpt.maybe_save_checkpoints(small_state(1), 1, {"val/loss": 0.7}) == {}
    assert not stalled_disk.guard_expired

    stalled_disk.release()
    ckpt.wait_until_finished()
    assert ckpt.best_metric_value == 0.5
    assert ckpt.list_available_checkpoints() == {"best": saved["best"]}


def test_wait_until_finished_with_nothing_in_flight_returns_none(make_async):
    ckpt = make_async()
    assert ckpt.wait_until_finished() is None
    ckpt.save_checkpoint(small_state(), step=1)
    assert ckpt.wait_until_finished() is None
    assert ckpt.wait_until_finished() is None


# --- maybe_save_checkpoints ---------------------------------------------------------


def test_maybe_save_checkpoints_reports_what_sync_mode_reports(make_checkpointer, make_async):
    kwargs = {"save_every": 2, "checkpoint_every": 3, "keep_best": True}
    sync = make_checkpointer("sync", **kwargs)
    ckpt = make_async("async", **kwargs)
    losses = [1.0, 0.5, 0.7, 0.2, 0.9, 0.1, 0.3]
    for step, loss in enumerate(losses):
        expected = sync.maybe_save_checkpoints(small_state(step), step, {"val/loss": loss})
        saved = ckpt.maybe_save_checkpoints(small_state(step), step, {"val/loss": loss})
        assert {k: Path(p).name for k, p in saved.items()} == {
            k: Path(p).name for k, p in expected.items()
        }, f"step {step}"
    ckpt.wait_until_finished()
    assert list(ckpt.list_available_checkpoints()) == list(sync.list_available_checkpoints())
    assert ckpt.load_best()["step"] == sync.load_best()["step"] == 5
    assert ckpt.best_metric_value == sync.best_metric_value == 0.1


def test_maybe_save_checkpoints_writes_latest_numbered_and_best_from_one_snapshot(make_async):
    ckpt = make_async(save_every=1, checkpoint_every=1, keep_best=True)
    state = big_numpy_state()
    expected = host_copy(state)
    saved = ckpt.maybe_save_checkpoints(state, 4, {"val/loss": 0.5})
    state["w"][:] = -1.0
    state["b"][:] = -1.0
    assert set(saved) == {"latest", "numbered", "best"}
    ckpt.wait_until_finished()
    for path in saved.values():
        loaded = ckpt.load_checkpoint(path)
        assert loaded["step"] == 4
        assert loaded["metrics"] == {"val/loss": 0.5}
        assert_tree_equal(expected, loaded["state"])


def test_max_to_keep_prunes_the_oldest_numbered_checkpoints(make_async):
    ckpt = make_async(save_every=None, checkpoint_every=1, max_to_keep=2)
    for step in range(6):
        ckpt.maybe_save_checkpoints(small_state(step), step)
    ckpt.wait_until_finished()
    assert numbered_steps(ckpt) == [4, 5]
    assert_tree_equal(small_state(5), ckpt.load_checkpoint(5)["state"])


# --- the best checkpoint ------------------------------------------------------------


def test_best_metric_value_is_the_new_best_once_its_save_committed(make_async):
    ckpt = make_async(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(1), 0.5, step=1) is True
    ckpt.wait_until_finished()
    assert ckpt.best_metric_value == 0.5


def test_a_second_checkpointer_sees_the_best_saved_in_async_mode(make_checkpointer, make_async):
    ckpt = make_async(keep_best=True)
    ckpt.update_best_checkpoint(small_state(1), 0.5, step=1)
    ckpt.wait_until_finished()
    other = make_checkpointer(keep_best=True)
    assert other.best_metric_value == 0.5
    assert other.update_best_checkpoint(small_state(2), 0.7, step=2) is False


def test_a_worse_metric_right_after_a_best_save_does_not_replace_it(make_async):
    ckpt = make_async(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(1), 0.5, step=1) is True
    assert ckpt.update_best_checkpoint(small_state(2), 0.7, step=2) is False
    ckpt.wait_until_finished()
    assert ckpt.best_metric_value == 0.5
    assert ckpt.load_best()["step"] == 1


def test_a_better_metric_right_after_a_best_save_replaces_it(make_async):
    ckpt = make_async(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(1), 0.5, step=1) is True
    assert ckpt.update_best_checkpoint(small_state(2), 0.3, step=2) is True
    ckpt.wait_until_finished()
    assert ckpt.best_metric_value == 0.3
    loaded = ckpt.load_best()
    assert loaded["step"] == 2
    assert_tree_equal(small_state(2), loaded["state"])


# --- background failures ------------------------------------------------------------


def test_background_failure_is_logged_on_the_learnax_logger(make_async, full_disk, caplog):
    ckpt = make_async()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        full_disk.fail_next_write()
        ckpt.save_checkpoint(small_state(1), step=1)
        with pytest.raises(CheckpointSaveError):
            ckpt.wait_until_finished()
    assert full_disk.failures == 1
    assert learnax_errors(caplog)


def test_background_failure_is_raised_from_the_next_wait_until_finished(make_async, full_disk):
    ckpt = make_async()
    full_disk.fail_next_write()
    assert ckpt.save_checkpoint(small_state(1), step=1) is not None
    with pytest.raises(CheckpointSaveError):
        ckpt.wait_until_finished()
    assert full_disk.failures == 1


def test_background_failure_is_raised_from_the_next_save_call(make_async, full_disk):
    ckpt = make_async()
    full_disk.fail_next_write()
    ckpt.save_checkpoint(small_state(1), step=1)
    with pytest.raises(CheckpointSaveError):
        ckpt.save_checkpoint(small_state(2), step=2)
    assert full_disk.failures == 1


def test_background_failure_is_raised_from_the_next_maybe_save_checkpoints_that_saves(
    make_async, full_disk
):
    ckpt = make_async(save_every=2, checkpoint_every=None)
    full_disk.fail_next_write()
    ckpt.maybe_save_checkpoints(small_state(0), 0)
    with pytest.raises(CheckpointSaveError):
        ckpt.maybe_save_checkpoints(small_state(2), 2)


def test_background_failure_is_not_raised_from_a_step_with_nothing_due(make_async, full_disk):
    ckpt = make_async(save_every=2, checkpoint_every=None)
    full_disk.fail_next_write()
    ckpt.maybe_save_checkpoints(small_state(0), 0)
    assert ckpt.maybe_save_checkpoints(small_state(1), 1) == {}
    with pytest.raises(CheckpointSaveError):
        ckpt.wait_until_finished()


def test_background_failure_is_raised_from_close(make_async, full_disk):
    ckpt = make_async()
    full_disk.fail_next_write()
    ckpt.save_checkpoint(small_state(1), step=1)
    with pytest.raises(CheckpointSaveError):
        ckpt.close()


def test_background_failure_is_raised_only_once(make_async, full_disk):
    ckpt = make_async()
    full_disk.fail_next_write()
    ckpt.save_checkpoint(small_state(1), step=1)
    with pytest.raises(CheckpointSaveError):
        ckpt.wait_until_finished()
    assert ckpt.wait_until_finished() is None
    ckpt.close()


def test_background_failure_leaves_earlier_checkpoints_and_lists_no_partial_one(
    make_async, full_disk
):
    ckpt = make_async()
    ckpt.save_checkpoint(small_state(1), step=1)
    ckpt.save_latest(small_state(1), step=1)
    ckpt.wait_until_finished()
    listing = ckpt.list_available_checkpoints()

    full_disk.fail_next_write()
    ckpt.save_checkpoint(small_state(2), step=2)
    with pytest.raises(CheckpointSaveError):
        ckpt.wait_until_finished()

    assert ckpt.list_available_checkpoints() == listing
    assert ckpt.load_checkpoint(2) is None
    assert_tree_equal(small_state(1), ckpt.load_checkpoint(1)["state"])
    assert ckpt.load_latest()["step"] == 1


def test_background_failure_overwriting_latest_keeps_the_previous_latest(make_async, full_disk):
    ckpt = make_async()
    ckpt.save_latest(small_state(1), step=1)
    ckpt.wait_until_finished()

    full_disk.fail_next_write()
    ckpt.save_latest(small_state(2), step=2)
    with pytest.raises(CheckpointSaveError):
        ckpt.wait_until_finished()

    loaded = ckpt.load_latest()
    assert loaded["step"] == 1
    assert_tree_equal(small_state(1), loaded["state"])


def test_save_after_the_background_failure_was_raised_works(make_async, full_disk):
    ckpt = make_async()
    full_disk.fail_next_write()
    ckpt.save_checkpoint(small_state(1), step=1)
    with pytest.raises(CheckpointSaveError):
        ckpt.wait_until_finished()

    path = ckpt.save_checkpoint(small_state(2), step=2)
    ckpt.wait_until_finished()
    assert ckpt.list_available_checkpoints() == {"step_2": path}
    assert_tree_equal(small_state(2), ckpt.load_checkpoint(2)["state"])


def test_save_after_a_save_call_raised_the_background_failure_works(make_async, full_disk):
    ckpt = make_async()
    full_disk.fail_next_write()
    ckpt.save_checkpoint(small_state(1), step=1)
    with pytest.raises(CheckpointSaveError):
        ckpt.save_checkpoint(small_state(2), step=2)

    ckpt.save_checkpoint(small_state(3), step=3)
    ckpt.wait_until_finished()
    assert 1 not in numbered_steps(ckpt)
    assert_tree_equal(small_state(3), ckpt.load_checkpoint(3)["state"])


def test_failed_best_save_does_not_change_best_metric_value(make_async, full_disk):
    ckpt = make_async(keep_best=True)
    ckpt.update_best_checkpoint(small_state(1), 0.5, step=1)
    ckpt.wait_until_finished()

    full_disk.fail_next_write()
    ckpt.update_best_checkpoint(small_state(2), 0.1, step=2)
    with pytest.raises(CheckpointSaveError):
        ckpt.wait_until_finished()
    assert ckpt.best_metric_value == 0.5
    assert ckpt.load_best()["step"] == 1

    assert ckpt.update_best_checkpoint(small_state(3), 0.1, step=3) is True
    ckpt.wait_until_finished()
    assert ckpt.best_metric_value == 0.1


# --- close, with ----------------------------------------------------------------------


def test_close_commits_the_save_in_flight(make_checkpointer):
    ckpt = make_checkpointer(async_save=True)
    state = big_numpy_state()
    path = ckpt.save_checkpoint(state, step=1)
    ckpt.close()
    assert ckpt.list_available_checkpoints() == {"step_1": path}
    assert_tree_equal(state, make_checkpointer().load_checkpoint(1)["state"])


def test_close_twice_is_harmless(make_checkpointer):
    ckpt = make_checkpointer(async_save=True)
    ckpt.save_checkpoint(small_state(), step=1)
    assert ckpt.close() is None
    assert ckpt.close() is None


def test_saves_after_close_are_committed_when_they_return(make_checkpointer):
    ckpt = make_checkpointer(async_save=True)
    ckpt.close()
    path = ckpt.save_checkpoint(small_state(2), step=2)
    assert ckpt.list_available_checkpoints() == {"step_2": path}
    assert_tree_equal(small_state(2), ckpt.load_checkpoint(2)["state"])
    assert ckpt.wait_until_finished() is None


def test_with_block_gives_the_checkpointer_itself(registry):
    ckpt = Checkpointer(registry, "run", async_save=True)
    with ckpt as entered:
        assert entered is ckpt


def test_leaving_a_with_block_commits_the_save_in_flight(registry):
    state = big_numpy_state()
    with Checkpointer(registry, "run", async_save=True) as ckpt:
        path = ckpt.save_checkpoint(state, step=1)
    assert ckpt.list_available_checkpoints() == {"step_1": path}
    assert_tree_equal(state, Checkpointer(registry, "run").load_checkpoint(1)["state"])


def test_leaving_a_with_block_by_an_exception_commits_the_save_and_reraises(registry):
    state = big_numpy_state()
    with pytest.raises(RuntimeError, match="diverged"):
        with Checkpointer(registry, "run", async_save=True) as ckpt:
            ckpt.save_checkpoint(state, step=1)
            raise RuntimeError("loss diverged")
    assert_tree_equal(state, Checkpointer(registry, "run").load_checkpoint(1)["state"])


def test_wait_close_and_with_are_harmless_in_sync_mode(registry):
    with Checkpointer(registry, "run") as ckpt:
        path = ckpt.save_checkpoint(small_state(), step=1)
        assert ckpt.wait_until_finished() is None
    assert ckpt.close() is None
    assert ckpt.list_available_checkpoints() == {"step_1": path}


# --- interpreter exit ---------------------------------------------------------------


def exit_state() -> dict:
    """~50 MB of float32 plus a device array: the state the exit script saves."""
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((3200, 4096), dtype=np.float32),
        "b": jnp.arange(65536, dtype=jnp.float32),
    }


# Scripts that start async saves and then simply end: no wait, no close. Each maps to
# the checkpoints that must be committed once the script has exited.
EXIT_SCRIPT_ENDINGS = {
    "checkpointer-at-module-level": (
        """
ckpt = Checkpointer(sys.argv[1], "run", async_save=True)
ckpt.save_checkpoint(exit_state(), step=1)
""",
        {"step_1"},
    ),
    "checkpointer-gone-with-its-function": (
        """
def train():
    ckpt = Checkpointer(sys.argv[1], "run", async_save=True)
    ckpt.save_checkpoint(exit_state(), step=1)


train()
""",
        {"step_1"},
    ),
    "latest-numbered-and-best-of-the-last-step": (
        """
ckpt = Checkpointer(
    sys.argv[1], "run", save_every=1, checkpoint_every=1, keep_best=True, async_save=True
)
ckpt.maybe_save_checkpoints(exit_state(), 1, {"val/loss": 0.5})
""",
        {"latest", "step_1", "best"},
    ),
}


@pytest.mark.parametrize(
    ("ending", "committed"), list(EXIT_SCRIPT_ENDINGS.values()), ids=list(EXIT_SCRIPT_ENDINGS)
)
def test_saves_in_flight_at_interpreter_exit_are_committed(registry, ending, committed):
    script = "\n".join(
        [
            "import sys",
            "import jax.numpy as jnp",
            "import numpy as np",
            "from learnax.checkpoint import Checkpointer",
            inspect.getsource(exit_state),
            ending,
        ]
    )
    # The script imports the same learnax as this test.
    src = str(Path(learnax.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", script, registry],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a measurement
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr

    ckpt = Checkpointer(registry, "run")
    listing = ckpt.list_available_checkpoints()
    assert set(listing) == committed
    for path in listing.values():
        loaded = ckpt.load_checkpoint(path)
        assert loaded["step"] == 1
        assert_tree_equal(exit_state(), loaded["state"])


@pytest.mark.filterwarnings("ignore:os.fork")  # the child only checks a flag and exits
def test_a_process_forked_while_a_save_pauses_the_gc_has_it_enabled():
    """Saves pause Python's cyclic GC; a child forked meanwhile (a data-loader worker)
    has no save of its own, so its collector must be on."""
    import gc

    from learnax.checkpoint._threads import gc_paused

    assert gc.isenabled()
    with gc_paused():
        pid = os.fork()
        if pid == 0:  # the child
            os._exit(0 if gc.isenabled() else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert gc.isenabled()


# --- a child forked while a save is in flight ---------------------------------------

# The parent starts a save of ~256 MB (long enough that it is still being written when
# the child starts), forks, and gives the child CHILD_DEADLINE_S to end; then it closes
# its own Checkpointer. The child ends as a data-loader worker or a user's fork would.
FORK_SCRIPT = """
import multiprocessing
import os
import signal
import sys
import time

import numpy as np

from learnax.checkpoint import Checkpointer

registry, child_ends, deadline_s = sys.argv[1], sys.argv[2], float(sys.argv[3])


def child(ckpt):
    # The parent's save is not the child's: the child neither waits for it nor runs it.
    if child_ends == "waits-closes-and-exits":
        ckpt.wait_until_finished()
        ckpt.close()
    # "exits": the interpreter exit flushes the saves in flight of this process.


ckpt = Checkpointer(registry, "run", async_save=True)
state = {"w": np.arange(1 << 26, dtype=np.uint32).reshape(8192, 8192)}
ckpt.save_checkpoint(state, step=1)
print("in flight at fork:", not ckpt._background._in_flight.done(), flush=True)
if child_ends == "multiprocessing-fork":
    worker = multiprocessing.get_context("fork").Process(
        target=lambda: (ckpt.wait_until_finished(), ckpt.close())
    )
    worker.start()
    worker.join(deadline_s)
    hung = worker.is_alive()
    if hung:
        worker.kill()
else:
    pid = os.fork()
    if pid == 0:
        child(ckpt)
        sys.exit(0)
    end = time.monotonic() + deadline_s
    while os.waitpid(pid, os.WNOHANG) == (0, 0) and time.monotonic() < end:
        time.sleep(0.05)
    hung = time.monotonic() >= end
    if hung:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
print("child hung:", hung, flush=True)
ckpt.close()
"""
CHILD_DEADLINE_S = 20


@pytest.mark.parametrize("child_ends", ["exits", "waits-closes-and-exits", "multiprocessing-fork"])
def test_a_child_forked_while_a_save_is_in_flight_ends_and_the_parents_save_commits(
    registry, child_ends
):
    """A process forked during an async save (a data-loader worker, a user's fork) has
    none of the parent's threads: it must not wait for the parent's save, at exit nor in
    its copy of the Checkpointer, and the parent's save still commits."""
    src = str(Path(learnax.__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "ignore",
            "-c",
            FORK_SCRIPT,
            registry,
            child_ends,
            str(CHILD_DEADLINE_S),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,  # a hang guard, not a measurement
    )
    assert done.returncode == 0, done.stderr
    assert "in flight at fork: True" in done.stdout, done.stdout + done.stderr
    assert "child hung: False" in done.stdout, done.stdout + done.stderr

    loaded = Checkpointer(registry, "run").load_latest()
    assert loaded["step"] == 1
    expected = np.arange(1 << 26, dtype=np.uint32).reshape(8192, 8192)
    np.testing.assert_array_equal(loaded["state"]["w"], expected)
