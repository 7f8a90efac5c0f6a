"""Multi-host saves: agreement between the processes of a multi-controller JAX run, and
the whole protocol of committing one checkpoint that every process wrote a part of.

In a multi-host run every process calls the Checkpointer the same way; each writes its
own part of a checkpoint and process 0 commits it once every part is durable
(:func:`save_multihost`, the counterpart of ``_write.write_checkpoint``). The
processes agree through JAX's own distributed runtime (the coordination service's
key-value store that ``jax.distributed.initialize`` starts), so learnax
adds no service of its own. Keys are named after the call they serve, which is the same on
every process because the calls are.

Waiting on another process is bounded: a process that died (or never makes the call)
turns into :class:`PeerError`, an ``OSError``, after ``timeout`` seconds (process 0) or
a few times that (the others, see Coordinator.wait_outcome), which fails the save like
any other I/O error. (JAX itself aborts the survivors of a dead process
after its heartbeat timeout, 100 s by default.)
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import secrets
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax

from . import _tree, _write
from ._manifest import Part, manifest_body, manifest_bytes
from ._storage import UncertainWriteError

if TYPE_CHECKING:
    from ._run import RunDirectory

logger = logging.getLogger("learnax")

# Values larger than this go to the key-value store in pieces (gRPC messages are
# limited to a few MB).
_PIECE = 1 << 20

# How many calls' repeat counts a Coordinator remembers (see new_key).
_REMEMBERED_CALLS = 1024


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


_instances: collections.Counter[str] = collections.Counter()
_instances_lock = threading.Lock()


def _instance_number(run_key: str) -> int:
    """How many Checkpointers of this run id took a number in this process before."""
    with _instances_lock:
        n = _instances[run_key]
        _instances[run_key] += 1
    return n


class Coordinator:
    """Key-value exchanges among the processes, for one Checkpointer.

    Each exchange's key is named after the call it serves (``save/state_latest/300``,
    ``metric/300``), with a count for repeats of the same call: a call made by some
    processes only fails that call, and the next ones still line up.
    """

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
        self.timeout = timeout
        # Keyed by run, not by path: the same run may sit at different paths on
        # different hosts (a mistake that the commit then reports clearly); and by the
        # Checkpointer's number among those of this run id in the process, taken at its
        # first exchange, so that two Checkpointers of one run id (in two registries,
        # or twice in one) never share keys. Every process makes the same collective
        # calls in the same order, so they agree on the number; a Checkpointer that
        # only loads (made on one process alone) never takes one.
        self._run_key = f"{zlib.crc32(run_id.encode()):08x}"
        self._prefix = ""
        self._repeats: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._used: list[str] = []  # on process 0: keys of exchanges that may still exist
        self._lock = threading.Lock()

    @property
    def leader(self) -> bool:
        return self.process == 0

    def new_key(self, call: str) -> str:
        """The key of the exchange for ``call``; the same on every process that makes
        the same calls."""
        with self._lock:
            if not self._prefix:
                self._prefix = f"learnax/{self._run_key}/{_instance_number(self._run_key)}"
            n = self._repeats.pop(call, 0)
            self._repeats[call] = n + 1
            if len(self._repeats) > _REMEMBERED_CALLS:  # repeats come close together
                self._repeats.popitem(last=False)
            key = f"{self._prefix}/{call}/{n}"
            if self.leader:
                self._used.append(key)
        return key

    def broadcast(self, key: str, value: Any = None) -> Any:
        """Process 0's ``value`` (any JSON value), on every process."""
        if self.leader:
            self._set(key, json.dumps(value))
            return value
        return json.loads(self._get(key, time.monotonic() + self.timeout))

    def send(self, key: str, value: str) -> None:
        """Hand ``value`` to process 0 (see :meth:`gather`)."""
        self._set(f"{key}/{self.process}", value)

    def gather(self, key: str, own: str) -> list[str]:
        """On process 0: every process's value sent under ``key``, in process order,
        waiting at most the timeout in all (``PeerError`` after it)."""
        deadline = time.monotonic() + self.timeout
        values = [own] + [self._get(f"{key}/{p}", deadline) for p in range(1, self.count)]
        self._forget_before(key)
        return values

    def publish_outcome(self, key: str, outcome: dict[str, Any]) -> None:
        """On process 0: the outcome of the exchange ``key``, for the others."""
        self._set(f"{key}/outcome", json.dumps(outcome))

    def wait_outcome(self, key: str) -> dict[str, Any]:
        """On the other processes: the outcome process 0 published for ``key``.

        Waiting is bounded, but process 0 may be slow rather than dead: after twice the
        timeout this process says it gives up (an abort key, which process 0 checks
        right before committing, see :meth:`check_not_abandoned`), then waits one more
        timeout for an outcome decided before that."""
        try:
            return json.loads(self._get(f"{key}/outcome", time.monotonic() + 2 * self.timeout))
        except PeerError:
            with contextlib.suppress(Exception):
                self._client.key_value_set(f"{key}/abort/{self.process}", "1")
        return json.loads(self._get(f"{key}/outcome", time.monotonic() + self.timeout))

    def check_not_abandoned(self, key: str) -> None:
        """On process 0, right before a commit: ``PeerError`` when another process gave
        up waiting for this exchange (it has returned ``None`` or is about to)."""
        try:
            entries = self._client.key_value_dir_get(f"{key}/abort/")
        except Exception as e:  # jax raises its own runtime error type
            raise PeerError(f"cannot reach JAX's coordination service ({key}): {e}") from None
        if entries:
            who = sorted(k.rpartition("/")[2] for k, _ in entries)
            raise PeerError(f"process(es) {', '.join(who)} stopped waiting for this save")

    def _forget_before(self, key: str) -> None:
        """Delete the keys of the exchanges allocated before ``key``: every process sent
        its part of ``key``, so each has read all earlier ones (calls are made in the
        same order everywhere, and one save at a time)."""
        with self._lock:
            if key not in self._used:
                return
            i = self._used.index(key)
            stale, self._used = self._used[:i], self._used[i:]
        for old in stale:
            try:
                self._client.key_value_delete(old)
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

    def _get(self, key: str, deadline: float) -> str:
        def remaining_ms() -> int:
            return max(1, int((deadline - time.monotonic()) * 1000))

        try:
            head = self._client.blocking_key_value_get(key, remaining_ms())
            count, _, first = head.partition(":")
            rest = [
                self._client.blocking_key_value_get(f"{key}/piece{i}", remaining_ms())
                for i in range(1, int(count))
            ]
        except Exception as e:  # jax raises its own runtime error type
            raise PeerError(
                f"no answer from the other processes for {key} in time (did one die, or "
                f"not make the same call?): {e}"
            ) from None
        return first + "".join(rest)


def agreed_float(coord: Coordinator | None, value: float, call: str, what: str) -> float:
    """On multi-host runs, process 0's ``value``, so that every process makes the same
    decision on it (and so the same calls); NaN when the processes cannot agree in
    time, which is never a better metric."""
    if coord is None:
        return value
    try:
        agreed = coord.broadcast(coord.new_key(call), _tree.encode_float(value))
    except PeerError as e:
        logger.error("Cannot agree on %s: %s", what, e)
        return math.nan
    return _tree.decode_float(agreed, f"{what} of process 0")


def save_multihost(
    coord: Coordinator,
    run: RunDirectory,
    name: str,
    step: int,
    *,
    tree: Any,
    leaves: list[Any],
    metrics: dict[str, Any],
    extra: dict[str, Any] | None,
    exchange: str,
    after_commit: Callable[[str], None],
) -> None:
    """Save checkpoint ``name`` of ``run`` across the processes: every process writes
    its shards to its own data files; process 0 gathers the parts, commits the
    manifest, runs ``after_commit(directory)`` (while the others still wait), then tells
    them the outcome. Raises ``OSError`` on every process when any part failed
    (``VisibleNotDurableError`` when the checkpoint is committed but its durability is
    unconfirmed)."""
    directory = run.join(name)
    if not coord.leader:
        part = _write_own_part(coord, run, name, step, leaves, exchange)
        outcome = coord.wait_outcome(exchange)
        if "error" in outcome:
            kept = outcome.get("visible") or outcome.get("uncertain")
            if isinstance(part, Part) and not kept:
                _write.remove_files(run.storage, directory, part.files)
            if outcome.get("visible"):
                raise _write.VisibleNotDurableError(outcome["error"])
            raise (UncertainWriteError if kept else PeerError)(outcome["error"])
        return
    outcome: dict[str, Any] = {"error": "process 0 failed (see its log)"}
    part = None
    try:
        # The run's lock (local disks) from before process 0 writes until the commit,
        # so that no other writer's cleanup of leftovers takes the new files.
        with run.storage.lock(run.path):
            part = _write_own_part(coord, run, name, step, leaves, exchange)
            if isinstance(part, str):
                raise PeerError(json.loads(part)["error"])
            mine = json.dumps({"name": name, "step": step, "part": part.to_json()})
            received = [json.loads(v) for v in coord.gather(exchange, mine)]
            merged = _checked_parts(run, name, step, leaves, received)
            body = manifest_body(tree, merged, step, metrics, extra)
            coord.check_not_abandoned(exchange)
            _write.commit(run.storage, directory, manifest_bytes(body), set(merged.files))
        outcome = {}
        after_commit(directory)  # no process of this job writes now: the others wait
    except (_write.VisibleNotDurableError, UncertainWriteError) as e:
        visible = isinstance(e, _write.VisibleNotDurableError)
        outcome = {"error": f"process 0: {e}", "visible": visible, "uncertain": not visible}
        raise
    except BaseException as e:
        if outcome:  # not committed
            outcome = {"error": f"process 0: {e}"}
            if isinstance(part, Part):
                _write.remove_files(run.storage, directory, part.files)
        raise
    finally:
        coord.publish_outcome(exchange, outcome)


def _write_own_part(
    coord: Coordinator, run: RunDirectory, name: str, step: int, leaves: list[Any], exchange: str
) -> Part | str:
    """This process's data files; on process 1+ also sent to process 0. Returns the
    part, or on an I/O failure the message sent instead."""
    directory = run.join(name)
    try:
        _write.writable_checkpoint_dir(run.storage, directory)
        run.storage.makedirs(directory)
        tensors = _write.tensors_of_process(leaves, coord.process)
        prefix = f"{secrets.token_hex(8)}-p{coord.process}"
        part: Part | str = _write.write_part(run.storage, directory, tensors, prefix)
        message = json.dumps({"name": name, "step": step, "part": part.to_json()})
    except OSError as e:
        part = message = json.dumps({"error": f"process {coord.process}: {e}"})
    if not coord.leader:
        coord.send(exchange, message)
    return part


def _checked_parts(
    run: RunDirectory, name: str, step: int, leaves: list[Any], received: list[dict[str, Any]]
) -> Part:
    """On process 0: every process's part, checked to be of the same save and merged
    into one. Raises ``PeerError`` for a bad or missing part."""
    errors = [r["error"] for r in received if "error" in r]
    if errors:
        raise PeerError("; ".join(errors))
    for process, r in enumerate(received):
        if (r["name"], r["step"]) != (name, step):
            raise PeerError(
                f"process {process} saved {r['name']} at step {r['step']} while "
                f"process 0 saved {name} at step {step}: every process must "
                "make the same calls"
            )
    directory = run.join(name)
    try:
        parts = [Part.from_json(r["part"]) for r in received]
        merged = _write.merge_parts(parts, leaves, directory)
    except ValueError as e:
        raise PeerError(str(e)) from None
    for file, info in merged.files.items():
        # Every file must be there: a run directory on each host's own disk, or
        # another job's cleanup, would otherwise commit a checkpoint with holes.
        path = run.storage.join(directory, file)
        if not (run.storage.isfile(path) and run.storage.size(path) == info["bytes"]):
            raise PeerError(
                f"process {info['process']}'s data file {path} is not visible to "
                "process 0: on a multi-host run the registry must be storage that "
                "every host shares (an object store or a shared filesystem)"
            )
    return merged
