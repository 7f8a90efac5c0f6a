"""Background saves: the state is snapshotted so that the caller may change or delete
its arrays at once, then written on a worker thread, at most one save in flight.
Saves still in flight when the interpreter exits are finished first. A child process
forked meanwhile has no part in them: they are its parent's, to finish and commit.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
import weakref
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _tree
from ._write import on_cpu

_SMALL_LEAF = 1 << 20  # bytes: below it, a snapshot copies a CPU array on the host
_DEVICE_PUT_MAY_ALIAS = "may_alias" in inspect.signature(jax.device_put).parameters


def snapshot(leaves: list[_tree.ArrayLeaf], skip: Collection[str] = ()) -> None:
    """Make the leaves independent of the caller's arrays, which may change, be deleted
    or donated as soon as an async save returns; those named in ``skip`` are never
    read (their data is taken from an earlier checkpoint's files).

    Jax arrays are copied on their own devices in one batched call, which returns
    before the copies are done (no device-to-host transfer before returning). Small
    arrays on the CPU are copied in host memory instead: there a device copy costs
    ~15 us of dispatch per leaf against ~2 us for the copy itself (4,000 leaves of
    16 KiB: 60 ms against 15 ms, measured here). Numpy arrays are copied in host memory.
    """
    on_device = []
    spanning = []
    for leaf in leaves:
        value = leaf.value
        if skip and leaf.name in skip:
            continue
        if isinstance(value, jax.Array):
            if not value.is_fully_addressable:
                spanning.append(leaf)
            elif value.nbytes < _SMALL_LEAF and on_cpu(value):
                leaf.value = np.array(value)
            else:
                on_device.append(leaf)
        elif isinstance(value, np.ndarray):
            leaf.value = value.copy()
    if on_device:
        copies = _copies_on_device([leaf.value for leaf in on_device])
        for leaf, copy in zip(on_device, copies, strict=True):
            leaf.value = copy
    if spanning:
        _snapshot_spanning(spanning)


def _snapshot_spanning(leaves: list[_tree.ArrayLeaf]) -> None:
    # An array spanning processes cannot be copied whole here (jax refuses it): its
    # local shards are, each on its device, and put together again.
    shards = [shard for leaf in leaves for shard in leaf.value.addressable_shards]
    copies = _copies_on_device([shard.data for shard in shards])
    done = 0
    for leaf in leaves:
        value, n = leaf.value, len(leaf.value.addressable_shards)
        leaf.value = jax.make_array_from_single_device_arrays(
            value.shape, value.sharding, copies[done : done + n]
        )
        done += n


def _copies_on_device(arrays: list[jax.Array]) -> list[jax.Array]:
    """A copy of each of ``arrays`` on its own devices, returned before the copies are
    done: one batched ``device_put(..., may_alias=False)``, or where jax has no
    ``may_alias`` (before 0.4.31), where ``device_put`` may return the array itself,
    one ``jnp.copy`` per array."""
    if _DEVICE_PUT_MAY_ALIAS:
        return jax.device_put(arrays, may_alias=False)
    return [jnp.copy(a) for a in arrays]


class BackgroundSaves:
    """One worker thread running at most one save at a time."""

    def __init__(self) -> None:
        self._worker: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def submit(self, save: Callable[..., None], *args: Any) -> None:
        """Run ``save(*args)`` on the worker; call :meth:`finish` before the next one."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="learnax-save")
            _PENDING_AT_EXIT.add(self)
        self._in_flight = self._worker.submit(save, *args)

    def finish(self) -> None:
        """Wait for the save in flight; raise its failure (once) if it failed."""
        future, self._in_flight = self._in_flight, None
        if future is not None:
            future.result()

    def close(self) -> None:
        """Finish the save in flight (raising its failure), then stop the worker."""
        try:
            self.finish()
        finally:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.shutdown(wait=True)
            _PENDING_AT_EXIT.discard(self)


# Workers with a save possibly in flight, finished when the interpreter exits.
_PENDING_AT_EXIT: weakref.WeakSet[BackgroundSaves] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for saves in list(_PENDING_AT_EXIT):
        try:
            saves.finish()
        except BaseException:  # already logged when it failed
            pass


def _forget_saves_after_fork() -> None:
    # A forked child (a data-loader worker, a user's fork) has none of the parent's
    # threads, so a save in flight at the fork is the parent's alone: the parent
    # finishes and commits it. The child forgets it instead of waiting at exit, or in
    # wait_until_finished()/close() of its copy of a Checkpointer, for a worker that
    # does not exist here (forever), and never writes it a second time. Its own later
    # saves start a worker of its own.
    global _PENDING_AT_EXIT
    for saves in list(_PENDING_AT_EXIT):
        saves._worker = None
        saves._in_flight = None
    _PENDING_AT_EXIT = weakref.WeakSet()


with contextlib.suppress(AttributeError):  # no fork on Windows
    os.register_at_fork(after_in_child=_forget_saves_after_fork)
