"""Damaged files: single-bit flips and truncations at seeded random offsets in every
file of every checkpoint of a run.

Every case must be detected when the damaged checkpoint is loaded by name
(``CheckpointCorruptedError`` naming the damaged file), and ``load_latest()`` must
return the newest intact checkpoint, bit for bit as it was saved, warning about each
damaged one it skipped. Damaged data is never returned as good.

A pristine run is saved once per module; each case works on its own copy of it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import warnings
import zlib
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_tree_equal, checkpoint_files, read_manifest_file

from learnax.checkpoint import CheckpointCorruptedError, Checkpointer

RUN = "run"
METRIC = "val/loss"
# load_latest() tries these in order (the highest step first, "latest" before a numbered
# checkpoint of the same step); "best" is never one of its candidates.
CANDIDATES = ("latest", "30", "20", "10")
CHECKPOINT_STEPS = {"latest": 40, "30": 30, "20": 20, "10": 10, "best": 25}
CHECKPOINTS = tuple(CHECKPOINT_STEPS)


class Moments(NamedTuple):
    mu: np.ndarray
    nu: np.ndarray
    count: np.ndarray


def saved_state(step: int) -> dict:
    """A few hundred KB: float32, bfloat16 and int arrays, a NamedTuple, scalars."""
    rng = np.random.default_rng(step)
    return {
        "params": {
            "dense": {
                "kernel": rng.standard_normal((96, 256), dtype=np.float32),
                "bias": rng.standard_normal(256, dtype=np.float32),
            },
            "embedding": rng.standard_normal((128, 256), dtype=np.float32).astype(
                ml_dtypes.bfloat16
            ),
        },
        "opt_state": Moments(
            mu=rng.standard_normal((96, 256), dtype=np.float32),
            nu=rng.random((96, 256), dtype=np.float32).astype(ml_dtypes.bfloat16),
            count=np.int32(step),
        ),
        "tokens": rng.integers(-(2**31), 2**31, 4096, dtype=np.int32),
        "mask": rng.integers(-128, 128, 1000, dtype=np.int8),
        "step": np.int64(step),
        "lr": 0.125,
    }


def open_run(registry) -> Checkpointer:
    return Checkpointer(registry, RUN, save_every=1, keep_best=True, metric_name=METRIC)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A registry holding state_latest (step 40), state_10/20/30 and state_best (step 25)."""
    registry = tmp_path_factory.mktemp("pristine") / "registry"
    ckpt = open_run(registry)
    for step in (10, 20, 30):
        assert ckpt.save_checkpoint(saved_state(step), step=step) is not None
    assert ckpt.update_best_checkpoint(saved_state(25), 0.25, step=25)
    assert ckpt.save_latest(saved_state(40), step=40) is not None
    assert sorted(ckpt.list_available_checkpoints()) == [
        "best",
        "latest",
        "step_10",
        "step_20",
        "step_30",
    ]
    return registry


def checkpoint_path(registry: Path, name: str) -> Path:
    return registry / RUN / "checkpoints" / f"state_{name}"


def data_file_of(checkpoint: Path) -> Path:
    files = checkpoint_files(checkpoint)
    assert len(files) == 1, f"expected one data file in {checkpoint}, found {files}"
    return files[0]


# --- where to damage ----------------------------------------------------------------


def manifest_regions(checkpoint: Path) -> dict[str, range]:
    """Byte ranges of manifest.json: the checksum framing before the manifest value,
    the value itself, and the closing framing after it."""
    text, start, end = read_manifest_file(checkpoint)
    size = (checkpoint / "manifest.json").stat().st_size
    assert len(text.encode()) == size  # ASCII: character offsets are byte offsets
    return {"framing": range(0, start), "body": range(start, end), "closing": range(end, size)}


def data_file_regions(path: Path) -> dict[str, range]:
    """Byte ranges of a safetensors file: the 8-byte header length, the JSON header,
    its space padding, and each tensor's bytes."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length]
    padding = len(header) - len(header.rstrip(b" "))
    regions = {
        "header length": range(0, 8),
        "header json": range(8, 8 + length - padding),
        "header padding": range(8 + length - padding, 8 + length),
    }
    entries = json.loads(header)
    entries.pop("__metadata__", None)
    for name, entry in entries.items():
        begin, stop = entry["data_offsets"]
        regions[f"tensor {name}"] = range(8 + length + begin, 8 + length + stop)
    regions["data"] = range(8 + length, len(raw))
    return regions


class Damage(NamedTuple):
    checkpoint: str  # "latest", "30", ..., "best"
    file: str  # "manifest.json" or "data"
    kind: str  # "flip" or "truncate"
    region: str
    offset: int  # the byte flipped, or the length truncated to
    bit: int  # the bit flipped (0 for a truncation)

    def __str__(self) -> str:
        if self.kind == "flip":
            what = f"bit {self.bit} of byte {self.offset} ({self.region})"
        else:
            what = f"truncated to {self.offset} bytes ({self.region})"
        return f"state_{self.checkpoint}/{self.file}: {what}"


FLIPS_PER_REGION = {"framing": 4, "body": 16, "closing": 2}  # manifest.json
DATA_FLIPS_PER_REGION = {"header length": 4, "header json": 10, "header padding": 2, "data": 12}
RANDOM_TRUNCATIONS = 8


def damages(checkpoint: str, file: str, kind: str, path: Path) -> list[Damage]:
    """The seeded cases for one file of one checkpoint."""
    rng = random.Random(zlib.crc32(f"{checkpoint}/{file}/{kind}".encode()))
    size = path.stat().st_size
    if file == "manifest.json":
        regions = manifest_regions(path.parent)
        counts = FLIPS_PER_REGION
    else:
        regions = data_file_regions(path)
        # every tensor, however small, gets a flip of its own
        counts = {**DATA_FLIPS_PER_REGION, **{r: 1 for r in regions if r.startswith("tensor ")}}
    if kind == "flip":
        out = []
        for region, count in counts.items():
            span = regions[region]
            assert len(span) > 0, f"{path.name} has an empty {region}: pick another state"
            for _ in range(count):
                out.append(
                    Damage(checkpoint, file, kind, region, rng.choice(span), rng.randrange(8))
                )
        return out
    # Truncations: the edges of each region, and random lengths.
    lengths = {0: "empty", size - 1: "last byte cut"}
    for region, span in regions.items():
        if region != "data":
            lengths.setdefault(span.start, f"cut at the start of the {region}")
    lengths.update({rng.randrange(1, size - 1): "random length" for _ in range(RANDOM_TRUNCATIONS)})
    return [Damage(checkpoint, file, kind, why, n, 0) for n, why in sorted(lengths.items())]


def apply(damage: Damage, path: Path) -> None:
    data = bytearray(path.read_bytes())
    if damage.kind == "flip":
        data[damage.offset] ^= 1 << damage.bit
    else:
        assert damage.offset < len(data)
        del data[damage.offset :]
    path.write_bytes(bytes(data))


def file_of(registry: Path, checkpoint: str, file: str) -> Path:
    directory = checkpoint_path(registry, checkpoint)
    return directory / "manifest.json" if file == "manifest.json" else data_file_of(directory)


# --- checking one case --------------------------------------------------------------


def user_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    """The messages of the UserWarnings a load_latest() call gave."""
    return [str(w.message) for w in record if issubclass(w.category, UserWarning)]


def check_load_latest(registry: Path, damaged: set[str]) -> None:
    """load_latest() returns the newest intact candidate exactly as saved (or None when
    none is left), after one warning on logger "learnax" naming each damaged candidate
    newer than it, and no Python warning (the one channel)."""
    ckpt = open_run(registry)
    present = [c for c in CANDIDATES if checkpoint_path(registry, c).exists()]
    intact = [c for c in present if c not in damaged]
    expected = intact[0] if intact else None
    skipped = present[: present.index(expected)] if expected else present
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("learnax").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            loaded = ckpt.load_latest()
    finally:
        logging.getLogger("learnax").removeHandler(handler)
    assert user_warnings(record) == [], "a damaged checkpoint reported twice"
    messages = [r.getMessage() for r in records if "Skipping damaged" in r.getMessage()]
    for name in skipped:
        assert any(f"state_{name}" in m for m in messages), (
            f"no warning about skipping damaged state_{name}; warnings: {messages}"
        )
    assert len(messages) == len(skipped), f"unexpected warnings: {messages}"
    if expected is None:
        assert loaded is None, f"load_latest() returned step {loaded['step']}"
        return
    assert loaded is not None, f"load_latest() returned None, expected state_{expected}"
    step = CHECKPOINT_STEPS[expected]
    assert loaded["step"] == step, f"load_latest() returned step {loaded['step']}, not {step}"
    assert_tree_equal(saved_state(step), loaded["state"])


def check_case(pristine: Path, scratch: Path, damage: Damage, rng: random.Random) -> None:
    registry = scratch / "registry"
    shutil.rmtree(registry, ignore_errors=True)
    shutil.copytree(pristine, registry)
    target = file_of(registry, damage.checkpoint, damage.file)
    apply(damage, target)
    if damage.checkpoint in CANDIDATES and rng.random() < 0.75:
        # Mostly make the damaged checkpoint the newest, so that load_latest() has
        # to fall back; otherwise a newer intact one must win without a warning.
        for newer in CANDIDATES[: CANDIDATES.index(damage.checkpoint)]:
            shutil.rmtree(checkpoint_path(registry, newer))

    ckpt = open_run(registry)  # start-up (cleanup, best value) must not trip over it
    assert target.exists(), "start-up removed the damaged file"
    with pytest.raises(CheckpointCorruptedError) as excinfo:
        ckpt.load_checkpoint(damage.checkpoint)
    assert target.name in str(excinfo.value), f"the error does not name the file: {excinfo.value}"
    assert f"state_{damage.checkpoint}" in str(excinfo.value), str(excinfo.value)
    if damage.checkpoint == "best":
        with pytest.raises(CheckpointCorruptedError):
            ckpt.load_best()
    check_load_latest(registry, {damage.checkpoint})


def run_cases(pristine: Path, scratch: Path, cases: list[Damage], seed: str) -> None:
    rng = random.Random(seed)
    failures = []
    for damage in cases:
        try:
            check_case(pristine, scratch, damage, rng)
        except (AssertionError, pytest.fail.Exception) as e:
            failures.append(f"{damage}: {str(e).splitlines()[0] if str(e) else repr(e)}")
        except Exception as e:  # anything but CheckpointCorruptedError from a load is a bug
            failures.append(f"{damage}: {type(e).__name__}: {e}")
    summary = f"{len(cases)} damage cases, {len(cases) - len(failures)} detected and survived"
    print(f"\n{seed}: {summary}")
    assert not failures, f"{summary}; failed:\n" + "\n".join(failures[:40])


# --- the tests ----------------------------------------------------------------------


def test_pristine_run_loads_and_covers_every_region(pristine):
    """Guards the cases below: the copy loads, and each region to damage is non-empty."""
    ckpt = open_run(pristine)
    for name, step in CHECKPOINT_STEPS.items():
        loaded = ckpt.load_checkpoint(name)
        assert loaded["step"] == step
        assert_tree_equal(saved_state(step), loaded["state"])
        directory = checkpoint_path(pristine, name)
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            ["manifest.json", data_file_of(directory).name]
        )
        assert all(manifest_regions(directory).values())
        assert all(data_file_regions(data_file_of(directory)).values())


@pytest.mark.parametrize("kind", ["flip", "truncate"])
@pytest.mark.parametrize("file", ["manifest.json", "data"])
@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_damage_is_detected_naming_the_file_and_load_latest_falls_back(
    pristine, tmp_path, checkpoint, file, kind
):
    path = file_of(pristine, checkpoint, file)
    cases = damages(checkpoint, file, kind, path)
    assert len(cases) >= 10
    run_cases(pristine, tmp_path, cases, f"state_{checkpoint}/{file}/{kind}")


def test_load_latest_skips_every_damaged_newer_checkpoint(pristine, tmp_path):
    """Several damaged checkpoints at once: load_latest() warns about each and returns
    the newest intact one, or None when none is left."""
    rng = random.Random(1234)
    failures = []
    trials = 0
    for newest_intact in range(len(CANDIDATES) + 1):
        for _ in range(4):
            trials += 1
            registry = tmp_path / "registry"
            shutil.rmtree(registry, ignore_errors=True)
            shutil.copytree(pristine, registry)
            damaged = set(CANDIDATES[:newest_intact])
            done = []
            for name in damaged:
                file = rng.choice(["manifest.json", "data"])
                path = file_of(registry, name, file)
                kind = rng.choice(["flip", "truncate"])
                size = path.stat().st_size
                damage = Damage(name, file, kind, "random", rng.randrange(size), rng.randrange(8))
                apply(damage, path)
                done.append(str(damage))
            try:
                check_load_latest(registry, damaged)
            except AssertionError as e:
                failures.append(f"{done}: {e}")
    assert not failures, f"{len(failures)} of {trials} failed:\n" + "\n".join(failures)


def test_a_case_is_reported_when_a_damaged_file_loads(pristine, tmp_path, monkeypatch):
    """The harness can fail: a checkpoint whose damage the loader cannot see (here the
    damage is undone before loading) is reported, not counted as detected."""
    damage = damages("30", "data", "flip", file_of(pristine, "30", "data"))[0]
    monkeypatch.setattr(f"{__name__}.apply", lambda damage, path: None)
    with pytest.raises(AssertionError, match="state_30/data: bit"):
        run_cases(pristine, tmp_path, [damage], "self-test")


def test_start_up_keeps_the_files_of_a_damaged_checkpoint(pristine, tmp_path):
    """A fresh Checkpointer must not 'clean up' a damaged checkpoint's files: they are
    kept for inspection, and load_latest() keeps skipping it."""
    registry = tmp_path / "registry"
    shutil.copytree(pristine, registry)
    latest = checkpoint_path(registry, "latest")
    before = sorted(os.listdir(latest))
    apply(Damage("latest", "manifest.json", "flip", "body", 100, 3), latest / "manifest.json")
    for _ in range(2):
        open_run(registry)
    assert sorted(os.listdir(latest)) == before
    check_load_latest(registry, {"latest"})


def test_the_first_save_of_a_new_writer_keeps_the_files_of_a_damaged_checkpoint(pristine, tmp_path):
    """A fresh Checkpointer's first save cleans up leftovers (here an uncommitted
    checkpoint, removed): a checkpoint whose manifest it cannot read is no leftover,
    and every file of it stays for inspection, its data files above all."""
    registry = tmp_path / "registry"
    shutil.copytree(pristine, registry)
    damaged = checkpoint_path(registry, "20")
    before = {p.name: p.read_bytes() for p in damaged.iterdir()}
    apply(Damage("20", "manifest.json", "flip", "body", 100, 3), damaged / "manifest.json")
    with pytest.raises(CheckpointCorruptedError):
        open_run(registry).load_checkpoint(20)
    leftover = checkpoint_path(registry, "50")  # a save killed before its commit
    shutil.copytree(checkpoint_path(registry, "30"), leftover)
    (leftover / "manifest.json").unlink()

    ckpt = open_run(registry)
    assert ckpt.save_checkpoint(saved_state(60), step=60) is not None

    assert not leftover.exists(), "the first save did not clean up"
    after = {p.name: p.read_bytes() for p in damaged.iterdir()}
    assert set(after) == set(before), "a file of the damaged checkpoint was removed"
    assert {n: b for n, b in after.items() if n != "manifest.json"} == {
        n: b for n, b in before.items() if n != "manifest.json"
    }
    assert_tree_equal(saved_state(60), ckpt.load_checkpoint(60)["state"])
