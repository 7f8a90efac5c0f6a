"""Hostile checkpoints: files crafted to crash, exhaust or take over the loading process.

Every case starts from a real checkpoint and edits it the way an attacker who can write
to the registry would: the manifest is rewritten with a *valid* checksum (helpers.py's
``rewrite_manifest``), and a rewritten safetensors file comes with a manifest that
records its new size and header checksum, so that only the loader's own checks stand
between the file and the process. For each case the load raises a clear
``CheckpointCorruptedError`` (``LegacyPickleError`` for a legacy pickle), the
interpreter does not crash, no allocation exceeds the size of the files read, and no
code from the file runs: payloads that would create a marker file never do.

test_integrity.py covers bit flips, truncation, ``..`` and absolute data file names,
unknown dtype names, huge manifest shapes and the plain legacy pickle refusal; this file
covers what is left of the hostile-file list.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import (
    assert_tree_equal,
    checkpoint_files,
    rewrite_manifest,
    rewrite_manifest_text,
    skipped_once,
    small_state,
)

from learnax.checkpoint import (
    CheckpointCorruptedError,
    Checkpointer,
    LegacyPickleError,
    diff,
    list_checkpoints,
    read_info,
    verify,
)

HERE = Path(__file__).parents[1]  # tests/, where helpers.py is


def saved(make_checkpointer, state=None, step=1, **kwargs):
    ckpt = make_checkpointer(**kwargs)
    path = ckpt.save_checkpoint(small_state(step) if state is None else state, step=step)
    assert path is not None
    return ckpt, Path(path)


def two_tensor_state() -> dict:
    return {
        "a": np.arange(16, dtype=np.float32),
        "b": np.arange(100, 116, dtype=np.float32),
    }


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *(p for p in sys.path if p), env.get("PYTHONPATH", "")]
    )
    return env


# --- guards: nothing unpickled, nothing opened outside the checkpoint ----------------


@pytest.fixture
def no_unpickling(monkeypatch):
    """Records every call of the pickle loaders; the test asserts there was none."""
    calls = []

    def recorder(real):
        def record(*args, **kwargs):
            calls.append(real.__name__)
            return real(*args, **kwargs)

        return record

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, recorder(getattr(pickle, name)))
    return calls


@pytest.fixture
def opened_paths(monkeypatch):
    """Records the paths the process opens or stats (os.open, open, os.stat)."""
    paths = []

    def recorder(real):
        def record(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)) and kwargs.get("dir_fd") is None:
                paths.append(os.path.realpath(os.fsdecode(path)))
            return real(path, *args, **kwargs)

        return record

    monkeypatch.setattr(os, "open", recorder(os.open))
    monkeypatch.setattr(os, "stat", recorder(os.stat))
    monkeypatch.setattr(builtins, "open", recorder(builtins.open))
    return paths


def outside_of(ckpt, paths) -> list[str]:
    """The paths that are not in the run's checkpoint directory."""
    root = os.path.realpath(ckpt.checkpoint_dir)
    return [p for p in paths if p != root and not p.startswith(root + os.sep)]


class RunsShellOnUnpickle:
    """A pickle payload: unpickling it runs ``touch <marker>`` through os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def pickle_payload(marker: Path) -> bytes:
    return pickle.dumps(
        {"state": {"w": np.arange(3), "evil": RunsShellOnUnpickle(marker)}, "step": 7}
    )


# --- safetensors files rewritten by an attacker ---------------------------------------


def split_data_file(raw: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def safetensors_bytes(header, data: bytes) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def plant_data_file(checkpoint: Path, new_bytes: bytes, crc_of: bytes | None = None) -> Path:
    """Replace the checkpoint's data file and make the manifest agree with it: its size,
    and the checksum of its header (of ``crc_of`` when the header cannot be read as
    the file says)."""
    (data_file,) = checkpoint_files(checkpoint)
    data_file.write_bytes(new_bytes)
    if crc_of is None:
        length = int.from_bytes(new_bytes[:8], "little")
        crc_of = new_bytes[: 8 + length]
    entry = {"bytes": len(new_bytes), "header_crc32": f"{zlib.crc32(crc_of):08x}"}
    rewrite_manifest(checkpoint, lambda m: m["files"].update({data_file.name: entry}))
    return data_file


def _with_header(edit):
    """A craft that edits the parsed header and keeps the data."""

    def craft(raw: bytes) -> bytes:
        header, data = split_data_file(raw)
        edit(header)
        return safetensors_bytes(header, data)

    return craft


def _with_length(length: int):
    def craft(raw: bytes) -> bytes:
        return length.to_bytes(8, "little") + raw[8:]

    return craft


def _set(tensor: str, key: str, value):
    def edit(header):
        header[tensor][key] = value

    return _with_header(edit)


def _duplicate_tensor_key(raw: bytes) -> bytes:
    # A first "a" that points at b's bytes, then the real one: Python's json keeps the
    # last, other parsers the first. Two readers must never see two different files.
    header, data = split_data_file(raw)
    text = '{"a": ' + json.dumps(header["b"]) + ", " + json.dumps(header)[1:]
    return safetensors_bytes(text.encode(), data)


def _pickle_as_header(raw: bytes) -> bytes:
    _, data = split_data_file(raw)
    return safetensors_bytes(pickle.dumps(RunsShellOnUnpickle(Path("/nonexistent"))), data)


def _huge_int_offsets(raw: bytes) -> bytes:
    header, data = split_data_file(raw)
    text = json.dumps(header).replace(
        '"data_offsets": [0, 64]', f'"data_offsets": [0, {"9" * 10_000}]'
    )
    assert "9999" in text
    return safetensors_bytes(text.encode(), data)


def _remove(tensor: str):
    def edit(header):
        del header[tensor]

    return _with_header(edit)


HEADER_CRAFTS = {
    "header-length-one-past-the-end": lambda raw: _with_length(len(raw) - 7)(raw),
    "header-length-2**40": _with_length(2**40),
    "header-length-2**63": _with_length(2**63),
    "header-length-2**64-1": _with_length(2**64 - 1),
    "header-length-zero": _with_length(0),
    "header-not-json": lambda raw: safetensors_bytes(b"\xff\xfe not json", split_data_file(raw)[1]),
    "header-json-list": lambda raw: safetensors_bytes(b"[1, 2, 3]", split_data_file(raw)[1]),
    "header-is-a-pickle": _pickle_as_header,
    "header-duplicate-tensor-name": _duplicate_tensor_key,
    "tensor-missing": _remove("b"),
    "offsets-past-the-end": _set("b", "data_offsets", [68, 132]),
    "offsets-negative": _set("b", "data_offsets", [-4, 60]),
    "offsets-reversed": _set("b", "data_offsets", [128, 64]),
    "offsets-overlapping": _with_header(
        lambda h: (h["a"].update(data_offsets=[0, 96]), h["b"].update(data_offsets=[64, 128]))
    ),
    # Tiles the 128 bytes as far as sorted begin/end pairs go: b runs back to the end.
    "offsets-reversed-back-to-the-end": _with_header(
        lambda h: (h["a"].update(data_offsets=[0, 192]), h["b"].update(data_offsets=[192, 128]))
    ),
    "offsets-floats": _set("b", "data_offsets", [64.0, 128.0]),
    "offsets-nan": _set("b", "data_offsets", [float("nan"), float("nan")]),
    "offsets-infinite": _set("b", "data_offsets", [64, float("inf")]),
    "offsets-huge": _set("b", "data_offsets", [2**63, 2**63 + 64]),
    "offsets-10000-digits": _huge_int_offsets,
    "offsets-missing": _set("b", "data_offsets", None),
    "offsets-three-numbers": _set("b", "data_offsets", [64, 96, 128]),
    "offsets-three-numbers-the-first-two-right": _set("b", "data_offsets", [64, 128, 128]),
    "dtype-unknown": _set("b", "dtype", "F128"),
    "dtype-object": _set("b", "dtype", "O"),
    "dtype-null": _set("b", "dtype", None),
    "dtype-of-another-size": _set("b", "dtype", "F64"),
    "shape-negative": _set("b", "shape", [-16]),
    "shape-huge": _set("b", "shape", [2**62]),
    "shape-not-a-list": _set("b", "shape", "16"),
    "entry-not-an-object": _with_header(lambda h: h.update(b="F32")),
}


@pytest.mark.parametrize("craft", list(HEADER_CRAFTS.values()), ids=list(HEADER_CRAFTS))
def test_crafted_safetensors_header_is_refused_naming_the_file_without_allocating_more_than_it(
    make_checkpointer, craft, no_unpickling
):
    ckpt, path = saved(make_checkpointer, two_tensor_state())
    (data_file,) = checkpoint_files(path)
    header, _ = split_data_file(data_file.read_bytes())
    assert header["a"]["data_offsets"] == [0, 64] and header["b"]["data_offsets"] == [64, 128]
    new_bytes = craft(data_file.read_bytes())
    plant_data_file(path, new_bytes)

    tracemalloc.start()
    try:
        with pytest.raises(CheckpointCorruptedError) as excinfo:
            ckpt.load_checkpoint(1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data_file.name in str(excinfo.value)
    assert peak < len(new_bytes) + (1 << 20)
    assert no_unpickling == []


# Seen by reading the tensors the manifest names, not by the header's own checks.
SEEN_BY_THE_TENSORS = {
    "dtype-unknown",
    "dtype-object",
    "dtype-null",
    "dtype-of-another-size",
    "shape-negative",
    "shape-huge",
    "shape-not-a-list",
}


@pytest.mark.parametrize("name", [n for n in HEADER_CRAFTS if n not in SEEN_BY_THE_TENSORS])
def test_crafted_safetensors_header_is_damaged_to_the_listing_too(make_checkpointer, name):
    # The listing checks every data file's header (not its data): each framing check
    # must refuse on its own, not leave it to what a load finds reading the tensors.
    ckpt, path = saved(make_checkpointer, two_tensor_state())
    (data_file,) = checkpoint_files(path)
    plant_data_file(path, HEADER_CRAFTS[name](data_file.read_bytes()))
    (summary,) = list_checkpoints(str(path.parents[1]))
    assert summary.status == "damaged"
    assert data_file.name in summary.problem


def test_safetensors_header_over_100_mb_is_refused_as_the_safetensors_library_does(
    make_checkpointer,
):
    ckpt, path = saved(make_checkpointer, two_tensor_state())
    (data_file,) = checkpoint_files(path)
    header, data = split_data_file(data_file.read_bytes())
    text = json.dumps(header).encode()
    text += b" " * (100_000_008 - len(text))  # valid JSON, padded as safetensors pads
    plant_data_file(path, safetensors_bytes(text, data))
    with pytest.raises(CheckpointCorruptedError, match="header length"):
        ckpt.load_checkpoint(1)


def test_tensors_whose_offsets_overlap_are_refused_even_when_every_checksum_matches(
    make_checkpointer,
):
    """safetensors requires the tensors to tile the data section; a file where two
    tensors share bytes is not a valid safetensors file (the library refuses it), even
    if the manifest's checksums were updated to match."""
    ckpt, path = saved(make_checkpointer, two_tensor_state())
    (data_file,) = checkpoint_files(path)
    header, data = split_data_file(data_file.read_bytes())
    header["b"]["data_offsets"] = header["a"]["data_offsets"]
    plant_data_file(path, safetensors_bytes(header, data))

    def same_checksum(manifest):
        manifest["arrays"]["b"]["crc32"] = manifest["arrays"]["a"]["crc32"]

    rewrite_manifest(path, same_checksum)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


def test_data_file_replaced_by_a_pickle_is_refused_and_never_unpickled(
    make_checkpointer, tmp_path, no_unpickling
):
    marker = tmp_path / "pwned"
    ckpt, path = saved(make_checkpointer)
    payload = pickle_payload(marker)
    data_file = plant_data_file(path, payload, crc_of=payload)
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(1)
    assert data_file.name in str(excinfo.value)
    assert not marker.exists()
    assert no_unpickling == []


def test_pickle_bytes_stored_as_tensor_data_come_back_as_plain_bytes(
    make_checkpointer, tmp_path, no_unpickling
):
    """Array data is raw bytes: a pickle inside a uint8 tensor is returned as numbers."""
    marker = tmp_path / "pwned"
    payload = np.frombuffer(pickle_payload(marker), np.uint8).copy()
    ckpt, _ = saved(make_checkpointer, {"blob": payload})
    loaded = ckpt.load_checkpoint(1)["state"]["blob"]
    assert loaded.dtype == np.uint8
    assert loaded.tobytes() == payload.tobytes()
    assert not marker.exists()
    assert no_unpickling == []


# --- manifests rewritten with a valid checksum ----------------------------------------


def _set_array(key, value, name="params/w"):
    def mutate(m):
        m["arrays"][name][key] = value

    return mutate


def _only_file(m):
    (name,) = m["files"]
    return name


def _set_file(key, value):
    def mutate(m):
        m["files"][_only_file(m)][key] = value

    return mutate


def _rename_file(new_name):
    def mutate(m):
        old = _only_file(m)
        m["files"] = {new_name: m["files"][old]}
        for entry in m["arrays"].values():
            entry["file"] = new_name

    return mutate


def _set_top(key, value):
    def mutate(m):
        m[key] = value

    return mutate


def _drop_top(key):
    def mutate(m):
        del m[key]

    return mutate


def _shards(make_shards, name="params/b"):
    """Replace the inline entry of params/b (shape [4]) by explicit shards."""

    def mutate(m):
        entry = m["arrays"][name]
        file, crc = entry.pop("file"), entry.pop("crc32")
        entry["shards"] = make_shards(file, name, crc)

    return mutate


def _shape_just_beyond_its_file(m):
    # One element more than the whole data file (header included) could hold.
    entry, name = m["arrays"]["params/w"], _only_file(m)
    entry["shape"] = [m["files"][name]["bytes"] // np.dtype(entry["dtype"]).itemsize + 1]


def _key_kind(impl):
    def mutate(m):
        m["arrays"]["params/w"].update(kind="key", impl=impl, dtype="uint32")

    return mutate


MANIFEST_CRAFTS = {
    # shapes
    "shape-bool-dims": _set_array("shape", [True, 4]),
    "shape-float-dims": _set_array("shape", [3.0, 4.0]),
    "shape-string": _set_array("shape", "3,4"),
    "shape-null": _set_array("shape", None),
    "shape-nested-lists": _set_array("shape", [[3], [4]]),
    "shape-65-dims": _set_array("shape", [1] * 65),
    "shape-2**62": _set_array("shape", [2**62]),
    "shape-beyond-int64": _set_array("shape", [2**31, 2**31, 2**31]),
    "shape-zero-times-huge": _set_array("shape", [0, 2**61]),
    "shape-just-beyond-its-file": _shape_just_beyond_its_file,
    # dtypes
    "dtype-null": _set_array("dtype", None),
    "dtype-number": _set_array("dtype", 11),
    "dtype-with-space": _set_array("dtype", "float32 "),
    "dtype-void": _set_array("dtype", "V16"),
    "dtype-bytes": _set_array("dtype", "|S4"),
    "dtype-same-size-other-kind": _set_array("dtype", "int32"),
    "dtype-other-size": _set_array("dtype", "bfloat16"),
    "dtype-object-spelled-as-dict": _set_array("dtype", {"names": ["a"], "formats": ["O"]}),
    # array kinds
    "kind-unknown": _set_array("kind", "pickle"),
    "kind-key-with-module-as-impl": _key_kind("os.system"),
    "kind-scalar-with-a-shape": _set_array("kind", "scalar"),
    "crc-not-hex-string": _set_array("crc32", 12345678),
    "crc-an-empty-list": _set_array("crc32", []),
    # data file entries
    "file-bytes-negative": _set_file("bytes", -1),
    "file-bytes-2**70": _set_file("bytes", 2**70),
    "file-bytes-string": _set_file("bytes", "1e3"),
    "file-bytes-bool": _set_file("bytes", True),
    "file-header-crc-short": _set_file("header_crc32", "abc"),
    "file-header-crc-number": _set_file("header_crc32", 12345678),
    "files-a-list": _set_top("files", []),
    "file-name-in-subdirectory": _rename_file("sub/data-0.safetensors"),
    "file-name-trailing-newline": _rename_file("data-0.safetensors\n"),
    "file-name-dot-slash": _rename_file("./data-0.safetensors"),
    "file-name-nul": _rename_file("data-0.safetensors\x00.x"),
    "file-name-non-ascii": _rename_file("data-\u0430.safetensors"),
    "file-name-manifest": _rename_file("manifest.json"),
    "file-name-lock": _rename_file(".learnax.lock"),
    "array-file-not-listed": _set_array("file", "data-other-0.safetensors"),
    # shards
    "shards-empty": _shards(lambda f, t, c: []),
    "shards-not-a-list": _shards(lambda f, t, c: {"file": f}),
    "shard-file-unlisted": _shards(lambda f, t, c: [{"file": "x", "tensor": t, "crc32": c}]),
    "shard-tensor-not-a-string": _shards(lambda f, t, c: [{"file": f, "tensor": 1, "crc32": c}]),
    "shard-slice-outside-the-shape": _shards(
        lambda f, t, c: [{"file": f, "tensor": t, "crc32": c, "slice": [[0, 8]]}]
    ),
    "shard-slices-overlap": _shards(
        lambda f, t, c: [
            {"file": f, "tensor": t, "crc32": c, "slice": [[0, 3]]},
            {"file": f, "tensor": t, "crc32": c, "slice": [[1, 4]]},
        ]
    ),
    "shard-slices-leave-a-gap": _shards(
        lambda f, t, c: [{"file": f, "tensor": t, "crc32": c, "slice": [[0, 2]]}]
    ),
    "shard-slice-reversed": _shards(
        lambda f, t, c: [{"file": f, "tensor": t, "crc32": c, "slice": [[4, 0]]}]
    ),
    "shard-slice-huge": _shards(
        lambda f, t, c: [{"file": f, "tensor": t, "crc32": c, "slice": [[0, 2**63]]}]
    ),
    # the rest of the manifest
    "step-negative": _set_top("step", -1),
    "step-string": _set_top("step", "1"),
    "step-float": _set_top("step", 1.5),
    "step-bool": _set_top("step", True),
    "step-missing": _drop_top("step"),
    "time-string": _set_top("time", "yesterday"),
    "time-bool": _set_top("time", True),
    "format-unknown": _set_top("format", "learnax.checkpoint/999"),
    "format-missing": _drop_top("format"),
    "metrics-a-list": _set_top("metrics", [1, 2]),
    "metric-value-a-dict": _set_top("metrics", {"loss": {"__reduce__": "os.system"}}),
    "metric-value-a-string": _set_top("metrics", {"loss": "rm -rf /"}),
    "arrays-a-list": _set_top("arrays", []),
    "tree-missing": _drop_top("tree"),
    "array-entry-missing": lambda m: m["arrays"].pop("params/w"),
    "tree-naming-a-module-attribute": _set_top("tree", {"array": "os.system"}),
}


@pytest.mark.parametrize("mutate", list(MANIFEST_CRAFTS.values()), ids=list(MANIFEST_CRAFTS))
def test_crafted_manifest_with_valid_checksum_is_refused_naming_the_checkpoint(
    make_checkpointer, mutate, opened_paths, no_unpickling
):
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest(path, mutate)
    opened_paths.clear()
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(1)
    assert str(path) in str(excinfo.value)
    assert outside_of(ckpt, opened_paths) == []
    assert no_unpickling == []


# Seen only by reading the data (the tensors' headers and bytes), which read_info and
# the listing never do; verify and every load do.
SEEN_IN_THE_DATA = {
    "shape-zero-times-huge",
    "dtype-same-size-other-kind",
    "dtype-other-size",
    "shard-slices-overlap",
    "shard-slices-leave-a-gap",
}


@pytest.mark.parametrize("name", [n for n in MANIFEST_CRAFTS if n not in SEEN_IN_THE_DATA])
def test_crafted_manifest_is_damaged_to_inspection_and_verify_too(make_checkpointer, name):
    # Each check of the manifest must refuse on its own: a later check of the data (as a
    # load makes) must not be what stands between the craft and the user.
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest(path, MANIFEST_CRAFTS[name])
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        read_info(str(path))
    assert str(path) in str(excinfo.value)
    assert [c.status for c in list_checkpoints(str(path.parents[1]))] == ["damaged"]
    assert [p for p, _ in verify(str(path))] == [str(path)]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("[]", id="list"),
        pytest.param('"manifest"', id="string"),
        pytest.param("null", id="null"),
        pytest.param("1e999", id="infinite-number"),
        pytest.param("NaN", id="nan"),
    ],
)
def test_manifest_value_that_is_not_an_object_is_refused(make_checkpointer, body):
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest_text(path, lambda _: body)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


# --- JSON with duplicate keys ---------------------------------------------------------


def _duplicate_first(key: str, value: str):
    """Put a second ``key`` (with ``value``) in front of the manifest's own one."""

    def edit(body: str) -> str:
        manifest = json.loads(body)
        assert key in manifest
        return "{" + f'"{key}":{value},' + body[1:]

    return edit


def _duplicate_array_entry(body: str) -> str:
    m = json.loads(body)
    entry = json.dumps(m["arrays"]["params/w"])
    arrays = json.dumps(m["arrays"])
    m["arrays"] = "@ARRAYS@"
    text = json.dumps(m)
    return text.replace('"@ARRAYS@"', '{"params/w":' + entry + "," + arrays[1:])


def _duplicate_file_entry(body: str) -> str:
    m = json.loads(body)
    (name,) = m["files"]
    files = json.dumps(m["files"])
    m["files"] = "@FILES@"
    fake = json.dumps({"bytes": 1, "header_crc32": "00000000"})
    return json.dumps(m).replace('"@FILES@"', "{" + json.dumps(name) + ":" + fake + "," + files[1:])


def _duplicate_dict_key_in_tree(body: str) -> str:
    m = json.loads(body)
    m["tree"] = {"dict": [["params", None], ["params", None]]}
    return json.dumps(m)


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(_duplicate_first("step", "999"), id="step"),
        pytest.param(_duplicate_first("format", '"other"'), id="format"),
        pytest.param(_duplicate_first("tree", "null"), id="tree"),
        pytest.param(_duplicate_array_entry, id="array-entry"),
        pytest.param(_duplicate_file_entry, id="file-entry"),
        pytest.param(_duplicate_dict_key_in_tree, id="dict-key-in-the-tree"),
    ],
)
def test_manifest_with_duplicate_keys_is_refused(make_checkpointer, edit):
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest_text(path, edit)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(lambda raw: raw[:-2] + b',"manifest":{}}\n', id="second-manifest-key"),
        pytest.param(
            lambda raw: b'{"checksum":"crc32:00000000",' + raw[1:], id="second-checksum-key"
        ),
        pytest.param(lambda raw: b" " + raw, id="leading-space"),
        pytest.param(lambda raw: raw + b"\n", id="trailing-line"),
        pytest.param(lambda raw: raw.replace(b'"checksum"', b'"Checksum"', 1), id="key-case"),
    ],
)
def test_manifest_framing_that_is_not_exactly_the_written_one_is_refused(
    make_checkpointer, framing
):
    ckpt, path = saved(make_checkpointer)
    manifest = path / "manifest.json"
    manifest.write_bytes(framing(manifest.read_bytes()))
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


# --- pickles where JSON or safetensors is expected -----------------------------------


def test_manifest_replaced_by_a_pickle_is_refused_and_never_unpickled(
    make_checkpointer, tmp_path, no_unpickling
):
    marker = tmp_path / "pwned"
    ckpt, path = saved(make_checkpointer)
    (path / "manifest.json").write_bytes(pickle_payload(marker))

    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(1)
    assert "manifest.json" in str(excinfo.value)
    with skipped_once("state_1"):
        assert ckpt.load_latest() is None
    make_checkpointer()  # start-up cleanup reads the manifest too
    assert not marker.exists()
    assert no_unpickling == []


def test_best_manifest_replaced_by_a_pickle_is_not_run_when_a_checkpointer_starts(
    make_checkpointer, tmp_path, no_unpickling
):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer(keep_best=True)
    assert ckpt.update_best_checkpoint(small_state(), 0.5, step=1)
    best = Path(ckpt.checkpoint_dir) / "state_best"
    (best / "manifest.json").write_bytes(pickle_payload(marker))

    restarted = make_checkpointer(keep_best=True)  # reads the best metric at start-up

    assert restarted.best_metric_value == float("inf")
    with pytest.raises(CheckpointCorruptedError):
        restarted.load_best()
    assert not marker.exists()
    assert no_unpickling == []


def _write_legacy(checkpoint_dir, name: str, marker: Path) -> Path:
    path = Path(checkpoint_dir) / f"state_{name}.pyd"
    path.write_bytes(pickle_payload(marker))
    return path


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda ckpt, pyd: ckpt.load_checkpoint(str(pyd)), id="by-path"),
        pytest.param(lambda ckpt, pyd: ckpt.load_checkpoint("7"), id="by-step-name"),
        pytest.param(lambda ckpt, pyd: ckpt.load_checkpoint(-1), id="minus-one"),
        pytest.param(
            lambda ckpt, pyd: ckpt.load_latest(target={"w": np.arange(3)}), id="with-target"
        ),
    ],
)
def test_legacy_pickle_refused_by_every_load_without_running_it(
    make_checkpointer, tmp_path, no_unpickling, load
):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer()
    pyd = _write_legacy(ckpt.checkpoint_dir, "7", marker)
    with pytest.raises(LegacyPickleError) as excinfo:
        load(ckpt, pyd)
    assert "allow_pickle" in str(excinfo.value)
    assert not marker.exists()
    assert no_unpickling == []


def test_legacy_best_pickle_is_refused_by_load_best(make_checkpointer, tmp_path, no_unpickling):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer(keep_best=True)
    _write_legacy(ckpt.checkpoint_dir, "best", marker)
    with pytest.raises(LegacyPickleError):
        ckpt.load_best()
    with pytest.raises(LegacyPickleError):
        ckpt.load_checkpoint("best")
    assert not marker.exists()
    assert no_unpickling == []


def test_legacy_pickles_are_never_unpickled_by_construction_listing_or_saving(
    make_checkpointer, tmp_path, no_unpickling
):
    marker = tmp_path / "pwned"
    first = make_checkpointer(keep_best=True, save_every=1, checkpoint_every=1)
    for name in ("latest", "best", "5"):
        _write_legacy(first.checkpoint_dir, name, marker)

    ckpt = make_checkpointer(keep_best=True, save_every=1, checkpoint_every=1)
    ckpt.list_available_checkpoints()
    assert set(ckpt.maybe_save_checkpoints(small_state(), 6, {"val/loss": 1.0})) == {
        "latest",
        "numbered",
        "best",
    }
    assert ckpt.load_latest()["step"] == 6
    assert not marker.exists()
    assert no_unpickling == []


# --- NamedTuple entries that name something else -------------------------------------


def _namedtuple_node(module: str, qualname: str, fields: list[str], values: list[str]) -> dict:
    return {
        "namedtuple": [{"str": v} for v in values],
        "module": module,
        "class": qualname,
        "fields": fields,
    }


def _hostile_namedtuples(marker: Path) -> dict[str, dict]:
    touch = f"touch {marker}"
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _namedtuple_node("os", "system", ["a"], [touch]),
        "posix.system": _namedtuple_node("posix", "system", ["a"], [touch]),
        "subprocess.getoutput": _namedtuple_node("subprocess", "getoutput", ["a"], [touch]),
        "builtins.exec": _namedtuple_node("builtins", "exec", ["a"], [code]),
        "builtins.eval": _namedtuple_node("builtins", "eval", ["a"], [code]),
        "builtins.open": _namedtuple_node("builtins", "open", ["a", "b"], [str(marker), "w"]),
        "os.makedirs": _namedtuple_node("os", "makedirs", ["a"], [str(marker)]),
        "pathlib.Path.touch": _namedtuple_node("pathlib", "Path.touch", ["a"], [str(marker)]),
        "pathlib.Path": _namedtuple_node("pathlib", "Path", ["a"], [str(marker)]),
        "os.path.join-by-qualname": _namedtuple_node("os", "path.join", ["a"], [str(marker)]),
        "node-type-os.system": {"node": [["a", {"str": touch}]], "type": "os.system"},
    }


HOSTILE_NAMEDTUPLES = list(_hostile_namedtuples(Path("/x")))


@pytest.mark.parametrize("which", HOSTILE_NAMEDTUPLES)
def test_tree_node_naming_a_callable_never_calls_it(
    make_checkpointer, tmp_path, monkeypatch, which
):
    marker = tmp_path / "pwned"
    calls = []
    real_system = os.system
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or real_system(*a))
    ckpt, path = saved(make_checkpointer)
    node = _hostile_namedtuples(marker)[which]
    rewrite_manifest(path, lambda m: m.update(tree={"dict": [["t", node]]}))

    try:
        restored = ckpt.load_checkpoint(1)["state"]["t"]
    except CheckpointCorruptedError:
        restored = None

    assert not marker.exists()
    assert calls == []
    if restored is not None and "namedtuple" in node:
        assert isinstance(restored, tuple)
        assert restored._fields == tuple(node["fields"])
        assert list(restored) == [v["str"] for v in node["namedtuple"]]
    elif restored is not None:
        assert restored == {"a": f"touch {marker}"}


def test_namedtuple_entry_naming_a_structseq_is_not_built_as_one(make_checkpointer):
    """time.struct_time is a tuple subclass but no namedtuple: never constructed."""
    ckpt, path = saved(make_checkpointer)
    fields = ["tm_year", "tm_mon"]
    node = {"namedtuple": [{"int": 1}, {"int": 2}], "module": "time", "class": "struct_time"}
    node["fields"] = fields
    rewrite_manifest(path, lambda m: m.update(tree=node))
    try:
        restored = ckpt.load_checkpoint(1)["state"]
    except CheckpointCorruptedError:
        return
    assert type(restored) is not time.struct_time
    assert restored._fields == tuple(fields)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(["__class__"], id="dunder"),
        pytest.param(["_make"], id="underscore"),
        pytest.param(["import"], id="keyword"),
        pytest.param(["a b"], id="not-an-identifier"),
        pytest.param(["a", "a"], id="repeated"),
        pytest.param([1], id="not-a-string"),
        pytest.param("ab", id="not-a-list"),
    ],
)
def test_namedtuple_entry_with_unusable_field_names_is_refused(make_checkpointer, fields):
    ckpt, path = saved(make_checkpointer)
    children = [{"int": 1}] * (len(fields) if isinstance(fields, list) else 1)
    node = {"namedtuple": children, "module": "x", "class": "T", "fields": fields}
    rewrite_manifest(path, lambda m: m.update(tree=node))
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)


def _namedtuple_of_three(fields: list[str]) -> dict:
    children = [{"int": 1}, {"int": 2}, {"int": 3}]
    return {"namedtuple": children, "module": "x", "class": "T", "fields": fields}


@pytest.mark.parametrize(
    "node",
    [
        # A bool is stored as {"bool": ...}; JSON's true is no int or float here.
        pytest.param({"int": True}, id="int-a-bool"),
        pytest.param({"float": True}, id="float-a-bool"),
        pytest.param({"complex": [False, 1.0]}, id="complex-part-a-bool"),
        pytest.param(_namedtuple_of_three(["a", "b"]), id="namedtuple-more-values-than-fields"),
    ],
)
def test_tree_value_that_does_not_fit_its_tag_is_refused(make_checkpointer, node):
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest(path, lambda m: m.update(tree={"dict": [["t", node]]}))
    with pytest.raises(CheckpointCorruptedError, match="invalid tree"):
        ckpt.load_checkpoint(1)


# --- names from the file or the caller that point outside -----------------------------


@pytest.mark.parametrize(
    "name", ["..", ".", "state_..", "step_..", "..latest", "latest\x00", "-1x", " latest", "~"]
)
def test_load_by_a_name_that_is_not_one_checkpoint_name_raises_value_error(
    make_checkpointer, name, opened_paths
):
    ckpt, path = saved(make_checkpointer)
    opened_paths.clear()
    with pytest.raises(ValueError):
        ckpt.load_checkpoint(name)
    assert outside_of(ckpt, opened_paths) == []


def test_tensor_names_with_dotdot_are_only_names(make_checkpointer, opened_paths):
    """Tensor names are keys in the data file, never paths: a name like ``../../x`` in
    the header and manifest reads that tensor from the checkpoint's own file."""
    state = {"..": {"..": {"etc": np.arange(4, dtype=np.int32)}}}
    ckpt, path = saved(make_checkpointer, state)
    manifest = json.loads((path / "manifest.json").read_text())["manifest"]
    assert "../../etc" in manifest["arrays"]
    opened_paths.clear()
    assert_tree_equal(state, ckpt.load_checkpoint(1)["state"])
    assert opened_paths
    assert outside_of(ckpt, opened_paths) == []


# --- recursion bombs ------------------------------------------------------------------


def _nest(depth: int, inner: str = "null") -> str:
    return '{"list":[' * depth + inner + "]}" * depth


def _replace_with_raw(key: str, raw: str):
    def edit(body: str) -> str:
        m = json.loads(body)
        m[key] = "@RAW@"
        return json.dumps(m).replace('"@RAW@"', raw)

    return edit


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(lambda c: c.load_checkpoint(1), id="load_checkpoint"),
        pytest.param(lambda c: c.load_checkpoint(1, target=small_state(1)), id="with-target"),
    ],
)
def test_tree_nested_deeper_than_the_limit_is_refused(make_checkpointer, load):
    # 300 levels: valid JSON that Python parses, but deeper than any saved tree.
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest_text(path, _replace_with_raw("tree", _nest(300)))
    with pytest.raises(CheckpointCorruptedError):
        load(ckpt)


def test_load_latest_skips_a_tree_nested_deeper_than_the_limit(make_checkpointer):
    ckpt, _ = saved(make_checkpointer)
    newest = Path(ckpt.save_latest(small_state(2), step=2))
    rewrite_manifest_text(newest, _replace_with_raw("tree", _nest(300)))
    with skipped_once("state_latest"):
        assert ckpt.load_latest()["step"] == 1


def test_a_manifest_of_more_json_values_than_the_cap_is_refused_before_parsing(
    make_checkpointer,
):
    # 3,000,001 values in a key no reader looks at: well-formed, checksum valid, 6 MB.
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest_text(path, _replace_with_raw("padding", "[" + "0," * 3_000_000 + "0]"))
    with pytest.raises(CheckpointCorruptedError, match="more than 3000000 values"):
        read_info(str(path))


def test_json_nested_deeper_than_a_checkpoint_needs_is_refused_under_a_raised_limit(
    make_checkpointer,
):
    # 4,000 levels in a key no reader looks at: Python's parser would take them under
    # a raised recursion limit, but no manifest nests that deep.
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest_text(path, _replace_with_raw("padding", _nest(2_000)))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20_000)
    try:
        with pytest.raises(CheckpointCorruptedError, match="nested deeper than"):
            read_info(str(path))
    finally:
        sys.setrecursionlimit(limit)


# Builds hostile checkpoints in one process and loads each; prints one verdict a case.
RECURSION_BOMBS = textwrap.dedent(
    """
    import json, sys, warnings, zlib
    from pathlib import Path
    import numpy as np
    from helpers import checkpoint_files, rewrite_manifest, rewrite_manifest_text
    from learnax.checkpoint import Checkpointer, CheckpointCorruptedError

    registry, depth, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    cases = sys.argv[4].split(",")
    warnings.simplefilter("ignore")

    def nest(inner="null", open_='{"list":[', close="]}"):
        return open_ * depth + inner + close * depth

    def raw(key, text):
        def edit(body):
            m = json.loads(body)
            m[key] = "@RAW@"
            return json.dumps(m).replace('"@RAW@"', text)
        return edit

    def header_bomb(path):
        (f,) = checkpoint_files(path)
        old = f.read_bytes()
        n = int.from_bytes(old[:8], "little")
        header = ('{"x":' * depth + "1" + "}" * depth).encode()
        header += b" " * (-len(header) % 8)
        new = len(header).to_bytes(8, "little") + header + old[8 + n:]
        f.write_bytes(new)
        entry = {"bytes": len(new), "header_crc32": "%08x" % zlib.crc32(new[: 8 + len(header)])}
        rewrite_manifest(path, lambda m: m["files"].update({f.name: entry}))

    CRAFTS = {
        "tree-lists": lambda p: rewrite_manifest_text(p, raw("tree", nest())),
        "tree-dicts": lambda p: rewrite_manifest_text(
            p, raw("tree", nest(open_='{"dict":[["k",', close="]]}"))
        ),
        "metrics": lambda p: rewrite_manifest_text(
            p, raw("metrics", '{"m":' + nest("1", '{"x":', "}") + "}")
        ),
        "array-entry": lambda p: rewrite_manifest_text(
            p, raw("arrays", '{"w":' + nest("1", '{"x":', "}") + "}")
        ),
        "safetensors-header": header_bomb,
    }

    for i, case in enumerate(cases):
        run = f"run{i}"
        ckpt = Checkpointer(registry, run, keep_best=True)
        path = Path(ckpt.save_checkpoint({"w": np.arange(4.0)}, step=1))
        if case == "best-manifest-at-start-up":
            best = Path(ckpt.save_checkpoint({"w": np.arange(4.0)}, step=1, is_best=True))
            rewrite_manifest_text(best, raw("tree", nest()))
            sys.setrecursionlimit(limit)
            try:
                restarted = Checkpointer(registry, run, keep_best=True)
                ok = restarted.best_metric_value == float("inf")
                print(case, "OK" if ok else "WRONG-BEST-VALUE", flush=True)
            except BaseException as e:
                print(case, type(e).__name__, flush=True)
            continue
        CRAFTS[case](path)
        sys.setrecursionlimit(limit)
        for how, load in (("one", lambda: ckpt.load_checkpoint(1)),
                          ("latest", lambda: ckpt.load_latest())):
            try:
                result = load()
                verdict = "NONE" if result is None else "LOADED"
            except CheckpointCorruptedError:
                verdict = "CheckpointCorruptedError"
            except BaseException as e:
                verdict = type(e).__name__
            print(case, how, verdict, flush=True)
        sys.setrecursionlimit(1000)
    """
)

BOMB_CASES = [
    "tree-lists",
    "tree-dicts",
    "metrics",
    "array-entry",
    "safetensors-header",
]


def run_bombs(registry: str, depth: int, limit: int, cases: list[str]):
    proc = subprocess.run(
        [sys.executable, "-c", RECURSION_BOMBS, registry, str(depth), str(limit), ",".join(cases)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    return proc


@pytest.fixture(scope="module")
def bomb_verdicts(tmp_path_factory):
    """Runs every recursion bomb (50,000 levels, default recursion limit) in one
    subprocess: a crash of the interpreter would show as its return code."""
    registry = str(tmp_path_factory.mktemp("bombs") / "registry")
    proc = run_bombs(registry, 50_000, 1000, [*BOMB_CASES, "best-manifest-at-start-up"])
    return proc


@pytest.mark.parametrize("case", BOMB_CASES)
def test_recursion_bomb_of_50000_levels_raises_corrupted_error_without_crashing(
    bomb_verdicts, case
):
    proc = bomb_verdicts
    assert proc.returncode == 0, f"the interpreter died ({proc.returncode}): {proc.stderr[-2000:]}"
    words = [line.split() for line in proc.stdout.splitlines()]
    lines = {(w[0], w[1]): w[2] for w in words if len(w) == 3}
    assert lines[(case, "one")] == "CheckpointCorruptedError", proc.stdout
    # load_latest skips the damaged checkpoint (with a warning): nothing else is left.
    assert lines[(case, "latest")] == "NONE", proc.stdout


def test_checkpointer_starts_on_a_run_whose_best_manifest_is_a_recursion_bomb(bomb_verdicts):
    proc = bomb_verdicts
    assert proc.returncode == 0, f"the interpreter died ({proc.returncode}): {proc.stderr[-2000:]}"
    assert "best-manifest-at-start-up OK" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("case", ["tree-lists", "safetensors-header"])
def test_recursion_bomb_does_not_crash_a_process_that_raised_its_recursion_limit(tmp_path, case):
    """Programs that raise sys.setrecursionlimit (deep models, some tracing code) must
    still get an exception, not a segmentation fault, from a crafted file."""
    # 99,000 levels: within the raised limit, so only the loader's own bound can stop it.
    proc = run_bombs(str(tmp_path / "registry"), 99_000, 100_000, [case])
    assert proc.returncode == 0, (
        f"the interpreter died with return code {proc.returncode} loading a crafted "
        f"checkpoint: {proc.stderr[-2000:]}"
    )
    assert f"{case} one CheckpointCorruptedError" in proc.stdout, proc.stdout


# --- allocations bounded by the size of the files ------------------------------------


def _repeat_one_array(times: int):
    def mutate(m):
        (name,) = m["arrays"]
        m["tree"] = {"list": [{"array": name}] * times}

    return mutate


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(lambda crcs: [*crcs, crcs[-1]], id="one-block-checksum-too-many"),
        pytest.param(lambda crcs: crcs[:-1], id="one-block-checksum-too-few"),
    ],
)
def test_block_checksums_that_do_not_count_the_tensors_blocks_are_refused(make_checkpointer, edit):
    ckpt, path = saved(make_checkpointer, {"w": np.arange(5 << 18, dtype=np.float32)})  # 5 MiB

    def mutate(m):
        crcs = m["arrays"]["w"]["crc32"]
        assert isinstance(crcs, list) and len(crcs) == 5  # one per MiB block
        m["arrays"]["w"]["crc32"] = edit(crcs)

    rewrite_manifest(path, mutate)
    with pytest.raises(CheckpointCorruptedError, match="data-"):
        ckpt.load_checkpoint(1)


def test_diff_refuses_a_tree_that_refers_to_one_array_twice(make_checkpointer):
    # diff reads leaf by leaf, one array at a time: the reader itself must refuse the
    # second read of a name (a load sees the repeat in its one batch of names).
    ckpt, a = saved(make_checkpointer, {"w": np.arange(4.0)}, step=1)
    _, b = saved(make_checkpointer, {"w": np.arange(4.0)}, step=2)
    for path in (a, b):
        rewrite_manifest(path, lambda m: m.update(tree={"list": [{"array": "w"}] * 2}))
    with pytest.raises(CheckpointCorruptedError, match="refers to an array twice"):
        diff(str(a), str(b))


def _many_arrays_on_one_tensor(times: int):
    def mutate(m):
        (name,) = m["arrays"]
        entry = m["arrays"][name]
        for i in range(times):
            m["arrays"][f"alias{i}"] = {
                "dtype": entry["dtype"],
                "shape": entry["shape"],
                "shards": [{"file": entry["file"], "tensor": name, "crc32": entry["crc32"]}],
            }
        m["tree"] = {"list": [{"array": f"alias{i}"} for i in range(times)]}

    return mutate


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(_repeat_one_array(64), id="one-array-referenced-64-times"),
        pytest.param(_many_arrays_on_one_tensor(64), id="64-arrays-reading-one-tensor"),
    ],
)
def test_manifest_reading_the_same_bytes_many_times_is_refused_without_allocating_more_than_the_file(
    make_checkpointer, mutate
):
    """A saved tree never uses one tensor twice; a manifest that does multiplies what
    a load allocates (64 references to a 1 MiB tensor: 64 MiB out of a 1 MiB file)."""
    ckpt, path = saved(make_checkpointer, {"w": np.arange(1 << 18, dtype=np.float32)})
    (data_file,) = checkpoint_files(path)
    rewrite_manifest(path, mutate)
    size = data_file.stat().st_size + (path / "manifest.json").stat().st_size

    tracemalloc.start()
    try:
        try:
            ckpt.load_checkpoint(1)
            loaded = True
        except CheckpointCorruptedError:
            loaded = False
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 * size, f"a {size}-byte checkpoint made the load allocate {peak} bytes"
    assert not loaded


# Loads crafted checkpoints with the address space limited to a few hundred MB above
# what the process already uses: an allocation the size of a crafted length fails.
LIMITED_MEMORY = textwrap.dedent(
    """
    import json, resource, sys, zlib
    from pathlib import Path
    import numpy as np
    from helpers import checkpoint_files, rewrite_manifest
    from learnax.checkpoint import Checkpointer, CheckpointCorruptedError

    registry, cases = sys.argv[1], sys.argv[2].split(",")
    MIB = 1 << 20
    big = {"w": np.arange(4 * MIB, dtype=np.float32)}  # 16 MiB

    def plant(path, new, crc_of=None):
        (f,) = checkpoint_files(path)
        f.write_bytes(new)
        n = int.from_bytes(new[:8], "little")
        crc = zlib.crc32(crc_of if crc_of is not None else new[: 8 + n])
        entry = {"bytes": len(new), "header_crc32": "%08x" % crc}
        rewrite_manifest(path, lambda m: m["files"].update({f.name: entry}))

    def header_length(path):
        (f,) = checkpoint_files(path)
        raw = f.read_bytes()
        plant(path, (2**62).to_bytes(8, "little") + raw[8:], crc_of=raw)

    def huge_shape_and_size(path):
        def mutate(m):
            (name,) = m["arrays"]
            m["arrays"][name]["shape"] = [2**40]
            (f,) = m["files"]
            m["files"][f]["bytes"] = 2**42
        rewrite_manifest(path, mutate)

    def huge_header_shape(path):
        (f,) = checkpoint_files(path)
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        header["w"]["shape"] = [2**40]
        header["w"]["data_offsets"] = [0, 2**42]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        plant(path, len(text).to_bytes(8, "little") + text + raw[8 + n :])

    def repeated(path):
        def mutate(m):
            (name,) = m["arrays"]
            m["tree"] = {"list": [{"array": name}] * 64}
        rewrite_manifest(path, mutate)

    CRAFTS = {
        "header-length-2pow62": header_length,
        "shape-and-size-claiming-16-TiB": huge_shape_and_size,
        "header-shape-and-offsets-claiming-16-TiB": huge_header_shape,
        "16-MiB-array-referenced-64-times": repeated,
    }
    ckpts = {}
    for case in cases:
        ckpt = Checkpointer(registry, case, keep_best=True)
        path = Path(ckpt.save_checkpoint(big, step=1))
        ckpt.load_checkpoint(1)  # warm up: threads, caches
        CRAFTS[case](path)
        ckpts[case] = ckpt

    status = dict(l.split(":", 1) for l in open("/proc/self/status"))
    in_use = int(status["VmSize"].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (in_use + 320 * MIB, resource.RLIM_INFINITY))
    for case, ckpt in ckpts.items():
        try:
            ckpt.load_checkpoint(1)
            verdict = "LOADED"
        except CheckpointCorruptedError:
            verdict = "CheckpointCorruptedError"
        except BaseException as e:
            verdict = type(e).__name__
        print(case, verdict, flush=True)
    """
)

MEMORY_CASES = [
    "header-length-2pow62",
    "shape-and-size-claiming-16-TiB",
    "header-shape-and-offsets-claiming-16-TiB",
    "16-MiB-array-referenced-64-times",
]


@pytest.fixture(scope="module")
def limited_memory_verdicts(tmp_path_factory):
    if not hasattr(__import__("resource"), "RLIMIT_AS") or not os.path.exists("/proc/self/status"):
        pytest.skip("needs RLIMIT_AS and /proc (Linux)")
    registry = str(tmp_path_factory.mktemp("memory") / "registry")
    return subprocess.run(
        [sys.executable, "-c", LIMITED_MEMORY, registry, ",".join(MEMORY_CASES)],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_crafted_sizes_raise_corrupted_error_under_a_memory_limit_never_memory_error(
    limited_memory_verdicts, case
):
    proc = limited_memory_verdicts
    assert proc.returncode == 0, f"the interpreter died ({proc.returncode}): {proc.stderr[-2000:]}"
    verdicts = dict(line.split() for line in proc.stdout.splitlines())
    assert verdicts.get(case) == "CheckpointCorruptedError", proc.stdout + proc.stderr[-2000:]


# --- a hostile checkpoint never hides the good ones -----------------------------------


def test_load_latest_skips_a_crafted_newest_checkpoint_and_returns_the_previous_one(
    make_checkpointer,
):
    ckpt, _ = saved(make_checkpointer)
    newest = Path(ckpt.save_checkpoint(small_state(2), step=2))
    plant_data_file(newest, _with_length(2**63)(checkpoint_files(newest)[0].read_bytes()))
    with skipped_once("state_2"):
        loaded = ckpt.load_latest()
    assert loaded["step"] == 1
    assert_tree_equal(small_state(1), loaded["state"])


def test_crafted_checkpoint_with_a_target_raises_corrupted_error_not_a_target_error(
    make_checkpointer,
):
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest(path, _set_array("dtype", "V16"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), small_state(1))
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1, target=target)


def test_checkpointer_is_usable_after_refusing_crafted_files(make_checkpointer):
    ckpt, path = saved(make_checkpointer)
    rewrite_manifest(path, _set_array("shape", [2**62]))
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(1)
    assert ckpt.save_checkpoint(small_state(2), step=2) is not None
    assert_tree_equal(small_state(2), ckpt.load_checkpoint(2)["state"])
    assert isinstance(Checkpointer(ckpt.registry_path, ckpt.run_id), Checkpointer)


# --- block checksums of large arrays -------------------------------------------------


def big_state() -> dict:
    # 3 MiB: stored with one CRC32 per 1 MiB block.
    return {"w": np.arange(3 << 18, dtype=np.float32)}


def test_large_arrays_carry_one_checksum_per_mebibyte_block(make_checkpointer):
    ckpt, path = saved(make_checkpointer, state=big_state())
    crc = json.loads((path / "manifest.json").read_text())["manifest"]["arrays"]["w"]["crc32"]
    assert isinstance(crc, list) and len(crc) == 3
    np.testing.assert_array_equal(ckpt.load_checkpoint(1)["state"]["w"], big_state()["w"])


@pytest.mark.parametrize(
    "crc",
    [["00000000"] * 2, ["00000000"] * 4, [], ["zz"] * 3, "0" * 9, [["00000000"]] * 3],
    ids=["too-few", "too-many", "empty", "bad-hex", "long-str", "nested"],
)
def test_block_checksums_that_do_not_fit_the_array_are_refused(make_checkpointer, crc):
    ckpt, path = saved(make_checkpointer, state=big_state())
    rewrite_manifest(path, lambda m: m["arrays"]["w"].update(crc32=crc))
    with pytest.raises(CheckpointCorruptedError, match="manifest.json|data-"):
        ckpt.load_checkpoint(1)


def test_a_damaged_block_of_a_large_array_is_detected(make_checkpointer):
    ckpt, path = saved(make_checkpointer, state=big_state())
    (data,) = path.glob("data-*.safetensors")
    raw = bytearray(data.read_bytes())
    raw[-(1 << 19)] ^= 0x01  # in the last block
    data.write_bytes(bytes(raw))
    with pytest.raises(CheckpointCorruptedError, match="checksum mismatch"):
        ckpt.load_checkpoint(1)


def test_a_function_placeholder_naming_any_module_imports_nothing(make_checkpointer):
    ckpt, path = saved(make_checkpointer, state={"w": np.ones(2), "f": len})
    rewrite_manifest(
        path, lambda m: m["tree"]["dict"][1].__setitem__(1, {"callable": "antigravity.fly"})
    )
    assert "antigravity" not in sys.modules
    assert ckpt.load_checkpoint(1)["state"]["f"] is None
    assert "antigravity" not in sys.modules
