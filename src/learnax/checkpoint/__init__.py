"""Checkpoints of JAX training runs: rolling latest, numbered with retention, best by a
metric; atomic, durable, verified on load, and free of pickle.

```python
from learnax.checkpoint import Checkpointer

ckpt = Checkpointer("runs", "my-run", save_every=100, checkpoint_every=1000, keep_best=True)
ckpt.maybe_save_checkpoints(state, step, {"val/loss": loss})
restored = ckpt.load_latest(target=state)
```
"""

from typing import TYPE_CHECKING, Any

from ._diff import diff
from ._errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointSaveError,
    LegacyPickleError,
    RunIdWarning,
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

if TYPE_CHECKING:
    from ._checkpointer import Checkpointer
    from ._convert import convert

# Imported on first use: these need jax, and `learnax ls` or `show` need neither.
_LAZY = {"Checkpointer": "._checkpointer", "convert": "._convert"}

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
    "RunIdWarning",
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


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
