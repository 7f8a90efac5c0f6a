"""A mistyped ``run_id``: a load that finds nothing in a run while runs with a close
name have checkpoints warns once (``RunIdWarning``) naming them, instead of letting the
training loop start from scratch in silence."""

from __future__ import annotations

import warnings

import pytest
from helpers import small_state

from learnax.checkpoint import Checkpointer, RunIdWarning


@pytest.fixture
def registry_with_alpha(registry):
    Checkpointer(registry, "alpha").save_checkpoint(small_state(1), step=100)
    return registry


def run_id_warnings(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, RunIdWarning)]


def test_load_latest_of_a_mistyped_run_warns_naming_the_run_meant(registry_with_alpha):
    ckpt = Checkpointer(registry_with_alpha, "alpah")
    caught = run_id_warnings(lambda: ckpt.load_latest())
    assert [str(w.message) for w in caught] == [
        f"Run 'alpah' has no checkpoints in {registry_with_alpha}; did you mean 'alpha'? "
        "Loading it returns None, so training would start from scratch. If this is a new "
        "run, ignore this warning."
    ]
    assert caught[0].filename == __file__  # it points at the caller's line


def test_the_warning_comes_once_per_checkpointer(registry_with_alpha):
    ckpt = Checkpointer(registry_with_alpha, "alpah")
    assert len(run_id_warnings(lambda: [ckpt.load_latest() for _ in range(3)])) == 1
    assert run_id_warnings(lambda: ckpt.load_best()) == []
    other = Checkpointer(registry_with_alpha, "alpah")
    assert len(run_id_warnings(lambda: other.load_latest())) == 1


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.load_checkpoint(100),
        lambda c: c.load_checkpoint("latest"),
        lambda c: c.load_best(),
        lambda c: c.list_available_checkpoints(),
    ],
    ids=["load_checkpoint-step", "load_checkpoint-name", "load_best", "list"],
)
def test_every_load_and_the_listing_of_a_mistyped_run_warn(registry_with_alpha, call):
    ckpt = Checkpointer(registry_with_alpha, "alhpa")
    caught = run_id_warnings(lambda: call(ckpt))
    assert len(caught) == 1 and "did you mean 'alpha'?" in str(caught[0].message)
    assert caught[0].filename == __file__


def test_close_names_are_offered_closest_first_and_at_most_three(registry):
    for run in ("model-a", "model-b", "model-ab", "model-abc", "other"):
        Checkpointer(registry, run).save_checkpoint(small_state(1), step=1)
    caught = run_id_warnings(lambda: Checkpointer(registry, "model-ac").load_latest())
    message = str(caught[0].message)
    # difflib's order of closeness; the fourth close name (model-b) is left out
    assert "did you mean 'model-abc', 'model-a' or 'model-ab'?" in message
    assert "model-b'" not in message and "other" not in message


def test_a_close_run_without_checkpoints_is_not_offered(registry):
    Checkpointer(registry, "alpha")  # a phantom: the directory, no checkpoint
    assert run_id_warnings(lambda: Checkpointer(registry, "alpah").load_latest()) == []


def test_the_numbered_siblings_of_a_sweep_are_not_typos(registry):
    for run in ("seed-1", "seed-2", "lr0.01"):
        Checkpointer(registry, run).save_checkpoint(small_state(1), step=1)
    assert run_id_warnings(lambda: Checkpointer(registry, "seed-3").load_latest()) == []
    assert run_id_warnings(lambda: Checkpointer(registry, "lr0.1").load_latest()) == []


def test_a_run_with_checkpoints_never_lists_the_registry(registry_with_alpha, monkeypatch):
    ckpt = Checkpointer(registry_with_alpha, "alpha")
    Checkpointer(registry_with_alpha, "alphb").save_checkpoint(small_state(1), step=1)
    listed = []
    real_listdir = ckpt._storage.listdir
    monkeypatch.setattr(ckpt._storage, "listdir", lambda p: listed.append(p) or real_listdir(p))
    assert run_id_warnings(lambda: ckpt.load_latest()) == []
    assert run_id_warnings(lambda: ckpt.load_checkpoint(999)) == []  # no step 999: None
    assert listed == []


def test_a_new_run_without_a_close_name_lists_the_registry_once(registry, monkeypatch):
    # The check is made once per Checkpointer, also when it finds nothing to warn of:
    # a new run's loads (all None) do not list the registry again and again.
    Checkpointer(registry, "beta").save_checkpoint(small_state(1), step=1)
    ckpt = Checkpointer(registry, "alpha")
    listed = []
    real_listdir = ckpt._storage.listdir
    monkeypatch.setattr(ckpt._storage, "listdir", lambda p: listed.append(p) or real_listdir(p))
    for _ in range(3):
        assert run_id_warnings(lambda: ckpt.load_latest()) == []
    assert run_id_warnings(lambda: ckpt.load_best()) == []
    assert len(listed) == 1


def test_a_registry_that_cannot_be_listed_gives_no_hint_and_no_error(
    registry_with_alpha, monkeypatch
):
    ckpt = Checkpointer(registry_with_alpha, "alpah")

    def refuse(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(ckpt._storage, "listdir", refuse)
    assert run_id_warnings(lambda: ckpt.load_latest()) == []


def test_a_legacy_pickle_run_counts_as_a_run_with_checkpoints(registry):
    import os
    import pickle

    old = Checkpointer(registry, "alpha")
    with open(os.path.join(old.checkpoint_dir, "state_5.pyd"), "wb") as f:
        pickle.dump({"state": {"a": 1}, "step": 5, "time": 1.0}, f)
    caught = run_id_warnings(lambda: Checkpointer(registry, "alpah").load_latest())
    assert len(caught) == 1 and "'alpha'" in str(caught[0].message)


def test_the_warning_can_be_turned_into_an_error(registry_with_alpha):
    ckpt = Checkpointer(registry_with_alpha, "alpah")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunIdWarning)
        with pytest.raises(RunIdWarning, match="did you mean 'alpha'"):
            ckpt.load_latest()


def test_a_close_named_file_in_the_registry_does_not_hide_the_run_meant(registry_with_alpha):
    import os

    for name in ("alpah.log", "alphaa"):  # a file, and a file where a run dir would be
        with open(os.path.join(registry_with_alpha, name), "w") as f:
            f.write("log\n")
    caught = run_id_warnings(lambda: Checkpointer(registry_with_alpha, "alpah").load_latest())
    assert len(caught) == 1 and "did you mean 'alpha'?" in str(caught[0].message)


def test_a_close_run_that_cannot_be_read_is_skipped_and_the_others_still_offered(
    registry_with_alpha, monkeypatch
):
    Checkpointer(registry_with_alpha, "alphaa").save_checkpoint(small_state(1), step=1)
    ckpt = Checkpointer(registry_with_alpha, "alpah")
    real_scan = ckpt._storage.scan

    def scan(path):
        if "alphaa" in path:
            raise PermissionError(13, "Permission denied", path)
        return real_scan(path)

    monkeypatch.setattr(ckpt._storage, "scan", scan)
    caught = run_id_warnings(lambda: ckpt.load_latest())
    assert len(caught) == 1 and "did you mean 'alpha'?" in str(caught[0].message)
