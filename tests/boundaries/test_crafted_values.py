"""Manifests with a valid checksum and crafted values: any value of the manifest replaced
by any JSON value, or removed. Whatever the change, a load raises only the documented
``CheckpointCorruptedError`` (or succeeds), ``load_latest`` falls back to the older
checkpoint, and listing, ``read_info`` and ``verify`` never raise anything else."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import rewrite_manifest, scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnax.checkpoint import (
    CheckpointCorruptedError,
    Checkpointer,
    list_checkpoints,
    read_info,
    verify,
)

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A run with step 1 (numbered) and latest at step 2 holding many leaf kinds."""
    registry = tmp_path_factory.mktemp("pristine") / "registry"
    ckpt = Checkpointer(str(registry), "run", keep_best=True)
    ckpt.save_checkpoint({"w": np.ones(3)}, step=1)
    state = {
        "params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(2)},
        "bf16": np.ones(4, ml_dtypes.bfloat16),
        "key": jax.random.key(0),
        "count": jnp.int32(3),
        "steps": [1, 2.5, None, "x"],
        "big": np.arange(300_000, dtype=np.float32),  # per-block checksums
    }
    ckpt.save_latest(state, step=2, metrics={"loss": 0.5})
    ckpt.update_best_checkpoint(state, 0.5, step=2)
    return registry


def _paths(value, prefix=()):
    """Every path into a JSON value (dict keys and list indices)."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            yield from _paths(v, (*prefix, i))


def _edit(manifest, path, new, delete):
    if not path:
        return
    parent = manifest
    for part in path[:-1]:
        parent = parent[part]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = new


@settings(
    max_examples=scaled(80, 400),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data(), new=JSON, delete=st.booleans())
def test_any_crafted_value_gives_only_documented_errors(pristine, data, new, delete):
    with tempfile.TemporaryDirectory() as tmp:
        registry = Path(tmp) / "registry"
        shutil.copytree(pristine, registry)
        name = data.draw(st.sampled_from(["state_latest", "state_best"]))
        directory = registry / "run" / "checkpoints" / name
        manifest = json.loads((directory / "manifest.json").read_text())["manifest"]
        path = data.draw(st.sampled_from(sorted(_paths(manifest), key=repr)))
        rewrite_manifest(directory, lambda m: _edit(m, path, new, delete))

        ckpt = Checkpointer(str(registry), "run", keep_best=True)
        try:
            ckpt.load_checkpoint(name.removeprefix("state_"))
        except CheckpointCorruptedError:
            pass
        assert ckpt.load_latest()["step"] in (1, 2)
        list_checkpoints(str(registry / "run"))
        try:
            read_info(str(directory))
        except CheckpointCorruptedError:
            pass
        verify(str(registry))


@pytest.mark.parametrize("fields", [5, {"0": "a"}, "ab", None, [None, 3]])
def test_crafted_namedtuple_fields_with_a_target_are_damage(make_checkpointer, fields):
    import collections

    pair = collections.namedtuple("Pair", ["a", "b"])
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint({"w": np.arange(6.0), "n": pair(1, np.ones(2))}, step=3)

    def plant(manifest):
        for key, node in manifest["tree"]["dict"]:
            if key == "n":
                node["fields"] = fields

    rewrite_manifest(path, plant)
    for target in ({"w": np.zeros(6)}, None):
        try:
            ckpt.load_checkpoint(3, target=target)
        except CheckpointCorruptedError:
            pass
