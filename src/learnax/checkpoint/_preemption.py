"""Preemption: a SIGTERM (what schedulers send before they stop a job) turns into a
flag that the next ``maybe_save_checkpoints`` sees, so that the loop saves ``latest``
and stops instead of being killed mid-step. On multi-host runs JAX's preemption sync
point makes every process see it at the same step.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

logger = logging.getLogger("learnax")

# Set by the SIGTERM handler (installed once per process).
_SIGTERM_RECEIVED = threading.Event()
_SIGTERM_WATCHED = False


def watch_sigterm() -> None:
    """Make SIGTERM set a flag instead of killing the process. The handler only sets an
    Event: logging or I/O inside a signal handler could deadlock."""
    global _SIGTERM_WATCHED
    if _SIGTERM_WATCHED:
        return
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError(
            "save_on_preemption=True must be set up in the main thread (Python only "
            "installs signal handlers there)."
        )
    signal.signal(signal.SIGTERM, lambda signum, frame: _SIGTERM_RECEIVED.set())
    _SIGTERM_WATCHED = True


class PreemptionWatch:
    """Tells whether the job is being preempted, the same answer on every process."""

    def __init__(self) -> None:
        self._multihost = jax.process_count() > 1
        if not self._multihost:
            watch_sigterm()

    def due(self, step: int) -> bool:
        """Whether a preemption notice has arrived by ``step``."""
        if self._multihost:
            from jax.experimental import multihost_utils

            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError as e:  # jax.distributed without its preemption service
                logger.warning(
                    "JAX's preemption sync point is unavailable (%s); watching SIGTERM", e
                )
                self._multihost = False
                watch_sigterm()
        return _SIGTERM_RECEIVED.is_set()
