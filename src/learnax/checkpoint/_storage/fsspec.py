"""The fsspec back-end: any fsspec filesystem, addressed by URL (``s3://``, ``gs://``...).

Object stores have no rename, no fsync and no lock. An object is durable once its
upload completes and a single PUT replaces an object atomically, so the commit is the
manifest written last; nothing here relies on rename. Large files go up and come down
in parts, so that neither direction holds a whole file in memory besides the array, and
the filesystem's own exceptions come out as ``OSError`` like a local disk's.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, TypeVar

from .base import UnsafeFileError, confirm_replaced

T = TypeVar("T")

# Filesystems where directories are only key prefixes: nothing to create.
_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"}
# A data file goes up in parts of this size (S3 needs at least 5 MiB but the last), so
# the uploader holds at most about one part of a large array besides the array itself.
_UPLOAD_PART = 32 << 20
# Ranged reads ask for at most this much at once, for the same reason.
_READ_PART = 64 << 20
# Without a lock (any fsspec filesystem), leftovers younger than this are not removed:
# see unused().
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
    """Any fsspec filesystem, addressed by URL (``s3://bucket/prefix/...``): a
    :class:`~.base.Storage`.

    Object stores have no rename and no fsync: an object is durable when its upload
    completes and a single PUT replaces an object atomically, so the manifest written
    last is the commit. There is no lock either, on any fsspec filesystem: one job
    writes a run at a time.
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
    def scan(self, path: str) -> list[tuple[str, str]]:
        self._fresh(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return [(e["name"].rstrip("/").rpartition("/")[2], _kind_of(e)) for e in entries]

    # Not fs.isdir / fs.isfile: fsspec turns every exception into False there, so a
    # throttled HEAD would read as "no checkpoint here".
    def isdir(self, path: str) -> bool:
        return self.kind(path) == "dir"

    def isfile(self, path: str) -> bool:
        return self.kind(path) == "file"

    @_as_oserror
    def kind(self, path: str) -> str | None:
        self._fresh(self.dirname(path))  # listings cached by another call
        self._fresh(path)
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return _kind_of(info)

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
    def unused(self, path: str, now: float) -> bool:
        """Whether a leftover (a file or a prefix) may be removed. Without a lock, a
        file written less than LEFTOVER_GRACE_S before ``now`` (the store's own clock,
        never this machine's) may belong to a save still uploading in another job, so
        it is left for a later cleanup."""
        if now <= 0.0:
            return True  # no times kept (memory://): nothing to tell a save in progress by
        try:
            kind = self.kind(path)
            files = self.fs.find(path, detail=False) if kind == "dir" else [path]
        except FileNotFoundError:
            return True
        for name in files:
            try:
                when = self.fs.modified(name).timestamp()
            except FileNotFoundError:
                continue
            except (NotImplementedError, AttributeError):
                return True
            if now - when < LEFTOVER_GRACE_S:
                return False
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
        # One bounded GET: an object replaced by a larger one meanwhile is still refused.
        data = self.fs.cat_file(path, start=0, end=limit + 1)
        if len(data) > limit:
            raise UnsafeFileError(errno.EFBIG, f"file larger than {limit} bytes", path)
        return data

    @_as_oserror
    def open_stream(self, path: str) -> BinaryIO:
        return self.fs.open(path, "rb")

    def open_read(self, path: str) -> FsspecReadFile:
        return FsspecReadFile(self.fs, path, self.size(path))

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
    def take(self, source: str, path: str) -> bool:
        if source.rstrip("/") == path.rstrip("/") or self.kind(path) is not None:
            return False  # a file of that name holds those bytes (see Storage.take)
        self.fs.copy(source, path)  # server-side on object stores (S3 CopyObject)
        return True

    @_as_oserror
    def replace_atomic(self, path: str, data: bytes, tmp_name: str) -> None:
        if self._object_store:
            # One PUT: readers see the old object or the new one, never a mix.
            try:
                self.fs.pipe_file(path, data)
            except Exception as e:  # its reply may be lost, the PUT applied
                confirm_replaced(self, path, data, e)
            return
        # A filesystem with directories (sftp, hdfs, smb...): a temporary file moved
        # over the old one, as on a local disk.
        tmp = self.join(self.dirname(path), tmp_name)
        try:
            self.fs.pipe_file(tmp, data)
        except BaseException:
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            raise
        try:
            self.fs.mv(tmp, path)
        except Exception as e:  # its reply may be lost, the move applied (as on NFS)
            with contextlib.suppress(Exception):
                self.fs.rm_file(tmp)
            confirm_replaced(self, path, data, e)

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

    @_as_oserror
    def remove_empty_dir(self, path: str) -> None:
        if self._object_store:
            return  # a key prefix: gone with its last object
        with contextlib.suppress(OSError):  # missing, or not empty
            self.fs.rmdir(path)

    @contextlib.contextmanager
    def lock(self, directory: str, *, blocking: bool = True) -> Iterator[bool]:
        yield True  # object stores have no lock; see the class docstring


def _kind_of(info: dict[str, Any]) -> str:
    """``"dir"``, ``"file"`` or ``"other"`` from an fsspec info dict."""
    if info.get("type") == "directory":
        return "dir"
    return "file" if info.get("type") == "file" and not info.get("islink") else "other"


class FsspecReadFile:
    """Ranged GETs of one object, copied into the caller's buffers."""

    def __init__(self, fs: Any, path: str, size: int) -> None:
        self._fs = fs
        self._path = path
        self._size = size

    def size(self) -> int:
        return self._size

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
