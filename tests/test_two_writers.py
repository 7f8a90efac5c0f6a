"""Two processes writing one run. learnax makes them safe rather than refusing the
second: every save, deletion and start-up cleanup holds an exclusive lock on the run,
each checkpoint is committed atomically, and the kernel drops the lock of a process
that dies, so a dead writer never blocks the next one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
from helpers import HeldCommit, assert_tree_equal, scaled

from learnax.checkpoint import Checkpointer

WRITER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from learnax.checkpoint import Checkpointer

    registry, writer, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ckpt = Checkpointer(registry, "run", save_every=1, checkpoint_every=3, max_to_keep=4)
    for step in range(writer, steps, 2):  # writer 0 saves even steps, writer 1 odd ones
        state = {"w": np.random.default_rng(step).standard_normal(200_000).astype(np.float32)}
        ckpt.maybe_save_checkpoints(state, step)
    """
)
# Steps the two writers save between them: past max_to_keep numbered ones even quick.
STEPS = scaled(20, 60)


def state_of(step: int) -> dict:
    return {"w": np.random.default_rng(step).standard_normal(200_000).astype(np.float32)}


def test_two_processes_saving_one_run_leave_only_whole_checkpoints(registry):
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, registry, str(i), str(STEPS)], stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    for w in writers:
        _, err = w.communicate(timeout=300)
        assert w.returncode == 0, err.decode()

    ckpt = Checkpointer(registry, "run")
    listed = ckpt.list_available_checkpoints()
    assert "latest" in listed and any(k.startswith("step_") for k in listed)
    for name in listed:
        loaded = ckpt.load_checkpoint(name.removeprefix("step_"))
        assert_tree_equal(state_of(loaded["step"]), loaded["state"])
    for entry in os.listdir(ckpt.checkpoint_dir):
        if entry.startswith("state_"):
            assert os.path.isfile(os.path.join(ckpt.checkpoint_dir, entry, "manifest.json"))


HOLD_LOCK = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(os.path.join(sys.argv[1], ".learnax.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(600)
    """
)


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_save(registry):
    ckpt = Checkpointer(registry, "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, ckpt.checkpoint_dir], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = {}
        saver = threading.Thread(
            target=lambda: result.setdefault("path", ckpt.save_checkpoint(state_of(1), step=1))
        )
        saver.start()
        saver.join(timeout=1.0)
        assert saver.is_alive(), "the save did not wait for the lock held by the other process"
        holder.send_signal(signal.SIGKILL)
        saver.join(timeout=60)  # a hang guard, not a measurement
        assert not saver.is_alive(), "the save still waits for the lock of a dead process"
    finally:
        holder.kill()
        holder.wait()
    assert result["path"] is not None
    assert_tree_equal(state_of(1), ckpt.load_checkpoint(1)["state"])


def test_a_second_writer_waits_while_the_first_is_between_its_data_files_and_commit(
    registry, monkeypatch
):
    """Deterministic: writer B has written its data files and is about to commit when
    writer A saves the same checkpoint. A must wait for the run's lock: were it to go
    ahead, its cleanup would remove B's uncommitted files as superseded, and B's commit
    would then name files that are gone."""
    first = Checkpointer(registry, "run", save_every=None, checkpoint_every=None)
    second = Checkpointer(registry, "run", save_every=None, checkpoint_every=None)
    held = HeldCommit(monkeypatch, "writer-b")
    result = {}
    b = threading.Thread(
        target=lambda: result.setdefault("b", second.save_latest(state_of(2), step=2)),
        name="writer-b",
    )
    a = threading.Thread(
        target=lambda: result.setdefault("a", first.save_latest(state_of(3), step=3))
    )
    b.start()
    try:
        assert held.ready.wait(60), "writer B never reached its commit"
        a.start()
        a.join(timeout=2.0)  # with the lock it is still waiting; without, it is done
        a_waited = a.is_alive()
    finally:
        held.release()
        b.join(timeout=60)
        if a.ident is not None:
            a.join(timeout=60)
    assert result.get("a") is not None and result.get("b") is not None, result
    assert a_waited, "writer A saved while writer B was between its data files and commit"
    loaded = Checkpointer(registry, "run").load_checkpoint("latest")
    assert loaded["step"] == 3  # A committed after B
    assert_tree_equal(state_of(3), loaded["state"])


def test_a_new_writers_first_cleanup_leaves_the_save_another_writer_is_making(
    registry, monkeypatch
):
    """Deterministic: right after a new writer A's first commit, writer B takes the
    run's lock and writes latest's new data files, and stops before its commit. A's
    first cleanup of leftovers runs then: it must leave the run alone while B holds
    the lock (B's uncommitted files look like leftovers of a killed save). B then
    commits, and its latest loads whole."""
    from learnax.checkpoint import _run

    first = Checkpointer(registry, "run", save_every=None, checkpoint_every=None)
    second = Checkpointer(registry, "run", save_every=None, checkpoint_every=None)
    assert second.save_latest(state_of(1), step=1) is not None  # B's own first cleanup
    real_clean = _run.RunDirectory.clean_leftovers
    result = {}
    b = threading.Thread(
        target=lambda: result.setdefault("b", second.save_latest(state_of(2), step=2)),
        name="writer-b",
    )
    held = HeldCommit(monkeypatch, "writer-b")

    def on_disk(run) -> bool:
        return all(os.path.exists(os.path.join(run.path, "state_latest", f)) for f in held.files)

    def clean_while_b_saves(self, now):
        if threading.current_thread() is threading.main_thread() and not b.ident:
            b.start()
            assert held.ready.wait(60), "writer B never reached its commit"
            result["there"] = on_disk(self)
            real_clean(self, now)
            result["kept"] = on_disk(self)
            return None
        return real_clean(self, now)

    monkeypatch.setattr(_run.RunDirectory, "clean_leftovers", clean_while_b_saves)
    try:
        assert first.save_checkpoint(state_of(3), step=3) is not None  # A's first commit
    finally:
        held.release()
        if b.ident:
            b.join(timeout=60)
    monkeypatch.undo()

    assert held.files and result.get("there"), "writer B's files were not on disk"
    assert result.get("kept"), "A's cleanup removed the files of B's save in progress"
    assert result.get("b") is not None, result
    loaded = Checkpointer(registry, "run").load_checkpoint("latest")
    assert loaded["step"] == 2
    assert_tree_equal(state_of(2), loaded["state"])
    assert_tree_equal(state_of(3), first.load_checkpoint(3)["state"])
