"""The safetensors data files: building a header, and reading one back checked.

A data file is a plain safetensors file (8-byte little-endian header length, a JSON
header naming each tensor's dtype, shape and byte offsets, then the raw little-endian
bytes), so the ``safetensors`` library and other tools open it as it is. The
manifest's checksums cover its bytes; what is checked here is the framing: a length
within the file, a header that parses, tensors that tile the data exactly.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable
from typing import Any

from ._dtypes import safetensors_layout
from ._errors import CheckpointCorruptedError
from ._lazy_import import LazyModule
from ._manifest import is_count, parse_json
from ._storage import ReadFile

# Imported on first use (see _lazy_import): listing and showing need none of them.
np = LazyModule("numpy", globals(), "np")

# safetensors itself refuses headers over 100 MB; so do we, before allocating.
MAX_HEADER = 100_000_000


def safetensors_header(tensors: Iterable[tuple[str, np.dtype, tuple[int, ...], int]]) -> bytes:
    """The length prefix and header of a file holding ``tensors`` (name, dtype, shape,
    size in bytes), stored back to back in that order."""
    entries: dict[str, Any] = {"__metadata__": {"format": "learnax"}}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        code, st_shape = safetensors_layout(dtype, shape)
        entries[name] = {
            "dtype": code,
            "shape": st_shape,
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # data starts 8-byte aligned, as safetensors does
    return len(header).to_bytes(8, "little") + header


def read_safetensors_header(
    f: ReadFile, size: int, path: str, header_crc32: str | None = None
) -> tuple[int, dict[str, Any]]:
    """The header of the safetensors file ``f`` (``size`` bytes) and where its data
    starts, checked: the length within the file and MAX_HEADER, the CRC32 of length
    prefix and header when the manifest gives one (before any parsing), a JSON object
    whose tensors tile the data section."""
    prefix = bytearray(8)  # bytes, not NumPy: `learnax ls` checks headers without it
    read_into(f, [prefix], 0, path)
    length = int.from_bytes(prefix, "little")
    if length > min(size - 8, MAX_HEADER):
        raise CheckpointCorruptedError(f"{path}: header length {length} exceeds the file")
    raw = bytearray(length)
    read_into(f, [raw], 8, path)
    if header_crc32 is not None and f"{zlib.crc32(raw, zlib.crc32(prefix)):08x}" != header_crc32:
        raise CheckpointCorruptedError(f"{path}: header checksum mismatch, the file is damaged")
    header = parse_json(bytes(raw), f"{path}: invalid header")
    if not isinstance(header, dict):
        raise CheckpointCorruptedError(f"{path}: header is not an object")
    check_tiling(header, size - 8 - length, path)
    return 8 + length, header


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
            and all(is_count(o) for o in offsets)
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


def read_into(
    f: ReadFile, views: list[np.ndarray] | list[bytearray], offset: int, path: str
) -> None:
    """Fill ``views`` with the bytes of ``f`` from ``offset`` on; a file that ends first
    is damage (``CheckpointCorruptedError`` naming ``path``)."""
    try:
        f.readinto([memoryview(v) for v in views], offset)
    except EOFError:
        raise CheckpointCorruptedError(f"{path}: unexpected end of file (truncated?)") from None
