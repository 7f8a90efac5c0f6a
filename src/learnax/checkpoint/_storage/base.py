"""What the checkpoint code needs from storage, as two :class:`typing.Protocol` classes.

:class:`Storage` lists every operation the format, the run directory and the inspection
code call on a storage back-end, and :class:`ReadFile` the handle that
:meth:`Storage.open_read` returns for ranged reads. Each method's docstring states the
contract both back-ends keep (:class:`~.local.LocalStorage` and
:class:`~.fsspec.FsspecStorage`): what a missing path does, what is atomic, and what is
durable when the call returns. Whatever the back-end, a failure of the filesystem comes
out as ``OSError`` (``FileNotFoundError`` for a missing path), so a failed save looks
the same on a local disk and on S3. "Missing" is only ever the storage's own answer: a
request that failed (a throttled HEAD, an EIO of a network filesystem) raises, because
callers delete, reset or give up on what they are told is absent.

What a back-end opens for reading it opens only if it is a regular file (never a link,
a FIFO or a device, which could block or never end), and it never reads more bytes
than the file had when opened: anything else is :class:`UnsafeFileError`, which the
readers report as damage of that one checkpoint.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import BinaryIO, Protocol, runtime_checkable

logger = logging.getLogger("learnax")

# The errors of a write to storage that nobody may write to (a read-only mount, a
# frozen copy without write permission): every later write fails alike.
NOT_WRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


class UnsafeFileError(OSError):
    """A path that must be a regular file is something else (a symbolic link, a FIFO,
    a device, a directory) or is larger than the reader allows."""


class UncertainWriteError(OSError):
    """A write that failed in a way that may have been applied all the same (an object
    store that stored a PUT and lost its reply), whose outcome could not be read back
    either: the path holds the new content or the old."""


@runtime_checkable
class ReadFile(Protocol):
    """One file open for ranged reads into the caller's buffers."""

    def readinto(self, views: list[memoryview], offset: int) -> None:
        """Fill ``views``, in order, with the file's bytes from ``offset`` on; ``EOFError``
        if the file ends first (the views then hold what was read)."""
        ...

    def size(self) -> int:
        """The file's size in bytes when it was opened."""
        ...

    def close(self) -> None:
        """Release the handle; the caller calls it once, after the last read."""
        ...


@runtime_checkable
class Storage(Protocol):
    """A directory tree of files: local paths or the URLs of one fsspec filesystem."""

    def join(self, *parts: str) -> str:
        """``parts`` joined into one path with the back-end's separator; no I/O."""
        ...

    def dirname(self, path: str) -> str:
        """The parent of ``path``; no I/O."""
        ...

    def makedirs(self, path: str) -> None:
        """Create directory ``path`` and its missing parents, durably; existing ones are
        fine (on an object store, where directories are key prefixes, it does nothing)."""
        ...

    def listdir(self, path: str) -> list[str]:
        """The names (not paths) of the entries in directory ``path``; ``[]`` when it
        does not exist, ``OSError`` when it cannot be listed."""
        ...

    def scan(self, path: str) -> list[tuple[str, str]]:
        """The entries of directory ``path`` with their kind, as :meth:`kind` gives it
        (``"dir"``, ``"file"``, ``"other"``), in one listing; ``[]`` when it does not
        exist, ``OSError`` when it cannot be listed."""
        ...

    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a directory (on an object store: a prefix with objects
        under it); ``False`` only when the storage says nothing is there, ``OSError``
        when it cannot tell (an EIO, a throttled request)."""
        ...

    def isfile(self, path: str) -> bool:
        """Whether ``path`` is a regular file (a link to one is not); ``False`` only when
        the storage says it is missing, ``OSError`` when it cannot tell."""
        ...

    def kind(self, path: str) -> str | None:
        """What is at ``path``, without following a link there: ``"dir"``, ``"file"`` (a
        regular file), ``"other"`` (a link, FIFO, socket or device), or ``None`` when
        the storage says nothing is there; ``OSError`` when it cannot tell."""
        ...

    def size(self, path: str) -> int:
        """The size of file ``path`` in bytes; ``FileNotFoundError`` when missing."""
        ...

    def mtime(self, path: str) -> float:
        """When ``path`` was last modified, in seconds since the epoch;
        ``FileNotFoundError`` when missing, ``0.0`` where the filesystem keeps no times."""
        ...

    def unused(self, path: str, now: float) -> bool:
        """Whether the leftover ``path`` (a file or a directory) may be removed now, that
        is, no save in another process may still be writing it; ``True`` when missing.
        ``now`` is the storage's own clock (the modification time of a file the caller
        has just written), so that a skewed local clock cannot age a young file."""
        ...

    def usage(self, path: str) -> tuple[int, float]:
        """Total bytes of the files under directory ``path`` and their newest modification
        time (``0.0`` when none is known); ``(0, 0.0)`` when it does not exist."""
        ...

    def open_stream(self, path: str) -> BinaryIO:
        """Regular file ``path`` open for sequential reading, a file object the caller
        closes; ``FileNotFoundError`` when missing, :class:`UnsafeFileError` when it is
        not a regular file."""
        ...

    def open_read(self, path: str) -> ReadFile:
        """Regular file ``path`` open for ranged reads, closed by the caller; a missing
        file raises ``FileNotFoundError``, anything but a regular file
        :class:`UnsafeFileError`. On a local disk the open handle keeps the file's
        bytes readable even if it is removed meanwhile."""
        ...

    def read_bytes(self, path: str, limit: int) -> bytes:
        """The whole of regular file ``path``; :class:`UnsafeFileError` when it is not a
        regular file or is larger than ``limit`` bytes, ``FileNotFoundError`` when
        missing."""
        ...

    def write_durable(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        """Write ``chunks`` in order as file ``path`` (replacing any there), its data
        durable when this returns; returns the size. Not atomic: a local file is visible
        while written and a failed write leaves it partial for the caller to remove (the
        fsspec back-end aborts an upload, or removes a file that cannot be discarded,
        but a store such as ``memory://`` may still keep what it got). The new
        directory entry needs :meth:`fsync_dir` to be durable."""
        ...

    def take(self, source: str, path: str) -> bool:
        """Make ``path`` a file with the bytes of file ``source`` without sending them
        again: a hard link on a local disk (a copy where the filesystem has none), a
        server-side copy on an object store. Returns whether it created ``path``:
        ``False`` when ``path`` is ``source`` or exists already (data file names are
        unique to one save's bytes, so a whole file of that name holds them: the
        caller checks it is there and whole). ``path`` never names a partial copy.
        Durable as a :meth:`write_durable` file is: the new entry needs
        :meth:`fsync_dir`."""
        ...

    def replace_atomic(self, path: str, data: bytes, tmp_name: str) -> None:
        """Make ``path`` hold ``data`` in one atomic step: a reader sees the old content or
        the new, never a mix (``tmp_name`` names the temporary file beside ``path`` where
        the back-end needs one). Durable once the caller runs :meth:`fsync_dir` on the
        parent; a failure there comes after the new content became visible. An
        ``OSError`` means ``path`` was not replaced, except :class:`UncertainWriteError`:
        nobody can tell (the back-end tried to read the outcome back and could not)."""
        ...

    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory ``path`` (files created, renamed or removed in
        it) durable; a no-op where every completed write is durable on its own."""
        ...

    def remove(self, path: str) -> None:
        """Remove file ``path``; a missing file is fine."""
        ...

    def rmtree(self, path: str) -> None:
        """Remove directory ``path`` and everything under it, not atomically; a missing
        directory is fine."""
        ...

    def remove_empty_dir(self, path: str) -> None:
        """Remove directory ``path`` if it is empty; one that is missing or not empty is
        left as it is (on an object store, where a directory is a key prefix, there is
        nothing to remove)."""
        ...

    def lock(self, directory: str, *, blocking: bool = True) -> AbstractContextManager[bool]:
        """A context holding an exclusive lock on ``directory`` among processes; it yields
        whether the lock was taken (always ``True`` when ``blocking``, and always where
        the back-end has no lock, as on object stores). ``directory`` must exist. On a
        read-only directory a non-blocking lock yields ``False`` (nothing may be
        cleaned there) and a blocking one raises the ``OSError``."""
        ...


def confirm_replaced(storage: Storage, path: str, data: bytes, error: BaseException) -> None:
    """The step that replaces ``path`` with ``data`` raised ``error``, but it may have
    been applied all the same: an object store can store a PUT and lose its reply, and
    an NFS rename whose reply was lost fails on its retry though it was done. Read back
    what is there: ``data`` itself means it was applied (return); anything else, or
    nothing, means it was not (``error`` raised); no answer means nobody can tell
    (:class:`UncertainWriteError`)."""
    try:
        there = storage.read_bytes(path, len(data))
    except (FileNotFoundError, UnsafeFileError):  # none, or larger than ``data``
        raise error from None
    except OSError as e:
        raise UncertainWriteError(
            errno.EIO,
            f"replacing it failed ({type(error).__name__}: {error}) and reading it back "
            f"failed too ({e}): it holds the new content or the old",
            path,
        ) from error
    if there != data:
        raise error
    logger.warning("Writing %s reported %s, but it holds what was written", path, error)
