"""``steps()`` and ``latest_step()``: what a run holds, from its listing and manifests
alone, never a data file."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import checkpoint_files, flip_byte, small_state

# Paths opened while a test watches (an audit hook cannot be removed: it records only
# while `_watching` holds a list).
_watching: list[list[str]] = []


def _record_opens(event: str, args: tuple) -> None:
    if _watching and event == "open" and isinstance(args[0], str):
        _watching[-1].append(args[0])


sys.addaudithook(_record_opens)


def opened_during(call):
    """``call()``'s result and the paths of the files it opened."""
    _watching.append([])
    try:
        return call(), _watching[-1]
    finally:
        _watching.pop()


def test_steps_are_the_numbered_checkpoints_ascending_by_number(make_checkpointer):
    ckpt = make_checkpointer(keep_best=True)
    for step in (100, 20, 3):
        ckpt.save_checkpoint(small_state(step), step=step)
    ckpt.save_latest(small_state(150), step=150)
    ckpt.save_checkpoint(small_state(1), step=1, is_best=True)
    ckpt.save_checkpoint(small_state(2), step=2, suffix="warmup")
    assert ckpt.steps() == [3, 20, 100]


def test_steps_and_latest_step_of_an_empty_run(make_checkpointer):
    ckpt = make_checkpointer()
    assert ckpt.steps() == []
    assert ckpt.latest_step() is None


def test_an_uncommitted_checkpoint_directory_is_no_step(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    (Path(ckpt.checkpoint_dir) / "state_7").mkdir()  # an interrupted save: no manifest
    assert ckpt.steps() == [1]
    assert ckpt.latest_step() == 1


def test_latest_step_is_the_higher_of_latest_and_the_numbered(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(10), step=10)
    ckpt.save_latest(small_state(12), step=12)
    assert ckpt.latest_step() == 12 == ckpt.load_latest()["step"]
    ckpt.save_checkpoint(small_state(20), step=20)
    assert ckpt.latest_step() == 20 == ckpt.load_latest()["step"]


def test_on_equal_steps_latest_step_is_that_of_the_checkpoint_load_latest_returns(
    make_checkpointer,
):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=10)
    ckpt.save_latest(small_state(2), step=10)  # another state at the same step: latest wins
    assert ckpt.latest_step() == 10
    loaded = ckpt.load_latest()
    assert loaded["step"] == 10
    np.testing.assert_array_equal(loaded["state"]["params"]["w"], small_state(2)["params"]["w"])


def test_latest_step_agrees_with_load_latest_through_a_training_run(make_checkpointer):
    ckpt = make_checkpointer(save_every=3, checkpoint_every=5, max_to_keep=2)
    for step in range(1, 23):
        ckpt.maybe_save_checkpoints(small_state(step), step, {"val/loss": 1.0 / step})
        loaded = ckpt.load_latest()
        assert ckpt.latest_step() == (None if loaded is None else loaded["step"]), step
    assert ckpt.steps() == [15, 20]


def test_latest_step_and_steps_read_no_data_file(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(5), step=5)
    ckpt.save_latest(small_state(6), step=6)

    step, opened = opened_during(ckpt.latest_step)
    steps, opened_by_steps = opened_during(ckpt.steps)

    assert (step, steps) == (6, [5])
    assert opened, "the audit hook saw no open at all: it cannot tell"
    assert [p for p in opened + opened_by_steps if p.endswith(".safetensors")] == []


def test_latest_step_reports_a_checkpoint_whose_data_files_are_gone(make_checkpointer):
    """It reads manifests only: a checkpoint whose data is missing still counts (where
    load_latest, which reads it, skips it)."""
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(1), step=1)
    newest = ckpt.save_checkpoint(small_state(2), step=2)
    for file in checkpoint_files(newest):
        file.unlink()
    assert ckpt.steps() == [1, 2]
    assert ckpt.latest_step() == 2


@pytest.mark.parametrize("name", ["state_latest", "state_30"])
def test_latest_step_skips_a_checkpoint_whose_manifest_is_damaged_like_load_latest(
    make_checkpointer, name
):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint(small_state(20), step=20)
    ckpt.save_latest(small_state(25), step=25)
    if name == "state_30":
        ckpt.save_checkpoint(small_state(30), step=30)
    flip_byte(Path(ckpt.checkpoint_dir) / name / "manifest.json", -20)
    expected = 25 if name == "state_30" else 20
    assert ckpt.latest_step() == expected == ckpt.load_latest()["step"]
