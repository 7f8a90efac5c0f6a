"""A storage that tells a callback how many bytes move through it: the progress, by
bytes, of the long operations of the ``learnax`` command (``verify``, ``convert``).

It wraps any back-end and counts the bytes of whole-file and ranged reads and of
durable writes; everything else is the wrapped storage's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .base import ReadFile, Storage

Progress = Callable[[int], None]


class CountedStorage:
    """``storage``, calling ``progress(nbytes)`` after each read or write of data."""

    def __init__(self, storage: Storage, progress: Progress) -> None:
        self._storage = storage
        self._progress = progress

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)

    def open_read(self, path: str) -> ReadFile:
        return _CountedReadFile(self._storage.open_read(path), self._progress)

    def read_bytes(self, path: str, limit: int) -> bytes:
        data = self._storage.read_bytes(path, limit)
        self._progress(len(data))
        return data

    def write_durable(self, path: str, chunks: Iterable[memoryview | bytes]) -> int:
        return self._storage.write_durable(path, self._counted(chunks))

    def _counted(self, chunks: Iterable[memoryview | bytes]) -> Iterator[memoryview | bytes]:
        # Counted as the back-end takes each chunk: the bar moves while a file is written.
        for chunk in chunks:
            yield chunk
            self._progress(memoryview(chunk).nbytes)


class _CountedReadFile:
    def __init__(self, f: ReadFile, progress: Progress) -> None:
        self._f = f
        self._progress = progress

    def readinto(self, views: list[memoryview], offset: int) -> None:
        self._f.readinto(views, offset)
        self._progress(sum(memoryview(v).nbytes for v in views))

    def size(self) -> int:
        return self._f.size()

    def close(self) -> None:
        self._f.close()
