"""A training process SIGKILLed at any instant of its saves leaves a run that a fresh
Checkpointer reads as if the process had stopped between two saves.

One long-lived helper process imports learnax once and forks, for each trial, a child
that resumes the run from ``load_latest()`` and calls ``maybe_save_checkpoints`` every
step on a ~24 MB state whose every byte is a function of the step (latest every step,
numbered every 2 steps with ``max_to_keep=2``, a best metric that improves every 3
steps: retention and best updates happen all the time). The test SIGKILLs the child,
then checks with a fresh Checkpointer in this process that

- no partial checkpoint is listed, opening the run deletes nothing, and the cleanup
  after a writer's first commit leaves only committed checkpoint directories holding
  exactly ``manifest.json`` and the files it names;
- every listed checkpoint loads, without a warning, and is bit for bit the state of
  its recorded step (so it is a state the child really saved, and undamaged);
- ``load_latest()`` returns a step at least that of every numbered checkpoint and of
  every save the child saw return, and never goes backwards from one kill to the next.

Kills land at seeded random delays (``test_random_kills``) and at chosen points inside
the commit protocol (``test_kills_inside_each_step_of_a_save``): the child stops itself
(SIGSTOP) on reaching the point, mid data write, before or after the manifest rename,
during a retention delete or a best-checkpoint update, and is SIGKILLed there.

``LEARNAX_KILL_TRIALS`` is the number of kills, split between the two tests: 60 in the
full sweep (``LEARNAX_FULL_TESTS=1`` or ``--runslow``, as in CI); by default 6 random
kills and one aimed at each point. ``LEARNAX_KILL_SEED`` (default 0) seeds them.
"""

from __future__ import annotations

import collections
import inspect
import json
import math
import os
import queue
import random
import re
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_tree_equal, is_lock_file, nothing_damaged, numbered_steps, scaled

import learnax
from learnax.checkpoint import Checkpointer

# LEARNAX_KILL_TRIALS kills in all, half at random moments and half aimed at the points
# of KILL_POINTS in turn; unset, the sizes of the module's docstring (RANDOM_TRIALS below).
KILL_TRIALS_SET = os.environ.get("LEARNAX_KILL_TRIALS")
KILL_TRIALS = int(KILL_TRIALS_SET or "60")
KILL_SEED = int(os.environ.get("LEARNAX_KILL_SEED", "0"))
RUN = "run"
POLICY = dict(save_every=1, checkpoint_every=2, max_to_keep=2, keep_best=True, metric_name="loss")
TIMEOUT = 60.0  # seconds a child may take to reach a point: a hang guard, not a measurement


def make_state(step: int) -> dict:
    """~24 MB in which every byte depends on the step."""
    words = np.arange(6 << 20, dtype=np.uint32)
    words *= np.uint32(2654435761)
    words ^= np.uint32((step * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF)
    kernel_end = 4 << 20
    return {
        "params": {
            "kernel": words[:kernel_end].view(np.float32).reshape(2048, 2048),
            "bias": words[kernel_end : kernel_end + 2048].view(np.float32),
        },
        "opt_state": [{"mu": words[kernel_end + 2048 :].view(np.int32)}, np.int64(step)],
        "step": np.int64(step),
    }


def loss(step: int) -> float:
    """Improves on every third step, and only there (once the run has a best)."""
    return 1000.0 - step if step % 3 == 0 else 5000.0 + step


# The helper process. It reads one JSON command per line on stdin, forks a child per
# command and reports on stdout: "PID <pid>", then the child's own lines, then
# "DEAD <pid> <wait status>" once the child is gone. The child reports "READY <first
# step>", "BEGIN <step>" before each maybe_save_checkpoints and "SAVED <step> <keys>"
# after it, and an "E <event> <path>" line at each storage operation of a save, made
# visible by wrapping the storage layer (which is all the wrappers do). With a "stop"
# command it SIGSTOPs itself at the chosen event, prints "STOPPED" first, and waits
# there for its SIGKILL.
HELPER = (
    textwrap.dedent(
        """
    import faulthandler, json, os, re, signal, sys, threading, time, traceback
    import numpy as np
    from learnax.checkpoint import Checkpointer
    from learnax.checkpoint import _storage

    POLICY = json.loads(sys.argv[1])
    faulthandler.register(signal.SIGUSR1, all_threads=True)


    def out(*parts):
        os.write(1, (" ".join(str(p) for p in parts) + "\\n").encode())


    def freeze():
        # SIGSTOP sent to the process may be taken by another thread, and this one
        # would run on for a while; sent to this thread, it stops here at once (and
        # the other threads with it). Then wait for the SIGKILL.
        signal.pthread_kill(threading.get_ident(), signal.SIGSTOP)
        while True:
            time.sleep(1)


    def child(command):
        checkpoint_dir = os.path.join(command["registry"], "run", "checkpoints")
        stop = command.get("stop")
        armed, seen = [False], [0]

        def event(name, path=""):
            path = os.fspath(path)
            if os.path.isabs(path) and path.startswith(checkpoint_dir):
                path = os.path.relpath(path, checkpoint_dir)
            out("E", name, path or "-")
            if stop and armed[0] and name == stop[0] and re.search(stop[1], path):
                seen[0] += 1
                if seen[0] == stop[2]:
                    out("STOPPED", name, path)
                    freeze()

        storage = _storage.LocalStorage

        def traced(method, before, after=None):
            original = getattr(storage, method)

            def wrapper(self, path, *args, **kwargs):
                event(before, path)
                result = original(self, path, *args, **kwargs)
                if after:
                    event(after, path)
                return result

            setattr(storage, method, wrapper)

        write_durable = storage.write_durable

        def traced_write(self, path, chunks):
            def counted():
                for i, chunk in enumerate(chunks):
                    event("chunk", path)
                    yield chunk

            event("write", path)
            size = write_durable(self, path, counted())
            event("written", path)
            return size

        storage.write_durable = traced_write
        take = storage.take

        def traced_take(self, source, path):
            # Numbered and best saved at latest's step take its data files (links).
            event("take", path)
            made = take(self, source, path)
            event("taken", path)
            return made

        storage.take = traced_take
        traced("fsync_dir", "fsync_dir")
        traced("remove", "remove", "removed")
        traced("rmtree", "rmtree", "rmtree_done")
        for name in ("replace", "unlink", "rmdir", "fsync", "fdatasync"):
            original = getattr(os, name)

            def wrapper(*args, _original=original, _name=name, **kwargs):
                path = args[1] if _name == "replace" else args[0]
                event(_name, path if isinstance(path, (str, bytes)) else "-")
                return _original(*args, **kwargs)

            setattr(os, name, wrapper)

        ckpt = Checkpointer(command["registry"], "run", **POLICY)
        restored = ckpt.load_latest()
        start = 0 if restored is None else restored["step"] + 1
        armed[0] = True
        out("READY", start)
        for step in range(start, start + 10_000):
            state = make_state(step)
            out("BEGIN", step)
            saved = ckpt.maybe_save_checkpoints(state, step, {"loss": loss(step)})
            out("SAVED", step, ",".join(sorted(saved)) or "-")
        out("END")
    """
    )
    + inspect.getsource(make_state)
    + inspect.getsource(loss)
    + textwrap.dedent(
        """
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        pid = os.fork()
        if pid == 0:
            try:
                child(json.loads(line))
            except BaseException as e:
                out("ERROR", type(e).__name__, str(e).replace("\\n", " ")[:500])
                traceback.print_exc()
            # Never exit on its own: wait for the SIGKILL, so that the pid stays ours.
            freeze()
        out("PID", pid)
        _, status = os.waitpid(pid, 0)
        out("DEAD", pid, status)
    """
    )
)


class Helper:
    """The helper process, and the lines it printed, read by a thread as they come."""

    def __init__(self, stderr_path: Path) -> None:
        # The helper imports the same learnax as this test.
        src = str(Path(learnax.__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HELPER, json.dumps(POLICY)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=env,
        )
        self._lines: queue.Queue[tuple[float, list[str]]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.child: int | None = None

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._lines.put((time.monotonic(), raw.decode(errors="replace").split()))
        self._lines.put((time.monotonic(), ["EOF"]))

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-3000:]

    def expect(self, word: str, log: list[tuple[float, list[str]]]) -> list[str]:
        """The line starting with ``word`` (each comes once per trial), from ``log`` or
        read into it. The child's first lines may come before the helper's PID line."""
        for _, fields in log:
            if fields and fields[0] == word:
                return fields
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                when, fields = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                if self.child is not None:  # where is it stuck? (faulthandler, to stderr)
                    os.kill(self.child, signal.SIGUSR1)
                    time.sleep(1.0)
                raise AssertionError(
                    f"no {word} line within {TIMEOUT} s; stderr:\n{self.stderr_tail()}"
                ) from None
            log.append((when, fields))
            if fields and fields[0] == word:
                return fields
            if fields and fields[0] in ("ERROR", "END", "EOF"):
                raise AssertionError(
                    f"waiting for {word}, the helper said {' '.join(fields)}; "
                    f"stderr:\n{self.stderr_tail()}"
                )

    def start_child(self, registry: str, stop: list | None, log) -> None:
        self.proc.stdin.write((json.dumps({"registry": registry, "stop": stop}) + "\n").encode())
        self.proc.stdin.flush()
        self.child = int(self.expect("PID", log)[1])

    def kill_child(self, log) -> None:
        """SIGKILL the child (its pid cannot have been reused: only the helper reaps it,
        and only once it is dead) and wait until the helper has reaped it."""
        if self.child is None:
            return
        os.kill(self.child, signal.SIGKILL)
        self.child = None
        self.expect("DEAD", log)

    def close(self) -> None:
        if self.child is not None:
            os.kill(self.child, signal.SIGKILL)
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.close()


@pytest.fixture(scope="module")
def helper(tmp_path_factory):
    h = Helper(tmp_path_factory.mktemp("helper") / "stderr.txt")
    yield h
    h.close()


# --- what a kill left -----------------------------------------------------------------


def leftovers(checkpoint_dir: Path) -> list[str]:
    """Directories without a manifest, and files a committed manifest does not name."""
    found = []
    for entry in sorted(os.listdir(checkpoint_dir)):
        path = checkpoint_dir / entry
        if is_lock_file(entry):
            continue
        if not path.is_dir() or not (path / "manifest.json").is_file():
            found.append(entry)
            continue
        named = json.loads((path / "manifest.json").read_text())["manifest"]["files"]
        found += [
            f"{entry}/{n}" for n in os.listdir(path) if n != "manifest.json" and n not in named
        ]
    return found


class RunHistory:
    """What the children of one run did, over all trials so far."""

    def __init__(self) -> None:
        self.highest_begun = -1  # highest step any child began to save
        self.latest_step = -1  # what load_latest() returned after the previous kill
        self.numbered = 0  # how many numbered checkpoints the previous kill left
        self.best_loss = math.inf  # the metric of the best checkpoint after the previous kill
        self.cleaned = 0  # trials after which the fresh Checkpointer had leftovers to remove
        self.landed: collections.Counter[str] = collections.Counter()
        self.step_seconds: list[float] = []


def check_loads(ckpt: Checkpointer, history: RunHistory) -> tuple[dict, dict | None]:
    """Load every checkpoint ``ckpt`` lists, and ``load_latest()``: each must be the
    state of its step, bit for bit, without a warning. Returns ({key: step}, latest)."""
    steps = {}
    with nothing_damaged():  # nothing a mere kill leaves may look damaged
        for key, path in ckpt.list_available_checkpoints().items():
            loaded = ckpt.load_checkpoint(path)
            assert loaded is not None, f"{key} is listed but does not load"
            step = steps[key] = loaded["step"]
            assert step <= history.highest_begun, f"{key} has step {step}, never saved"
            assert_tree_equal(make_state(step), loaded["state"])
            assert loaded["metrics"] == {"loss": loss(step)}, (key, loaded["metrics"])
            if key.startswith("step_"):
                assert step == int(key[len("step_") :]), (key, step)
        latest = ckpt.load_latest()
    return steps, latest


def check_after_kill(registry: str, log, history: RunHistory, reader: Checkpointer) -> None:
    """Everything a reader must see after the child was SIGKILLed: ``reader`` (created
    before the child ran) sees only whole checkpoints; then a fresh Checkpointer, once
    it committed, has removed the leftovers and sees the same."""
    begun = [int(f[1]) for _, f in log if f[0] == "BEGIN"]
    returned = [int(f[1]) for _, f in log if f[0] == "SAVED" and "latest" in f[2].split(",")]
    history.highest_begun = max([history.highest_begun, *begun])
    checkpoint_dir = Path(registry) / RUN / "checkpoints"

    # As the kill left it: every listed checkpoint is whole.
    steps, latest = check_loads(reader, history)
    listing = reader.list_available_checkpoints()
    numbered = numbered_steps(reader)
    assert set(listing) <= {"latest", "best"} | {f"step_{s}" for s in numbered}, listing
    assert all(s % 2 == 0 for s in numbered), numbered
    # A kill between a numbered save's commit and its retention leaves one more than
    # it found. Kills can land there trial after trial (a new writer prunes at its
    # first numbered save, not before); a numbered save that returned pruned to
    # max_to_keep, so at most its own successor's commit can come on top of that.
    pruned = any(f[0] == "SAVED" and "numbered" in f[2].split(",") for _, f in log)
    found = POLICY["max_to_keep"] if pruned else max(history.numbered, POLICY["max_to_keep"])
    assert len(numbered) <= found + 1, (numbered, f"the previous kill left {history.numbered}")
    history.numbered = len(numbered)
    if "best" in steps:
        best = loss(steps["best"])
        assert best <= history.best_loss, f"the best went from {history.best_loss} to {best}"
        history.best_loss = best
    if returned:
        assert latest is not None, f"the save of step {returned[-1]} returned, then nothing"
    if latest is None:
        assert not listing, listing
    else:
        step = latest["step"]
        assert_tree_equal(make_state(step), latest["state"])
        assert step >= max(numbered, default=-1), f"load_latest() gave {step}; numbered {numbered}"
        assert step >= max(returned, default=-1), (
            f"load_latest() gave step {step}, but the save of step {max(returned)} had returned"
        )
        assert step >= history.latest_step, f"load_latest() went back from {history.latest_step}"
        history.latest_step = step
    if leftovers(checkpoint_dir):
        history.cleaned += 1

    # A fresh Checkpointer deletes nothing when it opens the run (it may be a reader);
    # as a writer, its first commit (latest saved again as it is) removes every
    # leftover and keeps every committed checkpoint: only those directories remain,
    # each holding exactly the files its manifest names.
    before = leftovers(checkpoint_dir)
    ckpt = Checkpointer(registry, RUN, **POLICY)
    assert leftovers(checkpoint_dir) == before
    if latest is not None:
        step = latest["step"]
        saved = ckpt.save_latest(make_state(step), step=step, metrics={"loss": loss(step)})
        assert saved is not None
        left = leftovers(checkpoint_dir)
        assert not left, f"left after a fresh Checkpointer's first commit: {left}"
    assert ckpt.list_available_checkpoints() == listing
    if latest is not None:  # else nothing was committed: nothing to clean up after
        on_disk = sorted(e for e in os.listdir(checkpoint_dir) if not is_lock_file(e))
        assert sorted(os.path.basename(p) for p in listing.values()) == on_disk, on_disk
    if "best" in steps:
        assert ckpt.best_metric_value == loss(steps["best"])
    with nothing_damaged():
        after = ckpt.load_latest()
    assert (after and after["step"]) == (latest and latest["step"])
    if after is not None:
        assert_tree_equal(make_state(after["step"]), after["state"])


def checkpoint_kind(path: str) -> str:
    """ "state_latest", "state_best" or "state_<n>" from a path in the checkpoint dir,
    with "(manifest)" when the path is a manifest or its temporary file."""
    kind = re.sub(r"^state_\d+", "state_<n>", path.split("/")[0])
    return f"{kind} (manifest)" if "manifest" in path else kind


def landed(log) -> str:
    """Where the kill landed, from the child's last line: its event and the kind of
    checkpoint it was on."""
    events = [f for _, f in log if f[0] == "E"]
    if events and events[-1][2] == "-":  # fsync/fdatasync of an open file: say which
        last_file = next((f for f in reversed(events) if f[1] == "write"), None)
        if last_file is not None:
            return f"{events[-1][1]} after write {checkpoint_kind(last_file[2])}"
    for _, fields in reversed(log):
        if fields[0] in ("BEGIN", "SAVED", "READY"):
            return {"BEGIN": "saving (state built)", "SAVED": "between steps"}.get(
                fields[0], "starting up"
            )
        if fields[0] == "E" and fields[2] != "-":
            event, path = fields[1], fields[2]
            if event in ("unlink", "rmdir"):
                return f"{event} (rmtree)"
            return f"{event} {checkpoint_kind(path)}"
    return "starting up"


def run_trials(helper: Helper, registry: str, trials: list[dict], name: str) -> str:
    history = RunHistory()
    reader = Checkpointer(registry, RUN, **POLICY)  # before any child: never cleans up
    for number, trial in enumerate(trials):
        log: list[tuple[float, list[str]]] = []
        try:
            helper.start_child(registry, trial.get("stop"), log)
            helper.expect("READY", log)
            if trial.get("stop"):
                helper.expect("STOPPED", log)
            else:
                # A seeded fraction of a few steps (as long as they have lasted so far).
                step_s = statistics.median(history.step_seconds or [0.3])
                time.sleep(trial["fraction"] * 3 * step_s)
            helper.kill_child(log)
            begins = [t for t, f in log if f[0] == "BEGIN"]
            history.step_seconds += [b - a for a, b in zip(begins, begins[1:], strict=False)]
            history.landed[trial.get("point") or landed(log)] += 1
            check_after_kill(registry, log, history, reader)
        except Exception as e:  # a failed check, or a load that raised
            if helper.child is not None:  # leave the helper ready for the next test
                try:
                    helper.kill_child(log)
                except AssertionError:
                    pass
            tail = "\n".join(" ".join(f) for _, f in log[-25:])
            raise AssertionError(
                f"{name}: trial {number + 1} of {len(trials)} ({trial}) failed after "
                f"{number} survived kills: {type(e).__name__}: {e}\n"
                f"last lines of the child:\n{tail}"
            ) from None
    summary = (
        f"{name}: {len(trials)} kills, {len(trials)} survived; leftovers cleaned after "
        f"{history.cleaned}; steps reached {history.highest_begun}; kills landed at "
        f"{dict(sorted(history.landed.items()))}"
    )
    print(f"\n{summary}")
    return summary


# --- the tests ------------------------------------------------------------------------

# Points inside a save to kill at: (event, path regex, how many such events to let
# pass before it). Paths are relative to the checkpoint directory.
KILL_POINTS = {
    "latest: mid data write": ("chunk", r"^state_latest/data-", (1, 6)),
    "latest: data written, manifest not yet": ("write", r"^state_latest/\.manifest-", (1, 1)),
    "latest: before the manifest rename": ("replace", r"^state_latest/manifest\.json$", (1, 1)),
    # The directory is fsynced twice per save: before the rename (the data files'
    # entries) and after it (the rename itself).
    "latest: data files written, directory not fsynced": ("fsync_dir", r"^state_latest$", (1, 1)),
    "latest: renamed, directory not fsynced": ("fsync_dir", r"^state_latest$", (2, 2)),
    "latest: removing the previous data file": ("remove", r"^state_latest/data-", (1, 1)),
    # Numbered and best are due at steps where latest is too: they take latest's data
    # files (hard links) instead of writing them.
    "numbered: directory created, nothing taken": ("take", r"^state_\d+/data-", (1, 1)),
    "numbered: data file taken, manifest not yet": ("taken", r"^state_\d+/data-", (1, 1)),
    "numbered: before the manifest rename": ("replace", r"^state_\d+/manifest\.json$", (1, 1)),
    "retention: before removing the old manifest": (
        "remove",
        r"^state_\d+/manifest\.json$",
        (1, 1),
    ),
    "retention: manifest removed, before rmtree": (
        "removed",
        r"^state_\d+/manifest\.json$",
        (1, 1),
    ),
    "retention: rmtree unlinking the data": ("unlink", r"data-", (1, 1)),
    "retention: rmtree emptied the directory": ("rmdir", r"", (1, 1)),
    "best: data file taken, manifest not yet": ("taken", r"^state_best/data-", (1, 1)),
    "best: before the manifest rename": ("replace", r"^state_best/manifest\.json$", (1, 1)),
    "best: renamed, directory not fsynced": ("fsync_dir", r"^state_best$", (2, 2)),
    "best: removing the previous data file": ("remove", r"^state_best/data-", (1, 1)),
}

if KILL_TRIALS_SET is not None:
    RANDOM_TRIALS = math.ceil(KILL_TRIALS / 2)
    AIMED_TRIALS = KILL_TRIALS - RANDOM_TRIALS
else:
    RANDOM_TRIALS = scaled(6, math.ceil(KILL_TRIALS / 2))
    AIMED_TRIALS = scaled(len(KILL_POINTS), KILL_TRIALS - math.ceil(KILL_TRIALS / 2))


@pytest.mark.skipif(RANDOM_TRIALS == 0, reason="LEARNAX_KILL_TRIALS=0")
def test_random_kills(helper, tmp_path):
    rng = random.Random(f"random-{KILL_SEED}")
    trials = [{"fraction": rng.random()} for _ in range(RANDOM_TRIALS)]
    summary = run_trials(helper, str(tmp_path / "registry"), trials, "random kills")
    assert f"{RANDOM_TRIALS} survived" in summary


@pytest.mark.skipif(AIMED_TRIALS == 0, reason="LEARNAX_KILL_TRIALS=0")
def test_kills_inside_each_step_of_a_save(helper, tmp_path):
    rng = random.Random(f"aimed-{KILL_SEED}")
    points = list(KILL_POINTS)
    rng.shuffle(points)
    trials = []
    for i in range(AIMED_TRIALS):
        point = points[i % len(points)]
        event, pattern, (low, high) = KILL_POINTS[point]
        trials.append({"point": point, "stop": [event, pattern, rng.randint(low, high)]})
    summary = run_trials(helper, str(tmp_path / "registry"), trials, "kills inside a save")
    assert f"{AIMED_TRIALS} survived" in summary


def test_a_damaged_checkpoint_fails_the_check(helper, tmp_path):
    """The check can fail: after a kill, flipping a byte of a listed checkpoint's data
    (something a kill must never cause) makes the check fail."""
    registry = str(tmp_path / "registry")
    run_trials(helper, registry, [{"stop": ["fsync_dir", r"^state_best$", 2]}], "one kill")
    ckpt = Checkpointer(registry, RUN, **POLICY)
    best = Path(ckpt.list_available_checkpoints()["best"])
    data = next(best.glob("*.safetensors"))
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0x10
    data.unlink()  # a file of its own: latest saved at the same step may share this one
    data.write_bytes(bytes(raw))
    history = RunHistory()
    history.highest_begun = 10**6
    with pytest.raises(Exception, match="damaged"):
        check_after_kill(registry, [], history, ckpt)


def test_kills_before_retention_trial_after_trial_are_pruned_by_the_next_numbered_save(
    helper, tmp_path
):
    """Two kills in a row between a numbered commit and its retention leave two
    checkpoints beyond max_to_keep (the check allows it, and can tell); the next
    numbered save that completes prunes back to exactly max_to_keep, newest kept."""
    registry = str(tmp_path / "registry")
    stop = ["remove", r"^state_\d+/manifest\.json$", 1]
    run_trials(helper, registry, [{"stop": stop}, {"stop": stop}], "kills before retention")
    ckpt = Checkpointer(registry, RUN, **POLICY)
    left = numbered_steps(ckpt)
    assert len(left) == POLICY["max_to_keep"] + 2, left
    step = left[-1] + POLICY["checkpoint_every"]
    saved = ckpt.maybe_save_checkpoints(make_state(step), step, {"loss": loss(step)})
    assert "numbered" in saved
    assert numbered_steps(ckpt) == [step - POLICY["checkpoint_every"], step]
