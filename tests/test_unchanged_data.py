"""Unchanged data is not written twice, and every checkpoint still stands on its own.

The rules under test:

(a) When latest, numbered and best are due at one step, the data is written once: the
    first checkpoint is written, the others take its data files (hard links on a local
    disk, server-side copies on S3).
(b) A ``jax.Array`` that is the very same object, under the same tree path, as in the
    previous save of this Checkpointer is neither snapshotted, transferred nor written:
    the data file holding it is taken (linked) when at least half of its bytes are
    such arrays; unchanged arrays in other files go to files of their own. Identity
    counts, not content: equal values in a new array are written again.
(c) NumPy arrays are always written (they can change in place), except within one
    step, where all checkpoints come from one snapshot.
(d) Every checkpoint directory stays self-contained: copied anywhere (links
    dereferenced) it loads; deleting any checkpoint (retention, ``prune``, ``rmtree``
    by hand) never breaks another; ``verify`` checks linked data like any other (a
    flipped byte in a shared file is damage in every checkpoint sharing it); a crash
    at any instant leaves the old or the new checkpoint; async saves and S3 work.

The mechanism is checked through what can be seen on disk: shared inodes and link
counts, bytes on disk counting each inode once, unchanged modification times, and the
values every checkpoint loads. States are small: a "frozen" dict of jax arrays (768 KiB
in all) passed as the same objects at every step, and a small "trainable" jax array
made anew each step.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    HeldCommit,
    assert_tree_equal,
    flip_byte,
    is_lock_file,
    read_manifest_file,
    without_hard_links,
)

from learnax.checkpoint import CheckpointCorruptedError, Checkpointer, _superseded, prune, verify
from learnax.checkpoint import _write as learnax_write

MANIFEST = "manifest.json"
FROZEN_BYTES = 768 << 10
TRAINABLE_BYTES = 4 << 10


# --- states ---------------------------------------------------------------------------


def frozen_values() -> dict:
    """The frozen part's values (NumPy), the same in every process: 768 KiB."""
    rng = np.random.default_rng(1234)
    return {
        "embed": rng.standard_normal((256, 256)).astype(np.float32),  # 256 KiB
        "kernel": rng.standard_normal((512, 128)).astype(np.float32),  # 256 KiB
        "table": rng.integers(-1000, 1000, (128, 256)).astype(np.int32),  # 128 KiB
        "norm": rng.standard_normal((256, 256)).astype(np.float16),  # 128 KiB
    }


def trainable_value(step: int) -> np.ndarray:
    """The trainable part at ``step``: 4 KiB, different at every step."""
    return np.full((32, 32), float(step), np.float32) + np.arange(1024, dtype=np.float32).reshape(
        32, 32
    ) * np.float32(1e-3)


def frozen_jax() -> dict:
    """The frozen part as jax arrays: pass the same dict (the same objects) every step."""
    return {k: jnp.asarray(v) for k, v in frozen_values().items()}


def train_state(frozen: dict, step: int) -> dict:
    """The state saved at ``step``: ``frozen`` as given, a new trainable jax array."""
    return {"frozen": frozen, "trainable": jnp.asarray(trainable_value(step))}


def expected_state(step: int, frozen: dict | None = None) -> dict:
    """What the checkpoint of ``step`` must load (the frozen values as they were)."""
    frozen = frozen_values() if frozen is None else frozen
    return {"frozen": frozen, "trainable": trainable_value(step)}


# --- what is on disk --------------------------------------------------------------------


def checkpoint_path(ckpt: Checkpointer, name: str | int) -> Path:
    return Path(ckpt.checkpoint_dir) / f"state_{name}"


def manifest_of(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())["manifest"]


def files_holding(path: Path, prefix: str = "") -> set[str]:
    """The data files of the checkpoint at ``path`` that hold arrays named ``prefix...``."""
    arrays = manifest_of(path)["arrays"]
    return {e["file"] for name, e in arrays.items() if name.startswith(prefix)}


def data_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.safetensors"))


def inodes(path: Path, prefix: str = "") -> set[tuple[int, int]]:
    """(st_dev, st_ino) of the data files holding arrays named ``prefix...``."""
    out = set()
    for name in files_holding(path, prefix):
        st = os.stat(path / name)
        out.add((st.st_dev, st.st_ino))
    return out


def unique_bytes(paths: list[Path]) -> int:
    """Bytes on disk of every file under ``paths``, each inode counted once."""
    seen: dict[tuple[int, int], int] = {}
    for root in paths:
        for p in root.rglob("*"):
            if p.is_file():
                st = os.stat(p)
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def flip_byte_in_array(path: Path, file: str, tensor: str) -> None:
    """Flip one byte in the data of ``tensor`` in safetensors file ``file`` of the
    checkpoint at ``path``, in place (the file keeps its inode, so every link sees it)."""
    target = path / file
    with open(target, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        begin, end = header[tensor]["data_offsets"]
        offset = 8 + header_len + begin + (end - begin) // 2
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def assert_self_contained(checkpoint_dir: Path) -> None:
    """Every entry of the run's checkpoint directory is a committed checkpoint holding
    exactly ``manifest.json`` and the data files its manifest names."""
    for entry in os.listdir(checkpoint_dir):
        if is_lock_file(entry):
            continue
        path = checkpoint_dir / entry
        assert (path / MANIFEST).is_file(), f"{entry} holds no manifest: a leftover"
        on_disk = {p.name for p in path.iterdir()}
        assert on_disk == {MANIFEST, *manifest_of(path)["files"]}, entry


def save_numbered(ckpt: Checkpointer, frozen: dict, steps) -> None:
    for step in steps:
        saved = ckpt.maybe_save_checkpoints(train_state(frozen, step), step)
        assert "numbered" in saved, f"step {step}: {saved}"
    ckpt.wait_until_finished()


# --- (a) several checkpoints at one step ----------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_latest_numbered_and_best_at_one_step_share_one_written_copy(make_checkpointer, async_save):
    """Latest, numbered and best due at one step: the data is written once, the other
    two checkpoints hold hard links to the same files, and all three load it whole."""
    ckpt = make_checkpointer(
        save_every=1, checkpoint_every=1, keep_best=True, async_save=async_save
    )
    numpy_part = np.arange(4096, dtype=np.float64)  # within one step numpy is shared too
    state = {**train_state(frozen_jax(), 1), "numpy": numpy_part}
    saved = ckpt.maybe_save_checkpoints(state, 1, {"val/loss": 0.5})
    assert set(saved) == {"latest", "numbered", "best"}
    ckpt.wait_until_finished()

    expected = {**expected_state(1), "numpy": np.arange(4096, dtype=np.float64)}
    for loaded in (ckpt.load_checkpoint("latest"), ckpt.load_checkpoint(1), ckpt.load_best()):
        assert loaded["step"] == 1
        assert_tree_equal(expected, loaded["state"])

    paths = [checkpoint_path(ckpt, n) for n in ("latest", 1, "best")]
    # The files holding arrays (a checkpoint that takes every array may also hold an
    # empty data file of its own: see the report on the empty file).
    names = [files_holding(path) for path in paths]
    assert names[0] == names[1] == names[2], "the same data files in all three"
    for name in names[0]:
        stats = [os.stat(path / name) for path in paths]
        assert len({(s.st_dev, s.st_ino) for s in stats}) == 1, f"{name} is not linked"
        assert stats[0].st_nlink == 3
    # Written once: the bytes on disk are those of one copy.
    assert unique_bytes(paths) < FROZEN_BYTES + TRAINABLE_BYTES + 40_000 + 3 * 4096


# --- (b) frozen jax arrays across steps ------------------------------------------------


def test_frozen_jax_part_is_linked_across_numbered_saves_and_never_rewritten(
    make_checkpointer,
):
    """The data file of a frozen part of jax arrays passed unchanged is one inode in
    every numbered checkpoint from the 3rd save on (the 2nd may regroup), and the file
    the first save wrote is never written again (its mtime stays)."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    frozen = frozen_jax()
    save_numbered(ckpt, frozen, [1])
    first = {p.name: os.stat(p) for p in data_files(checkpoint_path(ckpt, 1))}
    save_numbered(ckpt, frozen, [2, 3, 4])

    shared = inodes(checkpoint_path(ckpt, 3), "frozen/")
    assert shared == inodes(checkpoint_path(ckpt, 4), "frozen/")
    for name in files_holding(checkpoint_path(ckpt, 4), "frozen/"):
        assert os.stat(checkpoint_path(ckpt, 4) / name).st_nlink >= 2
    for name, before in first.items():
        after = os.stat(checkpoint_path(ckpt, 1) / name)
        assert after.st_ino == before.st_ino
        assert after.st_mtime_ns == before.st_mtime_ns, f"{name} was written again"
    # The trainable part is new each step: its own file, never shared across steps.
    trainable = [inodes(checkpoint_path(ckpt, s), "trainable") for s in (2, 3, 4)]
    assert not (trainable[0] & trainable[1]) and not (trainable[1] & trainable[2])


def test_numbered_saves_of_a_frozen_state_take_about_one_state_of_disk(make_checkpointer):
    """Four numbered saves of a state whose frozen part is unchanged use at most 1.3
    times one state plus four trainable parts on disk (each inode counted once)."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    save_numbered(ckpt, frozen_jax(), [1, 2, 3, 4])
    total = unique_bytes([checkpoint_path(ckpt, s) for s in (1, 2, 3, 4)])
    one_state = FROZEN_BYTES + TRAINABLE_BYTES
    assert total <= 1.3 * one_state + 4 * TRAINABLE_BYTES, total


def test_every_numbered_save_of_a_frozen_state_loads_its_own_step(make_checkpointer):
    """Each numbered checkpoint of a state with a frozen part loads the frozen values
    and the trainable value of its own step (taking a file never mixes steps)."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    save_numbered(ckpt, frozen_jax(), [1, 2, 3, 4])
    for step in (1, 2, 3, 4):
        loaded = ckpt.load_checkpoint(step)
        assert loaded["step"] == step
        assert_tree_equal(expected_state(step), loaded["state"])
    assert verify(str(Path(ckpt.checkpoint_dir).parent)) == []


def test_latest_over_latest_with_a_frozen_part_keeps_only_its_own_files(make_checkpointer):
    """Rolling latest saves of a frozen state take the frozen file in place: latest
    loads the newest step and holds only the files its manifest names, about one
    state of bytes."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=None)
    frozen = frozen_jax()
    for step in range(1, 6):
        assert ckpt.save_latest(train_state(frozen, step), step) is not None
    loaded = ckpt.load_latest()
    assert loaded["step"] == 5
    assert_tree_equal(expected_state(5), loaded["state"])
    assert_self_contained(Path(ckpt.checkpoint_dir))
    assert unique_bytes([checkpoint_path(ckpt, "latest")]) < 1.3 * FROZEN_BYTES


def test_alternating_latest_and_numbered_with_a_frozen_part_all_load(make_checkpointer):
    """Latest every step and numbered every other step, each taking from whichever was
    committed last: every checkpoint loads its own step, and the frozen file is one
    inode throughout."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=2)
    frozen = frozen_jax()
    for step in range(1, 8):
        ckpt.maybe_save_checkpoints(train_state(frozen, step), step)
    for step in (2, 4, 6):
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])
    latest = ckpt.load_checkpoint("latest")
    assert latest["step"] == 7
    assert_tree_equal(expected_state(7), latest["state"])
    shared = inodes(checkpoint_path(ckpt, 4), "frozen/")
    assert inodes(checkpoint_path(ckpt, 6), "frozen/") == shared
    assert inodes(checkpoint_path(ckpt, "latest"), "frozen/") == shared
    assert_self_contained(Path(ckpt.checkpoint_dir))


# The rule: a data file is taken when the unchanged arrays in it hold at least half of
# its bytes (its header counted). One file of a uint8 array "a", kept as the same
# object, and a uint8 array "b", new at each save: one element is one byte, and with
# every length of four digits the header's size stays the same whatever the lengths.
A_ELEMENTS = 4000


def two_part_state(a, b_elements: int, fill: int) -> dict:
    return {"a": a, "b": jnp.full((b_elements,), fill, jnp.uint8)}


def header_bytes(registry: Path) -> int:
    """The bytes of the header (and framing) of a data file holding ``a`` and ``b`` of
    four-digit lengths, from a probe save in a registry of its own."""
    probe = Checkpointer(registry, "probe", save_every=None, checkpoint_every=None)
    state = two_part_state(jnp.zeros(A_ELEMENTS, jnp.uint8), 1000, 0)
    (entry,) = manifest_of(Path(probe.save_checkpoint(state, step=0)))["files"].values()
    return entry["bytes"] - A_ELEMENTS - 1000


@pytest.mark.parametrize(
    ("a_elements", "taken"), [(A_ELEMENTS, True), (A_ELEMENTS - 1, False)], ids=["half", "short"]
)
def test_a_file_is_taken_when_exactly_half_of_its_bytes_are_unchanged_and_not_one_less(
    make_checkpointer, tmp_path, a_elements, taken
):
    """The boundary of the take rule: the unchanged array holding exactly half of its
    file's bytes takes the file (hard link, same inode); one element (byte) fewer, and
    it is written again to a file of its own. Both checkpoints load either way."""
    b_elements = A_ELEMENTS - header_bytes(tmp_path / "probe")
    assert 1000 <= b_elements <= 9999 - A_ELEMENTS  # four digits: the header stays put
    a_np = np.arange(a_elements, dtype=np.uint64).astype(np.uint8)
    a = jnp.asarray(a_np)
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    assert ckpt.save_checkpoint(two_part_state(a, b_elements, 1), step=1) is not None
    first = checkpoint_path(ckpt, 1)
    (file,) = manifest_of(first)["files"]
    size = manifest_of(first)["files"][file]["bytes"]
    # Exactly half of the file's bytes, or one byte short of half.
    assert 2 * a_elements == (size if taken else size - 1), "not the planned layout"
    assert ckpt.save_checkpoint(two_part_state(a, b_elements, 2), step=2) is not None

    second = checkpoint_path(ckpt, 2)
    if taken:
        assert files_holding(second, "a") == {file}
        assert inodes(second, "a") == inodes(first, "a"), "the file was not linked"
    else:
        assert files_holding(second, "a") != {file}, "the file was taken"
        assert not (inodes(second) & inodes(first))
    for step in (1, 2):
        expected = {"a": a_np, "b": np.full(b_elements, step, np.uint8)}
        assert_tree_equal(expected, ckpt.load_checkpoint(step)["state"])


# --- (c) numpy arrays ----------------------------------------------------------------


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_numpy_part_mutated_in_place_is_saved_with_its_value_at_each_step(
    make_checkpointer, async_save
):
    """A NumPy part changed in place between saves (right after an async save returns,
    too) is stored with its value at each save's step."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, async_save=async_save)
    frozen = frozen_values()  # NumPy: the same objects, changed in place
    for step in (1, 2, 3):
        ckpt.maybe_save_checkpoints(train_state(frozen, step), step)
        for value in frozen.values():
            value[0] = step + 1  # in place, possibly while the async save writes
    ckpt.wait_until_finished()
    for step in (1, 2, 3):
        values = frozen_values()
        if step > 1:
            for value in values.values():
                value[0] = step
        assert_tree_equal(expected_state(step, values), ckpt.load_checkpoint(step)["state"])


def test_numpy_part_is_written_again_at_every_step_not_linked(make_checkpointer):
    """NumPy arrays are written at every save, even unchanged: no data file of one step
    shares an inode with another step's."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    frozen = frozen_values()
    save_numbered(ckpt, frozen, [1, 2, 3])
    seen: set[tuple[int, int]] = set()
    for step in (1, 2, 3):
        path = checkpoint_path(ckpt, step)
        for p in data_files(path):
            assert os.stat(p).st_nlink == 1, f"{p} is linked"
        here = inodes(path)
        assert not (here & seen), f"step {step} shares numpy data with an earlier step"
        seen |= here
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])


# --- (b) identity, not content -----------------------------------------------------------


def test_equal_values_in_a_new_jax_array_are_written_anew(make_checkpointer):
    """A jax array with the same values but a new object at each step is written
    again: identity decides, not content."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    for step in (1, 2, 3):
        save_numbered(ckpt, frozen_jax(), [step])  # new objects, equal values
    seen: set[tuple[int, int]] = set()
    for step in (1, 2, 3):
        path = checkpoint_path(ckpt, step)
        for p in data_files(path):
            assert os.stat(p).st_nlink == 1, f"{p} is linked"
        assert not (inodes(path) & seen)
        seen |= inodes(path)
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])


def test_same_jax_array_under_another_tree_path_is_not_taken(make_checkpointer):
    """The very same jax arrays saved under swapped tree paths are not taken from the
    previous checkpoint (names differ), and each checkpoint loads its own mapping."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    rng = np.random.default_rng(5)
    a_np, b_np = (rng.standard_normal((256, 256)).astype(np.float32) for _ in range(2))
    a, b = jnp.asarray(a_np), jnp.asarray(b_np)
    small = jnp.zeros(8, jnp.float32)
    assert ckpt.save_checkpoint({"x": a, "y": b, "s": small}, step=1) is not None
    assert ckpt.save_checkpoint({"x": b, "y": a, "s": small + 1}, step=2) is not None
    assert_tree_equal(
        {"x": a_np, "y": b_np, "s": np.zeros(8, np.float32)}, ckpt.load_checkpoint(1)["state"]
    )
    assert_tree_equal(
        {"x": b_np, "y": a_np, "s": np.ones(8, np.float32)}, ckpt.load_checkpoint(2)["state"]
    )
    assert not (inodes(checkpoint_path(ckpt, 1)) & inodes(checkpoint_path(ckpt, 2)))


def test_one_jax_array_under_two_tree_paths_loads_at_both(make_checkpointer):
    """One jax array stored under two tree paths at every step (aliasing) is taken
    unchanged and loads at both paths in every checkpoint."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    shared_np = frozen_values()["embed"]
    shared = jnp.asarray(shared_np)
    for step in (1, 2, 3):
        state = {"enc": shared, "dec": shared, "t": jnp.asarray(trainable_value(step))}
        assert ckpt.save_checkpoint(state, step=step) is not None
    for step in (1, 2, 3):
        assert_tree_equal(
            {"enc": shared_np, "dec": shared_np, "t": trainable_value(step)},
            ckpt.load_checkpoint(step)["state"],
        )


# --- (d) every checkpoint on its own ---------------------------------------------------


def test_copied_checkpoint_loads_in_another_registry(make_checkpointer, tmp_path):
    """A numbered checkpoint holding links, copied with shutil.copytree (file contents)
    into a fresh registry's run, loads there and verifies."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    save_numbered(ckpt, frozen_jax(), [1, 2, 3])
    other = tmp_path / "elsewhere"
    dest = other / "run" / "checkpoints" / "state_2"
    shutil.copytree(checkpoint_path(ckpt, 2), dest)
    for p in data_files(dest):
        assert os.stat(p).st_nlink == 1  # a copy, sharing nothing with the source
    loaded = Checkpointer(other, "run", save_every=None, checkpoint_every=None).load_checkpoint(2)
    assert loaded["step"] == 2
    assert_tree_equal(expected_state(2), loaded["state"])
    assert verify(str(dest)) == []


def test_deleting_other_checkpoints_by_hand_leaves_each_loadable(make_checkpointer):
    """Removing numbered checkpoints with shutil.rmtree (the link source first) never
    breaks the ones left: each still loads and verifies."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    save_numbered(ckpt, frozen_jax(), [1, 2, 3, 4])
    shutil.rmtree(checkpoint_path(ckpt, 1))  # the first writer of the frozen file
    shutil.rmtree(checkpoint_path(ckpt, 3))
    for step in (2, 4):
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])
    shutil.rmtree(checkpoint_path(ckpt, 2))
    assert_tree_equal(expected_state(4), ckpt.load_checkpoint(4)["state"])
    assert verify(str(Path(ckpt.checkpoint_dir).parent)) == []


def test_retention_max_to_keep_1_leaves_the_kept_checkpoints_loadable(make_checkpointer):
    """With max_to_keep=1 retention deletes the checkpoint the next one linked from, at
    every step: latest and the kept numbered checkpoint load after each save."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1, max_to_keep=1)
    frozen = frozen_jax()
    for step in range(1, 5):
        ckpt.maybe_save_checkpoints(train_state(frozen, step), step)
        assert ckpt.list_available_checkpoints().keys() == {"latest", f"step_{step}"}
        for name in ("latest", step):
            assert_tree_equal(expected_state(step), ckpt.load_checkpoint(name)["state"])
    assert_self_contained(Path(ckpt.checkpoint_dir))


def test_prune_leaves_the_kept_checkpoints_loadable(make_checkpointer):
    """``prune`` deleting the older numbered checkpoints (the link sources) leaves the
    kept ones loadable and intact."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=1)
    save_numbered(ckpt, frozen_jax(), [1, 2, 3, 4])
    run = str(Path(ckpt.checkpoint_dir).parent)
    deleted = prune(run, keep=1)
    assert len(deleted) == 3
    for name in ("latest", 4):
        assert_tree_equal(expected_state(4), ckpt.load_checkpoint(name)["state"])
    assert verify(run) == []


def test_verify_reports_a_flipped_byte_in_a_shared_file_in_every_checkpoint_sharing_it(
    make_checkpointer,
):
    """A byte flipped in a data file shared by links is damage in every checkpoint
    that holds that inode: verify names each, and each refuses to load."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1)
    save_numbered(ckpt, frozen_jax(), [1, 2, 3])
    path = checkpoint_path(ckpt, 2)
    (file,) = {e["file"] for n, e in manifest_of(path)["arrays"].items() if n == "frozen/embed"}
    sharing = {
        f"state_{s}"
        for s in (1, 2, 3)
        if (checkpoint_path(ckpt, s) / file).exists()
        and os.stat(checkpoint_path(ckpt, s) / file).st_ino == os.stat(path / file).st_ino
    }
    assert sharing == {"state_1", "state_2", "state_3"}
    flip_byte_in_array(path, file, "frozen/embed")

    damaged = verify(str(Path(ckpt.checkpoint_dir).parent))
    assert {Path(p).name for p, _ in damaged} == sharing
    for step in (1, 2, 3):
        with pytest.raises(CheckpointCorruptedError):
            ckpt.load_checkpoint(step)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_after_its_link_source_was_deleted_by_hand_writes_instead(
    make_checkpointer, async_save
):
    """When the checkpoint a save would link from was removed by hand before it, the
    save falls back to writing the data, commits, and loads."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, async_save=async_save)
    frozen = frozen_jax()
    save_numbered(ckpt, frozen, [1, 2])
    shutil.rmtree(checkpoint_path(ckpt, 2))  # the last commit: the next save's source
    save_numbered(ckpt, frozen, [3])
    assert_tree_equal(expected_state(3), ckpt.load_checkpoint(3)["state"])
    assert_tree_equal(expected_state(1), ckpt.load_checkpoint(1)["state"])
    save_numbered(ckpt, frozen, [4])  # and the save after takes from the new one
    assert_tree_equal(expected_state(4), ckpt.load_checkpoint(4)["state"])
    assert_self_contained(Path(ckpt.checkpoint_dir))


def test_latest_deleted_by_hand_is_written_again_not_taken_from_itself(make_checkpointer):
    """``state_latest`` removed by hand (or by a lifecycle rule) between two saves whose
    frozen part is unchanged: the next latest save cannot take its files from where
    they were; it writes them, and that latest loads."""
    ckpt = make_checkpointer(save_every=1, checkpoint_every=None)
    frozen = frozen_jax()
    ckpt.maybe_save_checkpoints(train_state(frozen, 1), 1)
    shutil.rmtree(checkpoint_path(ckpt, "latest"))
    assert "latest" in ckpt.maybe_save_checkpoints(train_state(frozen, 2), 2)
    assert_tree_equal(expected_state(2), ckpt.load_checkpoint("latest")["state"])
    assert ckpt.load_latest()["step"] == 2
    assert_self_contained(Path(ckpt.checkpoint_dir))


def test_memory_fs_latest_deleted_by_hand_is_written_again(tmp_path):
    """The same on the fsspec back-end (``memory://``, an object store to learnax)."""
    fsspec = pytest.importorskip("fsspec")
    registry = f"memory://learnax-{uuid.uuid4().hex[:12]}"
    ckpt = Checkpointer(registry, "run", save_every=1, checkpoint_every=None)
    frozen = frozen_jax()
    ckpt.maybe_save_checkpoints(train_state(frozen, 1), 1)
    fsspec.filesystem("memory").rm(f"{ckpt.checkpoint_dir}/state_latest", recursive=True)
    assert "latest" in ckpt.maybe_save_checkpoints(train_state(frozen, 2), 2)
    fresh = Checkpointer(registry, "run")
    assert_tree_equal(expected_state(2), fresh.load_checkpoint("latest")["state"])


def test_numbered_source_deleted_then_latest_is_written_not_taken_from_itself(
    make_checkpointer,
):
    """The last commit (numbered, holding the frozen part) removed by hand; the latest
    saved next cannot take the file from it, and a file of that name in latest's own
    directory is no copy of it (latest held other bytes): the arrays are written."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    frozen = frozen_jax()
    ckpt.save_latest(train_state(frozen_jax(), 0), step=0)  # other frozen objects
    ckpt.save_checkpoint(train_state(frozen, 1), step=1)
    shutil.rmtree(checkpoint_path(ckpt, 1))
    assert ckpt.save_latest(train_state(frozen, 2), step=2) is not None
    assert_tree_equal(expected_state(2), ckpt.load_checkpoint("latest")["state"])
    assert_self_contained(Path(ckpt.checkpoint_dir))


@pytest.mark.parametrize("grace", ["pending", "none"])
def test_a_file_one_writer_retired_and_the_other_took_back_is_never_removed(
    make_checkpointer, monkeypatch, grace
):
    """Two writers of one run (safe on a local disk): writer 2's latest replaces writer
    1's, retiring its files; writer 1 then saves latest with the same frozen objects
    and takes its old file back in place. Removing what writer 2 retired (when its
    grace time ends, here at once) must leave the file the committed latest names;
    with no grace time, the file is gone already and writer 1 writes it again."""
    # (The suite runs without a grace time: conftest.py.)
    monkeypatch.setattr(_superseded, "SUPERSEDED_GRACE_S", 60.0 if grace == "pending" else 0.0)
    one = make_checkpointer(save_every=1, checkpoint_every=None)
    two = make_checkpointer(save_every=1, checkpoint_every=None)
    frozen = frozen_jax()
    # Each writer's first commit removes the leftovers at once (the run's lock held):
    # both are past it before the file is retired.
    two.maybe_save_checkpoints(train_state(frozen_jax(), 0), 0)
    one.maybe_save_checkpoints(train_state(frozen, 1), 1)
    taken_back = files_holding(checkpoint_path(one, "latest"), "frozen/")
    two.maybe_save_checkpoints(train_state(frozen_jax(), 2), 2)
    one.maybe_save_checkpoints(train_state(frozen, 3), 3)
    if grace == "pending":
        assert files_holding(checkpoint_path(one, "latest"), "frozen/") == taken_back
    _superseded.remove_now()  # every grace time over
    assert_tree_equal(expected_state(3), one.load_checkpoint("latest")["state"])
    assert verify(str(Path(one.checkpoint_dir).parent)) == []


@pytest.mark.parametrize("manifest", ["damaged", "unreadable"])
def test_retired_files_stay_while_the_manifest_cannot_be_read(
    make_checkpointer, monkeypatch, manifest
):
    """The files a latest save retired are removed, once their grace time is over,
    only if the manifest does not name them then. While that manifest is damaged (a
    flipped byte) or cannot be read (EIO), nobody can tell: every retired file stays."""
    from learnax.checkpoint import _manifest

    monkeypatch.setattr(_superseded, "SUPERSEDED_GRACE_S", 60.0)
    ckpt = make_checkpointer(save_every=1, checkpoint_every=None)
    latest = checkpoint_path(ckpt, "latest")
    ckpt.save_latest(train_state(frozen_jax(), 0), step=0)  # the first commit's cleanup
    ckpt.save_latest(train_state(frozen_jax(), 1), step=1)
    retired = data_files(latest)
    ckpt.save_latest(train_state(frozen_jax(), 2), step=2)
    assert set(retired) - set(data_files(latest)) == set(), "not kept for the grace time"
    assert not set(retired) & {latest / n for n in manifest_of(latest)["files"]}

    if manifest == "damaged":
        _, start, _ = read_manifest_file(latest)
        flip_byte(latest / MANIFEST, start + 20)
        with pytest.raises(CheckpointCorruptedError):
            ckpt.load_checkpoint("latest")
    else:

        def unreadable(storage, directory):
            raise OSError(errno.EIO, "Input/output error", directory)

        monkeypatch.setattr(_manifest, "read_manifest", unreadable)
    _superseded.remove_now()  # every grace time over
    monkeypatch.undo()

    assert set(retired) <= set(data_files(latest)), "a retired file was removed"


def test_retired_files_stay_while_another_save_holds_the_runs_lock(make_checkpointer, monkeypatch):
    """Two writers of one run: writer 2's latest retires the file of writer 1's, and
    writer 1's next latest (the same frozen objects) takes that file back in place and
    stops before its commit, holding the run's lock. Removing the retired files then
    (their grace time over) must wait for the lock: the manifest about to be committed
    names the file. After the commit, latest loads whole."""
    monkeypatch.setattr(_superseded, "SUPERSEDED_GRACE_S", 60.0)
    one = make_checkpointer(save_every=1, checkpoint_every=None)
    two = make_checkpointer(save_every=1, checkpoint_every=None)
    frozen = frozen_jax()
    # Each writer's first commit removes the leftovers at once (the run's lock held):
    # both are past it before the file is retired.
    two.save_latest(train_state(frozen_jax(), 0), step=0)
    one.save_latest(train_state(frozen, 1), step=1)
    (taken_back,) = files_holding(checkpoint_path(one, "latest"), "frozen/")
    two.save_latest(train_state(frozen_jax(), 2), step=2)  # retires it

    held = HeldCommit(monkeypatch, "writer-one")
    result = {}
    saver = threading.Thread(
        target=lambda: result.setdefault("one", one.save_latest(train_state(frozen, 3), step=3)),
        name="writer-one",
    )
    saver.start()
    try:
        assert held.ready.wait(60), "writer 1 never reached its commit"
        _superseded.remove_now()  # every grace time over, writer 1 holding the lock
        kept = (checkpoint_path(one, "latest") / taken_back).exists()
    finally:
        held.release()
        saver.join(timeout=60)
    monkeypatch.undo()

    assert result.get("one") is not None, result
    assert kept, "a retired file was removed while another save held the run's lock"
    assert files_holding(checkpoint_path(one, "latest"), "frozen/") == {taken_back}
    _superseded.remove_now()  # what writer 1's commit retired, the lock free now
    loaded = one.load_checkpoint("latest")
    assert loaded["step"] == 3
    assert_tree_equal(expected_state(3), loaded["state"])
    assert verify(str(Path(one.checkpoint_dir).parent)) == []


def test_a_copy_cut_short_is_never_taken_as_the_file(make_checkpointer, monkeypatch):
    """Without hard links a taken file is copied; a copy that fails half-way (a full
    disk) leaves nothing under the file's name, the save writes the arrays instead,
    and the checkpoint loads."""
    from learnax.checkpoint._storage import local

    real_copy = shutil.copyfileobj
    failures = [1]

    def copy_fails_once(src, dst, length=0):
        if failures and failures.pop():
            dst.write(src.read(1000))
            dst.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_copy(src, dst, length)

    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    frozen = frozen_jax()
    ckpt.save_latest(train_state(frozen_jax(), 0), step=0)
    ckpt.save_checkpoint(train_state(frozen, 1), step=1)
    without_hard_links(monkeypatch)
    monkeypatch.setattr(local.shutil, "copyfileobj", copy_fails_once)
    assert ckpt.save_latest(train_state(frozen, 2), step=2) is not None
    monkeypatch.undo()
    assert not failures, "the copy was never tried"
    assert_tree_equal(expected_state(2), ckpt.load_checkpoint("latest")["state"])
    assert_tree_equal(expected_state(1), ckpt.load_checkpoint(1)["state"])
    assert_self_contained(Path(ckpt.checkpoint_dir))


def plant_in_place_of_the_data_file(ckpt: Checkpointer, source: str, how: str, spare: Path) -> Path:
    """Replace the data file holding the frozen part in checkpoint ``source`` (the one
    the next save takes it from) with ``how``: a symbolic link to a copy of its bytes
    (elsewhere, whole), or the file cut short (in place). Returns its path."""
    path = checkpoint_path(ckpt, source)
    (name,) = files_holding(path, "frozen/")
    target = path / name
    if how == "symlink":
        spare.write_bytes(target.read_bytes())
        target.unlink()
        target.symlink_to(spare)
    else:
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
    return target


@pytest.mark.parametrize("how", ["symlink", "truncated"])
@pytest.mark.parametrize("source", ["numbered", "latest"])
def test_a_data_file_replaced_by_a_link_or_cut_short_is_never_taken(
    make_checkpointer, tmp_path, source, how
):
    """The data file a save would take (link from the last numbered checkpoint, or keep
    in place in latest) is a symbolic link planted there (to a copy of its very bytes)
    or a file cut short: it is not taken; the new checkpoint holds regular files of
    the sizes its manifest gives, and loads its own step."""
    numbered = source == "numbered"
    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    frozen = frozen_jax()
    save = ckpt.save_checkpoint if numbered else ckpt.save_latest
    assert save(train_state(frozen, 1), step=1) is not None
    planted = plant_in_place_of_the_data_file(
        ckpt, 1 if numbered else "latest", how, tmp_path / "copy.safetensors"
    )

    path = Path(save(train_state(frozen, 2), step=2))
    assert path == checkpoint_path(ckpt, 2 if numbered else "latest")
    files = manifest_of(path)["files"]
    assert planted.name not in files, f"{how} file taken"
    for name, entry in files.items():
        st = os.lstat(path / name)
        assert stat.S_ISREG(st.st_mode), f"{name} is not a regular file"
        assert st.st_size == entry["bytes"], f"{name} holds {st.st_size} bytes"
    loaded = ckpt.load_checkpoint(2 if numbered else "latest")
    assert loaded["step"] == 2
    assert_tree_equal(expected_state(2), loaded["state"])
    assert verify(str(path)) == []


def test_a_copy_is_made_under_a_name_of_its_own_and_renamed_into_place(
    make_checkpointer, monkeypatch
):
    """Without hard links a taken file is copied: while its bytes are being copied,
    nothing is under the file's own name in the new checkpoint (which must only ever
    name a whole file: a kill mid-copy would leave it cut short); once done, that very
    copy is the file under its name, whole, and no temporary file is left."""
    from learnax.checkpoint._storage import local

    real_copy = shutil.copyfileobj
    copies = []

    def copy_watched(src, dst, length=0):
        final = checkpoint_path(ckpt, 2) / Path(src.name).name
        copies.append((final, os.path.lexists(final), os.fstat(dst.fileno()).st_ino))
        return real_copy(src, dst, length)

    ckpt = make_checkpointer(save_every=None, checkpoint_every=None)
    frozen = frozen_jax()
    assert ckpt.save_checkpoint(train_state(frozen, 1), step=1) is not None
    without_hard_links(monkeypatch)
    monkeypatch.setattr(local.shutil, "copyfileobj", copy_watched)
    path = ckpt.save_checkpoint(train_state(frozen, 2), step=2)
    monkeypatch.undo()

    assert path is not None
    assert len(copies) == 1, copies
    ((final, existed, copy_inode),) = copies
    assert not existed, "the copy was made under the file's own name"
    assert files_holding(Path(path), "frozen/") == {final.name}
    assert os.stat(final).st_ino == copy_inode, "the copy was not renamed into place"
    assert final.stat().st_size == manifest_of(Path(path))["files"][final.name]["bytes"]
    assert_tree_equal(expected_state(2), ckpt.load_checkpoint(2)["state"])
    assert_self_contained(Path(ckpt.checkpoint_dir))  # no temporary copy left


# --- async -------------------------------------------------------------------------------


def test_async_incremental_saves_commit_link_and_load(make_checkpointer):
    """Async numbered saves of a frozen state return, commit on wait_until_finished,
    link the frozen file, and every checkpoint loads its own step."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, async_save=True)
    frozen = frozen_jax()
    for step in (1, 2, 3, 4):
        saved = ckpt.maybe_save_checkpoints(train_state(frozen, step), step)
        assert set(saved) == {"numbered"}
    ckpt.wait_until_finished()
    for step in (1, 2, 3, 4):
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])
    assert inodes(checkpoint_path(ckpt, 3), "frozen/") == inodes(
        checkpoint_path(ckpt, 4), "frozen/"
    )
    ckpt.close()


def test_async_save_survives_deleting_the_trainable_array_right_after_it_returns(
    make_checkpointer,
):
    """Deleting the (new) trainable jax array as soon as an async save returns does not
    break it: the trainable part was snapshotted, the frozen part taken."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, async_save=True)
    frozen = frozen_jax()
    for step in (1, 2, 3, 4):
        state = train_state(frozen, step)
        ckpt.maybe_save_checkpoints(state, step)
        state["trainable"].delete()
    ckpt.wait_until_finished()
    for step in (1, 2, 3, 4):
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])
    ckpt.close()


def test_async_fallback_write_survives_the_frozen_array_deleted_after_return(
    make_checkpointer,
):
    """An async save whose link source vanished falls back to writing the frozen part:
    that must not need the caller's arrays after the save returned (the async
    contract lets the caller delete or donate them then)."""
    ckpt = make_checkpointer(save_every=None, checkpoint_every=1, async_save=True)
    frozen = frozen_jax()
    save_numbered(ckpt, frozen, [1, 2])
    shutil.rmtree(checkpoint_path(ckpt, 2))  # the source of the next save's links
    ckpt.maybe_save_checkpoints(train_state(frozen, 3), 3)
    for value in frozen.values():
        value.delete()  # allowed once an async save returned
    ckpt.wait_until_finished()
    assert_tree_equal(expected_state(3), ckpt.load_checkpoint(3)["state"])
    ckpt.close()


# --- S3 ------------------------------------------------------------------------------


@pytest.fixture
def bucket(moto_server):
    """A fresh bucket on the session's moto server, and a boto3 client of the test's
    own to inspect it (as tests/test_s3.py's ``bucket``)."""
    pytest.importorskip("boto3")
    pytest.importorskip("s3fs")
    name = f"learnax-{uuid.uuid4().hex[:16]}"
    client = moto_server.client()
    client.create_bucket(Bucket=name)
    yield name, client, moto_server.storage_options()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for o in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=o["Key"])
    client.delete_bucket(Bucket=name)


def s3_objects(client, name: str, prefix: str) -> dict[str, int]:
    """Key (relative to ``prefix``) -> size of every object under ``prefix``."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name, Prefix=prefix):
        found.update({o["Key"][len(prefix) :]: o["Size"] for o in page.get("Contents", [])})
    return found


def s3_manifest(client, name: str, key: str) -> dict:
    body = client.get_object(Bucket=name, Key=key)["Body"].read()
    return json.loads(body)["manifest"]


def test_s3_frozen_part_is_copied_into_each_checkpoint_and_survives_deletions(bucket):
    """On S3 each numbered checkpoint of a frozen state holds its own object of the
    frozen data file (a server-side copy: the same file name in every prefix, none
    written anew); each loads, and deleting one prefix leaves the others loadable."""
    name, client, options = bucket
    ckpt = Checkpointer(
        f"s3://{name}/reg", "run", save_every=None, checkpoint_every=1, storage_options=options
    )
    save_numbered(ckpt, frozen_jax(), [1, 2, 3])
    prefix = "reg/run/checkpoints/"
    frozen_files = []
    for step in (1, 2, 3):
        objects = s3_objects(client, name, f"{prefix}state_{step}/")
        manifest = s3_manifest(client, name, f"{prefix}state_{step}/{MANIFEST}")
        assert set(objects) == {MANIFEST, *manifest["files"]}
        (file,) = {e["file"] for n, e in manifest["arrays"].items() if n.startswith("frozen/")}
        assert objects[file] == manifest["files"][file]["bytes"]
        frozen_files.append(file)
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])
    assert frozen_files[1] == frozen_files[2], "the frozen file was written anew"

    for key in s3_objects(client, name, f"{prefix}state_2/"):  # the source of state_3's
        client.delete_object(Bucket=name, Key=f"{prefix}state_2/{key}")
    for step in (1, 3):
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])
    assert verify(f"s3://{name}/reg/run", storage_options=options) == []


def test_s3_latest_and_numbered_at_one_step_both_load(bucket):
    """On S3, latest and numbered due at one step both load the state, and hold the
    same data file names (the second copied server-side from the first)."""
    name, client, options = bucket
    ckpt = Checkpointer(
        f"s3://{name}/reg", "run", save_every=1, checkpoint_every=1, storage_options=options
    )
    frozen = frozen_jax()
    for step in (1, 2):
        saved = ckpt.maybe_save_checkpoints(train_state(frozen, step), step)
        assert set(saved) == {"latest", "numbered"}
    prefix = "reg/run/checkpoints/"
    latest = s3_objects(client, name, f"{prefix}state_latest/")
    numbered = s3_objects(client, name, f"{prefix}state_2/")
    holding = [
        {e["file"] for e in s3_manifest(client, name, f"{prefix}{d}/{MANIFEST}")["arrays"].values()}
        for d in ("state_latest", "state_2")
    ]
    assert holding[0] == holding[1], "numbered holds latest's data files"
    assert {f: latest[f] for f in holding[0]} == {f: numbered[f] for f in holding[1]}
    for which in ("latest", 2):
        loaded = ckpt.load_checkpoint(which)
        assert loaded["step"] == 2
        assert_tree_equal(expected_state(2), loaded["state"])
    assert_tree_equal(expected_state(1), ckpt.load_checkpoint(1)["state"])


# --- crash safety -----------------------------------------------------------------------


CRASHING_SAVES = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    import jax.numpy as jnp
    from learnax.checkpoint import Checkpointer

    registry, nth = sys.argv[1], int(sys.argv[2])
    calls = [0]
    original_link = os.link

    def link(*args, **kwargs):
        calls[0] += 1
        try:
            return original_link(*args, **kwargs)
        finally:
            if calls[0] == nth:
                os._exit(17)  # the machine loses power right after the link

    os.link = link
    """
)


def crashing_saves_script() -> str:
    return "\n".join(
        [
            CRASHING_SAVES,
            inspect.getsource(frozen_values),
            inspect.getsource(trainable_value),
            textwrap.dedent(
                """
                ckpt = Checkpointer(registry, "run", save_every=1, checkpoint_every=1)
                frozen = {k: jnp.asarray(v) for k, v in frozen_values().items()}
                for step in range(1, 5):
                    state = {"frozen": frozen, "trainable": jnp.asarray(trainable_value(step))}
                    ckpt.maybe_save_checkpoints(state, step)
                sys.exit(0)
                """
            ),
        ]
    )


# Links while saving steps 1-4 (latest and numbered each step): 1 numbered takes
# latest's file; 2 latest tries to take the frozen file it already holds; 3, 4
# numbered takes latest's two files.
@pytest.mark.parametrize("nth", [1, 3, 4])
def test_crash_right_after_a_link_leaves_committed_checkpoints_and_is_cleaned_up(registry, nth):
    """A writer killed right after its n-th os.link leaves only whole checkpoints:
    the run loads its last committed step, every checkpoint listed loads its own step,
    and the next writer's first save removes the uncommitted links."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", crashing_saves_script(), registry, str(nth)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 17, proc.stderr.decode()[-3000:]
    checkpoint_dir = Path(registry) / "run" / "checkpoints"
    leftovers = [
        e
        for e in os.listdir(checkpoint_dir)
        if not is_lock_file(e) and not (checkpoint_dir / e / MANIFEST).exists()
    ]
    assert leftovers, "the crash was meant to leave an uncommitted checkpoint"

    reader = Checkpointer(registry, "run", save_every=1, checkpoint_every=1)
    loaded = reader.load_latest()
    assert loaded is not None
    assert_tree_equal(expected_state(loaded["step"]), loaded["state"])
    for key in reader.list_available_checkpoints():
        which = key.removeprefix("step_")
        one = reader.load_checkpoint(int(which) if which.isdigit() else which)
        assert_tree_equal(expected_state(one["step"]), one["state"])

    writer = Checkpointer(registry, "run", save_every=1, checkpoint_every=1)
    step = loaded["step"] + 1
    saved = writer.maybe_save_checkpoints(train_state(frozen_jax(), step), step)
    assert set(saved) == {"latest", "numbered"}
    assert_self_contained(checkpoint_dir)
    for key in writer.list_available_checkpoints():
        which = key.removeprefix("step_")
        one = writer.load_checkpoint(int(which) if which.isdigit() else which)
        assert_tree_equal(expected_state(one["step"]), one["state"])
    assert verify(str(checkpoint_dir.parent)) == []


@pytest.mark.parametrize("where", ["local", "s3"])
def test_failed_latest_save_keeps_the_committed_latest_whole(where, registry, request, monkeypatch):
    """A latest save that takes a data file the committed latest already holds (the
    last commit was a numbered checkpoint holding the same file) and then fails before
    its commit removes only what it created: the committed latest still loads."""
    if where == "s3":
        name, _, options = request.getfixturevalue("bucket")
        ckpt = Checkpointer(
            f"s3://{name}/reg", "run", save_every=1, checkpoint_every=2, storage_options=options
        )
    else:
        ckpt = Checkpointer(registry, "run", save_every=1, checkpoint_every=2)
    frozen = frozen_jax()
    for step in (1, 2):  # step 2: latest, then state_2 taking latest's files
        ckpt.maybe_save_checkpoints(train_state(frozen, step), step)

    def failing_write_part(*args, **kwargs):
        raise OSError(errno.EIO, "injected: writing the new data failed")

    monkeypatch.setattr(learnax_write, "write_part", failing_write_part)
    assert ckpt.maybe_save_checkpoints(train_state(frozen, 3), 3) == {}
    monkeypatch.undo()
    loaded = ckpt.load_checkpoint("latest")
    assert loaded["step"] == 2
    assert_tree_equal(expected_state(2), loaded["state"])


def test_without_hard_links_taken_files_are_copies_and_every_checkpoint_loads(
    make_checkpointer, monkeypatch
):
    """On a filesystem without hard links (os.link fails with EPERM) a taken file is
    copied: no inode is shared, and every checkpoint, latest and numbered alternating,
    loads its own step."""
    without_hard_links(monkeypatch)
    ckpt = make_checkpointer(save_every=1, checkpoint_every=2)
    frozen = frozen_jax()
    for step in range(1, 6):
        ckpt.maybe_save_checkpoints(train_state(frozen, step), step)
    monkeypatch.undo()
    for p in Path(ckpt.checkpoint_dir).rglob("*.safetensors"):
        assert os.stat(p).st_nlink == 1, f"{p} is linked"
    for step in (2, 4):
        assert_tree_equal(expected_state(step), ckpt.load_checkpoint(step)["state"])
    assert ckpt.load_checkpoint("latest")["step"] == 5
    assert_tree_equal(expected_state(5), ckpt.load_checkpoint("latest")["state"])
    assert_self_contained(Path(ckpt.checkpoint_dir))
