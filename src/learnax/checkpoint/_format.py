"""One checkpoint on storage: how it is laid out, written, committed, read and verified.

A checkpoint is a directory holding data files and ``manifest.json``::

    state_1000/
      manifest.json                 # written last: its presence is the commit
      data-<save id>.safetensors    # the arrays, in the safetensors format

The data files are plain safetensors files (8-byte little-endian header length, JSON
header, raw little-endian bytes) that the ``safetensors`` library opens as they are.
The manifest holds everything else as JSON: step, time, metrics, the tree structure,
and for each array its dtype, shape, and where its bytes are, with a CRC32 of them;
for each data file its size and a CRC32 of its header. The manifest is itself
checksummed: the file is ``{"checksum":"crc32:<8 hex>","manifest":<body>}`` and the
checksum covers the exact bytes of ``<body>``. Every byte of a checkpoint is thus
covered by a checksum or a size check.

Data files get a new name at every save, so a save over an existing checkpoint (the
rolling "latest") never touches the files the committed manifest points to: the commit
is the one atomic replacement of ``manifest.json``, and the old data files are removed
after it. An array may be stored as several shards (one per process in a multi-host
save), each a tensor of its own with the slice of the array it holds.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from . import _tree
from ._dtypes import dtype_from_name, dtype_name, safetensors_layout
from ._errors import CheckpointCorruptedError
from ._storage import LocalStorage

FORMAT = "learnax.checkpoint/1"
MANIFEST = "manifest.json"
_MANIFEST_PREFIX = re.compile(rb'\A\{"checksum":"crc32:([0-9a-f]{8})","manifest":')
_MANIFEST_SUFFIX = b"}\n"
_DATA_FILE = re.compile(r"\Adata-[A-Za-z0-9_-]{1,64}\.safetensors\Z")
_PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# safetensors itself refuses headers over 100 MB; so do we, before allocating.
_MAX_HEADER = 100_000_000
_MAX_MANIFEST = 1 << 30


# --------------------------------------------------------------------------- write


def encode_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON values; ``TypeError`` naming the metric for anything that is not a
    scalar number (Python, numpy or a 0-d jax array)."""
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of str to number, got {type(metrics).__name__}")
    out: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"Metric name {key!r} must be a str")
        out[key] = _encode_metric(key, value)
    return out


def _encode_metric(key: str, value: Any) -> Any:
    if isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return _tree.encode_float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.shape(value) == ():
        scalar = np.asarray(value).item()
        if isinstance(scalar, (bool, int, float)):
            return _encode_metric(key, scalar)
    raise TypeError(
        f"Metric {key!r} is {type(value).__name__} {np.shape(value) if hasattr(value, 'shape') else ''}"
        ": metrics must be scalar numbers."
    )


def decode_metrics(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise CheckpointCorruptedError(f"{where}: 'metrics' is not an object")
    out = {}
    for key, value in raw.items():
        if isinstance(value, (bool, int)):
            out[key] = value
        else:
            try:
                out[key] = _tree.decode_float(value, f"{where}: metric {key!r}")
            except ValueError as e:
                raise CheckpointCorruptedError(str(e)) from None
    return out


@dataclass
class _Tensor:
    leaf: _tree.ArrayLeaf
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    crc32: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def write_checkpoint(
    storage: LocalStorage,
    directory: str,
    *,
    tree: Any,
    leaves: list[_tree.ArrayLeaf],
    step: int,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write and commit one checkpoint in ``directory`` (created if missing).

    Returns once the checkpoint is durable and visible. Raises ``OSError`` on any I/O
    failure, leaving the checkpoint that was committed there before untouched.
    """
    new_directory = not storage.isdir(directory)
    storage.makedirs(directory)
    previous = referenced_files(storage, directory)
    save_id = secrets.token_hex(8)
    data_name = f"data-{save_id}.safetensors"

    data_path = storage.join(directory, data_name)
    try:
        tensors = [_describe(leaf) for leaf in leaves]
        header = _safetensors_header(tensors)
        size = storage.write_durable(data_path, _data_chunks(header, tensors))
        body = {
            "format": FORMAT,
            "step": step,
            "time": time.time(),
            "metrics": metrics,
            **(extra or {}),
            "tree": tree,
            "arrays": {t.leaf.name: _array_entry(t, data_name) for t in tensors},
            "files": {data_name: {"bytes": size, "header_crc32": f"{zlib.crc32(header):08x}"}},
        }
        storage.replace_atomic(
            storage.join(directory, MANIFEST),
            _manifest_bytes(body),
            tmp_name=f".manifest-{save_id}.tmp",
        )
    except BaseException:
        # Nothing was committed: remove what this save wrote; whatever a crash leaves
        # instead, the next Checkpointer removes.
        try:
            storage.remove(data_path)
            if new_directory:
                storage.rmtree(directory)
        except OSError:
            pass
        raise
    for name in previous - {data_name}:
        try:
            storage.remove(storage.join(directory, name))
        except OSError:  # committed already; the next Checkpointer cleans leftovers
            pass


def _array_entry(t: _Tensor, data_name: str) -> dict[str, Any]:
    return {
        "dtype": dtype_name(t.dtype),
        "shape": list(t.shape),
        **t.extra,
        "shards": [{"file": data_name, "tensor": t.leaf.name, "crc32": f"{t.crc32:08x}"}],
    }


def _describe(leaf: _tree.ArrayLeaf) -> _Tensor:
    value = leaf.value
    if leaf.kind == "key":
        data = jax.random.key_data(value)
        extra = {"kind": "key", "impl": leaf.impl}
        dtype, shape = np.dtype(data.dtype), tuple(data.shape)
    else:
        extra = {"kind": "scalar"} if leaf.kind == "scalar" else {}
        dtype, shape = np.dtype(value.dtype).newbyteorder("="), tuple(np.shape(value))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return _Tensor(leaf, dtype, shape, nbytes, extra=extra)


def _safetensors_header(tensors: list[_Tensor]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "learnax"}}
    offset = 0
    for t in tensors:
        code, shape = safetensors_layout(t.dtype, t.shape)
        entries[t.leaf.name] = {
            "dtype": code,
            "shape": shape,
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors does
    return len(header).to_bytes(8, "little") + header


def _host_bytes(t: _Tensor) -> np.ndarray:
    """The leaf's bytes as a flat uint8 view of host memory (copied only when the array
    is on a device, non-contiguous or big-endian)."""
    value = t.leaf.value
    if t.leaf.kind == "key":
        value = jax.random.key_data(value)
    arr = np.asarray(value)
    if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return arr.reshape(-1).view(np.uint8)


def _data_chunks(header: bytes, tensors: list[_Tensor]) -> Iterator[memoryview | bytes]:
    yield header
    for t in tensors:
        data = _host_bytes(t)
        if data.nbytes != t.nbytes:
            raise ValueError(f"array at {t.leaf.path} changed size while being saved")
        t.crc32 = zlib.crc32(data)
        yield memoryview(data)


def _manifest_bytes(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    prefix = b'{"checksum":"crc32:%08x","manifest":' % zlib.crc32(raw)
    return prefix + raw + _MANIFEST_SUFFIX


def referenced_files(storage: LocalStorage, directory: str) -> set[str]:
    """Data files the committed manifest in ``directory`` points to; empty when there
    is none or it cannot be read."""
    try:
        return set(read_manifest(storage, directory)["files"])
    except (OSError, CheckpointCorruptedError):
        return set()


# --------------------------------------------------------------------------- read


def read_manifest(storage: LocalStorage, directory: str) -> dict[str, Any]:
    """The verified manifest of the checkpoint in ``directory``.

    Raises ``FileNotFoundError`` when there is no manifest (not a committed checkpoint)
    and ``CheckpointCorruptedError`` when it fails verification.
    """
    path = storage.join(directory, MANIFEST)
    raw = storage.read_bytes(path, _MAX_MANIFEST)
    match = _MANIFEST_PREFIX.match(raw)
    if match is None or not raw.endswith(_MANIFEST_SUFFIX):
        raise CheckpointCorruptedError(f"{path}: not a learnax manifest (bad framing)")
    body = raw[match.end() : -len(_MANIFEST_SUFFIX)]
    if f"{zlib.crc32(body):08x}".encode() != match.group(1):
        raise CheckpointCorruptedError(f"{path}: checksum mismatch, the manifest is damaged")
    try:
        manifest = json.loads(body, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise CheckpointCorruptedError(f"{path}: invalid JSON ({e})") from None
    _validate_manifest(manifest, path)
    return manifest


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in a JSON object")
    return out


def _validate_manifest(m: Any, path: str) -> None:
    def bad(what: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(f"{path}: {what}")

    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise bad(f"unsupported format {m.get('format') if isinstance(m, dict) else None!r}")
    step = m.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise bad(f"invalid step {step!r}")
    if isinstance(m.get("time"), bool) or not isinstance(m.get("time"), (int, float)):
        raise bad("invalid time")
    files = m.get("files")
    if not isinstance(files, dict):
        raise bad("'files' is not an object")
    for name, info in files.items():
        if not _DATA_FILE.match(name):
            raise bad(f"refusing data file name {name!r}")
        if not (isinstance(info, dict) and _is_count(info.get("bytes"))):
            raise bad(f"invalid entry for {name}")
        if not (isinstance(info.get("header_crc32"), str) and len(info["header_crc32"]) == 8):
            raise bad(f"invalid header checksum for {name}")
    arrays = m.get("arrays")
    if not isinstance(arrays, dict):
        raise bad("'arrays' is not an object")
    for name, a in arrays.items():
        if not isinstance(a, dict):
            raise bad(f"invalid entry for array {name!r}")
        try:
            dtype = dtype_from_name(a.get("dtype"))
        except ValueError as e:
            raise bad(f"array {name!r}: {e}") from None
        shape = a.get("shape")
        if not (isinstance(shape, list) and len(shape) <= 64 and all(_is_count(d) for d in shape)):
            raise bad(f"array {name!r}: invalid shape {shape!r}")
        kind = a.get("kind", "array")
        if kind not in ("array", "scalar", "key"):
            raise bad(f"array {name!r}: unknown kind {kind!r}")
        if kind == "key" and (a.get("impl") not in _PRNG_IMPLS or dtype != np.uint32):
            raise bad(f"array {name!r}: invalid PRNG key")
        if kind == "scalar" and shape:
            raise bad(f"array {name!r}: a scalar with shape {shape}")
        shards = a.get("shards")
        if not (isinstance(shards, list) and shards):
            raise bad(f"array {name!r}: no shards")
        for s in shards:
            if not (
                isinstance(s, dict) and s.get("file") in files and isinstance(s.get("tensor"), str)
            ):
                raise bad(f"array {name!r}: invalid shard {s!r:.200}")
            if not (isinstance(s.get("crc32"), str) and len(s["crc32"]) == 8):
                raise bad(f"array {name!r}: invalid shard checksum")
            if "slice" in s:
                _shard_bounds(s["slice"], shape, f"{path}: array {name!r}")
        # Bound every allocation a load makes by the size of the files it reads.
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes > sum(files[f]["bytes"] for f in {s["file"] for s in shards}):
            raise bad(f"array {name!r}: shape {shape} needs more bytes than its data files hold")
    metrics = m.get("metrics")
    if not isinstance(metrics, dict):
        raise bad("'metrics' is not an object")

    def known_array(name: str) -> str:
        if name not in arrays:
            raise ValueError(f"the tree refers to array {name!r}, which is not listed")
        return name

    try:  # a dry run of the rebuild: every later step can trust the structure
        _tree.decode_tree(m.get("tree"), known_array)
    except (ValueError, RecursionError) as e:
        raise bad(f"invalid tree: {e}") from None


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


def _shard_bounds(spec: Any, shape: list[int], where: str) -> tuple[slice, ...]:
    if not (isinstance(spec, list) and len(spec) == len(shape)):
        raise CheckpointCorruptedError(f"{where}: invalid shard slice")
    out = []
    for bounds, dim in zip(spec, shape, strict=True):
        ok = isinstance(bounds, list) and len(bounds) == 2 and all(_is_count(b) for b in bounds)
        if not ok or not bounds[0] <= bounds[1] <= dim:
            raise CheckpointCorruptedError(f"{where}: shard slice {spec} outside shape {shape}")
        out.append(slice(bounds[0], bounds[1]))
    return tuple(out)


class CheckpointReader:
    """Reads verified arrays of one committed checkpoint, opening each data file once."""

    def __init__(self, storage: LocalStorage, directory: str, manifest: dict[str, Any]):
        self.storage = storage
        self.directory = directory
        self.manifest = manifest
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}

    def array(self, name: str) -> Any:
        """The array called ``name``: a numpy array, a numpy scalar or a typed PRNG key."""
        info = self.manifest["arrays"].get(name)
        if info is None:
            raise CheckpointCorruptedError(
                f"{self.storage.join(self.directory, MANIFEST)}: the tree refers to array "
                f"{name!r}, which the manifest does not list"
            )
        dtype = dtype_from_name(info["dtype"])
        shape = tuple(info["shape"])
        shards = info["shards"]
        for shard in shards:  # checks the files' real sizes before allocating
            self._header(shard["file"])
        out = np.empty(shape, dtype)
        if len(shards) == 1 and "slice" not in shards[0]:
            self._read_shard(shards[0], out, name)
        else:
            self._read_shards(shards, out, name)
        kind = info.get("kind", "array")
        if kind == "scalar":
            return out[()]
        if kind == "key":
            return jax.random.wrap_key_data(out, impl=info["impl"])
        return out

    def _read_shards(self, shards: list[dict[str, Any]], out: np.ndarray, name: str) -> None:
        where = f"{self.storage.join(self.directory, MANIFEST)}: array {name!r}"
        regions = [
            _shard_bounds(s.get("slice", [[0, d] for d in out.shape]), list(out.shape), where)
            for s in shards
        ]
        volume = sum(
            int(np.prod([r.stop - r.start for r in reg], dtype=np.int64)) for reg in regions
        )
        disjoint = all(
            any(a.stop <= b.start or b.stop <= a.start for a, b in zip(r1, r2, strict=True))
            for i, r1 in enumerate(regions)
            for r2 in regions[:i]
        )
        if volume != out.size or not disjoint:
            raise CheckpointCorruptedError(f"{where}: shards do not tile the array exactly")
        for shard, region in zip(shards, regions, strict=True):
            piece = np.empty(tuple(r.stop - r.start for r in region), out.dtype)
            self._read_shard(shard, piece, name)
            out[region] = piece

    def _read_shard(self, shard: dict[str, Any], out: np.ndarray, name: str) -> None:
        file = shard["file"]
        path = self.storage.join(self.directory, file)
        data_start, header = self._header(file)
        entry = header.get(shard["tensor"])
        code, st_shape = safetensors_layout(out.dtype, out.shape)
        if not (
            isinstance(entry, dict)
            and entry.get("dtype") == code
            and entry.get("shape") == st_shape
        ):
            raise CheckpointCorruptedError(
                f"{path}: tensor {shard['tensor']!r} is missing or does not match the manifest"
            )
        offsets = entry.get("data_offsets")
        size = self.manifest["files"][file]["bytes"]
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[1] - offsets[0] == out.nbytes
            and data_start + offsets[1] <= size
        ):
            raise CheckpointCorruptedError(
                f"{path}: tensor {shard['tensor']!r} has invalid offsets"
            )
        view = out.reshape(-1).view(np.uint8)
        with self.storage.open_read(path) as f:
            f.seek(data_start + offsets[0])
            _read_exactly(f, memoryview(view), path)
        if f"{zlib.crc32(view):08x}" != shard["crc32"]:
            raise CheckpointCorruptedError(
                f"{path}: checksum mismatch in tensor {shard['tensor']!r}, the data is damaged"
            )

    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file in self._headers:
            return self._headers[file]
        path = self.storage.join(self.directory, file)
        expected = self.manifest["files"][file]
        try:
            size = self.storage.size(path)
        except FileNotFoundError:
            raise CheckpointCorruptedError(f"{path}: data file is missing") from None
        if size != expected["bytes"]:
            raise CheckpointCorruptedError(
                f"{path}: size is {size} bytes, the manifest says {expected['bytes']} (truncated?)"
            )
        with self.storage.open_read(path) as f:
            prefix = bytearray(8)
            _read_exactly(f, memoryview(prefix), path)
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, _MAX_HEADER):
                raise CheckpointCorruptedError(f"{path}: header length {length} exceeds the file")
            raw = bytearray(length)
            _read_exactly(f, memoryview(raw), path)
        if f"{zlib.crc32(prefix + raw):08x}" != expected["header_crc32"]:
            raise CheckpointCorruptedError(f"{path}: header checksum mismatch, the file is damaged")
        try:
            header = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
        except (ValueError, RecursionError) as e:
            raise CheckpointCorruptedError(f"{path}: invalid header ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointCorruptedError(f"{path}: header is not an object")
        self._headers[file] = (8 + length, header)
        return self._headers[file]


def _read_exactly(f: Any, view: memoryview, path: str) -> None:
    while view:
        n = f.readinto(view)
        if not n:
            raise CheckpointCorruptedError(f"{path}: unexpected end of file (truncated?)")
        view = view[n:]
