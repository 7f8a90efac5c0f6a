"""Object stores under faults: a transient error is never taken for absence, and a
commit is never undone by its own cleanup (issue 15).

Every test runs a Checkpointer on ``s3://`` through a proxy (s3proxy.py) that injects
faults into chosen requests, and checks what is on the server with a client of its
own that bypasses the proxy. The client retries little (conftest.py), so a fault that
lasts reaches learnax within seconds, as a long outage would. The matrix:

=============================  ===========================  ==============================
request                        fault                        operation
=============================  ===========================  ==============================
HEAD + GET of manifests        503 SlowDown, always         open (nothing deleted),
                                                            load_latest, list, best value,
                                                            best decision
HEAD or GET newest manifest    503 SlowDown, for one call   load_latest
GET newest manifest            503 SlowDown; drop after     load_latest, load by step
GET newest data                500; drop before; truncate   load_latest, load by step
LIST checkpoints/              503 SlowDown, always         load_latest, list
LIST state_latest/ + PUT /     stale listing + 500          save_latest (fails)
  upload part of data
PUT manifest (latest, best)    applied then 500; drop after save_latest sync and async,
                                                            update_best_checkpoint
PUT manifest (held) + HEAD     delay; skew -2 h             a reader opened while the
  + LIST                                                    trainer's async save uploads
DELETE / multi-delete          500, always                  retention
LIST checkpoints/              stale (hides the newest)     retention
=============================  ===========================  ==============================

What must hold (the spec of issue 15): a request that fails for any reason but "not
found" raises ``OSError`` from loads and listings (never ``None``, ``{}`` or an older
checkpoint); nothing committed is ever deleted because a request failed; a manifest
write whose reply was lost is read back to decide whether the save committed.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from helpers import assert_tree_equal, damage_reports
from s3proxy import (
    applied_then,
    delay,
    drop_after,
    drop_before,
    skew,
    stale_list,
    status,
    truncate,
)

from learnax.checkpoint import CheckpointCorruptedError, CheckpointSaveError

MANIFEST = "manifest.json"
SLOW_DOWN = status(503, "SlowDown")
INTERNAL_ERROR = status(500, "InternalError")
# Enough failures in a row to outlast the client's own retries for one call (botocore
# 2 attempts inside s3fs's 2, a read nesting them twice), not a whole outage.
ONE_CALL = 8
BEST = {"keep_best": True, "metric_name": "loss"}


def state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b": np.full(3, step, np.int32),
    }


def committed_run(s3) -> set[str]:
    """A run with numbered steps 5 and 10, best at step 8 (loss 0.5) and latest at
    step 11; returns every object key under its checkpoint directory."""
    ckpt = s3.checkpointer(**BEST)
    assert ckpt.save_checkpoint(state(5), step=5, metrics={"loss": 2.0}) is not None
    assert ckpt.save_checkpoint(state(10), step=10, metrics={"loss": 1.0}) is not None
    assert ckpt.update_best_checkpoint(state(8), 0.5, step=8)
    assert ckpt.save_latest(state(11), step=11) is not None
    ckpt.close()
    return s3.keys(s3.checkpoint_dir())


def throttle_manifest_reads(s3) -> None:
    """Every HEAD and GET of a manifest answers 503 SlowDown (whichever of the two the
    Checkpointer uses to learn whether a checkpoint is committed)."""
    s3.proxy.add("head", MANIFEST, SLOW_DOWN)
    s3.proxy.add("get", MANIFEST, SLOW_DOWN)


def assert_nothing_deleted(s3, before: set[str]) -> None:
    missing = before - s3.keys(s3.checkpoint_dir())
    assert not missing, f"committed objects deleted: {sorted(missing)}"


def assert_raises_oserror(call) -> None:
    """``call()`` raises OSError; if it returns, the failure says what it gave."""
    try:
        result = call()
    except OSError:
        return
    if isinstance(result, dict) and "step" in result:
        result = f"the checkpoint of step {result['step']}"
    pytest.fail(f"no OSError: it returned {result!r}")


def assert_every_listed_checkpoint_loads(ckpt) -> dict[str, int]:
    """Every checkpoint the run lists loads (none names a missing or damaged file);
    returns the step of each."""
    steps = {}
    for name, path in ckpt.list_available_checkpoints().items():
        loaded = ckpt.load_checkpoint(path)
        assert loaded is not None, f"{name} is listed but does not load"
        steps[name] = loaded["step"]
    return steps


# --- throttled manifest reads when a new Checkpointer opens a run --------------------


def test_opening_a_run_while_manifest_reads_are_throttled_deletes_nothing(faulty_s3):
    """A reader that cannot tell whether the manifests exist must not take the
    checkpoints for leftovers of interrupted saves."""
    before = committed_run(faulty_s3)
    throttle_manifest_reads(faulty_s3)

    faulty_s3.checkpointer(**BEST)

    assert_nothing_deleted(faulty_s3, before)


def test_load_latest_raises_oserror_while_manifest_reads_are_throttled(faulty_s3):
    """``None`` means "no checkpoint": a throttled store is not that."""
    committed_run(faulty_s3)
    ckpt = faulty_s3.checkpointer(**BEST)
    throttle_manifest_reads(faulty_s3)

    assert_raises_oserror(ckpt.load_latest)


def test_list_available_checkpoints_raises_oserror_while_manifest_reads_are_throttled(
    faulty_s3,
):
    """``{}`` means "no checkpoint": a listing that cannot tell which checkpoints are
    committed raises instead."""
    committed_run(faulty_s3)
    ckpt = faulty_s3.checkpointer(**BEST)
    throttle_manifest_reads(faulty_s3)

    assert_raises_oserror(ckpt.list_available_checkpoints)


def test_best_metric_value_is_never_inf_while_the_stored_best_cannot_be_read(faulty_s3):
    """While the stored best cannot be read, ``best_metric_value`` raises; once the
    store answers again it is the stored value."""
    committed_run(faulty_s3)
    throttle_manifest_reads(faulty_s3)
    ckpt = faulty_s3.checkpointer(**BEST)

    try:
        value = ckpt.best_metric_value
    except OSError:
        pass
    else:
        assert value == 0.5, f"best_metric_value is {value} while the best is unreadable"
    faulty_s3.proxy.clear()
    assert ckpt.best_metric_value == 0.5


def test_worse_metric_while_the_best_is_unknown_does_not_replace_state_best(faulty_s3):
    """A best decision made while the stored best is unreadable re-reads it; still
    unknown, state_best is not replaced (by a worse checkpoint here)."""
    committed_run(faulty_s3)
    throttle_manifest_reads(faulty_s3)
    ckpt = faulty_s3.checkpointer(**BEST)

    replaced = ckpt.update_best_checkpoint(state(12), 0.75, step=12)

    faulty_s3.proxy.clear()
    assert not replaced
    assert ckpt.load_best()["step"] == 8
    assert ckpt.best_metric_value == 0.5


@pytest.mark.parametrize("kind", ["head", "get"])
def test_one_failed_manifest_read_of_the_newest_never_gives_an_older_step(faulty_s3, kind):
    """The newest checkpoint's manifest fails for one call (after the client's own
    retries): load_latest raises, or retries and returns the newest; it never
    silently falls back to an older checkpoint."""
    committed_run(faulty_s3)
    ckpt = faulty_s3.checkpointer(**BEST)
    faulty_s3.proxy.add(kind, f"state_latest/{MANIFEST}", SLOW_DOWN, times=ONE_CALL)

    try:
        loaded = ckpt.load_latest()
    except OSError:
        return
    assert loaded is not None, "load_latest returned None"
    assert loaded["step"] == 11, f"load_latest gave the older step {loaded['step']}"


# --- a manifest write whose reply is lost --------------------------------------------


def settle(ckpt, saved) -> str | None:
    """The path of an async save once finished, or ``None`` if it failed."""
    try:
        ckpt.wait_until_finished()
    except CheckpointSaveError:
        return None
    return saved


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("fault", [applied_then(500), drop_after], ids=str)
def test_latest_whose_manifest_reply_is_lost_leaves_a_loadable_latest(faulty_s3, fault, async_save):
    """The manifest PUT reaches the store but its reply is lost: either the save
    reads it back and succeeds (returns its path, latest is the new step) or it fails
    and latest is still the old one; no listed checkpoint names a missing file."""
    ckpt = faulty_s3.checkpointer(async_save=async_save)
    assert ckpt.save_latest(state(1), step=1) is not None
    ckpt.wait_until_finished()
    faulty_s3.proxy.add("put", f"state_latest/{MANIFEST}", fault)

    saved = ckpt.save_latest(state(2), step=2)
    if async_save:
        saved = settle(ckpt, saved)

    faulty_s3.proxy.clear()
    latest = ckpt.load_latest()
    assert latest is not None, f"no loadable latest is left (the save returned {saved})"
    assert latest["step"] == (2 if saved else 1), f"the save returned {saved}"
    assert_tree_equal(state(latest["step"]), latest["state"])
    assert assert_every_listed_checkpoint_loads(ckpt) == {"latest": latest["step"]}
    ckpt.close()


@pytest.mark.parametrize("fault", [applied_then(500), drop_after], ids=str)
def test_best_whose_manifest_reply_is_lost_leaves_a_loadable_best(faulty_s3, fault):
    """As for latest: the best manifest PUT applied but its reply lost leaves the new
    best (update_best_checkpoint gave True) or the old one, loadable either way."""
    ckpt = faulty_s3.checkpointer(**BEST)
    assert ckpt.update_best_checkpoint(state(1), 0.5, step=1)
    faulty_s3.proxy.add("put", f"state_best/{MANIFEST}", fault)

    replaced = ckpt.update_best_checkpoint(state(2), 0.25, step=2)

    faulty_s3.proxy.clear()
    best = ckpt.load_best()
    assert best is not None
    assert best["step"] == (2 if replaced else 1), f"update_best_checkpoint gave {replaced}"
    assert_tree_equal(state(best["step"]), best["state"])
    assert assert_every_listed_checkpoint_loads(ckpt) == {"best": best["step"]}


def test_latest_whose_commit_cannot_be_read_back_deletes_nothing_and_says_so(faulty_s3, caplog):
    """The manifest PUT is applied but its reply lost, and reading the manifest back
    fails too: nobody can tell which latest the store holds, so the save returns None,
    says the commit is uncertain, and removes nothing: neither its own data files (the
    new manifest names them) nor the old ones (the old manifest may still be there)."""
    ckpt = faulty_s3.checkpointer()
    assert ckpt.save_latest(state(1), step=1) is not None
    before = faulty_s3.keys(faulty_s3.checkpoint_dir())
    faulty_s3.proxy.add("put", f"state_latest/{MANIFEST}", applied_then(500))
    faulty_s3.proxy.add("get", f"state_latest/{MANIFEST}", SLOW_DOWN)

    with caplog.at_level("ERROR", logger="learnax"):
        saved = ckpt.save_latest(state(2), step=2)

    faulty_s3.proxy.clear()
    assert saved is None
    assert any("may or may not have been committed" in r.getMessage() for r in caplog.records)
    after = faulty_s3.keys(faulty_s3.checkpoint_dir())
    assert before <= after, f"removed: {sorted(before - after)}"  # the old files stay
    assert after - before  # and the new data file: the new manifest names it
    latest = ckpt.load_latest()
    assert latest["step"] == 2  # the store applied the PUT
    assert_tree_equal(state(2), latest["state"])


# --- a failed save after a stale listing ------------------------------------------


@pytest.mark.parametrize("size", ["small", "multipart"])
def test_failed_save_after_a_stale_listing_keeps_the_previous_latest(faulty_s3, size):
    """The listing of state_latest/ lags behind (shows none of the committed
    latest's objects) and the new data upload fails (a single PUT, or the first part
    of a multipart upload of a data file over 32 MiB): the cleanup of the failed save
    removes only what it wrote, so the previous latest still loads, and aborts the
    multipart upload."""
    ckpt = faulty_s3.checkpointer()
    assert ckpt.save_latest(state(1), step=1) is not None
    before = faulty_s3.keys(faulty_s3.checkpoint_dir())
    new = state(2)
    if size == "multipart":
        new["big"] = np.zeros(10 << 20, np.float32)  # 40 MiB
    faulty_s3.proxy.add("list", "state_latest/", stale_list())
    faulty_s3.proxy.add("put", "state_latest/data-", INTERNAL_ERROR)
    faulty_s3.proxy.add("upload_part", "state_latest/data-", INTERNAL_ERROR)

    assert ckpt.save_latest(new, step=2) is None

    assert faulty_s3.proxy.faults("put") or faulty_s3.proxy.faults("upload_part")
    faulty_s3.proxy.clear()
    assert_nothing_deleted(faulty_s3, before)
    # A failed multipart upload is aborted: none is left for the bucket to keep (and
    # bill) until a lifecycle rule reclaims it.
    prefix = faulty_s3.key(faulty_s3.checkpoint_dir()) + "/"
    uploads = faulty_s3.client.list_multipart_uploads(Bucket=faulty_s3.bucket, Prefix=prefix)
    assert [u["Key"] for u in uploads.get("Uploads", [])] == []
    latest = ckpt.load_latest()
    assert latest["step"] == 1
    assert_tree_equal(state(1), latest["state"])


# --- clocks: objects that look old to a reader -------------------------------------


def test_reader_opened_during_a_save_deletes_nothing_even_if_objects_look_two_hours_old(
    faulty_s3,
):
    """An evaluation job opens the run while the trainer's async save is uploading;
    to the reader every object looks 2 h old (its clock and the store's disagree).
    It deletes nothing, and the trainer's save commits and loads."""
    trainer = faulty_s3.checkpointer(async_save=True)
    assert trainer.save_latest(state(1), step=1) is not None
    trainer.wait_until_finished()
    release = threading.Event()
    faulty_s3.proxy.add("put", f"state_latest/{MANIFEST}", delay(30, release))
    faulty_s3.proxy.add("head", "", skew(-7200))
    faulty_s3.proxy.add("list", "", skew(-7200))
    try:
        assert trainer.save_latest(state(2), step=2) is not None
        deadline = time.monotonic() + 20
        while not faulty_s3.proxy.faults("put"):  # the data is up, the commit held
            assert time.monotonic() < deadline, "the trainer's manifest PUT never came"
            time.sleep(0.02)
        uploading = faulty_s3.keys(faulty_s3.checkpoint_dir())

        reader = faulty_s3.checkpointer()
        reader.list_available_checkpoints()

        assert_nothing_deleted(faulty_s3, uploading)
    finally:
        release.set()
    trainer.wait_until_finished()
    faulty_s3.proxy.clear()
    for ckpt in (trainer, reader, faulty_s3.checkpointer()):
        latest = ckpt.load_latest()
        assert latest["step"] == 2
        assert_tree_equal(state(2), latest["state"])


def test_the_writer_ages_leftovers_by_the_stores_clock_not_its_own(faulty_s3):
    """The store's clock is two hours behind this machine's: every object it reports
    looks two hours old here. A new writer's first commit removes the leftovers that
    are old by the store's own clock (an uncommitted prefix three hours older than the
    writer's commit) and keeps those written just now by it (another job's save still
    uploading), however old the local clock makes them look."""
    ckpt = faulty_s3.checkpointer()
    assert ckpt.save_checkpoint(state(5), step=5) is not None
    root = faulty_s3.key(faulty_s3.checkpoint_dir())
    for leftover in ("state_7", "state_9"):  # data uploaded, no manifest: no commit
        key = f"{root}/{leftover}/data-0123456789abcdef-0.safetensors"
        faulty_s3.client.put_object(Bucket=faulty_s3.bucket, Key=key, Body=b"\0" * 4096)
    for kind in ("head", "list"):
        faulty_s3.proxy.add(kind, "/state_9/", skew(-3 * 3600 - 7200))  # old to the store
        faulty_s3.proxy.add(kind, "", skew(-7200))  # the store's clock, 2 h behind

    assert faulty_s3.checkpointer().save_checkpoint(state(6), step=6) is not None

    assert faulty_s3.proxy.faults("head") or faulty_s3.proxy.faults("list")
    faulty_s3.proxy.clear()
    keys = faulty_s3.keys(faulty_s3.checkpoint_dir())
    assert not [k for k in keys if k.startswith("state_9/")], "the old leftover stayed"
    assert [k for k in keys if k.startswith("state_7/")], "the young leftover was removed"
    for step in (5, 6):
        assert_tree_equal(state(step), ckpt.load_checkpoint(step)["state"])


# --- failures while loading ----------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "fault"),
    [
        (MANIFEST, SLOW_DOWN),
        (MANIFEST, drop_after),
        ("data-", INTERNAL_ERROR),
        ("data-", drop_before),
    ],
    ids=str,
)
def test_load_latest_raises_oserror_when_reading_the_newest_fails(faulty_s3, file, fault):
    """A GET of the newest checkpoint's manifest or data fails whatever the client
    retries: load_latest raises OSError (never None, never the older step) and
    nothing is deleted."""
    ckpt = faulty_s3.checkpointer()
    assert ckpt.save_checkpoint(state(1), step=1) is not None
    assert ckpt.save_checkpoint(state(2), step=2) is not None
    before = faulty_s3.keys(faulty_s3.checkpoint_dir())
    faulty_s3.proxy.add("get", f"state_2/{file}", fault)

    assert_raises_oserror(ckpt.load_latest)
    assert faulty_s3.proxy.faults("get")
    assert_raises_oserror(lambda: ckpt.load_checkpoint(2))

    faulty_s3.proxy.clear()
    assert_nothing_deleted(faulty_s3, before)
    assert ckpt.load_latest()["step"] == 2


def test_truncated_data_reads_raise_or_are_skipped_as_damage_with_a_warning(faulty_s3):
    """A data GET whose body is cut short: load_latest raises OSError, or (if the
    short read is caught by the checksum as damage) skips to the older checkpoint with
    a warning; it never returns None and nothing is deleted."""
    ckpt = faulty_s3.checkpointer()
    assert ckpt.save_checkpoint(state(1), step=1) is not None
    assert ckpt.save_checkpoint(state(2), step=2) is not None
    before = faulty_s3.keys(faulty_s3.checkpoint_dir())
    faulty_s3.proxy.add("get", "state_2/data-", truncate)

    with damage_reports() as reports:
        try:
            loaded = ckpt.load_latest()
        except OSError:
            loaded = None
    if loaded is not None:
        assert loaded["step"] == 1
        assert len(reports) == 1 and "state_2" in reports[0], reports
    with pytest.raises((OSError, CheckpointCorruptedError)):
        ckpt.load_checkpoint(2)

    faulty_s3.proxy.clear()
    assert_nothing_deleted(faulty_s3, before)
    assert ckpt.load_latest()["step"] == 2


def test_load_latest_and_listing_raise_oserror_while_the_run_listing_fails(faulty_s3):
    """A LIST of the run that fails is not an empty run: no ``None``, no ``{}``."""
    committed_run(faulty_s3)
    ckpt = faulty_s3.checkpointer(**BEST)
    faulty_s3.proxy.add("list", "checkpoints/", SLOW_DOWN)

    assert_raises_oserror(ckpt.load_latest)
    assert_raises_oserror(ckpt.list_available_checkpoints)


# --- retention ---------------------------------------------------------------------


def test_failing_deletes_in_retention_keep_the_save_and_lose_nothing_kept(faulty_s3):
    """Retention whose DELETEs fail logs it; the save still returns its path and the
    max_to_keep newest checkpoints load."""
    ckpt = faulty_s3.checkpointer(max_to_keep=2)
    for step in (1, 2):
        assert ckpt.save_checkpoint(state(step), step=step) is not None
    faulty_s3.proxy.add("delete", "state_", INTERNAL_ERROR)
    faulty_s3.proxy.add("delete_many", "state_", INTERNAL_ERROR)

    path = ckpt.save_checkpoint(state(3), step=3)

    assert faulty_s3.proxy.faults(), "retention deleted nothing: no DELETE was failed"
    faulty_s3.proxy.clear()
    assert path == f"{faulty_s3.checkpoint_dir()}/state_3"
    steps = assert_every_listed_checkpoint_loads(ckpt)
    assert {"step_2", "step_3"} <= set(steps)


def test_stale_listing_in_retention_loses_no_checkpoint_inside_max_to_keep(faulty_s3):
    """The run's listing lags behind and misses the newest numbered checkpoint:
    retention must not prune one of the max_to_keep newest for it."""
    ckpt = faulty_s3.checkpointer(max_to_keep=2)
    for step in (1, 2, 3):
        assert ckpt.save_checkpoint(state(step), step=step) is not None
    faulty_s3.proxy.add("list", "checkpoints/", stale_list(hide="state_3/"))

    path = ckpt.save_checkpoint(state(4), step=4)

    assert faulty_s3.proxy.faults("list"), "the run was never listed"
    faulty_s3.proxy.clear()
    assert path == f"{faulty_s3.checkpoint_dir()}/state_4"
    for step in (3, 4):
        assert_tree_equal(state(step), ckpt.load_checkpoint(step)["state"])
    assert_every_listed_checkpoint_loads(ckpt)
