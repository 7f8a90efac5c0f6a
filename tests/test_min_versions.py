"""What keeps learnax working on the oldest jax that pyproject.toml declares (0.4.30),
checked here on the jax installed by imitating the old one; ``.ci/run`` also runs
``.ci/smoke_min_versions.py`` on the real minimum versions.

Jax 0.4.30 prints a PRNG implementation by its tag ("fry"), has no ``may_alias`` in
``device_put`` and no ``flatten_one_level_with_keys`` in the pytree registry.
"""

from __future__ import annotations

import dataclasses
import json

import equinox as eqx
import flax
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import assert_tree_equal, is_typed_key_array, read_manifest_file, rewrite_manifest

from learnax.checkpoint import _background, _tree


def _stored_impl(path) -> str:
    text, start, end = read_manifest_file(path)
    return json.loads(text[start:end])["arrays"]["k"]["impl"]


# --- PRNG implementation names ----------------------------------------------------------


@pytest.mark.parametrize(("tag", "impl"), [("fry", "threefry2x32"), ("urbg", "unsafe_rbg")])
def test_a_key_impl_printed_as_its_tag_is_stored_by_its_name(
    make_checkpointer, monkeypatch, tag, impl
):
    key = jax.random.key(7, impl=impl)
    monkeypatch.setattr(jax.random, "key_impl", lambda _: tag)
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint({"k": key}, step=1)
    monkeypatch.undo()
    assert _stored_impl(path) == impl
    assert_tree_equal({"k": key}, ckpt.load_checkpoint(1)["state"])


@pytest.mark.parametrize(("tag", "impl"), [("fry", "threefry2x32"), ("urbg", "unsafe_rbg")])
def test_a_checkpoint_that_names_a_key_impl_by_its_tag_loads(make_checkpointer, tag, impl):
    """Checkpoints written on jax 0.4.30 before this fix name the tag."""
    key = jax.random.key(7, impl=impl)
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint({"k": key}, step=1)
    rewrite_manifest(path, lambda m: m["arrays"]["k"].update(impl=tag))
    restored = ckpt.load_checkpoint(1)["state"]["k"]
    assert is_typed_key_array(restored)
    assert_tree_equal({"k": key}, {"k": restored})


def test_a_key_of_an_impl_not_built_into_jax_is_refused_at_save_naming_its_path(
    make_checkpointer, monkeypatch
):
    monkeypatch.setattr(jax.random, "key_impl", lambda _: "my_own_prng")
    ckpt = make_checkpointer()
    with pytest.raises(TypeError, match=r"\['rng'\]\['k'\].*my_own_prng"):
        ckpt.save_checkpoint({"rng": {"k": jax.random.key(0)}}, step=1)
    assert ckpt.list_available_checkpoints() == {}


# --- the snapshot of an async save --------------------------------------------------------


def test_without_may_alias_an_async_snapshot_copies_each_array(make_checkpointer, monkeypatch):
    monkeypatch.setattr(_background, "_DEVICE_PUT_MAY_ALIAS", False)
    state = {"big": jnp.arange(1 << 19, dtype=jnp.float32), "small": jnp.ones(3)}
    _, leaves = _tree.encode_tree(state)
    originals = [leaf.value for leaf in leaves]
    _background.snapshot(leaves)
    for leaf, original in zip(leaves, originals, strict=True):
        assert leaf.value is not original
        np.testing.assert_array_equal(np.asarray(leaf.value), np.asarray(original))
    with make_checkpointer(async_save=True) as ckpt:
        ckpt.save_checkpoint(state, step=1)
    assert_tree_equal(state, ckpt.load_checkpoint(1)["state"])


# --- registered pytree nodes --------------------------------------------------------------


@flax.struct.dataclass
class _Stats:
    mean: np.ndarray
    count: int


class _Linear(eqx.Module):
    weight: jax.Array
    bias: jax.Array | None


@dataclasses.dataclass
class _NoKeys:
    """Registered without keys: its children get flattened indices."""

    a: object
    b: object


jtu.register_pytree_node(_NoKeys, lambda n: ((n.a, n.b), None), lambda _, c: _NoKeys(*c))


@pytest.mark.parametrize(
    "node",
    [
        _Stats(mean=np.zeros(2), count=3),
        _Linear(weight=jnp.ones((2, 2)), bias=None),
        _NoKeys(a={"x": 1}, b=[np.ones(1)]),
        _NoKeys(a=None, b=()),
        object(),
        np.ones(2),
    ],
    ids=["flax-struct", "equinox-with-none", "no-keys", "no-keys-empty-children", "leaf", "array"],
)
def test_one_level_of_flatten_with_path_gives_the_children_with_keys(node):
    if not hasattr(jtu.default_registry, "flatten_one_level_with_keys"):
        pytest.skip("this jax has no flatten_one_level_with_keys to compare with")
    expected = jtu.default_registry.flatten_one_level_with_keys(node)
    got = _tree.node_children_by_path(node)
    if expected is None:
        assert got is None
        return
    assert [k for k, _ in got] == [k for k, _ in expected[0]]
    assert all(a is b for (_, a), (_, b) in zip(got, expected[0], strict=True))
