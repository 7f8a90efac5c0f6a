"""The facade users code against: :class:`Checkpointer`, the seed API of a training
run's checkpoints. Each public method checks its arguments and hands the work to the
room that owns it: the save policy (``_policy``), the run directory (``_run``), saving
and committing (``_save``, ``_multihost``), background saves (``_background``),
preemption (``_preemption``), the metric history (``_history``) and reading
(``_read``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax

from . import _legacy, _policy
from ._background import BackgroundSaves, snapshot
from ._best import BestTracker
from ._errors import CheckpointCorruptedError, CheckpointSaveError, RunIdWarning
from ._history import HistoryWriter, read_history
from ._metrics import encode_metrics
from ._multihost import Coordinator, is_multihost
from ._preemption import PreemptionWatch
from ._read import LoadedCheckpoint, read_checkpoint
from ._run import BEST, LATEST, RunDirectory, check_run_id, check_suffix, checkpoint_key
from ._run import checkpoint_name as _name
from ._save import PlannedWrite, Saver
from ._storage import NOT_WRITABLE_ERRNOS, Storage, open_storage
from ._threads import gc_paused
from ._top_k import TopK
from ._tree_cache import TreeCache

logger = logging.getLogger("learnax")

_RELISTS = 3


def _make_checkpoint_dir(storage: Storage, path: str, registry: str) -> None:
    """Create the run's checkpoint directory. On a read-only registry (an evaluation job
    on a frozen copy) only warn: it still lists and loads. Anything else (a path
    through a file, say) is refused at once rather than failing every later save."""
    try:
        storage.makedirs(path)
    except (FileExistsError, NotADirectoryError):
        raise NotADirectoryError(_through_a_file(storage, path, registry)) from None
    except OSError as e:
        if e.errno not in NOT_WRITABLE_ERRNOS:
            raise
        logger.warning("Cannot create %s (%s): saves will fail", path, e)


def _through_a_file(storage: Storage, path: str, registry: str) -> str:
    """The error when the checkpoint directory ``path`` cannot be made because a file is
    where it or one of its parents would be."""
    blocker = path
    while storage.kind(blocker) is None and storage.dirname(blocker) not in ("", blocker):
        blocker = storage.dirname(blocker)
    if blocker.rstrip("/") == registry.rstrip("/"):
        return (
            f"registry_path {registry!r} is a file: it must be a directory (or not exist "
            "yet). Pass the directory that holds your runs."
        )
    return (
        f"Cannot create the checkpoint directory {path}: {blocker} is a file, not a "
        f"directory. registry_path ({registry!r}) must be a directory whose runs are "
        "directories; move the file away or pick another registry_path or run_id."
    )


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
    - `keep_top_k`: also keep the ``keep_top_k`` numbered checkpoints with the best
      ``metric_name`` (as stored with each; NaN or no value never ranks), and save a
      numbered checkpoint at any step whose reported metric ranks among them, due or
      not. With it, ``max_to_keep`` counts the newest kept besides them, and ``None``
      keeps no others: ``keep_top_k=3`` alone keeps the 3 best (plus ``latest``, and
      ``state_best`` with ``keep_best``). See the saving guide.
    - `save_on_preemption`: after a SIGTERM, the next :meth:`maybe_save_checkpoints`
      saves ``latest`` whatever the interval, waits until it is committed, and sets
      ``reached_preemption`` so that the loop can stop. A SIGTERM no longer kills the
      process at once; a handler the program installed before is still called, and is
      put back by :meth:`close` of the last Checkpointer watching SIGTERM. On
      multi-host runs all processes agree on the step through JAX's preemption sync
      point.
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
        keep_top_k: int | None = None,
        save_on_preemption: bool = False,
        storage_options: dict[str, Any] | None = None,
        multihost_timeout: float = 600.0,
    ) -> None:
        registry_path = os.fspath(registry_path)
        self.run_id = check_run_id(run_id)
        multihost_timeout = _policy.check_timeout(multihost_timeout, "multihost_timeout")
        self._storage, base = open_storage(registry_path, storage_options)
        self.registry_path = registry_path
        self.checkpoint_dir = self._storage.join(base, run_id, "checkpoints")
        self.save_every = _policy.check_interval(save_every, "save_every")
        self.checkpoint_every = _policy.check_interval(checkpoint_every, "checkpoint_every")
        self.max_to_keep = _policy.check_max_to_keep(max_to_keep)
        self.prepare_fn = prepare_fn if prepare_fn is not None else jax.device_get
        self._default_prepare = prepare_fn is None
        self.async_save = bool(async_save)
        self.keep_period = _policy.check_interval(keep_period, "keep_period")
        self.save_on_preemption = bool(save_on_preemption)
        self.reached_preemption = False
        self._preemption: PreemptionWatch | None = None  # watching starts last, below
        self._background = BackgroundSaves()
        self._tree_cache = TreeCache()
        self._closed = False
        self._mistyped_checked = False  # the RunIdWarning check is made once at most
        # Multi-host: process 0 commits, cleans up and applies retention; the others
        # write their shards and wait for its word.
        self._coord = Coordinator(run_id, multihost_timeout) if is_multihost() else None
        self._run = RunDirectory(self._storage, self.checkpoint_dir)
        self._best = BestTracker(
            self._run,
            self._coord,
            keep_best=bool(keep_best),
            metric_name=metric_name,
            minimize=bool(minimize_metric),
        )
        k = _policy.check_top_k(keep_top_k, metric_name)
        self._top_k = TopK(self._run, self._coord, k=k, metric_name=metric_name) if k else None
        # The run's metric history, written by process 0 alone.
        self._history = HistoryWriter(
            self._storage,
            self._storage.join(base, run_id),
            enabled=self._coord is None or self._coord.leader,
        )
        self._saver = Saver(
            self._run,
            self._coord,
            on_best=self._best.committed,
            retain=self._retain,
            on_commit=self._record_commit,
        )
        _make_checkpoint_dir(self._storage, self.checkpoint_dir, base)
        # Nothing is cleaned up here: a Checkpointer may be an evaluation job's reader
        # while training saves. The writer removes leftovers after its first commit.
        self._best.restore()
        # Last, so that a constructor that raises never leaves SIGTERM caught for good.
        if self.save_on_preemption:
            self._preemption = PreemptionWatch()

    # The best-by-metric settings and value live in the tracker; these read and set them.
    keep_best = property(
        lambda self: self._best.keep_best,
        lambda self, value: setattr(self._best, "keep_best", bool(value)),
        doc="Whether ``state_best`` is kept.",
    )
    metric_name = property(
        lambda self: self._best.metric_name,
        lambda self, value: self._set_metric_name(value),
        doc="The key in ``metrics`` that decides the best checkpoint (and the k best).",
    )
    minimize_metric = property(
        lambda self: self._best.minimize,
        lambda self, value: setattr(self._best, "minimize", bool(value)),
        doc="Whether a lower value of ``metric_name`` is better.",
    )
    keep_top_k = property(
        lambda self: None if self._top_k is None else self._top_k.k,
        doc="How many of the best numbered checkpoints are kept (``None``: no ranking).",
    )
    best_metric_value = property(
        lambda self: self._best.value,
        lambda self, value: setattr(self._best, "value", value),
        doc="The best value of ``metric_name`` committed so far (``inf`` / ``-inf`` at "
        "first); ``OSError`` while the stored one cannot be read.",
    )

    def _set_metric_name(self, value: str) -> None:
        self._best.metric_name = value
        if self._top_k is not None:
            self._top_k.metric_name = value

    # ----------------------------------------------------------------- policy

    def should_save_latest(self, step: int) -> bool:
        """Whether ``step`` is due for the rolling ``latest`` checkpoint.

        **Arguments:** `step`: the current training step.

        **Returns:** ``True`` when ``save_every`` is set and divides ``step``.

        **Example:** `Checkpointer("runs", "mlp", save_every=100).should_save_latest(300)  # True`
        """
        return _policy.is_due(_policy.as_step(step), self.save_every)

    def should_save_numbered(self, step: int) -> bool:
        """Whether ``step`` is due for a numbered checkpoint.

        **Arguments:** `step`: the current training step.

        **Returns:** ``True`` when ``checkpoint_every`` is set and divides ``step``.

        **Example:** `Checkpointer("runs", "mlp", checkpoint_every=1000).should_save_numbered(500)  # False`
        """
        return _policy.is_due(_policy.as_step(step), self.checkpoint_every)

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
        - `metrics`: scalar metrics to store with the checkpoint. Every metrics dict
          given, due or not, is also kept in the run's metric history (see
          :meth:`metric_history`).

        **Returns:** the paths saved, under the keys ``"latest"``, ``"numbered"`` and
        ``"best"`` (only those saved).

        **Example:**

        ```python
        saved = ckpt.maybe_save_checkpoints(state, step, {"val/loss": 0.3})
        if "best" in saved:
            print("new best at", saved["best"])
        ```
        """
        step = _policy.as_step(step)
        if metrics is not None:
            self._history.report(step, metrics)
        preempted = self._preemption is not None and self._preemption_due(step)
        writes = self._due_writes(step, metrics, preempted)
        if not writes:
            return {}
        self._finish_in_flight()
        saved = self._save_all(train_state, step, writes)
        if preempted:
            saved = self._after_preemption_save(step, saved)
        return {key: path for key, path in saved.items() if path is not None}

    def _due_writes(
        self, step: int, metrics: dict[str, Any] | None, preempted: bool
    ) -> list[PlannedWrite]:
        due_latest = preempted or _policy.is_due(step, self.save_every)
        due_numbered = _policy.is_due(step, self.checkpoint_every)
        due_best = self._best.keep_best and _policy.reports_metric(metrics, self.metric_name)
        ranked = self._top_k is not None and _policy.reports_metric(metrics, self.metric_name)
        if not (due_latest or due_numbered or due_best or ranked):
            return []  # the per-step fast path: nothing encoded, nothing touched
        if self._top_k is not None:
            due_numbered = self._numbered_due_ranked(step, metrics, due_numbered)
        encoded = encode_metrics(metrics)
        writes = []
        if due_latest:
            writes.append(PlannedWrite("latest", _name(LATEST), encoded))
        if due_numbered:
            writes.append(PlannedWrite("numbered", _name(step), encoded, retention=True))
        if due_best:
            assert metrics is not None
            # Decided against the best still being written, if any: a step that only
            # reports a metric that is not better never waits for a save in flight.
            best = self._best.write_if_better(metrics[self.metric_name], encoded, step)
            if best is not None:
                writes.append(best)
        return writes

    def _numbered_due_ranked(
        self, step: int, metrics: dict[str, Any] | None, periodic: bool
    ) -> bool:
        """With ``keep_top_k``: a numbered checkpoint at a periodic step that retention
        keeps, or at a step whose metric ranks among the k best."""
        assert self._top_k is not None
        if periodic and (
            _policy.keeps_newest(self.max_to_keep, self._top_k.k)
            or _policy.is_due(step, self.keep_period)
        ):
            return True
        return _policy.reports_metric(metrics, self.metric_name) and self._top_k.ranks(
            metrics[self.metric_name], step, self.minimize_metric
        )

    def _preemption_due(self, step: int) -> bool:
        assert self._preemption is not None
        return not self.reached_preemption and self._preemption.due(step)

    def _after_preemption_save(
        self, step: int, saved: dict[str, str | None]
    ) -> dict[str, str | None]:
        """Commit the preemption save now (the process is about to end) and set
        ``reached_preemption`` once latest is committed. A failed save, also one made in
        the background, is logged and tried again at the next step, never raised: the
        loop goes on until latest is saved. Returns what was saved."""
        try:
            self._finish_in_flight()
        except CheckpointSaveError as e:
            saved = {}
            logger.error("Preemption: %s", e)
        if saved.get("latest") is None:
            logger.error("Preemption: saving latest at step %d failed; retrying next step.", step)
        else:
            logger.warning("Preemption: saved latest at step %d; stop the training loop.", step)
            self.reached_preemption = True
        return saved

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
        - `metrics`: scalar metrics stored with the checkpoint (and kept in the run's
          metric history).
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
        step = _policy.step_of(train_state, step)
        encoded = encode_metrics(metrics)
        if metrics is not None:
            self._history.report(step, metrics)
        name = _name(check_suffix(suffix, saving=True)) if suffix is not None else None
        if name == _name(BEST) or (name is None and is_best):
            write = self._best.write_by_hand(metrics, encoded, step)
        elif name is not None:
            write = PlannedWrite("", name, encoded)
        else:
            write = PlannedWrite("", _name(step), encoded, retention=True)
        self._finish_in_flight()
        return self._save_all(train_state, step, [write])[write.key]

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
        step = _policy.step_of(train_state, step)
        best = self._best.write_if_better(metric_value, None, step)
        if best is None:
            return False
        self._finish_in_flight()
        return self._save_all(train_state, step, [best]).get("best") is not None

    @gc_paused()
    def _save_all(
        self, train_state: Any, step: int, writes: list[PlannedWrite]
    ) -> dict[str, str | None]:
        """Write each of ``writes`` from one snapshot of ``train_state``: now, or with
        ``async_save`` in the background. Returns the path of each by its key (``None``
        for a failed synchronous write)."""
        # The default prepare_fn, jax.device_get, is done leaf by leaf while writing:
        # the same result without a second copy of the whole state in host memory.
        state = train_state if self._default_prepare else self.prepare_fn(train_state)
        tree, leaves = self._tree_cache.encode(state)
        if self._coord is not None:
            for w in writes:
                w.exchange = self._coord.new_key(f"save/{w.name}/{step}")
        plan = self._saver.plan(leaves)
        in_background = self.async_save and not self._closed
        if self._top_k is not None:
            self._top_k.saving(step, writes, in_background)
        if not in_background:
            return self._saver.write_all(tree, leaves, step, writes, plan)
        snapshot(leaves, skip=plan.not_read)
        self._background.submit(self._saver.write_in_background, tree, leaves, step, writes, plan)
        self._best.pending = next((w.best_value for w in writes if w.best_value is not None), None)
        return {w.key: self._run.join(w.name) for w in writes}

    def _record_commit(self, name: str, step: int) -> None:
        self._history.committed(checkpoint_key(name) or name, step)

    def _retain(self) -> None:
        top_k = self._top_k
        ranked = None if top_k is None else lambda s: top_k.best_steps(s, self.minimize_metric)
        self._run.apply_retention(self.max_to_keep, self.keep_period, ranked)

    def _finish_in_flight(self) -> None:
        """Wait for the save in flight; raise its failure (once) if it failed."""
        self._best.pending = None
        if self._top_k is not None:
            self._top_k.pending = {}
        self._background.finish()

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
        self._best.pending = None
        if self._top_k is not None:
            self._top_k.pending = {}
        try:
            self._background.close()
        finally:  # the last Checkpointer watching SIGTERM puts the program's handler back
            self._history.close()
            if self._preemption is not None:
                self._preemption.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ----------------------------------------------------------------- listing

    def list_available_checkpoints(self) -> dict[str, str]:
        """The committed checkpoints of this run.

        **Arguments:** none.

        **Returns:** a dict mapping ``"latest"``, ``"best"``, one ``"step_<N>"`` per
        numbered checkpoint (ascending step) and any other ``suffix`` name to its path.
        A half-written checkpoint is never listed. Empty, it warns once
        (:class:`RunIdWarning`) when runs with a close name have checkpoints.

        **Example:**

        ```python
        >>> ckpt.list_available_checkpoints()
        {'latest': 'runs/mlp/checkpoints/state_latest', 'step_1000': '.../state_1000'}
        ```
        """
        found = self._run.available()
        if not found:
            self._warn_if_mistyped(stacklevel=3)
        return found

    def steps(self) -> list[int]:
        """The steps of the committed numbered checkpoints, ascending. Lists the run
        directory only: no manifest or data file is read.

        **Arguments:** none.

        **Returns:** a list of ints, ``[]`` when there is no numbered checkpoint.

        **Example:**

        ```python
        >>> ckpt.steps()
        [1000, 2000, 3000]
        ```
        """
        return self._run.numbered_steps()

    def latest_step(self) -> int | None:
        """The step :meth:`load_latest` would return: the highest among ``latest`` and
        the numbered checkpoints, one whose manifest is damaged skipped. Reads the
        listing and manifests only, never a data file, so a checkpoint whose data is
        damaged still counts (``load_latest`` would skip it); a run with only legacy
        pickles (``state_*.pyd``) gives ``None``.

        **Arguments:** none.

        **Returns:** the step, or ``None`` when the run has no checkpoint.

        **Example:**

        ```python
        step = ckpt.latest_step()    # where a restart would resume, nothing loaded
        print("fresh run" if step is None else f"resumes after step {step}")
        ```
        """
        return self._run.latest_step()

    # ----------------------------------------------------------------- history

    def metric_history(self) -> list[dict[str, Any]]:
        """The run's metric history: every metrics dict reported to
        :meth:`maybe_save_checkpoints` or :meth:`save_checkpoint`, and every checkpoint
        committed, as one timeline, whichever process or earlier session wrote it.

        After a resume by :meth:`load_latest` from an earlier checkpoint, what the
        abandoned timeline recorded past that checkpoint is left out: each step appears
        as the run that went on reported it (other loads are no resume and drop nothing). Long histories are thinned (oldest reports first) to stay within
        ``LEARNAX_HISTORY_MAX_BYTES`` (16 MiB); see ``docs/format.md``.

        **Arguments:** none.

        **Returns:** a list of records, by step: ``{"step", "time", "metrics",
        "session", "n"}`` for a report (metrics as given: numbers, strings, booleans,
        ``None``; NaN and infinities as floats), ``{"step", "time", "saved", "session",
        "n"}`` for a checkpoint committed (``"saved"``: its name, as
        :meth:`load_checkpoint` takes it: ``"latest"``, ``"best"``, ``"1000"``).

        **Example:**

        ```python
        losses = [(r["step"], r["metrics"]["val/loss"])
                  for r in ckpt.metric_history() if "val/loss" in r.get("metrics", {})]
        ```
        """
        return read_history(self._storage, self.checkpoint_dir, self._history.unwritten())

    # ----------------------------------------------------------------- loading

    def load_checkpoint(
        self,
        path_or_index: str | int,
        *,
        target: Any = None,
        allow_pickle: bool = False,
        allow_cast: bool = False,
    ) -> LoadedCheckpoint | None:
        """Load one checkpoint.

        **Arguments:**

        - `path_or_index`: an ``int`` is a step (``-1``: as :meth:`load_latest`); a
          ``str`` is a name (``"latest"``, ``"best"``, ``"1000"``) or the path of a
          checkpoint directory.
        - `target`: optional pytree (arrays or ``jax.ShapeDtypeStruct``, with or
          without shardings) to restore into: the state comes back in its types and
          structure, arrays on its shardings. It may be a part of the saved tree.
        - `allow_pickle`: for a ``state_*.pyd`` pickle of the original learnax that
          cannot be read without running code from it: unpickle it anyway (only for
          files you trust). The original's own pickles need no such permission.
        - `allow_cast`: with a `target`, cast an array whose dtype differs from the
          target leaf's to the target's (say a float32 checkpoint into bfloat16
          parameters), on the host before it goes to a device. Only toward a kind that
          holds the numbers: integer to integer (values must fit) or floating, floating
          to floating, any of these to complex; never ``bool`` or PRNG keys. Shapes
          must still match.

        **Returns:** ``{"state", "step", "time", "metrics"}``, or ``None`` when there is
        no such checkpoint (warning once, :class:`RunIdWarning`, when this run has no
        checkpoint at all and runs with a close name have some). Raises
        :class:`CheckpointCorruptedError` when it fails verification, ``ValueError``
        naming the leaf when it does not fit ``target``.

        **Example:**

        ```python
        ckpt_1000 = ckpt.load_checkpoint(1000)
        params = ckpt.load_checkpoint("best", target={"params": params})["state"]
        ```
        """
        return self._found(self._load(path_or_index, target, allow_pickle, allow_cast))

    def load_latest(
        self, *, target: Any = None, allow_pickle: bool = False, allow_cast: bool = False
    ) -> LoadedCheckpoint | None:
        """Load the newest checkpoint: the highest step among ``latest`` and the
        numbered ones. One that fails verification is skipped, with a warning on logger
        ``"learnax"``, and the next newest is returned.

        **Arguments:** `target`, `allow_pickle` and `allow_cast` as in
        :meth:`load_checkpoint`.

        **Returns:** ``{"state", "step", "time", "metrics"}``, or ``None`` when the run
        has no checkpoint (warning once, :class:`RunIdWarning`, when runs with a close
        name have some: a mistyped ``run_id``).

        **Example:**

        ```python
        restored = ckpt.load_latest(target=state)
        start = 0 if restored is None else restored["step"] + 1
        ```
        """
        return self._found(self._load(-1, target, allow_pickle, allow_cast))

    def load_best(
        self, *, target: Any = None, allow_pickle: bool = False, allow_cast: bool = False
    ) -> LoadedCheckpoint | None:
        """Load ``state_best``.

        **Arguments:** `target`, `allow_pickle` and `allow_cast` as in
        :meth:`load_checkpoint`.

        **Returns:** ``{"state", "step", "time", "metrics"}``, or ``None`` when there is
        no best checkpoint.

        **Example:** `best_params = ckpt.load_best(target={"params": params})["state"]`
        """
        return self._found(self._load("best", target, allow_pickle, allow_cast))

    def _found(self, loaded: LoadedCheckpoint | None) -> LoadedCheckpoint | None:
        """``loaded``; when it is ``None``, first the warning of a likely mistyped run id."""
        if loaded is None:
            self._warn_if_mistyped()
        return loaded

    def _warn_if_mistyped(self, stacklevel: int = 4) -> None:
        """Once per Checkpointer: when this run has no checkpoint and runs with a close
        name have some, warn naming them (``stacklevel``: the caller of the public method)."""
        if self._mistyped_checked:
            return
        self._mistyped_checked = True
        similar = self._run.similar_runs(self.run_id)
        if similar:
            registry = self.registry_path
            names = ", ".join(map(repr, similar[:-1])) + " or " * (len(similar) > 1)
            names += repr(similar[-1])
            warnings.warn(
                f"Run {self.run_id!r} has no checkpoints in {registry}; did you mean "
                f"{names}? Loading it returns None, so training would start from scratch. "
                "If this is a new run, ignore this warning.",
                RunIdWarning,
                stacklevel=stacklevel,
            )

    def _load(
        self, path_or_index: str | int, target: Any, allow_pickle: bool, allow_cast: bool
    ) -> LoadedCheckpoint | None:
        path = self._run.resolve(path_or_index)
        if path is None:
            return self._load_latest(target, allow_pickle, allow_cast)
        return self._load_path(path, target, allow_pickle, allow_cast)

    def _load_latest(
        self, target: Any, allow_pickle: bool, allow_cast: bool
    ) -> LoadedCheckpoint | None:
        # A checkpoint listed but gone when read was deleted by a live run's retention,
        # which committed a newer one first: list again (a few times at most).
        for _ in range(_RELISTS):
            loaded, vanished = self._load_newest(target, allow_cast)
            if loaded is not None or not vanished:
                break
        if loaded is None:
            loaded = _legacy.load_newest_legacy(
                self._storage,
                self.checkpoint_dir,
                self._run.legacy_files(),
                allow_pickle,
                target,
                allow_cast,
            )
        # A run resumes from what load_latest gives (nothing: from the start): the metric
        # history continues from there, superseding what an abandoned timeline recorded
        # past it (see metric_history). Other loads (best, a step) are no resume.
        step = loaded.get("step") if loaded is not None else -1
        if isinstance(step, int):
            self._history.resumed(step)
        return loaded

    def _load_newest(self, target: Any, allow_cast: bool) -> tuple[LoadedCheckpoint | None, bool]:
        """The newest checkpoint that verifies, damaged ones skipped with a warning (on
        the logger only: one report each); and whether one listed had vanished by the
        time it was read."""
        vanished = False
        for name, manifest in self._run.newest_first():
            directory = self._run.join(name)
            try:
                loaded = self._read(directory, target, allow_cast, manifest)
            except CheckpointCorruptedError as e:
                logger.warning("Skipping damaged checkpoint %s: %s", directory, e)
                continue
            if loaded is not None:
                return loaded, vanished
            vanished = True
        return None, vanished

    def _load_path(
        self, path: str, target: Any, allow_pickle: bool, allow_cast: bool
    ) -> LoadedCheckpoint | None:
        legacy = path if path.endswith(_legacy.SUFFIX) else path + _legacy.SUFFIX
        if not self._storage.isdir(path) and self._storage.isfile(legacy):
            return _legacy.load_legacy(self._storage, legacy, allow_pickle, target, allow_cast)
        # A name or step of this run may point at something learnax did not make where a
        # checkpoint directory would be (what load_latest lists never does).
        parent, name = self._storage.dirname(path), path.rstrip("/").rpartition("/")[2]
        if parent == self.checkpoint_dir and self._run.is_foreign(name):
            logger.warning("Not loading %s: a link or a file learnax did not make", path)
            return None
        return self._read(path, target, allow_cast)

    def _read(
        self,
        directory: str,
        target: Any,
        allow_cast: bool,
        manifest: dict[str, Any] | None = None,
    ) -> LoadedCheckpoint | None:
        try:
            return read_checkpoint(
                self._storage, directory, target, manifest, allow_cast=allow_cast
            )
        except FileNotFoundError:
            return None

    def __repr__(self) -> str:
        return f"Checkpointer({self.checkpoint_dir!r})"
