"""The original learnax Trainer shape: crash, restart from ``load_latest()``, and end
up bit-identical to a run that never stopped."""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

TOTAL_STEPS = 12
CRASH_AFTER = 7  # latest saved at 3 and 6; step 7 is lost in the crash
SAVE_EVERY = 3


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(16)(x))
        x = nn.relu(nn.Dense(16)(x))
        return nn.Dense(1)(x)


MODEL = MLP()
OPTIMIZER = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

_rng = np.random.default_rng(0)
DATA_X = _rng.standard_normal((8, 16, 4)).astype(np.float32)
DATA_Y = (DATA_X.sum(-1, keepdims=True) ** 2).astype(np.float32)


def init_state() -> TrainState:
    params = MODEL.init(jax.random.key(0), jnp.ones((1, 4)))
    return TrainState(params=params, opt_state=OPTIMIZER.init(params), step=jnp.asarray(0))


@jax.jit
def train_step(state: TrainState, x, y) -> TrainState:
    def loss_fn(params):
        return jnp.mean((MODEL.apply(params, x) - y) ** 2)

    grads = jax.grad(loss_fn)(state.params)
    updates, opt_state = OPTIMIZER.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1)


def batch(step: int):
    return DATA_X[step % len(DATA_X)], DATA_Y[step % len(DATA_Y)]


def train(state: TrainState, until: int, ckpt=None) -> TrainState:
    while int(state.step) < until:
        state = train_step(state, *batch(int(state.step)))
        if ckpt is not None:
            ckpt.maybe_save_checkpoints(state, int(state.step), {"train/step": 1.0})
    return state


def assert_leaves_identical(got, want) -> None:
    got_leaves = jax.tree_util.tree_leaves(got)
    want_leaves = jax.tree_util.tree_leaves(want)
    assert len(got_leaves) == len(want_leaves)
    for g, w in zip(got_leaves, want_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def uninterrupted_run() -> TrainState:
    return train(init_state(), TOTAL_STEPS)


def test_resume_from_load_latest_is_bit_identical_to_an_uninterrupted_run(
    make_checkpointer,
):
    ckpt = make_checkpointer(save_every=SAVE_EVERY, checkpoint_every=None)
    train(init_state(), CRASH_AFTER, ckpt)
    del ckpt  # the process dies; nothing is flushed or closed

    loaded = make_checkpointer(save_every=SAVE_EVERY, checkpoint_every=None).load_latest()
    assert loaded["step"] == 6
    restored = loaded["state"]
    assert type(restored) is TrainState
    assert int(restored.step) == 6

    resumed = train(restored, TOTAL_STEPS, make_checkpointer(save_every=SAVE_EVERY))
    expected = uninterrupted_run()
    assert int(resumed.step) == TOTAL_STEPS
    assert_leaves_identical(resumed.params, expected.params)
    assert_leaves_identical(resumed.opt_state, expected.opt_state)


def test_resume_with_target_is_bit_identical_and_keeps_jax_types(make_checkpointer):
    ckpt = make_checkpointer(save_every=SAVE_EVERY, checkpoint_every=None)
    train(init_state(), CRASH_AFTER, ckpt)
    del ckpt

    template = jax.eval_shape(init_state)
    restored = make_checkpointer().load_latest(target=template)["state"]
    assert type(restored) is TrainState
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(restored))

    resumed = train(restored, TOTAL_STEPS)
    expected = uninterrupted_run()
    assert_leaves_identical(resumed.params, expected.params)


def test_numbered_checkpoints_of_a_training_run_restore_their_own_step(
    make_checkpointer,
):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=4, max_to_keep=2)
    final = train(init_state(), TOTAL_STEPS, ckpt)
    listing = ckpt.list_available_checkpoints()
    assert list(listing) == ["step_8", "step_12"]
    restored = ckpt.load_checkpoint(12)["state"]
    assert_leaves_identical(restored.params, final.params)
    at_eight = train(init_state(), 8)
    assert_leaves_identical(ckpt.load_checkpoint(8)["state"].params, at_eight.params)
