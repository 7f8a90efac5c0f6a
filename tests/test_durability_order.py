"""The order of a local save's durable steps, traced at the system calls.

A crash test cannot see a missing directory fsync: the page cache keeps the directory
entry until the machine loses power, which a killed process never does. So this test
records every ``fsync``, ``rename``, ``mkdir`` and ``link`` a save makes, by path, and
checks the order a power cut needs:

- every data file is fsynced (``fsync``, not only the early ``fdatasync``) before the
  manifest that names it is renamed into place;
- the checkpoint directory is fsynced after its data files (their directory entries,
  links included) and before that rename, and again after it (the commit itself);
- a new checkpoint directory is fsynced in its parent before the rename;
- a data file copied in (a take without hard links) counts as fsynced when it was,
  under its temporary name, before that name was renamed to its own.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import jax.numpy as jnp
import pytest
from helpers import small_state, without_hard_links

from learnax.checkpoint import Checkpointer

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a file descriptor"
)


class SyscallTrace:
    """``(call, path)`` of each traced call, in the order they happened, any thread;
    for a rename, the path it moved is in ``sources`` under the event's index."""

    def __init__(self, monkeypatch) -> None:
        self.events: list[tuple[str, str]] = []
        self.sources: dict[int, str] = {}
        self._lock = threading.Lock()
        for name in ("fsync", "fdatasync"):
            self._trace_fd(monkeypatch, name)
        for name in ("replace", "rename", "link"):
            self._trace_paths(monkeypatch, name, target=1)
        self._trace_paths(monkeypatch, "mkdir", target=0)

    def _add(self, call: str, path: str, source: str | None = None) -> None:
        with self._lock:
            if source is not None:
                self.sources[len(self.events)] = os.path.realpath(source)
            self.events.append((call, os.path.realpath(path)))

    def _trace_fd(self, monkeypatch, name: str) -> None:
        real = getattr(os, name)

        def traced(fd, *args, **kwargs):
            self._add(name, os.readlink(f"/proc/self/fd/{fd}"))
            return real(fd, *args, **kwargs)

        monkeypatch.setattr(os, name, traced)

    def _trace_paths(self, monkeypatch, name: str, target: int) -> None:
        real = getattr(os, name)

        def traced(*args, **kwargs):
            result = real(*args, **kwargs)  # recorded once done: it happened
            source = os.fspath(args[0]) if target == 1 else None
            self._add(name, os.fspath(args[target]), source)
            return result

        monkeypatch.setattr(os, name, traced)

    def where(self, call: str | tuple[str, ...], path) -> list[int]:
        calls = (call,) if isinstance(call, str) else call
        path = os.path.realpath(path)
        return [i for i, (c, p) in enumerate(self.events) if c in calls and p == path]

    def under(self, call: str | tuple[str, ...], directory) -> dict[str, list[int]]:
        """The indices of ``call`` on each file directly in ``directory``, by name."""
        calls = (call,) if isinstance(call, str) else call
        directory = os.path.realpath(directory)
        found: dict[str, list[int]] = {}
        for i, (c, p) in enumerate(self.events):
            if c in calls and os.path.dirname(p) == directory:
                found.setdefault(os.path.basename(p), []).append(i)
        return found


def assert_committed_in_order(trace: SyscallTrace, checkpoint: Path, new_dir: bool) -> None:
    manifest = checkpoint / "manifest.json"
    (rename,) = trace.where(("replace", "rename"), manifest)
    data = {name for name in os.listdir(checkpoint) if name.startswith("data-")}
    assert data, "the checkpoint has no data file"
    synced = trace.under("fsync", checkpoint)
    linked = trace.under("link", checkpoint)  # taken from a checkpoint durable already
    renamed = trace.under(("replace", "rename"), checkpoint)  # a copy put in place
    last_entry = 0
    for name in data:
        if name in linked:
            last_entry = max(last_entry, *linked[name])
            continue
        written = [i for i in synced.get(name, []) if i < rename]
        # A copy is fsynced under its temporary name, then renamed to its own.
        for moved in renamed.get(name, []):
            written += [i for i in trace.where("fsync", trace.sources[moved]) if i < moved]
        assert written, f"{name} was not fsynced before the commit: {trace.events}"
        last_entry = max(last_entry, min(written), *renamed.get(name, [0]))
    directory_syncs = trace.where("fsync", checkpoint)
    assert any(last_entry < i < rename for i in directory_syncs), (
        "the checkpoint directory was not fsynced between its data files and the "
        f"manifest rename: {trace.events}"
    )
    assert any(i > rename for i in directory_syncs), (
        f"the checkpoint directory was not fsynced after the commit: {trace.events}"
    )
    if new_dir:
        (made,) = trace.where("mkdir", checkpoint)
        assert any(made < i < rename for i in trace.where("fsync", checkpoint.parent)), (
            f"the new directory {checkpoint.name} was not fsynced in its parent before "
            f"the commit: {trace.events}"
        )


def test_a_numbered_save_is_made_durable_in_order(registry, monkeypatch):
    ckpt = Checkpointer(registry, "run", save_every=None, checkpoint_every=None)
    trace = SyscallTrace(monkeypatch)
    path = ckpt.save_checkpoint(small_state(1), step=5)
    assert path is not None
    assert_committed_in_order(trace, Path(path), new_dir=True)


def test_replacing_latest_is_made_durable_in_order(registry, monkeypatch):
    ckpt = Checkpointer(registry, "run", save_every=None, checkpoint_every=None)
    assert ckpt.save_latest(small_state(1), step=1) is not None
    trace = SyscallTrace(monkeypatch)
    path = ckpt.save_latest(small_state(2), step=2)
    assert path is not None
    assert_committed_in_order(trace, Path(path), new_dir=False)


@pytest.mark.parametrize("hard_links", [True, False], ids=["linked", "copied"])
def test_checkpoints_that_take_the_data_of_one_write_are_made_durable_in_order(
    registry, monkeypatch, hard_links
):
    """Latest, numbered and best due at one step: one is written, the others take its
    data files, as hard links, or on a filesystem without them as copies (each under a
    temporary name, fsynced there and renamed to its own). Each is a directory entry
    the commit must make durable first: the directory fsync before the manifest rename
    comes after those links or renames."""
    if not hard_links:
        without_hard_links(monkeypatch)
    ckpt = Checkpointer(
        registry, "run", save_every=1, checkpoint_every=1, keep_best=True, metric_name="loss"
    )
    trace = SyscallTrace(monkeypatch)
    state = {"w": jnp.arange(1024.0), "b": jnp.ones(3)}
    saved = ckpt.maybe_save_checkpoints(state, 1, {"loss": 0.5})
    assert set(saved) == {"latest", "numbered", "best"}
    if hard_links:
        assert any(c == "link" for c, _ in trace.events), "nothing linked: no take is covered"
    else:
        copied = [
            path
            for path in saved.values()
            if any(name.startswith("data-") for name in trace.under("rename", path))
        ]
        assert len(copied) == 2, f"not two checkpoints holding copies: {trace.events}"
    for path in saved.values():
        assert_committed_in_order(trace, Path(path), new_dir=True)
