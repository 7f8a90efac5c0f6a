"""The I/O threads shared by all Checkpointers of a process.

Writing to the page cache, computing CRC32s and reading back are all done by code that
releases the GIL, so a few threads give real parallelism: on two cores, writing two
files at once costs about the time of writing one file of the same total size with
no checksum at all.
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

IO_THREADS = max(1, min(8, os.cpu_count() or 1))

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="learnax-io")
        return _pool


def _forget_pool_after_fork() -> None:
    # The child has none of the parent's threads: no pool, no save in flight, so no
    # reason for the cyclic GC to stay paused.
    global _pool, _pool_lock, _gc_lock, _gc_holders
    _pool, _pool_lock = None, threading.Lock()
    _gc_lock = threading.Lock()
    if _gc_holders and _gc_was_enabled:
        gc.enable()
    _gc_holders = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def parallel_map(fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``[fn(x) for x in items]`` on the I/O threads, the first item in the calling
    thread. Every call has finished when this returns, also when one raised: then the
    first exception is raised."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    join = run_in_background(fn, items[1:])
    try:
        first = fn(items[0])
    except BaseException:
        with contextlib.suppress(BaseException):
            join()
        raise
    return [first, *join()]


def run_in_background(fn: Callable[[T], R], items: Sequence[T]) -> Callable[[], list[R]]:
    """Start ``fn(x)`` for every item on the I/O threads; returns a function that waits
    for all of them and returns their results (raising the first exception)."""
    futures: list[Future[R]] = []
    for x in items:
        try:
            futures.append(_get_pool().submit(fn, x))
        except RuntimeError:  # the interpreter is shutting down: run it in this thread
            done: Future[R] = Future()
            _run_into(done, fn, x)
            futures.append(done)

    def join() -> list[R]:
        results: list[R] = []
        error: BaseException | None = None
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error
        return results

    return join


def split_contiguous(items: list[T], sizes: list[int], min_bytes: int) -> list[list[T]]:
    """``items`` cut into at most IO_THREADS contiguous runs of about equal total size,
    each at least ``min_bytes`` (one run for less); empty runs dropped. Order is kept,
    so that neighbouring bytes stay with one thread."""
    total = sum(sizes)
    count = max(1, min(IO_THREADS, total // min_bytes))
    groups: list[list[T]] = [[] for _ in range(count)]
    done = 0
    for item, size in zip(items, sizes, strict=True):
        groups[min(count - 1, done * count // max(total, 1))].append(item)
        done += size
    return [g for g in groups if g]


def _run_into(future: Future[R], fn: Callable[[T], R], x: T) -> None:
    try:
        future.set_result(fn(x))
    except BaseException as e:
        future.set_exception(e)


_gc_lock = threading.Lock()
_gc_holders = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a save or load runs.

    Encoding or decoding a tree allocates an object or two per leaf; with thousands of
    leaves that triggers full collections, which walk the whole heap (large once jax
    is imported): 60-80 ms pauses measured on a 4,000-leaf save here, more than the
    save itself. Reference counting still frees everything; only cycles wait. Nested
    and concurrent uses (a load during a background save) are counted, so the
    collector is back in its original state when the last one ends.
    """
    global _gc_holders, _gc_was_enabled
    with _gc_lock:
        if _gc_holders == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_holders += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders -= 1
            if _gc_holders == 0 and _gc_was_enabled:
                gc.enable()
