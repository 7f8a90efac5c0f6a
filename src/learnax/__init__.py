"""learnax: checkpointing for JAX training loops.

The main part is :class:`learnax.checkpoint.Checkpointer`.
"""

__version__ = "0.1.0"
