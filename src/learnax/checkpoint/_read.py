"""Reading a committed checkpoint: its state, verified, in parallel, into the arrays
that are returned.

:func:`read_checkpoint` is the one way a whole checkpoint is read (the Checkpointer's
loads and ``convert``); :class:`CheckpointReader` reads single arrays or regions of
them for the callers that need less (restoring onto shardings, ``verify``, ``diff``).
Every byte read is checked against the manifest's checksums before it is handed out.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, TypedDict, TypeVar

from . import _tree
from ._dtypes import prng_impl_name, safetensors_layout
from ._errors import CheckpointCorruptedError
from ._lazy_import import LazyModule
from ._manifest import CRC_BLOCK, MANIFEST, check_array_entry, read_manifest, shard_bounds
from ._metrics import decode_metrics
from ._safetensors import read_into, read_safetensors_header
from ._storage import ReadFile, Storage, UnsafeFileError
from ._target import restore_into_target
from ._threads import gc_paused, parallel_map, split_contiguous

# Imported on first use (see _lazy_import): listing and showing need none of them.
jax = LazyModule("jax", globals())
np = LazyModule("numpy", globals(), "np")

T = TypeVar("T")
# Each attempt of read_consistent means a save committed meanwhile, and ran past the
# grace time of the files read: more than a few in a row is no longer a race.
_ATTEMPTS = 5
# Reads are spread over the I/O threads in runs at least this large (as the writer
# splits data files: _write.MIN_FILE_BYTES).
_MIN_READ_BYTES = 64 << 20


class LoadedCheckpoint(TypedDict):
    """What a load returns: the state, the step and time of its save, its metrics. A
    plain dict at run time, as the seed API documents."""

    state: Any
    step: int | None  # None only for a legacy pickle that recorded no step
    time: float
    metrics: dict[str, Any]


@gc_paused()
def read_checkpoint(
    storage: Storage,
    directory: str,
    target: Any = None,
    manifest: dict[str, Any] | None = None,
    *,
    allow_cast: bool = False,
) -> LoadedCheckpoint:
    """The committed checkpoint in ``directory``, verified.

    Without ``target`` the state comes back as saved (numpy arrays, typed PRNG keys,
    the containers of the saved tree); with one, shaped like it (see ``_target``; its
    dtypes cast to where ``allow_cast``). A
    save replacing the checkpoint meanwhile is handled by :func:`read_consistent`;
    ``manifest``, the verified manifest read a moment before, spares reading it again.
    Raises ``FileNotFoundError`` when no checkpoint is committed there,
    ``CheckpointCorruptedError`` when it fails verification and ``ValueError`` when it
    does not fit ``target``.
    """
    return read_consistent(
        storage,
        directory,
        lambda reader: _read_state(reader, target, allow_cast),
        manifest=manifest,
    )


def _read_state(reader: CheckpointReader, target: Any, allow_cast: bool) -> LoadedCheckpoint:
    storage, directory, manifest = reader.storage, reader.directory, reader.manifest

    def read_nodes(nodes: list[Any]) -> list[Any]:
        reader.prefetch([name for node in nodes for name in _tree.array_names(node)])
        return [_tree.decode_tree(node, reader.array) for node in nodes]

    try:
        if target is None:
            state = read_nodes([manifest["tree"]])[0]
        else:
            state = restore_into_target(
                manifest["tree"], target, read_nodes, reader, allow_cast=allow_cast
            )
    except (_tree.MalformedTreeError, RecursionError, KeyError, IndexError, AttributeError) as e:
        # The last three only from a tree node of a crafted manifest that a check
        # missed: still damage of this checkpoint, never a crash of the caller's load.
        raise CheckpointCorruptedError(
            f"{storage.join(directory, MANIFEST)}: invalid tree: {type(e).__name__}: {e}"
        ) from None
    return {
        "state": state,
        "step": manifest["step"],
        "time": manifest["time"],
        "metrics": decode_metrics(manifest["metrics"], directory),
    }


def read_consistent(
    storage: Storage,
    directory: str,
    work: Callable[[CheckpointReader], T],
    *,
    keys_as_data: bool = False,
    manifest: dict[str, Any] | None = None,
) -> T:
    """``work(reader)`` on the committed checkpoint in ``directory``, with a reader whose
    data files are all open already.

    A live run may replace the checkpoint while it is read: a save commits a new
    manifest, and the data files of the old one are removed a grace time later
    (``_superseded.SUPERSEDED_GRACE_S``). Opening every data file right after reading the
    manifest pins them (on a local disk an open file stays readable once removed), so
    a reader sees the old checkpoint or the new one whole. Only a reader that stalled
    longer than the grace time between the manifest and its files, or an object-store
    read still running when the files are removed, finds one gone: then the manifest
    has changed, and it starts again on the new one. A file missing under a manifest
    that did not change is damage.

    A ``manifest`` given (verified, read a moment before) is the first attempt's: a
    data file gone since means it was replaced, as above.

    Raises ``FileNotFoundError`` when there is no manifest (also when the checkpoint was
    deleted meanwhile) and ``CheckpointCorruptedError`` when it fails verification.
    """
    for _ in range(_ATTEMPTS):
        if manifest is None:
            manifest = read_manifest(storage, directory)
        reader = CheckpointReader(storage, directory, manifest, keys_as_data=keys_as_data)
        try:
            reader.open_files()
            return work(reader)
        except CheckpointCorruptedError:
            if not _replaced(storage, directory, manifest):
                raise
            manifest = None
        finally:
            reader.close()
    raise CheckpointCorruptedError(
        f"{directory}: replaced {_ATTEMPTS} times while being read; try again"
    )


def _replaced(storage: Storage, directory: str, manifest: dict[str, Any]) -> bool:
    """Whether the checkpoint in ``directory`` has another manifest than ``manifest`` now
    (``FileNotFoundError`` when it has none: it was deleted)."""
    try:
        return read_manifest(storage, directory) != manifest
    except CheckpointCorruptedError:
        return False


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
        self._files: dict[str, ReadFile] = {}

    def open_files(self) -> None:
        """Open every data file the manifest names, and check its size: from here on,
        the bytes read are the ones this manifest describes, even if a save replaces
        the checkpoint meanwhile. ``CheckpointCorruptedError`` for a file missing, of
        another size, or not a regular file."""
        for file in self.manifest["files"]:
            self._file(file)

    def close(self) -> None:
        """Close the data files; the reader reads nothing more."""
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _file(self, file: str) -> ReadFile:
        """Data file ``file``, opened (once) and checked against its size in the manifest."""
        if file in self._files:
            return self._files[file]
        path = self.storage.join(self.directory, file)
        try:
            f = self.storage.open_read(path)
        except FileNotFoundError:
            raise CheckpointCorruptedError(f"{path}: data file is missing") from None
        except (UnsafeFileError, IsADirectoryError) as e:
            raise CheckpointCorruptedError(f"{path}: {e.strerror}") from None
        expected = self.manifest["files"][file]["bytes"]
        if f.size() != expected:
            f.close()
            raise CheckpointCorruptedError(
                f"{path}: size is {f.size()} bytes, the manifest says {expected} (truncated?)"
            )
        self._files[file] = f
        return f

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
            shape = tuple(self.manifest["arrays"][name]["shape"])
            # Every stored tensor checked against the manifest before anything is
            # allocated: n crafted entries cannot reserve n times the files' size.
            whole = len(shards) == 1 and "slice" not in shards[0]
            if whole:
                offset, crc = self._locate(shards[0], dtype, shape)
            else:
                for shard, region in zip(shards, self._regions(name, shards, shape), strict=True):
                    self._locate(shard, dtype, tuple(r.stop - r.start for r in region))
            try:
                out = np.empty(shape, dtype)
            except (ValueError, MemoryError) as e:
                raise CheckpointCorruptedError(f"{self._where}: array {name!r}: {e}") from None
            outs[name] = out
            if whole:
                view = out.reshape(-1).view(np.uint8)
                reads.append(_Read(shards[0]["file"], offset, view, crc, shards[0]["tensor"]))
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
                self._arrays[name] = jax.random.wrap_key_data(
                    out, impl=prng_impl_name(info["impl"])
                )
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
            if all(o.start < o.stop for o in overlap):
                copies.append((self._plan_overlap(shard, stored, overlap, dtype, reads), overlap))
        self._read_all(reads)
        for part, overlap in copies:
            out[
                tuple(
                    slice(o.start - r.start, o.stop - r.start)
                    for o, r in zip(overlap, region, strict=True)
                )
            ] = part
        return out

    def _plan_overlap(
        self,
        shard: dict[str, Any],
        stored: tuple[slice, ...],
        overlap: tuple[slice, ...],
        dtype: np.dtype,
        reads: list[_Read],
    ) -> np.ndarray:
        """Add to ``reads`` the checksum blocks of ``shard`` (stored as region
        ``stored`` of its array) that ``overlap`` touches, and return the strided view
        that will hold ``overlap``'s values once they are read."""
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
        # One buffer over the whole span, of which only the blocks the region touches
        # are read (and so ever paged in): a column of a row-major array costs the
        # blocks its rows cross, not the whole array.
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
        return np.lib.stride_tricks.as_strided(
            values, tuple(o.stop - o.start for o in overlap), strides, writeable=False
        )

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
        regions = [shard_bounds(s.get("slice", full), list(shape), where) for s in shards]
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
            path = self.storage.join(self.directory, reads[i].file)
            f = self._file(reads[i].file)
            with _still_there(path):
                read_into(f, [r.view for r in reads[i:j]], reads[i].offset, path)
            for r in reads[i:j]:
                _verify(r, path)
            i = j

    def _header(self, file: str) -> tuple[int, dict[str, Any]]:
        if file not in self._headers:
            f = self._file(file)
            path = self.storage.join(self.directory, file)
            header_crc = self.manifest["files"][file]["header_crc32"]
            with _still_there(path):
                self._headers[file] = read_safetensors_header(f, f.size(), path, header_crc)
        return self._headers[file]


@contextlib.contextmanager
def _still_there(path: str) -> Iterator[None]:
    """Reads of data file ``path``, opened already: on an object store, which pins
    nothing, it may have been removed since. A file missing is damage unless the
    manifest changed meanwhile (``read_consistent`` then reads the new one); never the
    ``FileNotFoundError`` that means "no such checkpoint"."""
    try:
        yield
    except FileNotFoundError:
        raise CheckpointCorruptedError(f"{path}: data file is missing") from None


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


def _split_reads(reads: list[_Read]) -> list[list[_Read]]:
    """Contiguous runs of reads of about equal bytes, one per I/O thread."""
    return split_contiguous(reads, [r.view.nbytes for r in reads], _MIN_READ_BYTES)
