"""``_read.read_checkpoint``: the one function that reads a whole checkpoint, used by
the Checkpointer's loads and by ``convert``. These tests call it directly on
checkpoints the Checkpointer wrote, the way those callers do."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_tree_equal, checkpoint_files, flip_byte, small_state

from learnax.checkpoint import CheckpointCorruptedError, convert
from learnax.checkpoint._read import read_checkpoint
from learnax.checkpoint._storage import LocalStorage


def test_reads_state_step_time_and_metrics_as_saved(make_checkpointer):
    state = {**small_state(), "key": jax.random.key(3), "count": jnp.int32(7)}
    path = make_checkpointer().save_checkpoint(state, step=42, metrics={"loss": 0.5})
    loaded = read_checkpoint(LocalStorage(), path)
    assert set(loaded) == {"state", "step", "time", "metrics"}
    assert loaded["step"] == 42
    assert loaded["metrics"] == {"loss": 0.5}
    assert isinstance(loaded["time"], float)
    assert_tree_equal(state, loaded["state"])


def test_a_target_of_shape_dtype_structs_restores_jax_arrays_of_that_part(make_checkpointer):
    state = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "opt": np.ones(5)}
    path = make_checkpointer().save_checkpoint(state, step=1)
    target = {"params": {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32)}}
    restored = read_checkpoint(LocalStorage(), path, target)["state"]
    assert set(restored) == {"params"}
    assert isinstance(restored["params"]["w"], jax.Array)
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), state["params"]["w"])


def test_a_target_that_does_not_fit_raises_value_error_naming_the_leaf(make_checkpointer):
    path = make_checkpointer().save_checkpoint({"w": np.ones((2, 2), np.float32)}, step=1)
    with pytest.raises(ValueError, match="w"):
        read_checkpoint(LocalStorage(), path, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})


def test_no_committed_checkpoint_is_file_not_found(tmp_path):
    (tmp_path / "state_5").mkdir()  # a directory without a manifest: never committed
    with pytest.raises(FileNotFoundError):
        read_checkpoint(LocalStorage(), str(tmp_path / "state_5"))
    with pytest.raises(FileNotFoundError):
        read_checkpoint(LocalStorage(), str(tmp_path / "absent"))


def test_a_flipped_data_byte_is_corruption_naming_the_file(make_checkpointer):
    path = make_checkpointer().save_checkpoint({"w": np.arange(1000.0)}, step=1)
    (data,) = [f for f in checkpoint_files(path) if f.suffix == ".safetensors"]
    flip_byte(data, data.stat().st_size - 10)
    with pytest.raises(CheckpointCorruptedError, match=data.name):
        read_checkpoint(LocalStorage(), path)


def test_convert_reads_through_it(make_checkpointer, registry):
    state = small_state(1)
    path = make_checkpointer().save_checkpoint(state, step=9, metrics={"acc": 0.75})
    dst = convert(path, f"{registry}/copy/checkpoints/state_9")
    loaded = read_checkpoint(LocalStorage(), dst)
    assert (loaded["step"], loaded["metrics"]) == (9, {"acc": 0.75})
    assert_tree_equal(state, loaded["state"])
