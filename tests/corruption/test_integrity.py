"""Safety and integrity: damaged files are detected, hostile files are refused, nothing
from a file is executed, and names can never escape the checkpoint directory."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from helpers import (
    assert_tree_equal,
    checkpoint_dir_entries,
    checkpoint_files,
    flip_byte,
    is_lock_file,
    rewrite_manifest,
    rewrite_manifest_text,
    skipped_once,
    small_state,
)

from learnax.checkpoint import (
    CheckpointCorruptedError,
    CheckpointError,
    LegacyPickleError,
)


def saved(make_checkpointer, step=1, **kwargs):
    ckpt = make_checkpointer(**kwargs)
    path = ckpt.save_checkpoint(small_state(step), step=step)
    assert path is not None
    return ckpt, Path(path)


def test_error_classes_form_a_hierarchy():
    assert issubclass(CheckpointError, Exception)
    assert issubclass(CheckpointCorruptedError, CheckpointError)
    assert issubclass(LegacyPickleError, CheckpointError)


# --- bit flips and truncation -----------------------------------------------------


def test_flipped_byte_in_array_data_raises_corrupted_error_naming_the_file(
    make_checkpointer,
):
    ckpt, path = saved(make_checkpointer)
    data_file = checkpoint_files(path)[0]
    flip_byte(data_file, -3)
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(1)
    assert data_file.name in str(excinfo.value)


def test_flipped_byte_in_safetensors_header_raises_corrupted_error(
    make_checkpointer,
):
    ckpt, path = saved(make_checkpointer)
    data_file = checkpoint_files(path)[0]
    flip_byte(data_file, 12)
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(1)
    assert data_file.name in str(excinfo.value)


def test_flipped_digit_in_manifest_raises_corrupted_error_naming_the_manifest(
    make_checkpointer,
):
    ckpt, path = saved(make_checkpointer)
    manifest = path / "manifest.json"
    raw = manifest.read_bytes()
    at = raw.index(b'"time"')
    digit = next(i for i in range(at, len(raw)) if raw[i : i + 1].isdigit())
    flip_byte(manifest, digit)  # still valid JSON: only the checksum can tell
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(1)
    assert "manifest.json" in str(excinfo.value)


def test_manifest_that_is_not_json_raises_corrupted_error(make_checkpointer):
    ckpt, path = saved(make_checkpointer)
    (path / "manifest.json").write_bytes(b'{"checksum": "crc32:0000')
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


@pytest.mark.parametrize("keep_bytes", [0, 7, 100, -10])
def test_truncated_data_file_raises_corrupted_error(make_checkpointer, keep_bytes):
    ckpt, path = saved(make_checkpointer)
    data_file = checkpoint_files(path)[0]
    data = data_file.read_bytes()
    data_file.write_bytes(data[:keep_bytes])
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(1)
    assert data_file.name in str(excinfo.value)


def test_data_file_with_appended_bytes_raises_corrupted_error(make_checkpointer):
    ckpt, path = saved(make_checkpointer)
    data_file = checkpoint_files(path)[0]
    data_file.write_bytes(data_file.read_bytes() + b"\0" * 16)
    with pytest.raises(CheckpointCorruptedError, match="the manifest says"):
        ckpt.load_checkpoint(1)


def test_missing_data_file_raises_corrupted_error(make_checkpointer):
    ckpt, path = saved(make_checkpointer)
    checkpoint_files(path)[0].unlink()
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


def test_corrupted_best_raises_from_load_best(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    ckpt.update_best_checkpoint(small_state(), 0.5, step=1)
    flip_byte(checkpoint_files(Path(ckpt.checkpoint_dir) / "state_best")[0], -1)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_best()


# --- load_latest skips damaged checkpoints ----------------------------------------


def test_load_latest_skips_a_corrupted_newest_checkpoint_with_one_warning_on_the_log(
    make_checkpointer,
):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    newest = Path(ckpt.save_checkpoint(small_state(2), step=2))
    flip_byte(checkpoint_files(newest)[0], -1)

    with skipped_once("state_2"):
        loaded = ckpt.load_latest()

    assert loaded["step"] == 1
    assert_tree_equal(small_state(1), loaded["state"])


def test_load_checkpoint_minus_one_skips_corrupted_checkpoints_like_load_latest(
    make_checkpointer,
):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    newest = Path(ckpt.save_latest(small_state(2), step=2))
    flip_byte(checkpoint_files(newest)[0], -1)
    with skipped_once("state_latest"):
        loaded = ckpt.load_checkpoint(-1)
    assert loaded["step"] == 1


def test_load_latest_skips_a_corrupted_state_latest(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(4), step=4)
    latest = Path(ckpt.save_latest(small_state(5), step=5))
    (latest / "manifest.json").write_text("{not json", encoding="utf-8")
    with skipped_once("state_latest"):
        loaded = ckpt.load_latest()
    assert loaded["step"] == 4


def test_load_latest_returns_none_when_every_checkpoint_is_corrupted(
    make_checkpointer,
):
    ckpt, path = saved(make_checkpointer)
    flip_byte(checkpoint_files(path)[0], -1)
    with skipped_once("state_1"):
        assert ckpt.load_latest() is None


# --- uncommitted directories and leftovers ----------------------------------------


def test_directory_without_manifest_is_not_a_checkpoint(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    partial = Path(ckpt.save_checkpoint(small_state(999), step=999))
    (partial / "manifest.json").unlink()
    assert any(partial.iterdir())  # the data file is still there

    assert "step_999" not in ckpt.list_available_checkpoints()
    assert ckpt.load_checkpoint(999) is None
    assert ckpt.load_latest()["step"] == 1


def test_next_writer_removes_a_directory_without_manifest_after_its_first_commit(
    make_checkpointer,
):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    partial = Path(ckpt.save_checkpoint(small_state(999), step=999))
    (partial / "manifest.json").unlink()
    del ckpt

    restarted = make_checkpointer()
    assert partial.exists()  # opening a run deletes nothing: it may be a reader
    assert list(restarted.list_available_checkpoints()) == ["step_1"]
    restarted.save_checkpoint(small_state(2), step=2)
    assert not partial.exists()
    assert list(restarted.list_available_checkpoints()) == ["step_1", "step_2"]
    assert restarted.load_checkpoint(1)["step"] == 1


CRASHING_SAVE = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from learnax.checkpoint import Checkpointer

    registry, target, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
    ckpt = Checkpointer(registry, "run", save_every=1, checkpoint_every=None)
    calls = [0]

    def crash_on_nth(original):
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                os._exit(17)  # the machine loses power: no cleanup of any kind
            return original(*args, **kwargs)
        return wrapper

    for name in target.split(","):
        if hasattr(os, name):
            setattr(os, name, crash_on_nth(getattr(os, name)))
    state = {"w": np.full((64, 64), 2.0, np.float32), "b": np.ones(64, np.float32)}
    ckpt.save_latest(state, step=2)
    sys.exit(0)
    """
)


@pytest.mark.parametrize(
    "target, nth",
    [
        ("fsync,fdatasync", 1),
        ("fsync,fdatasync", 2),
        ("fsync,fdatasync", 3),
        ("replace,rename", 1),
    ],
)
def test_crash_during_save_leaves_the_old_or_new_checkpoint_and_no_leftovers(
    make_checkpointer, registry, target, nth
):
    old_state = {"w": np.full((64, 64), 1.0, np.float32), "b": np.zeros(64, np.float32)}
    first = make_checkpointer(save_every=1, checkpoint_every=None)
    first.save_latest(old_state, step=1)
    checkpoint_dir = Path(first.checkpoint_dir)
    del first

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVE, registry, target, str(nth)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode in (0, 17), proc.stderr.decode()

    after_crash = sorted(str(p) for p in checkpoint_dir.rglob("*"))
    restarted = make_checkpointer(save_every=1, checkpoint_every=None)
    loaded = restarted.load_latest()
    assert loaded is not None
    assert loaded["step"] in (1, 2)
    if loaded["step"] == 1:
        assert_tree_equal(old_state, loaded["state"])
    else:
        np.testing.assert_array_equal(loaded["state"]["w"], np.full((64, 64), 2.0))
    assert sorted(str(p) for p in checkpoint_dir.rglob("*")) == after_crash  # a reader

    # The restarted run's first commit removes what the crash left behind.
    assert restarted.save_latest(old_state, step=3) is not None
    assert checkpoint_dir_entries(checkpoint_dir) == {"state_latest"}
    manifest = json.loads((checkpoint_dir / "state_latest" / "manifest.json").read_text())[
        "manifest"
    ]
    on_disk = {p.name for p in (checkpoint_dir / "state_latest").iterdir()}
    assert on_disk == {"manifest.json", *manifest["files"]}


# --- hostile manifests ------------------------------------------------------------


def _point_files_at(manifest, new_name):
    (old_name,) = list(manifest["files"])
    manifest["files"] = {new_name: manifest["files"][old_name]}
    for entry in manifest["arrays"].values():
        for shard in entry.get("shards", [entry]):  # inline when stored whole
            if shard["file"] == old_name:
                shard["file"] = new_name


def test_rewritten_manifest_with_valid_checksum_still_loads(make_checkpointer):
    # Guards the helper the hostile-manifest tests below rely on.
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest(path, lambda manifest: None)
    assert_tree_equal(small_state(1), ckpt.load_checkpoint(1)["state"])


def test_manifest_file_name_with_dotdot_is_refused(make_checkpointer):
    ckpt, path = saved(make_checkpointer)
    data_file = checkpoint_files(path)[0]
    outside = path.parent / "outside.safetensors"
    outside.write_bytes(data_file.read_bytes())  # a valid file to tempt the loader
    rewrite_manifest(path, lambda m: _point_files_at(m, "../outside.safetensors"))
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


def test_manifest_file_name_with_absolute_path_is_refused(make_checkpointer, tmp_path):
    ckpt, path = saved(make_checkpointer)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(checkpoint_files(path)[0].read_bytes())
    rewrite_manifest(path, lambda m: _point_files_at(m, str(outside)))
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


@pytest.mark.parametrize("dtype", ["object", "O", "float1024", "<U8", ""])
def test_manifest_with_unsupported_dtype_is_refused(make_checkpointer, dtype):
    ckpt, path = saved(make_checkpointer)

    def set_dtype(manifest):
        for entry in manifest["arrays"].values():
            entry["dtype"] = dtype

    rewrite_manifest(path, set_dtype)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param([2**40, 2**40], id="beyond-addressable"),
        pytest.param([2**16, 2**16], id="16GiB"),
    ],
)
def test_manifest_with_huge_shape_is_refused_without_allocating(make_checkpointer, shape):
    ckpt, path = saved(make_checkpointer)

    def huge(manifest):
        for entry in manifest["arrays"].values():
            entry["shape"] = shape

    rewrite_manifest(path, huge)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointCorruptedError):
            ckpt.load_checkpoint(1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20


@pytest.mark.parametrize("shape", [[5, 4], [-1, 4], [3]])
def test_manifest_shape_that_does_not_match_the_stored_bytes_is_refused(make_checkpointer, shape):
    ckpt = make_checkpointer()
    path = Path(ckpt.save_checkpoint({"w": np.ones((3, 4), np.float32)}, step=1))

    def reshape(manifest):
        for entry in manifest["arrays"].values():
            entry["shape"] = shape

    rewrite_manifest(path, reshape)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


def test_namedtuple_from_a_module_not_imported_is_rebuilt_without_importing_it(
    make_checkpointer, tmp_path, monkeypatch
):
    marker = tmp_path / "imported.marker"
    module_dir = tmp_path / "mods"
    module_dir.mkdir()
    (module_dir / "learnax_test_sideeffect_mod.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            from typing import NamedTuple
            Path({str(marker)!r}).touch()

            class Hidden(NamedTuple):
                alpha: object
                beta: object
            """
        )
    )
    monkeypatch.syspath_prepend(str(module_dir))
    import learnax_test_sideeffect_mod as mod

    state = {"t": mod.Hidden(alpha=np.arange(3), beta=2.0)}
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(state, step=1)
    del sys.modules["learnax_test_sideeffect_mod"]
    marker.unlink()

    restored = ckpt.load_checkpoint(1)["state"]["t"]

    assert not marker.exists()
    assert "learnax_test_sideeffect_mod" not in sys.modules
    assert type(restored).__name__ == "Hidden"
    assert restored._fields == ("alpha", "beta")
    np.testing.assert_array_equal(restored.alpha, np.arange(3))
    assert restored.beta == 2.0


class Decoy(NamedTuple):
    a: object
    b: object


TRAP_CALLS: list = []


class TrapNotANamedTuple:
    """Already imported, looks like a namedtuple to duck typing, but is not one."""

    _fields = ("a", "b")

    def __new__(cls, *args, **kwargs):
        TRAP_CALLS.append(args)
        return super().__new__(cls)

    @classmethod
    def _make(cls, iterable):
        TRAP_CALLS.append(tuple(iterable))
        return cls()


def test_manifest_naming_a_class_that_is_not_a_namedtuple_never_calls_it(make_checkpointer):
    ckpt = make_checkpointer()
    path = Path(ckpt.save_checkpoint({"t": Decoy(a=np.ones(2), b=1.0)}, step=1))

    def swap_class(body: str) -> str:
        assert "Decoy" in body
        return body.replace("Decoy", "TrapNotANamedTuple")

    rewrite_manifest_text(path, swap_class)
    TRAP_CALLS.clear()
    try:
        restored = ckpt.load_checkpoint(1)["state"]["t"]
    except CheckpointCorruptedError:
        restored = None
    assert TRAP_CALLS == []
    if restored is not None:
        assert type(restored) is not TrapNotANamedTuple
        assert isinstance(restored, tuple)
        assert restored._fields == ("a", "b")


@pytest.mark.parametrize(
    "tree",
    [
        pytest.param("12345", id="number"),
        pytest.param('"params"', id="string"),
        pytest.param('{"bogus": []}', id="unknown-node"),
        pytest.param('{"array": "no/such/array"}', id="unlisted-array"),
        pytest.param("[" * 100_000 + "]" * 100_000, id="nested-100000-deep"),
    ],
)
def test_manifest_with_malformed_tree_is_refused(make_checkpointer, tree):
    ckpt, path = saved(make_checkpointer)

    def replace_tree(body: str) -> str:
        manifest = json.loads(body)
        manifest["tree"] = "@TREE@"
        return json.dumps(manifest).replace('"@TREE@"', tree)

    rewrite_manifest_text(path, replace_tree)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


# --- legacy pickles ---------------------------------------------------------------


class _CreatesMarkerWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_legacy_pickle(checkpoint_dir, name, payload) -> Path:
    path = Path(checkpoint_dir) / f"state_{name}.pyd"
    with open(path, "wb") as f:
        pickle.dump(payload, f)
    return path


def malicious_payload(marker):
    return {
        "state": {"w": np.arange(3), "evil": _CreatesMarkerWhenUnpickled(marker)},
        "step": 1000,
        "time": time.time(),
        "metrics": {},
    }


def test_legacy_pickle_is_refused_by_load_checkpoint(make_checkpointer, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer()
    write_legacy_pickle(ckpt.checkpoint_dir, 1000, malicious_payload(marker))
    with pytest.raises(LegacyPickleError) as excinfo:
        ckpt.load_checkpoint(1000)
    assert "pickle" in str(excinfo.value).lower()
    assert "allow_pickle" in str(excinfo.value)
    assert not marker.exists()


def test_legacy_pickle_is_refused_by_load_latest(make_checkpointer, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer()
    write_legacy_pickle(ckpt.checkpoint_dir, 1000, malicious_payload(marker))
    with pytest.raises(LegacyPickleError):
        ckpt.load_latest()
    assert not marker.exists()


def test_legacy_latest_pickle_is_refused_by_name(make_checkpointer, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer()
    write_legacy_pickle(ckpt.checkpoint_dir, "latest", malicious_payload(marker))
    with pytest.raises(LegacyPickleError):
        ckpt.load_checkpoint("latest")
    assert not marker.exists()


def test_legacy_pickle_loads_with_allow_pickle(make_checkpointer):
    ckpt = make_checkpointer()
    saved_time = time.time()
    payload = {
        "state": {"params": {"w": np.arange(4, dtype=np.float32)}},
        "step": 1000,
        "time": saved_time,
        "metrics": {"val/loss": 0.5},
    }
    write_legacy_pickle(ckpt.checkpoint_dir, 1000, payload)
    loaded = ckpt.load_checkpoint(1000, allow_pickle=True)
    assert loaded["step"] == 1000
    assert loaded["time"] == saved_time
    assert loaded["metrics"] == {"val/loss": 0.5}
    np.testing.assert_array_equal(loaded["state"]["params"]["w"], np.arange(4, dtype=np.float32))


def test_legacy_pickle_without_metrics_loads_with_empty_metrics(make_checkpointer):
    ckpt = make_checkpointer()
    # The original learnax omitted "metrics" when none were given.
    payload = {"state": {"w": np.ones(2)}, "step": 1000, "time": time.time()}
    write_legacy_pickle(ckpt.checkpoint_dir, 1000, payload)
    loaded = ckpt.load_latest(allow_pickle=True)
    assert loaded["step"] == 1000
    assert loaded["metrics"] == {}


# --- names from outside -----------------------------------------------------------


@pytest.mark.parametrize("suffix", ["../x", "a/b", "", "..", "a\\b", "/abs"])
def test_unsafe_suffix_raises_value_error_and_writes_nothing(make_checkpointer, tmp_path, suffix):
    ckpt = make_checkpointer()
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError):
        ckpt.save_checkpoint(small_state(), step=1, suffix=suffix)
    after = sorted(str(p) for p in tmp_path.rglob("*") if not is_lock_file(p.name))
    assert after == [p for p in before if not is_lock_file(os.path.basename(p))]


# --- unsupported leaves -----------------------------------------------------------


@pytest.mark.parametrize(
    "leaf",
    [
        pytest.param(object(), id="object"),
        pytest.param(dict, id="class"),
        pytest.param(np.array([object(), object()]), id="numpy-object-array"),
    ],
)
def test_unsupported_leaf_raises_type_error_naming_it_and_writes_nothing(make_checkpointer, leaf):
    ckpt = make_checkpointer()
    ckpt.save_latest(small_state(1), step=1)
    state = {"params": {"w": np.ones(2), "weird_leaf": leaf}}
    with pytest.raises(TypeError) as excinfo:
        ckpt.save_checkpoint(state, step=2)
    assert "params" in str(excinfo.value)
    assert "weird_leaf" in str(excinfo.value)
    with pytest.raises(TypeError):
        ckpt.save_latest(state, step=2)

    assert list(ckpt.list_available_checkpoints()) == ["latest"]
    assert not (Path(ckpt.checkpoint_dir) / "state_2").exists()
    assert_tree_equal(small_state(1), ckpt.load_latest()["state"])


def test_a_damaged_best_does_not_break_loading_another_step(make_checkpointer):
    """load_checkpoint(N) also looks at latest and best for step N; a damaged one of
    them is simply not step N."""
    ckpt = make_checkpointer(keep_best=True)
    ckpt.update_best_checkpoint(small_state(1), 0.5, step=1)
    manifest = Path(ckpt.checkpoint_dir) / "state_best" / "manifest.json"
    raw = bytearray(manifest.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    manifest.write_bytes(bytes(raw))
    assert ckpt.load_checkpoint(7) is None
