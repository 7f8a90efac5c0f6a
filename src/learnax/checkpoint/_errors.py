"""Exceptions raised by learnax.checkpoint, and the one warning it gives.

Programming errors (a bad argument, an unsupported leaf) are ordinary ``TypeError`` and
``ValueError``; the exception classes here are for problems with what is stored.
:class:`RunIdWarning` is a Python warning because it points at the caller's code (a
mistyped run id); what the caller can do nothing about goes to logger ``learnax``.
"""


class CheckpointError(Exception):
    """Base class of the errors about stored checkpoints.

    **Example:**

    ```python
    try:
        restored = ckpt.load_checkpoint("best")
    except CheckpointError as e:
        print("cannot use the best checkpoint:", e)
    ```
    """


class CheckpointCorruptedError(CheckpointError):
    """A checkpoint failed verification: a checksum mismatch, a truncated file, or a
    manifest or header that is malformed or points where it must not.

    The message names the file. Earlier checkpoints are unaffected; ``load_latest()``
    skips a corrupted checkpoint and returns the next newest one.

    **Example:**

    ```python
    try:
        state = ckpt.load_checkpoint(1000)["state"]
    except CheckpointCorruptedError as e:   # e.g. ".../data-...safetensors: checksum mismatch"
        state = ckpt.load_latest()["state"]
    ```
    """


class LegacyPickleError(CheckpointError):
    """A ``state_*.pyd`` pickle cannot be read without running code from it, and that
    was not allowed. The original learnax's own pickles (NumPy arrays, its
    ``TrainState``, optax states) are read without it; a pickle that names anything
    else (a function, a class with behaviour) is refused, naming it. Pass
    ``allow_pickle=True`` only for files you trust: it unpickles them.

    **Example:**

    ```python
    try:
        restored = ckpt.load_latest()
    except LegacyPickleError:
        restored = ckpt.load_latest(allow_pickle=True)  # only for files you trust
    ```
    """


class CheckpointSaveError(CheckpointError):
    """A save that ran in the background (``async_save=True``) failed.

    The failure is logged when it happens and raised from the next save,
    ``wait_until_finished()`` or ``close()``. Checkpoints committed before are intact.

    **Example:**

    ```python
    ckpt = Checkpointer("runs", "mlp", async_save=True)
    ckpt.save_checkpoint(state, step=100)   # returns at once
    try:
        ckpt.wait_until_finished()
    except CheckpointSaveError as e:        # the background write failed; logged too
        print(e)
    ```
    """


class RunIdWarning(UserWarning):
    """A run with no checkpoint was loaded while runs with a close name have some: the
    ``run_id`` is probably mistyped, and the training loop is about to start from
    scratch in a new, empty run.

    Warned once per :class:`Checkpointer`, when a load finds nothing (names that differ
    only in digits, the siblings of a sweep, are never suggested). Starting a new run on
    purpose, silence it with the standard ``warnings`` filters; to stop at it instead,
    turn it into an error.

    **Example:**

    ```python
    import warnings
    warnings.simplefilter("error", RunIdWarning)   # a mistyped run_id stops the job
    restored = Checkpointer("runs", "alpah").load_latest()
    # RunIdWarning: Run 'alpah' has no checkpoints in runs; did you mean 'alpha'? ...
    ```
    """
