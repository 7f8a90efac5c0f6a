"""The original learnax's pickles (``state_<name>.pyd``) load by default, through a
restricted unpickler that runs nothing: NumPy (and jax) arrays, builtin containers,
and NamedTuples such as the original's ``learnax.trainer.TrainState``, a module this
process does not have. A pickle that needs anything else raises
``LegacyPickleError`` naming the global it would run; ``allow_pickle=True`` is the
explicit opt-in to plain unpickling.

The original's files are written by ``original_learnax_writer.py`` in a subprocess, so
these tests do not depend on the original package.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import tracemalloc
import types
from collections import OrderedDict
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import pytest
from helpers import scaled, skipped_once
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from learnax.checkpoint import (
    CheckpointCorruptedError,
    Checkpointer,
    LegacyPickleError,
)

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"
TIMEOUT_S = 180
RUN = "old"


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC_DIR), str(TESTS_DIR)])
    return env


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT_S,
    )


def describe(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout:\n{done.stdout}\n--- stderr:\n{done.stderr}"


# --- the original's checkpoints ---------------------------------------------------------


@pytest.fixture(scope="module")
def original_files(tmp_path_factory) -> Path:
    """``<root>/registry/old/checkpoints/state_{100,best,latest}.pyd`` as the original
    learnax wrote them, and ``<root>/expected/`` what they hold."""
    root = tmp_path_factory.mktemp("original")
    done = run_python(
        str(TESTS_DIR / "original_learnax_writer.py"),
        str(root / "registry" / RUN / "checkpoints"),
        str(root / "expected"),
    )
    assert done.returncode == 0, describe(done)
    assert "learnax.trainer" not in sys.modules
    return root


@pytest.fixture
def original_run(original_files, tmp_path) -> Path:
    """A copy of the original's registry that a test may change."""
    return Path(shutil.copytree(original_files / "registry", tmp_path / "registry"))


def expected(original_files: Path, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    with np.load(original_files / "expected" / f"{name}.npz") as npz:
        leaves = {key: npz[key] for key in npz.files}
    meta = json.loads((original_files / "expected" / f"{name}.json").read_text())
    return leaves, meta


def assert_state_matches(state: Any, original_files: Path, name: str) -> None:
    """Every leaf bit-exact at the same key path, NumPy arrays where arrays were saved."""
    leaves, meta = expected(original_files, name)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    assert [jax.tree_util.keystr(p) for p, _ in flat] == meta["keys"]
    for (path, leaf), dtype in zip(flat, meta["dtypes"], strict=True):
        key = jax.tree_util.keystr(path)
        want = leaves[key]
        if want.shape or isinstance(leaf, (np.ndarray, np.generic)):
            assert isinstance(leaf, (np.ndarray, np.generic)), f"{key}: {type(leaf)}"
        got = np.asarray(leaf)
        assert str(got.dtype) == dtype, key
        assert got.shape == want.shape, key
        assert got.tobytes() == want.tobytes(), key


def is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and isinstance(getattr(type(x), "_fields", None), tuple)


def test_load_latest_returns_the_newest_original_pickle_without_allow_pickle(
    original_files, original_run
):
    loaded = Checkpointer(original_run, RUN).load_latest()

    _, meta = expected(original_files, "latest")
    assert loaded["step"] == 150
    assert loaded["time"] == meta["time"]
    assert loaded["metrics"] == {}
    assert_state_matches(loaded["state"], original_files, "latest")


def test_the_original_train_state_comes_back_as_a_namedtuple_of_its_fields(original_run):
    state = Checkpointer(original_run, RUN).load_checkpoint(100)["state"]

    assert is_namedtuple(state)
    assert type(state).__name__ == "TrainState"
    assert type(state)._fields == ("params", "opt_state", "step")
    assert state.step == 100 and type(state.step) is int


def test_load_checkpoint_by_step_and_load_best_read_the_original_pickles(
    original_files, original_run
):
    ckpt = Checkpointer(original_run, RUN, keep_best=True)

    numbered = ckpt.load_checkpoint(100)
    best = ckpt.load_best()

    assert numbered["step"] == 100 and numbered["metrics"] == {"train/loss": 0.5}
    assert_state_matches(numbered["state"], original_files, "100")
    assert best["step"] == 120 and best["metrics"] == {"val/loss": 0.125}
    assert_state_matches(best["state"], original_files, "best")


def test_jax_arrays_in_an_original_pickle_come_back_as_numpy(original_files, original_run):
    # state_best was pickled without device_get: its arrays were jax.Arrays.
    state = Checkpointer(original_run, RUN).load_checkpoint("best")["state"]
    leaves = jax.tree_util.tree_leaves(state.params)
    assert leaves and all(isinstance(leaf, np.ndarray) for leaf in leaves)


def test_optax_states_come_back_as_optax_classes_when_optax_is_imported(original_run):
    opt_state = Checkpointer(original_run, RUN).load_checkpoint(100)["state"].opt_state

    assert type(opt_state) is optax.InjectStatefulHyperparamsState
    adam, empty = opt_state.inner_state
    assert type(adam) is optax.ScaleByAdamState
    assert type(empty) is optax.EmptyState
    assert int(adam.count) == 100


def test_without_optax_imported_its_states_are_namedtuples_of_its_fields(
    original_files, original_run
):
    script = (
        "import json, sys\n"
        "from learnax.checkpoint import Checkpointer\n"
        f"state = Checkpointer({str(original_run)!r}, {RUN!r}).load_latest()['state']\n"
        "found = {}\n"
        "def visit(node):\n"
        "    if isinstance(node, tuple) and hasattr(type(node), '_fields'):\n"
        "        found[type(node).__name__] = list(type(node)._fields)\n"
        "    children = node.values() if isinstance(node, dict) else node\n"
        "    if isinstance(node, (tuple, list, dict)):\n"
        "        for child in children:\n"
        "            visit(child)\n"
        "visit(state)\n"
        "print(json.dumps({'fields': found, 'optax': 'optax' in sys.modules}))\n"
    )
    done = run_python("-c", script)
    assert done.returncode == 0, describe(done)
    result = json.loads(done.stdout)
    assert result["optax"] is False
    assert result["fields"] == expected(original_files, "latest")[1]["fields"]


def test_a_target_gives_the_original_pickle_the_targets_types(original_files, original_run):
    class MyTrainState(NamedTuple):
        params: Any
        opt_state: Any
        step: int

    like = Checkpointer(original_run, RUN).load_checkpoint(100)["state"]
    target = MyTrainState(jax.tree.map(jax.numpy.asarray, like.params), like.opt_state, 0)

    restored = Checkpointer(original_run, RUN).load_checkpoint(100, target=target)["state"]

    assert type(restored) is MyTrainState
    assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(restored.params))
    assert restored.step == 100
    assert_state_matches(jax.device_get(restored), original_files, "100")


def test_learnax_convert_converts_the_original_pickles_without_allow_pickle(
    original_files, original_run, tmp_path
):
    for name, step in (("100", 100), ("latest", 150), ("best", 120)):
        src = original_run / RUN / "checkpoints" / f"state_{name}.pyd"
        dst = tmp_path / "new" / "run" / "checkpoints" / f"state_{name}"
        done = run_python("-m", "learnax", "convert", str(src), str(dst))
        assert done.returncode == 0, describe(done)
        assert "WARNING" not in done.stderr, describe(done)
        loaded = Checkpointer(tmp_path / "new", "run").load_checkpoint(name)
        assert loaded["step"] == step
        assert type(loaded["state"]).__name__ == "TrainState"
        assert_state_matches(loaded["state"], original_files, name)


def test_load_latest_skips_a_damaged_latest_pickle_for_the_newest_numbered(original_run):
    checkpoints = original_run / RUN / "checkpoints"
    (checkpoints / "state_latest.pyd").write_bytes(b"\x80\x04garbage")

    with skipped_once("state_latest.pyd"):
        loaded = Checkpointer(original_run, RUN).load_latest()

    assert loaded["step"] == 100


def test_load_latest_reads_no_numbered_pickle_older_than_latest(original_run, tmp_path):
    marker = tmp_path / "pwned"
    checkpoints = original_run / RUN / "checkpoints"
    (checkpoints / "state_100.pyd").write_bytes(payloads(marker)["os.system"][0])

    assert Checkpointer(original_run, RUN).load_latest()["step"] == 150
    assert not marker.exists()


def test_the_original_pickles_need_no_allow_pickle_and_run_no_warning(original_run, caplog):
    caplog.set_level("WARNING", logger="learnax")
    assert Checkpointer(original_run, RUN).load_latest() is not None
    assert not [r for r in caplog.records if r.name.startswith("learnax")]


# --- pickles that would run code ----------------------------------------------------------


class WritesMarkerOnSetstate:
    """A class of an imported module whose ``__setstate__`` runs code."""

    def __init__(self, marker: str):
        self.marker = marker

    def __setstate__(self, state):
        Path(state["marker"]).touch()


class Importable:
    """An ordinary class of an importable module (this one)."""

    def __init__(self, value):
        self.value = value


class _Reduce:
    """Pickles as ``callable(*args)``: the shape of every payload below."""

    def __init__(self, callable_, *args):
        self.callable_, self.args = callable_, args

    def __reduce__(self):
        return self.callable_, self.args


def original_shaped(state: Any) -> bytes:
    return pickle.dumps({"state": state, "step": 7, "time": time.time()})


def payloads(marker: Path) -> dict[str, tuple[bytes, str]]:
    """Pickles that touch ``marker`` if anything in them runs, each with the global its
    refusal must name."""
    touch = f"touch {marker}".encode()
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (original_shaped({"w": np.ones(2), "x": _Reduce(os.system, touch)}), "system"),
        "builtins.eval": (original_shaped(_Reduce(eval, code)), "builtins.eval"),
        "builtins.exec": (original_shaped(_Reduce(exec, code)), "builtins.exec"),
        "io.open": (original_shaped(_Reduce(open, str(marker), "w")), "io.open"),
        "subprocess.Popen": (
            original_shaped(_Reduce(subprocess.Popen, ["touch", str(marker)])),
            "subprocess.Popen",
        ),
        # getattr(__import__("os"), "system")("touch ..."), by hand.
        "builtins.getattr": (
            b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(S'os'\ntRS'system'\ntR(S'"
            + touch
            + b"'\ntR.",
            "builtins.getattr",
        ),
        # copyreg._reconstructor(os.system, str, "touch ..."), by hand.
        "copyreg._reconstructor-function": (
            b"ccopyreg\n_reconstructor\n(cos\nsystem\ncbuiltins\nstr\nS'" + touch + b"'\ntR.",
            "os.system",
        ),
        # copyreg._reconstructor of a class whose base would be called with the state.
        "copyreg._reconstructor-base": (
            b"ccopyreg\n_reconstructor\n(cnot_imported_module\nThing\n"
            b"cnot_imported_module\nBase\nS'" + touch + b"'\ntR.",
            "copyreg._reconstructor",
        ),
        "setstate": (
            original_shaped(WritesMarkerOnSetstate(str(marker))),
            f"{__name__}.WritesMarkerOnSetstate",
        ),
        # A global of a module that is not imported, called: only running it could tell
        # whether it is a class.
        "not-imported-call": (
            b"cnot_imported_module\nrun\n(S'" + touch + b"'\ntR.",
            "not_imported_module.run",
        ),
    }


MALICIOUS = sorted(payloads(Path("/m")))


def write_pyd(checkpoint_dir: str, name: str, data: bytes) -> Path:
    path = Path(checkpoint_dir) / f"state_{name}.pyd"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", MALICIOUS)
def test_a_pickle_that_would_run_code_is_refused_naming_what_it_calls(
    make_checkpointer, tmp_path, kind
):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer()
    data, named = payloads(marker)[kind]
    write_pyd(ckpt.checkpoint_dir, "7", data)

    with pytest.raises(LegacyPickleError) as excinfo:
        ckpt.load_checkpoint(7)

    message = str(excinfo.value)
    assert named in message, message
    assert "allow_pickle" in message and "state_7.pyd" in message
    assert not marker.exists()


@pytest.mark.parametrize("kind", MALICIOUS)
def test_load_latest_on_a_run_of_pickles_that_need_code_names_learnax_convert(
    make_checkpointer, tmp_path, kind
):
    marker = tmp_path / "pwned"
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", payloads(marker)[kind][0])

    with pytest.raises(LegacyPickleError) as excinfo:
        ckpt.load_latest()

    message = str(excinfo.value)
    assert "learnax convert" in message and "--allow-pickle" in message, message
    assert "state_7.pyd" in message
    assert not marker.exists()


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not a pickle at all", id="text"),
        pytest.param(b"\xfe" + bytes(range(63)), id="binary"),
        pytest.param(pickle.dumps({"state": np.arange(100)})[:-20], id="truncated"),
        pytest.param(b"\x80\x04\x95" + b"\xff" * 8, id="frame-too-long"),
        # BINBYTES8 announcing a terabyte: refused before anything is allocated.
        pytest.param(b"\x80\x04\x8e" + (1 << 40).to_bytes(8, "little") + b"xx.", id="bytes8-1TB"),
        # A memo slot far beyond the file: would allocate a memo table of gigabytes.
        pytest.param(b"\x80\x04N\x8e\x00\x00\x00\x00\x00\x00\x00\x00r\xff\xff\xff\x7f.", id="memo"),
        pytest.param(b"\x80\x04\x8a\x01\x01(I1\nh\x7f.", id="bad-get"),
        pytest.param(b"\x80\x04P.", id="persistent-id"),
    ],
)
def test_damaged_or_crafted_bytes_are_a_corrupted_checkpoint(make_checkpointer, data):
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", data)
    tracemalloc.start()
    try:
        with pytest.raises((CheckpointCorruptedError, LegacyPickleError)) as excinfo:
            ckpt.load_checkpoint(7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "state_7.pyd" in str(excinfo.value)
    assert peak < 50 * 2**20


def numpy_global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


@pytest.mark.parametrize(
    "data",
    [
        # bytearray(10**12): a terabyte of zeros from a few bytes.
        pytest.param(b"cbuiltins\nbytearray\n(I1000000000000\ntR.", id="bytearray-int"),
        pytest.param(b"cbuiltins\nbytes\n(I1000000000000\ntR.", id="bytes-int"),
        # ndarray.__new__ of a terabyte via NEWOBJ.
        pytest.param(
            b"\x80\x02" + numpy_global("numpy", "ndarray") + b"I1000000000000\n\x85\x81.",
            id="ndarray-newobj",
        ),
        pytest.param(
            b"\x80\x02"
            + numpy_global("numpy._core.multiarray", "_reconstruct")
            + numpy_global("numpy", "ndarray")
            + b"I1000000000000\n\x85U\x01b\x87R.",
            id="reconstruct-shape",
        ),
        # np.void(10**12) would be a terabyte of zeros.
        pytest.param(
            b"\x80\x02" + numpy_global("numpy", "void") + b"I1000000000000\n\x85\x81.",
            id="void-newobj",
        ),
        pytest.param(
            b"\x80\x02cbuiltins\nlist\n(cbuiltins\nrange\nI1000000000000\n\x85Rtb.",
            id="list-of-range",
        ),
    ],
)
def test_a_pickle_cannot_allocate_more_than_its_size(make_checkpointer, data):
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", data)
    tracemalloc.start()
    try:
        with pytest.raises((CheckpointCorruptedError, LegacyPickleError)):
            ckpt.load_checkpoint(7)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20


@pytest.mark.parametrize(
    "data",
    [
        # BUILD on the global builtins.set with {"fn": builtins.frozenset}: as attributes.
        pytest.param(b"cbuiltins\nset\n(dS'fn'\ncbuiltins\nfrozenset\nsb.", id="dict-state"),
        # The same as a (None, slots) state: setattr.
        pytest.param(b"cbuiltins\nset\n(N(dS'fn'\ncbuiltins\nfrozenset\nstb.", id="slot-state"),
        pytest.param(b"cnumpy\nndarray\n(dS'name'\nS'x'\nsb.", id="marker"),
    ],
)
def test_a_pickle_cannot_change_what_the_next_pickle_is_read_with(make_checkpointer, data):
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", data)
    with pytest.raises(LegacyPickleError):
        ckpt.load_checkpoint(7)

    for valid in VALID:
        write_pyd(ckpt.checkpoint_dir, "3", valid)
        misc = ckpt.load_checkpoint(3)["state"]["misc"]
        assert type(misc[6]) is set and misc[6] == {1, 2}


def test_a_pickle_naming_many_classes_cannot_make_memory_from_nothing(make_checkpointer):
    # 20,000 distinct classes of a module that is not imported, 20 bytes each.
    body = b"".join(b"cnot_imported\nC%d\n)\x81" % i for i in range(20000))
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", b"\x80\x02(" + body + b"l.")
    with pytest.raises(CheckpointCorruptedError, match="classes"):
        ckpt.load_checkpoint(7)


def test_an_array_whose_data_does_not_match_its_shape_is_corrupted(make_checkpointer):
    data = bytearray(pickle.dumps({"state": np.arange(4, dtype=np.int32)}, protocol=2))
    # The shape tuple (4,) becomes (5,): 20 bytes expected, 16 stored.
    at = data.index(b"K\x04\x85")
    data[at + 1] = 5
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", bytes(data))
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint(7)


def valid_pickles() -> list[bytes]:
    rng = np.random.default_rng(0)
    state = {
        "params": {"w": rng.standard_normal((3, 2)).astype(np.float32)},
        "opt": optax.ScaleByAdamState(np.int32(3), {"w": np.ones(2)}, {"w": np.zeros(2)}),
        "misc": [1, 2.5, "x", None, (True, b"b"), OrderedDict(a=1), {1, 2}, 3j],
    }
    return [pickle.dumps({"state": state, "step": 3, "time": 1.0}, protocol=p) for p in (2, 4, 5)]


VALID = valid_pickles()


@settings(
    max_examples=scaled(40, 150),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    base=st.sampled_from(range(len(VALID) + 1)),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.integers(0, 10**6)),
)
def test_mutated_pickles_raise_only_the_documented_errors(tmp_path, base, edits, cut):
    marker = tmp_path / "pwned"
    data = bytearray(VALID[base] if base < len(VALID) else payloads(marker)["os.system"][0])
    for offset, value in edits:
        data[offset % len(data)] = value
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    ckpt = Checkpointer(tmp_path / "registry", "run")
    write_pyd(ckpt.checkpoint_dir, "7", bytes(data))
    try:
        ckpt.load_checkpoint(7)
    except (CheckpointCorruptedError, LegacyPickleError):
        pass
    assert not marker.exists()


def test_builtin_containers_and_scalars_come_back_as_pickled(make_checkpointer):
    ckpt = make_checkpointer()
    for data in VALID:
        write_pyd(ckpt.checkpoint_dir, "3", data)
        loaded = ckpt.load_checkpoint(3)["state"]
        expected_state = pickle.loads(data)["state"]
        assert loaded["misc"] == expected_state["misc"]
        assert type(loaded["misc"][5]) is OrderedDict
        assert type(loaded["opt"]) is optax.ScaleByAdamState
        np.testing.assert_array_equal(loaded["params"]["w"], expected_state["params"]["w"])


# --- allow_pickle=True --------------------------------------------------------------------


def test_allow_pickle_still_loads_a_pickle_of_an_importable_class(make_checkpointer):
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", original_shaped({"obj": Importable(np.arange(3))}))

    with pytest.raises(LegacyPickleError):
        ckpt.load_checkpoint(7)
    loaded = ckpt.load_checkpoint(7, allow_pickle=True)

    assert type(loaded["state"]["obj"]) is Importable
    np.testing.assert_array_equal(loaded["state"]["obj"].value, np.arange(3))


def test_allow_pickle_rebuilds_classes_of_missing_modules_beside_code(
    make_checkpointer, monkeypatch
):
    class TrainState(NamedTuple):
        params: Any
        opt_state: Any
        step: int

    # Pickled as the original's learnax.trainer.TrainState, a module this process lacks.
    TrainState.__module__, TrainState.__qualname__ = "learnax.trainer", "TrainState"
    module = types.ModuleType("learnax.trainer")
    module.TrainState = TrainState
    monkeypatch.setitem(sys.modules, "learnax.trainer", module)
    data = original_shaped({"ts": TrainState({"w": np.ones(2)}, (), 7), "obj": Importable(1)})
    monkeypatch.delitem(sys.modules, "learnax.trainer")
    ckpt = make_checkpointer()
    write_pyd(ckpt.checkpoint_dir, "7", data)

    with pytest.raises(LegacyPickleError):
        ckpt.load_checkpoint(7)
    state = ckpt.load_checkpoint(7, allow_pickle=True)["state"]

    assert type(state["obj"]) is Importable
    assert type(state["ts"]).__name__ == "TrainState" and state["ts"] is not TrainState
    assert type(state["ts"])._fields == ("params", "opt_state", "step")
    assert state["ts"].step == 7


# --- the command line ----------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return run_python("-m", "learnax", *args)


def test_ls_of_a_run_of_pickles_names_them_instead_of_no_checkpoints(original_run):
    done = run_cli("ls", str(original_run / RUN))
    assert done.returncode == 0, describe(done)
    assert "(no checkpoints" not in done.stdout, describe(done)
    for name in ("state_100.pyd", "state_best.pyd", "state_latest.pyd"):
        assert name in done.stdout, describe(done)
    assert "3" in done.stdout and "pickle" in done.stdout.lower()


def test_ls_json_of_a_run_of_pickles_lists_them(original_run):
    done = run_cli("ls", str(original_run / RUN), "--json")
    assert done.returncode == 0, describe(done)
    listing = json.loads(done.stdout)
    assert listing["checkpoints"] == []
    assert sorted(Path(p).name for p in listing["legacy_pickles"]) == [
        "state_100.pyd",
        "state_best.pyd",
        "state_latest.pyd",
    ]


def test_verify_of_a_run_of_pickles_names_them_instead_of_no_checkpoints(original_run):
    done = run_cli("verify", str(original_run / RUN))
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "no checkpoints under" not in out, describe(done)
    for name in ("state_100.pyd", "state_best.pyd", "state_latest.pyd"):
        assert name in out, describe(done)
    assert "3" in out and "learnax convert" in out, describe(done)


def test_convert_refuses_a_pickle_that_needs_code_naming_allow_pickle(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "state_7.pyd"
    src.write_bytes(payloads(marker)["os.system"][0])
    dst = tmp_path / "registry" / "new" / "checkpoints" / "state_7"
    done = run_cli("convert", str(src), str(dst))
    assert done.returncode == 2, describe(done)
    assert "--allow-pickle" in done.stderr and "system" in done.stderr, describe(done)
    assert "Traceback" not in done.stderr
    assert not dst.exists() and not marker.exists()


def _rebuilding_bomb(copies: int) -> bytes:
    """One 1 MiB bytes object in the memo, then ``copies`` calls of numpy's _frombuffer
    over it: a few dozen bytes each, a full copy each."""
    import struct

    big = 1 << 20
    p = b"\x80\x04\x8e" + struct.pack("<Q", big) + b"\0" * big + b"\x94"  # memo 0
    p += b"cnumpy\ndtype\n\x8c\x02u1\x85R\x94]\x94("  # dtype u1 (memo 1), a list, MARK
    call = b"cnumpy._core.numeric\n_frombuffer\n(h\x00h\x01J" + struct.pack("<i", big)
    p += (call + b"\x85\x8c\x01CtR") * copies + b"e."
    return p


def test_a_pickle_that_rebuilds_its_bytes_again_and_again_is_refused():
    from learnax.checkpoint import _unpickle

    assert len(_unpickle.restricted_load(_rebuilding_bomb(1), "one")) == 1
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointCorruptedError, match="more bytes than it holds"):
            _unpickle.restricted_load(_rebuilding_bomb(300), "bomb")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # a few copies of the 1 MiB file, not 300


def test_an_ordered_dict_given_attributes_by_the_pickle_is_refused():
    from learnax.checkpoint import _unpickle

    data = b"\x80\x02ccollections\nOrderedDict\n)R}X\x05\x00\x00\x00itemsccollections\nOrderedDict\nsb."
    with pytest.raises(_unpickle.NeedsCode, match="attributes"):
        _unpickle.restricted_load(data, "x")


@pytest.mark.parametrize(
    "fields", [{"step": [[1], [1, 2]]}, {"time": 10**400}, {"time": 1j}, {"step": np.ones(2)}]
)
def test_a_crafted_step_or_time_is_damage_and_load_latest_falls_back(make_checkpointer, fields):
    ckpt = make_checkpointer()
    for name, obj in (
        ("state_5.pyd", {"state": {"a": 1}, "step": 5, "time": 1.0, **fields}),
        ("state_2.pyd", {"state": {"a": 2}, "step": 2, "time": 1.0}),
    ):
        with open(os.path.join(ckpt.checkpoint_dir, name), "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(CheckpointCorruptedError):
        ckpt.load_checkpoint("5")
    with skipped_once("state_5.pyd"):
        assert ckpt.load_latest()["state"] == {"a": 2}
