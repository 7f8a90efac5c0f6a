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
from ._errors import (
    CheckpointCorruptedError,
    CheckpointError,
    CheckpointSaveError,
    LegacyPickleError,
)
from ._inspect import CheckpointInfo, LeafInfo, diff, prune, read_info, verify

__all__ = [
    "CheckpointCorruptedError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointSaveError",
    "Checkpointer",
    "LeafInfo",
    "LegacyPickleError",
    "convert",
    "diff",
    "prune",
    "read_info",
    "verify",
]
