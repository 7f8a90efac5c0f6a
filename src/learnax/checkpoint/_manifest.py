"""A checkpoint's manifest: its framing, its checksum, and the checks of every value in it.

``manifest.json`` is ``{"checksum":"crc32:<8 hex>","manifest":<body>}\\n``; the
checksum covers the exact bytes of ``<body>``. The body holds the step, time, metrics,
the tree structure (``_tree``), and for each array its dtype, shape, and where its
bytes are (a data file and tensor, or shards of several), with a CRC32 of them; for
each data file its size and a CRC32 of its header. Writing it last is the commit
(``_write.commit``). Nothing here touches the data files.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any

from . import _tree
from ._dtypes import dtype_from_name, itemsize_of_name, prng_impl_name
from ._errors import CheckpointCorruptedError
from ._lazy_import import LazyModule
from ._storage import Storage, UnsafeFileError

# Imported on first use (see _lazy_import): listing and showing need none of them.
np = LazyModule("numpy", globals(), "np")

# /2: tensors over CRC_BLOCK bytes carry a checksum per block (a list), so that older
# readers, which would take such a list for damage, refuse the format by name instead.
FORMAT = "learnax.checkpoint/2"
_READABLE_FORMATS = ("learnax.checkpoint/1", FORMAT)
MANIFEST = "manifest.json"
# Tensors larger than this carry one CRC32 per block of this size (see checksum).
CRC_BLOCK = 1 << 20
_MANIFEST_PREFIX = re.compile(rb'\A\{"checksum":"crc32:([0-9a-f]{8})","manifest":')
_MANIFEST_SUFFIX = b"}\n"
_DATA_FILE = re.compile(r"\Adata-[A-Za-z0-9_-]{1,64}\.safetensors\Z")
_TMP_MANIFEST = re.compile(r"\A\.manifest-[0-9a-f]{16}\.tmp\Z")
# A manifest of 100,000 leaves is about 25 MB and 1.2 million JSON values; the caps
# leave room above that, and bound what parsing a crafted file can allocate (Python
# objects of about 100 bytes per value at worst: some 300 MB).
_MAX_MANIFEST = 128 << 20
_MAX_JSON_VALUES = 3_000_000
# Trees are at most _tree.MAX_DEPTH deep; JSON a little more (manifest framing).
_MAX_JSON_DEPTH = 2 * _tree.MAX_DEPTH + 16
_SAFE_RECURSION_LIMIT = 5_000
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


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


def manifest_body(
    tree: Any,
    part: Part,
    step: int,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None,
) -> dict[str, Any]:
    """The manifest of a checkpoint whose data files ``part`` describes."""
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


def manifest_bytes(body: dict[str, Any]) -> bytes:
    """``body`` framed with its checksum: the exact bytes of ``manifest.json``."""
    # The tree is the same object from one save to the next (``_tree_cache``): its JSON
    # text, a third of the manifest, is kept rather than made again.
    # (One read of the cache, which other threads may replace meanwhile; it holds the
    # tree, so no other object can take its id.)
    global _tree_json
    tree, cached = body.get("tree"), _tree_json
    if cached[0] is not tree:
        cached = _tree_json = (tree, _dumps(tree))
    raw = (
        "{"
        + ",".join(
            f"{_dumps(k)}:{cached[1] if k == 'tree' else _dumps(v)}" for k, v in body.items()
        )
        + "}"
    ).encode()
    prefix = b'{"checksum":"crc32:%08x","manifest":' % zlib.crc32(raw)
    return prefix + raw + _MANIFEST_SUFFIX


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)


# The last tree written and its JSON text.
_tree_json: tuple[Any, str] = (object(), "")


def checksum(data: np.ndarray | memoryview) -> str | list[str]:
    """The CRC32 of a tensor's bytes: one for up to CRC_BLOCK bytes, else one per block
    of CRC_BLOCK bytes, so that a process restoring a part of an array can verify just
    the blocks it reads."""
    view = memoryview(data).cast("B")
    if view.nbytes <= CRC_BLOCK:
        return f"{zlib.crc32(view):08x}"
    return [f"{zlib.crc32(view[i : i + CRC_BLOCK]):08x}" for i in range(0, view.nbytes, CRC_BLOCK)]


def tmp_manifest_name() -> str:
    """A fresh name for the temporary file a manifest is written to before its rename."""
    return f".manifest-{secrets.token_hex(8)}.tmp"


def is_own_file(name: str) -> bool:
    """Whether ``name`` in a checkpoint directory is one learnax writes there: a data
    file or a temporary manifest (``manifest.json`` aside). Nothing else is ever
    removed from a checkpoint directory."""
    return bool(_DATA_FILE.match(name) or _TMP_MANIFEST.match(name))


def read_manifest(storage: Storage, directory: str) -> dict[str, Any]:
    """The verified manifest of the checkpoint in ``directory``.

    Raises ``FileNotFoundError`` when there is no manifest (not a committed checkpoint)
    and ``CheckpointCorruptedError`` when it fails verification.
    """
    path = storage.join(directory, MANIFEST)
    try:
        raw = storage.read_bytes(path, _MAX_MANIFEST)
    except UnsafeFileError as e:
        raise CheckpointCorruptedError(f"{path}: {e.strerror}") from None
    match = _MANIFEST_PREFIX.match(raw)
    if match is None or not raw.endswith(_MANIFEST_SUFFIX):
        raise CheckpointCorruptedError(f"{path}: not a learnax manifest (bad framing)")
    body = raw[match.end() : -len(_MANIFEST_SUFFIX)]
    if f"{zlib.crc32(body):08x}".encode() != match.group(1):
        raise CheckpointCorruptedError(f"{path}: checksum mismatch, the manifest is damaged")
    manifest = parse_json(body, f"{path}: invalid JSON")
    _validate_manifest(manifest, path)
    return manifest


def parse_json(raw: bytes, what: str) -> Any:
    """JSON from a file, refusing duplicate keys, more values than a checkpoint needs
    (what parsing allocates grows with their number, not the file's size) and nesting
    too deep to rebuild.

    The C parser guards its recursion with Python's recursion limit; a process that
    raised the limit far could overflow the C stack on a crafted file (seen at 99,000
    levels), so then the nesting depth is measured first, without recursing."""
    # Every value but the first follows a ',' or ':' or opens a container: an upper
    # bound (separators inside strings count too), counted at memory speed.
    values = raw.count(b",") + raw.count(b":") + raw.count(b"[") + raw.count(b"{")
    if values > _MAX_JSON_VALUES:
        raise CheckpointCorruptedError(f"{what} (more than {_MAX_JSON_VALUES} values)")
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
        if not (isinstance(info, dict) and is_count(info.get("bytes"))):
            raise bad(f"invalid entry for {name}")
        if not (isinstance(info.get("header_crc32"), str) and len(info["header_crc32"]) == 8):
            raise bad(f"invalid header checksum for {name}")
    if not isinstance(m.get("arrays"), dict):
        raise bad("'arrays' is not an object")
    if not isinstance(m.get("metrics"), dict):
        raise bad("'metrics' is not an object")
    if "tree" not in m:
        raise bad("no 'tree'")


def check_array_entry(
    manifest: dict[str, Any], name: str, where: str
) -> tuple[np.dtype, list[Any]]:
    """The dtype and shards of array ``name``, checked: a known dtype, a sane shape, and
    no more bytes than its data files hold (which bounds every allocation a load makes
    by the size of the files it reads)."""
    dtype, shards = checked_array_entry(manifest, name, where)
    try:
        return dtype_from_name(dtype), shards
    except ValueError as e:  # a name this process's ml_dtypes lacks
        raise CheckpointCorruptedError(f"{where}: array {name!r}: {e}") from None


def checked_array_entry(manifest: dict[str, Any], name: str, where: str) -> tuple[str, list[Any]]:
    """The dtype name and shards of array ``name``, checked as by
    :func:`check_array_entry`, without importing NumPy (inspection needs no arrays)."""

    def bad(what: str) -> CheckpointCorruptedError:
        return CheckpointCorruptedError(f"{where}: array {name!r}: {what}")

    a = manifest["arrays"].get(name)
    if not isinstance(a, dict):
        raise bad("missing or invalid entry")
    dtype = a.get("dtype")
    try:
        itemsize = itemsize_of_name(dtype)
    except ValueError as e:
        raise bad(str(e)) from None
    shape = a.get("shape")
    if not (isinstance(shape, list) and len(shape) <= 64 and all(is_count(d) for d in shape)):
        raise bad(f"invalid shape {shape!r:.200}")
    kind = a.get("kind", "array")
    if kind not in ("array", "scalar", "key"):
        raise bad(f"unknown kind {kind!r:.100}")
    if kind == "key" and (prng_impl_name(a.get("impl")) is None or dtype != "uint32"):
        raise bad("invalid PRNG key")
    if kind == "scalar" and shape:
        raise bad(f"a scalar with shape {shape}")
    shards = shards_of(name, a)
    files = manifest["files"]
    if not (isinstance(shards, list) and shards):
        raise bad("no shards")
    for s in shards:
        if not (
            isinstance(s, dict)
            and isinstance(s.get("file"), str)
            and s["file"] in files
            and isinstance(s.get("tensor"), str)
        ):
            raise bad(f"invalid shard {s!r:.200}")
        if not _is_checksum(s.get("crc32")):
            raise bad("invalid shard checksum")
        if "slice" in s:
            shard_bounds(s["slice"], shape, f"{where}: array {name!r}")
    if math.prod(shape) * itemsize > sum(files[f]["bytes"] for f in {s["file"] for s in shards}):
        raise bad(f"shape {shape} needs more bytes than its data files hold")
    return dtype, shards


def _is_checksum(x: Any) -> bool:
    def crc(c: Any) -> bool:
        return isinstance(c, str) and len(c) == 8

    return crc(x) or (isinstance(x, list) and 0 < len(x) < 1 << 40 and all(crc(c) for c in x))


def is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 1 << 62


def shard_bounds(spec: Any, shape: list[int], where: str) -> tuple[slice, ...]:
    if not (isinstance(spec, list) and len(spec) == len(shape)):
        raise CheckpointCorruptedError(f"{where}: invalid shard slice")
    out = []
    for bounds, dim in zip(spec, shape, strict=True):
        ok = isinstance(bounds, list) and len(bounds) == 2 and all(is_count(b) for b in bounds)
        if not ok or not bounds[0] <= bounds[1] <= dim:
            raise CheckpointCorruptedError(f"{where}: shard slice {spec} outside shape {shape}")
        out.append(slice(bounds[0], bounds[1]))
    return tuple(out)


def shards_of(name: str, entry: dict[str, Any]) -> Any:
    """The shards of an array entry; an array stored whole is written inline."""
    if "shards" in entry:
        return entry["shards"]
    return [{"file": entry.get("file"), "tensor": name, "crc32": entry.get("crc32")}]
