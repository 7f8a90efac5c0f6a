"""Storage: durable writes, the atomic commit step, ranged reads, listing and locking.

Everything the checkpoint format needs from storage goes through one of two classes
with the same few operations: :class:`LocalStorage` for local (or locally mounted)
filesystems, the fast path, and :class:`FsspecStorage` for any other fsspec URL
(``s3://``, ``gs://``, ``memory://``...). :func:`open_storage` picks one for a path.

Durability on a POSIX filesystem takes four things: ``fsync`` of each file's data,
``fsync`` of the directory so that the new files' entries are durable, an atomic
``rename`` to make the commit visible, and ``fsync`` of the directory again so that the
rename itself survives a power cut. On an object store an object is durable once its
upload completes and a single PUT is atomic, so the commit is the manifest written last;
nothing there relies on rename.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar

T = TypeVar("T")

try:  # POSIX only; on other systems the lock is a no-op.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".learnax.lock"
# writev limits: at most this many buffers per call (POSIX IOV_MAX is 1024 on Linux);
# large buffers are written on their own.
_IOV_MAX = 512
_BATCH_BYTES = 8 << 20
# Flush written data from a helper thread every this many bytes (see write_durable).
_FLUSH_EVERY = 16 << 20


def open_storage(
    path: str, storage_options: dict[str, Any] | None = None
) -> tuple[LocalStorage | FsspecStorage, str]:
    """The storage for ``path`` and ``path`` as that storage names it: a plain path or a
    ``file://`` URL gives :class:`LocalStorage` and a local path; any other URL gives
    :class:`FsspecStorage` (fsspec must be installed, with the filesystem's package,
    e.g. ``s3fs``) and the URL itself."""
    if "://" not in path or path.startswith(("file://", "local://")):
        if storage_options:
            raise ValueError(f"storage_options are for fsspec URLs, not the local path {path!r}")
        return LocalStorage(), path.split("://", 1)[-1]
    try:
        import fsspec
    except ImportError:
        raise ImportError(
            f"Checkpoints at {path!r} need fsspec and the filesystem's package: "
            "pip install 'learnax[s3]' (s3fs) or 'learnax[gcs]' (gcsfs)."
        ) from None
    fs, _ = fsspec.core.url_to_fs(path, **(storage_options or {}))
    return FsspecStorage(fs), path.rstrip("/")


class LocalStorage:
    """A directory tree on a local (or locally mounted) filesystem."""

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def dirname(self, path: str) -> str:
        return os.path.dirname(path)

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its missing parents, durably: each new directory entry
        is fsynced in its parent, or a power cut could lose the whole subtree."""
        path = os.path.abspath(path)
        missing = []
        while not os.path.isdir(path):
            missing.append(path)
            parent = os.path.dirname(path)
            if parent == path:
                break
            path = parent
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise
            self.fsync_dir(os.path.dirname(directory))

    def listdir(self, path: str) -> list[str]:
        """Names in ``path``; an empty list when it does not exist."""
        try:
            return os.listdir(path)
        except FileNotFoundError:
            return []

    def isdir(self, path: str) -> bool:
        return os.path.isdir(path)

    def isfile(self, path: str) -> bool:
        return os.path.isfile(path)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def mtime(self, path: str) -> float:
        return os.path.getmtime(path)

    def unused(self, path: str) -> bool:
        """Whether a leftover may be removed: always here, since a save in progress
        holds the run's lock and cleanup runs only when it can take it."""
        return True

    def usage(self, path: str) -> tuple[int, float]:
        """Bytes of all files under ``path`` and the newest modification time."""
        total, newest = 0, 0.0
        for root, _, files in os.walk(path):
            for name in files:
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(os.path.join(root, name))
                    total += st.st_size
                    newest = max(newest, st.st_mtime)
        return total, newest

    def open_stream(self, path: str) -> BinaryIO:
        return open(path, "rb")

    def open_read(self, path: str) -> LocalReadFile:
        """``path`` open for ranged reads; the caller closes it."""
        return LocalReadFile(path)

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole file, refusing files larger than ``limit`` bytes."""
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > limit:
                raise OSError(errno.EFBIG, f"file larger than {limit} bytes", path)
            return f.read()

    def write_durable(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        """Write ``chunks`` to a new file at ``path`` and fsync it; returns the size.

        Chunks are written as they are (no copy into a Python buffer), so a chunk may
        be a view of an array's memory; small chunks are gathered into one ``writev``.
        Once a file grows past a few MB, a helper thread flushes what is written while
        the rest is still being produced, so the disk works while the CPU computes
        checksums: the final fsync then has only the tail left (64 MB in 4,000
        leaves: 44 ms against 57 ms without, measured here).
        """
        written = 0
        flusher: _Flusher | None = None
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            batch: list[memoryview] = []
            batch_bytes = 0
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                batch.append(view)
                batch_bytes += view.nbytes
                if len(batch) >= _IOV_MAX or batch_bytes >= _BATCH_BYTES:
                    written += _writev_all(fd, batch)
                    batch, batch_bytes = [], 0
                    if flusher is None and written >= _FLUSH_EVERY:
                        flusher = _Flusher(fd)
                    if flusher is not None:
                        flusher.written(written)
            written += _writev_all(fd, batch)
            if flusher is not None:
                flusher, done = None, flusher
                done.finish()
            os.fsync(fd)
        finally:
            if flusher is not None:
                with contextlib.suppress(OSError):
                    flusher.finish()
            os.close(fd)
        return written

    def replace_atomic(self, path: str, data: bytes, tmp_name: str) -> None:
        """Make ``path`` hold ``data`` in one atomic step: write a temporary file beside
        it, fsync, rename over ``path``. A reader sees the old content or the new,
        never a mix. The caller fsyncs the directory to make the rename durable: a
        failure there comes after the new content became visible."""
        tmp = os.path.join(os.path.dirname(path), tmp_name)
        try:
            self.write_durable(tmp, [data])
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    def rmtree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path)

    @contextlib.contextmanager
    def lock(self, directory: str, *, blocking: bool = True) -> Iterator[bool]:
        """Hold an exclusive advisory lock on ``directory`` while the block runs.

        Yields whether the lock was taken (always ``True`` when ``blocking``). The
        kernel drops the lock when its holder dies, so a crashed writer never blocks
        the next one.
        """
        if fcntl is None:  # pragma: no cover - Windows
            yield True
            return
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class LocalReadFile:
    """A file read with ``preadv`` straight into the caller's buffers."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY)

    def readinto(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views`` with the bytes from ``offset`` on; ``EOFError`` if the file ends
        first."""
        buffers = [v for v in views if v.nbytes]
        while buffers:
            n = os.preadv(self._fd, buffers, offset)
            if n == 0:
                raise EOFError
            offset += n
            buffers = skip_transferred(buffers, n)

    def close(self) -> None:
        os.close(self._fd)


def _writev_all(fd: int, views: list[memoryview]) -> int:
    total = sum(v.nbytes for v in views)
    if not hasattr(os, "writev"):  # pragma: no cover - Windows
        for v in views:
            while v:
                v = v[os.write(fd, v) :]
        return total
    while views:
        views = skip_transferred(views, os.writev(fd, views))
    return total


def skip_transferred(buffers: list[memoryview], n: int) -> list[memoryview]:
    """What is left of ``buffers`` after a vectored read or write moved ``n`` bytes:
    the whole buffers dropped, the partial one sliced (a new list; no copy of data)."""
    i = 0
    while i < len(buffers) and n >= buffers[i].nbytes:
        n -= buffers[i].nbytes
        i += 1
    rest = buffers[i:]
    if rest and n:
        rest[0] = rest[0][n:]
    return rest


class _Flusher:
    """Calls ``fdatasync`` on a file in a helper thread whenever another
    ``_FLUSH_EVERY`` bytes were written to it, overlapping the disk's work with the
    writer's. ``finish`` stops it and raises what a flush raised."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._latest = 0  # bytes written so far, as told by the writer
        self._flushed = 0
        self._done = False
        self._error: OSError | None = None
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="learnax-flush", daemon=True)
        self._thread.start()

    def written(self, total: int) -> None:
        with self._wake:
            self._latest = total
            if total - self._flushed >= _FLUSH_EVERY:
                self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._done and self._latest - self._flushed < _FLUSH_EVERY:
                    self._wake.wait()
                if self._done:
                    return
                target = self._latest
            try:
                os.fdatasync(self._fd)
            except OSError as e:
                self._error = e
                return
            self._flushed = target

    def finish(self) -> None:
        with self._wake:
            self._done = True
            self._wake.notify()
        self._thread.join()
        if self._error is not None:
            raise self._error


# Filesystems where directories are only key prefixes: nothing to create.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
# A data file goes up in parts of this size (S3 needs at least 5 MiB but the last), so
# the uploader holds at most about one part of a large array besides the array itself.
_UPLOAD_PART = 32 << 20
# Ranged reads ask for at most this much at once, for the same reason.
_READ_PART = 64 << 20
# On object stores (no lock), leftovers younger than this are not removed: see unused().
LEFTOVER_GRACE_S = 3600.0


def _as_oserror(method: Callable[..., T]) -> Callable[..., T]:
    """Let a filesystem's own errors through as ``OSError``: fsspec backends raise
    ``OSError`` for most failures, but some (a connection refused in botocore, say)
    surface as their library's exception, and an I/O failure must fail the save the
    same way whatever the backend."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with _filesystem_errors():
            return method(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _filesystem_errors() -> Iterator[None]:
    """A filesystem's own exceptions as ``OSError``; ours (EOFError) as they are."""
    try:
        yield
    except (OSError, EOFError):
        raise
    except Exception as e:
        raise OSError(f"{type(e).__name__}: {e}") from e


class FsspecStorage:
    """Any fsspec filesystem, addressed by URL (``s3://bucket/prefix/...``).

    Object stores have no rename and no fsync: an object is durable when its upload
    completes and a single PUT replaces an object atomically, so the manifest written
    last is the commit. There is no lock either: one job writes a run at a time.
    """

    def __init__(self, fs: Any) -> None:
        self.fs = fs
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        self._object_store = protocol in _OBJECT_STORES

    def join(self, *parts: str) -> str:
        return "/".join(p.rstrip("/") for p in parts[:-1]) + "/" + parts[-1]

    def dirname(self, path: str) -> str:
        return path.rstrip("/").rpartition("/")[0]

    @_as_oserror
    def makedirs(self, path: str) -> None:
        if not self._object_store:
            self.fs.makedirs(path, exist_ok=True)

    def _fresh(self, path: str) -> None:
        # Listings are cached by some filesystems (s3fs); another process may have
        # written since.
        self.fs.invalidate_cache(path)

    @_as_oserror
    def listdir(self, path: str) -> list[str]:
        self._fresh(path)
        try:
            entries = self.fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rpartition("/")[2] for e in entries]

    @_as_oserror
    def isdir(self, path: str) -> bool:
        self._fresh(path)
        return bool(self.fs.isdir(path))

    @_as_oserror
    def isfile(self, path: str) -> bool:
        self._fresh(self.dirname(path))
        return bool(self.fs.isfile(path))

    @_as_oserror
    def size(self, path: str) -> int:
        self._fresh(self.dirname(path))
        return int(self.fs.size(path))

    @_as_oserror
    def mtime(self, path: str) -> float:
        try:
            return self.fs.modified(path).timestamp()
        except (NotImplementedError, AttributeError):
            return 0.0

    @_as_oserror
    def unused(self, path: str) -> bool:
        """Whether a leftover (a file or a prefix) may be removed. Without a lock, a
        file written in the last LEFTOVER_GRACE_S seconds may belong to a save still in
        progress in another job (an evaluation job opening the run while it trains),
        so it is left for a later Checkpointer."""
        self._fresh(path)
        try:
            files = self.fs.find(path, detail=True) if self.fs.isdir(path) else {path: None}
        except FileNotFoundError:
            return True
        now = time.time()
        for name in files:
            try:
                if now - self.fs.modified(name).timestamp() < LEFTOVER_GRACE_S:
                    return False
            except FileNotFoundError:
                continue
            except (NotImplementedError, AttributeError):
                return True  # no times kept (memory://): nothing to tell a save in progress by
        return True

    @_as_oserror
    def usage(self, path: str) -> tuple[int, float]:
        self._fresh(path)
        try:
            infos = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return 0, 0.0
        total, newest = 0, 0.0
        for info in infos.values():
            total += int(info.get("size") or 0)
            for key in ("LastModified", "mtime", "updated", "created"):
                when = info.get(key)
                if isinstance(when, str):  # gcsfs: an ISO 8601 string
                    with contextlib.suppress(ValueError):
                        when = datetime.datetime.fromisoformat(when.replace("Z", "+00:00"))
                if hasattr(when, "timestamp"):
                    when = when.timestamp()
                if isinstance(when, (int, float)):
                    newest = max(newest, float(when))
                    break
        return total, newest

    @_as_oserror
    def read_bytes(self, path: str, limit: int) -> bytes:
        if self.size(path) > limit:
            raise OSError(errno.EFBIG, f"file larger than {limit} bytes", path)
        return self.fs.cat_file(path)

    @_as_oserror
    def open_stream(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")

    def open_read(self, path: str) -> FsspecReadFile:
        return FsspecReadFile(self.fs, path)

    def write_durable(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        """Upload ``chunks`` as one object, in parts: never the whole file in memory.
        An upload that fails is aborted, so no partial object appears. Errors of the
        filesystem come out as ``OSError``; those of ``chunks`` itself as they are."""
        written = 0
        with _filesystem_errors():
            f = self.fs.open(path, "wb", block_size=_UPLOAD_PART)
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                with _filesystem_errors():
                    for start in range(0, view.nbytes, _UPLOAD_PART):
                        f.write(view[start : start + _UPLOAD_PART])
                written += view.nbytes
            with _filesystem_errors():
                f.close()
        except BaseException:
            self._abandon(f, path)
            raise
        return written

    def _abandon(self, f: Any, path: str) -> None:
        with contextlib.suppress(Exception):
            if hasattr(f, "discard"):
                f.discard()  # aborts a multipart upload
                f.closed = True  # or its destructor would try to finish it
            else:
                f.close()
                self.remove(path)

    @_as_oserror
    def replace_atomic(self, path: str, data: bytes, tmp_name: str) -> None:
        if self._object_store:
            # One PUT: readers see the old object or the new one, never a mix.
            self.fs.pipe_file(path, data)
            return
        # A filesystem with directories (sftp, hdfs, smb...): a temporary file moved
        # over the old one, as on a local disk.
        tmp = self.join(self.dirname(path), tmp_name)
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, path)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise

    def fsync_dir(self, path: str) -> None:
        pass  # nothing to flush: an upload is durable once it completes

    @_as_oserror
    def remove(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(path)

    @_as_oserror
    def rmtree(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(path, recursive=True)

    @contextlib.contextmanager
    def lock(self, directory: str, *, blocking: bool = True) -> Iterator[bool]:
        yield True  # object stores have no lock; see the class docstring


class FsspecReadFile:
    """Ranged GETs of one object, copied into the caller's buffers."""

    def __init__(self, fs: Any, path: str) -> None:
        self._fs = fs
        self._path = path

    @_as_oserror
    def readinto(self, views: list[memoryview], offset: int) -> None:
        pending = [v for v in views if v.nbytes]
        while pending:
            # As many whole buffers as fit in one request (at least one buffer, cut in
            # pieces when larger than a request).
            batch, size = [], 0
            while pending and (not batch or size + pending[0].nbytes <= _READ_PART):
                view = pending.pop(0)
                if view.nbytes > _READ_PART:
                    view, rest = view[:_READ_PART], view[_READ_PART:]
                    pending.insert(0, rest)
                batch.append(view)
                size += view.nbytes
            data = self._fs.cat_file(self._path, start=offset, end=offset + size)
            if len(data) < size:
                raise EOFError
            source, done = memoryview(data), 0
            for view in batch:
                view[:] = source[done : done + view.nbytes]
                done += view.nbytes
            offset += size

    def close(self) -> None:
        pass
