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
    st.sampled_from([0.5, float("nan"), "a", "b", None]),
)


def trees(leaves=LEAVES):
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.dictionaries(st.sampled_from(["w", "b", "k", 0, 1]), children, max_size=3),
            st.lists(children, max_size=3),
            st.tuples(children, children),
            st.builds(Pair, children, children),
        ),
        max_leaves=8,
    )


def signature(encoded):
    node, leaves = encoded
    return node, [(leaf.name, tuple(leaf.keypath), leaf.kind, leaf.impl) for leaf in leaves]


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
