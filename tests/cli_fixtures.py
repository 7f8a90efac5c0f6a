"""Importable helpers for test_cli.py: a flax TrainState whose ``apply_fn`` and ``tx``
pickle by reference, as the original learnax pickled train states.

``optax.adam(...)`` is built from local closures and does not pickle, so the
TrainState-object checkpoints use an Adam wrapped in module-level functions; its
optimizer state is Adam's own. The ``learnax convert`` subprocess unpickles these
objects, so it must be able to import this module (test_cli.py puts tests/ on its
PYTHONPATH).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

LEARNING_RATE = 1e-3


def apply_fn(params, x):
    """The model: one dense layer."""
    dense = params["Dense_0"]
    return x @ dense["kernel"] + dense["bias"]


def adam_init(params):
    return optax.adam(LEARNING_RATE).init(params)


def adam_update(updates, state, params=None):
    return optax.adam(LEARNING_RATE).update(updates, state, params)


# optax.adam(LEARNING_RATE), made of functions that pickle by their qualified name.
PICKLABLE_ADAM = optax.GradientTransformation(adam_init, adam_update)


def make_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((6, 3), dtype=np.float32)),
            "bias": jnp.asarray(rng.standard_normal(3, dtype=np.float32)),
        }
    }


def trained_state(tx, steps: int = 3, seed: int = 0) -> train_state.TrainState:
    """A TrainState after ``steps`` optimizer steps: step == steps and Adam's moments
    and count are nonzero, so a conversion that drops or zeroes them is caught."""
    state = train_state.TrainState.create(apply_fn=apply_fn, params=make_params(seed), tx=tx)
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.standard_normal((4, 6), dtype=np.float32))
    y = jnp.asarray(rng.standard_normal((4, 3), dtype=np.float32))

    def loss(params):
        return jnp.mean((apply_fn(params, x) - y) ** 2)

    for _ in range(steps):
        state = state.apply_gradients(grads=jax.grad(loss)(state.params))
    return state
