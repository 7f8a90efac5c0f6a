"""Helpers shared by the test modules: small states, tree comparisons, and ways to
inspect (or, for the corruption tests, damage) what the Checkpointer wrote. They never
stand in for it. Test modules import them with ``from helpers import ...``
(``pythonpath = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import threading
import warnings
import zlib
from pathlib import Path

import jax
import numpy as np

from learnax.checkpoint import Checkpointer

# --- quick and full sizes --------------------------------------------------------------

FULL_TESTS_VARIABLE = "LEARNAX_FULL_TESTS"


def full_tests() -> bool:
    """Whether the long fuzzers, kill loops and live races run at full strength.

    They do when ``LEARNAX_FULL_TESTS`` is set to anything but ``""``/``0``/``false``/
    ``no``, or under ``pytest --runslow`` (which sets it, so worker processes see it
    too). CI's run (``.ci/run``) does; a plain ``python -m pytest`` runs them at their
    quick size, with every case still run.
    """
    value = os.environ.get(FULL_TESTS_VARIABLE, "").strip().lower()
    return value not in ("", "0", "false", "no")


def scaled(quick, full):
    """``full`` in the full sweep (see ``full_tests``), else ``quick``: an example count,
    a number of kills, a duration in seconds."""
    return full if full_tests() else quick


def small_state(seed: int = 0) -> dict:
    """A small train-state-like tree of float32 NumPy arrays."""
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": rng.standard_normal((3, 4)).astype(np.float32),
            "b": rng.standard_normal((4,)).astype(np.float32),
        },
        "opt_state": {"mu": rng.standard_normal((3, 4)).astype(np.float32)},
    }


def identity(tree):
    """A prepare_fn that hands the state to the writer untouched."""
    return tree


def is_typed_key_array(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def assert_leaf_equal(expected, actual, path: str = "") -> None:
    """Bit-exact comparison of one leaf (arrays, typed keys, Python scalars)."""
    where = f" at {path}" if path else ""
    if is_typed_key_array(expected):
        assert is_typed_key_array(actual), f"expected a typed key array{where}"
        assert str(jax.random.key_impl(actual)) == str(jax.random.key_impl(expected))
        np.testing.assert_array_equal(
            np.asarray(jax.random.key_data(actual)),
            np.asarray(jax.random.key_data(expected)),
        )
        return
    if isinstance(expected, (np.ndarray, np.generic, jax.Array)):
        expected = np.asarray(expected)
        actual_np = np.asarray(actual)
        assert actual_np.dtype == expected.dtype, f"dtype{where}"
        assert actual_np.shape == expected.shape, f"shape{where}"
        assert actual_np.tobytes() == expected.tobytes(), f"bytes{where}"
        return
    assert type(actual) is type(expected), f"type{where}: {type(actual)}"
    if isinstance(expected, float) and math.isnan(expected):
        assert math.isnan(actual), f"value{where}"
    else:
        assert actual == expected, f"value{where}"


def assert_tree_equal(expected, actual) -> None:
    """Same pytree structure (node classes, dict keys) and bit-identical leaves."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    expected_leaves = jax.tree_util.tree_flatten_with_path(expected)[0]
    actual_leaves = jax.tree_util.tree_leaves(actual)
    assert len(actual_leaves) == len(expected_leaves)
    for (path, exp), act in zip(expected_leaves, actual_leaves, strict=True):
        assert_leaf_equal(exp, act, jax.tree_util.keystr(path))


def is_lock_file(name: str) -> bool:
    """The checkpoint directory's lock file (``.lock`` in the spec)."""
    return name.startswith(".") and name.endswith("lock")


def checkpoint_dir_entries(checkpoint_dir) -> set[str]:
    """Names in a run's checkpoint directory, leaving out its lock file."""
    return {n for n in os.listdir(checkpoint_dir) if not is_lock_file(n)}


def checkpoint_files(checkpoint_path: str | os.PathLike) -> list[Path]:
    """The safetensors data files of one checkpoint directory, sorted by name."""
    return sorted(Path(checkpoint_path).glob("*.safetensors"))


def flip_byte(path: Path, offset: int) -> None:
    """XOR one byte of a file with 0x01 (offset may be negative: from the end). The file
    may be a hard link shared with other checkpoints of the same data (unchanged data
    is not written twice): the damaged file replaces it, so only this one is damaged
    (tests/test_unchanged_data.py damages a shared file in place)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))


def read_manifest_file(checkpoint_path) -> tuple[str, int, int]:
    """(text of manifest.json, start, end) where text[start:end] is the manifest value."""
    text = (Path(checkpoint_path) / "manifest.json").read_text(encoding="utf-8")
    key = text.index('"manifest"')
    start = text.index(":", key + len('"manifest"')) + 1
    while text[start].isspace():
        start += 1
    _, end = json.JSONDecoder().raw_decode(text, start)
    return text, start, end


def rewrite_manifest_text(checkpoint_path, edit) -> None:
    """Replace the manifest value by ``edit(its_text)`` and write manifest.json back
    with a *valid* checksum, so that only the loader's own checks can refuse it."""
    text, start, end = read_manifest_file(checkpoint_path)
    body = edit(text[start:end])
    old_checksum = json.loads(text)["checksum"]
    new_checksum = "crc32:%08x" % (zlib.crc32(body.encode("utf-8")) & 0xFFFFFFFF)
    new_text = (text[:start] + body + text[end:]).replace(old_checksum, new_checksum)
    (Path(checkpoint_path) / "manifest.json").write_text(new_text, encoding="utf-8")


def rewrite_manifest(checkpoint_path, mutate) -> None:
    """Apply ``mutate(manifest_dict)`` and write it back with a valid checksum: a
    well-formed but hostile manifest."""

    def edit(body: str) -> str:
        manifest = json.loads(body)
        mutate(manifest)
        return json.dumps(manifest)

    rewrite_manifest_text(checkpoint_path, edit)


def tree_listing(root) -> list[tuple[str, int, int]]:
    """Every entry under root with its size and mtime_ns: a fingerprint of the disk."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out.append((os.path.relpath(p, root), st.st_size, st.st_mtime_ns))
    return sorted(out)


def numbered_steps(ckpt: Checkpointer) -> list[int]:
    """The steps of the numbered checkpoints ``list_available_checkpoints`` reports."""
    return [
        int(key[len("step_") :])
        for key in ckpt.list_available_checkpoints()
        if key.startswith("step_")
    ]


def learnax_errors(caplog) -> list[logging.LogRecord]:
    """Records at WARNING or above that the library logged on the ``learnax`` logger."""
    return [
        r for r in caplog.records if r.name.startswith("learnax") and r.levelno >= logging.WARNING
    ]


@contextlib.contextmanager
def damage_reports():
    """Collect what the block reports as damaged and skipped: the messages of the
    "Skipping damaged ..." warnings on logger ``learnax``. Python warnings naming a
    checkpoint fail the block: damage has one channel, the log."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("learnax")
    logger.addHandler(handler)
    reports: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield reports
    finally:
        logger.removeHandler(handler)
    reports += [r.getMessage() for r in records if "Skipping damaged" in r.getMessage()]
    assert [str(w.message) for w in caught if "damaged" in str(w.message)] == []


@contextlib.contextmanager
def skipped_once(name: str):
    """Expect the block to skip the damaged checkpoint ``name`` and to report it exactly
    once: one warning on logger ``learnax`` naming it, and no Python warning."""
    with damage_reports() as reports:
        yield
    assert len(reports) == 1 and name in reports[0], reports


@contextlib.contextmanager
def nothing_damaged():
    """Fail if the block reports any checkpoint as damaged, or warns at all."""
    with damage_reports() as reports, warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
    assert reports == [], reports


class HeldCommit:
    """Holds the commit of every save made on the thread named ``thread``: it stops
    after its data files are written (the run's lock held, on a local disk) until
    :meth:`release`. ``ready`` is set once it stops there; ``files`` names the data
    files of the commit being held."""

    def __init__(self, monkeypatch, thread: str) -> None:
        from learnax.checkpoint import _write

        self.ready, self._go = threading.Event(), threading.Event()
        self.files: list[str] = []
        real_commit = _write.commit

        def commit_when_told(storage, directory, manifest, files):
            if threading.current_thread().name == thread:
                self.files.extend(files)
                self.ready.set()
                assert self._go.wait(60), f"the test never let {thread} commit"
            return real_commit(storage, directory, manifest, files)

        monkeypatch.setattr(_write, "commit", commit_when_told)

    def release(self) -> None:
        self._go.set()


def without_hard_links(monkeypatch) -> None:
    """Make this disk a filesystem without hard links: ``os.link`` fails with EPERM
    (as on some network and FAT filesystems), so a taken data file is copied."""

    def no_hard_links(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
