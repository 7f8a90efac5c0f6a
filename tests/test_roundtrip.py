"""What comes back from a load without a target: the saved structure, bit-exact leaves."""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import flax.core
import flax.struct
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import assert_tree_equal, identity, is_typed_key_array, rewrite_manifest


class Pair(NamedTuple):
    first: object
    second: object


def roundtrip(make_checkpointer, state, **kwargs):
    ckpt = make_checkpointer(**kwargs)
    assert ckpt.save_checkpoint(state, step=1) is not None
    return ckpt.load_checkpoint(1)["state"]


# --- containers -------------------------------------------------------------------


def test_dict_with_str_keys_comes_back_as_dict(make_checkpointer):
    state = {"w": np.arange(3.0), "b": np.zeros(2, np.float32)}
    restored = roundtrip(make_checkpointer, state)
    assert type(restored) is dict
    assert_tree_equal(state, restored)


def test_dict_int_keys_stay_int(make_checkpointer):
    state = {"layers": {0: np.ones(2, np.float32), 1: np.zeros(2, np.float32)}}
    restored = roundtrip(make_checkpointer, state)
    assert list(restored["layers"]) == [0, 1]
    assert all(type(k) is int for k in restored["layers"])
    assert_tree_equal(state, restored)


def test_dict_int_and_str_keys_keep_their_types(make_checkpointer):
    state = {"by_index": {3: np.int32(1), 12: 2.5}, "by_name": {"3": "three"}}
    restored = roundtrip(make_checkpointer, state)
    assert set(restored["by_index"]) == {3, 12}
    assert set(restored["by_name"]) == {"3"}
    assert restored["by_name"]["3"] == "three"


def test_one_dict_may_mix_int_and_str_keys(make_checkpointer):
    state = {"name": "embeddings", 0: np.zeros(2, np.float32), 1: np.ones(2, np.float32)}
    restored = roundtrip(make_checkpointer, state, prepare_fn=identity)
    assert list(restored) == ["name", 0, 1]
    assert [type(k) for k in restored] == [str, int, int]
    np.testing.assert_array_equal(restored[1], np.ones(2, np.float32))


def test_dict_insertion_order_is_kept(make_checkpointer):
    state = {"zeta": 1, "alpha": 2, "mid": {"y": 3, "x": 4}}
    restored = roundtrip(make_checkpointer, state, prepare_fn=identity)
    assert list(restored) == ["zeta", "alpha", "mid"]
    assert list(restored["mid"]) == ["y", "x"]


def test_list_tuple_and_none_come_back_as_saved(make_checkpointer):
    state = {
        "list": [np.arange(2), 3, "x"],
        "tuple": (np.ones(1, np.float32), (None, 2.0)),
        "none": None,
        "empty": {"list": [], "tuple": (), "dict": {}},
    }
    restored = roundtrip(make_checkpointer, state)
    assert type(restored["list"]) is list
    assert type(restored["tuple"]) is tuple
    assert type(restored["tuple"][1]) is tuple
    assert restored["none"] is None
    assert restored["tuple"][1][0] is None
    assert restored["empty"] == {"list": [], "tuple": (), "dict": {}}
    assert_tree_equal(state, restored)


def test_deeply_nested_structure_round_trips(make_checkpointer):
    state = {"a": [{"b": ({"c": [np.arange(4, dtype=np.int16)]},)}]}
    restored = roundtrip(make_checkpointer, state)
    assert_tree_equal(state, restored)


def test_python_scalars_keep_type_and_value(make_checkpointer):
    state = {
        "int": 7,
        "neg": -3,
        "big": 2**62,
        "float": 0.1,
        "true": True,
        "false": False,
        "complex": 1.5 - 2j,
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
    }
    restored = roundtrip(make_checkpointer, state)
    for key, value in state.items():
        assert type(restored[key]) is type(value), key
    assert restored["int"] == 7
    assert restored["neg"] == -3
    assert restored["big"] == 2**62
    assert restored["float"] == 0.1
    assert restored["true"] is True
    assert restored["false"] is False
    assert restored["complex"] == 1.5 - 2j
    assert math.isnan(restored["nan"])
    assert restored["inf"] == math.inf
    assert restored["-inf"] == -math.inf


def test_negative_zero_floats_keep_their_sign(make_checkpointer):
    state = {"float": -0.0, "complex": complex(-0.0, -0.0)}
    restored = roundtrip(make_checkpointer, state)
    assert math.copysign(1.0, restored["float"]) == -1.0
    assert math.copysign(1.0, restored["complex"].real) == -1.0
    assert math.copysign(1.0, restored["complex"].imag) == -1.0


def test_strings_round_trip_including_unicode_and_empty(make_checkpointer):
    state = {"name": "mlp", "unicode": "héllo ✓ 日本", "empty": "", "quote": 'a"b\\c'}
    assert roundtrip(make_checkpointer, state) == state


def test_namedtuple_of_an_imported_module_comes_back_as_the_same_class(
    make_checkpointer,
):
    state = Pair(first=np.arange(3), second=Pair(first=1.0, second=None))
    restored = roundtrip(make_checkpointer, state)
    assert type(restored) is Pair
    assert type(restored.second) is Pair
    assert_tree_equal(state, restored)


def test_namedtuple_whose_class_has_other_fields_now_comes_back_with_the_saved_fields(
    make_checkpointer,
):
    # Saved when Pair's fields were named otherwise: the class of today is not used
    # (its fields would misname the values), an equivalent namedtuple is.
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(Pair(first=1, second="x"), step=1)
    rewrite_manifest(path, lambda m: m["tree"].update(fields=["lr", "momentum"]))
    restored = ckpt.load_checkpoint(1)["state"]
    assert type(restored) is not Pair
    assert restored._fields == ("lr", "momentum")
    assert type(restored).__name__ == "Pair"
    assert (restored.lr, restored.momentum) == (1, "x")


class _Registered:
    """A pytree node registered without keys: jax numbers its children."""

    def __init__(self, *children):
        self.children = children


jax.tree_util.register_pytree_node(
    _Registered, lambda x: (x.children, None), lambda _, children: _Registered(*children)
)


def test_registered_node_with_numbered_children_comes_back_as_list_of_them(make_checkpointer):
    state = {"node": _Registered(np.arange(3), 2.5, "x")}
    restored = roundtrip(make_checkpointer, state)
    assert type(restored["node"]) is list
    assert_tree_equal([np.arange(3), 2.5, "x"], restored["node"])


def test_registered_mapping_with_negative_int_keys_comes_back_as_dict(make_checkpointer):
    # Int keys that are not 0..n-1 are no positions: a dict keeps them.
    state = {"table": flax.core.FrozenDict({-1: np.ones(2), 1: np.zeros(2)})}
    restored = roundtrip(make_checkpointer, state)
    assert type(restored["table"]) is dict
    assert_tree_equal({-1: np.ones(2), 1: np.zeros(2)}, restored["table"])


def test_flax_struct_dataclass_comes_back_as_dict_of_its_fields(make_checkpointer):
    @flax.struct.dataclass
    class Stats:
        mean: np.ndarray
        var: np.ndarray

    state = {"stats": Stats(mean=np.zeros(3, np.float32), var=np.ones(3, np.float32))}
    restored = roundtrip(make_checkpointer, state)
    assert type(restored["stats"]) is dict
    assert set(restored["stats"]) == {"mean", "var"}
    np.testing.assert_array_equal(restored["stats"]["var"], np.ones(3, np.float32))


# --- optax states -----------------------------------------------------------------


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
        "b": jnp.zeros((2,), jnp.float32),
    }


def _grads(scale):
    return {"w": jnp.full((3, 2), 0.1 * scale), "b": jnp.full((2,), -0.2 * scale)}


@pytest.mark.parametrize(
    "make_optimizer",
    [
        pytest.param(lambda: optax.adam(1e-3), id="adam"),
        pytest.param(
            lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3),
            id="inject_hyperparams(adam)",
        ),
    ],
)
def test_optax_state_comes_back_as_optax_classes_and_keeps_working(
    make_checkpointer, make_optimizer
):
    optimizer = make_optimizer()
    params = _params()
    opt_state = optimizer.init(params)
    updates, opt_state = optimizer.update(_grads(1.0), opt_state, params)
    params = optax.apply_updates(params, updates)

    restored = roundtrip(make_checkpointer, {"params": params, "opt_state": opt_state})

    assert jax.tree_util.tree_structure(restored["opt_state"]) == jax.tree_util.tree_structure(
        opt_state
    )
    assert_tree_equal(jax.device_get(opt_state), restored["opt_state"])
    expected_updates, expected_state = optimizer.update(_grads(2.0), opt_state, params)
    updates, new_state = optimizer.update(_grads(2.0), restored["opt_state"], restored["params"])
    assert_tree_equal(jax.device_get(expected_updates), jax.device_get(updates))
    assert_tree_equal(jax.device_get(expected_state), jax.device_get(new_state))


def test_adam_state_classes_are_optax_own(make_checkpointer):
    opt_state = optax.adam(1e-3).init(_params())
    restored = roundtrip(make_checkpointer, opt_state)
    assert type(restored) is tuple
    assert type(restored[0]) is optax.ScaleByAdamState
    assert type(restored[1]) is optax.EmptyState


# --- dtypes -----------------------------------------------------------------------

DTYPES = [
    ml_dtypes.bfloat16,
    ml_dtypes.float8_e4m3fn,
    ml_dtypes.float8_e5m2,
    ml_dtypes.int4,
    np.float16,
    np.float32,
    np.float64,
    np.bool_,
    np.int8,
    np.int32,
    np.int64,
    np.uint8,
    np.uint32,
    np.complex64,
    np.complex128,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_array_dtype_shape_and_bytes_are_preserved(make_checkpointer, dtype):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        array = (np.arange(12) % 3 == 0).reshape(3, 4)
    elif dtype == np.dtype(ml_dtypes.int4):
        array = np.arange(-6, 6).reshape(3, 4).astype(dtype)
    elif dtype.kind == "c":
        array = (np.arange(12) - 1j * np.arange(12)).reshape(3, 4).astype(dtype)
    else:
        array = np.arange(12).reshape(3, 4).astype(dtype)
    restored = roundtrip(make_checkpointer, {"x": array})["x"]
    assert isinstance(restored, np.ndarray)
    assert restored.dtype == dtype
    assert restored.shape == (3, 4)
    assert restored.tobytes() == array.tobytes()


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16])
def test_special_float_values_are_bit_exact(make_checkpointer, dtype):
    array = np.array([np.nan, -0.0, np.inf, -np.inf, 1e-40, -1.5], dtype=dtype)
    restored = roundtrip(make_checkpointer, {"x": array})["x"]
    assert restored.dtype == array.dtype
    assert restored.tobytes() == array.tobytes()


def test_non_contiguous_array_round_trips(make_checkpointer):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    view = base[:, ::2].T
    restored = roundtrip(make_checkpointer, {"x": view})["x"]
    np.testing.assert_array_equal(restored, view)
    assert restored.shape == (3, 4)


def test_zero_dimensional_array_stays_an_array(make_checkpointer):
    restored = roundtrip(make_checkpointer, {"x": np.array(3.5, np.float32)})["x"]
    assert isinstance(restored, np.ndarray)
    assert restored.shape == ()
    assert restored.dtype == np.float32
    assert restored == 3.5


@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0, 4)])
def test_zero_size_arrays_keep_their_shape(make_checkpointer, shape):
    array = np.zeros(shape, np.float32)
    restored = roundtrip(make_checkpointer, {"x": array})["x"]
    assert restored.shape == shape
    assert restored.dtype == np.float32


def test_many_leaves_with_mixed_dtypes_round_trip(make_checkpointer):
    state = {
        f"leaf_{i}": np.arange(i + 1).astype(dtype)
        for i, dtype in enumerate(DTYPES)
        if np.dtype(dtype) != np.dtype(ml_dtypes.int4)
    }
    assert_tree_equal(state, roundtrip(make_checkpointer, state))


def test_numpy_scalar_comes_back_as_numpy_scalar_of_same_dtype(make_checkpointer):
    state = {"f": np.float32(1.5), "i": np.int64(-7), "b": np.bool_(True)}
    restored = roundtrip(make_checkpointer, state, prepare_fn=identity)
    for key, value in state.items():
        assert isinstance(restored[key], np.generic), key
        assert restored[key].dtype == value.dtype, key
        assert restored[key] == value, key


def test_numpy_scalar_keeps_dtype_and_value_with_default_prepare_fn(
    make_checkpointer,
):
    restored = roundtrip(make_checkpointer, {"f": np.float16(0.5)})["f"]
    assert np.ndim(restored) == 0
    assert np.asarray(restored).dtype == np.float16
    assert restored == np.float16(0.5)


def test_jax_arrays_come_back_as_numpy_arrays(make_checkpointer):
    state = {"w": jnp.arange(6.0).reshape(2, 3), "i": jnp.arange(3, dtype=jnp.int32)}
    restored = roundtrip(make_checkpointer, state)
    for key in state:
        assert type(restored[key]) is np.ndarray
        assert not isinstance(restored[key], jax.Array)
        np.testing.assert_array_equal(restored[key], np.asarray(state[key]))
        assert restored[key].dtype == state[key].dtype


def test_large_array_round_trips(make_checkpointer):
    array = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    restored = roundtrip(make_checkpointer, {"big": array})["big"]
    assert restored.tobytes() == array.tobytes()


# --- PRNG keys --------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_typed_prng_key_comes_back_as_typed_key_of_same_impl(make_checkpointer, impl):
    key = jax.random.key(0, impl=impl)
    restored = roundtrip(make_checkpointer, {"rng": key})["rng"]
    assert is_typed_key_array(restored)
    assert str(jax.random.key_impl(restored)) == str(jax.random.key_impl(key))
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(restored)),
        np.asarray(jax.random.key_data(key)),
    )


def test_batch_of_typed_keys_round_trips_and_draws_the_same_numbers(
    make_checkpointer,
):
    keys = jax.random.split(jax.random.key(42), 5)
    restored = roundtrip(make_checkpointer, {"rngs": keys})["rngs"]
    assert is_typed_key_array(restored)
    assert restored.shape == (5,)
    np.testing.assert_array_equal(
        np.asarray(jax.random.key_data(restored)),
        np.asarray(jax.random.key_data(keys)),
    )
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(lambda k: jax.random.normal(k, (3,)))(restored)),
        np.asarray(jax.vmap(lambda k: jax.random.normal(k, (3,)))(keys)),
    )


def test_raw_uint32_key_stays_a_uint32_array(make_checkpointer):
    raw = jax.random.PRNGKey(0)
    restored = roundtrip(make_checkpointer, {"rng": raw})["rng"]
    assert not is_typed_key_array(restored)
    assert restored.dtype == np.uint32
    np.testing.assert_array_equal(restored, np.asarray(raw))


# --- step, time, metrics, missing -------------------------------------------------


def test_load_returns_step_time_metrics_and_state(make_checkpointer):
    ckpt = make_checkpointer()
    before = time.time()
    ckpt.save_checkpoint({"x": np.ones(2)}, step=12, metrics={"val/loss": 0.5})
    after = time.time()
    loaded = ckpt.load_checkpoint(12)
    assert set(loaded) == {"state", "step", "time", "metrics"}
    assert loaded["step"] == 12
    assert before - 1 <= loaded["time"] <= after + 1
    assert loaded["metrics"] == {"val/loss": 0.5}


def test_metrics_round_trip_with_their_values(make_checkpointer):
    ckpt = make_checkpointer()
    metrics = {"val/loss": 0.125, "acc": 0.9, "epoch": 3, "nan_metric": math.nan}
    ckpt.save_checkpoint({"x": np.ones(2)}, step=1, metrics=metrics)
    loaded = ckpt.load_checkpoint(1)["metrics"]
    assert set(loaded) == set(metrics)
    assert loaded["val/loss"] == 0.125
    assert loaded["acc"] == 0.9
    assert loaded["epoch"] == 3
    assert math.isnan(loaded["nan_metric"])


def test_metrics_is_empty_dict_when_none_were_saved(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint({"x": np.ones(2)}, step=1)
    assert ckpt.load_checkpoint(1)["metrics"] == {}


def test_jax_scalar_metrics_are_stored_as_numbers(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint({"x": np.ones(2)}, step=1, metrics={"loss": jnp.float32(2)})
    assert float(ckpt.load_checkpoint(1)["metrics"]["loss"]) == 2.0


def test_load_of_missing_checkpoint_returns_none(make_checkpointer):
    ckpt = make_checkpointer()
    assert ckpt.load_latest() is None
    assert ckpt.load_best() is None
    assert ckpt.load_checkpoint(-1) is None
    assert ckpt.load_checkpoint(5) is None
    assert ckpt.load_checkpoint("latest") is None
    assert ckpt.load_checkpoint("no_such_name") is None


def test_load_of_missing_step_returns_none_when_others_exist(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint({"x": np.ones(2)}, step=10)
    assert ckpt.load_checkpoint(11) is None
    assert ckpt.load_checkpoint("11") is None


def test_numpy_float64_and_complex128_scalars_stay_numpy_scalars(make_checkpointer):
    """np.float64 and np.complex128 subclass Python's float and complex; they still
    come back as NumPy scalars of their dtype."""
    ckpt = make_checkpointer()
    state = {"lr": np.float64(0.25), "c": np.complex128(1 + 2j), "i": np.int64(3)}
    loaded = ckpt.load_checkpoint(ckpt.save_checkpoint(state, step=1))["state"]
    for key, value in state.items():
        assert type(loaded[key]) is type(value)
        assert loaded[key] == value
