"""Writes checkpoints the way the original learnax (github AllanSCosta/learnax) did, for
tests/test_legacy_pickles.py; run as a script in a subprocess:

    python original_learnax_writer.py <checkpoints dir> <expected dir>

The original's Trainer kept a ``learnax.trainer.TrainState`` NamedTuple (``params``,
``opt_state``, ``step``) with an ``optax.inject_hyperparams(optax.adam)`` state, and
its Checkpointer pickled ``{"state": prepare_fn(train_state), "step": step, "time":
time.time()}`` (plus ``"metrics"`` when given) with ``pickle.dump`` at the default
protocol into ``state_<step>.pyd``, ``state_latest.pyd`` and ``state_best.pyd``. This
script builds the same objects without the original package: it defines a module
``learnax.trainer`` in ``sys.modules`` only, so the process that loads the files has
no such module.

Into ``<expected dir>`` it writes, per checkpoint name, ``<name>.npz`` (every leaf of
the state by its jax key path) and ``<name>.json`` (step, time, metrics, the leaves'
key paths and dtypes, and the fields of every NamedTuple class in the state).
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import time
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class TrainState(NamedTuple):
    """The original's ``learnax.trainer.TrainState``."""

    params: Any
    opt_state: Any
    step: int = 0


def install_original_trainer_module() -> None:
    """``learnax.trainer`` in this process only, holding ``TrainState`` (as pickle finds
    classes: by module name and qualified name)."""
    package = types.ModuleType("learnax")
    trainer = types.ModuleType("learnax.trainer")
    TrainState.__module__ = "learnax.trainer"
    trainer.TrainState = TrainState
    package.trainer = trainer
    sys.modules["learnax"] = package
    sys.modules["learnax.trainer"] = trainer


def trained_state(steps: int) -> TrainState:
    """A TrainState after ``steps`` updates of the original's optimizer, so that Adam's
    count and moments are nonzero."""
    rng = np.random.default_rng(0)
    params = {
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((4, 3), dtype=np.float32)),
            "bias": jnp.asarray(rng.standard_normal(3, dtype=np.float32)),
        },
        "embed": jnp.asarray(rng.standard_normal((5, 2)).astype(jnp.bfloat16)),
    }
    optimizer = optax.inject_hyperparams(optax.adam)(1e-3, 0.9, 0.999)
    state = TrainState(params, optimizer.init(params))
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    return state


def save_checkpoint(directory, filename, train_state, step, metrics=None, prepare_fn=None):
    """The original Checkpointer.save_checkpoint, its file format exactly."""
    prepare_fn = prepare_fn or (lambda x: jax.device_get(x))
    checkpoint_data = {"state": prepare_fn(train_state), "step": step, "time": time.time()}
    if metrics:
        checkpoint_data["metrics"] = metrics
    with open(os.path.join(directory, filename), "wb") as file:
        pickle.dump(checkpoint_data, file)
    return checkpoint_data


def namedtuple_fields(tree) -> dict[str, list[str]]:
    """``{class name: fields}`` of every NamedTuple in ``tree``."""
    found: dict[str, list[str]] = {}

    def visit(node):
        if isinstance(node, tuple) and hasattr(type(node), "_fields"):
            found[type(node).__name__] = list(type(node)._fields)
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(tree)
    return found


def write_expected(expected_dir, name, data) -> None:
    state = jax.device_get(data["state"])
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    np.savez(
        os.path.join(expected_dir, f"{name}.npz"),
        **{jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves},
    )
    meta = {
        "step": int(data["step"]),
        "time": data["time"],
        "metrics": data.get("metrics", {}),
        "fields": namedtuple_fields(state),
        "keys": [jax.tree_util.keystr(path) for path, _ in leaves],
        # np.savez keeps bfloat16 data as void: the dtypes by name.
        "dtypes": [str(np.asarray(leaf).dtype) for _, leaf in leaves],
    }
    with open(os.path.join(expected_dir, f"{name}.json"), "w") as f:
        json.dump(meta, f)


def main(checkpoints_dir: str, expected_dir: str) -> None:
    install_original_trainer_module()
    os.makedirs(checkpoints_dir, exist_ok=True)
    os.makedirs(expected_dir, exist_ok=True)
    # A numbered checkpoint as the Trainer saved it: step a Python int.
    state = trained_state(100)
    data = save_checkpoint(checkpoints_dir, "state_100.pyd", state, state.step, {"train/loss": 0.5})
    write_expected(expected_dir, "100", data)
    # The best: saved by update_best_checkpoint, with its one metric; this one keeps jax
    # arrays (a Checkpointer whose prepare_fn did not move the state to the host).
    state = trained_state(120)
    data = save_checkpoint(
        checkpoints_dir, "state_best.pyd", state, 120, {"val/loss": 0.125}, prepare_fn=lambda x: x
    )
    write_expected(expected_dir, "best", data)
    # The latest, newest of all: its step a jax scalar (a train state whose step was one).
    state = trained_state(150)
    data = save_checkpoint(checkpoints_dir, "state_latest.pyd", state, jnp.asarray(150))
    write_expected(expected_dir, "latest", data)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
