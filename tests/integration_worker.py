"""The sharded half of tests/test_integrations.py (run as a subprocess, not collected).

    python tests/integration_worker.py <registry> <out_dir>

The parent sets ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` in the
environment before this process imports jax, so it sees 8 CPU devices (the pytest
process itself has one). It trains a small model whose whole state (params, Adam
state, step, PRNG key) is placed with ``NamedSharding`` on a (4, 2) mesh, checkpoints
it, restores it in a fresh Checkpointer onto several targets, continues training, and
writes what it found to ``<out_dir>``:

- ``facts.json``: the loaded step of each restore, and for every restored leaf its
  tree path, type, sharding and the target leaf's sharding, and whether they are equal;
- ``<name>.npz``: the leaves of a state (``leaf_<i>``, in ``tree_leaves`` order; typed
  PRNG keys as their key data), for the parent to compare bit by bit.

The parent judges; this file only records. An exception goes to stderr (exit 1).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

RUN = "sharded"
SAVE_EVERY = 3
CRASH_AFTER = 5  # latest saved at step 3; steps 4 and 5 are lost in the crash
TOTAL_STEPS = 6

# Per layout: the mesh shape, its axis names, and the PartitionSpec of each leaf by
# shape (the Adam moments share their parameter's shape, hence its sharding).
LAYOUTS = {
    "mesh_4x2": (
        (4, 2),
        ("data", "model"),
        {(16, 8): ("data", "model"), (8,): ("model",), (8, 4): ("model", None), (4,): ()},
    ),
    "mesh_2x4": (
        (2, 4),
        ("a", "b"),
        {(16, 8): ("b", "a"), (8,): ("a",), (8, 4): (None, "b"), (4,): ("b",)},
    ),
    "mesh_8": (
        (8,),
        ("x",),
        {(16, 8): (None, "x"), (8,): ("x",), (8, 4): ("x", None), (4,): ()},
    ),
}


def main(registry: str, out_dir: Path) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

    from learnax.checkpoint import Checkpointer

    assert jax.device_count() == 8, f"expected 8 CPU devices, got {jax.devices()}"
    tx = optax.adam(1e-2)

    def shardings_for(layout: str, tree):
        shape, axes, specs = LAYOUTS[layout]
        mesh = Mesh(np.asarray(jax.devices()).reshape(shape), axes)
        return jax.tree.map(
            lambda x: NamedSharding(mesh, PartitionSpec(*specs.get(tuple(x.shape), ()))), tree
        )

    def initial_state():
        rng = np.random.default_rng(0)
        params = {
            "w1": rng.standard_normal((16, 8), dtype=np.float32) * 0.3,
            "b1": np.zeros((8,), np.float32),
            "w2": rng.standard_normal((8, 4), dtype=np.float32) * 0.3,
            "b2": np.zeros((4,), np.float32),
        }
        params = jax.tree.map(jnp.asarray, params)
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.asarray(0, jnp.int32),
            "rng": jax.random.key(42),
        }

    def batch(step: int):
        rng = np.random.default_rng(1000 + step)
        x = rng.standard_normal((32, 16), dtype=np.float32)
        return x, np.tanh(x[:, :4] * 2.0)

    def loss_fn(params, x, y):
        hidden = jax.nn.relu(x @ params["w1"] + params["b1"])
        return jnp.mean((hidden @ params["w2"] + params["b2"] - y) ** 2)

    def step_fn(state, x, y):
        rng, noise_key = jax.random.split(state["rng"])
        x = x + 0.01 * jax.random.normal(noise_key, x.shape)
        grads = jax.grad(loss_fn)(state["params"], x, y)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": rng,
        }

    train_steps = {}

    def train(state, layout: str, until: int, ckpt=None):
        if layout not in train_steps:  # keeps every leaf on its layout's sharding
            train_steps[layout] = jax.jit(step_fn, out_shardings=shardings_for(layout, state))
        while int(state["step"]) < until:
            state = train_steps[layout](state, *batch(int(state["step"])))
            if ckpt is not None:
                ckpt.maybe_save_checkpoints(state, int(state["step"]))
        return state

    def place(state, layout: str):
        return jax.device_put(state, shardings_for(layout, state))

    def abstract(state, shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
        )

    def record(name: str, state) -> None:
        leaves = {}
        for i, leaf in enumerate(jax.tree_util.tree_leaves(state)):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
                leaf = jax.random.key_data(leaf)
            leaves[f"leaf_{i}"] = np.asarray(leaf)
        np.savez(out_dir / f"{name}.npz", **leaves)

    def describe(restored, target) -> list[dict]:
        found = []
        restored_flat = jax.tree_util.tree_flatten_with_path(restored)[0]
        target_leaves = jax.tree_util.tree_leaves(target)
        assert len(restored_flat) == len(target_leaves), "restored tree has other leaves"
        for (path, got), like in zip(restored_flat, target_leaves, strict=True):
            found.append(
                {
                    "path": jax.tree_util.keystr(path),
                    "type": type(got).__name__,
                    "is_jax_array": isinstance(got, jax.Array),
                    "sharding": repr(getattr(got, "sharding", None)),
                    "target_sharding": repr(like.sharding),
                    "sharding_equal": getattr(got, "sharding", None) == like.sharding,
                }
            )
        return found

    facts: dict = {"restores": {}}
    initial = place(initial_state(), "mesh_4x2")

    # The uninterrupted run, and the run that crashes after step 5.
    record("uninterrupted", train(initial, "mesh_4x2", TOTAL_STEPS))
    ckpt = Checkpointer(registry, RUN, save_every=SAVE_EVERY, checkpoint_every=None)
    crashed = train(initial, "mesh_4x2", CRASH_AFTER, ckpt)
    assert int(crashed["step"]) == CRASH_AFTER
    del ckpt, crashed
    at_save = train(initial, "mesh_4x2", SAVE_EVERY)  # what latest holds
    record("saved", at_save)
    facts["saved_leaves"] = [
        {"path": jax.tree_util.keystr(path), "devices": len(x.sharding.device_set)}
        for path, x in jax.tree_util.tree_flatten_with_path(at_save)[0]
    ]

    fresh = Checkpointer(registry, RUN, save_every=SAVE_EVERY, checkpoint_every=None)

    def restore(name: str, target) -> object:
        loaded = fresh.load_latest(target=target)
        facts["restores"][name] = {
            "step": loaded["step"],
            "leaves": describe(loaded["state"], target),
        }
        record(f"restored_{name}", loaded["state"])
        return loaded["state"]

    # Same mesh, abstract target: continue there to the end of the uninterrupted run.
    same = restore("mesh_4x2", abstract(at_save, shardings_for("mesh_4x2", at_save)))
    record("resumed_mesh_4x2", train(same, "mesh_4x2", TOTAL_STEPS))

    # Another mesh and other specs: one step there, against the saved state resharded.
    other = restore("mesh_2x4", abstract(at_save, shardings_for("mesh_2x4", at_save)))
    record("resumed_mesh_2x4", train(other, "mesh_2x4", SAVE_EVERY + 1))
    record("resharded_mesh_2x4", train(place(at_save, "mesh_2x4"), "mesh_2x4", SAVE_EVERY + 1))

    # A 1-D mesh, concrete target arrays (zeros and another key already placed there).
    zeros = jax.tree.map(
        lambda x: (
            jax.random.key(7)
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
            else jnp.zeros(x.shape, x.dtype)
        ),
        at_save,
    )
    restore("mesh_8", place(zeros, "mesh_8"))

    # One device, not the first.
    one = SingleDeviceSharding(jax.devices()[5])
    restore("one_device", abstract(at_save, jax.tree.map(lambda _: one, at_save)))

    (out_dir / "facts.json").write_text(json.dumps(facts, indent=1))


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count=8" not in os.environ.get("XLA_FLAGS", ""):
        sys.exit("run me with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    main(sys.argv[1], Path(sys.argv[2]))
