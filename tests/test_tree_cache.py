"""The encoded structure kept between saves (``_tree_cache.TreeCache``) never changes
what a save writes: for any state saved after any other, the cached encoding equals a
fresh ``encode_tree`` of it (the same structure, tensor names, paths, kinds and
values), and a checkpoint saved through it loads as saved."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_equal, scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnax.checkpoint._tree import encode_tree
from learnax.checkpoint._tree_cache import TreeCache

Pair = collections.namedtuple("Pair", "first second")

# Leaves: each kind the encoder tells apart, in a few dtypes and values, so that two
# states drawn from the same shape of tree differ in type, dtype or value now and then.
LEAVES = st.one_of(
    st.integers(0, 2).map(lambda i: jnp.full((2,), i, jnp.float32)),
    st.integers(0, 2).map(lambda i: jnp.full((2,), i, jnp.bfloat16)),
    st.integers(0, 2).map(lambda i: np.full((3,), i, np.int32)),
    st.integers(0, 2).map(np.float32),
    st.integers(0, 2).map(lambda i: jax.random.key(i)),
    st.integers(0, 2),
    st.booleans(),
    st.sampled_from([0.5, 0.0, -0.0, 0j, complex(0.0, -0.0), float("nan"), "a", "b", None]),
)


def trees(leaves=LEAVES):
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.dictionaries(
                st.sampled_from(["w", "b", "k", 0, 1, True, 1.0]), children, max_size=3
            ),
            st.lists(children, max_size=3),
            st.tuples(children, children),
            st.builds(Pair, children, children),
        ),
        max_leaves=8,
    )


def signature(encoded):
    node, leaves = encoded
    # repr, not ==: the node must keep -0.0 apart from 0.0 and True apart from 1.
    return repr(node), [(leaf.name, tuple(leaf.keypath), leaf.kind, leaf.impl) for leaf in leaves]


def assert_same_encoding(cached, fresh) -> None:
    assert signature(cached) == signature(fresh)
    for a, b in zip(cached[1], fresh[1], strict=True):
        assert type(a.value) is type(b.value)
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))


@settings(max_examples=scaled(60, 300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(trees(), min_size=2, max_size=4))
def test_cached_encoding_equals_a_fresh_one_for_any_sequence_of_states(states):
    cache = TreeCache()
    for state in states:
        try:
            fresh = encode_tree(state)
        except (TypeError, ValueError):
            with pytest.raises((TypeError, ValueError)):
                cache.encode(state)
            continue
        assert_same_encoding(cache.encode(state), fresh)


@settings(max_examples=scaled(30, 100), deadline=None)
@given(trees(), st.data())
def test_the_same_structure_with_other_leaves_is_encoded_afresh_where_they_differ(tree, data):
    """Same treedef, leaves replaced one by one with values drawn anew (a Python scalar
    changing value, an array changing dtype): still the fresh encoding."""
    cache = TreeCache()
    try:
        cache.encode(tree)
        leaves, treedef = jax.tree_util.tree_flatten(tree)
    except (TypeError, ValueError):  # not savable, or keys jax cannot sort (int and str)
        return
    changed = [data.draw(LEAVES) if data.draw(st.booleans()) else x for x in leaves]
    try:
        other = jax.tree_util.tree_unflatten(treedef, changed)
    except (TypeError, ValueError):
        return
    try:
        fresh = encode_tree(other)
    except (TypeError, ValueError):
        return
    assert_same_encoding(cache.encode(other), fresh)


def test_an_optax_state_saved_twice_through_the_cache_loads_as_saved(make_checkpointer):
    import optax

    ckpt = make_checkpointer(save_every=1, checkpoint_every=None)
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    opt = optax.adam(1e-3)
    for step in range(3):
        params = jax.tree_util.tree_map(lambda x: x + 1, params)  # noqa: B023
        state = {
            "params": params,
            "opt": opt.init(params),
            "step": step,
            "key": jax.random.key(step),
        }
        assert ckpt.save_latest(state, step=step) is not None
        loaded = ckpt.load_checkpoint("latest")["state"]
        assert loaded["step"] == step
        assert_tree_equal(jax.device_get(params), loaded["params"])
        np.testing.assert_array_equal(
            jax.random.key_data(loaded["key"]), jax.random.key_data(state["key"])
        )


@pytest.mark.parametrize(
    ("before", "after"),
    [(0.0, -0.0), (-0.0, 0.0), (0j, complex(0.0, -0.0)), (complex(-0.0, 1.0), 1j)],
    ids=["0.0 then -0.0", "-0.0 then 0.0", "0j then -0j", "-0+1j then 1j"],
)
def test_a_python_number_changing_only_its_sign_of_zero_is_saved_as_it_is_now(
    make_checkpointer, before, after
):
    """``-0.0 == 0.0`` in Python; the checkpoint still stores the sign it was given."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=None)
    assert ckpt.save_latest({"w": jnp.ones(2), "scale": before}, step=1) is not None
    assert ckpt.save_latest({"w": jnp.ones(2), "scale": after}, step=2) is not None
    loaded = ckpt.load_checkpoint("latest")["state"]["scale"]
    assert type(loaded) is type(after)
    assert repr(loaded) == repr(after)


@pytest.mark.parametrize(("first", "second"), [(1, True), (True, 1)], ids=["1, True", "True, 1"])
def test_a_dict_key_of_another_type_but_an_equal_value_is_saved_as_it_is_now(
    make_checkpointer, first, second
):
    """jax's treedef takes ``1`` and ``True`` for one key; a checkpoint does not."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=None)
    assert ckpt.save_latest({first: jnp.ones(2)}, step=1) is not None
    assert ckpt.save_latest({second: jnp.full(2, 2.0)}, step=2) is not None
    loaded = ckpt.load_checkpoint("latest")["state"]
    assert [type(k) for k in loaded] == [type(second)]
    np.testing.assert_array_equal(loaded[second], [2.0, 2.0])


def test_a_float_key_after_an_equal_int_key_is_refused_as_in_a_first_save(make_checkpointer):
    ckpt = make_checkpointer(save_every=1, checkpoint_every=None)
    assert ckpt.save_latest({1: jnp.ones(2)}, step=1) is not None
    with pytest.raises(TypeError, match="Dict key 1.0 of type float"):
        ckpt.save_latest({1.0: jnp.ones(2)}, step=2)
    assert ckpt.load_checkpoint("latest")["step"] == 1


def test_a_static_field_holding_an_array_does_not_fail_the_next_save(make_checkpointer):
    """A flax struct field marked ``pytree_node=False`` holding a NumPy array: jax raises
    when two such treedefs are compared, so the cache must fall back, not fail."""
    from flax import struct

    @struct.dataclass
    class Model:
        w: jax.Array
        table: np.ndarray = struct.field(pytree_node=False)

    cache = TreeCache()
    for step in range(3):
        state = Model(jnp.full(2, float(step)), np.arange(3))
        assert_same_encoding(cache.encode(state), encode_tree(state))
