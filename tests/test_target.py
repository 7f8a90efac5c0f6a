"""Loads with ``target=``: the state comes back in the target's types and placement."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from helpers import assert_tree_equal, small_state


class TrainState(NamedTuple):
    params: dict
    opt_state: object
    step: object


def saved_checkpointer(make_checkpointer, state, step=1):
    ckpt = make_checkpointer()
    assert ckpt.save_checkpoint(state, step=step) is not None
    return ckpt


def zeros_like_tree(tree):
    return jax.tree_util.tree_map(lambda x: jnp.zeros(np.shape(x), x.dtype), tree)


def test_jax_array_target_gives_jax_arrays(make_checkpointer):
    state = small_state()
    ckpt = saved_checkpointer(make_checkpointer, state)
    restored = ckpt.load_checkpoint(1, target=zeros_like_tree(state))["state"]
    for leaf in jax.tree_util.tree_leaves(restored):
        assert isinstance(leaf, jax.Array)
    assert_tree_equal(state, jax.device_get(restored))


def test_numpy_target_gives_numpy_arrays(make_checkpointer):
    state = small_state()
    ckpt = saved_checkpointer(make_checkpointer, state)
    target = jax.tree_util.tree_map(np.zeros_like, state)
    restored = ckpt.load_checkpoint(1, target=target)["state"]
    for leaf in jax.tree_util.tree_leaves(restored):
        assert type(leaf) is np.ndarray
    assert_tree_equal(state, restored)


def test_shape_dtype_struct_target_gives_jax_arrays(make_checkpointer):
    state = small_state()
    ckpt = saved_checkpointer(make_checkpointer, state)
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    restored = ckpt.load_latest(target=target)["state"]
    for leaf in jax.tree_util.tree_leaves(restored):
        assert isinstance(leaf, jax.Array)
    assert_tree_equal(state, jax.device_get(restored))


def test_shape_dtype_struct_with_sharding_places_arrays_on_that_sharding(
    make_checkpointer,
):
    state = small_state()
    ckpt = saved_checkpointer(make_checkpointer, state)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), state
    )
    restored = ckpt.load_checkpoint(1, target=target)["state"]
    for leaf in jax.tree_util.tree_leaves(restored):
        assert isinstance(leaf, jax.Array)
        assert leaf.sharding == sharding
    assert_tree_equal(state, jax.device_get(restored))


def test_target_works_with_every_load_method(make_checkpointer):
    state = small_state()
    ckpt = make_checkpointer(keep_best=True)
    ckpt.save_latest(state, step=1)
    ckpt.update_best_checkpoint(state, 0.1, step=1)
    target = zeros_like_tree(state)
    for loaded in (
        ckpt.load_latest(target=target),
        ckpt.load_best(target=target),
        ckpt.load_checkpoint("latest", target=target),
    ):
        assert isinstance(loaded["state"]["params"]["w"], jax.Array)
        assert_tree_equal(state, jax.device_get(loaded["state"]))


def test_missing_checkpoint_with_target_returns_none(make_checkpointer):
    ckpt = make_checkpointer()
    assert ckpt.load_latest(target=zeros_like_tree(small_state())) is None


def test_typed_key_target_gives_typed_key(make_checkpointer):
    key = jax.random.key(3)
    ckpt = saved_checkpointer(make_checkpointer, {"rng": key})
    restored = ckpt.load_checkpoint(1, target={"rng": jax.random.key(0)})["state"]
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(restored["rng"])),
        np.asarray(jax.random.key_data(key)),
    )


# --- flax TrainState --------------------------------------------------------------


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(1)(x)


def make_flax_state(seed):
    model = MLP()
    params = model.init(jax.random.key(seed), jnp.ones((1, 3)))
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))


def flax_grads(state):
    x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)

    def loss(params):
        return jnp.mean(state.apply_fn(params, x) ** 2)

    return jax.grad(loss)(state.params)


def test_flax_train_state_target_restores_a_train_state(make_checkpointer):
    state = make_flax_state(0)
    state = state.apply_gradients(grads=flax_grads(state))
    ckpt = saved_checkpointer(make_checkpointer, state, step=int(state.step))

    target = make_flax_state(1)
    restored = ckpt.load_latest(target=target)["state"]

    assert type(restored) is train_state.TrainState
    assert restored.apply_fn is target.apply_fn
    assert restored.tx is target.tx
    assert int(restored.step) == 1
    assert_tree_equal(jax.device_get(state.params), jax.device_get(restored.params))
    assert_tree_equal(jax.device_get(state.opt_state), jax.device_get(restored.opt_state))


def test_restored_flax_train_state_can_apply_gradients(make_checkpointer):
    state = make_flax_state(0)
    state = state.apply_gradients(grads=flax_grads(state))
    ckpt = saved_checkpointer(make_checkpointer, state, step=int(state.step))
    restored = ckpt.load_latest(target=make_flax_state(1))["state"]

    expected = state.apply_gradients(grads=flax_grads(state))
    continued = restored.apply_gradients(grads=flax_grads(restored))
    assert int(continued.step) == 2
    assert_tree_equal(jax.device_get(expected.params), jax.device_get(continued.params))


def test_flax_train_state_without_target_comes_back_as_dict_of_fields(
    make_checkpointer,
):
    state = make_flax_state(0)
    ckpt = saved_checkpointer(make_checkpointer, state, step=0)
    restored = ckpt.load_checkpoint(0)["state"]
    assert type(restored) is dict
    assert set(restored) == {"step", "params", "opt_state"}
    assert_tree_equal(jax.device_get(state.params), restored["params"])


# --- mismatches -------------------------------------------------------------------


def test_shape_mismatch_raises_value_error_naming_the_leaf(make_checkpointer):
    state = {"encoder": {"kernel": np.ones((3, 4), np.float32)}}
    ckpt = saved_checkpointer(make_checkpointer, state)
    target = {"encoder": {"kernel": np.ones((4, 4), np.float32)}}
    with pytest.raises(ValueError) as excinfo:
        ckpt.load_checkpoint(1, target=target)
    assert "encoder" in str(excinfo.value)
    assert "kernel" in str(excinfo.value)


def test_dtype_mismatch_raises_value_error_naming_the_leaf(make_checkpointer):
    state = {"encoder": {"kernel": np.ones((3, 4), np.float32)}}
    ckpt = saved_checkpointer(make_checkpointer, state)
    target = {"encoder": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float16)}}
    with pytest.raises(ValueError) as excinfo:
        ckpt.load_checkpoint(1, target=target)
    assert "encoder" in str(excinfo.value)
    assert "kernel" in str(excinfo.value)


def test_target_leaf_missing_from_checkpoint_raises_value_error_naming_it(
    make_checkpointer,
):
    ckpt = saved_checkpointer(make_checkpointer, {"params": {"w": np.ones(3)}})
    target = {"params": {"w": np.ones(3), "extra_bias": np.ones(3)}}
    with pytest.raises(ValueError) as excinfo:
        ckpt.load_checkpoint(1, target=target)
    assert "extra_bias" in str(excinfo.value)


# --- partial restore --------------------------------------------------------------


def test_pruned_target_restores_only_the_named_part(make_checkpointer):
    state = small_state()
    ckpt = saved_checkpointer(make_checkpointer, state)
    target = {"params": zeros_like_tree(state["params"])}
    restored = ckpt.load_checkpoint(1, target=target)["state"]
    assert set(restored) == {"params"}
    assert_tree_equal(state["params"], jax.device_get(restored["params"]))


def test_plain_tuple_target_restores_a_saved_namedtuple_by_position(make_checkpointer):
    state = TrainState(
        params={"w": np.arange(3.0, dtype=np.float32)},
        opt_state=np.ones(2, np.float32),
        step=np.int32(4),
    )
    ckpt = saved_checkpointer(make_checkpointer, state)
    target = ({"w": np.zeros(3, np.float32)}, np.zeros(2, np.float32), np.int32(0))
    restored = ckpt.load_checkpoint(1, target=target)["state"]
    assert type(restored) is tuple
    assert_tree_equal(tuple(state), restored)


def test_target_matching_two_subtrees_at_one_depth_raises_naming_both(make_checkpointer):
    state = {"encoder": {"w": np.ones(3, np.float32)}, "decoder": {"w": np.zeros(3, np.float32)}}
    ckpt = saved_checkpointer(make_checkpointer, state)
    with pytest.raises(ValueError, match="several subtrees") as excinfo:
        ckpt.load_checkpoint(1, target={"w": np.zeros(3, np.float32)})
    assert "'encoder'" in str(excinfo.value) and "'decoder'" in str(excinfo.value)


def test_subtree_target_restores_params_of_a_saved_train_state(make_checkpointer):
    params = {
        "dense": {
            "kernel": jnp.asarray(np.arange(6.0).reshape(2, 3), jnp.float32),
            "bias": jnp.asarray([1.0, 2.0, 3.0], jnp.float32),
        }
    }
    optimizer = optax.adam(1e-1)
    opt_state = optimizer.init(params)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    state = TrainState(params=params, opt_state=opt_state, step=jnp.asarray(1))
    ckpt = saved_checkpointer(make_checkpointer, state)

    # mu and nu have the same structure as params: the shallowest match is params.
    restored = ckpt.load_checkpoint(1, target=zeros_like_tree(params))["state"]

    assert set(restored) == {"dense"}
    assert isinstance(restored["dense"]["kernel"], jax.Array)
    assert_tree_equal(jax.device_get(params), jax.device_get(restored))


@pytest.mark.parametrize(
    "saved, target",
    [({"a": None}, {"a": 0}), ({"a": np.ones(3)}, {"a": "name"}), ({"a": "x"}, {"a": 1.0})],
    ids=["int-target-none-saved", "str-target-array-saved", "float-target-str-saved"],
)
def test_target_leaf_of_another_kind_than_saved_raises_naming_it(make_checkpointer, saved, target):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(saved, step=1)
    with pytest.raises(ValueError, match=r"\['a'\]"):
        ckpt.load_checkpoint(1, target=target)


# --- allow_cast: a dtype cast on restore, only when asked for ---------------------------


def _bits(array) -> np.ndarray:
    """The raw bytes of an array, to compare casts bit for bit (NaN included)."""
    array = np.asarray(jax.device_get(array))
    return array.view(np.dtype(f"V{array.dtype.itemsize}"))


@pytest.mark.parametrize("load", ["load_checkpoint", "load_latest", "load_best"])
def test_allow_cast_restores_a_float32_checkpoint_into_bfloat16_as_numpy_astype_does(
    make_checkpointer, load
):
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((64, 33)).astype(np.float32) * 1e3
    weights.flat[:4] = [np.inf, -np.inf, np.nan, 3.4e38]  # rounding edges: inf, nan, overflow
    ckpt = make_checkpointer()
    ckpt.save_checkpoint({"params": {"w": weights}}, step=1, is_best=True)
    ckpt.save_checkpoint({"params": {"w": weights}}, step=1)
    target = {"params": {"w": jax.ShapeDtypeStruct((64, 33), jnp.bfloat16)}}
    args = (1,) if load == "load_checkpoint" else ()

    restored = getattr(ckpt, load)(*args, target=target, allow_cast=True)["state"]

    w = restored["params"]["w"]
    assert isinstance(w, jax.Array) and w.dtype == jnp.bfloat16
    np.testing.assert_array_equal(_bits(w), _bits(weights.astype(jnp.bfloat16)))


def test_without_allow_cast_a_dtype_mismatch_raises_naming_the_leaf_and_the_keyword(
    make_checkpointer,
):
    ckpt = saved_checkpointer(make_checkpointer, {"params": {"w": np.ones(3, np.float32)}})
    target = {"params": {"w": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}}
    with pytest.raises(ValueError) as raised:
        ckpt.load_checkpoint(1, target=target)
    assert str(raised.value) == (
        "Leaf at ['params']['w']: dtype float32 in the checkpoint, bfloat16 in the target "
        "(pass allow_cast=True to cast it)"
    )


def test_allow_cast_restores_ints_into_floats_exactly_also_into_numpy_targets(make_checkpointer):
    counts = np.arange(-5, 1000, dtype=np.int32)
    ckpt = saved_checkpointer(make_checkpointer, {"counts": counts, "step": np.int64(7)})
    target = {"counts": np.zeros(counts.shape, np.float32), "step": jnp.zeros((), jnp.int32)}

    restored = ckpt.load_checkpoint(1, target=target, allow_cast=True)["state"]

    assert type(restored["counts"]) is np.ndarray and restored["counts"].dtype == np.float32
    np.testing.assert_array_equal(restored["counts"], counts.astype(np.float32))
    assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 7


def test_allow_cast_refuses_an_int_that_does_not_fit_the_narrower_int_naming_the_leaf(
    make_checkpointer,
):
    ckpt = saved_checkpointer(make_checkpointer, {"ids": np.array([1, 300], np.int64)})
    with pytest.raises(ValueError, match=r"\['ids'\].*1 to 300.*int8"):
        ckpt.load_checkpoint(1, target={"ids": np.zeros(2, np.int8)}, allow_cast=True)


@pytest.mark.parametrize(
    "saved, target",
    [
        (np.ones(3, np.float32), np.zeros(3, np.int32)),
        (np.ones(3, np.float32), np.zeros(3, bool)),
        (np.ones(3, bool), np.zeros(3, np.float32)),
        (np.ones(3, np.complex64), np.zeros(3, np.float32)),
    ],
    ids=["float-to-int", "float-to-bool", "bool-to-float", "complex-to-real"],
)
def test_allow_cast_refuses_casts_that_change_what_the_values_mean(
    make_checkpointer, saved, target
):
    ckpt = saved_checkpointer(make_checkpointer, {"x": saved})
    with pytest.raises(ValueError, match=r"Leaf at \['x'\]: dtype .* allow_cast casts numbers"):
        ckpt.load_checkpoint(1, target={"x": target}, allow_cast=True)


def test_allow_cast_still_refuses_a_shape_mismatch_naming_the_leaf(make_checkpointer):
    ckpt = saved_checkpointer(
        make_checkpointer, {"encoder": {"kernel": np.ones((3, 4), np.float32)}}
    )
    target = {"encoder": {"kernel": jax.ShapeDtypeStruct((4, 4), jnp.bfloat16)}}
    with pytest.raises(ValueError, match=r"\['encoder'\]\['kernel'\]: shape \(3, 4\)"):
        ckpt.load_checkpoint(1, target=target, allow_cast=True)


@pytest.mark.parametrize(
    "saved, target",
    [
        (jax.random.key(1), jnp.zeros((2,), jnp.uint32)),
        (np.zeros((2,), np.uint32), jax.random.key(0)),
        (jax.random.key(1, impl="threefry2x32"), jax.random.key(0, impl="rbg")),
    ],
    ids=["key-into-uint32", "uint32-into-key", "threefry-into-rbg"],
)
def test_allow_cast_never_casts_prng_keys(make_checkpointer, saved, target):
    ckpt = saved_checkpointer(make_checkpointer, {"rng": saved})
    with pytest.raises(ValueError, match=r"\['rng'\]"):
        ckpt.load_checkpoint(1, target={"rng": target}, allow_cast=True)


def test_allow_cast_keeps_a_prng_key_of_the_same_implementation_as_it_is(make_checkpointer):
    key = jax.random.key(3)
    state = {"rng": key, "w": np.ones(2, np.float32)}
    ckpt = saved_checkpointer(make_checkpointer, state)
    target = {"rng": jax.random.key(0), "w": jnp.zeros(2, jnp.bfloat16)}
    restored = ckpt.load_checkpoint(1, target=target, allow_cast=True)["state"]
    assert restored["rng"].dtype == key.dtype
    np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(key))


def test_allow_cast_applies_to_a_legacy_pickle_too(make_checkpointer):
    import os
    import pickle

    ckpt = make_checkpointer()
    weights = np.linspace(-3, 3, 10, dtype=np.float32)
    with open(os.path.join(ckpt.checkpoint_dir, "state_5.pyd"), "wb") as f:
        pickle.dump({"state": {"w": weights}, "step": 5, "time": 1.0}, f)
    target = {"w": jax.ShapeDtypeStruct((10,), jnp.bfloat16)}
    with pytest.raises(ValueError, match="allow_cast=True"):
        ckpt.load_latest(target=target)
    restored = ckpt.load_latest(target=target, allow_cast=True)["state"]
    np.testing.assert_array_equal(_bits(restored["w"]), _bits(weights.astype(jnp.bfloat16)))


@pytest.mark.parametrize("dtype", ["int4", "uint4"])
def test_allow_cast_restores_ints_into_the_narrow_ints_of_ml_dtypes(make_checkpointer, dtype):
    import ml_dtypes

    narrow = np.dtype(getattr(ml_dtypes, dtype))
    ckpt = saved_checkpointer(make_checkpointer, {"a": np.array([0, 1, 7], np.int8)})

    restored = ckpt.load_checkpoint(1, target={"a": np.zeros(3, narrow)}, allow_cast=True)

    assert restored["state"]["a"].dtype == narrow
    assert restored["state"]["a"].astype(np.int8).tolist() == [0, 1, 7]
    with pytest.raises(ValueError, match=r"Leaf at \['a'\].*do not fit"):
        ckpt = saved_checkpointer(make_checkpointer, {"a": np.array([0, 16], np.int8)})
        ckpt.load_checkpoint(1, target={"a": np.zeros(2, narrow)}, allow_cast=True)


# --- a Python scalar saved where the target has a 0-d array (a step counter) -------------


@pytest.mark.parametrize("allow_cast", [False, True], ids=["plain", "allow_cast"])
@pytest.mark.parametrize(
    "value, dtype",
    [(300, jnp.int8), (2**40, jnp.int32), (-1, jnp.uint32)],
    ids=["300-into-int8", "2**40-into-int32", "minus-1-into-uint32"],
)
def test_a_python_int_that_does_not_fit_a_0d_int_target_raises_naming_the_leaf(
    make_checkpointer, value, dtype, allow_cast
):
    ckpt = saved_checkpointer(make_checkpointer, {"opt": {"count": value}})
    target = {"opt": {"count": jax.ShapeDtypeStruct((), dtype)}}
    with pytest.raises(
        ValueError, match=rf"Leaf at \['opt'\]\['count'\]: .*{value}.*{np.dtype(dtype)}"
    ):
        ckpt.load_checkpoint(1, target=target, allow_cast=allow_cast)


def test_a_python_int_that_fits_restores_into_a_0d_int_target_without_allow_cast(
    make_checkpointer,
):
    ckpt = saved_checkpointer(make_checkpointer, {"step": 127, "count": 2**31 - 1, "n": 5})
    target = {
        "step": jax.ShapeDtypeStruct((), jnp.int8),
        "count": jnp.zeros((), jnp.int32),
        "n": 0,
    }
    restored = ckpt.load_checkpoint(1, target=target)["state"]
    assert restored["step"].dtype == jnp.int8 and int(restored["step"]) == 127
    assert restored["count"].dtype == jnp.int32 and int(restored["count"]) == 2**31 - 1
    assert type(restored["n"]) is int and restored["n"] == 5


@pytest.mark.parametrize(
    "value, dtype",
    [(2**40, np.float16), (1e300, np.float32), (np.float64(1e300), np.float32)],
    ids=["2**40-into-float16", "1e300-into-float32", "numpy-float64-into-float32"],
)
def test_a_scalar_that_would_overflow_a_0d_float_target_needs_allow_cast(
    make_checkpointer, value, dtype
):
    """A Python scalar that becomes inf in the target's dtype, or a NumPy float64 scalar
    (a dtype of its own, checked as an array), is not restored without allow_cast."""
    ckpt = saved_checkpointer(make_checkpointer, {"x": value})
    target = {"x": np.zeros((), dtype)}
    with pytest.raises(ValueError, match=r"Leaf at \['x'\]: .*allow_cast=True"):
        ckpt.load_checkpoint(1, target=target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # overflow to inf, as astype does
        restored = ckpt.load_checkpoint(1, target=target, allow_cast=True)["state"]
        expected = np.asarray(value).astype(dtype)
    assert restored["x"].dtype == dtype
    np.testing.assert_array_equal(restored["x"], expected)


def test_a_python_scalar_takes_a_0d_target_dtype_of_its_kind_as_jax_would(make_checkpointer):
    """A Python scalar is weakly typed, as in jax: it restores into the target's dtype
    (rounded where that is narrower) without allow_cast, as jnp.asarray would give it."""
    saved = {"a": 300, "b": 0.5, "c": 2**40, "lr": 0.1, "flag": True, "nan": float("nan")}
    ckpt = saved_checkpointer(make_checkpointer, saved)
    target = {
        "a": np.zeros((), np.float16),
        "b": jax.ShapeDtypeStruct((), jnp.bfloat16),
        "c": np.zeros((), np.float32),
        "lr": jnp.zeros((), jnp.float32),
        "flag": np.zeros((), np.int32),
        "nan": np.zeros((), np.float16),
    }
    restored = ckpt.load_checkpoint(1, target=target)["state"]
    for key, leaf in target.items():
        expected = np.asarray(jnp.asarray(saved[key], dtype=leaf.dtype))
        assert np.asarray(restored[key]).dtype == expected.dtype, key
        np.testing.assert_array_equal(np.asarray(restored[key]), expected, err_msg=key)


def test_a_python_float_never_restores_into_a_0d_int_target(make_checkpointer):
    ckpt = saved_checkpointer(make_checkpointer, {"x": 2.0})
    with pytest.raises(ValueError, match=r"Leaf at \['x'\]: dtype float64"):
        ckpt.load_checkpoint(1, target={"x": np.zeros((), np.int32)})


def test_an_optax_count_saved_as_a_python_int_restores_into_its_int32_count(make_checkpointer):
    tx = optax.adam(1e-2)
    params = {"w": jnp.ones(3)}
    saved = {"params": params, "opt_state": tx.init(params), "step": 0}
    ckpt = saved_checkpointer(make_checkpointer, saved)
    target = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
    restored = ckpt.load_checkpoint(1, target=target)["state"]
    assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 0
    assert restored["opt_state"][0].count.dtype == jnp.int32
