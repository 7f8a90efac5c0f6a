"""On disk: a checkpoint is a directory of ``manifest.json`` plus safetensors files
that the ``safetensors`` library itself opens."""

from __future__ import annotations

import json
import os
import re
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors
from helpers import (
    assert_tree_equal,
    checkpoint_files,
    read_manifest_file,
    rewrite_manifest,
    scaled,
    small_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from learnax.checkpoint import Checkpointer


def saved_path(make_checkpointer, state=None, step=1000, **save_kwargs) -> Path:
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(small_state() if state is None else state, step=step, **save_kwargs)
    assert path is not None
    return Path(path)


def all_tensors(path: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for file in checkpoint_files(path):
        with safetensors.safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def test_checkpoint_directory_holds_only_manifest_and_safetensors_files(
    make_checkpointer,
):
    path = saved_path(make_checkpointer)
    names = sorted(p.name for p in path.iterdir())
    assert "manifest.json" in names
    others = [n for n in names if n != "manifest.json"]
    assert others
    assert all(n.endswith(".safetensors") for n in others), names
    assert all(p.is_file() for p in path.iterdir())


def test_safetensors_library_opens_the_data_files_by_leaf_path(make_checkpointer):
    state = small_state()
    tensors = all_tensors(saved_path(make_checkpointer, state))
    assert {"params/w", "params/b", "opt_state/mu"} <= set(tensors)
    for name, expected in [
        ("params/w", state["params"]["w"]),
        ("params/b", state["params"]["b"]),
        ("opt_state/mu", state["opt_state"]["mu"]),
    ]:
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], expected)


def test_safetensors_names_join_nested_dict_and_sequence_keys_with_slash(
    make_checkpointer,
):
    state = {"layers": [{"kernel": np.ones((2, 2), np.float32)}], "bias": np.zeros(2)}
    tensors = all_tensors(saved_path(make_checkpointer, state))
    assert "layers/0/kernel" in tensors
    assert "bias" in tensors
    np.testing.assert_array_equal(tensors["bias"], np.zeros(2))


def test_int_and_float64_arrays_are_stored_with_their_dtype(make_checkpointer):
    state = {"i": np.arange(5, dtype=np.int64), "d": np.linspace(0, 1, 3)}
    tensors = all_tensors(saved_path(make_checkpointer, state))
    assert tensors["i"].dtype == np.int64
    np.testing.assert_array_equal(tensors["i"], state["i"])
    assert tensors["d"].dtype == np.float64
    np.testing.assert_array_equal(tensors["d"], state["d"])


def test_manifest_json_holds_checksum_and_manifest(make_checkpointer):
    path = saved_path(make_checkpointer, metrics={"val/loss": 0.5})
    document = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    assert set(document) == {"checksum", "manifest"}
    assert re.fullmatch(r"crc32:[0-9a-f]{8}", document["checksum"])
    manifest = document["manifest"]
    assert {"format", "step", "time", "metrics", "tree", "arrays", "files"} <= set(manifest)
    assert manifest["step"] == 1000
    assert manifest["metrics"] == {"val/loss": 0.5}


def test_manifest_checksum_is_crc32_of_the_exact_manifest_bytes(make_checkpointer):
    path = saved_path(make_checkpointer)
    text, start, end = read_manifest_file(path)
    expected = "crc32:%08x" % (zlib.crc32(text[start:end].encode("utf-8")) & 0xFFFFFFFF)
    assert json.loads(text)["checksum"] == expected


def test_manifest_lists_every_array_with_dtype_shape_file_and_checksum(make_checkpointer):
    """An array stored whole names its data file and crc32 inline (the tensor has the
    array's name); only an array split into shards has a "shards" list."""
    path = saved_path(make_checkpointer)
    manifest = json.loads((path / "manifest.json").read_text())["manifest"]
    arrays = manifest["arrays"]
    assert set(arrays) >= {"params/w", "params/b", "opt_state/mu"}
    w = arrays["params/w"]
    assert w["shape"] == [3, 4]
    assert w["dtype"] == "float32"
    assert "shards" not in w
    assert w["file"] in manifest["files"]
    data = np.asarray(small_state()["params"]["w"], dtype=np.float32)
    assert w["crc32"] == f"{zlib.crc32(data.tobytes()):08x}"


def test_manifest_files_record_the_byte_size_of_each_data_file(make_checkpointer):
    path = saved_path(make_checkpointer)
    manifest = json.loads((path / "manifest.json").read_text())["manifest"]
    on_disk = {p.name: p.stat().st_size for p in checkpoint_files(path)}
    assert set(manifest["files"]) == set(on_disk)
    for name, info in manifest["files"].items():
        assert info["bytes"] == on_disk[name]
        assert "header_crc32" in info


def test_checkpoint_layout_is_registry_run_checkpoints_state_name(make_checkpointer, registry):
    ckpt = make_checkpointer(keep_best=True)
    ckpt.save_checkpoint(small_state(), step=1000)
    ckpt.save_latest(small_state(), step=1000)
    ckpt.update_best_checkpoint(small_state(), 0.1, step=1000)
    root = Path(registry) / "run" / "checkpoints"
    for name in ("state_1000", "state_latest", "state_best"):
        assert (root / name / "manifest.json").is_file()


# --- partial reads (what a process restoring its shard of an array reads) ---------------


def read_bytes_during(fn) -> tuple[object, int]:
    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar"))

    before = rchar()
    result = fn()
    return result, rchar() - before


def reader_of(path):
    """A reader of the checkpoint at ``path``, as loads make one."""
    from learnax.checkpoint import _manifest, _read
    from learnax.checkpoint._storage import LocalStorage

    storage = LocalStorage()
    return _read.CheckpointReader(storage, str(path), _manifest.read_manifest(storage, str(path)))


def region_reader(make_checkpointer, array):
    return reader_of(saved_path(make_checkpointer, state={"w": array}))


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    ("region", "most_mib"),
    [
        ((slice(0, 2), slice(None)), 8.5),  # an eighth of the rows: 8 of 64 MiB
        ((slice(None), slice(0, 1024)), 16.5),  # a column band: 1 block of each 4 MiB row
        ((slice(2, 3), slice(5000, 6000)), 1.5),  # a small box: one block
    ],
    ids=["rows", "columns", "box"],
)
def test_a_partial_read_reads_only_the_checksum_blocks_its_region_touches(
    make_checkpointer, region, most_mib
):
    array = np.arange(16 * (1 << 20), dtype=np.float32).reshape(16, 1 << 20)  # 64 MiB
    reader = region_reader(make_checkpointer, array)

    part, read = read_bytes_during(lambda: reader.read_region("w", region))

    np.testing.assert_array_equal(part, array[region])
    assert read <= most_mib * (1 << 20), f"read {read / 2**20:.1f} MiB"


def test_a_partial_read_of_a_tensor_ending_in_a_partial_checksum_block(make_checkpointer):
    # 3 rows of 1.2 MB: the last checksum block holds what is left, not a whole MiB,
    # and no byte past the tensor is read as part of it.
    array = np.arange(3 * 300_000, dtype=np.float32).reshape(3, 300_000)
    reader = region_reader(make_checkpointer, array)
    for region in [(slice(2, 3), slice(None)), (slice(None), slice(299_990, None))]:
        np.testing.assert_array_equal(reader.read_region("w", region), array[region])


def test_a_partial_read_detects_damage_in_the_blocks_it_reads(make_checkpointer):
    from learnax.checkpoint import CheckpointCorruptedError

    array = np.arange(4 * (1 << 20), dtype=np.float32).reshape(4, 1 << 20)  # 16 MiB
    reader = region_reader(make_checkpointer, array)
    (data,) = checkpoint_files(Path(reader.directory))
    with open(data, "r+b") as f:
        f.seek(-(1 << 20), 2)  # inside the last row
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))

    np.testing.assert_array_equal(reader.read_region("w", (slice(0, 2), slice(None))), array[:2])
    with pytest.raises(CheckpointCorruptedError, match="checksum mismatch"):
        reader.read_region("w", (slice(3, 4), slice(None)))


_SHARDED_COLS = 1 << 18  # 1 MiB rows: each shard has its checksum blocks
_SHARDED = np.arange(4 * _SHARDED_COLS, dtype=np.float32).reshape(4, _SHARDED_COLS)


def sharded_reader(make_checkpointer, row_ranges, spare_rows=0):
    """A checkpoint of _SHARDED as a multi-host save stores it: one tensor per
    process's rows, each with its slice of the array (the rows in ``row_ranges``);
    ``spare_rows`` more in a tensor of an array of their own."""
    tensors = {f"rows{a}-{b}": _SHARDED[a:b] for a, b in row_ranges}
    path = saved_path(make_checkpointer, state={**tensors, "spare": _SHARDED[:spare_rows]})

    def as_shards(m):
        shards = []
        for (a, b), tensor in zip(row_ranges, tensors, strict=True):
            entry = m["arrays"].pop(tensor)
            shards.append(
                {"file": entry["file"], "tensor": tensor, "crc32": entry["crc32"]}
                | {"slice": [[a, b], [0, _SHARDED_COLS]]}
            )
        m["arrays"]["w"] = {"dtype": "float32", "shape": [4, _SHARDED_COLS], "shards": shards}
        m["tree"] = (
            {"array": "w"} if not spare_rows else {"list": [{"array": "w"}, {"array": "spare"}]}
        )

    rewrite_manifest(path, as_shards)
    return reader_of(path)


def test_a_partial_read_of_an_array_stored_in_shards_gives_its_values(make_checkpointer):
    reader = sharded_reader(make_checkpointer, [(0, 2), (2, 4)])
    for region in [
        (slice(0, 2), slice(None)),  # the first shard only
        (slice(2, 4), slice(3, 5)),  # the second shard only
        (slice(1, 3), slice(2, 7)),  # across both
        (slice(None), slice(None)),
    ]:
        np.testing.assert_array_equal(reader.read_region("w", region), _SHARDED[region])
    np.testing.assert_array_equal(make_checkpointer().load_checkpoint(1000)["state"], _SHARDED)


def test_shards_that_leave_rows_of_the_array_uncovered_are_damage(make_checkpointer):
    from learnax.checkpoint import CheckpointCorruptedError

    # Row 2 is in no shard; the files still hold as many bytes as the array needs.
    reader = sharded_reader(make_checkpointer, [(0, 2), (3, 4)], spare_rows=1)
    with pytest.raises(CheckpointCorruptedError, match="do not tile"):
        reader.read_region("w", (slice(0, 1), slice(None)))
    with pytest.raises(CheckpointCorruptedError, match="do not tile"):
        make_checkpointer().load_checkpoint(1000)


# --- tensor names are valid UTF-8 whatever the keys ---------------------------------

# Every character, lone surrogates included (os.fsdecode of a non-UTF-8 file name).
_any_char = st.characters(exclude_categories=())
_odd_keys = st.sampled_from(
    ["", "/", "[", "]", '"', "'", "\\", "__metadata__", "_", "a/b", "\x00", "\udcff", "\ud800"]
)
_long_keys = st.builds(
    lambda text, n: text * n, st.text(_any_char, min_size=1, max_size=3), st.integers(1000, 3000)
)
_keys = st.one_of(_odd_keys, st.text(_any_char, max_size=8), _long_keys)
_trees = st.recursive(
    st.integers(0, 5).map(lambda n: np.arange(n, dtype=np.float32)),
    lambda children: st.dictionaries(_keys, children, min_size=1, max_size=4),
    max_leaves=8,
)


def _assert_every_data_file_opens(path: str) -> None:
    for file in checkpoint_files(path):
        with safetensors.safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                f.get_tensor(name)


def test_a_key_that_is_not_valid_utf8_still_gives_openable_files(make_checkpointer):
    state = {os.fsdecode(b"\xff"): np.ones(3, np.float32), "a\ud800b": {"x": np.zeros(2)}}
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(state, step=1)
    _assert_every_data_file_opens(path)
    assert_tree_equal(state, ckpt.load_checkpoint(1)["state"])


def test_a_top_level_key_named_like_the_safetensors_metadata_entry_round_trips(
    make_checkpointer,
):
    # "__metadata__" is the header's own entry, no tensor may take that name.
    state = {"__metadata__": np.arange(3, dtype=np.float32), "w": np.ones(2, np.float32)}
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint(state, step=1)
    _assert_every_data_file_opens(path)
    assert "__metadata__" not in all_tensors(Path(path))
    assert_tree_equal(state, ckpt.load_checkpoint(1)["state"])


def test_tensor_names_of_ordinary_keys_stay_the_leaf_paths(make_checkpointer):
    state = {"params": {"Dense_0": {"kernel": np.ones(2)}}, "é": np.zeros(1)}
    assert set(all_tensors(saved_path(make_checkpointer, state))) == {"params/Dense_0/kernel", "é"}


@settings(max_examples=scaled(15, 40), deadline=None)
@given(state=_trees)
def test_any_str_keys_give_openable_files_and_round_trip(state):
    with tempfile.TemporaryDirectory() as registry:
        ckpt = Checkpointer(registry, "run")
        path = ckpt.save_checkpoint({"root": state}, step=1)
        _assert_every_data_file_opens(path)
        assert_tree_equal({"root": state}, ckpt.load_checkpoint(1)["state"])
