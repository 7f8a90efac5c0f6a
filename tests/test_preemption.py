"""save_on_preemption: a SIGTERM makes the next maybe_save_checkpoints save latest at
that step, ``reached_preemption`` tells the loop to stop, and the restarted run resumes
from exactly that step. The training runs in a child process, as on a cluster."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

from learnax.checkpoint import Checkpointer

# A training loop as a user writes it: resume, train, checkpoint every step (latest
# only every 1000 steps, so a save at any other step comes from the preemption).
TRAIN = textwrap.dedent(
    """
    import sys
    import numpy as np
    from learnax.checkpoint import Checkpointer

    registry, steps = sys.argv[1], int(sys.argv[2])
    ckpt = Checkpointer(registry, "run", save_every=1000, checkpoint_every=None,
                        save_on_preemption=True)
    restored = ckpt.load_latest()
    if restored is None:
        start, w = 1, np.zeros(1000, np.float32)
    else:
        start, w = restored["step"] + 1, restored["state"]["w"]
        print("resumed from", restored["step"], flush=True)
    for step in range(start, steps + 1):
        w = w + np.float32(step)  # the "training"
        ckpt.maybe_save_checkpoints({"w": w}, step)
        if ckpt.reached_preemption:
            print("preempted at", step, flush=True)
            sys.exit(0)
        print("step", step, flush=True)
    print("finished", flush=True)
    """
)


def expected_w(step: int) -> np.ndarray:
    w = np.zeros(1000, np.float32)
    for s in range(1, step + 1):
        w = w + np.float32(s)
    return w


def start_training(registry, steps: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN, registry, str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def test_sigterm_saves_latest_at_that_step_and_the_restart_resumes_from_it(registry):
    child = start_training(registry, steps=10**9)
    try:
        for line in child.stdout:  # let it train a while, then preempt it
            if line.startswith("step 30"):
                child.send_signal(signal.SIGTERM)
                break
        rest, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 0, err
    preempted = [line for line in rest.splitlines() if line.startswith("preempted at")]
    assert preempted, rest + err
    step = int(preempted[0].split()[-1])
    assert step > 30  # the step after the signal arrived, not an interval

    loaded = Checkpointer(registry, "run").load_latest()
    assert loaded["step"] == step
    np.testing.assert_array_equal(loaded["state"]["w"], expected_w(step))

    resumed = start_training(registry, steps=step + 5)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert out.splitlines()[0] == f"resumed from {step}"
    assert f"step {step + 1}" in out.splitlines()
    assert "finished" in out


def test_without_sigterm_reached_preemption_stays_false(registry, sigterm_watch):
    ckpt = Checkpointer(registry, "run", save_every=1000, save_on_preemption=True)
    assert ckpt.reached_preemption is False
    assert ckpt.maybe_save_checkpoints({"w": np.zeros(2)}, 7) == {}
    assert ckpt.reached_preemption is False


@pytest.fixture
def sigterm_watch(monkeypatch):
    """A fresh preemption flag, and the test process's SIGTERM handler put back after."""
    from learnax.checkpoint import _preemption

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(_preemption, "_SIGTERM_RECEIVED", threading.Event())
    monkeypatch.setattr(_preemption, "_SIGTERM_WATCHED", False)
    yield
    signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("async_save", [False, True])
def test_preemption_save_is_committed_before_maybe_save_checkpoints_returns(
    registry, sigterm_watch, async_save
):
    """In-process: a SIGTERM to this process makes the next call save latest whatever
    the interval, committed (also with async_save) by the time the call returns."""
    ckpt = Checkpointer(
        registry, "run", save_every=1000, save_on_preemption=True, async_save=async_save
    )
    os.kill(os.getpid(), signal.SIGTERM)  # handled by learnax: the process lives on
    saved = ckpt.maybe_save_checkpoints({"w": np.ones(3)}, 17)
    assert set(saved) == {"latest"}
    assert ckpt.reached_preemption is True
    assert Checkpointer(registry, "run").load_latest()["step"] == 17
    # Once preempted, later steps do not save again.
    assert ckpt.maybe_save_checkpoints({"w": np.ones(3)}, 18) == {}


def test_a_failed_preemption_save_is_retried_at_the_next_step(registry, sigterm_watch, monkeypatch):
    """If the save after SIGTERM fails (disk full), reached_preemption stays false and the
    next call tries again: the loop only stops once latest is committed."""
    import errno

    from learnax.checkpoint import _write

    ckpt = Checkpointer(registry, "run", save_every=1000, save_on_preemption=True)
    os.kill(os.getpid(), signal.SIGTERM)
    real = _write.write_checkpoint

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_write, "write_checkpoint", disk_full)
    assert ckpt.maybe_save_checkpoints({"w": np.ones(3)}, 17) == {}
    assert ckpt.reached_preemption is False
    monkeypatch.setattr(_write, "write_checkpoint", real)
    assert set(ckpt.maybe_save_checkpoints({"w": np.ones(3)}, 18)) == {"latest"}
    assert ckpt.reached_preemption is True
    assert Checkpointer(registry, "run").load_latest()["step"] == 18
