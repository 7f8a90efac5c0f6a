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
        self._value: float = _policy.initial_best(minimize)
        # Why the stored best value is not known (it could not be read), or None.
        self._unknown: OSError | None = None
        self.pending: float | None = None  # the best value the save in flight writes

    @property
    def value(self) -> float:
        """The best value so far. When the stored one could not be read, it is read
        again; ``OSError`` if that fails too (never ``inf`` while a better best may be
        stored)."""
        if self._unknown is not None:
            self.restore()
        if self._unknown is not None:
            raise OSError(
                self._unknown.errno,
                f"the best value of this run is unknown: reading state_best failed "
                f"({self._unknown})",
                self.run.join(checkpoint_name(BEST)),
            )
        return self._value

    @value.setter
    def value(self, value: float) -> None:
        self._value = value
        self._unknown = None

    def restore(self) -> None:
        """Take the best value from the run's best checkpoint, if it was chosen by the
        same metric in the same direction (else warn and start afresh). When it cannot
        be read (an I/O error, not a missing or damaged checkpoint), the value is
        unknown until a later read succeeds: no best decision is made meanwhile."""
        try:
            record = self.run.best_record(self.metric_name, self.minimize)
        except OSError as e:
            if self._unknown is None:
                logger.warning(
                    "Cannot read the best value of %s (%s): state_best is not replaced "
                    "until it can be read.",
                    self.run.path,
                    e,
                )
            self._unknown = e
            return
        self._unknown = None
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
                self._value,
            )
            return
        self._value = record.value

    def write_if_better(
        self, metric_value: Any, metrics: dict[str, Any] | None, step: int
    ) -> PlannedWrite | None:
        """The write of ``state_best`` if ``metric_value`` is strictly better than the
        best so far (or the one being written), else ``None``. ``metrics`` are the
        encoded metrics to store with it (``None``: just the metric)."""
        if not self.keep_best:
            return None
        value = _policy.metric_float(metric_value, self.metric_name)
        # On a multi-host run process 0 decides, for all: its value if better, else NaN.
        if self.coord is None or self.coord.leader:
            value = value if self._beats_best(value, step) else math.nan
        value = agreed_float(
            self.coord, value, f"metric/{step}", f"the metric {self.metric_name!r}"
        )
        if math.isnan(value):
            return None
        return self._write_of(value, metrics)

    def _beats_best(self, value: float, step: int) -> bool:
        """Whether ``value`` is strictly better than the best so far (or the one being
        written); ``False``, with a warning, while the stored best cannot be read."""
        if self.pending is not None:
            return _policy.is_better(value, self.pending, self.minimize)
        try:
            best = self.value
        except OSError as e:
            logger.warning("Not saving state_best at step %d: %s", step, e)
            return False
        return _policy.is_better(value, best, self.minimize)

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

    def committed(self, value: float | None) -> None:
        """A best checkpoint of ``value`` is committed: it is the best now. ``None``: a
        best checkpoint may or may not have been committed (its write's outcome is
        unknown), so the value is read again before the next decision."""
        if value is None:
            self._unknown = OSError("the last write of state_best may not have been committed")
        else:
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
