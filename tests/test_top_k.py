"""``keep_top_k``: the k numbered checkpoints with the best ``metric_name`` are kept.

A numbered checkpoint is kept while it is among the newest ``max_to_keep`` (with
``keep_top_k``, ``None`` keeps none for being new), among the ``keep_top_k`` best by
the metric stored with it (NaN or no value never ranks; of equal values the earlier),
or a multiple of ``keep_period``. A reported metric that ranks saves a numbered
checkpoint at its step, whatever ``checkpoint_every`` says, sharing the one write of
that step with ``latest`` and ``best``. The ranking is read back from the manifests by a
new Checkpointer on the run; while a manifest cannot be read, nothing is deleted.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import random
import uuid

import numpy as np
import pytest
from helpers import assert_tree_equal, learnax_errors, numbered_steps, scaled, small_state
from hypothesis import given, settings
from hypothesis import strategies as st

from learnax.checkpoint import Checkpointer
from learnax.checkpoint._policy import ranks_in_top_k, retention_victims, top_k_steps

LOSS = "val/loss"


def report(ckpt: Checkpointer, values: dict[int, float], name: str = LOSS) -> dict:
    """Report each step's value through maybe_save_checkpoints; the results by step."""
    return {
        step: ckpt.maybe_save_checkpoints(small_state(step), step, {name: value})
        for step, value in values.items()
    }


def best_of(values: dict[int, float], k: int, minimize: bool = True) -> set[int]:
    """The oracle: the k best steps, NaN never, the earlier of equal values first."""
    ranked = sorted(
        (s for s, v in values.items() if not math.isnan(v)),
        key=lambda s: (values[s] if minimize else -values[s], s),
    )
    return set(ranked[:k])


# --------------------------------------------------------------------------- the policy

steps_values = st.dictionaries(
    st.integers(0, 60),
    st.one_of(st.floats(-5, 5, allow_nan=False), st.just(math.nan), st.sampled_from([0.0, 1.0])),
    max_size=25,
)


@given(
    values=steps_values,
    k=st.integers(1, 5),
    max_to_keep=st.one_of(st.none(), st.integers(1, 5)),
    keep_period=st.one_of(st.none(), st.integers(1, 10)),
    minimize=st.booleans(),
)
@settings(max_examples=scaled(100, 400), deadline=None)
def test_retained_steps_are_the_newest_the_k_best_and_the_period_multiples(
    values, k, max_to_keep, keep_period, minimize
):
    steps = sorted(values)
    kept = set(steps) - set(
        retention_victims(steps, max_to_keep, keep_period, top_k_steps(values, k, minimize))
    )
    period = {s for s in steps if keep_period and s % keep_period == 0}
    counted = [s for s in steps if s not in period]
    newest = set(counted[-max_to_keep:]) if max_to_keep else set()
    assert kept == newest | best_of(values, k, minimize) | period


@given(values=steps_values, k=st.integers(1, 4), minimize=st.booleans())
@settings(max_examples=scaled(50, 200), deadline=None)
def test_a_value_ranks_when_it_would_be_among_the_k_best(values, k, minimize):
    step = max(values, default=0) + 1
    for value in (0.0, -7.0, 7.0, math.nan):
        assert ranks_in_top_k(value, step, values, k, minimize) == (
            step in best_of({**values, step: value}, k, minimize)
        )


def test_a_value_replaces_the_stored_value_of_its_own_step():
    # Step 5 saved again (a resumed run) ranks by its new value, not its stored one.
    assert not ranks_in_top_k(3.0, 5, {4: 2.0, 5: 1.0}, 1, minimize=True)
    assert ranks_in_top_k(1.0, 5, {4: 2.0, 5: 3.0}, 1, minimize=True)


def test_without_top_k_retention_is_the_seed_one():
    assert retention_victims([1, 2, 3], None, None) == []
    assert retention_victims([1, 2, 3], 2, None) == [1]


def test_with_top_k_and_no_max_to_keep_only_the_best_and_the_period_multiples_stay():
    assert retention_victims([1, 2, 3, 4], None, 2, top_k={1}) == [3]


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("k", [0, -1])
def test_keep_top_k_below_one_raises_value_error(make_checkpointer, k):
    with pytest.raises(ValueError, match="keep_top_k must be >= 1"):
        make_checkpointer(keep_top_k=k)


@pytest.mark.parametrize("k", [1.5, "3", True])
def test_keep_top_k_not_an_int_raises_type_error(make_checkpointer, k):
    with pytest.raises(TypeError, match="keep_top_k"):
        make_checkpointer(keep_top_k=k)


@pytest.mark.parametrize("name", [None, ""])
def test_keep_top_k_without_a_metric_name_raises_value_error(make_checkpointer, name):
    with pytest.raises(ValueError, match="ranks numbered checkpoints by metric_name"):
        make_checkpointer(keep_top_k=2, metric_name=name)


def test_keep_top_k_is_keyword_only_and_off_by_default(make_checkpointer):
    import inspect

    param = inspect.signature(Checkpointer).parameters["keep_top_k"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None
    assert make_checkpointer().keep_top_k is None
    assert make_checkpointer(keep_top_k=np.int64(2)).keep_top_k == 2


# --------------------------------------------------------------------------- a run

LOSSES = {0: 5.0, 1: 3.0, 2: 4.0, 3: 1.0, 4: 6.0, 5: 2.0, 6: 7.0, 7: 0.5, 8: 8.0}


def test_keeps_the_k_best_by_a_minimized_metric(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=3)
    saved = report(ckpt, LOSSES)
    assert numbered_steps(ckpt) == [3, 5, 7]
    # Saved at the steps that ranked when reported, and only those.
    assert [s for s, r in saved.items() if "numbered" in r] == [0, 1, 2, 3, 5, 7]
    for step in (3, 5, 7):
        loaded = ckpt.load_checkpoint(step)
        assert loaded["metrics"] == {LOSS: LOSSES[step]}
        assert_tree_equal(small_state(step), loaded["state"])


def test_keeps_the_k_best_by_a_maximized_metric(make_checkpointer):
    ckpt = make_checkpointer(
        save_every=None,
        checkpoint_every=None,
        keep_top_k=2,
        metric_name="val/acc",
        minimize_metric=False,
    )
    report(ckpt, LOSSES, name="val/acc")
    assert numbered_steps(ckpt) == [6, 8]


def test_keep_top_k_one_keeps_the_same_step_as_keep_best(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=1, keep_best=True)
    report(ckpt, LOSSES)
    assert numbered_steps(ckpt) == [7]
    assert ckpt.load_best()["step"] == 7
    assert set(ckpt.list_available_checkpoints()) == {"best", "step_7"}


def test_an_equal_value_does_not_displace_the_earlier_one(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=1)
    saved = report(ckpt, {1: 0.5, 2: 0.5})
    assert saved[2] == {}
    assert numbered_steps(ckpt) == [1]


def test_periodic_checkpoints_beyond_max_to_keep_go_unless_among_the_best(make_checkpointer):
    # Numbered every 2 steps (max_to_keep=2 newest); the 2 best whatever their step.
    ckpt = make_checkpointer(save_every=None, checkpoint_every=2, max_to_keep=2, keep_top_k=2)
    saved = report(ckpt, LOSSES)
    assert [s for s, r in saved.items() if "numbered" in r] == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert numbered_steps(ckpt) == [3, 7, 8]  # 7 and 3 the best, 7 and 8 the newest


def test_period_multiples_stay_besides_the_best(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, keep_top_k=1, keep_period=4)
    report(ckpt, LOSSES)
    assert numbered_steps(ckpt) == [0, 4, 7, 8]


def test_without_max_to_keep_a_periodic_step_that_does_not_rank_is_not_saved(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, keep_top_k=2)
    saved = report(ckpt, {0: 1.0, 1: 2.0, 2: 3.0})
    assert saved[2] == {}  # it would only be deleted again
    assert numbered_steps(ckpt) == [0, 1]


def test_list_available_checkpoints_keeps_its_seed_shape(make_checkpointer):
    ckpt = make_checkpointer(save_every=4, checkpoint_every=None, keep_top_k=2, keep_best=True)
    report(ckpt, LOSSES)
    listing = ckpt.list_available_checkpoints()
    assert list(listing) == ["latest", "best", "step_3", "step_7"]
    assert listing["step_3"] == os.path.join(ckpt.checkpoint_dir, "state_3")


def test_a_ranked_step_shares_its_one_write_with_latest_and_best(make_checkpointer):
    ckpt = make_checkpointer(save_every=1, checkpoint_every=None, keep_top_k=2, keep_best=True)
    saved = report(ckpt, {0: 1.0})[0]
    assert set(saved) == {"latest", "numbered", "best"}
    inodes = []
    for name in ("latest", "0", "best"):
        directory = os.path.join(ckpt.checkpoint_dir, f"state_{name}")
        data = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
        inodes.append({os.stat(os.path.join(directory, f)).st_ino for f in data})
    assert inodes[0] == inodes[1] == inodes[2]


# --------------------------------------------------------------------------- no value


def test_nan_never_ranks(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=2)
    saved = report(ckpt, {0: math.nan, 1: 3.0, 2: math.nan, 3: 4.0})
    assert saved[0] == {} and saved[2] == {}
    assert numbered_steps(ckpt) == [1, 3]


def test_a_periodic_checkpoint_with_a_nan_metric_is_the_first_to_go(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=1, keep_top_k=1)
    report(ckpt, {0: math.nan, 1: 9.0, 2: math.nan})
    assert numbered_steps(ckpt) == [1, 2]  # 1 the best, 2 the newest; 0 never ranked


def test_steps_without_the_metric_save_nothing_and_never_rank(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=2, max_to_keep=1, keep_top_k=1)
    for step in range(7):
        metrics = {LOSS: 10.0 - step} if step == 1 else {"train/loss": 0.0}
        saved = ckpt.maybe_save_checkpoints(small_state(step), step, metrics)
        assert ("numbered" in saved) == (step in (1, 0, 2, 4, 6))
    assert numbered_steps(ckpt) == [1, 6]  # 1 the only one ranked, 6 the newest


def test_a_numbered_checkpoint_saved_by_hand_ranks_by_its_metrics(make_checkpointer):
    ckpt = make_checkpointer(keep_top_k=1)
    ckpt.save_checkpoint(small_state(1), step=1, metrics={LOSS: 0.2})
    ckpt.save_checkpoint(small_state(2), step=2, metrics={LOSS: 0.9})
    ckpt.save_checkpoint(small_state(3), step=3)
    assert numbered_steps(ckpt) == [1]


def test_a_stored_metric_that_is_not_a_number_never_ranks(make_checkpointer):
    # A bool is stored as a metric but is no value to rank by: like no value at all.
    ckpt = make_checkpointer(keep_top_k=1)
    ckpt.save_checkpoint(small_state(1), step=1, metrics={LOSS: True})
    ckpt.save_checkpoint(small_state(2), step=2, metrics={LOSS: 0.9})
    assert numbered_steps(ckpt) == [2]


def test_a_changed_metric_name_ranks_by_the_new_metrics_stored_values(make_checkpointer):
    settings = dict(save_every=None, checkpoint_every=None, keep_top_k=1, metric_name="a")
    ckpt = make_checkpointer(**settings)
    assert "numbered" in ckpt.maybe_save_checkpoints(small_state(0), 0, {"a": 1.0, "b": 5.0})
    ckpt.metric_name = "b"
    # By "b", 3.0 beats step 0's stored 5.0 (by "a" it would not beat 1.0).
    assert "numbered" in ckpt.maybe_save_checkpoints(small_state(1), 1, {"a": 9.0, "b": 3.0})
    assert numbered_steps(ckpt) == [1]


# --------------------------------------------------------------------------- restarts


def test_a_restarted_run_keeps_ranking_against_the_stored_metrics(make_checkpointer):
    first = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=2)
    report(first, {0: 5.0, 1: 3.0, 2: 4.0})
    assert numbered_steps(first) == [1, 2]
    again = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=2)
    assert report(again, {3: 4.5})[3] == {}  # worse than both stored
    assert "numbered" in report(again, {4: 3.5})[4]
    assert numbered_steps(again) == [1, 4]


def test_a_restarted_run_never_deletes_a_top_k_checkpoint(make_checkpointer):
    first = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=1, keep_top_k=2)
    report(first, {0: 1.0, 1: 2.0, 2: 9.0})
    assert numbered_steps(first) == [0, 1, 2]
    again = make_checkpointer(save_every=None, checkpoint_every=1, max_to_keep=1, keep_top_k=2)
    report(again, {3: 8.0, 4: 7.0})
    assert numbered_steps(again) == [0, 1, 4]


def test_a_resumed_run_replacing_a_step_ranks_its_new_value(make_checkpointer):
    settings = dict(save_every=None, checkpoint_every=None, keep_top_k=1)
    report(make_checkpointer(**settings), {5: 1.0})
    again = make_checkpointer(**settings)
    # Step 5 saved again (its value replaces the stored one), then a better value.
    assert "numbered" in report(again, {5: 3.0})[5]
    assert "numbered" in report(again, {6: 2.0})[6]
    assert numbered_steps(again) == [6]
    assert again.load_checkpoint(6)["metrics"] == {LOSS: 2.0}


@pytest.mark.parametrize("seed", range(4))
def test_a_run_of_random_values_keeps_the_newest_the_best_and_the_period(registry, seed):
    rnd = random.Random(seed)
    k, max_to_keep, keep_period, every = (
        rnd.randint(1, 3),
        rnd.choice([None, 1, 2]),
        rnd.choice([None, 5]),
        rnd.choice([None, 3]),
    )
    values = {
        s: rnd.choice([math.nan, float(rnd.randint(0, 9))]) for s in range(rnd.randint(5, 20))
    }
    settings = dict(
        save_every=None,
        checkpoint_every=every,
        max_to_keep=max_to_keep,
        keep_period=keep_period,
        keep_top_k=k,
    )
    ckpt = Checkpointer(registry, "run", **settings)
    restart_at = rnd.randrange(len(values))
    for step, value in values.items():
        if step == restart_at:  # a restart halfway: a new Checkpointer on the run
            ckpt = Checkpointer(registry, "run", **settings)
        ckpt.maybe_save_checkpoints(small_state(step), step, {LOSS: value})

    def periodic(s):
        return bool(every) and s % every == 0 and (max_to_keep or (keep_period and s % 5 == 0))

    seen: dict[int, float] = {}
    saved = []
    for step, value in values.items():
        seen[step] = value
        if periodic(step) or step in best_of(seen, k):
            saved.append(step)
    period = {s for s in saved if keep_period and s % keep_period == 0}
    counted = [s for s in saved if s not in period]
    newest = set(counted[-max_to_keep:]) if max_to_keep else set()
    assert set(numbered_steps(ckpt)) == newest | best_of(values, k) | period


# --------------------------------------------------------------------------- async


def test_async_saves_keep_the_same_best(make_checkpointer):
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=3, async_save=True)
    report(ckpt, LOSSES)
    ckpt.close()
    assert numbered_steps(ckpt) == [3, 5, 7]


def test_async_the_save_in_flight_ranks(make_checkpointer):
    # k=1: step 1's value is still being written when step 2 reports a worse one.
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None, keep_top_k=1, async_save=True)
    saved = report(ckpt, {1: 1.0, 2: 2.0})
    ckpt.close()
    assert saved[2] == {}
    assert numbered_steps(ckpt) == [1]


# --------------------------------------------------------------------------- I/O errors


class ManifestReadFault:
    """``os.open`` of one checkpoint's manifest fails with EIO (a transient error of a
    shared filesystem) until repaired."""

    def __init__(self, monkeypatch, checkpoint_dir: str, name: str) -> None:
        self.path = os.path.join(checkpoint_dir, name, "manifest.json")
        self.armed = True
        real = os.open

        def failing_open(path, *args, **kwargs):
            if self.armed and os.fspath(path) == self.path:
                raise OSError(errno.EIO, os.strerror(errno.EIO), self.path)
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", failing_open)


def test_an_unreadable_manifest_deletes_nothing_and_logs(make_checkpointer, monkeypatch, caplog):
    settings = dict(save_every=None, checkpoint_every=1, max_to_keep=1, keep_top_k=1)
    report(make_checkpointer(**settings), {0: 1.0, 1: 5.0})
    assert numbered_steps(make_checkpointer()) == [0, 1]
    again = make_checkpointer(**settings)
    fault = ManifestReadFault(monkeypatch, again.checkpoint_dir, "state_0")
    with caplog.at_level(logging.WARNING, logger="learnax"):
        report(again, {2: 6.0, 3: 7.0})
    assert numbered_steps(again) == [0, 1, 2, 3]  # step 0 might rank: nothing deleted
    assert any("nothing is deleted" in r.getMessage() for r in learnax_errors(caplog))
    fault.armed = False
    report(again, {4: 8.0})
    assert numbered_steps(again) == [0, 4]


def test_an_unreadable_ranking_saves_no_ranked_checkpoint(make_checkpointer, monkeypatch, caplog):
    settings = dict(save_every=None, checkpoint_every=None, keep_top_k=1)
    report(make_checkpointer(**settings), {0: 1.0})
    again = make_checkpointer(**settings)
    fault = ManifestReadFault(monkeypatch, again.checkpoint_dir, "state_0")
    with caplog.at_level(logging.WARNING, logger="learnax"):
        assert report(again, {1: 0.5})[1] == {}
    assert any("cannot be read" in r.getMessage() for r in learnax_errors(caplog))
    assert numbered_steps(again) == [0]
    fault.armed = False
    assert "numbered" in report(again, {2: 0.5})[2]
    assert numbered_steps(again) == [2]


def test_a_damaged_manifest_never_ranks(make_checkpointer):
    settings = dict(save_every=None, checkpoint_every=1, max_to_keep=1, keep_top_k=1)
    report(make_checkpointer(**settings), {0: 1.0, 1: 5.0})
    with open(
        os.path.join(make_checkpointer().checkpoint_dir, "state_0", "manifest.json"), "ab"
    ) as f:
        f.write(b"x")
    again = make_checkpointer(**settings)
    report(again, {2: 6.0})
    assert numbered_steps(again) == [1, 2]


# --------------------------------------------------------------------------- S3


@pytest.fixture
def s3_registry(moto_server):
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    name = f"learnax-{uuid.uuid4().hex[:16]}"
    moto_server.client().create_bucket(Bucket=name)
    yield f"s3://{name}/reg", moto_server.storage_options()
    moto_server.reset()


def test_keeps_the_k_best_on_s3_and_after_a_restart(s3_registry):
    url, options = s3_registry
    settings = dict(save_every=None, checkpoint_every=None, keep_top_k=2, storage_options=options)
    report(Checkpointer(url, "run", **settings), {0: 5.0, 1: 3.0, 2: 4.0})
    again = Checkpointer(url, "run", **settings)
    assert numbered_steps(again) == [1, 2]
    report(again, {3: 4.5, 4: 1.0})
    assert numbered_steps(again) == [1, 4]
    assert again.load_checkpoint(4)["metrics"] == {LOSS: 1.0}


# --------------------------------------------------------------------------- multi-host


def test_two_processes_keep_the_k_best_by_process_0s_metrics(tmp_path):
    from test_multihost import launch

    registry = tmp_path / "registry"
    policy = dict(save_every=None, checkpoint_every=None, keep_top_k=2, metric_name="loss")
    # By process 0's losses steps 1, 2, 3, 4 and 6 rank when reported; by process 1's
    # it would be 1, 2, 3 and 5.
    losses = [[5.0, 3.0, 4.0, 2.0, 6.0, 2.5], [9.0, 1.0, 0.5, 7.0, 0.1, 8.0]]
    run = launch(
        "policy",
        tmp_path / "policy",
        processes=2,
        devices=2,
        params={"registry": str(registry), "policy": policy, "losses": losses},
        timeout=90,
    )
    results = run.check()
    assert results[0]["steps"] == results[1]["steps"]
    saved = [r["step"] for r in results[0]["steps"] if "numbered" in r["saved"]]
    assert saved == [1, 2, 3, 4, 6]
    ckpt = Checkpointer(registry, "run", **policy)
    assert list(ckpt.list_available_checkpoints()) == ["step_4", "step_6"]
    assert ckpt.load_checkpoint(6)["metrics"] == {"loss": 2.5}
