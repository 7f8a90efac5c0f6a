"""The best checkpoint by a metric: the best value so far, whether a new value beats
it, and the write of ``state_best`` that a better value calls for.

The value becomes the best only once its checkpoint is committed (``committed``, called
by the saver); while a background save of a better value is in flight, later values
are compared against that one (``pending``), so a step never waits for the save in
flight just to learn that its value is not better. The value is stored in the best
checkpoint's manifest (``_run.BestRecord``) and read back at start-up, so a restarted
run keeps its best.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from . import _policy, _tree
from ._multihost import Coordinator, agreed_float
from ._run import BEST, BestRecord, RunDirectory, checkpoint_name
from ._save import PlannedWrite

logger = logging.getLogger("learnax")


class BestTracker:
    """The best value of ``metric_name`` in one run (lower is better when ``minimize``)."""

    def __init__(
        self,
        run: RunDirectory,
        coord: Coordinator | None,
        *,
        keep_best: bool,
        metric_name: str,
        minimize: bool,
    ) -> None:
        self.run = run
        self.coord = coord
        self.keep_best = keep_best
        self.metric_name = metric_name
        self.minimize = minimize
        self.value: float = _policy.initial_best(minimize)
        self.pending: float | None = None  # the best value the save in flight writes

    def restore(self) -> None:
        """Take the best value from the run's best checkpoint, if it was chosen by the
        same metric in the same direction (else warn and start afresh)."""
        record = self.run.best_record(self.metric_name, self.minimize)
        if record is None:
            return
        if record.metric != self.metric_name or record.minimize != self.minimize:
            logger.warning(
                "The best checkpoint of this run was chosen by %r (minimize=%s), not %r "
                "(minimize=%s); its value is not carried over.",
                record.metric,
                record.minimize,
                self.metric_name,
                self.minimize,
            )
            return
        if math.isnan(record.value):
            logger.warning(
                "The best checkpoint of this run records %r as NaN, which is never a best "
                "value; starting from %s.",
                record.metric,
                self.value,
            )
            return
        self.value = record.value

    def write_if_better(
        self, metric_value: Any, metrics: dict[str, Any] | None, step: int
    ) -> PlannedWrite | None:
        """The write of ``state_best`` if ``metric_value`` is strictly better than the
        best so far (or the one being written), else ``None``. ``metrics`` are the
        encoded metrics to store with it (``None``: just the metric)."""
        if not self.keep_best:
            return None
        value = self._agreed(metric_value, step)
        best = self.pending if self.pending is not None else self.value
        if not _policy.is_better(value, best, self.minimize):
            return None
        return self._write_of(value, metrics)

    def write_by_hand(self, metrics: Any, encoded: dict[str, Any], step: int) -> PlannedWrite:
        """The write of a best checkpoint saved by hand (``save_checkpoint(is_best=True)``):
        when its metrics hold ``metric_name``, that value becomes the best (now and
        after a restart), better or not. NaN never is a best value: that checkpoint is
        written as asked, but the best value stays and no record of it is stored."""
        value = metrics.get(self.metric_name) if isinstance(metrics, dict) else None
        if value is not None:
            value = self._agreed(value, step)
        if value is None or math.isnan(value):
            return PlannedWrite("best", checkpoint_name(BEST), encoded)
        return self._write_of(value, encoded)

    def committed(self, value: float) -> None:
        """A best checkpoint of ``value`` is committed: it is the best now."""
        self.value = value

    def _agreed(self, value: Any, step: int) -> float:
        """``value`` as a float; on a multi-host run, process 0's value for all."""
        value = _policy.metric_float(value, self.metric_name)
        return agreed_float(self.coord, value, f"metric/{step}", f"the metric {self.metric_name!r}")

    def _write_of(self, value: float, metrics: dict[str, Any] | None) -> PlannedWrite:
        record = BestRecord(self.metric_name, value, self.minimize)
        return PlannedWrite(
            "best",
            checkpoint_name(BEST),
            metrics or {self.metric_name: _tree.encode_float(value)},
            extra=record.to_manifest(),
            best_value=value,
        )
