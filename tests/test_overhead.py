"""maybe_save_checkpoints is called every training step: when nothing is due it must
do nothing at all (no disk access, no device transfer through prepare_fn).

No timing assertions here by design: benchmarks live in bench/."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from helpers import small_state, tree_listing


class CountingPrepare:
    def __init__(self):
        self.calls = 0

    def __call__(self, state):
        self.calls += 1
        return state


@pytest.fixture
def prepare():
    return CountingPrepare()


def test_step_with_nothing_due_writes_nothing(make_checkpointer, registry, prepare):
    ckpt = make_checkpointer(save_every=10, checkpoint_every=100, prepare_fn=prepare)
    ckpt.maybe_save_checkpoints(small_state(), 10)
    before = tree_listing(registry)
    for step in range(11, 20):
        assert ckpt.maybe_save_checkpoints(small_state(), step) == {}
    assert tree_listing(registry) == before


def test_step_with_nothing_due_does_not_call_prepare_fn(make_checkpointer, prepare):
    ckpt = make_checkpointer(save_every=10, checkpoint_every=100, prepare_fn=prepare)
    state = {"w": jnp.ones((4, 4))}
    for step in range(1, 10):
        ckpt.maybe_save_checkpoints(state, step)
    assert prepare.calls == 0
    ckpt.maybe_save_checkpoints(state, 10)
    assert prepare.calls >= 1


def test_metric_that_is_not_better_does_not_call_prepare_fn(make_checkpointer, prepare):
    ckpt = make_checkpointer(
        save_every=None, checkpoint_every=None, keep_best=True, prepare_fn=prepare
    )
    ckpt.maybe_save_checkpoints(small_state(), 1, {"val/loss": 0.1})
    calls_after_first_best = prepare.calls
    assert calls_after_first_best >= 1
    for step in range(2, 6):
        assert ckpt.maybe_save_checkpoints(small_state(), step, {"val/loss": 0.2}) == {}
    assert prepare.calls == calls_after_first_best


def test_metrics_without_the_metric_name_do_not_call_prepare_fn(make_checkpointer, prepare):
    ckpt = make_checkpointer(
        save_every=None, checkpoint_every=None, keep_best=True, prepare_fn=prepare
    )
    for step in range(1, 6):
        ckpt.maybe_save_checkpoints(small_state(), step, {"train/loss": 0.5})
    assert prepare.calls == 0


def test_keep_best_false_with_metrics_does_not_call_prepare_fn(
    make_checkpointer, registry, prepare
):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, prepare_fn=prepare)
    before = tree_listing(ckpt.checkpoint_dir)
    for step in range(1, 6):
        ckpt.maybe_save_checkpoints(small_state(), step, {"val/loss": 0.1 / step})
    assert prepare.calls == 0
    assert tree_listing(ckpt.checkpoint_dir) == before
    # The reports themselves are kept, in the run's metric history only.
    assert [r["step"] for r in ckpt.metric_history()] == [1, 2, 3, 4, 5]
