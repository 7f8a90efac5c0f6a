"""The run's metric history (``<registry>/<run_id>/history/``): every metrics dict a
Checkpointer is given and every checkpoint it commits, read back as one timeline by
``Checkpointer.metric_history``, ``read_metric_history``, ``metric_history`` and the
``learnax plot`` / ``ls`` commands; local and on S3 (moto's server), across a crash and
a resume, bounded, and never a reason for training or a save to fail.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import small_state

from learnax.checkpoint import Checkpointer, _history, metric_history, read_metric_history

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"
CHILD_TIMEOUT = 180  # seconds: a hang guard for the processes a test starts


def env_with_sources() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), str(TESTS_DIR), env.get("PYTHONPATH", "")])
    return env


def reports(records: list[dict], metric: str = "val/loss") -> list[tuple[int, object]]:
    return [(r["step"], r["metrics"][metric]) for r in records if metric in r.get("metrics", {})]


def saves(records: list[dict]) -> list[tuple[int, str]]:
    return [(r["step"], r["saved"]) for r in records if "saved" in r]


def history_files(registry, run: str = "run") -> list[str]:
    directory = Path(registry) / run / "history"
    return sorted(os.listdir(directory)) if directory.exists() else []


# ----------------------------------------------------------------- what is kept


def train_600_steps(ckpt: Checkpointer, start: int = 1, stop: int = 600, offset: float = 0.0):
    """Steps start..stop, val/loss reported every 50 steps (1000 + step + offset)."""
    for step in range(start, stop + 1):
        metrics = {"val/loss": 1000.0 + step + offset} if step % 50 == 0 else None
        ckpt.maybe_save_checkpoints(small_state(), step, metrics)


def test_every_report_is_kept_though_only_two_checkpoints_are(make_checkpointer):
    ckpt = make_checkpointer(save_every=300, checkpoint_every=300, max_to_keep=1)
    train_600_steps(ckpt)
    assert set(ckpt.list_available_checkpoints()) == {"latest", "step_600"}
    history = ckpt.metric_history()
    assert reports(history) == [(s, 1000.0 + s) for s in range(50, 601, 50)]
    assert saves(history) == [(300, "latest"), (300, "300"), (600, "latest"), (600, "600")]
    # A record of a step comes after the reports of that step.
    at_300 = [r for r in history if r["step"] == 300]
    assert "metrics" in at_300[0] and [r.get("saved") for r in at_300[1:]] == ["latest", "300"]


def test_another_process_reads_the_history_a_writer_has_not_closed(make_checkpointer, registry):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    for step in range(1, 6):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    code = textwrap.dedent(
        f"""
        import json
        from learnax.checkpoint import read_metric_history
        print(json.dumps(read_metric_history({os.path.join(registry, "run")!r})))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env_with_sources(),
        timeout=CHILD_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    assert reports(json.loads(done.stdout), "loss") == [(s, float(s)) for s in range(1, 6)]


def test_values_keep_their_json_types_and_non_finite_floats_come_back(make_checkpointer, caplog):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    metrics = {
        "float": 0.5,
        "int": 7,
        "big": 2**70,
        "huge": 10**5000,
        "bool": True,
        "none": None,
        "phase": "warmup",
        "nan": math.nan,
        "inf": math.inf,
        "-inf": -math.inf,
        "np": np.float32(0.25),
        "np_int": np.int64(3),
        "jax": jnp.asarray(1.5),
        "vector": np.ones(3),
    }
    with caplog.at_level(logging.WARNING, logger="learnax"):
        ckpt.maybe_save_checkpoints(small_state(), 1, metrics)
        ckpt.maybe_save_checkpoints(small_state(), 2, {"vector": np.ones(3)})
    [first, second] = ckpt.metric_history()
    record = first["metrics"]
    assert math.isnan(record["nan"])
    assert record["inf"] == math.inf and record["-inf"] == -math.inf
    expected = {"float": 0.5, "int": 7, "big": 2.0**70, "bool": True, "none": None}
    expected.update({"phase": "warmup", "np": 0.25, "np_int": 3, "jax": 1.5})
    assert {k: record[k] for k in expected} == expected
    assert type(record["int"]) is int and type(record["np_int"]) is int
    assert "vector" not in record and "huge" not in record and second["metrics"] == {}
    warned = [r for r in caplog.records if "'vector'" in r.getMessage()]
    assert len(warned) == 1  # once per metric name, not per report
    # The stored lines are strict JSON (no NaN literal).
    (segment,) = history_files(ckpt.registry_path)
    text = (Path(ckpt.registry_path) / "run" / "history" / segment).read_text()
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))


def test_a_jax_value_is_written_once_computed_never_waited_for_on_its_step(
    make_checkpointer, registry
):
    @jax.jit
    def slow_loss(x):
        for _ in range(12):
            x = jnp.tanh(x @ x)
        return x.sum()

    x = jnp.full((512, 512), 1e-3)
    slow_loss(x).block_until_ready()  # compiled
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    ckpt.maybe_save_checkpoints(small_state(), 1, {"loss": 1.0})
    loss = slow_loss(x)
    if loss.is_ready():
        pytest.skip("the device finished before the step reported it")
    ckpt.maybe_save_checkpoints(small_state(), 2, {"loss": loss})
    if loss.is_ready():
        pytest.skip("the device finished while the step reported it")
    # Not computed when the step returned: so the step did not wait for it, and it is
    # not written yet.
    (segment,) = history_files(registry)
    written = (Path(registry) / "run" / "history" / segment).read_text()
    assert [json.loads(line)["step"] for line in written.splitlines()] == [1]
    ckpt.close()
    assert reports(ckpt.metric_history(), "loss") == [(1, 1.0), (2, float(loss))]


class ComputedLater:
    """A 0-d value the way the writer sees a jax array still being computed (the
    device's timing made deterministic): ``is_ready()`` is False until ``finish()``."""

    shape = ()

    def __init__(self, value: float) -> None:
        self.value, self.ready, self.waited = value, False, False

    def is_ready(self) -> bool:
        return self.ready

    def item(self) -> float:
        self.waited = not self.ready
        return self.value

    def finish(self) -> None:
        self.ready = True


def test_reports_wait_in_order_for_values_still_being_computed(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    pending = ComputedLater(2.0)
    ckpt.maybe_save_checkpoints(small_state(), 1, {"loss": 1.0})
    ckpt.maybe_save_checkpoints(small_state(), 2, {"loss": pending})
    ckpt.maybe_save_checkpoints(small_state(), 3, {"loss": 3.0})  # queued behind step 2
    history = read_metric_history(os.path.join(ckpt.registry_path, "run"))
    assert reports(history, "loss") == [(1, 1.0)]
    assert not pending.waited
    pending.finish()
    ckpt.maybe_save_checkpoints(small_state(), 4, {"loss": 4.0})
    history = read_metric_history(os.path.join(ckpt.registry_path, "run"))
    assert reports(history, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert not pending.waited


def test_steps_that_report_nothing_write_nothing(make_checkpointer, registry):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_best=True)
    for step in range(1, 50):
        assert ckpt.maybe_save_checkpoints(small_state(), step) == {}
        assert ckpt.maybe_save_checkpoints(small_state(), step, {}) == {}
    assert history_files(registry) == []
    assert ckpt.metric_history() == []


def test_save_checkpoint_metrics_are_reported_and_every_commit_recorded(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_best=True)
    ckpt.save_checkpoint(small_state(), step=10, metrics={"val/loss": 2.0})
    ckpt.save_latest(small_state(), step=20, metrics={"val/loss": 1.5})
    ckpt.save_checkpoint(small_state(), step=25, suffix="final")
    assert ckpt.update_best_checkpoint(small_state(), 1.0, step=30)
    history = ckpt.metric_history()
    assert reports(history) == [(10, 2.0), (20, 1.5)]
    assert saves(history) == [(10, "10"), (20, "latest"), (25, "final"), (30, "best")]


def test_async_saves_record_their_commits_and_lose_no_report(make_checkpointer):
    ckpt = make_checkpointer(save_every=10, checkpoint_every=None, async_save=True)
    for step in range(1, 101):
        loss = jnp.asarray(float(step))  # a jax value, as a training step returns it
        ckpt.maybe_save_checkpoints({"w": jnp.ones((64, 64)) * step}, step, {"loss": loss})
    ckpt.close()
    history = ckpt.metric_history()
    assert reports(history, "loss") == [(s, float(s)) for s in range(1, 101)]
    assert saves(history) == [(s, "latest") for s in range(10, 101, 10)]


# ----------------------------------------------------------------- crash and resume

CRASHING_WRITER = """
import os, sys
from helpers import small_state
from learnax.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1], "run", save_every=300, checkpoint_every=None)
for step in range(1, 451):
    metrics = {"val/loss": 1000.0 + step} if step % 50 == 0 else None
    ckpt.maybe_save_checkpoints(small_state(), step, metrics)
os._exit(1)  # a crash: no close(), no exit handlers
"""


def test_a_resume_from_an_earlier_step_keeps_each_step_once_from_the_run_that_went_on(
    registry,
):
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, registry],
        capture_output=True,
        text=True,
        env=env_with_sources(),
        timeout=CHILD_TIMEOUT,
    )
    assert done.returncode == 1, done.stderr
    before = read_metric_history(os.path.join(registry, "run"))
    assert reports(before) == [(s, 1000.0 + s) for s in range(50, 451, 50)]

    ckpt = Checkpointer(registry, "run", save_every=300, checkpoint_every=None)
    restored = ckpt.load_latest()
    assert restored["step"] == 300
    train_600_steps(ckpt, start=301, offset=1000.0)
    ckpt.close()

    history = ckpt.metric_history()
    expected = [(s, 1000.0 + s) for s in range(50, 301, 50)]
    expected += [(s, 2000.0 + s) for s in range(350, 601, 50)]
    assert reports(history) == expected
    assert saves(history) == [(300, "latest"), (600, "latest")]
    sessions = {r["step"]: r["session"] for r in history if "metrics" in r}
    assert {sessions[s] for s in range(50, 301, 50)} == {1}
    assert {sessions[s] for s in range(350, 601, 50)} == {2}
    # Every reader agrees, the CLI's included.
    assert read_metric_history(os.path.join(registry, "run")) == history
    assert list(metric_history(os.path.join(registry, "run"), "val/loss").points.items()) == [
        (s, v) for s, v in expected
    ]


def test_a_run_started_afresh_under_the_same_id_supersedes_the_old_history(make_checkpointer):
    old = make_checkpointer(save_every=None, checkpoint_every=None)
    for step in range(0, 100, 10):
        old.maybe_save_checkpoints(small_state(), step, {"loss": 1.0})
    old.close()
    new = make_checkpointer(save_every=None, checkpoint_every=None)
    assert new.load_latest() is None  # what a training script does first: nothing to resume
    for step in range(0, 30, 10):
        new.maybe_save_checkpoints(small_state(), step, {"loss": 2.0})
    assert reports(new.metric_history(), "loss") == [(0, 2.0), (10, 2.0), (20, 2.0)]


def test_reports_of_a_checkpointer_that_resumed_nothing_are_added_not_superseding(
    make_checkpointer,
):
    train = make_checkpointer(save_every=None, checkpoint_every=None)
    for step in range(10, 60, 10):
        train.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    train.close()
    evaluation = make_checkpointer(save_every=None, checkpoint_every=None)
    evaluation.maybe_save_checkpoints(small_state(), 20, {"eval/acc": 0.5})
    evaluation.close()
    history = read_metric_history(evaluation.checkpoint_dir)
    assert reports(history, "loss") == [(s, float(s)) for s in range(10, 60, 10)]
    assert reports(history, "eval/acc") == [(20, 0.5)]


@pytest.mark.parametrize("load", ["best", "step"])
def test_loading_best_or_a_step_to_evaluate_it_drops_no_report(make_checkpointer, load):
    ckpt = make_checkpointer(save_every=300, checkpoint_every=200, keep_best=True)
    for step in range(50, 601, 50):
        ckpt.maybe_save_checkpoints(small_state(), step, {"val/loss": abs(step - 200) + 1.0})
    loaded = ckpt.load_best() if load == "best" else ckpt.load_checkpoint(200)
    assert loaded["step"] == 200
    ckpt.save_checkpoint(loaded["state"], step=200, suffix="final", metrics={"test/acc": 0.9})
    got = reports(ckpt.metric_history(), "val/loss")
    assert got == [(s, abs(s - 200) + 1.0) for s in range(50, 601, 50)]
    assert reports(ckpt.metric_history(), "test/acc") == [(200, 0.9)]


def test_a_load_after_reports_starts_a_new_timeline_from_the_loaded_step(make_checkpointer):
    ckpt = make_checkpointer(save_every=20, checkpoint_every=None)
    for step in range(1, 51):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    assert ckpt.load_latest()["step"] == 40  # a rollback, say after a NaN loss
    for step in range(41, 46):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": -float(step)})
    got = reports(ckpt.metric_history(), "loss")
    assert got == [(s, float(s)) for s in range(1, 41)] + [(s, -float(s)) for s in range(41, 46)]


def test_a_rollback_takes_a_session_no_other_checkpointer_has_taken(make_checkpointer):
    train = make_checkpointer(save_every=10, checkpoint_every=None)
    for step in range(1, 31):
        train.maybe_save_checkpoints(small_state(), step, {"train/loss": float(step)})
    evaluation = make_checkpointer()  # session 2, while training holds session 1
    evaluation.load_checkpoint("latest")
    for step in (10, 20, 30):
        evaluation.maybe_save_checkpoints(small_state(), step, {"eval/acc": step / 100})
    evaluation.close()
    train.load_latest()  # a rollback: a new session, which must not be 2 again
    for step in range(31, 41):
        train.maybe_save_checkpoints(small_state(), step, {"train/loss": float(step)})
    train.close()
    history = train.metric_history()
    assert reports(history, "eval/acc") == [(10, 0.1), (20, 0.2), (30, 0.3)]
    assert [s for s, _ in reports(history, "train/loss")] == list(range(1, 41))


def test_the_timeline_rule():
    def rec(session, n, step, **extra):
        return {"session": session, "n": n, "step": step, "metrics": {}, **extra}

    first = [rec(1, i, step) for i, step in enumerate([10, 20, 30, 40])]
    # Resumed from 20: everything of session 1 past 20 goes, 20 itself stays.
    second = [rec(2, 0, 25, resumed=20), rec(2, 1, 35)]
    kept = _history.timeline(first + second + first[:2])  # duplicates: one of each
    assert [(r["session"], r["step"]) for r in kept] == [(1, 10), (1, 20), (2, 25), (2, 35)]
    # Its first step decides when that is earlier than where it says it resumed.
    third = [rec(3, 0, 15, resumed=30), rec(3, 1, 50)]
    kept = _history.timeline(first + second + third)
    assert [(r["session"], r["step"]) for r in kept] == [(1, 10), (3, 15), (3, 50)]
    # A session that did not resume (an evaluation job) only adds its records.
    fourth = [rec(4, 0, 20), rec(4, 1, 45)]
    kept = _history.timeline(first + second + fourth)
    assert [(r["session"], r["step"]) for r in kept] == [
        (1, 10),
        (1, 20),
        (4, 20),
        (2, 25),
        (2, 35),
        (4, 45),
    ]


def test_a_torn_last_line_is_skipped(make_checkpointer, registry):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    for step in range(1, 4):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    ckpt.close()
    (segment,) = history_files(registry)
    with open(Path(registry) / "run" / "history" / segment, "ab") as f:
        f.write(b'{"session": 1, "n": 3, "step": 4, "metrics": {"loss": 4.')
    assert reports(read_metric_history(os.path.join(registry, "run")), "loss") == [
        (1, 1.0),
        (2, 2.0),
        (3, 3.0),
    ]


# Lines no learnax writer writes: each is skipped, never a reason to raise.
NOT_RECORDS = {
    "two values": b"1,2",
    "two records": b'{"session":0,"n":0,"step":1,"metrics":{}},{"session":0,"n":1,"step":1,"metrics":{}}',
    "nested too deep": b"[" * 100_000 + b"]" * 100_000,
    "metrics not a dict": b'{"session":0,"n":0,"step":1,"time":1,"metrics":5,"saved":"latest"}',
    "saved not a str": b'{"session":0,"n":0,"step":1,"time":1,"saved":5}',
    "a list value": b'{"session":0,"n":0,"step":1,"time":1,"metrics":{"loss":[1,2]}}',
    "an int beyond 64 bits": b'{"session":0,"n":0,"step":1,"metrics":{"loss":1'
    + b"0" * 400
    + b"}}",
    "a bool step": b'{"session":0,"n":0,"step":true,"metrics":{"loss":1}}',
    "not UTF-8": b"\xff\xfe",
}


def write_crafted_segment(registry, lines) -> None:
    directory = Path(registry) / "run" / "history"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "00000000-00000000.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))


def three_reports(make_checkpointer, **kwargs) -> Checkpointer:
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, **kwargs)
    for step in range(1, 4):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    ckpt.close()
    return ckpt


@pytest.mark.parametrize("line", NOT_RECORDS.values(), ids=NOT_RECORDS.keys())
def test_a_line_that_is_not_exactly_one_record_is_skipped(make_checkpointer, registry, line):
    three_reports(make_checkpointer)
    write_crafted_segment(registry, [line])
    history = read_metric_history(os.path.join(registry, "run"))
    assert reports(history, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert metric_history(os.path.join(registry, "run"), "loss").points == {1: 1.0, 2: 2.0, 3: 3.0}


def test_a_segment_of_lines_that_are_not_records_never_fails_training(
    make_checkpointer, registry, small_bound, caplog
):
    write_crafted_segment(registry, NOT_RECORDS.values())
    ckpt = make_checkpointer(save_every=50, checkpoint_every=None)
    with caplog.at_level(logging.WARNING, logger="learnax"):
        for step in range(1, 301):  # compacts, reading the crafted segment
            ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
        ckpt.close()
    steps = [s for s, _ in reports(ckpt.metric_history(), "loss")]
    assert steps[0] == 1 and steps[-10:] == list(range(291, 301))
    assert "00000000-00000000.jsonl" not in history_files(registry)  # compacted away
    assert not [r for r in caplog.records if "Cannot write" in r.getMessage()]


@pytest.mark.parametrize("name", ["00000000-00000000.jsonl", "00000099-00000000.jsonl"])
def test_a_directory_named_like_a_segment_is_skipped_and_left_alone(
    make_checkpointer, registry, small_bound, caplog, name
):
    three_reports(make_checkpointer)
    stray = Path(registry) / "run" / "history" / name  # sorted before the segment, or after
    stray.mkdir()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        history = read_metric_history(os.path.join(registry, "run"))
    assert reports(history, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert [r for r in caplog.records if name in r.getMessage()]
    # A writer compacts around it: it never fails to remove it, nor removes it.
    caplog.clear()
    ckpt = make_checkpointer(save_every=50, checkpoint_every=None)
    with caplog.at_level(logging.WARNING, logger="learnax"):
        for step in range(4, 301):
            ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
        ckpt.close()
    assert not [r for r in caplog.records if "Cannot write" in r.getMessage()]
    assert stray.is_dir() and len(history_files(registry)) <= 3
    steps = [s for s, _ in reports(ckpt.metric_history(), "loss")]
    assert steps[:1] == [1] and steps[-10:] == list(range(291, 301))


def test_any_error_of_the_history_is_logged_never_raised(
    make_checkpointer, small_bound, monkeypatch, caplog
):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in thinning")

    monkeypatch.setattr(_history, "thin", broken)
    ckpt = make_checkpointer(save_every=50, checkpoint_every=None)
    with caplog.at_level(logging.WARNING, logger="learnax"):
        for step in range(1, 301):
            ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
        ckpt.close()
    assert ckpt.load_latest()["step"] == 300
    errors = [r for r in caplog.records if "metric history" in r.getMessage()]
    assert len(errors) == 1 and "a bug in thinning" in errors[0].getMessage()


# ----------------------------------------------------------------- bounded


@pytest.fixture
def small_bound(monkeypatch):
    monkeypatch.setenv("LEARNAX_HISTORY_MAX_BYTES", "8192")
    return 8192


def test_the_history_stays_within_its_bound_thinning_the_oldest_reports(
    make_checkpointer, registry, small_bound
):
    ckpt = make_checkpointer(save_every=500, checkpoint_every=None)
    for step in range(1, 3001):
        metrics = {"loss": float(step)}
        if step % 100 == 0:
            metrics = {"val/loss": float(step)}
        ckpt.maybe_save_checkpoints(small_state(), step, metrics)
        size = sum(
            os.path.getsize(Path(registry) / "run" / "history" / n) for n in history_files(registry)
        )
        assert size <= small_bound + 200, f"{size} bytes of history at step {step}"
    ckpt.close()
    history = ckpt.metric_history()
    steps = [s for s, _ in reports(history, "loss")]
    assert len(steps) < 3000 - 30  # thinned
    assert steps[-10:] == list(range(2990, 3000))  # the newest all kept
    assert steps[0] == 1  # the first record of the session kept
    # The rare metric is thinned in proportion, not wiped out by the frequent one.
    val_steps = [s for s, _ in reports(history, "val/loss")]
    assert len(val_steps) >= 5 and val_steps[-3:] == [2800, 2900, 3000]
    # Every save is still named.
    assert saves(history) == [(s, "latest") for s in range(500, 3001, 500)]
    assert len(history_files(registry)) <= 2


@pytest.mark.parametrize("save_every", [None, 100], ids=["reports", "and-saves"])
def test_compacting_again_and_again_never_erodes_the_oldest_reports(
    make_checkpointer, monkeypatch, save_every
):
    """A long run compacts many times: what is kept of each metric stays spread over the
    whole run (no stretch of it left empty, no gap over a sixteenth of the run),
    instead of the oldest part being thinned again at every compaction. Saves recorded
    every hundred steps must not crowd the reports out."""
    monkeypatch.setenv("LEARNAX_HISTORY_MAX_BYTES", "60000")
    compactions = []
    compact = _history.HistoryWriter._compact
    monkeypatch.setattr(
        _history.HistoryWriter, "_compact", lambda self: compactions.append(1) or compact(self)
    )
    ckpt = make_checkpointer(save_every=save_every, checkpoint_every=None)
    last = 20_000
    for step in range(1, last + 1):
        metrics = {"loss": 1.0 / step}
        if step % 50 == 0:
            metrics["val/loss"] = 2.0 / step
        ckpt.maybe_save_checkpoints(small_state(), step, metrics)
    ckpt.close()
    assert len(compactions) >= 5, "the run must compact again and again"
    history = ckpt.metric_history()
    for metric in ("loss", "val/loss"):
        steps = [s for s, _ in reports(history, metric)]
        gaps = [b - a for a, b in zip(steps, steps[1:], strict=False)]
        assert len(steps) >= 20, (metric, len(steps))
        assert max(gaps) <= last / 16, (metric, max(gaps), len(steps))
        tenths = {min(9, s * 10 // last) for s in steps}
        assert tenths == set(range(10)), (metric, sorted(tenths))


def test_many_sessions_are_compacted_into_few_segments(make_checkpointer, registry):
    for session in range(_history._MAX_SEGMENTS + 5):
        ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
        ckpt.maybe_save_checkpoints(small_state(), session, {"loss": float(session)})
        ckpt.close()
    assert len(history_files(registry)) <= _history._MAX_SEGMENTS + 1
    n = _history._MAX_SEGMENTS + 5
    assert reports(ckpt.metric_history(), "loss") == [(s, float(s)) for s in range(n)]


def test_one_report_larger_than_the_bound_neither_erases_the_others_nor_compacts_each_step(
    make_checkpointer, small_bound, monkeypatch
):
    compactions = []
    compact = _history.HistoryWriter._compact
    monkeypatch.setattr(
        _history.HistoryWriter, "_compact", lambda self: compactions.append(1) or compact(self)
    )
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    ckpt.maybe_save_checkpoints(small_state(), 1, {"config": "x" * 3 * small_bound})
    for step in range(2, 2002):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": 1.0 / step})
    ckpt.close()
    history = ckpt.metric_history()
    assert len(reports(history, "config")) == 1
    steps = [s for s, _ in reports(history, "loss")]
    assert len(steps) > 50 and steps[-10:] == list(range(1992, 2002))
    assert len(compactions) < 100  # not one a report


def test_thin_keeps_saves_and_the_first_record_of_each_session():
    records = [{"session": 1, "n": i, "step": i, "metrics": {"loss": 1.0}} for i in range(100)]
    records[50] = {"session": 1, "n": 50, "step": 50, "saved": "latest"}
    records += [
        {"session": 2, "n": i, "step": 100 + i, "metrics": {"loss": 1.0}} for i in range(100)
    ]
    kept = _history.thin(records, budget=3000)
    always = [records[0], records[100], records[-1]]  # not counted against the budget
    size = sum(len(_history._line(r)) for r in kept)
    assert size <= 3000 + sum(len(_history._line(r)) for r in always)
    assert records[50] in kept and records[0] in kept and records[100] in kept
    assert kept[-1] == records[-1]


def test_thin_keeps_the_newest_record_when_nothing_else_fits():
    """The newest record says where the run is: no budget drops it (nor a session's
    first, which says where the session began)."""
    records = [{"session": 1, "n": i, "step": i, "metrics": {"loss": 1.0}} for i in range(100)]
    kept = _history.thin(records, budget=0)
    assert records[-1] in kept and records[0] in kept
    assert len(kept) < 10  # everything else that could go went


def test_one_huge_report_does_not_make_every_other_report_give_way():
    """A kind of report with fewer than three (one huge metrics dict) is not counted
    against the budget: the other reports are thinned for their own bytes only."""
    small = [{"session": 1, "n": i, "step": i, "metrics": {"loss": 1.0}} for i in range(100)]
    huge = {
        "session": 1,
        "n": 100,
        "step": 100,
        "metrics": {f"layer{j}/norm": 1.0 for j in range(500)},
    }
    records = [*small, huge, {"session": 1, "n": 101, "step": 101, "metrics": {"loss": 1.0}}]
    small_bytes = sum(len(_history._line(r)) for r in small)
    assert len(_history._line(huge)) > small_bytes  # bigger than all the others together
    kept = _history.thin(records, budget=small_bytes // 2)
    assert huge in kept
    kept_small = [r for r in kept if r in small]
    # Half the budget of the small ones: about half of them stay (a power-of-two
    # spacing, the newest quarter whole), not just the protected first and last.
    assert len(kept_small) >= 40, len(kept_small)


# ----------------------------------------------------------------- failures, processes


def test_a_history_that_cannot_be_written_never_fails_training(make_checkpointer, registry, caplog):
    os.makedirs(os.path.join(registry, "run"))
    Path(registry, "run", "history").write_text("not a directory")
    ckpt = make_checkpointer(save_every=10, checkpoint_every=None)
    with caplog.at_level(logging.WARNING, logger="learnax"):
        for step in range(1, 31):
            saved = ckpt.maybe_save_checkpoints(small_state(), step, {"loss": 1.0})
            assert ("latest" in saved) == (step % 10 == 0)
        ckpt.close()
    assert ckpt.load_latest()["step"] == 30
    errors = [r for r in caplog.records if "metric history" in r.getMessage()]
    assert len(errors) == 1, [r.getMessage() for r in errors]


def test_after_a_failure_reports_wait_for_the_next_commit_and_are_written_then(
    make_checkpointer, registry
):
    os.makedirs(os.path.join(registry, "run"))
    blocker = Path(registry, "run", "history")
    blocker.write_text("not a directory")
    ckpt = make_checkpointer(save_every=10, checkpoint_every=None)
    for step in range(1, 10):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    blocker.unlink()  # storage is back
    for step in range(10, 13):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    history = ckpt.metric_history()
    # Step 1's report met the failure; the others waited in memory for the commit at 10.
    assert reports(history, "loss") == [(s, float(s)) for s in range(2, 13)]
    assert saves(history) == [(10, "latest")]


def test_a_writer_that_is_not_process_0_writes_nothing(tmp_path):
    storage = _history.LocalStorage()
    run = str(tmp_path / "run")
    writer = _history.HistoryWriter(storage, run, enabled=False)
    writer.report(1, {"loss": 1.0})
    writer.committed("latest", 1)
    writer.resumed(1)
    writer.close()
    assert not os.path.exists(os.path.join(run, "history"))
    enabled = _history.HistoryWriter(storage, run)
    enabled.report(1, {"loss": 1.0})
    enabled.close()
    assert reports(_history.read_history(storage, run), "loss") == [(1, 1.0)]


def test_a_report_while_a_background_commit_holds_the_lock_does_not_wait(tmp_path):
    writer = _history.HistoryWriter(_history.LocalStorage(), str(tmp_path / "run"))
    writer.report(1, {"loss": 1.0})
    writer._lock.acquire()  # a commit in progress on the save thread
    try:
        done = threading.Event()
        t = threading.Thread(target=lambda: (writer.report(2, {"loss": 2.0}), done.set()))
        t.start()
        t.join(timeout=30)  # a hang guard: the report does not wait for the lock at all
        assert done.is_set()  # returned while the lock was held
    finally:
        writer._lock.release()
    writer.committed("latest", 2)
    got = _history.read_history(_history.LocalStorage(), str(tmp_path / "run"))
    assert reports(got, "loss") == [(1, 1.0), (2, 2.0)]
    assert saves(got) == [(2, "latest")]


READING_WHILE_WRITTEN = """
import sys
from helpers import small_state
from learnax.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1], "run", save_every=100, checkpoint_every=None)
for step in range(1, 2001):
    ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
ckpt.close()
"""


def test_a_reader_in_another_process_sees_a_consistent_history_while_it_is_written(
    registry, small_bound
):
    env = {**env_with_sources(), "LEARNAX_HISTORY_MAX_BYTES": str(small_bound)}
    writer = subprocess.Popen(
        [sys.executable, "-c", READING_WHILE_WRITTEN, registry],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = os.path.join(registry, "run")
    newest = 0
    reads = 0
    try:
        while writer.poll() is None or reads == 0:
            history = read_metric_history(run)
            steps = [s for s, _ in reports(history, "loss")]
            assert steps == sorted(set(steps)), "a step twice, or out of order"
            if steps:
                assert steps[-1] >= newest, "the history went back in time"
                newest = steps[-1]
            reads += 1
    finally:
        _, stderr = writer.communicate(timeout=CHILD_TIMEOUT)
    assert writer.returncode == 0, stderr
    final = read_metric_history(run)
    assert reports(final, "loss")[-1] == (2000, 2000.0)
    # Thinned to the bound like the reports (the newest quarter whole), never invented.
    recorded = saves(final)
    assert set(recorded) <= {(s, "latest") for s in range(100, 2001, 100)}
    assert recorded[-5:] == [(s, "latest") for s in range(1600, 2001, 100)]


# ----------------------------------------------------------------- object storage


@pytest.fixture
def s3_registry(moto_server):
    pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    name = f"learnax-{uuid.uuid4().hex[:16]}"
    client = moto_server.client()
    client.create_bucket(Bucket=name)

    def keys(prefix: str) -> list[str]:
        found = client.list_objects_v2(Bucket=name, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"][len(prefix) :] for o in found)

    yield f"s3://{name}/reg", moto_server.storage_options(), keys
    moto_server.reset()


def test_on_s3_reports_are_written_as_segments_at_commits_and_close(s3_registry):
    url, options, keys = s3_registry
    ckpt = Checkpointer(url, "run", save_every=300, checkpoint_every=None, storage_options=options)
    train_600_steps(ckpt, stop=450)
    # Written at the commit of step 300; what came after is still in memory, but the
    # writer's own view has it.
    assert len(keys("reg/run/history/")) == 1
    assert reports(ckpt.metric_history())[-1] == (450, 1450.0)
    other = read_metric_history(f"{url}/run", storage_options=options)
    assert reports(other)[-1] == (300, 1300.0)
    ckpt.close()
    assert len(keys("reg/run/history/")) == 2
    assert not any(k.startswith("reg/run/checkpoints/history") for k in keys("reg/run/"))
    # A resume from 300 on S3: the steps past it from the new session only.
    resumed = Checkpointer(
        url, "run", save_every=300, checkpoint_every=None, storage_options=options
    )
    assert resumed.load_latest()["step"] == 300
    train_600_steps(resumed, start=301, offset=1000.0)
    resumed.close()
    history = read_metric_history(f"{url}/run", storage_options=options)
    expected = [(s, 1000.0 + s) for s in range(50, 301, 50)]
    expected += [(s, 2000.0 + s) for s in range(350, 601, 50)]
    assert reports(history) == expected
    assert saves(history) == [(300, "latest"), (600, "latest")]


def test_on_s3_many_segments_are_compacted(s3_registry, monkeypatch):
    monkeypatch.setattr(_history, "_MAX_SEGMENTS", 4)
    url, options, keys = s3_registry
    ckpt = Checkpointer(url, "run", save_every=1, checkpoint_every=None, storage_options=options)
    for step in range(1, 13):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
        assert len(keys("reg/run/history/")) <= 5
    ckpt.close()
    history = read_metric_history(f"{url}/run", storage_options=options)
    assert reports(history, "loss") == [(s, float(s)) for s in range(1, 13)]
    assert saves(history) == [(s, "latest") for s in range(1, 13)]


# ----------------------------------------------------------------- the command line


def run_cli(*args) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "learnax", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env={**env_with_sources(), "COLUMNS": "200"},
        stdin=subprocess.DEVNULL,
        timeout=CHILD_TIMEOUT,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture
def run_of_600_steps(registry) -> str:
    """A run that kept 2 checkpoints but reported val/loss 12 times."""
    ckpt = Checkpointer(registry, "run", save_every=300, checkpoint_every=300, max_to_keep=1)
    train_600_steps(ckpt)
    ckpt.close()
    return os.path.join(registry, "run")


def test_plot_json_gives_every_report_not_only_the_checkpoints(run_of_600_steps):
    series = json.loads(run_cli("plot", run_of_600_steps, "--metric", "val/loss", "--json").stdout)
    assert series["source"] == "history"
    assert series["points"] == [{"step": s, "value": 1000.0 + s} for s in range(50, 601, 50)]
    assert series["best"] == {"step": 50, "value": 1050.0}


def test_plot_draws_every_report(run_of_600_steps, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot.png"
    done = run_cli("plot", run_of_600_steps, "--metric", "val/loss", "-o", out)
    assert "12 reports" in done.stdout
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_of_a_run_without_a_history_uses_its_checkpoints(run_of_600_steps):
    for name in os.listdir(os.path.join(run_of_600_steps, "history")):
        os.remove(os.path.join(run_of_600_steps, "history", name))
    os.rmdir(os.path.join(run_of_600_steps, "history"))
    series = json.loads(run_cli("plot", run_of_600_steps, "--metric", "val/loss", "--json").stdout)
    assert series["source"] == "checkpoints"
    assert series["points"] == [{"step": 600, "value": 1600.0}]  # latest and step_600


def test_ls_of_a_run_sums_up_its_history(run_of_600_steps):
    text = run_cli("ls", run_of_600_steps).stdout
    assert "metric history: 12 report(s), steps 50-600, 4 save(s)" in text
    assert "last at step 600: val/loss=1600" in text
    listing = json.loads(run_cli("ls", run_of_600_steps, "--json").stdout)
    assert listing["history"] == {
        "reports": 12,
        "saves": 4,
        "first_step": 50,
        "last_step": 600,
        "last_metrics": {"step": 600, "metrics": {"val/loss": 1600.0}},
    }


def test_ls_and_plot_of_a_run_with_lines_that_are_not_records(make_checkpointer, registry):
    three_reports(make_checkpointer, max_to_keep=1)
    write_crafted_segment(registry, NOT_RECORDS.values())
    run = os.path.join(registry, "run")
    assert json.loads(run_cli("ls", run, "--json").stdout)["history"]["reports"] == 3
    series = json.loads(run_cli("plot", run, "--metric", "loss", "--json").stdout)
    assert series["points"] == [{"step": s, "value": float(s)} for s in (1, 2, 3)]


ENDS_WITHOUT_CLOSE = """
import json, sys
from helpers import small_state
from learnax.checkpoint import Checkpointer

ckpt = Checkpointer(sys.argv[1], "run", save_every=None, checkpoint_every=None,
                    storage_options=json.loads(sys.argv[2]))
for step in range(1, 6):
    ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
# The program ends: no commit, no close().
"""


def test_on_s3_a_program_that_ends_without_close_keeps_its_reports(s3_registry):
    url, options, _ = s3_registry
    done = subprocess.run(
        [sys.executable, "-c", ENDS_WITHOUT_CLOSE, url, json.dumps(options)],
        capture_output=True,
        text=True,
        env=env_with_sources(),
        timeout=CHILD_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr
    history = read_metric_history(f"{url}/run", storage_options=options)
    assert reports(history, "loss") == [(s, float(s)) for s in range(1, 6)]


def test_on_an_object_store_a_failed_segment_write_keeps_its_records_for_the_next_commit(
    monkeypatch,
):
    from learnax.checkpoint._storage import fsspec as fsspec_storage

    pytest.importorskip("fsspec")
    url = f"memory://learnax-{uuid.uuid4().hex[:12]}"
    original = fsspec_storage.FsspecStorage.replace_atomic
    failures = []

    def fails_once(self, path, *args, **kwargs):
        if "/history/" in path and not failures:
            failures.append(path)
            raise OSError(104, "Connection reset by peer")  # transient
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(fsspec_storage.FsspecStorage, "replace_atomic", fails_once)
    ckpt = Checkpointer(url, "run", save_every=100, checkpoint_every=None)
    for step in range(1, 301):
        ckpt.maybe_save_checkpoints(small_state(), step, {"loss": float(step)})
    ckpt.close()

    assert failures  # the segment of the commit at step 100 failed once
    history = read_metric_history(f"{url}/run")
    assert reports(history, "loss") == [(s, float(s)) for s in range(1, 301)]
    assert saves(history) == [(100, "latest"), (200, "latest"), (300, "latest")]
