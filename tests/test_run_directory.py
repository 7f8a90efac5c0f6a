"""The run directory (``_run``): one canonical name function decides what is a
checkpoint, one listing orders them, the best record is read in one place, and
``load_latest`` prefers ``state_latest`` on equal steps."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from learnax.checkpoint import Checkpointer, _run
from learnax.checkpoint._storage import LocalStorage


@given(st.text(max_size=40))
def test_a_name_taken_for_a_checkpoint_is_exactly_its_canonical_name(entry):
    key = _run.checkpoint_key(entry)
    if key is not None:
        assert _run.checkpoint_name(key) == entry
        assert "/" not in key and "\\" not in key and ".." not in key and "\0" not in key
        assert _run.key_of_name(key) == key


@given(st.integers(0, 10**30))
def test_every_step_round_trips_through_its_name(step):
    key = _run.checkpoint_key(_run.checkpoint_name(step))
    assert key is not None and _run.numbered_step(key) == step


@pytest.mark.parametrize("key", ["007", "00", "²", "１２", "1e3", "-1", "+1", " 1", "latest"])
def test_only_the_canonical_spelling_is_a_numbered_step(key):
    assert _run.numbered_step(key) is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("latest", "latest"),
        ("state_best", "best"),
        ("1000", "1000"),
        ("step_1000", "1000"),
        ("state_1000.pyd", "1000"),
        ("my-run.v2", "my-run.v2"),
    ],
)
def test_a_user_may_name_a_checkpoint_in_each_of_the_ways_it_is_shown(text, key):
    assert _run.key_of_name(text) == key


@pytest.mark.parametrize("text", ["", ".", "..", "a/b", "a\\b", ".hidden", "a..b", "x" * 129])
def test_unsafe_names_are_refused(text):
    with pytest.raises(ValueError, match="not safe"):
        _run.key_of_name(text)


def test_best_record_round_trips_through_a_manifest():
    for value in (0.25, math.inf, -math.inf):
        record = _run.BestRecord("val/loss", value, True)
        assert _run.BestRecord.of_manifest(record.to_manifest()) == record


def test_a_best_saved_by_hand_falls_back_to_its_metrics_value():
    manifest = {"metrics": {"val/loss": 0.5}}
    assert _run.BestRecord.of_manifest(manifest) is None
    record = _run.BestRecord.of_manifest(manifest, metric_name="val/loss", minimize=False)
    assert record == _run.BestRecord("val/loss", 0.5, False)


@pytest.mark.parametrize(
    "best",
    [
        {"metric": 1, "value": 0.5, "minimize": True},
        {"metric": "m", "value": "0.5", "minimize": True},
        {"metric": "m", "value": True, "minimize": True},
        {"metric": "m", "value": 0.5, "minimize": "yes"},
        {"metric": "m", "value": 0.5},
    ],
)
def test_an_unreadable_best_record_is_no_record(best):
    assert _run.BestRecord.of_manifest({"best": best, "metrics": {}}) is None


def _state(x: float) -> dict:
    return {"w": np.full(3, x, np.float32)}


@pytest.mark.parametrize("latest_first", [False, True])
def test_load_latest_prefers_state_latest_on_equal_steps(registry, latest_first):
    ckpt = Checkpointer(registry, "run", save_every=None, checkpoint_every=None)
    saves = [
        lambda: ckpt.save_checkpoint(_state(1.0), step=10, metrics={"from": 1}),
        lambda: ckpt.save_latest(_state(2.0), step=10, metrics={"from": 2}),
    ]
    for save in saves[::-1] if latest_first else saves:
        assert save() is not None
    loaded = Checkpointer(registry, "run").load_latest()
    assert loaded["metrics"] == {"from": 2}
    np.testing.assert_array_equal(loaded["state"]["w"], _state(2.0)["w"])


def test_the_listing_orders_latest_best_numbered_then_other_names(registry):
    ckpt = Checkpointer(registry, "run", keep_best=True)
    for step in (30, 5, 200):
        ckpt.save_checkpoint(_state(step), step=step)
    ckpt.save_checkpoint(_state(0), step=1, suffix="zeta")
    ckpt.save_checkpoint(_state(0), step=1, suffix="alpha")
    ckpt.update_best_checkpoint(_state(0), 0.5, step=1)
    ckpt.save_latest(_state(0), step=1)
    run = _run.RunDirectory(LocalStorage(), ckpt.checkpoint_dir)
    assert run.names() == [
        "state_latest",
        "state_best",
        "state_5",
        "state_30",
        "state_200",
        "state_alpha",
        "state_zeta",
    ]
    assert list(ckpt.list_available_checkpoints()) == [
        "latest",
        "best",
        "step_5",
        "step_30",
        "step_200",
        "alpha",
        "zeta",
    ]


def test_every_listed_name_loads_under_that_name(registry):
    ckpt = Checkpointer(registry, "run", keep_best=True)
    ckpt.save_checkpoint(_state(1), step=7)
    ckpt.save_latest(_state(2), step=8)
    ckpt.update_best_checkpoint(_state(3), 0.1, step=9)
    ckpt.save_checkpoint(_state(4), step=9, suffix="final.v1")
    # Not canonical, made by hand: foreign, so neither step 7 nor a key of its own.
    os.rename(os.path.join(ckpt.checkpoint_dir, "state_7"), ckpt.checkpoint_dir + "/state_007")
    listed = ckpt.list_available_checkpoints()
    assert set(listed) == {"latest", "best", "final.v1"}
    for key, path in listed.items():
        loaded = ckpt.load_checkpoint(key)
        assert loaded is not None, key
        assert ckpt.load_checkpoint(path)["step"] == loaded["step"]
