"""Preemption: a SIGTERM (what schedulers send before they stop a job) turns into a
flag that the next ``maybe_save_checkpoints`` sees, so that the loop saves ``latest``
and stops instead of being killed mid-step. The program's own SIGTERM handler is still
called, and is put back when the last Checkpointer watching SIGTERM is closed. On
multi-host runs JAX's preemption sync point makes every process see it at the same step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType
from typing import Any

import jax

logger = logging.getLogger("learnax")

# Set by the SIGTERM handler; never cleared: once preempted, the job stays preempted.
_SIGTERM_RECEIVED = threading.Event()
# How many PreemptionWatches (open Checkpointers) watch SIGTERM, and the handler that
# ours replaced (what signal.getsignal answered: a callable, SIG_DFL, SIG_IGN, or None
# for a handler installed outside Python).
_watchers = 0
_previous: Any = signal.SIG_DFL
_lock = threading.Lock()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # Only sets an Event before chaining: logging or I/O inside a signal handler could
    # deadlock. The default action (and one of a handler installed outside Python,
    # which cannot be called from here) is NOT taken while a Checkpointer watches:
    # dying at once is what save_on_preemption is there to prevent; the loop saves
    # and stops. SIG_IGN: nothing more to do.
    if _watchers:
        _SIGTERM_RECEIVED.set()
    previous = _previous
    if callable(previous):
        previous(signum, frame)
    elif not _watchers and previous in (signal.SIG_DFL, None):
        # Still installed though nobody watches (close() ran outside the main thread,
        # or a handler installed after ours chained to it): die as the default would.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def watch_sigterm() -> None:
    """Make SIGTERM set the flag (then call the handler it replaced) instead of killing
    the process, until as many :func:`unwatch_sigterm` calls as calls to this one."""
    global _watchers, _previous
    with _lock:
        if _watchers == 0:
            current = signal.getsignal(signal.SIGTERM)
            if current is not _on_sigterm:
                if threading.current_thread() is not threading.main_thread():
                    raise RuntimeError(
                        "save_on_preemption=True must be set up in the main thread "
                        "(Python only installs signal handlers there)."
                    )
                signal.signal(signal.SIGTERM, _on_sigterm)
                _previous = current
        _watchers += 1


def unwatch_sigterm() -> None:
    """Undo one :func:`watch_sigterm`. The last one puts the replaced handler back, if
    ours is still the one installed: a handler the program installed after ours stays."""
    global _watchers
    with _lock:
        _watchers -= 1
        if _watchers or signal.getsignal(signal.SIGTERM) is not _on_sigterm:
            return
        try:
            # None (a handler from outside Python) cannot be put back: the default is.
            signal.signal(signal.SIGTERM, signal.SIG_DFL if _previous is None else _previous)
        except ValueError:  # not the main thread: ours stays, passing SIGTERM on
            pass


class PreemptionWatch:
    """Tells whether the job is being preempted, the same answer on every process."""

    def __init__(self) -> None:
        self._multihost = jax.process_count() > 1
        self._watching = False
        if not self._multihost:
            self._watch()

    def _watch(self) -> None:
        watch_sigterm()
        self._watching = True

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
                self._watch()
        return _SIGTERM_RECEIVED.is_set()

    def close(self) -> None:
        """Stop watching SIGTERM for this Checkpointer (a second call does nothing)."""
        if self._watching:
            self._watching = False
            unwatch_sigterm()


def _forget_lock_after_fork() -> None:
    # A thread of the parent may have held it at the fork; none of them exists here.
    global _lock
    _lock = threading.Lock()


with contextlib.suppress(AttributeError):  # no fork on Windows
    os.register_at_fork(after_in_child=_forget_lock_after_fork)
