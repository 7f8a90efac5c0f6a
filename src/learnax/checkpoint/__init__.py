"""Checkpoints of JAX training runs: rolling latest, numbered with retention, best by a
metric; atomic, durable, verified on load, and free of pickle.

```python
from learnax.checkpoint import Checkpointer

ckpt = Checkpointer("runs", "my-run", save_every=100, checkpoint_every=1000, keep_best=True)
ckpt.maybe_save_checkpoints(state, step, {"val/loss": loss})
restored = ckpt.load_latest(target=state)
```
"""

from ._checkpointer import Checkpointer
from ._convert import convert
from ._diff import diff
from ._errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointSaveError,
    LegacyPickleError,
)
from ._inspect import (
    CheckpointInfo,
    CheckpointSummary,
    LeafInfo,
    Location,
    MetricHistory,
    RunSummary,
    checkpoint_path,
    find_checkpoints,
    find_legacy_pickles,
    list_checkpoints,
    list_runs,
    locate,
    metric_history,
    prune,
    read_info,
    read_metric_history,
)
from ._verify import verify

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointSaveError",
    "CheckpointSummary",
    "Checkpointer",
    "LeafInfo",
    "LegacyPickleError",
    "Location",
    "MetricHistory",
    "RunSummary",
    "checkpoint_path",
    "convert",
    "diff",
    "find_checkpoints",
    "find_legacy_pickles",
    "list_checkpoints",
    "list_runs",
    "locate",
    "metric_history",
    "prune",
    "read_info",
    "read_metric_history",
    "verify",
]
