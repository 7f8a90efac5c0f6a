"""What JAX users train with checkpoints and restores as it is: flax linen's TrainState,
flax nnx models and optimizers, equinox modules, every optax state, and a state sharded
over several devices.

Each integration trains a few steps with a Checkpointer, "crashes", restores in a
fresh Checkpointer on the same run with ``target=``, continues, and must end up
bit-identical to a run that never stopped (same batches: each is a pure function of
the step).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training.train_state import TrainState

from learnax.checkpoint import Checkpointer

SAVE_EVERY = 3
CRASH_AFTER = 5  # latest is saved at step 3; steps 4 and 5 are lost in the crash
TOTAL_STEPS = 8


# --- helpers ----------------------------------------------------------------------


def is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def assert_bit_identical(actual, expected, what: str) -> None:
    """Same tree structure, and every leaf of the same dtype, shape and bits."""
    actual_flat, actual_def = jax.tree_util.tree_flatten_with_path(actual)
    expected_flat, expected_def = jax.tree_util.tree_flatten_with_path(expected)
    assert actual_def == expected_def, (
        f"{what}: the tree structure differs\n got:      {actual_def}\n expected: {expected_def}"
    )
    for (path, got), (_, want) in zip(actual_flat, expected_flat, strict=True):
        where = f"{what}{jax.tree_util.keystr(path)}"
        if is_typed_key(want):
            assert is_typed_key(got), f"{where}: expected a typed PRNG key, got {type(got)}"
            assert jax.random.key_impl(got) == jax.random.key_impl(want), f"{where}: key impl"
            got, want = jax.random.key_data(got), jax.random.key_data(want)
        got, want = np.asarray(got), np.asarray(want)
        assert got.dtype == want.dtype, f"{where}: dtype {got.dtype}, expected {want.dtype}"
        np.testing.assert_array_equal(
            got, want, strict=True, err_msg=f"{where} differs from the uninterrupted run"
        )
        assert got.tobytes() == want.tobytes(), f"{where}: equal values but other bits"


def assert_all_jax_arrays(tree, what: str) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        assert isinstance(leaf, jax.Array), (
            f"{what}{jax.tree_util.keystr(path)} is a {type(leaf).__name__}, not a jax.Array"
        )


def namedtuple_types(tree, path: str = "") -> dict[str, type]:
    """{path: class} of every NamedTuple in a tree of tuples, lists and dicts."""
    found: dict[str, type] = {}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        found[path or "<root>"] = type(tree)
        children = [(f".{name}", child) for name, child in zip(tree._fields, tree, strict=True)]
    elif isinstance(tree, (tuple, list)):
        children = [(f"[{i}]", child) for i, child in enumerate(tree)]
    elif isinstance(tree, dict):
        children = [(f"[{key!r}]", child) for key, child in tree.items()]
    else:
        children = []
    for suffix, child in children:
        found.update(namedtuple_types(child, path + suffix))
    return found


def new_checkpointer(registry: str, run_id: str) -> Checkpointer:
    return Checkpointer(registry, run_id, save_every=SAVE_EVERY, checkpoint_every=None)


def regression_batch(step: int, in_features: int, out_features: int):
    """The batch of a step: a pure function of the step, so both runs see the same data."""
    rng = np.random.default_rng([in_features, step])
    x = rng.standard_normal((16, in_features), dtype=np.float32)
    return x, np.sin(x[:, :out_features] * 2.0)


# --- flax linen -------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))


LINEN_MODEL = LinenMLP()
LINEN_TX = optax.adam(1e-3)


def linen_state(seed: int) -> TrainState:
    params = LINEN_MODEL.init(jax.random.key(seed), jnp.ones((1, 4)))["params"]
    return TrainState.create(apply_fn=LINEN_MODEL.apply, params=params, tx=LINEN_TX)


@jax.jit
def linen_train_step(state: TrainState, x, y) -> TrainState:
    def loss_fn(params):
        return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))


def train_linen(state: TrainState, until: int, ckpt: Checkpointer | None = None) -> TrainState:
    while int(state.step) < until:
        state = linen_train_step(state, *regression_batch(int(state.step), 4, 1))
        if ckpt is not None:
            ckpt.maybe_save_checkpoints(state, int(state.step))
    return state


def crashed_linen_run(registry: str) -> None:
    ckpt = new_checkpointer(registry, "linen")
    train_linen(linen_state(0), CRASH_AFTER, ckpt)
    del ckpt  # the process dies; nothing is closed


def test_flax_linen_train_state_restores_into_a_fresh_train_state_with_its_apply_fn_and_tx(
    registry,
):
    crashed_linen_run(registry)
    target = linen_state(1)  # other initial values: every array must come from the file
    loaded = new_checkpointer(registry, "linen").load_latest(target=target)

    assert loaded["step"] == SAVE_EVERY
    state = loaded["state"]
    assert type(state) is TrainState, f"restored a {type(state)}, not a flax TrainState"
    assert state.apply_fn is target.apply_fn, "apply_fn must be the target's"
    assert state.tx is target.tx, "tx must be the target's"
    # TrainState.create starts step as the Python int 0: the target's leaf type wins.
    assert state.step == SAVE_EVERY and type(state.step) is int, f"step is {state.step!r}"
    assert_all_jax_arrays((state.params, state.opt_state), "restored TrainState")
    saved = train_linen(linen_state(0), SAVE_EVERY)
    assert_bit_identical(state.params, saved.params, "restored params")
    assert_bit_identical(state.opt_state, saved.opt_state, "restored opt_state")


def test_flax_linen_train_state_resumed_with_apply_gradients_is_bit_identical(registry):
    crashed_linen_run(registry)
    state = new_checkpointer(registry, "linen").load_latest(target=linen_state(1))["state"]

    resumed = train_linen(state, TOTAL_STEPS)  # state.apply_gradients on the restored state

    assert int(resumed.step) == TOTAL_STEPS
    assert_bit_identical(resumed, train_linen(linen_state(0), TOTAL_STEPS), "TrainState")


def test_flax_linen_train_state_without_target_comes_back_as_plain_containers(registry):
    crashed_linen_run(registry)
    restored = new_checkpointer(registry, "linen").load_latest()["state"]
    saved = train_linen(linen_state(0), SAVE_EVERY)

    # CONTRACT §2: a flax struct dataclass comes back as a dict of its pytree fields;
    # apply_fn and tx are static fields, not stored.
    assert type(restored) is dict, f"expected a dict, got {type(restored)}"
    assert set(restored) == {"step", "params", "opt_state"}
    assert int(restored["step"]) == SAVE_EVERY
    assert type(restored["params"]) is dict
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored["params"])[0]:
        assert type(leaf) is np.ndarray, f"params{jax.tree_util.keystr(path)}: {type(leaf)}"
    assert_bit_identical(restored["params"], jax.device_get(saved.params), "params")
    # optax states are NamedTuples: they come back as their own classes.
    assert namedtuple_types(restored["opt_state"]) == namedtuple_types(saved.opt_state)
    assert_bit_identical(restored["opt_state"], jax.device_get(saved.opt_state), "opt_state")


# --- flax nnx ---------------------------------------------------------------------


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 16, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)  # draws from its own RNG stream
        self.out = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(self.dropout(nnx.relu(self.hidden(x))))


def nnx_model_and_optimizer(seed: int) -> tuple[NnxNet, nnx.Optimizer]:
    model = NnxNet(nnx.Rngs(params=seed, dropout=seed + 100))
    return model, nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=1e-2), wrt=nnx.Param)


@nnx.jit
def nnx_train_step(model: NnxNet, optimizer: nnx.Optimizer, x, y) -> None:
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    optimizer.update(model, nnx.grad(loss_fn)(model))


def train_nnx(model, optimizer, start: int, until: int, ckpt=None) -> None:
    for step in range(start, until):
        nnx_train_step(model, optimizer, *regression_batch(step, 4, 1))
        if ckpt is not None:
            state = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
            ckpt.maybe_save_checkpoints(state, step + 1)


def crashed_nnx_run(registry: str) -> None:
    ckpt = new_checkpointer(registry, "nnx")
    train_nnx(*nnx_model_and_optimizer(0), 0, CRASH_AFTER, ckpt)
    del ckpt


def restore_nnx_with_update(registry: str) -> tuple[NnxNet, nnx.Optimizer, int]:
    """The nnx recipe: build fresh objects, restore into their state, nnx.update them."""
    model, optimizer = nnx_model_and_optimizer(1)  # other weights and other RNG keys
    target = {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}
    loaded = new_checkpointer(registry, "nnx").load_latest(target=target)
    restored = loaded["state"]
    assert type(restored["model"]) is nnx.State, f"got {type(restored['model'])}"
    assert type(restored["optimizer"]) is nnx.State, f"got {type(restored['optimizer'])}"
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    return model, optimizer, loaded["step"]


def test_nnx_model_and_optimizer_restored_with_nnx_update_resume_bit_identically(registry):
    crashed_nnx_run(registry)
    model, optimizer, step = restore_nnx_with_update(registry)
    assert step == SAVE_EVERY

    train_nnx(model, optimizer, step, TOTAL_STEPS)  # dropout active: its RNG advances

    expected_model, expected_optimizer = nnx_model_and_optimizer(0)
    train_nnx(expected_model, expected_optimizer, 0, TOTAL_STEPS)
    assert_bit_identical(nnx.state(model), nnx.state(expected_model), "model")
    assert_bit_identical(nnx.state(optimizer), nnx.state(expected_optimizer), "optimizer")


def test_nnx_restore_brings_back_the_dropout_rng_key_and_count(registry):
    crashed_nnx_run(registry)
    model, _, _ = restore_nnx_with_update(registry)

    expected, expected_optimizer = nnx_model_and_optimizer(0)
    train_nnx(expected, expected_optimizer, 0, SAVE_EVERY)
    got_key = model.dropout.rngs.key.get_value()
    want_key = expected.dropout.rngs.key.get_value()
    assert is_typed_key(got_key), f"the dropout key came back as a {type(got_key)}"
    np.testing.assert_array_equal(
        jax.random.key_data(got_key),
        jax.random.key_data(want_key),
        err_msg="the dropout RNG key is not the saved one",
    )
    got_count = model.dropout.rngs.count.get_value()
    want_count = expected.dropout.rngs.count.get_value()
    assert got_count.dtype == want_count.dtype, f"count dtype {got_count.dtype}"
    assert int(got_count) == int(want_count) == SAVE_EVERY, (
        f"the dropout RNG count is {int(got_count)}, expected {SAVE_EVERY}"
    )


def test_nnx_split_state_restored_into_an_abstract_model_merges_and_resumes_bit_identically(
    registry,
):
    ckpt = new_checkpointer(registry, "nnx-split")
    model, optimizer = nnx_model_and_optimizer(0)
    train_nnx(model, optimizer, 0, SAVE_EVERY)
    _, state = nnx.split((model, optimizer))
    assert ckpt.save_checkpoint(state, step=SAVE_EVERY) is not None
    del ckpt

    # Nothing allocated for the target: ShapeDtypeStructs from nnx.eval_shape.
    graphdef, abstract_state = nnx.split(nnx.eval_shape(lambda: nnx_model_and_optimizer(1)))
    loaded = new_checkpointer(registry, "nnx-split").load_latest(target=abstract_state)
    assert_all_jax_arrays(loaded["state"], "restored nnx state")
    model, optimizer = nnx.merge(graphdef, loaded["state"])
    train_nnx(model, optimizer, loaded["step"], TOTAL_STEPS)

    expected_model, expected_optimizer = nnx_model_and_optimizer(0)
    train_nnx(expected_model, expected_optimizer, 0, TOTAL_STEPS)
    assert_bit_identical(nnx.state(model), nnx.state(expected_model), "model")
    assert_bit_identical(nnx.state(optimizer), nnx.state(expected_optimizer), "optimizer")


# --- equinox ----------------------------------------------------------------------


class EqxRegressor(eqx.Module):
    mlp: eqx.nn.MLP  # holds jax.nn.relu (and an identity final activation) as leaves
    scale: float = eqx.field(static=True)

    def __init__(self, key, scale: float = 0.5):
        self.mlp = eqx.nn.MLP(4, 1, 16, 2, activation=jax.nn.relu, key=key)
        self.scale = scale

    def __call__(self, x):
        return jax.vmap(self.mlp)(x) * self.scale


EQX_TX = optax.adam(1e-2)


def eqx_state(seed: int) -> dict:
    model = EqxRegressor(jax.random.key(seed))
    return {"model": model, "opt_state": EQX_TX.init(eqx.filter(model, eqx.is_array))}


@eqx.filter_jit
def eqx_train_step(state: dict, x, y) -> dict:
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    model = state["model"]
    _, grads = eqx.filter_value_and_grad(loss_fn)(model)
    updates, opt_state = EQX_TX.update(grads, state["opt_state"], eqx.filter(model, eqx.is_array))
    return {"model": eqx.apply_updates(model, updates), "opt_state": opt_state}


def train_eqx(state: dict, start: int, until: int, ckpt=None) -> dict:
    for step in range(start, until):
        state = eqx_train_step(state, *regression_batch(step, 4, 1))
        if ckpt is not None:
            ckpt.maybe_save_checkpoints(state, step + 1)  # the module itself, unfiltered
    return state


def crashed_eqx_run(registry: str) -> None:
    ckpt = new_checkpointer(registry, "eqx")
    train_eqx(eqx_state(0), 0, CRASH_AFTER, ckpt)
    del ckpt


def test_equinox_module_restored_into_a_fresh_module_resumes_bit_identically(registry):
    crashed_eqx_run(registry)
    loaded = new_checkpointer(registry, "eqx").load_latest(target=eqx_state(1))
    assert loaded["step"] == SAVE_EVERY

    resumed = train_eqx(loaded["state"], loaded["step"], TOTAL_STEPS)

    assert_bit_identical(resumed, train_eqx(eqx_state(0), 0, TOTAL_STEPS), "equinox state")


def test_equinox_module_restored_into_filter_eval_shape_resumes_bit_identically(registry):
    crashed_eqx_run(registry)
    target = eqx.filter_eval_shape(eqx_state, 1)  # ShapeDtypeStructs, functions kept
    loaded = new_checkpointer(registry, "eqx").load_latest(target=target)
    assert_all_jax_arrays(eqx.filter(loaded["state"], eqx.is_array), "restored module")

    resumed = train_eqx(loaded["state"], loaded["step"], TOTAL_STEPS)

    assert_bit_identical(resumed, train_eqx(eqx_state(0), 0, TOTAL_STEPS), "equinox state")


def test_equinox_restore_takes_functions_and_static_fields_from_the_target(registry):
    crashed_eqx_run(registry)
    target = eqx_state(1)
    model = new_checkpointer(registry, "eqx").load_latest(target=target)["state"]["model"]

    assert type(model) is EqxRegressor, f"restored a {type(model)}"
    assert model.mlp.activation is jax.nn.relu, f"activation is {model.mlp.activation!r}"
    assert model.mlp.final_activation is target["model"].mlp.final_activation
    assert model.scale == 0.5
    assert model.mlp.width_size == 16 and model.mlp.depth == 2
    saved = train_eqx(eqx_state(0), 0, SAVE_EVERY)["model"]
    assert_bit_identical(model, saved, "restored module")


def test_equinox_module_without_target_comes_back_with_none_for_functions(registry):
    crashed_eqx_run(registry)
    restored = new_checkpointer(registry, "eqx").load_latest()["state"]["model"]
    saved = train_eqx(eqx_state(0), 0, SAVE_EVERY)["model"]

    # Modules come back as dicts of their fields; static fields are not stored.
    assert type(restored) is dict and set(restored) == {"mlp"}, f"got {restored!r}"
    mlp = restored["mlp"]
    assert mlp["activation"] is None, f"activation came back as {mlp['activation']!r}"
    assert mlp["final_activation"] is None, f"got {mlp['final_activation']!r}"
    assert len(mlp["layers"]) == len(saved.mlp.layers)
    for i, (layer, saved_layer) in enumerate(zip(mlp["layers"], saved.mlp.layers, strict=True)):
        for name in ("weight", "bias"):
            got = layer[name]
            assert type(got) is np.ndarray, f"layers[{i}].{name} is a {type(got)}"
            np.testing.assert_array_equal(
                got,
                np.asarray(getattr(saved_layer, name)),
                strict=True,
                err_msg=f"layers[{i}].{name}",
            )


# --- optax ------------------------------------------------------------------------

OPTIMIZERS = {
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=1e-2),
    "sgd_nesterov": optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "lion": optax.lion(1e-3),
    "chain_clip_warmup_cosine": optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, warmup_steps=3, decay_steps=10)),
    ),
    "inject_hyperparams": optax.inject_hyperparams(optax.adam)(learning_rate=1e-2),
    "multi_steps": optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
    "masked": optax.masked(optax.adam(1e-2), {"w": True, "b": False}),
}
OPTAX_SAVE_AT = 4  # MultiSteps is then mid-accumulation (1 of 3 micro-steps)


def linear_params(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.standard_normal((4, 2), dtype=np.float32)),
        "b": jnp.zeros((2,), jnp.float32),
    }


@functools.cache
def optax_train_step(name: str):
    tx = OPTIMIZERS[name]

    def loss_fn(params, x, y):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    @jax.jit
    def step(state, x, y):
        grads = jax.grad(loss_fn)(state["params"], x, y)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}

    return step


def optax_state(name: str, seed: int) -> dict:
    params = linear_params(seed)
    return {"params": params, "opt_state": OPTIMIZERS[name].init(params)}


def train_optax(name: str, state: dict, start: int, until: int) -> dict:
    for step in range(start, until):
        state = optax_train_step(name)(state, *regression_batch(step, 4, 2))
    return state


def saved_optax_run(registry: str, name: str) -> dict:
    state = train_optax(name, optax_state(name, 0), 0, OPTAX_SAVE_AT)
    ckpt = new_checkpointer(registry, name)
    assert ckpt.save_checkpoint(state, step=OPTAX_SAVE_AT) is not None
    return state


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optax_state_restored_into_a_fresh_init_is_accepted_by_update_and_resumes_bit_identically(
    registry, name
):
    saved = saved_optax_run(registry, name)
    target = optax_state(name, 1)
    loaded = new_checkpointer(registry, name).load_latest(target=target)
    assert loaded["step"] == OPTAX_SAVE_AT
    restored = loaded["state"]
    assert namedtuple_types(restored["opt_state"]) == namedtuple_types(saved["opt_state"])
    assert_bit_identical(restored, saved, f"{name} restored")

    grads = jax.tree.map(jnp.ones_like, restored["params"])
    updates, _ = OPTIMIZERS[name].update(grads, restored["opt_state"], restored["params"])
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(grads)

    resumed = train_optax(name, restored, OPTAX_SAVE_AT, TOTAL_STEPS)
    expected = train_optax(name, optax_state(name, 0), 0, TOTAL_STEPS)
    assert_bit_identical(resumed, expected, f"{name} state")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optax_state_without_target_keeps_its_namedtuple_classes(registry, name):
    saved = saved_optax_run(registry, name)
    restored = new_checkpointer(registry, name).load_latest()["state"]

    got, want = namedtuple_types(restored["opt_state"]), namedtuple_types(saved["opt_state"])
    assert got == want, f"{name}: NamedTuple classes by path differ\n got:  {got}\n want: {want}"
    assert_bit_identical(restored, jax.device_get(saved), f"{name} restored")


# --- sharded over 8 CPU devices (in a subprocess) ----------------------------------

WORKER = Path(__file__).with_name("integration_worker.py")


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory) -> Path:
    """Runs integration_worker.py once with 8 CPU devices; returns its output folder."""
    out_dir = tmp_path_factory.mktemp("sharded")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, str(WORKER), str(out_dir / "registry"), str(out_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=WORKER.parent.parent,
    )
    if done.returncode != 0:
        pytest.fail(
            f"integration_worker.py exited {done.returncode}:\n{done.stderr[-4000:]}",
            pytrace=False,
        )
    return out_dir


def worker_facts(out_dir: Path) -> dict:
    return json.loads((out_dir / "facts.json").read_text())


def assert_npz_identical(out_dir: Path, got: str, want: str) -> None:
    with np.load(out_dir / f"{got}.npz") as a, np.load(out_dir / f"{want}.npz") as b:
        assert sorted(a.files) == sorted(b.files), f"{got} and {want} have other leaves"
        for name in a.files:
            np.testing.assert_array_equal(
                a[name], b[name], strict=True, err_msg=f"{got} vs {want}: {name}"
            )
            assert a[name].tobytes() == b[name].tobytes(), f"{got} vs {want}: {name} bits"


def assert_restored_onto_target(out_dir: Path, restore: str) -> None:
    found = worker_facts(out_dir)["restores"][restore]
    assert found["step"] == 3, f"{restore}: loaded step {found['step']}"
    for leaf in found["leaves"]:
        assert leaf["is_jax_array"], f"{restore}{leaf['path']} is a {leaf['type']}"
        assert leaf["sharding_equal"], (
            f"{restore}{leaf['path']}: restored on {leaf['sharding']},"
            f" the target is on {leaf['target_sharding']}"
        )
    assert_npz_identical(out_dir, f"restored_{restore}", "saved")


def test_sharded_state_was_saved_from_eight_devices(sharded_run):
    # Not vacuous: the saved weights really were split over the (4, 2) mesh.
    devices = {leaf["path"]: leaf["devices"] for leaf in worker_facts(sharded_run)["saved_leaves"]}
    assert devices["['params']['w1']"] == 8, devices


def test_sharded_state_restores_onto_the_same_mesh_with_the_targets_shardings(sharded_run):
    assert_restored_onto_target(sharded_run, "mesh_4x2")


@pytest.mark.parametrize("restore", ["mesh_2x4", "mesh_8"])
def test_sharded_state_restores_onto_another_mesh_with_other_partition_specs(sharded_run, restore):
    assert_restored_onto_target(sharded_run, restore)


def test_sharded_state_restores_onto_a_single_device(sharded_run):
    assert_restored_onto_target(sharded_run, "one_device")


def test_sharded_training_resumed_on_the_same_mesh_is_bit_identical(sharded_run):
    assert_npz_identical(sharded_run, "resumed_mesh_4x2", "uninterrupted")


def test_sharded_training_resumed_on_another_mesh_matches_the_saved_state_resharded_there(
    sharded_run,
):
    assert_npz_identical(sharded_run, "resumed_mesh_2x4", "resharded_mesh_2x4")
