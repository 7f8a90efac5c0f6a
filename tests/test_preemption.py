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
    """A fresh preemption flag, no Checkpointer watching SIGTERM, and the test process's
    SIGTERM handler put back after."""
    from learnax.checkpoint import _preemption

    previous = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(_preemption, "_SIGTERM_RECEIVED", threading.Event())
    monkeypatch.setattr(_preemption, "_watchers", 0)
    monkeypatch.setattr(_preemption, "_previous", signal.SIG_DFL)
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


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_a_failed_preemption_save_is_retried_at_the_next_step(
    registry, sigterm_watch, monkeypatch, async_save
):
    """If the save after SIGTERM fails (disk full), reached_preemption stays false and the
    next call tries again: the loop only stops once latest is committed. A background
    save's failure is not raised from the call either (the loop would die unsaved)."""
    import errno

    from learnax.checkpoint import _write

    ckpt = Checkpointer(
        registry, "run", save_every=1000, save_on_preemption=True, async_save=async_save
    )
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


# --- the program's own SIGTERM handler ----------------------------------------------


class ProgramHandler:
    """A SIGTERM handler of the program itself (a logger, a cleanup): counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum, frame) -> None:
        self.calls.append(signum)


@pytest.fixture
def program_handler(sigterm_watch) -> ProgramHandler:
    """A ProgramHandler installed as the SIGTERM handler before any Checkpointer."""
    handler = ProgramHandler()
    signal.signal(signal.SIGTERM, handler)
    return handler


def watching(registry, run_id: str = "run") -> Checkpointer:
    return Checkpointer(registry, run_id, save_every=1000, save_on_preemption=True)


def test_the_programs_own_handler_is_called_once_per_sigterm_after_the_flag_is_set(
    registry, sigterm_watch
):
    from learnax.checkpoint import _preemption

    flag_when_called = []
    signal.signal(
        signal.SIGTERM,
        lambda signum, frame: flag_when_called.append(_preemption._SIGTERM_RECEIVED.is_set()),
    )
    ckpt = watching(registry)
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag_when_called == [True]
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag_when_called == [True, True]
    assert set(ckpt.maybe_save_checkpoints({"w": np.ones(3)}, 5)) == {"latest"}
    assert ckpt.reached_preemption is True
    ckpt.close()


def test_close_puts_the_programs_handler_back(registry, program_handler):
    ckpt = watching(registry)
    assert signal.getsignal(signal.SIGTERM) is not program_handler
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is program_handler


def test_after_close_a_sigterm_reaches_the_programs_handler(registry, program_handler):
    ckpt = watching(registry)
    ckpt.close()
    os.kill(os.getpid(), signal.SIGTERM)
    assert program_handler.calls == [signal.SIGTERM]


def test_close_puts_an_ignored_sigterm_back_and_while_watching_it_sets_the_flag(
    registry, sigterm_watch
):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ckpt = watching(registry)
    os.kill(os.getpid(), signal.SIGTERM)  # the process lives on, the flag is set
    assert set(ckpt.maybe_save_checkpoints({"w": np.ones(3)}, 5)) == {"latest"}
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN


def test_closing_one_of_two_checkpointers_keeps_watching_sigterm(registry, program_handler):
    first, second = watching(registry, "a"), watching(registry, "b")
    first.close()
    first.close()  # a second close does not count twice
    assert signal.getsignal(signal.SIGTERM) is not program_handler
    os.kill(os.getpid(), signal.SIGTERM)
    assert program_handler.calls == [signal.SIGTERM]
    assert set(second.maybe_save_checkpoints({"w": np.ones(3)}, 5)) == {"latest"}
    second.close()
    assert signal.getsignal(signal.SIGTERM) is program_handler


def test_a_checkpointer_made_after_one_closed_in_another_thread_chains_to_the_programs_handler(
    registry, program_handler
):
    first = watching(registry, "a")
    closer = threading.Thread(target=first.close)  # cannot put the handler back there
    closer.start()
    closer.join()
    second = watching(registry, "b")  # finds learnax's handler still installed
    os.kill(os.getpid(), signal.SIGTERM)
    assert program_handler.calls == [signal.SIGTERM]
    assert set(second.maybe_save_checkpoints({"w": np.ones(3)}, 5)) == {"latest"}
    second.close()
    assert signal.getsignal(signal.SIGTERM) is program_handler


def test_a_handler_installed_after_the_checkpointer_is_left_in_place_at_close(
    registry, program_handler
):
    ckpt = watching(registry)
    later = ProgramHandler()
    signal.signal(signal.SIGTERM, later)
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is later
    os.kill(os.getpid(), signal.SIGTERM)
    assert later.calls == [signal.SIGTERM]
    assert program_handler.calls == []


def test_a_checkpointer_without_save_on_preemption_leaves_the_handler_alone(
    registry, program_handler
):
    ckpt = Checkpointer(registry, "run")
    assert signal.getsignal(signal.SIGTERM) is program_handler
    ckpt.close()
    assert signal.getsignal(signal.SIGTERM) is program_handler


@pytest.mark.parametrize(
    "failing",
    [
        pytest.param({"keep_top_k": 2, "metric_name": None}, id="keep_top_k without a metric"),
        pytest.param({"registry_is_a_file": True}, id="a registry under a regular file"),
    ],
)
def test_a_constructor_that_raises_leaves_the_programs_handler_in_place(
    registry, program_handler, failing
):
    """The Checkpointer never came to be, so nobody can close it: nothing may be left
    watching SIGTERM (a SIGTERM would set a flag no loop reads and the job lives on)."""
    failing = dict(failing)
    if failing.pop("registry_is_a_file", False):
        os.makedirs(registry, exist_ok=True)
        blocker = os.path.join(registry, "a-file")
        with open(blocker, "w") as f:
            f.write("not a directory")
        registry = os.path.join(blocker, "runs")
    with pytest.raises((ValueError, TypeError, OSError)):
        Checkpointer(registry, "run", save_on_preemption=True, **failing)
    assert signal.getsignal(signal.SIGTERM) is program_handler
    os.kill(os.getpid(), signal.SIGTERM)
    assert program_handler.calls == [signal.SIGTERM]


# With the default handler before it, a SIGTERM sets the flag and the process lives on
# until the loop has saved (the point of save_on_preemption); once the last Checkpointer
# is closed, SIGTERM kills the process again. In a child process, as it may die.
DEFAULT_HANDLER_SCRIPT = """
import os
import signal
import sys
import threading

import numpy as np

from learnax.checkpoint import Checkpointer

registry, closed_in = sys.argv[1], sys.argv[2]
ckpt = Checkpointer(registry, "run", save_every=1000, save_on_preemption=True)
os.kill(os.getpid(), signal.SIGTERM)
print("saved", sorted(ckpt.maybe_save_checkpoints({"w": np.ones(3)}, 5)), flush=True)
if closed_in == "main-thread":
    ckpt.close()
    print("default back:", signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, flush=True)
else:  # Python sets signal handlers only in the main thread
    closer = threading.Thread(target=ckpt.close)
    closer.start()
    closer.join()
os.kill(os.getpid(), signal.SIGTERM)
print("survived a SIGTERM after close", flush=True)
"""


@pytest.mark.parametrize("closed_in", ["main-thread", "another-thread"])
def test_with_the_default_handler_sigterm_sets_the_flag_and_kills_only_after_close(
    registry, closed_in
):
    done = subprocess.run(
        [sys.executable, "-c", DEFAULT_HANDLER_SCRIPT, registry, closed_in],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert "saved ['latest']" in done.stdout, done.stdout + done.stderr
    if closed_in == "main-thread":
        assert "default back: True" in done.stdout, done.stdout + done.stderr
    assert "survived" not in done.stdout, done.stdout + done.stderr
    assert done.returncode == -signal.SIGTERM, done.stdout + done.stderr


# --- multi-host -----------------------------------------------------------------------


def test_multihost_uses_the_sync_point_and_leaves_the_sigterm_handler_alone(
    program_handler, monkeypatch
):
    from jax.experimental import multihost_utils

    from learnax.checkpoint import _preemption

    monkeypatch.setattr(_preemption.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda step: step == 9)
    watch = _preemption.PreemptionWatch()
    assert signal.getsignal(signal.SIGTERM) is program_handler
    assert watch.due(8) is False
    assert watch.due(9) is True
    watch.close()
    assert signal.getsignal(signal.SIGTERM) is program_handler


def test_multihost_without_the_sync_point_watches_sigterm_until_closed(
    program_handler, monkeypatch
):
    from jax.experimental import multihost_utils

    from learnax.checkpoint import _preemption

    def no_service(step):
        raise RuntimeError("preemption sync manager is not initialized")

    monkeypatch.setattr(_preemption.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", no_service)
    watch = _preemption.PreemptionWatch()
    assert watch.due(1) is False
    os.kill(os.getpid(), signal.SIGTERM)
    assert watch.due(2) is True
    assert program_handler.calls == [signal.SIGTERM]
    watch.close()
    assert signal.getsignal(signal.SIGTERM) is program_handler
