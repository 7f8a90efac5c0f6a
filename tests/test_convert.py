"""``convert`` never drops data: an Orbax ``CheckpointManager`` step with several items
comes in with every item (JSON items as their values, the manager's metrics as the
checkpoint's metrics) or is refused naming what cannot be carried; a ``.safetensors``
export converts back to the tree it was exported from, its "/"-joined names nested
again (a "/" or "%" inside a key escaped as "%2F" / "%25", an empty key as "%00")."""

from __future__ import annotations

import os
import string
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_tree_equal, scaled
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnax.checkpoint import Checkpointer, convert

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"


def orbax():
    return pytest.importorskip("orbax.checkpoint")


def tree() -> dict:
    rng = np.random.default_rng(0)
    return {
        "params": {
            "dense": {
                "kernel": rng.standard_normal((4, 3), dtype=np.float32),
                "bias": rng.standard_normal(3, dtype=np.float32),
            }
        },
        "count": np.arange(3, dtype=np.int32),
    }


def manager_save(directory: Path, step: int, args, metrics=None, **options) -> Path:
    ocp = orbax()
    manager = ocp.CheckpointManager(
        directory.absolute(), options=ocp.CheckpointManagerOptions(**options)
    )
    manager.save(step, args=args, metrics=metrics)
    manager.wait_until_finished()
    manager.close()
    return directory / str(step)


def learnax_convert(*args: str) -> subprocess.CompletedProcess:
    """``learnax convert ARGS`` in a process of its own, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "learnax", "convert", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def loaded(registry: Path, name: str, target=None) -> dict:
    result = Checkpointer(registry, "run").load_checkpoint(name, target=target)
    assert result is not None
    return result


def dst(registry: Path, name) -> str:
    return str(registry / "run" / "checkpoints" / f"state_{name}")


# --- Orbax --------------------------------------------------------------------------------


def test_an_orbax_step_with_several_items_comes_in_with_every_item(tmp_path):
    ocp = orbax()
    extra = {"lr": 0.1, "name": "run-7", "layers": [1, 2]}
    step_dir = manager_save(
        tmp_path / "orbax",
        5,
        ocp.args.Composite(state=ocp.args.StandardSave(tree()), extra=ocp.args.JsonSave(extra)),
    )

    convert(str(step_dir), dst(tmp_path / "reg", 5))

    result = loaded(tmp_path / "reg", "5")
    assert result["step"] == 5
    assert set(result["state"]) == {"state", "extra"}
    assert_tree_equal(tree(), result["state"]["state"])
    assert result["state"]["extra"] == extra


def test_the_metrics_of_an_orbax_manager_become_the_checkpoints_metrics(tmp_path):
    ocp = orbax()
    step_dir = manager_save(
        tmp_path / "orbax",
        7,
        ocp.args.Composite(state=ocp.args.StandardSave(tree())),
        metrics={"val/loss": 0.25, "acc": 0.5},
        best_fn=lambda m: m["val/loss"],
        best_mode="min",
    )

    convert(str(step_dir), dst(tmp_path / "reg", 7))

    result = loaded(tmp_path / "reg", "7")
    assert result["metrics"] == {"val/loss": 0.25, "acc": 0.5}
    assert_tree_equal(tree(), result["state"])  # one item: the tree itself, as before


def test_an_orbax_step_of_one_default_item_comes_in_as_its_tree(tmp_path):
    ocp = orbax()
    step_dir = manager_save(tmp_path / "orbax", 3, ocp.args.StandardSave(tree()))

    convert(str(step_dir), dst(tmp_path / "reg", 3))

    result = loaded(tmp_path / "reg", "3")
    assert result["step"] == 3 and result["metrics"] == {}
    assert_tree_equal(tree(), result["state"])


def test_an_orbax_item_that_cannot_be_carried_is_refused_naming_it(tmp_path):
    ocp = orbax()
    step_dir = manager_save(
        tmp_path / "orbax",
        5,
        ocp.args.Composite(state=ocp.args.StandardSave(tree()), extra=ocp.args.JsonSave({"a": 1})),
    )
    # An item of a kind learnax does not read (say, a proto or a dataset iterator).
    (step_dir / "dataset").mkdir()
    (step_dir / "dataset" / "iterator.bin").write_bytes(b"\x00\x01")

    with pytest.raises(ValueError, match="dataset") as excinfo:
        convert(str(step_dir), dst(tmp_path / "reg", 5))

    assert "nothing was written" in str(excinfo.value)
    assert not (tmp_path / "reg").exists()


def test_learnax_convert_of_a_composite_orbax_step_writes_every_item(tmp_path):
    ocp = orbax()
    step_dir = manager_save(
        tmp_path / "orbax",
        5,
        ocp.args.Composite(state=ocp.args.StandardSave(tree()), extra=ocp.args.JsonSave({"a": 1})),
        metrics={"loss": 2.0},
        best_fn=lambda m: m["loss"],  # without one, orbax keeps no metrics
    )
    done = learnax_convert(str(step_dir), dst(tmp_path / "reg", 5))
    assert done.returncode == 0, done.stderr
    result = loaded(tmp_path / "reg", "5")
    assert set(result["state"]) == {"state", "extra"} and result["metrics"] == {"loss": 2.0}


# --- safetensors round trip --------------------------------------------------------------------


def saved(registry: Path, state, step: int = 1) -> str:
    path = Checkpointer(registry, "src").save_checkpoint(state, step=step)
    assert path is not None
    return path


def test_a_safetensors_export_of_params_converts_back_into_a_params_target(tmp_path):
    state = tree()
    exported = str(tmp_path / "params.safetensors")
    convert(saved(tmp_path / "a", state), exported, only="params")

    convert(exported, dst(tmp_path / "reg", 0))

    result = loaded(tmp_path / "reg", "0", target={"params": state["params"]})
    assert_tree_equal({"params": state["params"]}, result["state"])
    assert_tree_equal({"params": state["params"]}, loaded(tmp_path / "reg", "0")["state"])


def test_a_whole_export_converts_back_to_the_same_nested_dicts(tmp_path):
    state = tree()
    exported = str(tmp_path / "all.safetensors")
    convert(saved(tmp_path / "a", state), exported)

    convert(exported, dst(tmp_path / "reg", 0))

    assert_tree_equal(state, loaded(tmp_path / "reg", "0")["state"])


def test_export_names_keep_slashes_in_keys_apart_from_nesting(tmp_path):
    from safetensors.numpy import load_file

    state = {"a/b": np.ones(2, np.float32), "a": {"b": np.zeros(2, np.float32)}, "50%": np.ones(1)}
    exported = tmp_path / "x.safetensors"
    convert(saved(tmp_path / "a", state), str(exported))

    assert sorted(load_file(str(exported))) == ["50%25", "a%2Fb", "a/b"]


def test_names_that_do_not_form_a_tree_come_back_flat_with_a_warning(tmp_path, caplog):
    from safetensors.numpy import save_file

    tensors = {"a": np.ones(2, np.float32), "a/b": np.zeros(2, np.float32)}
    src = tmp_path / "flat.safetensors"
    save_file(tensors, str(src))

    convert(str(src), dst(tmp_path / "reg", 0))

    assert_tree_equal(tensors, loaded(tmp_path / "reg", "0")["state"])
    assert any("a/b" in r.getMessage() for r in caplog.records if r.name == "learnax")


KEYS = st.text(alphabet=string.ascii_letters[:4] + "/%_~0", max_size=4)
ARRAYS = st.builds(
    lambda shape, dtype: np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape),
    st.lists(st.integers(0, 3), max_size=2).map(tuple),
    st.sampled_from([np.float32, np.int64, np.uint8]),
)
TREES = st.recursive(
    st.dictionaries(KEYS, ARRAYS, min_size=1, max_size=3),
    lambda children: st.dictionaries(KEYS, children | ARRAYS, min_size=1, max_size=3),
    max_leaves=8,
)


@settings(
    max_examples=scaled(10, 40),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(state=TREES)
def test_nested_dicts_survive_a_safetensors_round_trip(state):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        exported = str(root / "x.safetensors")
        convert(saved(root / "a", state), exported)
        convert(exported, dst(root / "reg", 0))
        assert_tree_equal(state, loaded(root / "reg", "0")["state"])


def test_export_refuses_two_leaves_that_would_get_one_name(tmp_path):
    state = {0: np.ones(2, np.float32), "0": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="same name"):
        convert(saved(tmp_path / "a", state), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()


class Interrupted(Exception):
    """The user stopped the export (as Ctrl-C would) while it was being written."""


@pytest.mark.parametrize("where", ["local", "memory"])
def test_an_interrupted_export_leaves_no_partial_file_and_can_be_run_again(tmp_path, where):
    """An export stopped half-way leaves nothing under its name (a local file is
    visible while written; memory:// keeps what it got): else the file cut short would
    pass for the export, and running ``convert`` again would refuse the destination."""
    source = Checkpointer(tmp_path / "reg", "run").save_checkpoint(tree(), step=1)
    if where == "local":
        target, exists = str(tmp_path / "exports" / "state.safetensors"), os.path.exists
        (tmp_path / "exports").mkdir()
    else:
        fsspec = pytest.importorskip("fsspec")
        memory, root = fsspec.filesystem("memory"), f"/learnax-{os.urandom(8).hex()}"
        target, exists = f"memory://{root}/state.safetensors", memory.exists

    def interrupt_once_written(stage: str, nbytes: int, total: int) -> None:
        if stage == "write" and nbytes:
            raise Interrupted

    try:
        with pytest.raises(Interrupted):
            convert(source, target, progress=interrupt_once_written)
        assert not exists(target), "a partial file was left"
        assert convert(source, target) == target
        assert exists(target)
    finally:
        if where == "memory" and memory.exists(root):
            memory.rm(root, recursive=True)


def test_an_export_never_writes_over_an_existing_file(tmp_path):
    """A .safetensors destination that exists (an earlier export, or any file of the
    user's) is refused, as a checkpoint destination that holds a checkpoint is: the
    file stays byte for byte, and the command exits 2 (usage) saying to remove it."""
    source = Checkpointer(tmp_path / "reg", "run").save_checkpoint(tree(), step=1)
    target = tmp_path / "params.safetensors"
    target.write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="remove it first"):
        convert(source, str(target))
    done = learnax_convert(source, str(target))
    assert done.returncode == 2, done.stderr
    assert "remove it first" in done.stderr
    assert target.read_bytes() == b"the user's own file"
