"""An evaluation job reading a run while training writes it as fast as it can: every
read sees the old checkpoint or the new one whole. Never a healthy checkpoint called
damaged, never ``None`` while a committed checkpoint exists, on a local disk and on an
object store (a moto S3 server).

The writer is another process, as in real use, with the default grace time for
superseded data files; the reader polls in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from helpers import scaled

from learnax.checkpoint import CheckpointCorruptedError, Checkpointer, verify

WRITER = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from learnax.checkpoint import Checkpointer
    registry, options, seconds = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    ckpt = Checkpointer(registry, "run", save_every=1, checkpoint_every=1, max_to_keep=2,
                        storage_options=options or None)
    rng = np.random.default_rng(0)
    step, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        step += 1
        state = {"w": np.full(20_000, step, np.float32), "b": rng.standard_normal(7),
                 "step": step}
        saved = ckpt.maybe_save_checkpoints(state, step)
        assert set(saved) == {"latest", "numbered"}, saved
        print(step, flush=True)
    """
)


def _start_writer(registry: str, options: dict | None, seconds: float) -> subprocess.Popen:
    env = dict(os.environ, LEARNAX_SUPERSEDED_GRACE_S="60")  # the default, not the tests'
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, registry, json.dumps(options or {}), str(seconds)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _consistent(loaded: dict) -> None:
    """A state is whole: its arrays are the ones saved with its step."""
    step = loaded["step"]
    assert loaded["state"]["step"] == step
    np.testing.assert_array_equal(loaded["state"]["w"], np.full(20_000, step, np.float32))


def _poll(
    registry: str, options: dict | None, writer: subprocess.Popen, seconds: float, pause: float
) -> dict:
    ckpt = Checkpointer(registry, "run", storage_options=options)
    counts = {"latest": 0, "load_latest": 0, "verify": 0}
    while ckpt.load_checkpoint("latest") is None:  # the first commit
        assert writer.poll() is None, writer.communicate()[1][-3000:]
        time.sleep(0.01)
    last, end = 0, time.monotonic() + seconds
    while writer.poll() is None and time.monotonic() < end:
        loaded = ckpt.load_checkpoint("latest")  # raises if called damaged
        assert loaded is not None
        _consistent(loaded)
        assert loaded["step"] >= last  # never goes back to an older latest
        last = loaded["step"]
        counts["latest"] += 1
        newest = ckpt.load_latest()
        assert newest is not None
        _consistent(newest)
        counts["load_latest"] += 1
        if counts["verify"] < 5:
            assert verify(ckpt.checkpoint_dir, storage_options=options) == []
            counts["verify"] += 1
        time.sleep(pause)
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err[-3000:]
    counts["saves"] = int(out.split()[-1])
    return counts


# How long the writer runs (seconds), and how many saves and reads make a race at least.
LOCAL_SECONDS, LOCAL_AT_LEAST = scaled(3, 8), scaled(5, 20)
S3_SECONDS, S3_AT_LEAST = scaled(4, 10), scaled(3, 5)


def test_a_reader_racing_a_fast_writer_on_a_local_disk_never_sees_damage(registry):
    writer = _start_writer(registry, None, seconds=LOCAL_SECONDS)
    counts = _poll(registry, None, writer, seconds=LOCAL_SECONDS, pause=0.0)
    print("local:", counts)
    assert counts["saves"] > LOCAL_AT_LEAST and counts["latest"] > LOCAL_AT_LEAST, counts


def test_a_reader_holding_an_old_manifest_still_reads_it_after_the_next_commit(registry):
    """The grace time at work: the data files of a superseded latest stay readable."""
    from learnax.checkpoint import _read, _superseded
    from learnax.checkpoint._manifest import read_manifest
    from learnax.checkpoint._storage import LocalStorage

    ckpt = Checkpointer(registry, "run")
    path = ckpt.save_latest({"w": np.zeros(5)}, step=1)
    storage = LocalStorage()
    old = _read.CheckpointReader(storage, path, read_manifest(storage, path))
    grace = _superseded.SUPERSEDED_GRACE_S
    _superseded.SUPERSEDED_GRACE_S = 60.0
    try:
        ckpt.save_latest({"w": np.ones(5)}, step=2)
        with old:
            old.prefetch(["w"])
            np.testing.assert_array_equal(old.array("w"), np.zeros(5))
        _superseded.remove_now()
        with pytest.raises(CheckpointCorruptedError, match="missing"):
            _read.CheckpointReader(storage, path, old.manifest).open_files()
    finally:
        _superseded.SUPERSEDED_GRACE_S = grace
    assert ckpt.load_latest()["step"] == 2


def test_a_reader_racing_a_fast_writer_on_s3_never_sees_damage(moto_server):
    pytest.importorskip("s3fs")
    import uuid

    name = f"learnax-live-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(name)
    options = moto_server.storage_options()
    writer = _start_writer(f"s3://{name}/reg", options, seconds=S3_SECONDS)
    counts = _poll(f"s3://{name}/reg", options, writer, seconds=S3_SECONDS, pause=0.05)
    print("s3:", counts)
    assert counts["saves"] > S3_AT_LEAST and counts["latest"] > S3_AT_LEAST, counts


@pytest.mark.parametrize("load", ["load_checkpoint('latest')", "load_latest()"])
def test_a_reader_whose_files_were_removed_by_a_commit_reads_the_new_checkpoint(
    registry, monkeypatch, caplog, load
):
    """Deterministic: between reading latest's manifest and opening its data files, a
    writer commits the next latest and its superseded files are removed (a reader that
    stalled past the grace time). The read must see that the manifest changed and read
    the new checkpoint: not call the old one damaged, skip it, or return ``None``."""
    from learnax.checkpoint import _read, _superseded

    writer = Checkpointer(registry, "run", save_every=1, checkpoint_every=None)
    assert writer.save_latest({"w": np.zeros(5)}, step=1) is not None
    reader = Checkpointer(registry, "run")
    real_open = _read.CheckpointReader.open_files
    commits = []

    def open_files_after_a_commit(self):
        if not commits:  # once: the first attempt holds step 1's manifest
            commits.append(writer.save_latest({"w": np.ones(5)}, step=2))
            _superseded.remove_now()
        return real_open(self)

    monkeypatch.setattr(_read.CheckpointReader, "open_files", open_files_after_a_commit)
    loaded = reader.load_checkpoint("latest") if load.startswith("load_c") else reader.load_latest()
    _read_the_new_checkpoint(loaded, commits, caplog)


def test_load_latest_lists_again_when_every_listed_checkpoint_vanished_while_read(
    registry, monkeypatch
):
    """A live run with max_to_keep=1 commits step 3 and removes steps 1 and 2 while
    a reader is between listing them and reading them: the reader lists again and
    gets step 3, not nothing."""
    import shutil

    from learnax.checkpoint import _checkpointer

    writer = Checkpointer(registry, "run", save_every=None, checkpoint_every=1, max_to_keep=1)
    reader = Checkpointer(registry, "run")
    for step in (1, 2):
        Checkpointer(registry, "run").save_checkpoint({"w": np.full(3, step)}, step=step)
    real_read = _checkpointer.read_checkpoint
    raced = []

    def read_during_the_race(storage, directory, *args, **kwargs):
        if not raced:
            raced.append(directory)
            writer.maybe_save_checkpoints({"w": np.full(3, 3)}, 3)
            for step in (1, 2):  # its retention, if the writer's own pruning left them
                shutil.rmtree(os.path.join(registry, "run", "checkpoints", f"state_{step}"), True)
        return real_read(storage, directory, *args, **kwargs)

    monkeypatch.setattr(_checkpointer, "read_checkpoint", read_during_the_race)
    loaded = reader.load_latest()
    assert raced
    assert loaded is not None and loaded["step"] == 3
    np.testing.assert_array_equal(loaded["state"]["w"], np.full(3, 3))


@pytest.mark.parametrize("load", ["load_checkpoint('latest')", "load_latest()"])
def test_a_reader_on_s3_whose_objects_a_commit_removed_after_it_opened_them_reads_the_new_one(
    moto_server, monkeypatch, caplog, load
):
    """On an object store nothing pins an object a read has opened: right after the
    reader opened latest's data files, a writer commits the next latest and its
    superseded objects are removed, so the ranged GETs find them gone. The read must
    see that the manifest changed and read the new checkpoint: not call the old one
    damaged, skip it, or return ``None``."""
    pytest.importorskip("s3fs")
    import uuid

    from learnax.checkpoint import _read, _superseded

    name = f"learnax-live-{uuid.uuid4().hex[:12]}"
    moto_server.create_bucket(name)
    registry, options = f"s3://{name}/reg", moto_server.storage_options()
    writer = Checkpointer(registry, "run", save_every=1, storage_options=options)
    assert writer.save_latest({"w": np.zeros(5)}, step=1) is not None
    reader = Checkpointer(registry, "run", storage_options=options)
    real_open = _read.CheckpointReader.open_files
    commits = []

    def a_commit_after_opening(self):
        opened = real_open(self)
        if not commits:  # once: the first attempt holds step 1's manifest and objects
            commits.append(writer.save_latest({"w": np.ones(5)}, step=2))
            _superseded.remove_now()
        return opened

    monkeypatch.setattr(_read.CheckpointReader, "open_files", a_commit_after_opening)
    loaded = reader.load_checkpoint("latest") if load.startswith("load_c") else reader.load_latest()
    _read_the_new_checkpoint(loaded, commits, caplog)


def _read_the_new_checkpoint(loaded: dict | None, commits: list, caplog) -> None:
    """The commit of step 2 (ones) happened during the read, and the read returned
    it, whole, without calling anything damaged on the way."""
    assert commits and commits[0] is not None
    assert loaded is not None and loaded["step"] == 2
    np.testing.assert_array_equal(loaded["state"]["w"], np.ones(5))
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")], caplog.text
