"""Looking at stored checkpoints without a training loop: where a path points, which
runs and checkpoints there are, what one holds, a metric across a run, and retention
applied offline. The ``learnax`` command line prints what these functions return;
verify and diff have modules of their own (``_verify``, ``_diff``).

Everything here reads manifests (small JSON files) unless it says otherwise: listing
and showing never read array data, so they are fast on object storage too. What a run
directory is (names, listing, the best record) is ``_run``'s to say.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from . import _tree
from ._dtypes import ITEMSIZES
from ._errors import CheckpointCorruptedError
from ._history import read_history
from ._manifest import MANIFEST, checked_array_entry, read_manifest
from ._metrics import decode_metrics
from ._policy import retention_victims
from ._read import CheckpointReader, read_consistent
from ._run import (
    BEST,
    PREFIX,
    BestRecord,
    RunDirectory,
    checkpoint_name,
    checkpoints_dir,
    key_of_name,
    path_kind,
    run_dirs,
)
from ._storage import open_storage

if TYPE_CHECKING:
    from ._storage import Storage


# --------------------------------------------------------------------------- what


@dataclass(frozen=True)
class LeafInfo:
    """One leaf of a stored tree, as the manifest describes it.

    **Arguments** (its fields): `path` (keys joined by "/"), `dtype` (a NumPy dtype
    name, ``key<impl>`` for a PRNG key, or the kind of a Python leaf: ``int``,
    ``float``, ``str``, ``callable``...), `shape`, `nbytes`, `value` (of a Python leaf),
    `keys` (the path as a tuple of keys).

    **Example:** `[(leaf.path, leaf.shape) for leaf in read_info(path).leaves]`
    """

    path: str  # keys joined by "/", e.g. "params/Dense_0/kernel"
    dtype: str  # a NumPy dtype name, "key<impl>" for a PRNG key, or the Python type
    shape: tuple[int, ...]
    nbytes: int
    value: Any = None  # the value of a Python scalar or str leaf
    keys: tuple[Any, ...] = ()  # the path as keys (a str key "1" and an int key 1 differ)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds, read from its manifest alone (see :func:`read_info`).

    **Arguments** (its fields): `path`, `step`, `time` (seconds since the epoch),
    `metrics`, `leaves` (a :class:`LeafInfo` per leaf, in tree order), `nbytes` (all
    its files on storage), `best` (for ``state_best``: the metric, value and direction
    that chose it), `files` (its data files with their sizes).

    **Example:** `print(read_info("runs/mlp/checkpoints/state_best").best)`
    """

    path: str
    step: int
    time: float
    metrics: dict[str, Any]
    leaves: list[LeafInfo]
    nbytes: int  # all its files on storage
    best: dict[str, Any] | None = None  # how state_best was chosen: metric, value, minimize
    files: dict[str, Any] = field(default_factory=dict)


def read_info(path: str, *, storage_options: dict[str, Any] | None = None) -> CheckpointInfo:
    """Read what a checkpoint holds without reading its arrays.

    **Arguments:**

    - `path`: a checkpoint directory (``.../checkpoints/state_1000``), local or a URL.
    - `storage_options`: options for the fsspec filesystem of a URL.

    **Returns:** a :class:`CheckpointInfo`: step, time, metrics, and every leaf's path,
    dtype, shape and size.

    Raises ``FileNotFoundError`` when there is no committed checkpoint at ``path`` and
    :class:`CheckpointCorruptedError` when its manifest fails verification.

    **Example:**

    ```python
    info = read_info("runs/mlp/checkpoints/state_latest")
    print(info.step, sum(leaf.nbytes for leaf in info.leaves))
    ```
    """
    storage, path = open_storage(str(path), storage_options)
    return checkpoint_info(storage, path)


def checkpoint_info(storage: Storage, path: str) -> CheckpointInfo:
    manifest = read_manifest(storage, path)
    leaves = [leaf for leaf, _ in leaves_of(storage, path, manifest)]
    best = manifest.get("best")
    return CheckpointInfo(
        path=path,
        step=manifest["step"],
        time=manifest["time"],
        metrics=decode_metrics(manifest["metrics"], path),
        leaves=leaves,
        nbytes=storage.usage(path)[0],
        best=best if isinstance(best, dict) else None,
        files=manifest["files"],
    )


def leaves_of(storage: Storage, path: str, manifest: dict[str, Any]) -> list[tuple[LeafInfo, Any]]:
    """Each leaf's description and its stored node, in tree order."""
    where = storage.join(path, MANIFEST)
    try:
        return [
            (_leaf_info(manifest, keys, node, where), node)
            for keys, node in _tree.leaf_nodes(manifest["tree"])
        ]
    except _tree.MalformedTreeError as e:
        raise CheckpointCorruptedError(f"{where}: invalid tree: {e}") from None


def _leaf_info(manifest: dict[str, Any], keys: tuple, node: Any, where: str) -> LeafInfo:
    path = "/".join(str(k) for k in keys) or "<root>"
    if node is None:
        return LeafInfo(path, "None", (), 0, keys=keys)
    if "array" not in node:
        tag = next(t for t in _tree.SCALAR_TAGS if t in node)
        # A scalar: no array to read. A function was not stored: its name is shown.
        value = node[tag] if tag == "callable" else _tree.decode_tree(node, lambda name: None)
        return LeafInfo(path, tag, (), 0, value, keys)
    dtype, _ = checked_array_entry(manifest, node["array"], where)
    entry = manifest["arrays"][node["array"]]
    shape = tuple(entry["shape"])
    nbytes = math.prod(shape) * ITEMSIZES[dtype]
    if entry.get("kind") == "key":  # stored as its key data: one more axis
        return LeafInfo(path, f"key<{entry['impl']}>", shape[:-1], nbytes, keys=keys)
    return LeafInfo(path, dtype, shape, nbytes, keys=keys)


# --------------------------------------------------------------------------- where


class Location(NamedTuple):
    """What a path points at: `kind` is ``"checkpoint"``, ``"run"`` or ``"registry"``;
    `path` is the path as the storage names it (a ``file://`` prefix dropped)."""

    kind: str
    path: str


def locate(path: str, *, storage_options: dict[str, Any] | None = None) -> Location:
    """What ``path`` points at: a checkpoint, a run (``<registry>/<run_id>``) or a
    registry. Raises ``FileNotFoundError`` when nothing is there.

    **Example:** `locate("runs/mlp").kind == "run"`
    """
    storage, path = open_storage(str(path), storage_options)
    return Location(path_kind(storage, path), path)


def _run_directory(storage: Storage, run: str) -> RunDirectory:
    return RunDirectory(storage, checkpoints_dir(storage, run))


def checkpoints_under(storage: Storage, path: str) -> list[str]:
    """Every committed checkpoint directory under ``path`` (a checkpoint, a run or a
    registry)."""
    kind = path_kind(storage, path)
    if kind == "checkpoint":
        return [path]
    return [d.join(name) for d in _run_directories(storage, path, kind) for name in d.names()]


def _run_directories(storage: Storage, path: str, kind: str) -> list[RunDirectory]:
    """The run directory of ``path`` (``kind`` ``"run"``), or those of every run of a
    registry."""
    runs = [path] if kind == "run" else run_dirs(storage, path)
    return [_run_directory(storage, run) for run in runs]


def find_checkpoints(path: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The committed checkpoint directories under ``path``: the checkpoint itself, those
    of a run (latest, best, numbered by step, then others) or those of every run of a
    registry. Raises ``FileNotFoundError`` when nothing is there.

    **Example:** `len(find_checkpoints("runs"))`
    """
    storage, path = open_storage(str(path), storage_options)
    return checkpoints_under(storage, path)


def find_legacy_pickles(path: str, *, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The pickle checkpoints of the original learnax (``state_<name>.pyd`` files) under
    ``path``: those of a run, or of every run of a registry; none for a checkpoint.
    They are not checkpoints of this format (no manifest, no checksums): loads read
    them, ``learnax convert`` converts them. Raises ``FileNotFoundError`` when nothing
    is there.

    **Example:** `[p.rpartition("/")[2] for p in find_legacy_pickles("runs/old-run")]`
    """
    storage, path = open_storage(str(path), storage_options)
    kind = path_kind(storage, path)
    if kind == "checkpoint":
        return []
    directories = _run_directories(storage, path, kind)
    return [d.join(name) for d in directories for name in d.legacy_files()]


def checkpoint_path(run: str, name: str, *, storage_options: dict[str, Any] | None = None) -> str:
    """The directory of checkpoint ``name`` of ``run``, committed or not: ``name`` is
    ``"latest"``, ``"best"``, a step (``"1000"``), a key of
    ``list_available_checkpoints()`` (``"step_1000"``) or a directory name
    (``"state_1000"``). Raises ``ValueError`` for a name no checkpoint can have.

    **Example:** `read_info(checkpoint_path("runs/mlp", "best"))`
    """
    storage, run = open_storage(str(run), storage_options)
    return _run_directory(storage, run).join(checkpoint_name(key_of_name(name)))


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class RunSummary:
    """One run of a registry (see :func:`list_runs`).

    **Arguments** (its fields): `name` (the run id), `path`, `checkpoints` (how many
    are committed), `newest_step` (of latest and the numbered ones; ``None`` when none
    can be read), `best` (``{"metric", "value", "step"}`` of ``state_best``, or
    ``None``), `nbytes` (all its files), `last_write` (newest modification time, seconds
    since the epoch; ``None`` when unknown).
    """

    name: str
    path: str
    checkpoints: int
    newest_step: int | None
    best: dict[str, Any] | None
    nbytes: int
    last_write: float | None


@dataclass(frozen=True)
class CheckpointSummary:
    """One checkpoint of a run (see :func:`list_checkpoints`).

    **Arguments** (its fields): `name` (its key: ``"latest"``, ``"1000"``...), `path`,
    `status` (``"ok"``, ``"damaged"``, or ``"gone"`` when a live run deleted it while
    it was listed), `step`, `time`, `metrics`, `nbytes` (its files on storage),
    `problem` (what is damaged, ``None`` when ok).
    """

    name: str
    path: str
    status: str
    step: int | None = None
    time: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    problem: str | None = None


def list_runs(registry: str, *, storage_options: dict[str, Any] | None = None) -> list[RunSummary]:
    """The runs of a registry, by name, each summed up from its manifests.

    **Example:** `[(r.name, r.newest_step) for r in list_runs("runs")]`
    """
    storage, registry = open_storage(str(registry), storage_options)
    return [_run_summary(storage, run) for run in run_dirs(storage, registry)]


def _run_summary(storage: Storage, run: str) -> RunSummary:
    directory = _run_directory(storage, run)
    names = directory.names()
    steps, best = [], None
    for name in names:
        try:
            manifest = directory.read_manifest(name)
        except (CheckpointCorruptedError, FileNotFoundError):
            continue
        if name != checkpoint_name(BEST):
            steps.append(manifest["step"])
        elif (record := BestRecord.of_manifest(manifest)) is not None:
            best = {"metric": record.metric, "value": record.value, "step": manifest["step"]}
    size, last = storage.usage(run)
    return RunSummary(
        name=run.rstrip("/").rpartition("/")[2],
        path=run,
        checkpoints=len(names),
        newest_step=max(steps, default=None),
        best=best,
        nbytes=size,
        last_write=last or None,
    )


def list_checkpoints(
    run: str, *, storage_options: dict[str, Any] | None = None
) -> list[CheckpointSummary]:
    """The committed checkpoints of a run (latest, best, numbered by step, then others),
    each read from its manifest and checked for missing, truncated or damaged data
    files (their headers, not their data: ``verify`` reads every byte).

    **Example:** `[c.name for c in list_checkpoints("runs/mlp") if c.status != "ok"]`
    """
    storage, run = open_storage(str(run), storage_options)
    directory = _run_directory(storage, run)
    return [_checkpoint_summary(storage, directory.join(name)) for name in directory.names()]


def _checkpoint_summary(storage: Storage, path: str) -> CheckpointSummary:
    name = path.rpartition("/")[2][len(PREFIX) :]
    try:
        info = checkpoint_info(storage, path)
        problem = _files_problem(storage, path)
    except FileNotFoundError:  # deleted (retention of a live run) while listing
        return CheckpointSummary(name, path, "gone")
    except CheckpointCorruptedError as e:
        return CheckpointSummary(
            name, path, "damaged", nbytes=storage.usage(path)[0], problem=str(e)
        )
    return CheckpointSummary(
        name,
        path,
        "damaged" if problem else "ok",
        step=info.step,
        time=info.time,
        metrics=info.metrics,
        nbytes=info.nbytes,
        problem=problem,
    )


def _files_problem(storage: Storage, path: str) -> str | None:
    """A data file missing, of the wrong size or with a damaged header. A checkpoint
    replaced meanwhile by a live run is read again."""
    try:
        read_consistent(storage, path, CheckpointReader.check_files)
    except CheckpointCorruptedError as e:
        return str(e)
    return None


# --------------------------------------------------------------------------- metrics


def read_metric_history(
    run: str, *, storage_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The metric history of a run: every metrics dict its Checkpointers were given and
    every checkpoint they committed, as one timeline (what a resume from an earlier
    checkpoint abandoned left out), as :meth:`Checkpointer.metric_history` returns it.

    **Arguments:**

    - `run`: ``<registry>/<run_id>`` (a local path or a URL).
    - `storage_options`: options for the fsspec filesystem of a URL.

    **Returns:** the records by step: ``{"step", "time", "metrics", "session", "n"}``
    for a report, ``{"step", "time", "saved", "session", "n"}`` for a committed
    checkpoint; ``[]`` for a run without a history (one saved by learnax before it kept
    one).

    **Example:**

    ```python
    reports = [r for r in read_metric_history("runs/mlp") if "metrics" in r]
    print(len(reports), reports[-1]["metrics"])
    ```
    """
    storage, run = open_storage(str(run), storage_options)
    return read_history(storage, run)


@dataclass(frozen=True)
class MetricHistory:
    """A metric across a run (see :func:`metric_history`).

    **Arguments** (its fields): `points` (step -> value, ascending steps), `best_step`
    and `best_value` (the best point), `maximize` (whether higher was taken as better),
    `source` (``"history"``: the run's metric history, every report; ``"checkpoints"``:
    the metrics stored in its checkpoints, for runs without a history of the metric).
    """

    points: dict[int, float]
    best_step: int
    best_value: float
    maximize: bool
    source: str = "checkpoints"


def metric_history(
    run: str,
    metric: str,
    *,
    maximize: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> MetricHistory:
    """The finite values of ``metric`` across ``run``, by step, and the best of them
    (the one ``state_best`` records when it is still the optimum): every report in
    the run's metric history, or, for a run without one (saved by an older learnax),
    the values stored in its checkpoints.

    **Arguments:**

    - `run`: ``<registry>/<run_id>``.
    - `metric`: a metric name, e.g. ``"val/loss"``.
    - `maximize`: higher is better; by default what ``state_best`` says, else lower.
    - `storage_options`: options for the fsspec filesystem of a URL.

    Raises ``ValueError`` when no checkpoint and no report has a finite value of
    ``metric``.

    **Example:** `metric_history("runs/mlp", "val/loss").best_step`
    """
    storage, run = open_storage(str(run), storage_options)
    directory = _run_directory(storage, run)
    points: dict[int, float] = {}
    recorded: tuple[int, float] | None = None
    for name in directory.names():
        try:
            manifest = directory.read_manifest(name)
            value = decode_metrics(manifest["metrics"], directory.join(name)).get(metric)
        except (CheckpointCorruptedError, FileNotFoundError):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        points[manifest["step"]] = float(value)
        record = BestRecord.of_manifest(manifest) if name == checkpoint_name(BEST) else None
        if record is not None and record.metric == metric:
            recorded = (manifest["step"], float(value))
            maximize = maximize or not record.minimize
    reported = _reported_points(read_history(storage, run), metric)
    source = "history" if reported else "checkpoints"
    points = reported or points
    if not points:
        raise ValueError(
            f"no checkpoint of {run} and no report in its metric history has a finite "
            f"value of {metric!r}"
        )
    points = dict(sorted(points.items()))
    optimum = (max if maximize else min)(points.values())
    if recorded is None or recorded[1] != optimum or points.get(recorded[0]) != optimum:
        recorded = next((s, v) for s, v in points.items() if v == optimum)
    return MetricHistory(points, recorded[0], recorded[1], maximize, source)


def _reported_points(records: list[dict[str, Any]], metric: str) -> dict[int, float]:
    """The finite numbers reported as ``metric`` in a history, by step (the last report
    of a step when there are several)."""
    points = {}
    for record in records:
        value = record.get("metrics", {}).get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            points[record["step"]] = float(value)
    return points


# --------------------------------------------------------------------------- prune


def prune(
    run: str,
    keep: int,
    *,
    keep_period: int | None = None,
    keep_top_k: int | None = None,
    metric: str | None = None,
    maximize: bool = False,
    dry_run: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Apply retention to a run offline: delete the numbered checkpoints beyond the
    newest ``keep`` (multiples of ``keep_period`` are kept and not counted; with
    ``keep_top_k``, so are the ``keep_top_k`` best by ``metric``, as a Checkpointer's
    ``keep_top_k`` keeps them); latest, best and other names are never touched. Each
    deletion takes the run's lock, as a training run's retention does.

    **Arguments:**

    - `run`: the run, ``<registry>/<run_id>`` (a local path or a URL).
    - `keep`: how many numbered checkpoints to keep (>= 1).
    - `keep_period`: also keep, without counting them, steps that are multiples of it.
    - `keep_top_k`, `metric`, `maximize`: also keep the ``keep_top_k`` numbered
      checkpoints with the best value of ``metric`` stored with them (lowest unless
      ``maximize``; NaN or none never ranks). Reads their manifests; ``OSError`` and
      nothing deleted when one cannot be read.
    - `dry_run`: only say what would be deleted.
    - `storage_options`: options for the fsspec filesystem of a URL.

    **Returns:** the paths deleted (with ``dry_run``: that would be deleted). Raises
    ``OSError`` naming those that could not be deleted.

    **Example:** `prune("runs/mlp", keep=3, dry_run=True)`
    """
    for name, value in (("keep", keep), ("keep_period", keep_period), ("keep_top_k", keep_top_k)):
        if value is None and name != "keep":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if keep_top_k is not None and not metric:
        raise ValueError("keep_top_k needs the metric that ranks the checkpoints")
    storage, run = open_storage(str(run), storage_options)
    if path_kind(storage, run) != "run":
        raise FileNotFoundError(f"Not a run (no checkpoints directory): {run}")
    directory = RunDirectory(storage, checkpoints_dir(storage, run))
    steps = directory.numbered_steps()
    best = None
    if keep_top_k is not None:
        from ._top_k import TopK  # imports jax: only when ranking

        best = TopK(directory, None, k=keep_top_k, metric_name=str(metric)).best_steps(
            steps, minimize=not maximize
        )
        if best is None:
            raise OSError(f"{run}: the {metric!r} of a numbered checkpoint cannot be read")
    names = [checkpoint_name(s) for s in retention_victims(steps, keep, keep_period, best)]
    if dry_run:
        return [directory.join(n) for n in names]
    failed = [n for n in names if not directory.delete(n)]
    if failed:
        raise OSError(f"could not delete {', '.join(directory.join(n) for n in failed)}")
    return [directory.join(n) for n in names]
