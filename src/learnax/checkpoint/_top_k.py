"""The k best numbered checkpoints by a metric (``keep_top_k``): the metric value of
each numbered checkpoint of the run, read from their manifests (metrics only, never
data) at first need and kept current by retention; whether a reported value ranks
among the k best, which calls for a numbered checkpoint at its step; and which steps
retention keeps for the ranking.

An error is not a "no": while a manifest cannot be read (a transient I/O error), the
ranking is unknown, so no checkpoint is saved for it and retention deletes nothing
(both logged) until it can be read. A damaged manifest has no metric: it never ranks.
On a multi-host run process 0 ranks, and its decision holds for all processes.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from . import _policy, _tree
from ._errors import CheckpointCorruptedError
from ._multihost import Coordinator, agreed_float
from ._run import RunDirectory, checkpoint_name
from ._save import PlannedWrite

logger = logging.getLogger("learnax")


class TopK:
    """The ranking of one run's numbered checkpoints by ``metric_name``, of which the
    ``k`` best are kept. Which way is better (``minimize``) comes with each call: it is
    the Checkpointer's ``minimize_metric``, which a user may change."""

    def __init__(
        self, run: RunDirectory, coord: Coordinator | None, *, k: int, metric_name: str
    ) -> None:
        self.run = run
        self.coord = coord
        self.k = k
        self.metric_name = metric_name
        # step -> metric value (NaN: none) of the committed numbered checkpoints, by
        # metric name; None until first needed. Replaced whole, never changed in place:
        # retention in a background save's thread refreshes it while the training loop
        # ranks a value against it.
        self._values: dict[int, float] | None = None
        self._values_of = metric_name
        self.pending: dict[int, float] = {}  # the numbered save in flight (async_save)

    def ranks(self, metric_value: Any, step: int, minimize: bool) -> bool:
        """Whether ``metric_value`` at ``step`` ranks among the ``k`` best numbered
        checkpoints (the one in flight included); ``False``, logged, while the ranking
        cannot be read. On a multi-host run, process 0's answer for all."""
        value = _policy.metric_float(metric_value, self.metric_name)
        if self.coord is None or self.coord.leader:
            value = value if self._ranks(value, step, minimize) else math.nan
        value = agreed_float(
            self.coord, value, f"rank/{step}", f"the ranking of {self.metric_name!r}"
        )
        return not math.isnan(value)

    def _ranks(self, value: float, step: int, minimize: bool) -> bool:
        if math.isnan(value):
            return False
        try:
            values = self._known()
        except OSError as e:
            logger.warning(
                "Not saving a numbered checkpoint for the %d best %r at step %d: the "
                "metrics of this run's numbered checkpoints cannot be read (%s)",
                self.k,
                self.metric_name,
                step,
                e,
            )
            return False
        return _policy.ranks_in_top_k(value, step, {**values, **self.pending}, self.k, minimize)

    def best_steps(self, steps: list[int], minimize: bool) -> set[int] | None:
        """Of ``steps`` (the committed numbered checkpoints), those among the ``k`` best;
        ``None``, logged, when a manifest cannot be read: then nothing may be deleted."""
        try:
            values = self._refresh(steps)
        except OSError as e:
            logger.warning(
                "Not applying retention in %s: the %r of a numbered checkpoint cannot be "
                "read (%s); nothing is deleted until it can.",
                self.run.path,
                self.metric_name,
                e,
            )
            return None
        return _policy.top_k_steps(values, self.k, minimize)

    def saving(self, step: int, writes: list[PlannedWrite], in_background: bool) -> None:
        """``writes`` of ``step`` are about to be saved. A numbered one replaces what was
        known of that step (read again after its commit); saved in the background, its
        value ranks as ``pending`` until then."""
        numbered = next((w for w in writes if w.retention), None)
        if numbered is None:
            return
        if self._values is not None and step in self._values:
            self._values = {s: v for s, v in self._values.items() if s != step}
        if in_background:
            self.pending = {step: self._value_in(numbered.metrics, self.metric_name)}

    def _known(self) -> dict[int, float]:
        values = self._values
        if values is None or self._values_of != self.metric_name:
            values = self._refresh(self.run.numbered_steps())
        return values

    def _refresh(self, steps: list[int]) -> dict[int, float]:
        """The values of ``steps``: those known kept, the others read from their
        manifests (a checkpoint gone since it was listed left out). ``OSError`` when one
        cannot be read."""
        metric_name = self.metric_name
        known = self._values if self._values_of == metric_name and self._values else {}
        values = {}
        for step in steps:
            value = known.get(step)
            if value is None:
                value = self._read_value(step, metric_name)
            if value is not None:
                values[step] = value
        self._values, self._values_of = values, metric_name
        return values

    def _read_value(self, step: int, metric_name: str) -> float | None:
        """The value of ``metric_name`` stored with numbered checkpoint ``step``: NaN when
        it has none (or its manifest is damaged), ``None`` when it is gone."""
        try:
            manifest = self.run.read_manifest(checkpoint_name(step))
        except FileNotFoundError:
            return None
        except CheckpointCorruptedError as e:
            logger.warning("Numbered checkpoint %d is not ranked: %s", step, e)
            return math.nan
        return self._value_in(manifest.get("metrics"), metric_name)

    @staticmethod
    def _value_in(metrics: Any, metric_name: str) -> float:
        """The value of ``metric_name`` in stored (encoded) ``metrics``; NaN for none."""
        if not isinstance(metrics, dict) or metric_name not in metrics:
            return math.nan
        try:
            return _tree.decode_float(metrics[metric_name], f"metric {metric_name!r}")
        except ValueError:
            return math.nan
