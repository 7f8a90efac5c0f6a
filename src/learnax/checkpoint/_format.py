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

import contextlib
import json
import logging
import math
import re
import secrets
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypeVar

import jax
import numpy as np

from . import _tree
from ._dtypes import dtype_from_name, dtype_name, safetensors_layout
from ._errors import CheckpointCorruptedError
from ._storage import FsspecStorage, LocalStorage
from ._threads import IO_THREADS, parallel_map, run_in_background

logger = logging.getLogger("learnax")

# /2: tensors over CRC_BLOCK bytes carry a checksum per block (a list), so that older
# readers, which would take such a list for damage, refuse the format by name instead.
FORMAT = "learnax.checkpoint/2"
_READABLE_FORMATS = ("learnax.checkpoint/1", FORMAT)
MANIFEST = "manifest.json"
_MANIFEST_PREFIX = re.compile(rb'\A\{"checksum":"crc32:([0-9a-f]{8})","manifest":')
_MANIFEST_SUFFIX = b"}\n"
_DATA_FILE = re.compile(r"\Adata-[A-Za-z0-9_-]{1,64}\.safetensors\Z")
_PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
# safetensors itself refuses headers over 100 MB; so do we, before allocating.
MAX_HEADER = 100_000_000
_MAX_MANIFEST = 1 << 30
# Trees are at most _tree.MAX_DEPTH deep; JSON a little more (manifest framing).
_MAX_JSON_DEPTH = 2 * _tree.MAX_DEPTH + 16
_SAFE_RECURSION_LIMIT = 5_000
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
# A state smaller than this goes to one data file; larger ones are split over the
# I/O threads, each file at least this large.
MIN_FILE_BYTES = 64 << 20
# Tensors larger than this carry one CRC32 per block of this size (see checksum).
CRC_BLOCK = 1 << 20

Storage = LocalStorage | FsspecStorage
T = TypeVar("T")


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
    if isinstance(value, bool) or (
        isinstance(value, int) and -_tree._MAX_INT < value < _tree._MAX_INT
    ):
        return value
    if isinstance(value, float):
        return _tree.encode_float(value)
    scalar = python_scalar(value)
    if scalar is not value and isinstance(scalar, (bool, int, float)):
        return _encode_metric(key, scalar)
    raise TypeError(
        f"Metric {key!r} is {type(value).__name__} {np.shape(value) if hasattr(value, 'shape') else ''}"
        ": metrics must be scalar numbers."
    )


def python_scalar(value: Any) -> Any:
    """A 0-d numpy or jax array (a metric computed in jax) as its Python scalar;
    anything else as it is."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.shape(value) == ():
        return np.asarray(value).item()
    return value


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


class VisibleNotDurableError(OSError):
    """The checkpoint was renamed into place (visible, whole) but the fsync of its
    directory failed, so a power cut could still undo it."""


@dataclass
class _Tensor:
    """One tensor of a data file: a whole array, or one shard of a global jax array."""

    leaf: _tree.ArrayLeaf
    value: Any  # what is written: the leaf's array, or the shard's single-device array
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    tensor: str  # the name in the data file
    slice: list[list[int]] | None = None  # where a shard sits in the global array
    file: str = ""
    crc32: str | list[str] = ""
    data: np.ndarray | None = None  # the bytes, when taken from host memory up front


@dataclass
class Part:
    """What one process wrote of a checkpoint: its data files and the array entries
    (or shards) they hold. A single-process save is one part."""

    files: dict[str, dict[str, Any]]
    arrays: dict[str, dict[str, Any]]

    def to_json(self) -> str:
        return json.dumps({"files": self.files, "arrays": self.arrays}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Part:
        raw = json.loads(text)
        return cls(raw["files"], raw["arrays"])


def write_checkpoint(
    storage: Storage,
    directory: str,
    *,
    tree: Any,
    leaves: list[_tree.ArrayLeaf],
    step: int,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write and commit one checkpoint in ``directory`` (created if missing).

    The arrays go to one or more data files written in parallel (one per I/O thread
    for large states), each leaf streamed from its own buffer: no copy of the whole
    state is made. Returns once the checkpoint is durable and visible. Raises
    ``OSError`` on any I/O failure: before the commit, what was committed there before
    is untouched; after it (``VisibleNotDurableError``, the final directory fsync
    failed) the new checkpoint is visible and whole, but its durability unconfirmed.
    """
    new_directory = not storage.isdir(directory)
    manifest: list[bytes] = []

    def build_manifest(part: Part) -> None:
        # Runs while the data files are still being written, when they can be.
        manifest.append(manifest_bytes(manifest_body(tree, part, step, metrics, extra)))

    try:
        storage.makedirs(directory)
        part = write_part(
            storage,
            directory,
            [_whole(leaf) for leaf in leaves],
            secrets.token_hex(8),
            build_manifest,
        )
    except BaseException:
        if new_directory:
            with contextlib.suppress(OSError):
                storage.rmtree(directory)
        raise
    try:
        commit(storage, directory, manifest[0], set(part.files))
    except OSError as e:
        if not isinstance(e, VisibleNotDurableError):
            remove_files(storage, directory, part.files)
            if new_directory:
                with contextlib.suppress(OSError):
                    storage.rmtree(directory)
        raise


def write_part(
    storage: Storage,
    directory: str,
    tensors: list[_Tensor],
    file_prefix: str,
    while_writing: Callable[[Part], None] | None = None,
) -> Part:
    """Write ``tensors`` to durable data files ``data-<file_prefix>-<i>.safetensors`` in
    ``directory`` and return their description. ``while_writing(part)`` runs in this
    thread once the checksums are known, while the files may still be written.
    On failure the files written are removed and the ``OSError`` raised."""
    groups = _split_for_files(tensors)
    names = [f"data-{file_prefix}-{i}.safetensors" for i in range(len(groups))]
    for name, group in zip(names, groups, strict=True):
        for t in group:
            t.file = name
    headers = [_safetensors_header(g) for g in groups]
    files = {
        name: {
            "bytes": len(header) + sum(t.nbytes for t in group),
            "header_crc32": f"{zlib.crc32(header):08x}",
        }
        for name, header, group in zip(names, headers, groups, strict=True)
    }
    jobs = [
        (storage.join(directory, name), header, group)
        for name, header, group in zip(names, headers, groups, strict=True)
    ]
    try:
        if all(_in_host_memory(t.value) for t in tensors):
            # All bytes are in host memory already: the I/O threads write them while
            # this thread checksums them (zlib releases the GIL) and builds the
            # manifest, so that work hides behind the disk's.
            for t in tensors:
                t.data = _host_bytes(t)
            join = run_in_background(lambda job: _write_data_file(storage, *job), jobs)
            try:
                for t in tensors:
                    t.crc32 = checksum(t.data)
                if while_writing is not None:
                    while_writing(Part(files, _array_entries(tensors)))
            except BaseException:
                with contextlib.suppress(BaseException):  # the writers must stop first
                    join()
                raise
            sizes = join()
            part = Part(files, _array_entries(tensors))
        else:
            # Arrays on accelerators are fetched one at a time while writing, and
            # checksummed there: never the whole state in host memory at once.
            sizes = parallel_map(lambda job: _write_data_file(storage, *job), jobs)
            part = Part(files, _array_entries(tensors))
            if while_writing is not None:
                while_writing(part)
        for name, size in zip(names, sizes, strict=True):
            if size != files[name]["bytes"]:
                raise ValueError(
                    f"data file {name} came out {size} bytes, not {files[name]['bytes']}"
                )
    except BaseException:
        # Nothing refers to these files: remove them; whatever a crash leaves instead,
        # the next Checkpointer removes.
        remove_files(storage, directory, files)
        raise
    return part


def write_tensors_file(storage: Storage, path: str, leaves: list[_tree.ArrayLeaf]) -> None:
    """Write the arrays ``leaves`` (named by ``leaf.name``) as one safetensors file at
    ``path``, durably: the export of a checkpoint's arrays for other tools."""
    tensors = [_whole(leaf) for leaf in leaves]
    size = storage.write_durable(path, _data_chunks(_safetensors_header(tensors), tensors))
    if size != len(_safetensors_header(tensors)) + sum(t.nbytes for t in tensors):
        raise OSError(f"{path}: written size does not match")


def remove_files(storage: Storage, directory: str, names: Iterable[str]) -> None:
    """Remove data files this save wrote and did not commit (best effort)."""
    for name in names:
        with contextlib.suppress(OSError):
            storage.remove(storage.join(directory, name))


def commit(storage: Storage, directory: str, manifest: bytes, files: set[str]) -> None:
    """Make the checkpoint in ``directory`` visible: its data files ``files`` are durable
    already; write ``manifest`` over the old one in one atomic step, then remove the
    files of the checkpoint it replaced."""
    # The data files' directory entries must be durable before the manifest that
    # names them can be: otherwise a power cut could keep the rename but not them.
    storage.fsync_dir(directory)
    storage.replace_atomic(
        storage.join(directory, MANIFEST),
        manifest,
        tmp_name=f".manifest-{secrets.token_hex(8)}.tmp",
    )
    # The rename is durable once the directory is: a failure here still fails the
    # save (durability unconfirmed), but the new checkpoint is whole and visible now,
    # so its files stay.
    try:
        storage.fsync_dir(directory)
    except OSError as e:
        raise VisibleNotDurableError(
            e.errno, f"{e.strerror} (the new checkpoint is visible)", directory
        ) from e
    # Committed: the previous save's files (and any leftovers) are garbage now. Nothing
    # here may fail the save: the new checkpoint is whole whatever happens to them.
    try:
        superseded = [n for n in storage.listdir(directory) if n != MANIFEST and n not in files]
    except OSError as e:
        logger.warning("Could not list %s to remove superseded files: %s", directory, e)
        return
    for name in superseded:
        try:
            storage.remove(storage.join(directory, name))
        except OSError as e:
            logger.warning(
                "Could not remove superseded file %s (the next Checkpointer will): %s",
                storage.join(directory, name),
                e,
            )


def _whole(leaf: _tree.ArrayLeaf) -> _Tensor:
    value = leaf.value
    dtype = value.dtype
    if dtype.byteorder == ">":
        dtype = dtype.newbyteorder("=")  # written little-endian
    return _Tensor(leaf, value, dtype, value.shape, value.nbytes, leaf.name)


def tensors_of_process(leaves: list[_tree.ArrayLeaf], process: int) -> list[_Tensor]:
    """The tensors process ``process`` writes in a multi-host save: the shards of the
    global jax arrays that it holds with replica id 0 (so that every shard is written
    by exactly one process), and, on process 0, every other leaf (host arrays, arrays
    of one process) whole."""
    out = []
    for leaf in leaves:
        value = leaf.value
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            for shard in value.addressable_shards:
                if shard.replica_id != 0:
                    continue
                bounds = [
                    [index.indices(dim)[0], index.indices(dim)[1]]
                    for index, dim in zip(shard.index, value.shape, strict=True)
                ]
                data = shard.data
                out.append(
                    _Tensor(
                        leaf,
                        data,
                        np.dtype(data.dtype),
                        tuple(data.shape),
                        data.nbytes,
                        f"{leaf.name}[{','.join(f'{a}:{b}' for a, b in bounds)}]",
                        slice=bounds,
                    )
                )
        elif process == 0:
            out.append(_whole(leaf))
    return out


def _split_for_files(tensors: list[_Tensor]) -> list[list[_Tensor]]:
    """Contiguous runs of leaves, one per data file. Large states are split so that
    the I/O threads write (and later read) in parallel; tree order is kept, so that
    reading a subtree reads neighbouring bytes."""
    return _split_contiguous(tensors, [t.nbytes for t in tensors]) or [[]]


def _split_contiguous(items: list[Any], sizes: list[int]) -> list[list[Any]]:
    """``items`` cut into at most IO_THREADS contiguous runs of about equal total size,
    each at least MIN_FILE_BYTES (one run for less); empty runs dropped."""
    total = sum(sizes)
    count = max(1, min(IO_THREADS, total // MIN_FILE_BYTES))
    groups: list[list[Any]] = [[] for _ in range(count)]
    done = 0
    for item, size in zip(items, sizes, strict=True):
        groups[min(count - 1, done * count // max(total, 1))].append(item)
        done += size
    return [g for g in groups if g]


def _write_data_file(storage: Storage, path: str, header: bytes, tensors: list[_Tensor]) -> int:
    return storage.write_durable(path, _data_chunks(header, tensors))


def manifest_body(
    tree: Any,
    part: Part,
    step: int,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        "metrics": metrics,
        **(extra or {}),
        "tree": tree,
        "arrays": part.arrays,
        "files": part.files,
    }


def merge_parts(parts: list[Part], leaves: list[_tree.ArrayLeaf], where: str) -> Part:
    """One description of a checkpoint from the parts its processes wrote. Raises
    ``ValueError`` when an array is missing or its shards do not cover it exactly
    (a process wrote another state than the others)."""
    files: dict[str, dict[str, Any]] = {}
    arrays: dict[str, dict[str, Any]] = {}
    for process, part in enumerate(parts):
        for name, info in part.files.items():
            files[name] = {**info, "process": process}
        for name, entry in part.arrays.items():
            if name not in arrays:
                arrays[name] = entry
                continue
            known = arrays[name]
            same = {k: v for k, v in known.items() if k not in ("shards", "file", "crc32")}
            if (
                "shards" not in entry
                or "shards" not in known
                or same != {k: v for k, v in entry.items() if k not in ("shards", "file", "crc32")}
            ):
                raise ValueError(
                    f"{where}: process {process} wrote array {name!r} as {entry.get('dtype')}"
                    f"{entry.get('shape')}, another process as {known.get('dtype')}"
                    f"{known.get('shape')}; every process must save the same state"
                )
            known["shards"].extend(entry["shards"])
    for leaf in leaves:
        entry = arrays.get(leaf.name)
        covered = entry is not None and (
            "shards" not in entry
            or sum(math.prod(b - a for a, b in s["slice"]) for s in entry["shards"])
            == math.prod(entry["shape"])
        )
        if not covered:
            raise ValueError(
                f"{where}: the processes' shards of the array at {leaf.path} do not cover it "
                "exactly; every process must save the same state"
            )
    return Part(files, arrays)


def _in_host_memory(value: Any) -> bool:
    return type(value) is np.ndarray or not isinstance(value, jax.Array) or on_cpu(value)


def _array_entries(tensors: list[_Tensor]) -> dict[str, dict[str, Any]]:
    entries: dict[str, dict[str, Any]] = {}
    for t in tensors:
        leaf = t.leaf
        if t.slice is None:
            entry: dict[str, Any] = {
                "dtype": dtype_name(t.dtype),
                "shape": list(t.shape),
                "file": t.file,
                "crc32": t.crc32,
            }
        else:
            entry = entries.get(leaf.name) or {
                "dtype": dtype_name(t.dtype),
                "shape": list(leaf.value.shape),
                "shards": [],
            }
            entry["shards"].append(
                {"file": t.file, "tensor": t.tensor, "slice": t.slice, "crc32": t.crc32}
            )
        if leaf.kind != "array":
            entry["kind"] = leaf.kind
        if leaf.impl is not None:
            entry["impl"] = leaf.impl
        entries[leaf.name] = entry
    return entries


def checksum(data: np.ndarray | memoryview) -> str | list[str]:
    """The CRC32 of a tensor's bytes: one for up to CRC_BLOCK bytes, else one per block
    of CRC_BLOCK bytes, so that a process restoring a part of an array can verify just
    the blocks it reads."""
    view = memoryview(data).cast("B")
    if view.nbytes <= CRC_BLOCK:
        return f"{zlib.crc32(view):08x}"
    return [f"{zlib.crc32(view[i : i + CRC_BLOCK]):08x}" for i in range(0, view.nbytes, CRC_BLOCK)]


def _safetensors_header(tensors: list[_Tensor]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {"format": "learnax"}}
    offset = 0
    for t in tensors:
        code, shape = safetensors_layout(t.dtype, t.shape)
        entries[t.tensor] = {
            "dtype": code,
            "shape": shape,
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors does
    return len(header).to_bytes(8, "little") + header


def _host_bytes(t: _Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 view of host memory: no copy for a host array
    (or a jax array on the CPU); one transfer for an array on an accelerator; a copy
    only when the array is non-contiguous or big-endian."""
    arr = t.value
    if type(arr) is not np.ndarray:
        arr = host_array(arr)
    if not arr.flags.c_contiguous or arr.dtype.byteorder == ">":
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return arr.reshape(-1).view(np.uint8)


def on_cpu(value: jax.Array) -> bool:
    """Whether a jax array lives on one CPU device (its buffer is host memory)."""
    devices = value.sharding.device_set
    return len(devices) == 1 and next(iter(devices)).platform == "cpu"


def host_array(value: Any) -> np.ndarray:
    """A jax array's value in host memory, shard by shard, without leaving a cached
    host copy on the caller's array (``np.asarray`` would keep one for its lifetime:
    after a save of a state on an accelerator, the host would hold the whole state).
    On the CPU a single-device array is returned as a view, without copying."""
    if not isinstance(value, jax.Array):
        return np.asarray(value)
    if value.is_fully_replicated:
        if on_cpu(value):  # a view, which jax keeps at no cost; 3x cheaper per leaf
            return np.asarray(value)
        return np.asarray(value.addressable_data(0))
    out = np.empty(value.shape, value.dtype)
    for shard in value.addressable_shards:
        if shard.replica_id == 0:
            out[shard.index] = np.asarray(shard.data)
    return out


def _data_chunks(header: bytes, tensors: list[_Tensor]) -> Iterator[memoryview | bytes]:
    yield header
    for t in tensors:
        if t.data is not None:  # checksummed by the caller
            yield memoryview(t.data)
            continue
        data = _host_bytes(t)
        if data.nbytes != t.nbytes:
            raise ValueError(f"array at {t.leaf.path} changed size while being saved")
        t.crc32 = checksum(data)
        yield memoryview(data)


def manifest_bytes(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    prefix = b'{"checksum":"crc32:%08x","manifest":' % zlib.crc32(raw)
    return prefix + raw + _MANIFEST_SUFFIX


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
    manifest = parse_json(body, f"{path}: invalid JSON")
    _validate_manifest(manifest, path)
    return manifest


def read_consistent(storage: Storage, directory: str, work: Callable[[dict[str, Any]], T]) -> T:
    """``work(manifest)`` on the committed manifest of the checkpoint in ``directory``.

    A save that replaces the checkpoint meanwhile (a new manifest, then the old data
    files removed) makes ``work`` fail on files that are gone: then it runs again on
    the new manifest, up to three times. Raises ``FileNotFoundError`` when there is no
    manifest (also when the checkpoint was deleted meanwhile), and what ``work`` raised
    when the manifest did not change: a data file missing under an unchanged manifest
    is damage (``CheckpointCorruptedError``).
    """
    for attempt in range(3):
        manifest = read_manifest(storage, directory)
        try:
            return work(manifest)
        except (CheckpointCorruptedError, FileNotFoundError) as e:
            try:
                changed = read_manifest(storage, directory) != manifest
            except FileNotFoundError:
                raise  # deleted meanwhile
            except (OSError, CheckpointCorruptedError):
                changed = False
            if changed and attempt < 2:
                continue
            if isinstance(e, FileNotFoundError):
                raise CheckpointCorruptedError(f"{directory}: {e}") from e
            raise
    raise AssertionError("unreachable")


def parse_json(raw: bytes, what: str) -> Any:
    """JSON from a file, refusing duplicate keys and nesting too deep to rebuild.

    The C parser guards its recursion with Python's recursion limit; a process that
    raised the limit far could overflow the C stack on a crafted file (seen at 99,000
    levels), so then the nesting depth is measured first, without recursing."""
    if sys.getrecursionlimit() > _SAFE_RECURSION_LIMIT and _nesting_depth(raw) > _MAX_JSON_DEPTH:
        raise CheckpointCorruptedError(f"{what} (nested deeper than {_MAX_JSON_DEPTH} levels)")
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:
        raise CheckpointCorruptedError(f"{what} ({e})") from None


def _nesting_depth(raw: bytes) -> int:
    """The deepest nesting of [ and { in JSON text, outside strings."""
    structure = _JSON_STRING.sub(b"", raw)
    opens = np.frombuffer(structure, np.uint8)
    steps = np.isin(opens, (ord("["), ord("{"))).astype(np.int64)
    steps -= np.isin(opens, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate keys in a JSON object")
    return out


def _validate_manifest(m: Any, path: str) -> None:
    def bad(what: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(f"{path}: {what}")

    if not isinstance(m, dict) or m.get("format") not in _READABLE_FORMATS:
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
    if not isinstance(m.get("arrays"), dict):
        raise bad("'arrays' is not an object")
    if not isinstance(m.get("metrics"), dict):
        raise bad("'metrics' is not an object")
    # Array entries are checked as they are read (check_array_entry), the tree as it
    # is rebuilt: one pass over each instead of two.


def check_array_entry(
    manifest: dict[str, Any], name: str, where: str
) -> tuple[np.dtype, list[Any]]:
    """The dtype and shards of array ``name``, checked: a known dtype, a sane shape, and
    no more bytes than its data files hold (which bounds every allocation a load makes
    by the size of the files it reads)."""

    def bad(what: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(f"{where}: array {name!r}: {what}")

    a = manifest["arrays"].get(name)
    if not isinstance(a, dict):
        raise bad("missing or invalid entry")
    try:
        dtype = dtype_from_name(a.get("dtype"))
    except ValueError as e:
        raise bad(str(e)) from None
    shape = a.get("shape")
    if not (isinstance(shape, list) and len(shape) <= 64 and all(_is_count(d) for d in shape)):
        raise bad(f"invalid shape {shape!r:.200}")
    kind = a.get("kind", "array")
    if kind not in ("array", "scalar", "key"):
        raise bad(f"unknown kind {kind!r:.100}")
    if kind == "key" and (a.get("impl") not in _PRNG_IMPLS or dtype != np.uint32):
        raise bad("invalid PRNG key")
    if kind == "scalar" and shape:
        raise bad(f"a scalar with shape {shape}")
    shards = shards_of(name, a)
    files = manifest["files"]
    if not (isinstance(shards, list) and shards):
        raise bad("no shards")
    for s in shards:
        if not (
            isinstance(s, dict) and s.get("file") in files and isinstance(s.get("tensor"), str)
        ):
            raise bad(f"invalid shard {s!r:.200}")
        if not _is_checksum(s.get("crc32")):
            raise bad("invalid shard checksum")
        if "slice" in s:
            _shard_bounds(s["slice"], shape, f"{where}: array {name!r}")
    if math.prod(shape) * dtype.itemsize > sum(
        files[f]["bytes"] for f in {s["file"] for s in shards}
    ):
        raise bad(f"shape {shape} needs more bytes than its data files hold")
    return dtype, shards


def _is_checksum(x: Any) -> bool:
    def crc(c: Any) -> bool:
        return isinstance(c, str) and len(c) == 8

    return crc(x) or (isinstance(x, list) and 0 < len(x) < 1 << 40 and all(crc(c) for c in x))


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


def shards_of(name: str, entry: dict[str, Any]) -> Any:
    """The shards of an array entry; an array stored whole is written inline."""
    if "shards" in entry:
        return entry["shards"]
    return [{"file": entry.get("file"), "tensor": name, "crc32": entry.get("crc32")}]


@dataclass
class _Read:
    """Bytes of one tensor to read from a data file into ``view``, then verify: the
    whole tensor, or (a partial read) whole checksum blocks of it from ``first_block``."""

    file: str
    offset: int  # from the start of the file
    view: np.ndarray  # flat uint8 destination
    crc32: str | list[str]
    tensor: str
    first_block: int = 0


class CheckpointReader:
    """Reads verified arrays of one committed checkpoint, in parallel, straight into
    the arrays that are returned (no intermediate copies)."""

    def __init__(
        self,
        storage: Storage,
        directory: str,
        manifest: dict[str, Any],
        *,
        keys_as_data: bool = False,
    ):
        # keys_as_data: PRNG keys come back as their uint32 key data, so that tools
        # that only check or compare them never start a JAX backend (on a training
        # node: the GPU, and its memory).
        self.keys_as_data = keys_as_data
        self.storage = storage
        self.directory = directory
        self.manifest = manifest
        self._where = storage.join(directory, MANIFEST)
        self._headers: dict[str, tuple[int, dict[str, Any]]] = {}
        self._arrays: dict[str, Any] = {}
        self._handed_out: set[str] = set()
        self._region_cache: dict[str, list[tuple[slice, ...]]] = {}

    def array(self, name: str) -> Any:
        """The array called ``name``: a numpy array, a numpy scalar or a typed PRNG key.
        Arrays read by :meth:`prefetch` are handed out from there."""
        if name not in self._arrays:
            self.prefetch([name])
        self._handed_out.add(name)
        return self._arrays.pop(name)

    def info(self, name: str) -> tuple[np.dtype, tuple[int, ...], str]:
        """The dtype, shape and kind (``"array"``, ``"scalar"``, ``"key"``) of array
        ``name``, checked, without reading it."""
        dtype, _ = check_array_entry(self.manifest, name, self._where)
        entry = self.manifest["arrays"][name]
        return dtype, tuple(entry["shape"]), entry.get("kind", "array")

    def check_files(self) -> None:
        """Check every data file the manifest names: present, of the right size, with an
        intact header whose tensors tile its data (the bytes are checked as read)."""
        for file in self.manifest["files"]:
            self._header(file)

    def prefetch(self, names: list[str]) -> None:
        """Read and verify the named arrays, spreading the reads over the I/O threads."""
        reads: list[_Read] = []
        assemble: list[tuple[np.ndarray, tuple[slice, ...], np.ndarray]] = []
        outs: dict[str, np.ndarray] = {}
        if len(set(names)) != len(names) or not self._handed_out.isdisjoint(names):
            # A saved tree names each array once: reading one twice would let a small
            # crafted file allocate many times its size.
            raise CheckpointCorruptedError(f"{self._where}: the tree refers to an array twice")
        tensors_used: set[tuple[str, str]] = set()
        for name in names:
            dtype, shards = check_array_entry(self.manifest, name, self._where)
            for shard in shards:  # checks the files' real sizes before allocating
                self._header(shard["file"])
                key = (shard["file"], shard["tensor"])
                if key in tensors_used:
                    raise CheckpointCorruptedError(
                        f"{self._where}: tensor {key[1]!r} is read twice"
                    )
                tensors_used.add(key)
            try:
                out = np.empty(tuple(self.manifest["arrays"][name]["shape"]), dtype)
            except (ValueError, MemoryError) as e:
                raise CheckpointCorruptedError(f"{self._where}: array {name!r}: {e}") from None
            outs[name] = out
            if len(shards) == 1 and "slice" not in shards[0]:
                reads.append(self._plan(shards[0], out))
                continue
            for shard, region in zip(shards, self._regions(name, shards, out.shape), strict=True):
                piece = np.empty(tuple(r.stop - r.start for r in region), out.dtype)
                reads.append(self._plan(shard, piece))
                assemble.append((out, region, piece))
        self._read_all(reads)
        for out, region, piece in assemble:
            out[region] = piece
        for name, out in outs.items():
            info = self.manifest["arrays"][name]
            kind = info.get("kind", "array")
            if kind == "scalar":
                self._arrays[name] = out[()]
            elif kind == "key" and not self.keys_as_data:
                self._arrays[name] = jax.random.wrap_key_data(out, impl=info["impl"])
            else:
                self._arrays[name] = out

    def read_region(self, name: str, region: tuple[slice, ...]) -> np.ndarray:
        """The part ``region`` (one slice per axis, as in a sharding's index) of array
        ``name``, reading and verifying only the checksum blocks of the stored shards
        that overlap it: a process restoring its shard of a large array reads about
        its share of the bytes."""
        dtype, shards = check_array_entry(self.manifest, name, self._where)
        shape = tuple(self.manifest["arrays"][name]["shape"])
        region = tuple(slice(*r.indices(d)[:2]) for r, d in zip(region, shape, strict=True))
        out = np.empty(tuple(r.stop - r.start for r in region), dtype)
        if out.size == 0:
            return out
        reads: list[_Read] = []
        copies = []
        for shard, stored in zip(shards, self._regions(name, shards, shape), strict=True):
            overlap = tuple(
                slice(max(a.start, b.start), min(a.stop, b.stop))
                for a, b in zip(region, stored, strict=True)
            )
            if any(o.start >= o.stop for o in overlap):
                continue
            stored_shape = tuple(r.stop - r.start for r in stored)
            local = [o.start - r.start for o, r in zip(overlap, stored, strict=True)]
            strides = _c_strides(stored_shape, dtype.itemsize)
            first = sum(i * st for i, st in zip(local, strides, strict=True))
            offset, crc = self._locate(shard, dtype, stored_shape)
            size = math.prod(stored_shape) * dtype.itemsize
            if isinstance(crc, str):  # one checksum: the whole tensor must be read
                begin, end, spans = 0, size, [(0, size)]
            else:
                spans = _touched_blocks(local, overlap, stored_shape, strides, size)
                begin, end = spans[0][0], spans[-1][1]
            # One buffer over the whole span, of which only the blocks the region
            # touches are read (and so ever paged in): a column of a row-major array
            # costs the blocks its rows cross, not the whole array.
            buffer = np.empty(end - begin, np.uint8)
            for a, b in spans:
                reads.append(
                    _Read(
                        shard["file"],
                        offset + a,
                        buffer[a - begin : b - begin],
                        crc,
                        shard["tensor"],
                        a // CRC_BLOCK,
                    )
                )
            values = buffer.view(dtype)[(first - begin) // dtype.itemsize :]
            part = np.lib.stride_tricks.as_strided(
                values, tuple(o.stop - o.start for o in overlap), strides, writeable=False
            )
            copies.append((part, overlap))
        self._read_all(reads)
        for part, overlap in copies:
            out[
                tuple(
                    slice(o.start - r.start, o.stop - r.start)
                    for o, r in zip(overlap, region, strict=True)
                )
            ] = part
        return out

    def _regions(
        self, name: str, shards: list[dict[str, Any]], shape: tuple[int, ...]
    ) -> list[tuple[slice, ...]]:
        # Checked once per array: a restore asks again for every device's part.
        if name not in self._region_cache:
            self._region_cache[name] = self._check_regions(name, shards, shape)
        return self._region_cache[name]

    def _check_regions(
        self, name: str, shards: list[dict[str, Any]], shape: tuple[int, ...]
    ) -> list[tuple[slice, ...]]:
        where = f"{self._where}: array {name!r}"
        full = [[0, d] for d in shape]
        regions = [_shard_bounds(s.get("slice", full), list(shape), where) for s in shards]
        volume = sum(math.prod(r.stop - r.start for r in reg) for reg in regions)
        disjoint = all(
            any(a.stop <= b.start or b.stop <= a.start for a, b in zip(r1, r2, strict=True))
            for i, r1 in enumerate(regions)
            for r2 in regions[:i]
        )
        if volume != math.prod(shape) or not disjoint:
            raise CheckpointCorruptedError(f"{where}: shards do not tile the array exactly")
        return regions

    def _locate(
        self, shard: dict[str, Any], dtype: np.dtype, shape: tuple[int, ...]
    ) -> tuple[int, str | list[str]]:
        """Where the stored tensor of ``shard`` starts in its file, and its checksum,
        after checking that it is what the manifest says."""
        file = shard["file"]
        data_start, header = self._header(file)  # offsets checked there (check_tiling)
        entry = header.get(shard["tensor"])
        code, st_shape = safetensors_layout(dtype, shape)
        nbytes = math.prod(shape) * dtype.itemsize
        crc = shard["crc32"]
        if not (
            isinstance(entry, dict)
            and entry.get("dtype") == code
            and entry.get("shape") == st_shape
            and entry["data_offsets"][1] - entry["data_offsets"][0] == nbytes
            and (isinstance(crc, str) or len(crc) == -(-nbytes // CRC_BLOCK))
        ):
            raise CheckpointCorruptedError(
                f"{self.storage.join(self.directory, file)}: tensor {shard['tensor']!r} is "
                "missing or does not match the manifest"
            )
        return data_start + entry["data_offsets"][0], crc

    def _plan(self, shard: dict[str, Any], out: np.ndarray) -> _Read:
        offset, crc = self._locate(shard, out.dtype, out.shape)
        return _Read(shard["file"], offset, out.reshape(-1).view(np.uint8), crc, shard["tensor"])

    def _read_all(self, reads: list[_Read]) -> None:
        reads.sort(key=attrgetter("file", "offset"))
        parallel_map(self._read_group, _split_reads(reads))

    def _read_group(self, reads: list[_Read]) -> None:
        files: dict[str, Any] = {}
        try:
            i = 0
            while i < len(reads):
                # Neighbouring tensors of one file are read with one call.
                j = i + 1
                while (
                    j < len(reads)
                    and j - i < 512
                    and reads[j].file == reads[i].file
                    and reads[j].offset == reads[j - 1].offset + reads[j - 1].view.nbytes
                ):
                    j += 1
                file = reads[i].file
                path = self.storage.join(self.directory, file)
                if file not in files:
                    files[file] = self.storage.open_read(path)
                read_into(files[file], [r.view for r in reads[i:j]], reads[i].offset, path)
                for r in reads[i:j]:
                    _verify(r, path)
                i = j
        finally:
            for f in files.values():
                f.close()

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
        f = self.storage.open_read(path)
        try:
            self._headers[file] = read_safetensors_header(f, size, path, expected["header_crc32"])
        finally:
            f.close()
        return self._headers[file]


def read_safetensors_header(
    f: Any, size: int, path: str, header_crc32: str | None = None
) -> tuple[int, dict[str, Any]]:
    """The header of the safetensors file ``f`` (``size`` bytes) and where its data
    starts, checked: the length within the file and MAX_HEADER, the CRC32 of length
    prefix and header when the manifest gives one (before any parsing), a JSON object
    whose tensors tile the data section."""
    prefix = np.empty(8, np.uint8)
    read_into(f, [prefix], 0, path)
    length = int.from_bytes(prefix.tobytes(), "little")
    if length > min(size - 8, MAX_HEADER):
        raise CheckpointCorruptedError(f"{path}: header length {length} exceeds the file")
    raw = np.empty(length, np.uint8)
    read_into(f, [raw], 8, path)
    if header_crc32 is not None and f"{zlib.crc32(raw, zlib.crc32(prefix)):08x}" != header_crc32:
        raise CheckpointCorruptedError(f"{path}: header checksum mismatch, the file is damaged")
    header = parse_json(raw.tobytes(), f"{path}: invalid header")
    if not isinstance(header, dict):
        raise CheckpointCorruptedError(f"{path}: header is not an object")
    check_tiling(header, size - 8 - length, path)
    return 8 + length, header


def _touched_blocks(
    start: list[int],
    box: tuple[slice, ...],
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    size: int,
) -> list[tuple[int, int]]:
    """The byte ranges (whole CRC_BLOCKs, merged when adjacent) that a box of a
    C-ordered tensor touches; ``start`` is the box's corner in the tensor."""
    extent = [b.stop - b.start for b in box]
    # The box is a set of equal contiguous runs along its innermost partial axis.
    j = len(shape) - 1
    while j > 0 and extent[j] == shape[j]:
        j -= 1
    if math.prod(extent[:j]) > 1 << 22:  # too many runs to list: one span over them all
        first = sum(i * st for i, st in zip(start, strides, strict=True))
        last = first + sum((e - 1) * st for e, st in zip(extent, strides, strict=True))
        runs, length = np.array([first], np.int64), last - first + strides[-1]
    else:
        runs = np.array([start[j] * strides[j]], np.int64)
        for axis in range(j):
            steps = (start[axis] + np.arange(extent[axis], dtype=np.int64)) * strides[axis]
            runs = (runs[:, None] + steps[None, :]).reshape(-1)
        length = extent[j] * strides[j]
    blocks = -(-size // CRC_BLOCK)
    marks = np.zeros(blocks + 1, np.int64)
    np.add.at(marks, runs // CRC_BLOCK, 1)
    np.add.at(marks, (runs + length - 1) // CRC_BLOCK + 1, -1)
    touched = np.flatnonzero(np.cumsum(marks[:-1]) > 0)
    # Consecutive blocks become one read.
    breaks = np.flatnonzero(np.diff(touched) > 1)
    firsts = np.concatenate([touched[:1], touched[breaks + 1]])
    lasts = np.concatenate([touched[breaks], touched[-1:]])
    return [
        (int(a) * CRC_BLOCK, min((int(b) + 1) * CRC_BLOCK, size))
        for a, b in zip(firsts, lasts, strict=True)
    ]


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    strides = []
    step = itemsize
    for dim in reversed(shape):
        strides.append(step)
        step *= dim
    return tuple(reversed(strides))


def _verify(read: _Read, path: str) -> None:
    """Check the bytes of ``read`` against their checksum (or checksum blocks)."""
    if isinstance(read.crc32, str):
        ok = f"{zlib.crc32(read.view):08x}" == read.crc32
    else:
        view = memoryview(read.view)
        blocks = read.crc32[read.first_block :]
        ok = all(
            i // CRC_BLOCK < len(blocks)
            and f"{zlib.crc32(view[i : i + CRC_BLOCK]):08x}" == blocks[i // CRC_BLOCK]
            for i in range(0, view.nbytes, CRC_BLOCK)
        )
    if not ok:
        raise CheckpointCorruptedError(
            f"{path}: checksum mismatch in tensor {read.tensor!r}, the data is damaged"
        )


def check_tiling(header: dict[str, Any], data_bytes: int, path: str) -> None:
    """The tensors of a data file cover its data section exactly, in order, without
    overlap or gap (as the safetensors library requires): no two tensors can share
    bytes, and no byte goes unchecked."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise CheckpointCorruptedError(f"{path}: tensor {name!r} has invalid offsets")
        spans.append((offsets[0], offsets[1]))
    spans.sort()
    end = 0
    for begin, stop in spans:
        if begin != end:
            raise CheckpointCorruptedError(f"{path}: tensors overlap or leave a gap at byte {end}")
        end = stop
    if end != data_bytes:
        raise CheckpointCorruptedError(
            f"{path}: tensors cover {end} bytes of a {data_bytes}-byte data section"
        )


def _split_reads(reads: list[_Read]) -> list[list[_Read]]:
    """Contiguous runs of reads of about equal bytes, one per I/O thread."""
    return _split_contiguous(reads, [r.view.nbytes for r in reads])


def read_into(f: Any, views: list[np.ndarray], offset: int, path: str) -> None:
    try:
        f.readinto([memoryview(v) for v in views], offset)
    except EOFError:
        raise CheckpointCorruptedError(f"{path}: unexpected end of file (truncated?)") from None
