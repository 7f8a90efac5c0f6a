"""Agreement between the processes of a multi-controller JAX run.

In a multi-host run every process calls the Checkpointer the same way; each writes its
own part of a checkpoint and process 0 commits it once every part is durable. The
processes agree through JAX's own distributed runtime (the coordination service's
key-value store and barriers that ``jax.distributed.initialize`` starts), so learnax
adds no service of its own. Keys are numbered in call order, which is the same on
every process because the calls are.

Waiting on another process is bounded: a process that died (or never makes the call)
turns into :class:`PeerError`, an ``OSError``, after ``timeout`` seconds, which fails
the save like any other I/O error. (JAX itself aborts the survivors of a dead process
after its heartbeat timeout, 100 s by default.)
"""

from __future__ import annotations

import itertools
import json
import threading
import zlib
from typing import Any

import jax

# Values larger than this go to the key-value store in pieces (gRPC messages are
# limited to a few MB).
_PIECE = 1 << 20

_instances: dict[str, int] = {}
_instances_lock = threading.Lock()


def is_multihost() -> bool:
    """Whether this process is one of several of a ``jax.distributed`` run. Asked of the
    distributed runtime, not of ``jax.process_count()``, which would start the backends:
    a Checkpointer created before ``jax.distributed.initialize()`` must not break it."""
    try:
        from jax._src import distributed

        state = distributed.global_state
        return state.client is not None and (state.num_processes or 1) > 1
    except (ImportError, AttributeError):  # pragma: no cover - private API moved
        return jax.process_count() > 1


class PeerError(OSError):
    """Another process of the run did not do its part in time, or failed it."""


class Coordinator:
    """Key-value exchanges and barriers among the processes, for one Checkpointer."""

    def __init__(self, run_id: str, timeout: float) -> None:
        from jax._src import distributed  # the runtime jax.distributed.initialize starts

        self._client = distributed.global_state.client
        if self._client is None:
            raise RuntimeError(
                "jax.process_count() > 1 but jax.distributed is not initialized in this "
                "process: call jax.distributed.initialize() before creating the Checkpointer."
            )
        self.process = jax.process_index()
        self.count = jax.process_count()
        self.timeout_ms = max(1, int(timeout * 1000))
        # Keyed by run, not by path: the same run may sit at different paths on
        # different hosts (a mistake that the commit then reports clearly); two
        # Checkpointers of one run are told apart by creation order.
        with _instances_lock:
            n = _instances.get(run_id, 0)
            _instances[run_id] = n + 1
        self._prefix = f"learnax/{zlib.crc32(run_id.encode()):08x}-{n}"
        self._counter = itertools.count()
        self._used: list[int] = []  # on process 0: exchanges whose keys still exist
        self._lock = threading.Lock()

    @property
    def leader(self) -> bool:
        return self.process == 0

    def new_key(self) -> str:
        """A fresh key for one exchange; call in the same order on every process."""
        n = next(self._counter)
        if self.leader:
            with self._lock:
                self._used.append(n)
        return f"{self._prefix}/{n}"

    def broadcast(self, key: str, value: Any = None, *, timeout_factor: float = 1) -> Any:
        """Process 0's ``value`` (any JSON value), on every process; the others wait
        for it ``timeout_factor`` times the timeout."""
        if self.leader:
            self._set(key, json.dumps(value))
            return value
        return json.loads(self._get(key, int(self.timeout_ms * timeout_factor)))

    def send(self, key: str, value: str) -> None:
        """Hand ``value`` to process 0 (see :meth:`gather`)."""
        self._set(f"{key}/{self.process}", value)

    def gather(self, key: str, own: str) -> list[str]:
        """On process 0: every process's value sent under ``key``, in process order.
        Waits at most the timeout in all (``PeerError`` after it)."""
        values = [own]
        for process in range(1, self.count):
            values.append(self._get(f"{key}/{process}", self.timeout_ms))
        self._forget_before(int(key.rpartition("/")[2]))
        return values

    def barrier(self, key: str) -> None:
        try:
            self._client.wait_at_barrier(key, self.timeout_ms)
        except Exception as e:  # jax raises its own runtime error type
            raise PeerError(f"processes did not meet at {key} within the timeout: {e}") from None

    def _forget_before(self, n: int) -> None:
        """Delete the keys of the exchanges before number ``n``: every process sent its
        part of exchange ``n``, so each has read all earlier ones (calls are made in
        the same order everywhere, and one save at a time)."""
        with self._lock:
            stale = [m for m in self._used if m < n]
            self._used = [m for m in self._used if m >= n]
        for m in stale:
            try:
                self._client.key_value_delete(f"{self._prefix}/{m}")
            except Exception:  # a leftover key costs a few bytes on the coordinator
                pass

    def _set(self, key: str, value: str) -> None:
        pieces = [value[i : i + _PIECE] for i in range(0, len(value), _PIECE)] or [""]
        try:
            for i, piece in enumerate(pieces[1:], 1):
                self._client.key_value_set(f"{key}/piece{i}", piece)
            # The first piece, written last, carries the count: once it is there, all are.
            self._client.key_value_set(key, f"{len(pieces)}:{pieces[0]}")
        except Exception as e:  # jax raises its own runtime error type
            raise PeerError(f"cannot reach JAX's coordination service ({key}): {e}") from None

    def _get(self, key: str, timeout_ms: int) -> str:
        try:
            head = self._client.blocking_key_value_get(key, timeout_ms)
            count, _, first = head.partition(":")
            rest = [
                self._client.blocking_key_value_get(f"{key}/piece{i}", timeout_ms)
                for i in range(1, int(count))
            ]
        except Exception as e:  # jax raises its own runtime error type
            raise PeerError(
                f"no answer from the other processes for {key} within "
                f"{timeout_ms / 1000:g} s (did one die, or not make the same call?): {e}"
            ) from None
        return first + "".join(rest)
