"""The checkpoint policy of a training run: when to save, what to keep, which is best.

:class:`Checkpointer` decides; the format module writes and reads one checkpoint; the
storage module does the I/O. A run's checkpoints live in
``<registry_path>/<run_id>/checkpoints/state_<name>``: ``state_latest`` (rolling),
``state_<step>`` (numbered, pruned by ``max_to_keep``) and ``state_best``.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import secrets
import signal
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from . import _format, _legacy, _tree
from ._errors import CheckpointCorruptedError, CheckpointSaveError, LegacyPickleError
from ._multihost import Coordinator, PeerError, is_multihost
from ._storage import open_storage
from ._target import restore_into_target
from ._threads import gc_paused

logger = logging.getLogger("learnax")

_PREFIX = "state_"
_SMALL_LEAF = 1 << 20  # bytes: below it, an async snapshot copies a CPU array on the host
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


@dataclass
class _Write:
    """One checkpoint to write from a snapshot, and what to do once it is committed."""

    key: str  # the key of maybe_save_checkpoints' result: "latest", "numbered", "best"
    name: str  # the directory, "state_<...>"
    metrics: dict[str, Any]  # already encoded for JSON
    extra: dict[str, Any] | None = None
    best_value: float | None = None  # becomes best_metric_value once committed
    retention: bool = False  # a numbered checkpoint: prune the old ones after it
    error: BaseException | None = None
    exchange: str = ""  # multi-host: the key under which the processes agree on it


def _snapshot(leaves: list[_tree.ArrayLeaf]) -> None:
    """Make the leaves independent of the caller's arrays, which may change, be deleted
    or donated as soon as an async save returns.

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
        if isinstance(value, jax.Array):
            if not value.is_fully_addressable:
                spanning.append(leaf)
            elif value.nbytes < _SMALL_LEAF and _format.on_cpu(value):
                leaf.value = np.array(value)
            else:
                on_device.append(leaf)
        elif isinstance(value, np.ndarray):
            leaf.value = value.copy()
    if on_device:
        copies = jax.device_put([leaf.value for leaf in on_device], may_alias=False)
        for leaf, copy in zip(on_device, copies, strict=True):
            leaf.value = copy
    if spanning:
        # An array spanning processes cannot be copied whole here (jax refuses it):
        # its local shards are, each on its device, and put together again.
        shards = [shard for leaf in spanning for shard in leaf.value.addressable_shards]
        copies = jax.device_put(
            [shard.data for shard in shards], [shard.device for shard in shards], may_alias=False
        )
        done = 0
        for leaf in spanning:
            value, n = leaf.value, len(leaf.value.addressable_shards)
            leaf.value = jax.make_array_from_single_device_arrays(
                value.shape, value.sharding, copies[done : done + n]
            )
            done += n


# Set by the SIGTERM handler that save_on_preemption installs (once per process).
_SIGTERM_RECEIVED = threading.Event()
_SIGTERM_WATCHED = False


def _watch_sigterm() -> None:
    """Make SIGTERM (what schedulers send before preempting) set a flag instead of
    killing the process. The handler only sets an Event: logging or I/O inside a
    signal handler could deadlock."""
    global _SIGTERM_WATCHED
    if _SIGTERM_WATCHED:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "save_on_preemption=True must be set up in the main thread (Python only "
            "installs signal handlers there)."
        )
    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM_RECEIVED.set())
    _SIGTERM_WATCHED = True


# Checkpointers with a background thread, flushed when the interpreter exits.
_PENDING_AT_EXIT: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for ckpt in list(_PENDING_AT_EXIT):
        try:
            ckpt._finish_in_flight()
        except BaseException:  # already logged when it failed
            pass


class Checkpointer:
    """Saves and restores the checkpoints of one training run.

    Call :meth:`maybe_save_checkpoints` every step: it keeps a rolling ``latest``
    checkpoint every ``save_every`` steps, a numbered checkpoint every
    ``checkpoint_every`` steps (the oldest pruned beyond ``max_to_keep``), and, with
    ``keep_best``, the checkpoint with the best ``metric_name`` seen so far. After a
    crash, :meth:`load_latest` returns the newest checkpoint that verifies.

    Every checkpoint is committed atomically and durably: it is either complete on
    storage or invisible. Loading never unpickles or imports anything.

    **Arguments:**

    - `registry_path`: directory holding all runs: a local path or an fsspec URL
      (``s3://bucket/runs``, ``gs://...``, ``memory://...``).
    - `run_id`: the run's name, one path component.
    - `save_every`: steps between saves of the rolling ``latest`` checkpoint; ``None``
      or 0 for never.
    - `checkpoint_every`: steps between numbered checkpoints; ``None`` or 0 for never.
    - `max_to_keep`: how many numbered checkpoints to keep (``None`` or ``inf``: all).
    - `keep_best`: whether to keep ``state_best``, the checkpoint with the best metric.
    - `metric_name`: the key in ``metrics`` that decides the best checkpoint.
    - `minimize_metric`: whether lower (``True``) or higher is better.
    - `prepare_fn`: applied to the state before writing; defaults to ``jax.device_get``.
    - `async_save`: return from a save once the state is snapshotted (jax arrays copied
      on their devices, numpy arrays in host memory) and write it in a background
      thread; at most one save is in flight. See :meth:`wait_until_finished`.
    - `keep_period`: numbered checkpoints whose step is a multiple of it are kept
      forever and do not count toward ``max_to_keep``.
    - `save_on_preemption`: after a SIGTERM, the next :meth:`maybe_save_checkpoints`
      saves ``latest`` whatever the interval, waits until it is committed, and sets
      ``reached_preemption`` so that the loop can stop. The SIGTERM handler replaces the
      default one (which would kill the process at once). On multi-host runs all
      processes agree on the step through JAX's preemption sync point.
    - `storage_options`: options for the fsspec filesystem of a URL ``registry_path``
      (``s3://``, ``gs://``...), e.g. ``{"client_kwargs": {"endpoint_url": ...}}``.
    - `multihost_timeout`: on multi-host runs, how many seconds a process waits for the
      others' part of a save before the save fails (returns ``None``) everywhere.

    **Returns:** the Checkpointer of the run; creating it makes the run's checkpoint
    directory, removes what interrupted saves left there, and reads the stored best
    metric value.

    **Example:**

    ```python
    ckpt = Checkpointer("runs", "mlp", save_every=100, checkpoint_every=1000,
                        max_to_keep=3, keep_best=True)
    restored = ckpt.load_latest(target=state)
    start = 0 if restored is None else restored["step"] + 1
    if restored is not None:
        state = restored["state"]
    for step in range(start, num_steps):
        state, metrics = train_step(state, batch)
        ckpt.maybe_save_checkpoints(state, step, metrics)
    ```
    """

    def __init__(
        self,
        registry_path: str | os.PathLike[str],
        run_id: str,
        save_every: int | None = 300,
        checkpoint_every: int | None = 5000,
        max_to_keep: int | float | None = None,
        keep_best: bool = False,
        metric_name: str = "val/loss",
        minimize_metric: bool = True,
        prepare_fn: Callable[[Any], Any] | None = None,
        *,
        async_save: bool = False,
        keep_period: int | None = None,
        save_on_preemption: bool = False,
        storage_options: dict[str, Any] | None = None,
        multihost_timeout: float = 600.0,
    ) -> None:
        registry_path = os.fspath(registry_path)
        if (
            not isinstance(run_id, str)
            or run_id in ("", ".", "..")
            or any(c in run_id for c in "/\\\0")
        ):
            raise ValueError(
                f"run_id must be one path component (no '/', '\\', not '.' or '..'), got {run_id!r}"
            )
        if isinstance(multihost_timeout, bool) or not isinstance(multihost_timeout, (int, float)):
            raise TypeError(
                f"multihost_timeout must be a number of seconds, got {multihost_timeout!r}"
            )
        if not 0 < multihost_timeout < math.inf:
            raise ValueError(f"multihost_timeout must be > 0 and finite, got {multihost_timeout}")
        self._storage, base = open_storage(registry_path, storage_options)
        self.registry_path = registry_path
        self.run_id = run_id
        self.checkpoint_dir = self._storage.join(base, run_id, "checkpoints")
        self.save_every = _interval(save_every, "save_every")
        self.checkpoint_every = _interval(checkpoint_every, "checkpoint_every")
        self.max_to_keep = _max_to_keep(max_to_keep)
        self.keep_best = bool(keep_best)
        self.metric_name = metric_name
        self.minimize_metric = bool(minimize_metric)
        self.prepare_fn = prepare_fn if prepare_fn is not None else jax.device_get
        self._default_prepare = prepare_fn is None
        self.async_save = bool(async_save)
        self.keep_period = _interval(keep_period, "keep_period")
        self._worker: ThreadPoolExecutor | None = None
        self._in_flight: Future[None] | None = None
        self._pending_best: float | None = None  # the best value the save in flight writes
        self._closed = False
        self.save_on_preemption = bool(save_on_preemption)
        self.reached_preemption = False
        self._multihost = False
        if self.save_on_preemption:
            self._multihost = jax.process_count() > 1
            if not self._multihost:
                _watch_sigterm()
        # Multi-host: process 0 commits, cleans up and applies retention; the others
        # write their shards and wait for its word.
        self._coord = Coordinator(run_id, multihost_timeout) if is_multihost() else None
        self._storage.makedirs(self.checkpoint_dir)
        self.best_metric_value: float = math.inf if self.minimize_metric else -math.inf
        # Multi-host: the other processes may be writing their part of a first save
        # already, so process 0 cleans up after its first commit instead.
        self._cleaned = self._coord is None
        if self._coord is None:
            self._clean_leftovers()
        self._restore_best_metric_value()

    # ----------------------------------------------------------------- policy

    def should_save_latest(self, step: int) -> bool:
        """Whether ``step`` is due for the rolling ``latest`` checkpoint.

        **Arguments:** `step`: the current training step.

        **Returns:** ``True`` when ``save_every`` is set and divides ``step``.

        **Example:** `Checkpointer("runs", "mlp", save_every=100).should_save_latest(300)  # True`
        """
        return bool(self.save_every) and _as_step(step) % self.save_every == 0

    def should_save_numbered(self, step: int) -> bool:
        """Whether ``step`` is due for a numbered checkpoint.

        **Arguments:** `step`: the current training step.

        **Returns:** ``True`` when ``checkpoint_every`` is set and divides ``step``.

        **Example:** `Checkpointer("runs", "mlp", checkpoint_every=1000).should_save_numbered(500)  # False`
        """
        return bool(self.checkpoint_every) and _as_step(step) % self.checkpoint_every == 0

    def maybe_save_checkpoints(
        self, train_state: Any, step: int, metrics: dict[str, float] | None = None
    ) -> dict[str, str]:
        """Save whatever is due at ``step``; call it every training step.

        Saves ``latest`` every ``save_every`` steps, a numbered checkpoint every
        ``checkpoint_every`` steps (then prunes beyond ``max_to_keep``), and
        ``state_best`` when ``keep_best`` and ``metrics[metric_name]`` is strictly
        better than the best so far. When nothing is due it returns at once, without
        touching the state (no device synchronisation).

        **Arguments:**

        - `train_state`: the pytree to save.
        - `step`: the current step (a Python int is cheapest).
        - `metrics`: scalar metrics to store with the checkpoint.

        **Returns:** the paths saved, under the keys ``"latest"``, ``"numbered"`` and
        ``"best"`` (only those saved).

        **Example:**

        ```python
        saved = ckpt.maybe_save_checkpoints(state, step, {"val/loss": 0.3})
        if "best" in saved:
            print("new best at", saved["best"])
        ```
        """
        step = _as_step(step)
        preempted = self.save_on_preemption and self._preemption_due(step)
        due_latest = preempted or self.should_save_latest(step)
        due_numbered = self.should_save_numbered(step)
        due_best = self.keep_best and bool(metrics) and self.metric_name in metrics
        if not (due_latest or due_numbered or due_best):
            return {}
        encoded = _format.encode_metrics(metrics)
        writes = []
        if due_latest:
            writes.append(_Write("latest", _PREFIX + "latest", encoded))
        if due_numbered:
            writes.append(_Write("numbered", f"{_PREFIX}{step}", encoded, retention=True))
        if due_best:
            # Decided against the best still being written, if any: a step that only
            # reports a metric that is not better never waits for a save in flight.
            best = self._best_write(metrics[self.metric_name], encoded, step)
            if best is not None:
                writes.append(best)
        if not writes:
            return {}
        self._finish_in_flight()
        saved = self._save_all(train_state, step, writes)
        if preempted:
            self._finish_in_flight()  # the process is about to end: commit it now
            if saved.get("latest") is None:
                logger.error(
                    "Preemption: saving latest at step %d failed; retrying next step.", step
                )
            else:
                logger.warning("Preemption: saved latest at step %d; stop the training loop.", step)
                self.reached_preemption = True
        return {key: path for key, path in saved.items() if path is not None}

    def _preemption_due(self, step: int) -> bool:
        if self.reached_preemption:
            return False
        if self._multihost:
            # Every process gets the same answer for the same step.
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError as e:  # jax.distributed without its preemption service
                logger.warning(
                    "JAX's preemption sync point is unavailable (%s); watching SIGTERM", e
                )
                self._multihost = False
                _watch_sigterm()
        return _SIGTERM_RECEIVED.is_set()

    # ----------------------------------------------------------------- saving

    def save_checkpoint(
        self,
        train_state: Any,
        step: int | None = None,
        metrics: dict[str, float] | None = None,
        is_best: bool = False,
        suffix: str | None = None,
    ) -> str | None:
        """Save ``train_state`` as one checkpoint and commit it.

        **Arguments:**

        - `train_state`: the pytree to save (arrays, scalars, dicts, lists, tuples,
          NamedTuples, registered pytree nodes).
        - `step`: the step; ``None`` takes ``train_state.step``.
        - `metrics`: scalar metrics stored with the checkpoint.
        - `is_best`: save as ``state_best``.
        - `suffix`: save as ``state_<suffix>`` (wins over ``is_best``).

        **Returns:** the checkpoint's path once it is durable and committed, or
        ``None`` when storage failed (the cause is logged on logger ``"learnax"``;
        every earlier checkpoint stays intact).

        Raises ``TypeError`` / ``ValueError`` at once, before writing anything, for an
        unsupported leaf (naming its tree path), a bad step or an unsafe suffix.

        **Example:**

        ```python
        path = ckpt.save_checkpoint(state, step=1000, metrics={"val/loss": 0.31})
        ```
        """
        step = self._resolve_step(train_state, step)
        encoded = _format.encode_metrics(metrics)
        name = _PREFIX + _checked_suffix(suffix, saving=True) if suffix is not None else None
        if name == _PREFIX + "best" or (name is None and is_best):
            write = self._best_record(metrics, encoded, step)
        elif name is not None:
            write = _Write("", name, encoded)
        else:
            write = _Write("", f"{_PREFIX}{step}", encoded, retention=True)
        self._finish_in_flight()
        return self._save_all(train_state, step, [write])[write.key]

    def _best_record(self, metrics: Any, encoded: dict[str, Any], step: int) -> _Write:
        """A best checkpoint saved by hand: when its metrics hold ``metric_name``, that
        value becomes the best (now and after a restart), like update_best_checkpoint."""
        value = metrics.get(self.metric_name) if isinstance(metrics, dict) else None
        if value is None:
            return _Write("best", _PREFIX + "best", encoded)
        value = self._agreed(_metric_float(value, self.metric_name), step)
        return self._best_write_of(value, encoded)

    def save_latest(
        self, train_state: Any, step: int | None = None, metrics: dict[str, float] | None = None
    ) -> str | None:
        """Save the rolling ``latest`` checkpoint (``save_checkpoint(..., suffix="latest")``).

        **Arguments:** `train_state`, `step` and `metrics` as in :meth:`save_checkpoint`.

        **Returns:** its path, or ``None`` when storage failed.

        **Example:** `ckpt.save_latest(state, step)`
        """
        return self.save_checkpoint(train_state, step, metrics, suffix="latest")

    def update_best_checkpoint(
        self, train_state: Any, metric_value: float, step: int | None = None
    ) -> bool:
        """Save ``state_best`` if ``metric_value`` is strictly better than the best so far.

        NaN is never better. ``best_metric_value`` changes only once the save succeeded
        (with ``async_save``, once it is committed in the background).

        **Arguments:**

        - `train_state`: the pytree to save.
        - `metric_value`: the value of ``metric_name`` for this state.
        - `step`: the step; ``None`` takes ``train_state.step``.

        **Returns:** ``True`` when a new best checkpoint was saved (with ``async_save``:
        scheduled).

        **Example:** `ckpt.update_best_checkpoint(state, val_loss, step)`
        """
        step = self._resolve_step(train_state, step)
        best = self._best_write(metric_value, None, step)
        if best is None:
            return False
        self._finish_in_flight()
        return self._save_all(train_state, step, [best]).get("best") is not None

    def _best_write(
        self, metric_value: Any, metrics: dict[str, Any] | None, step: int
    ) -> _Write | None:
        """The write of ``state_best`` if ``metric_value`` beats the best so far."""
        if not self.keep_best:
            return None
        value = self._agreed(_metric_float(metric_value, self.metric_name), step)
        best = self._pending_best if self._pending_best is not None else self.best_metric_value
        if math.isnan(value) or not (value < best if self.minimize_metric else value > best):
            return None
        return self._best_write_of(value, metrics)

    def _agreed(self, value: float, step: int) -> float:
        """On multi-host runs, process 0's metric value, so that every process makes the
        same best-checkpoint decision (and so the same calls); NaN when the processes
        cannot agree in time, which is never better."""
        if self._coord is None:
            return value
        try:
            key = self._coord.new_key(f"metric/{step}")
            agreed = self._coord.broadcast(key, _tree.encode_float(value))
        except PeerError as e:
            logger.error("Cannot agree on the metric %r: %s", self.metric_name, e)
            return math.nan
        return _tree.decode_float(agreed, "the metric of process 0")

    def _best_write_of(self, value: float, metrics: dict[str, Any] | None) -> _Write:
        extra = {
            "best": {
                "metric": self.metric_name,
                "value": _tree.encode_float(value),
                "minimize": self.minimize_metric,
            }
        }
        metrics = metrics or {self.metric_name: _tree.encode_float(value)}
        return _Write("best", _PREFIX + "best", metrics, extra=extra, best_value=value)

    @gc_paused()
    def _save_all(self, train_state: Any, step: int, writes: list[_Write]) -> dict[str, str | None]:
        """Write each of ``writes`` from one snapshot of ``train_state``: now, or with
        ``async_save`` in the background. Returns the path of each by its key (``None``
        for a failed synchronous write)."""
        if not writes:
            return {}
        # The default prepare_fn, jax.device_get, is done leaf by leaf while writing:
        # the same result without a second copy of the whole state in host memory.
        state = train_state if self._default_prepare else self.prepare_fn(train_state)
        tree, leaves = _tree.encode_tree(state)
        if self._coord is not None:
            for w in writes:
                w.exchange = self._coord.new_key(f"save/{w.name}/{step}")
        if not self.async_save or self._closed:
            return {w.key: self._write(w, tree, leaves, step) for w in writes}
        _snapshot(leaves)
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="learnax-save")
            _PENDING_AT_EXIT.add(self)
        self._in_flight = self._worker.submit(self._write_in_background, tree, leaves, step, writes)
        self._pending_best = next((w.best_value for w in writes if w.best_value is not None), None)
        return {w.key: self._storage.join(self.checkpoint_dir, w.name) for w in writes}

    def _write(self, write: _Write, tree: Any, leaves: list[Any], step: int) -> str | None:
        """Write and commit one checkpoint; on an I/O failure log it and return None."""
        directory = self._storage.join(self.checkpoint_dir, write.name)
        try:
            if self._coord is not None:
                self._write_multihost(write, directory, tree, leaves, step)
            else:
                with self._storage.lock(self.checkpoint_dir):
                    _format.write_checkpoint(
                        self._storage,
                        directory,
                        tree=tree,
                        leaves=leaves,
                        step=step,
                        metrics=write.metrics,
                        extra=write.extra,
                    )
        except OSError as e:
            logger.error(
                "Saving checkpoint %s (step %d) failed: %s. Earlier checkpoints are intact.",
                directory,
                step,
                e,
            )
            write.error = e
            if isinstance(e, _format.VisibleNotDurableError) and write.best_value is not None:
                # state_best is the new one now: never let a worse value replace it.
                self.best_metric_value = write.best_value
            return None
        logger.debug("Saved checkpoint %s (step %d)", directory, step)
        if write.best_value is not None:
            self.best_metric_value = write.best_value
        if write.retention and self._coord is None:
            self._apply_retention()
        return directory

    def _write_multihost(
        self, write: _Write, directory: str, tree: Any, leaves: list[Any], step: int
    ) -> None:
        """Every process writes its shards to its own data files; process 0 gathers the
        parts, commits the manifest, then tells the others the outcome (and applies
        retention). Raises ``OSError`` on every process when any part failed."""
        coord = self._coord
        assert coord is not None
        if not coord.leader:
            part = self._write_own_part(write, directory, leaves, step)
            outcome = coord.wait_outcome(write.exchange)
            if "error" in outcome:
                if isinstance(part, _format.Part) and not outcome.get("visible"):
                    _format.remove_files(self._storage, directory, part.files)
                error = _format.VisibleNotDurableError if outcome.get("visible") else PeerError
                raise error(outcome["error"])
            return
        outcome: dict[str, Any] = {"error": "process 0 failed (see its log)"}
        part = None
        try:
            # The run's lock (local disks) from before process 0 writes until the
            # commit, so that no other job's start-up cleanup takes the new files.
            with self._storage.lock(self.checkpoint_dir):
                part = self._write_own_part(write, directory, leaves, step)
                if isinstance(part, str):
                    raise PeerError(json.loads(part)["error"])
                mine = json.dumps({"name": write.name, "step": step, "part": part.to_json()})
                received = [json.loads(v) for v in coord.gather(write.exchange, mine)]
                self._commit_parts(write, directory, tree, leaves, step, received)
            outcome = {}
            if not self._cleaned:
                # Now no process of this job writes (the others wait for the outcome).
                self._clean_leftovers()
                self._cleaned = True
        except _format.VisibleNotDurableError as e:
            outcome = {"error": f"process 0: {e}", "visible": True}
            raise
        except BaseException as e:
            if outcome:  # not committed
                outcome = {"error": f"process 0: {e}"}
                if isinstance(part, _format.Part):
                    _format.remove_files(self._storage, directory, part.files)
            raise
        finally:
            coord.publish_outcome(write.exchange, outcome)
        if write.retention:
            self._apply_retention()

    def _write_own_part(
        self, write: _Write, directory: str, leaves: list[Any], step: int
    ) -> _format.Part | str:
        """This process's data files; on process 1+ also sent to process 0. Returns the
        part, or on an I/O failure the message sent instead."""
        coord = self._coord
        assert coord is not None
        try:
            self._storage.makedirs(directory)
            tensors = _format.tensors_of_process(leaves, coord.process)
            prefix = f"{secrets.token_hex(8)}-p{coord.process}"
            part: _format.Part | str = _format.write_part(self._storage, directory, tensors, prefix)
            message = json.dumps({"name": write.name, "step": step, "part": part.to_json()})
        except OSError as e:
            part = message = json.dumps({"error": f"process {coord.process}: {e}"})
        if not coord.leader:
            coord.send(write.exchange, message)
        return part

    def _commit_parts(
        self,
        write: _Write,
        directory: str,
        tree: Any,
        leaves: list[Any],
        step: int,
        received: list[dict[str, Any]],
    ) -> None:
        """On process 0: check what every process wrote and commit it as one checkpoint.
        Raises ``OSError`` (``PeerError`` for a bad or missing part)."""
        errors = [r["error"] for r in received if "error" in r]
        if errors:
            raise PeerError("; ".join(errors))
        for process, r in enumerate(received):
            if (r["name"], r["step"]) != (write.name, step):
                raise PeerError(
                    f"process {process} saved {r['name']} at step {r['step']} while "
                    f"process 0 saved {write.name} at step {step}: every process must "
                    "make the same calls"
                )
        try:
            parts = [_format.Part.from_json(r["part"]) for r in received]
            merged = _format.merge_parts(parts, leaves, directory)
        except ValueError as e:
            raise PeerError(str(e)) from None
        for name, info in merged.files.items():
            # Every file must be there: a run directory on each host's own disk, or
            # another job's cleanup, would otherwise commit a checkpoint with holes.
            path = self._storage.join(directory, name)
            if not (self._storage.isfile(path) and self._storage.size(path) == info["bytes"]):
                raise PeerError(
                    f"process {info['process']}'s data file {path} is not visible to "
                    "process 0: on a multi-host run the registry must be storage that "
                    "every host shares (an object store or a shared filesystem)"
                )
        body = _format.manifest_body(tree, merged, step, write.metrics, write.extra)
        self._coord.check_not_abandoned(write.exchange)
        _format.commit(self._storage, directory, _format.manifest_bytes(body), set(merged.files))

    def _write_in_background(
        self, tree: Any, leaves: list[Any], step: int, writes: list[_Write]
    ) -> None:
        failed = []
        for write in writes:
            try:
                if self._write(write, tree, leaves, step) is None:
                    failed.append(write)
            except BaseException as e:  # a bug, not I/O: still reported to the caller
                logger.exception("Background save of %s failed", write.name)
                write.error = e
                failed.append(write)
        if failed:
            names = ", ".join(w.name for w in failed)
            raise CheckpointSaveError(
                f"Background save of {names} (step {step}) in {self.checkpoint_dir} failed: "
                f"{failed[0].error}. Earlier checkpoints are intact."
            ) from failed[0].error

    def _finish_in_flight(self) -> None:
        """Wait for the save in flight; raise its failure (once) if it failed."""
        future, self._in_flight, self._pending_best = self._in_flight, None, None
        if future is not None:
            future.result()

    def wait_until_finished(self) -> None:
        """Block until the save in flight (``async_save=True``) is committed.

        Raises :class:`CheckpointSaveError` if it failed. Returns at once when nothing
        is in flight, and always in synchronous mode.

        **Arguments:** none. **Returns:** ``None``.

        **Example:**

        ```python
        ckpt.save_checkpoint(state, step)   # returns after the snapshot
        ckpt.wait_until_finished()          # now it is durable on storage
        ```
        """
        self._finish_in_flight()

    def close(self) -> None:
        """Finish the save in flight and stop the background thread.

        Raises :class:`CheckpointSaveError` if that save failed. Calling it again does
        nothing; saves after ``close()`` are synchronous. ``with Checkpointer(...) as
        ckpt:`` closes at the end of the block.

        **Arguments:** none. **Returns:** ``None``.

        **Example:** `ckpt.close()`
        """
        self._closed = True
        try:
            self._finish_in_flight()
        finally:
            worker, self._worker = self._worker, None
            if worker is not None:
                worker.shutdown(wait=True)
            _PENDING_AT_EXIT.discard(self)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _resolve_step(self, train_state: Any, step: Any) -> int:
        if step is None:
            step = getattr(train_state, "step", None)
            if step is None and isinstance(train_state, dict):
                step = train_state.get("step")
            if step is None:
                raise ValueError(
                    "No step given and the train state has no 'step' field; pass step=."
                )
        return _as_step(step)

    # ----------------------------------------------------------------- retention

    def _apply_retention(self) -> None:
        # After a commit: a failure here is logged, never a failed save.
        try:
            steps = self._numbered_steps() if self.max_to_keep is not None else []
        except OSError as e:
            logger.warning("Could not list %s to apply retention: %s", self.checkpoint_dir, e)
            return
        for step in retention_victims(steps, self.max_to_keep, self.keep_period):
            self._delete(f"{_PREFIX}{step}")

    def _delete(self, name: str) -> None:
        delete_checkpoint(self._storage, self.checkpoint_dir, name)

    # ----------------------------------------------------------------- listing

    def _committed(self, name: str) -> bool:
        return self._storage.isfile(self._storage.join(self.checkpoint_dir, name, _format.MANIFEST))

    def _numbered_steps(self) -> list[int]:
        return [
            int(entry[len(_PREFIX) :])
            for entry in self._storage.listdir(self.checkpoint_dir)
            if entry.startswith(_PREFIX)
            and entry[len(_PREFIX) :].isdigit()
            and self._committed(entry)
        ]

    def list_available_checkpoints(self) -> dict[str, str]:
        """The committed checkpoints of this run.

        **Arguments:** none.

        **Returns:** a dict mapping ``"latest"``, ``"best"``, one ``"step_<N>"`` per
        numbered checkpoint (ascending step) and any other ``suffix`` name to its path.
        A half-written checkpoint is never listed.

        **Example:**

        ```python
        >>> ckpt.list_available_checkpoints()
        {'latest': 'runs/mlp/checkpoints/state_latest', 'step_1000': '.../state_1000'}
        ```
        """
        entries = sorted(self._storage.listdir(self.checkpoint_dir))
        committed = [
            e[len(_PREFIX) :] for e in entries if e.startswith(_PREFIX) and self._committed(e)
        ]
        found: dict[str, str] = {}
        for key in ("latest", "best"):
            if key in committed:
                found[key] = self._storage.join(self.checkpoint_dir, _PREFIX + key)
        for step in sorted(int(c) for c in committed if c.isdigit()):
            found[f"step_{step}"] = self._storage.join(self.checkpoint_dir, f"{_PREFIX}{step}")
        for other in committed:
            if other not in ("latest", "best") and not other.isdigit():
                found[other] = self._storage.join(self.checkpoint_dir, _PREFIX + other)
        return found

    # ----------------------------------------------------------------- loading

    def load_checkpoint(
        self, path_or_index: str | int, *, target: Any = None, allow_pickle: bool = False
    ) -> dict[str, Any] | None:
        """Load one checkpoint.

        **Arguments:**

        - `path_or_index`: an ``int`` is a step (``-1``: as :meth:`load_latest`); a
          ``str`` is a name (``"latest"``, ``"best"``, ``"1000"``) or the path of a
          checkpoint directory.
        - `target`: optional pytree (arrays or ``jax.ShapeDtypeStruct``, with or
          without shardings) to restore into: the state comes back in its types and
          structure, arrays on its shardings. It may be a part of the saved tree.
        - `allow_pickle`: allow loading a legacy ``.pyd`` pickle (runs code from it).

        **Returns:** ``{"state", "step", "time", "metrics"}``, or ``None`` when there is
        no such checkpoint. Raises :class:`CheckpointCorruptedError` when it fails
        verification, ``ValueError`` naming the leaf when it does not fit ``target``.

        **Example:**

        ```python
        ckpt_1000 = ckpt.load_checkpoint(1000)
        params = ckpt.load_checkpoint("best", target={"params": params})["state"]
        ```
        """
        if isinstance(path_or_index, (bool, np.bool_)):
            raise TypeError("path_or_index must be a step (int) or a name/path (str), not a bool")
        if isinstance(path_or_index, (int, np.integer)):
            return self._load_step(int(path_or_index), target, allow_pickle)
        if not isinstance(path_or_index, (str, os.PathLike)):
            raise TypeError(
                f"path_or_index must be an int or a str, got {type(path_or_index).__name__}"
            )
        text = os.fspath(path_or_index)
        if "/" in text or os.sep in text:
            return self._load_path(text, target, allow_pickle)
        if text.endswith(_legacy.SUFFIX):  # a legacy file of this run, by its name
            text = text[: -len(_legacy.SUFFIX)]
        name = text[len(_PREFIX) :] if text.startswith(_PREFIX) else text
        if (
            name.startswith("step_") and name[len("step_") :].isdigit()
        ):  # a key of list_available_checkpoints()
            name = name[len("step_") :]
        return self._load_path(
            self._storage.join(self.checkpoint_dir, _PREFIX + _checked_suffix(name)),
            target,
            allow_pickle,
        )

    def load_latest(
        self, *, target: Any = None, allow_pickle: bool = False
    ) -> dict[str, Any] | None:
        """Load the newest checkpoint: the highest step among ``latest`` and the
        numbered ones. One that fails verification is skipped with a warning and the
        next newest is returned.

        **Arguments:** `target` and `allow_pickle` as in :meth:`load_checkpoint`.

        **Returns:** ``{"state", "step", "time", "metrics"}``, or ``None`` when the run
        has no checkpoint.

        **Example:**

        ```python
        restored = ckpt.load_latest(target=state)
        start = 0 if restored is None else restored["step"] + 1
        ```
        """
        candidates: list[tuple[float, str]] = [(s, f"{_PREFIX}{s}") for s in self._numbered_steps()]
        if self._committed(_PREFIX + "latest"):
            try:
                step = self._manifest(_PREFIX + "latest")["step"]
            except CheckpointCorruptedError:
                step = math.inf  # try it first, so that the damage is reported
            candidates.append((step, _PREFIX + "latest"))
        # On equal steps prefer "latest" (listed last, sorted stably in reverse).
        for _, name in sorted(candidates, key=lambda c: c[0], reverse=True):
            directory = self._storage.join(self.checkpoint_dir, name)
            try:
                loaded = self._load_dir(directory, target)
            except CheckpointCorruptedError as e:
                message = f"Skipping damaged checkpoint {directory}: {e}"
                logger.warning(message)
                warnings.warn(message, stacklevel=2)
                continue
            if loaded is not None:
                return loaded
        return self._load_legacy_latest(allow_pickle)

    def load_best(self, *, target: Any = None, allow_pickle: bool = False) -> dict[str, Any] | None:
        """Load ``state_best``.

        **Arguments:** `target` and `allow_pickle` as in :meth:`load_checkpoint`.

        **Returns:** ``{"state", "step", "time", "metrics"}``, or ``None`` when there is
        no best checkpoint.

        **Example:** `best_params = ckpt.load_best(target={"params": params})["state"]`
        """
        return self.load_checkpoint("best", target=target, allow_pickle=allow_pickle)

    def _load_step(self, step: int, target: Any, allow_pickle: bool) -> dict[str, Any] | None:
        if step == -1:
            return self.load_latest(target=target, allow_pickle=allow_pickle)
        if step < 0:
            raise ValueError(f"Step must be >= 0 (or -1 for the latest), got {step}")
        if self._committed(f"{_PREFIX}{step}"):
            return self._load_dir(
                self._storage.join(self.checkpoint_dir, f"{_PREFIX}{step}"), target
            )
        for name in (_PREFIX + "latest", _PREFIX + "best"):
            try:
                found = self._committed(name) and self._manifest(name)["step"] == step
            except CheckpointCorruptedError:  # not this one, whatever its step was
                found = False
            if found:
                return self._load_dir(self._storage.join(self.checkpoint_dir, name), target)
        return self._load_path(
            self._storage.join(self.checkpoint_dir, f"{_PREFIX}{step}"), target, allow_pickle
        )

    def _load_path(self, path: str, target: Any, allow_pickle: bool) -> dict[str, Any] | None:
        legacy = path if path.endswith(_legacy.SUFFIX) else path + _legacy.SUFFIX
        if not self._storage.isdir(path) and self._storage.isfile(legacy):
            return _legacy.load_legacy(self._storage, legacy, allow_pickle)
        return self._load_dir(path, target)

    @gc_paused()
    def _load_dir(self, directory: str, target: Any) -> dict[str, Any] | None:
        # A concurrent save may replace the manifest and delete the data files between
        # our reads; then the new manifest is read again.
        try:
            return _format.read_consistent(
                self._storage, directory, lambda manifest: self._read(directory, manifest, target)
            )
        except FileNotFoundError:
            return None

    def _read(self, directory: str, manifest: dict[str, Any], target: Any) -> dict[str, Any]:
        reader = _format.CheckpointReader(self._storage, directory, manifest)

        def read_nodes(nodes: list[Any]) -> list[Any]:
            reader.prefetch([name for node in nodes for name in _tree.array_names(node)])
            return [_tree.decode_tree(node, reader.array) for node in nodes]

        try:
            if target is None:
                state = read_nodes([manifest["tree"]])[0]
            else:
                state = restore_into_target(manifest["tree"], target, read_nodes, reader)
        except (_tree.MalformedTreeError, RecursionError) as e:
            raise CheckpointCorruptedError(
                f"{self._storage.join(directory, _format.MANIFEST)}: invalid tree: {e}"
            ) from None
        return {
            "state": state,
            "step": manifest["step"],
            "time": manifest["time"],
            "metrics": _format.decode_metrics(manifest["metrics"], directory),
        }

    def _manifest(self, name: str) -> dict[str, Any]:
        return _format.read_manifest(self._storage, self._storage.join(self.checkpoint_dir, name))

    def _load_legacy_latest(self, allow_pickle: bool) -> dict[str, Any] | None:
        legacy = [
            e
            for e in self._storage.listdir(self.checkpoint_dir)
            if e.startswith(_PREFIX)
            and e.endswith(_legacy.SUFFIX)
            and e != f"{_PREFIX}best{_legacy.SUFFIX}"
        ]
        if not legacy:
            return None
        if not allow_pickle:
            raise LegacyPickleError(
                f"{self.checkpoint_dir} holds only pickle checkpoints of the original learnax "
                f"({', '.join(sorted(legacy))}). Loading them would run code from the files; "
                "if you trust them, pass allow_pickle=True."
            )
        # Unpickle as little as possible: the highest numbered file, and latest (whose
        # step only the file itself knows).
        numbered = max(
            (e for e in legacy if _legacy.legacy_step(e) >= 0),
            key=_legacy.legacy_step,
            default=None,
        )
        latest = f"{_PREFIX}latest{_legacy.SUFFIX}"
        chosen = [e for e in (numbered, latest) if e is not None and e in legacy]
        if not chosen:  # only other suffixes
            chosen = sorted(legacy)[-1:]
        loaded = [
            _legacy.load_legacy(self._storage, self._storage.join(self.checkpoint_dir, e), True)
            for e in chosen
        ]
        return max(loaded, key=lambda c: -1 if c["step"] is None else c["step"])

    # ----------------------------------------------------------------- start-up

    def _clean_leftovers(self) -> None:
        """Remove what interrupted saves and deletions left behind: directories without
        a manifest, data files no manifest refers to, temporary manifests. Skipped while
        another process is saving to this run (it holds the lock)."""
        with self._storage.lock(self.checkpoint_dir, blocking=False) as locked:
            if not locked:
                return
            for entry in self._storage.listdir(self.checkpoint_dir):
                directory = self._storage.join(self.checkpoint_dir, entry)
                if not entry.startswith(_PREFIX) or not self._storage.isdir(directory):
                    continue
                try:
                    self._clean_checkpoint_dir(entry, directory)
                except OSError as e:
                    logger.warning("Could not clean up leftovers in %s: %s", directory, e)

    def _clean_checkpoint_dir(self, entry: str, directory: str) -> None:
        if not self._committed(entry):
            if self._storage.unused(directory):
                logger.info(
                    "Removing incomplete checkpoint %s (an interrupted save or deletion)",
                    directory,
                )
                self._storage.rmtree(directory)
            return
        try:
            keep = set(self._manifest(entry)["files"])
        except CheckpointCorruptedError:
            # Damaged: keep its files for inspection; load_latest skips it.
            keep = {f for f in self._storage.listdir(directory) if not f.endswith(".tmp")}
        for name in self._storage.listdir(directory):
            path = self._storage.join(directory, name)
            if name != _format.MANIFEST and name not in keep and self._storage.unused(path):
                logger.info("Removing leftover file %s", path)
                self._storage.remove(path)

    def _restore_best_metric_value(self) -> None:
        if not self._committed(_PREFIX + "best"):
            return
        try:
            manifest = self._manifest(_PREFIX + "best")
        except CheckpointCorruptedError as e:
            logger.warning("Cannot read the best metric of this run: %s", e)
            return
        best = manifest.get("best")
        if not isinstance(best, dict):
            # Saved with save_checkpoint(is_best=True): its metrics are all we have.
            value = manifest["metrics"].get(self.metric_name)
            if value is None:
                return
            best = {"metric": self.metric_name, "minimize": self.minimize_metric, "value": value}
        if best.get("metric") != self.metric_name or best.get("minimize") != self.minimize_metric:
            logger.warning(
                "The best checkpoint of this run was chosen by %r (minimize=%s), not %r "
                "(minimize=%s); its value is not carried over.",
                best.get("metric"),
                best.get("minimize"),
                self.metric_name,
                self.minimize_metric,
            )
            return
        try:
            self.best_metric_value = _tree.decode_float(best.get("value"), "best metric")
        except ValueError:
            logger.warning("The best checkpoint of this run has an unreadable metric value")

    def __repr__(self) -> str:
        return f"Checkpointer({self.checkpoint_dir!r})"


def delete_checkpoint(storage: Any, checkpoint_dir: str, name: str) -> bool:
    """Delete checkpoint ``name`` of a run, under the run's lock; ``False`` (logged)
    when it failed. Removing the manifest first makes the deletion atomic for readers:
    a crash halfway leaves a directory without manifest, a leftover, never a
    checkpoint with missing files."""
    directory = storage.join(checkpoint_dir, name)
    try:
        with storage.lock(checkpoint_dir):
            storage.remove(storage.join(directory, _format.MANIFEST))
            storage.fsync_dir(directory)
            storage.rmtree(directory)
    except OSError as e:
        logger.warning("Could not delete old checkpoint %s: %s", directory, e)
        return False
    logger.debug("Deleted old checkpoint %s", directory)
    return True


def retention_victims(
    steps: list[int], max_to_keep: int | None, keep_period: int | None
) -> list[int]:
    """The numbered steps that retention deletes: all but the newest ``max_to_keep``,
    never a multiple of ``keep_period`` (those do not count toward ``max_to_keep``)."""
    if max_to_keep is None:
        return []
    counted = sorted(s for s in steps if not (keep_period and s % keep_period == 0))
    return counted[: max(len(counted) - max_to_keep, 0)]


# --------------------------------------------------------------------------- checks


def _interval(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (0 or None: never), got {value}")
    return int(value) or None


def _max_to_keep(value: Any) -> int | None:
    if value is None or value == math.inf:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"max_to_keep must be a positive int, None or inf, got {value!r}")
    if value < 1:
        raise ValueError(
            f"max_to_keep must be >= 1 (None or inf: keep all), got {value}; to save no "
            "numbered checkpoints, pass checkpoint_every=None"
        )
    return int(value)


def _as_step(step: Any) -> int:
    if type(step) is int:  # the per-step fast path
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return step
    if isinstance(step, (bool, np.bool_)) or not (
        isinstance(step, (int, np.integer))
        or (
            isinstance(step, (np.ndarray, jax.Array))
            and step.shape == ()
            and np.issubdtype(step.dtype, np.integer)
        )
    ):
        raise TypeError(f"step must be an integer, got {step!r}")
    return _as_step(int(step))


def _metric_float(value: Any, name: str) -> float:
    value = _format.python_scalar(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            pass
    raise TypeError(f"Metric {name!r} must be a real scalar number to compare, got {value!r:.80}")


def _checked_suffix(suffix: Any, *, saving: bool = False) -> str:
    if not isinstance(suffix, str) or not _NAME.match(suffix) or ".." in suffix:
        raise ValueError(
            f"Checkpoint name {suffix!r} is not safe: use letters, digits, '_', '-' and '.' "
            "(not starting with '.', no '..', at most 128 characters)"
        )
    if saving and (suffix.isdigit() or suffix.startswith("step_")):
        raise ValueError(
            f"Suffix {suffix!r} would pass for a numbered checkpoint: to save one, pass "
            "step= without a suffix."
        )
    return suffix
