"""What is in a run directory that learnax did not make: links, odd names, files of other
kinds where a checkpoint would be. Such entries are foreign: never written through,
never deleted, never loaded, and named in one warning; checkpoints beside them keep
working. Names from outside (run ids, suffixes) are refused when a filesystem, a URL
or fsspec would read them specially."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from helpers import checkpoint_dir_entries, scaled, small_state, tree_listing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnax.checkpoint import Checkpointer, _run, convert


def _victim(tmp_path):
    """A directory of someone else's files, with a listing to compare against."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "manifest.json").write_text("not ours")
    (victim / "notes.txt").write_text("precious")
    return victim


def _foreign_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "Ignoring" in r.getMessage()]


def test_a_linked_latest_is_never_written_through_nor_loaded(registry, tmp_path, caplog):
    victim = _victim(tmp_path)
    before = tree_listing(victim)
    ckpt = Checkpointer(registry, "run")
    os.symlink(victim, os.path.join(ckpt.checkpoint_dir, "state_latest"))
    assert ckpt.save_latest(small_state(), step=1) is None  # refused, logged
    assert "refusing to write through it" in caplog.text
    assert tree_listing(victim) == before
    assert ckpt.load_checkpoint("latest") is None
    assert ckpt.load_latest() is None
    # Numbered checkpoints still save and load beside it.
    assert ckpt.save_checkpoint(small_state(), step=2) is not None
    assert ckpt.load_latest()["step"] == 2
    assert list(ckpt.list_available_checkpoints()) == ["step_2"]


def test_retention_never_deletes_through_a_linked_numbered_checkpoint(registry, caplog):
    other = Checkpointer(registry, "other")
    target = other.save_checkpoint(small_state(), step=1)
    before = tree_listing(target)
    ckpt = Checkpointer(registry, "run", max_to_keep=1)
    os.symlink(target, os.path.join(ckpt.checkpoint_dir, "state_1"))
    for step in (2, 3, 4):
        assert ckpt.save_checkpoint(small_state(step), step=step) is not None
    assert tree_listing(target) == before
    assert other.load_checkpoint(1)["step"] == 1
    assert set(ckpt.list_available_checkpoints()) == {"step_4"}
    # Start-up cleanup leaves it too, and the warning is said once per Checkpointer.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        again = Checkpointer(registry, "run", max_to_keep=1)
        again.list_available_checkpoints()
        again.load_latest()
    assert len(_foreign_warnings(caplog)) == 1
    assert tree_listing(target) == before


@pytest.mark.parametrize("kind", ["file", "fifo", "link-to-file", "dangling-link"])
def test_other_kinds_of_entry_named_like_a_checkpoint_are_foreign(registry, tmp_path, kind):
    ckpt = Checkpointer(registry, "run")
    ckpt.save_checkpoint(small_state(), step=1)
    entry = os.path.join(ckpt.checkpoint_dir, "state_latest")
    if kind == "file":
        with open(entry, "w") as f:
            f.write("x")
    elif kind == "fifo":
        os.mkfifo(entry)
    elif kind == "link-to-file":
        (tmp_path / "f").write_text("x")
        os.symlink(tmp_path / "f", entry)
    else:
        os.symlink(tmp_path / "missing", entry)
    assert ckpt.save_latest(small_state(), step=2) is None
    assert ckpt.load_checkpoint("latest") is None
    assert ckpt.load_latest()["step"] == 1
    assert Checkpointer(registry, "run").list_available_checkpoints().keys() == {"step_1"}
    assert os.path.lexists(entry)  # never removed


def test_a_linked_data_file_inside_a_checkpoint_is_damage_not_followed(make_checkpointer, tmp_path):
    ckpt = make_checkpointer()
    path = ckpt.save_checkpoint({"w": np.arange(10.0)}, step=1)
    (data,) = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    real = tmp_path / "elsewhere.safetensors"
    os.replace(os.path.join(path, data), real)
    os.symlink(real, os.path.join(path, data))
    from learnax.checkpoint import CheckpointCorruptedError

    with pytest.raises(CheckpointCorruptedError, match="symbolic link"):
        ckpt.load_checkpoint(1)


@pytest.mark.parametrize(
    "run_id",
    [
        "README.txt?versionId=1",
        "a#b",
        "*",
        "run[0]",
        "a{b}",
        "s3:x",
        "a b",
        "-flag",
        ".hidden",
        "a\nb",
        "a%2Fb",
        "é",
        "\udcff",
        "x" * 256,
    ],
)
def test_run_ids_special_to_a_store_or_fsspec_are_refused(registry, run_id):
    with pytest.raises(ValueError, match="run_id"):
        Checkpointer(registry, run_id)


@settings(
    max_examples=scaled(50, 200),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.text(max_size=40))
def test_any_accepted_run_id_is_one_plain_component_of_the_registry(tmp_path, run_id):
    try:
        _run.check_run_id(run_id)
    except ValueError:
        return
    assert run_id == os.path.basename(run_id) and run_id not in (".", "..")
    assert run_id.isascii() and not set(run_id) & set("?#*[]{}:%/\\ \t\n")


@settings(max_examples=scaled(75, 300), deadline=None)
@given(st.text(max_size=30))
def test_a_canonical_name_is_the_one_spelling_of_its_key(entry):
    key = _run.checkpoint_key(entry)
    if key is None:
        return
    assert _run.checkpoint_name(key) == entry
    assert _run.key_of_name(key) == key  # loads under the name it is listed by
    step = _run.numbered_step(key)
    assert step is None or str(step) == key


NON_CANONICAL = ["state_007", "state_²", "state_１２", "state_x.pyd", "state_step_5", "state_.x"]


@pytest.mark.parametrize("entry", NON_CANONICAL)
def test_non_canonical_directories_are_ignored_with_a_warning(registry, entry, caplog):
    ckpt = Checkpointer(registry, "run", checkpoint_every=1, max_to_keep=2)
    saved = ckpt.save_checkpoint(small_state(), step=5)
    os.makedirs(os.path.join(ckpt.checkpoint_dir, entry))
    # A copy of a real checkpoint under the odd name: still never listed or loaded.
    for name in os.listdir(saved):
        with (
            open(os.path.join(saved, name), "rb") as f,
            open(os.path.join(ckpt.checkpoint_dir, entry, name), "wb") as g,
        ):
            g.write(f.read())
    with caplog.at_level(logging.WARNING, logger="learnax"):
        ckpt = Checkpointer(registry, "run", checkpoint_every=1, max_to_keep=2)
        assert list(ckpt.list_available_checkpoints()) == ["step_5"]
    assert _foreign_warnings(caplog)
    for step in (6, 7, 8):  # later numbered saves and retention keep working
        assert ckpt.maybe_save_checkpoints(small_state(step), step) == {
            "numbered": os.path.join(ckpt.checkpoint_dir, f"state_{step}")
        }
    assert checkpoint_dir_entries(ckpt.checkpoint_dir) == {"state_7", "state_8", entry}
    assert ckpt.load_latest()["step"] == 8


@pytest.mark.parametrize("name", ["state_007", "state_x.pyd", "state_step_5", "other"])
def test_convert_refuses_a_destination_that_is_not_canonical(make_checkpointer, registry, name):
    path = make_checkpointer().save_checkpoint(small_state(), step=1)
    with pytest.raises(ValueError, match="destination"):
        convert(path, f"{registry}/copy/checkpoints/{name}")


def test_files_someone_else_put_in_a_checkpoint_directory_are_never_removed(registry, tmp_path):
    ckpt = Checkpointer(registry, "run")
    path = ckpt.save_latest(small_state(1), step=1)
    (tmp_path / "precious.txt").write_text("x")
    os.symlink(tmp_path / "precious.txt", os.path.join(path, "my_link"))
    with open(os.path.join(path, "NOTES.md"), "w") as f:
        f.write("notes")
    os.mkfifo(os.path.join(path, "fifo"))
    os.mkdir(os.path.join(path, "plots"))
    ckpt.save_latest(small_state(2), step=2)
    Checkpointer(registry, "run")  # start-up cleanup
    names = set(os.listdir(path))
    assert {"my_link", "NOTES.md", "fifo", "plots", "manifest.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) == 1  # the old one went
    assert (tmp_path / "precious.txt").read_text() == "x"
    assert ckpt.load_latest()["step"] == 2


def test_a_planted_lock_link_does_not_stop_the_run_from_opening(registry, tmp_path):
    ckpt = Checkpointer(registry, "run")
    ckpt.save_checkpoint(small_state(), step=1)
    lock = os.path.join(ckpt.checkpoint_dir, ".learnax.lock")
    os.remove(lock)
    os.symlink(tmp_path / "elsewhere", lock)
    again = Checkpointer(registry, "run")  # cleanup skipped, with a warning
    assert again.load_latest()["step"] == 1
    assert again.save_checkpoint(small_state(), step=2) is None  # never locks through it
    assert not (tmp_path / "elsewhere").exists()
