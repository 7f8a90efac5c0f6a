"""The checkpoint policy of a training run: when to save, what to keep, which is best.

:class:`Checkpointer` decides; the format module writes and reads one checkpoint; the
storage module does the I/O. A run's checkpoints live in
``<registry_path>/<run_id>/checkpoints/state_<name>``: ``state_latest`` (rolling),
``state_<step>`` (numbered, pruned by ``max_to_keep``) and ``state_best``.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from . import _format, _legacy, _tree
from ._errors import CheckpointCorruptedError, LegacyPickleError
from ._storage import LocalStorage
from ._target import restore_into_target

logger = logging.getLogger("learnax")

_PREFIX = "state_"
_NAME = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


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

    - `registry_path`: directory holding all runs.
    - `run_id`: the run's name, one path component.
    - `save_every`: steps between saves of the rolling ``latest`` checkpoint; ``None``
      or 0 for never.
    - `checkpoint_every`: steps between numbered checkpoints; ``None`` or 0 for never.
    - `max_to_keep`: how many numbered checkpoints to keep (``None`` or ``inf``: all).
    - `keep_best`: whether to keep ``state_best``, the checkpoint with the best metric.
    - `metric_name`: the key in ``metrics`` that decides the best checkpoint.
    - `minimize_metric`: whether lower (``True``) or higher is better.
    - `prepare_fn`: applied to the state before writing; defaults to ``jax.device_get``.

    **Example:**

    ```python
    ckpt = Checkpointer("runs", "mlp", save_every=100, checkpoint_every=1000,
                        max_to_keep=3, keep_best=True)
    restored = ckpt.load_latest(target=state)
    if restored is not None:
        state, start = restored["state"], restored["step"] + 1
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
    ) -> None:
        registry_path = os.fspath(registry_path)
        if "://" in registry_path:
            if not registry_path.startswith("file://"):
                raise NotImplementedError(
                    f"Storage URL {registry_path!r}: only local paths are supported so far."
                )
            registry_path = registry_path[len("file://") :]
        if (
            not isinstance(run_id, str)
            or run_id in ("", ".", "..")
            or any(c in run_id for c in "/\\\0")
        ):
            raise ValueError(
                f"run_id must be one path component (no '/', '\\', not '.' or '..'), got {run_id!r}"
            )
        self.registry_path = registry_path
        self.run_id = run_id
        self.checkpoint_dir = os.path.join(registry_path, run_id, "checkpoints")
        self.save_every = _interval(save_every, "save_every")
        self.checkpoint_every = _interval(checkpoint_every, "checkpoint_every")
        self.max_to_keep = _max_to_keep(max_to_keep)
        self.keep_best = bool(keep_best)
        self.metric_name = metric_name
        self.minimize_metric = bool(minimize_metric)
        self.prepare_fn = prepare_fn if prepare_fn is not None else jax.device_get
        self._storage = LocalStorage()
        self._storage.makedirs(self.checkpoint_dir)
        self.best_metric_value: float = math.inf if self.minimize_metric else -math.inf
        self._clean_leftovers()
        self._restore_best_metric_value()

    # ----------------------------------------------------------------- policy

    def should_save_latest(self, step: int) -> bool:
        """Whether ``step`` is due for the rolling ``latest`` checkpoint.

        **Arguments:** `step`: the current training step.

        **Returns:** ``True`` when ``save_every`` is set and divides ``step``.
        """
        return bool(self.save_every) and operator.index(step) % self.save_every == 0

    def should_save_numbered(self, step: int) -> bool:
        """Whether ``step`` is due for a numbered checkpoint.

        **Arguments:** `step`: the current training step.

        **Returns:** ``True`` when ``checkpoint_every`` is set and divides ``step``.
        """
        return bool(self.checkpoint_every) and operator.index(step) % self.checkpoint_every == 0

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
        saved: dict[str, str] = {}
        if self.save_every and step % self.save_every == 0:
            path = self.save_latest(train_state, step, metrics)
            if path is not None:
                saved["latest"] = path
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            path = self.save_checkpoint(train_state, step, metrics)
            if path is not None:
                saved["numbered"] = path
        if self.keep_best and metrics and self.metric_name in metrics:
            path = self._update_best(train_state, metrics[self.metric_name], step, metrics)
            if path is not None:
                saved["best"] = path
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
        if suffix is not None:
            name = _PREFIX + _checked_suffix(suffix)
        else:
            name = _PREFIX + "best" if is_best else None
        step = self._resolve_step(train_state, step)
        if name is not None:
            return self._save(name, train_state, step, metrics)
        path = self._save(f"{_PREFIX}{step}", train_state, step, metrics)
        if path is not None:
            self._apply_retention()
        return path

    def save_latest(
        self, train_state: Any, step: int | None = None, metrics: dict[str, float] | None = None
    ) -> str | None:
        """Save the rolling ``latest`` checkpoint (``save_checkpoint(..., suffix="latest")``).

        **Returns:** its path, or ``None`` when storage failed.

        **Example:** `ckpt.save_latest(state, step)`
        """
        return self.save_checkpoint(train_state, step, metrics, suffix="latest")

    def update_best_checkpoint(
        self, train_state: Any, metric_value: float, step: int | None = None
    ) -> bool:
        """Save ``state_best`` if ``metric_value`` is strictly better than the best so far.

        NaN is never better. ``best_metric_value`` changes only once the save succeeded.

        **Arguments:**

        - `train_state`: the pytree to save.
        - `metric_value`: the value of ``metric_name`` for this state.
        - `step`: the step; ``None`` takes ``train_state.step``.

        **Returns:** ``True`` when a new best checkpoint was saved.

        **Example:** `ckpt.update_best_checkpoint(state, val_loss, step)`
        """
        step = self._resolve_step(train_state, step)
        return self._update_best(train_state, metric_value, step, None) is not None

    def _update_best(
        self, train_state: Any, metric_value: Any, step: int, metrics: dict[str, Any] | None
    ) -> str | None:
        if not self.keep_best:
            return None
        value = _metric_float(metric_value, self.metric_name)
        if not self._is_better(value):
            return None
        best = {
            "metric": self.metric_name,
            "value": _tree.encode_float(value),
            "minimize": self.minimize_metric,
        }
        metrics = dict(metrics) if metrics else {self.metric_name: value}
        path = self._save(_PREFIX + "best", train_state, step, metrics, extra={"best": best})
        if path is not None:
            self.best_metric_value = value
        return path

    def _is_better(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return (
            value < self.best_metric_value
            if self.minimize_metric
            else value > self.best_metric_value
        )

    def _save(
        self,
        name: str,
        train_state: Any,
        step: int,
        metrics: dict[str, Any] | None,
        extra: dict[str, Any] | None = None,
    ) -> str | None:
        encoded_metrics = _format.encode_metrics(metrics)
        # The default prepare_fn, jax.device_get, is done leaf by leaf while writing:
        # the same result without a second copy of the whole state in host memory.
        state = train_state if self.prepare_fn is jax.device_get else self.prepare_fn(train_state)
        tree, leaves = _tree.encode_tree(state)
        directory = os.path.join(self.checkpoint_dir, name)
        try:
            with self._storage.lock(self.checkpoint_dir):
                _format.write_checkpoint(
                    self._storage,
                    directory,
                    tree=tree,
                    leaves=leaves,
                    step=step,
                    metrics=encoded_metrics,
                    extra=extra,
                )
        except OSError as e:
            logger.error(
                "Saving checkpoint %s (step %d) failed: %s. Earlier checkpoints are intact.",
                directory,
                step,
                e,
            )
            return None
        logger.debug("Saved checkpoint %s (step %d)", directory, step)
        return directory

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
        if self.max_to_keep is None:
            return
        steps = sorted(self._numbered_steps())
        for step in steps[: max(len(steps) - self.max_to_keep, 0)]:
            self._delete(f"{_PREFIX}{step}")

    def _delete(self, name: str) -> None:
        # Removing the manifest first makes the deletion atomic for readers: a crash
        # halfway leaves a directory without manifest, a leftover, never a checkpoint
        # with missing files.
        directory = os.path.join(self.checkpoint_dir, name)
        try:
            with self._storage.lock(self.checkpoint_dir):
                self._storage.remove(os.path.join(directory, _format.MANIFEST))
                self._storage.fsync_dir(directory)
                self._storage.rmtree(directory)
        except OSError as e:
            logger.warning("Could not delete old checkpoint %s: %s", directory, e)
        else:
            logger.debug("Deleted old checkpoint %s", directory)

    # ----------------------------------------------------------------- listing

    def _committed(self, name: str) -> bool:
        return self._storage.isfile(os.path.join(self.checkpoint_dir, name, _format.MANIFEST))

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
                found[key] = os.path.join(self.checkpoint_dir, _PREFIX + key)
        for step in sorted(int(c) for c in committed if c.isdigit()):
            found[f"step_{step}"] = os.path.join(self.checkpoint_dir, f"{_PREFIX}{step}")
        for other in committed:
            if other not in ("latest", "best") and not other.isdigit():
                found[other] = os.path.join(self.checkpoint_dir, _PREFIX + other)
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
        if "/" in text or os.sep in text or text.endswith(_legacy.SUFFIX):
            return self._load_path(text, target, allow_pickle)
        name = text[len(_PREFIX) :] if text.startswith(_PREFIX) else text
        if (
            name.startswith("step_") and name[len("step_") :].isdigit()
        ):  # a key of list_available_checkpoints()
            name = name[len("step_") :]
        return self._load_path(
            os.path.join(self.checkpoint_dir, _PREFIX + _checked_suffix(name)), target, allow_pickle
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
            directory = os.path.join(self.checkpoint_dir, name)
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
            return self._load_dir(os.path.join(self.checkpoint_dir, f"{_PREFIX}{step}"), target)
        for name in (_PREFIX + "latest", _PREFIX + "best"):
            if self._committed(name) and self._manifest(name)["step"] == step:
                return self._load_dir(os.path.join(self.checkpoint_dir, name), target)
        return self._load_path(
            os.path.join(self.checkpoint_dir, f"{_PREFIX}{step}"), target, allow_pickle
        )

    def _load_path(self, path: str, target: Any, allow_pickle: bool) -> dict[str, Any] | None:
        legacy = path if path.endswith(_legacy.SUFFIX) else path + _legacy.SUFFIX
        if not self._storage.isdir(path) and self._storage.isfile(legacy):
            return _legacy.load_legacy(legacy, allow_pickle)
        return self._load_dir(path, target)

    def _load_dir(self, directory: str, target: Any) -> dict[str, Any] | None:
        # A concurrent save may replace the manifest and delete the data files between
        # our reads; then the new manifest is read again.
        for attempt in range(3):
            try:
                manifest = _format.read_manifest(self._storage, directory)
            except FileNotFoundError:
                return None
            try:
                return self._read(directory, manifest, target)
            except CheckpointCorruptedError:
                try:
                    changed = _format.read_manifest(self._storage, directory) != manifest
                except (OSError, CheckpointCorruptedError):
                    changed = False
                if not changed or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _read(self, directory: str, manifest: dict[str, Any], target: Any) -> dict[str, Any]:
        reader = _format.CheckpointReader(self._storage, directory, manifest)
        if target is None:
            state = _tree.decode_tree(manifest["tree"], reader.array)
        else:
            state = restore_into_target(
                manifest["tree"], target, lambda node, _: _tree.decode_tree(node, reader.array)
            )
        return {
            "state": state,
            "step": manifest["step"],
            "time": manifest["time"],
            "metrics": _format.decode_metrics(manifest["metrics"], directory),
        }

    def _manifest(self, name: str) -> dict[str, Any]:
        return _format.read_manifest(self._storage, os.path.join(self.checkpoint_dir, name))

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
        loaded = [_legacy.load_legacy(os.path.join(self.checkpoint_dir, e), True) for e in legacy]
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
                directory = os.path.join(self.checkpoint_dir, entry)
                if not entry.startswith(_PREFIX) or not self._storage.isdir(directory):
                    continue
                try:
                    self._clean_checkpoint_dir(entry, directory)
                except OSError as e:
                    logger.warning("Could not clean up leftovers in %s: %s", directory, e)

    def _clean_checkpoint_dir(self, entry: str, directory: str) -> None:
        if not self._committed(entry):
            logger.info(
                "Removing incomplete checkpoint %s (an interrupted save or deletion)", directory
            )
            self._storage.rmtree(directory)
            return
        try:
            keep = set(self._manifest(entry)["files"])
        except CheckpointCorruptedError:
            # Damaged: keep its files for inspection; load_latest skips it.
            keep = {f for f in self._storage.listdir(directory) if not f.endswith(".tmp")}
        for name in self._storage.listdir(directory):
            if name != _format.MANIFEST and name not in keep:
                logger.info("Removing leftover file %s", os.path.join(directory, name))
                self._storage.remove(os.path.join(directory, name))

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
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"Metric {name!r} must be a number, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)) and np.shape(value) == ():
        return float(np.asarray(value))
    raise TypeError(f"Metric {name!r} must be a scalar number, got {type(value).__name__}")


def _checked_suffix(suffix: Any) -> str:
    if not isinstance(suffix, str) or not _NAME.match(suffix) or ".." in suffix:
        raise ValueError(
            f"Checkpoint name {suffix!r} is not safe: use letters, digits, '_', '-' and '.' "
            "(not starting with '.', no '..', at most 128 characters)"
        )
    return suffix
