"""The ``learnax`` command line: ls, show, verify, diff, convert, prune and plot, run as a
user runs them (``python -m learnax ...`` in a subprocess), on checkpoints written by
the real Checkpointer; and the Python API behind it (``read_info``, ``verify``).

Registries shared by several tests are saved once per module; a test that damages or
deletes files works on its own copy.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import pickle
import pty
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_tree_equal, checkpoint_files, flip_byte, read_manifest_file

from learnax.checkpoint import Checkpointer, prune

TESTS_DIR = Path(__file__).resolve().parent
SRC_DIR = TESTS_DIR.parent / "src"
TIMEOUT_S = 120  # per command: a hang guard, far above what one needs

HUMAN_SIZE = re.compile(r"\b\d+(\.\d+)?\s?(B|KiB|MiB|GiB|TiB)\b")
DATE_TIME = re.compile(r"\b\d{4}-\d{2}-\d{2} \d{2}:\d{2}\b")


# --- running the command line ----------------------------------------------------------


def cli_env(prepend_path=()) -> dict[str, str]:
    """The environment of a command: wide, colourless, this checkout's learnax first,
    tests/ importable (the pickles of cli_fixtures objects name that module)."""
    env = dict(os.environ)
    env["COLUMNS"] = "200"
    env["NO_COLOR"] = "1"
    env.setdefault("JAX_PLATFORMS", "cpu")
    paths = [*(str(p) for p in prepend_path), str(SRC_DIR), str(TESTS_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_cli(*args, prepend_path=()) -> subprocess.CompletedProcess:
    """``python -m learnax ARGS...``; stdout and stderr as text."""
    return subprocess.run(
        [sys.executable, "-m", "learnax", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env=cli_env(prepend_path),
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT_S,
    )


def describe(done: subprocess.CompletedProcess) -> str:
    return f"exit {done.returncode}\n--- stdout:\n{done.stdout}\n--- stderr:\n{done.stderr}"


def run_ok(*args) -> subprocess.CompletedProcess:
    done = run_cli(*args)
    assert done.returncode == 0, describe(done)
    return done


def run_json(*args, returncode: int = 0):
    done = run_cli(*args, "--json")
    assert done.returncode == returncode, describe(done)
    return json.loads(done.stdout)


def assert_error(
    done: subprocess.CompletedProcess, returncode: int | None = 2, prefix: str = "learnax: error:"
) -> None:
    """A clean failure: the exit status, a line starting with ``prefix`` (a regex), no
    traceback."""
    if returncode is None:
        assert done.returncode != 0, describe(done)
    else:
        assert done.returncode == returncode, describe(done)
    assert any(re.match(prefix, line) for line in done.stderr.splitlines()), describe(done)
    assert "Traceback" not in done.stderr, describe(done)


# --- reading outputs --------------------------------------------------------------------


def short_name(token: str) -> str:
    """A checkpoint name as a row may show it: "state_10", "step_10" or "10"."""
    for prefix in ("state_", "step_"):
        if token.startswith(prefix):
            return token[len(prefix) :]
    return token


def row_of(stdout: str, name: str) -> tuple[int, str]:
    """(index, line) of the one table row whose first column is ``name``."""
    rows = [
        (i, line)
        for i, line in enumerate(stdout.splitlines())
        if line.split() and short_name(line.split()[0]) == name
    ]
    assert len(rows) == 1, f"expected one row for {name!r} in:\n{stdout}"
    return rows[0]


def numbers_in(text: str) -> list[float]:
    return [float(m) for m in re.findall(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", text)]


def shape_pattern(shape: tuple[int, ...]) -> re.Pattern:
    """A shape as "(64, 32)", "[64, 32]" or "64x32" / "64×32" (1-D: "(32,)", "[32]")."""
    inner = r"\s*,\s*".join(str(d) for d in shape)
    forms = [rf"[\(\[]\s*{inner}\s*,?\s*[\)\]]"]
    if len(shape) >= 2:
        forms.append(r"\b" + r"\s*[x×]\s*".join(str(d) for d in shape) + r"\b")
    return re.compile("|".join(forms))


def ok_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if re.match(r"^ok\s+\S", line)]


def damaged_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("DAMAGED")]


# --- checkpoints on disk ----------------------------------------------------------------


def ckpt_path(registry: Path, run: str, name) -> Path:
    return registry / run / "checkpoints" / f"state_{name}"


def data_bytes(checkpoint: Path) -> int:
    return sum(f.stat().st_size for f in checkpoint_files(checkpoint))


def all_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def damage_manifest(checkpoint: Path) -> None:
    """Flip one byte in the middle of the manifest value: its checksum no longer holds."""
    _, start, end = read_manifest_file(checkpoint)
    flip_byte(checkpoint / "manifest.json", (start + end) // 2)


def damage_tensor_data(checkpoint: Path) -> Path:
    """Flip one byte in the middle of the first tensor's bytes of the checkpoint's
    first data file (not its header, so only reading the data finds it)."""
    data_file = checkpoint_files(checkpoint)[0]
    raw = data_file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    begin, end = next(v["data_offsets"] for k, v in header.items() if k != "__metadata__")
    assert end > begin
    flip_byte(data_file, 8 + header_len + (begin + end) // 2)
    return data_file


def files_listing(root: Path) -> list[tuple[str, int]]:
    """Every file under root (but lock files) with its size."""
    return sorted(
        (str(p.relative_to(root)), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not p.name.endswith(".lock")
    )


# --- a registry of two runs: alpha (latest, best, numbered) and beta (numbered only) ------

ALPHA_LOSS = {0: 0.75, 10: 0.5, 20: 0.25, 30: 0.5}  # best: step 20
ALPHA_ACC = 0.5
ALPHA_NAMES = ["latest", "best", "0", "10", "20", "30"]  # the order ls lists them in
ALPHA_STEPS = {"latest": 30, "best": 20, "0": 0, "10": 10, "20": 20, "30": 30}
BETA_STEPS = (100, 200)


def alpha_state(step: int) -> dict:
    rng = np.random.default_rng(step)
    return {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((256, 128), dtype=np.float32),
                "bias": rng.standard_normal(128, dtype=np.float32),
            }
        },
        "opt_state": {"mu": rng.standard_normal((256, 128), dtype=np.float32)},
    }


def beta_state(step: int) -> dict:
    rng = np.random.default_rng(1000 + step)
    return {"w": rng.standard_normal((32, 32), dtype=np.float32)}


@dataclass
class Registry:
    path: Path
    t0: float  # time.time() before the first save
    t1: float  # and after the last


def alpha_metrics(step: int) -> dict:
    return {"val/loss": ALPHA_LOSS[step], "acc": ALPHA_ACC}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Registry:
    registry = tmp_path_factory.mktemp("two_runs") / "registry"
    t0 = time.time()
    alpha = Checkpointer(
        registry,
        "alpha",
        save_every=10,
        checkpoint_every=10,
        keep_best=True,
        metric_name="val/loss",
    )
    for step in ALPHA_LOSS:
        alpha.maybe_save_checkpoints(alpha_state(step), step, alpha_metrics(step))
    beta = Checkpointer(registry, "beta", save_every=None, checkpoint_every=None)
    for step in BETA_STEPS:
        assert beta.save_checkpoint(beta_state(step), step=step) is not None
    t1 = time.time()
    assert set(alpha.list_available_checkpoints()) == {
        "latest",
        "best",
        "step_0",
        "step_10",
        "step_20",
        "step_30",
    }
    assert alpha.load_best()["step"] == 20
    assert set(beta.list_available_checkpoints()) == {"step_100", "step_200"}
    return Registry(registry, t0, t1)


@pytest.fixture
def two_runs_copy(two_runs, tmp_path) -> Path:
    """A copy of the two-run registry of the test's own, to damage."""
    return Path(shutil.copytree(two_runs.path, tmp_path / "registry"))


# --- a run of one state with several dtypes, for show, export and read_info -----------

SHOW_STEP = 1000
SHOW_METRICS = {"val/loss": 0.25}


def show_state() -> dict:
    rng = np.random.default_rng(7)
    return {
        "params": {
            "Dense_0": {
                "kernel": rng.standard_normal((64, 32), dtype=np.float32),
                "bias": rng.standard_normal(32, dtype=np.float32),
            },
            "embed": rng.standard_normal((100, 16), dtype=np.float32).astype(ml_dtypes.bfloat16),
        },
        "tokens": rng.integers(-1000, 1000, (7, 5), dtype=np.int32),
    }


# path -> (dtype, shape, bytes)
SHOW_LEAVES = {
    "params/Dense_0/kernel": ("float32", (64, 32), 64 * 32 * 4),
    "params/Dense_0/bias": ("float32", (32,), 32 * 4),
    "params/embed": ("bfloat16", (100, 16), 100 * 16 * 2),
    "tokens": ("int32", (7, 5), 7 * 5 * 4),
}


@pytest.fixture(scope="module")
def show_run(tmp_path_factory) -> Registry:
    """Run "m": state_1000 and state_latest (step 1000), both of show_state()."""
    registry = tmp_path_factory.mktemp("show") / "registry"
    t0 = time.time()
    ckpt = Checkpointer(registry, "m")
    assert ckpt.save_checkpoint(show_state(), step=SHOW_STEP, metrics=SHOW_METRICS) is not None
    assert ckpt.save_latest(show_state(), step=SHOW_STEP, metrics=SHOW_METRICS) is not None
    return Registry(registry, t0, time.time())


def leaves_by_path(leaves: list[dict]) -> dict:
    return {leaf["path"]: (leaf["dtype"], tuple(leaf["shape"]), leaf["bytes"]) for leaf in leaves}


# === ls ==================================================================================


def test_ls_registry_lists_one_row_per_run(two_runs):
    out = run_ok("ls", two_runs.path).stdout
    _, alpha = row_of(out, "alpha")
    tokens = alpha.split()
    assert "30" in tokens, alpha  # newest step
    assert "6" in tokens or "4" in tokens, alpha  # checkpoints (all, or numbered)
    assert "val/loss=0.25" in alpha, alpha  # best
    assert HUMAN_SIZE.search(alpha), alpha
    assert DATE_TIME.search(alpha), alpha
    _, beta = row_of(out, "beta")
    tokens = beta.split()
    assert "200" in tokens and "2" in tokens, beta
    assert "-" in tokens, beta  # no best
    assert HUMAN_SIZE.search(beta), beta
    assert DATE_TIME.search(beta), beta


def test_ls_registry_json(two_runs):
    runs = {r["run"]: r for r in run_json("ls", two_runs.path)["runs"]}
    assert set(runs) == {"alpha", "beta"}
    alpha, beta = runs["alpha"], runs["beta"]
    alpha_dir = two_runs.path / "alpha"
    beta_dir = two_runs.path / "beta"
    assert Path(alpha["path"]).resolve() == alpha_dir.resolve()
    assert Path(beta["path"]).resolve() == beta_dir.resolve()
    assert alpha["checkpoints"] in (6, 4)  # all checkpoints, or the numbered ones
    assert beta["checkpoints"] == 2
    assert alpha["newest_step"] == 30
    assert beta["newest_step"] == 200
    assert alpha["best"] == {"metric": "val/loss", "value": 0.25, "step": 20}
    assert beta["best"] is None
    for run, run_dir in ((alpha, alpha_dir), (beta, beta_dir)):
        checkpoints = [p for p in (run_dir / "checkpoints").iterdir() if p.is_dir()]
        assert sum(data_bytes(c) for c in checkpoints) <= run["bytes"] <= all_bytes(run_dir)
        assert two_runs.t0 - 2 <= run["last_write"] <= two_runs.t1 + 2


def test_ls_run_lists_checkpoints_in_order_with_step_metrics_and_ok(two_runs):
    out = run_ok("ls", two_runs.path / "alpha").stdout
    indexes = []
    for name in ALPHA_NAMES:
        index, row = row_of(out, name)
        indexes.append(index)
        tokens = row.split()
        assert str(ALPHA_STEPS[name]) in tokens, row
        assert "ok" in tokens, row
        assert HUMAN_SIZE.search(row), row
        assert "acc=0.5" in row, row
    assert indexes == sorted(indexes), out  # latest, best, then numbered ascending
    assert "val/loss=0.25" in row_of(out, "20")[1]
    assert "val/loss=0.25" in row_of(out, "best")[1]
    assert "val/loss=0.75" in row_of(out, "0")[1]


def test_ls_run_json(two_runs):
    run_dir = two_runs.path / "alpha"
    checkpoints = run_json("ls", run_dir)["checkpoints"]
    assert [Path(c["path"]).name for c in checkpoints] == [f"state_{n}" for n in ALPHA_NAMES]
    for name, c in zip(ALPHA_NAMES, checkpoints, strict=True):
        path = ckpt_path(two_runs.path, "alpha", name)
        assert Path(c["path"]).resolve() == path.resolve()
        assert short_name(c["name"]) == name
        assert c["step"] == ALPHA_STEPS[name]
        assert c["metrics"] == alpha_metrics(ALPHA_STEPS[name])
        assert c["status"] == "ok"
        assert data_bytes(path) <= c["bytes"] <= all_bytes(path)
        assert two_runs.t0 - 1 <= c["time"] <= two_runs.t1 + 1


def test_ls_run_shows_a_damaged_manifest_as_damaged(two_runs_copy):
    damage_manifest(ckpt_path(two_runs_copy, "alpha", 10))
    run_dir = two_runs_copy / "alpha"
    out = run_cli("ls", run_dir).stdout
    assert "damaged" in row_of(out, "10")[1].split(), out
    for name in ALPHA_NAMES:
        if name != "10":
            assert "ok" in row_of(out, name)[1].split(), out
    done = run_cli("ls", run_dir, "--json")
    status = {Path(c["path"]).name: c["status"] for c in json.loads(done.stdout)["checkpoints"]}
    assert status == {f"state_{n}": ("damaged" if n == "10" else "ok") for n in ALPHA_NAMES}, (
        describe(done)
    )


def test_ls_run_json_gives_the_problem_of_a_damaged_checkpoint_only(two_runs_copy):
    damage_manifest(ckpt_path(two_runs_copy, "alpha", 10))
    checkpoints = run_json("ls", two_runs_copy / "alpha")["checkpoints"]
    problems = {Path(c["path"]).name: c.get("problem") for c in checkpoints}
    assert "manifest.json" in problems.pop("state_10")
    assert set(problems.values()) == {None}


def test_sizes_change_unit_at_1024_and_numbers_show_six_significant_digits():
    from learnax import _cli_output as out

    assert [out.size(n) for n in (0, 1023, 1024, 1536, 1024**2)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "1.5 KiB",
        "1.0 MiB",
    ]
    assert [out.number(x) for x in (0.123456789, 1234567.0, 3, "x")] == [
        "0.123457",
        "1.23457e+06",
        "3",
        "x",
    ]


def test_ls_run_shows_a_truncated_data_file_as_damaged(two_runs_copy):
    data_file = checkpoint_files(ckpt_path(two_runs_copy, "alpha", 20))[0]
    with open(data_file, "r+b") as f:
        f.truncate(data_file.stat().st_size - 1)
    done = run_cli("ls", two_runs_copy / "alpha", "--json")
    status = {Path(c["path"]).name: c["status"] for c in json.loads(done.stdout)["checkpoints"]}
    assert status == {f"state_{n}": ("damaged" if n == "20" else "ok") for n in ALPHA_NAMES}, (
        describe(done)
    )


# === show ================================================================================


def test_show_prints_step_metrics_leaves_and_totals(show_run):
    out = run_ok("show", ckpt_path(show_run.path, "m", SHOW_STEP)).stdout
    assert re.search(rf"\b{SHOW_STEP}\b", out), out
    assert "val/loss" in out and "0.25" in out, out
    for path, (dtype, shape, _) in SHOW_LEAVES.items():
        rows = [line for line in out.splitlines() if path in line.split()]
        assert len(rows) == 1, f"no single row for {path}:\n{out}"
        assert re.search(rf"\b{dtype}\b", rows[0]), rows[0]
        assert shape_pattern(shape).search(rows[0]), rows[0]
    totals = [line for line in out.splitlines() if re.search(r"\bleaves\b", line)]
    assert totals, out
    assert re.search(r"\b4 leaves\b", totals[-1]), totals[-1]
    assert re.search(r"\b4 arrays\b", totals[-1]), totals[-1]
    assert HUMAN_SIZE.search(totals[-1]), totals[-1]


def test_show_json(show_run):
    path = ckpt_path(show_run.path, "m", SHOW_STEP)
    info = run_json("show", path)
    assert Path(info["path"]).resolve() == path.resolve()
    assert info["step"] == SHOW_STEP
    assert info["metrics"] == SHOW_METRICS
    assert show_run.t0 - 1 <= info["time"] <= show_run.t1 + 1
    assert leaves_by_path(info["leaves"]) == SHOW_LEAVES
    assert info["n_leaves"] == len(SHOW_LEAVES)
    leaf_bytes = sum(b for _, _, b in SHOW_LEAVES.values())
    assert leaf_bytes <= info["total_bytes"] <= data_bytes(path)


@pytest.mark.parametrize("name", ["latest", str(SHOW_STEP)])
def test_show_run_and_name(show_run, name):
    info = run_json("show", show_run.path / "m", name)
    assert Path(info["path"]).name == f"state_{name}"
    assert info["step"] == SHOW_STEP
    assert leaves_by_path(info["leaves"]) == SHOW_LEAVES


def test_show_does_not_read_array_data(show_run, tmp_path):
    """A flipped byte in the tensor data is verify's business, not show's."""
    registry = Path(shutil.copytree(show_run.path, tmp_path / "registry"))
    path = ckpt_path(registry, "m", SHOW_STEP)
    damage_tensor_data(path)
    info = run_json("show", path)
    assert leaves_by_path(info["leaves"]) == SHOW_LEAVES


# === verify ==============================================================================

# (what to verify, how many checkpoints that covers)
VERIFY_LEVELS = {
    "checkpoint": (lambda r: ckpt_path(r, "alpha", 10), 1),
    "run": (lambda r: r / "alpha", len(ALPHA_NAMES)),
    "registry": (lambda r: r, len(ALPHA_NAMES) + len(BETA_STEPS)),
}


@pytest.mark.parametrize("level", list(VERIFY_LEVELS))
def test_verify_intact_exits_0_with_one_ok_line_per_checkpoint(two_runs, level):
    target, count = VERIFY_LEVELS[level]
    done = run_cli("verify", target(two_runs.path))
    assert done.returncode == 0, describe(done)
    assert not damaged_lines(done.stdout), describe(done)
    assert len(ok_lines(done.stdout)) == count, describe(done)


@pytest.mark.parametrize("level", list(VERIFY_LEVELS))
def test_verify_flipped_data_byte_exits_1_naming_the_checkpoint(two_runs_copy, level):
    damage_tensor_data(ckpt_path(two_runs_copy, "alpha", 10))
    target, count = VERIFY_LEVELS[level]
    done = run_cli("verify", target(two_runs_copy))
    assert done.returncode == 1, describe(done)
    damaged = damaged_lines(done.stdout)
    assert len(damaged) == 1, describe(done)
    assert "state_10" in damaged[0] and "alpha" in damaged[0], damaged[0]
    ok = ok_lines(done.stdout)
    assert len(ok) == count - 1, describe(done)
    assert not any("state_10" in line and "alpha" in line for line in ok), describe(done)


def test_verify_damaged_manifest_exits_1_naming_the_checkpoint(two_runs_copy):
    damage_manifest(ckpt_path(two_runs_copy, "alpha", 20))
    done = run_cli("verify", two_runs_copy / "alpha")
    assert done.returncode == 1, describe(done)
    damaged = damaged_lines(done.stdout)
    assert len(damaged) == 1 and "state_20" in damaged[0], describe(done)
    assert "Traceback" not in done.stderr


# === diff ================================================================================


def diff_base() -> dict:
    return {
        "params": {
            "w": np.arange(1, 13, dtype=np.float32).reshape(3, 4),
            "b": np.linspace(-1, 1, 4, dtype=np.float32),
            "c": np.full((2, 2), 0.5, dtype=np.float32),
        },
        "extra_a": np.ones(3, dtype=np.float32),
        "same": np.arange(5, dtype=np.int32),
    }


def diff_one_value() -> dict:
    """diff_base() with params/w[1, 2] (7.0) changed to 7.5."""
    state = diff_base()
    state["params"]["w"][1, 2] += 0.5
    return state


def diff_restructured() -> dict:
    """extra_a removed, extra_b added, params/b reshaped, params/c of another dtype."""
    state = diff_base()
    del state["extra_a"]
    state["extra_b"] = np.zeros(3, dtype=np.float32)
    state["params"]["b"] = np.linspace(-1, 1, 5, dtype=np.float32)
    state["params"]["c"] = state["params"]["c"].astype(np.float16)
    return state


@pytest.fixture(scope="module")
def diff_run(tmp_path_factory) -> Path:
    """Run "d": state_1 and state_again (both diff_base() at step 1), state_2
    (diff_one_value()), state_3 (diff_restructured())."""
    registry = tmp_path_factory.mktemp("diff") / "registry"
    ckpt = Checkpointer(registry, "d")
    assert ckpt.save_checkpoint(diff_base(), step=1) is not None
    assert ckpt.save_checkpoint(diff_base(), step=1, suffix="again") is not None
    assert ckpt.save_checkpoint(diff_one_value(), step=2) is not None
    assert ckpt.save_checkpoint(diff_restructured(), step=3) is not None
    return registry / "d" / "checkpoints"


def test_diff_identical_exits_0(diff_run):
    done = run_cli("diff", diff_run / "state_1", diff_run / "state_again")
    assert done.returncode == 0, describe(done)


def test_diff_identical_json_counts_every_leaf_identical(diff_run):
    report = run_json("diff", diff_run / "state_1", diff_run / "state_again")
    expected = {"added": [], "removed": [], "changed": [], "different": [], "identical": 5}
    assert {key: report[key] for key in expected} == expected


def test_diff_differing_exits_1_naming_the_leaf_and_its_max_abs_diff(diff_run):
    done = run_cli("diff", diff_run / "state_1", diff_run / "state_2")
    assert done.returncode == 1, describe(done)
    rows = [line for line in done.stdout.splitlines() if "params/w" in line]
    assert rows, describe(done)
    assert any(any(math.isclose(x, 0.5) for x in numbers_in(row)) for row in rows), rows


def test_diff_differing_json(diff_run):
    report = run_json("diff", diff_run / "state_1", diff_run / "state_2", returncode=1)
    assert report["added"] == [] and report["removed"] == [] and report["changed"] == []
    assert report["identical"] == 4
    [different] = report["different"]
    assert different["path"] == "params/w"
    assert different["max_abs"] == pytest.approx(0.5)
    # |7.5 - 7| relative to 7 or to 7.5
    assert any(different["max_rel"] == pytest.approx(r) for r in (0.5 / 7, 0.5 / 7.5))


def test_diff_added_removed_and_changed_leaves(diff_run):
    done = run_cli("diff", diff_run / "state_1", diff_run / "state_3")
    assert done.returncode == 1, describe(done)
    for name in ("extra_a", "extra_b", "params/b", "params/c"):
        assert name in done.stdout, describe(done)
    assert "added" in done.stdout.lower() and "removed" in done.stdout.lower(), describe(done)


def test_diff_added_removed_and_changed_leaves_json(diff_run):
    report = run_json("diff", diff_run / "state_1", diff_run / "state_3", returncode=1)
    assert report["removed"] == ["extra_a"]  # only in A
    assert report["added"] == ["extra_b"]  # only in B
    changed = {c["path"]: (str(c["a"]), str(c["b"])) for c in report["changed"]}
    assert set(changed) == {"params/b", "params/c"}
    assert "4" in changed["params/b"][0] and "5" in changed["params/b"][1]
    assert "float32" in changed["params/c"][0] and "float16" in changed["params/c"][1]
    assert report["different"] == []
    assert report["identical"] == 2  # params/w, same


# === convert =============================================================================


def converted(registry: Path, run: str, step: int, target=None) -> dict:
    loaded = Checkpointer(registry, run).load_checkpoint(step, target=target)
    assert loaded is not None, f"no checkpoint {step} in {registry / run}"
    return loaded


def test_convert_legacy_pickle_of_train_state_fields_needs_no_allow_pickle(tmp_path):
    import optax
    from cli_fixtures import trained_state

    state = trained_state(optax.adam(1e-3), steps=3)
    tree = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    src = tmp_path / "registry" / "old" / "checkpoints" / "state_3.pyd"
    src.parent.mkdir(parents=True)
    with open(src, "wb") as f:
        pickle.dump(
            {"state": tree, "step": 3, "time": time.time(), "metrics": {"val/loss": 0.25}}, f
        )
    dst = ckpt_path(tmp_path / "registry", "new", 3)
    done = run_cli("convert", src, dst)  # arrays, dicts and optax states: nothing to run
    assert done.returncode == 0, describe(done)
    assert "WARNING" not in done.stderr, describe(done)
    loaded = converted(tmp_path / "registry", "new", 3, target=tree)
    assert loaded["step"] == 3
    assert_tree_equal(tree, loaded["state"])


def test_convert_legacy_pickle_of_a_train_state_object(tmp_path):
    from cli_fixtures import PICKLABLE_ADAM, trained_state

    state = trained_state(PICKLABLE_ADAM, steps=3)
    assert state.step == 3
    src = tmp_path / "registry" / "old" / "checkpoints" / "state_3.pyd"
    src.parent.mkdir(parents=True)
    with open(src, "wb") as f:
        pickle.dump(state, f)
    dst = ckpt_path(tmp_path / "registry", "new", 3)
    done = run_cli("convert", src, dst, "--allow-pickle")
    assert done.returncode == 0, describe(done)
    loaded = converted(tmp_path / "registry", "new", 3, target=state)
    assert loaded["step"] == 3  # the state's .step
    assert_tree_equal(state, loaded["state"])


def test_convert_legacy_pickle_that_needs_code_refused_without_allow_pickle(tmp_path):
    src = tmp_path / "state_3.pyd"
    with open(src, "wb") as f:
        # A functools.partial: only running code from the file could rebuild it.
        pickle.dump({"state": {"w": np.ones(3, np.float32), "f": partial(max, 1)}, "step": 3}, f)
    dst = ckpt_path(tmp_path / "registry", "new", 3)
    done = run_cli("convert", src, dst)
    assert_error(done, 2)
    assert "--allow-pickle" in done.stderr and "functools.partial" in done.stderr, describe(done)
    assert not dst.exists()


def test_convert_orbax_checkpoint(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    state = {
        "params": {
            "w": np.arange(32, dtype=np.float32).reshape(8, 4) / 3,
            "b": np.linspace(-2, 2, 4, dtype=np.float32),
        },
        "count": np.arange(3, dtype=np.int32),
    }
    src = tmp_path / "orbax"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(src, state)
    checkpointer.wait_until_finished()
    checkpointer.close()
    dst = ckpt_path(tmp_path / "registry", "new", 100)
    done = run_cli("convert", src, dst, "--step", "100")
    assert done.returncode == 0, describe(done)
    loaded = converted(tmp_path / "registry", "new", 100, target=state)
    assert loaded["step"] == 100
    assert_tree_equal(state, loaded["state"])


def test_convert_safetensors_file_step_defaults_to_0(tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(3)
    tensors = {
        "w": rng.standard_normal((5, 3), dtype=np.float32),
        "ids": rng.integers(0, 1 << 40, 6, dtype=np.int64),
        "half": rng.standard_normal((2, 2)).astype(np.float16),
        "mask": rng.integers(0, 256, 4, dtype=np.uint8),
    }
    src = tmp_path / "weights.safetensors"
    save_file(tensors, str(src))
    dst = ckpt_path(tmp_path / "registry", "new", 0)
    done = run_cli("convert", src, dst)
    assert done.returncode == 0, describe(done)
    loaded = converted(tmp_path / "registry", "new", 0)
    assert loaded["step"] == 0
    assert_tree_equal(tensors, loaded["state"])


def test_convert_learnax_checkpoint_keeps_its_step(show_run, tmp_path):
    src = ckpt_path(show_run.path, "m", SHOW_STEP)
    dst = ckpt_path(tmp_path / "registry", "copy", SHOW_STEP)
    done = run_cli("convert", src, dst)
    assert done.returncode == 0, describe(done)
    loaded = converted(tmp_path / "registry", "copy", SHOW_STEP)
    assert loaded["step"] == SHOW_STEP
    assert_tree_equal(show_state(), loaded["state"])


def test_convert_export_only_params_to_safetensors_keeps_full_paths(show_run, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "params.safetensors"
    done = run_cli("convert", ckpt_path(show_run.path, "m", SHOW_STEP), out, "--only", "params")
    assert done.returncode == 0, describe(done)
    tensors = load_file(str(out))
    params = show_state()["params"]
    expected = {
        "params/Dense_0/kernel": params["Dense_0"]["kernel"],
        "params/Dense_0/bias": params["Dense_0"]["bias"],
        "params/embed": params["embed"],
    }
    assert set(tensors) == set(expected)
    for name, array in expected.items():
        assert tensors[name].dtype == array.dtype, name
        assert tensors[name].shape == array.shape, name
        assert tensors[name].tobytes() == array.tobytes(), name


def test_convert_export_whole_checkpoint_to_safetensors(show_run, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "all.safetensors"
    done = run_cli("convert", ckpt_path(show_run.path, "m", SHOW_STEP), out)
    assert done.returncode == 0, describe(done)
    tensors = load_file(str(out))
    assert {k: (str(v.dtype), v.shape, v.nbytes) for k, v in tensors.items()} == SHOW_LEAVES
    np.testing.assert_array_equal(tensors["tokens"], show_state()["tokens"])


# === prune ===============================================================================

PRUNE_STEPS = (1, 2, 3, 4, 5, 6)


@pytest.fixture(scope="module")
def prune_pristine(tmp_path_factory) -> Path:
    """Run "p": state_1 .. state_6, state_latest (step 6), state_best (step 3)."""
    registry = tmp_path_factory.mktemp("prune") / "registry"
    ckpt = Checkpointer(registry, "p", keep_best=True)
    for step in PRUNE_STEPS:
        assert ckpt.save_checkpoint(beta_state(step), step=step) is not None
    assert ckpt.update_best_checkpoint(beta_state(3), 0.25, step=3)
    assert ckpt.save_latest(beta_state(6), step=6) is not None
    return registry


@pytest.fixture
def prune_run(prune_pristine, tmp_path) -> Path:
    registry = Path(shutil.copytree(prune_pristine, tmp_path / "registry"))
    return registry / "p"


def state_dirs(run: Path) -> set[str]:
    return {p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("state_")}


def named_paths(stdout: str, verb: str) -> set[str]:
    """The basenames of the paths on lines "<verb> <path>"."""
    names = set()
    for line in stdout.splitlines():
        if line.startswith(verb + " "):
            names.add(Path(line[len(verb) + 1 :].strip()).name)
    return names


def test_prune_dry_run_lists_and_deletes_nothing(prune_run):
    before = files_listing(prune_run)
    done = run_cli("prune", prune_run, "--keep", "2", "--dry-run")
    assert done.returncode == 0, describe(done)
    assert named_paths(done.stdout, "would delete") == {f"state_{s}" for s in (1, 2, 3, 4)}
    assert "deleted" not in done.stdout, describe(done)
    assert files_listing(prune_run) == before


def test_prune_deletes_beyond_the_newest_keep_never_latest_or_best(prune_run):
    done = run_cli("prune", prune_run, "--keep", "2")
    assert done.returncode == 0, describe(done)
    assert named_paths(done.stdout, "deleted") == {f"state_{s}" for s in (1, 2, 3, 4)}
    assert state_dirs(prune_run) == {"state_5", "state_6", "state_latest", "state_best"}
    ckpt = Checkpointer(prune_run.parent, "p")
    assert set(ckpt.list_available_checkpoints()) == {"latest", "best", "step_5", "step_6"}
    assert ckpt.load_best()["step"] == 3
    assert_tree_equal(beta_state(5), ckpt.load_checkpoint(5)["state"])


def test_prune_keep_period_keeps_multiples_without_counting_them(prune_run):
    # 3 and 6 are kept for the period; of 1, 2, 4, 5 the newest two stay.
    done = run_cli("prune", prune_run, "--keep", "2", "--keep-period", "3")
    assert done.returncode == 0, describe(done)
    assert named_paths(done.stdout, "deleted") == {"state_1", "state_2"}
    assert state_dirs(prune_run) == {f"state_{n}" for n in (3, 4, 5, 6, "latest", "best")}


RANKED_LOSSES = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.1, 5: 0.7, 6: 0.8}


@pytest.fixture
def ranked_run(tmp_path) -> Path:
    """Run "k": numbered checkpoints 1 .. 6, each saved with its "loss"."""
    ckpt = Checkpointer(tmp_path / "registry", "k")
    for step, loss in RANKED_LOSSES.items():
        assert ckpt.save_checkpoint(beta_state(step), step=step, metrics={"loss": loss})
    return tmp_path / "registry" / "k"


@pytest.mark.parametrize(
    ("extra", "kept"),
    [([], {2, 4, 6}), (["--maximize"], {1, 6})],
    ids=["lowest", "maximize"],
)
def test_prune_keep_top_k_keeps_the_best_by_the_metric_beside_the_newest(ranked_run, extra, kept):
    done = run_cli(
        "prune", ranked_run, "--keep", "1", "--keep-top-k", "2", "--metric", "loss", *extra
    )
    assert done.returncode == 0, describe(done)
    assert state_dirs(ranked_run) == {f"state_{s}" for s in kept}
    assert named_paths(done.stdout, "deleted") == {f"state_{s}" for s in set(RANKED_LOSSES) - kept}


def test_prune_keep_top_k_without_a_metric_exits_2_and_deletes_nothing(ranked_run):
    before = files_listing(ranked_run)
    done = run_cli("prune", ranked_run, "--keep", "1", "--keep-top-k", "2")
    assert done.returncode == 2, describe(done)
    assert "--metric" in done.stderr
    assert files_listing(ranked_run) == before


def test_prune_keep_top_k_deletes_nothing_while_a_manifest_cannot_be_read(ranked_run, monkeypatch):
    from learnax.checkpoint import _run

    def unreadable(self, name):
        raise OSError(5, "Input/output error (injected)", name)

    monkeypatch.setattr(_run.RunDirectory, "read_manifest", unreadable)
    before = files_listing(ranked_run)
    with pytest.raises(OSError, match="cannot be read"):
        prune(ranked_run, 1, keep_top_k=2, metric="loss")
    assert files_listing(ranked_run) == before


# === plot ================================================================================


def test_plot_writes_a_png(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = tmp_path / "plot.png"
    done = run_cli("plot", two_runs.path / "alpha", "--metric", "val/loss", "-o", out)
    assert done.returncode == 0, describe(done)
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 5000
    pixels = matplotlib.image.imread(str(out))
    colours = np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)
    assert len(colours) > 1


def test_plot_without_matplotlib_exits_2_naming_the_extra(two_runs, tmp_path):
    # A matplotlib that cannot be imported, first on the path.
    hidden = tmp_path / "no_matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        'raise ModuleNotFoundError("No module named \'matplotlib\'", name="matplotlib")\n'
    )
    out = tmp_path / "plot.png"
    done = run_cli(
        "plot",
        two_runs.path / "alpha",
        "--metric",
        "val/loss",
        "-o",
        out,
        prepend_path=[hidden.parent],
    )
    assert_error(done, 2)
    assert "pip install" in done.stderr and "learnax[plot]" in done.stderr, describe(done)
    assert not out.exists()


# === errors ==============================================================================


@pytest.mark.parametrize(
    "command",
    [
        ["ls", "{missing}"],
        ["ls", "{missing}", "--json"],
        ["show", "{missing}"],
        ["verify", "{missing}"],
        ["diff", "{missing}", "{missing2}"],
        ["convert", "{missing}", "{dst}"],
        ["prune", "{missing}", "--keep", "1"],
    ],
    ids=lambda c: " ".join(c),
)
def test_missing_path_exits_2_with_one_error_line(tmp_path, command):
    names = {
        "missing": tmp_path / "nowhere" / "state_1",
        "missing2": tmp_path / "nowhere" / "state_2",
        "dst": tmp_path / "registry" / "r" / "checkpoints" / "state_1",
    }
    done = run_cli(*(c.format(**names) for c in command))
    assert_error(done, 2)
    assert not (tmp_path / "registry").exists()


@pytest.mark.parametrize("keep", ["abc", "-1"])
def test_bad_keep_value_exits_2_and_deletes_nothing(prune_run, keep):
    before = files_listing(prune_run)
    done = run_cli("prune", prune_run, f"--keep={keep}")
    # argparse's own message names the subcommand: "learnax prune: error: ..."
    assert_error(done, 2, prefix=r"learnax( prune)?: error:")
    assert files_listing(prune_run) == before


def test_unknown_command_exits_2(tmp_path):
    assert_error(run_cli("frobnicate", tmp_path), 2)


def test_show_damaged_manifest_is_a_clean_error(two_runs_copy):
    path = ckpt_path(two_runs_copy, "alpha", 10)
    damage_manifest(path)
    assert_error(run_cli("show", path), None)


# === the console script ====================================================================


def test_console_script_is_the_same_command(two_runs):
    script = Path(sys.executable).parent / "learnax"
    if not script.exists():
        found = shutil.which("learnax")
        if found is None:
            pytest.skip("no learnax console script installed next to this Python")
        script = Path(found)
    done = subprocess.run(
        [str(script), "ls", str(two_runs.path / "alpha"), "--json"],
        capture_output=True,
        text=True,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, describe(done)
    assert json.loads(done.stdout) == run_json("ls", two_runs.path / "alpha")


# === the Python API ========================================================================


def test_read_info_works_without_the_data_files(show_run, tmp_path):
    from learnax.checkpoint import read_info

    registry = Path(shutil.copytree(show_run.path, tmp_path / "registry"))
    path = ckpt_path(registry, "m", SHOW_STEP)
    for data_file in checkpoint_files(path):
        data_file.unlink()
    info = read_info(str(path))
    assert info.step == SHOW_STEP
    assert info.metrics == SHOW_METRICS
    assert show_run.t0 - 1 <= info.time <= show_run.t1 + 1
    assert {
        leaf.path: (leaf.dtype, tuple(leaf.shape), leaf.nbytes) for leaf in info.leaves
    } == SHOW_LEAVES
    assert all(isinstance(leaf.shape, tuple) for leaf in info.leaves)


def test_read_info_nbytes_is_the_size_of_the_checkpoint_files(show_run):
    from learnax.checkpoint import read_info

    path = ckpt_path(show_run.path, "m", SHOW_STEP)
    info = read_info(str(path))
    # the data files, and at most the checkpoint's other files (its manifest)
    assert data_bytes(path) <= info.nbytes <= all_bytes(path)
    assert str(info.path).rstrip("/").endswith("state_1000")


def test_read_info_missing_checkpoint_raises_file_not_found(tmp_path):
    from learnax.checkpoint import read_info

    with pytest.raises(FileNotFoundError):
        read_info(str(tmp_path / "registry" / "r" / "checkpoints" / "state_1"))


def test_read_info_damaged_manifest_raises_corrupted(two_runs_copy):
    from learnax.checkpoint import CheckpointCorruptedError, read_info

    path = ckpt_path(two_runs_copy, "alpha", 10)
    damage_manifest(path)
    with pytest.raises(CheckpointCorruptedError):
        read_info(str(path))


def test_verify_api_intact_registry_is_empty(two_runs):
    from learnax.checkpoint import verify

    assert verify(str(two_runs.path)) == []


def test_verify_api_returns_the_damaged_checkpoint(two_runs_copy):
    from learnax.checkpoint import verify

    damage_tensor_data(ckpt_path(two_runs_copy, "alpha", 10))
    problems = verify(str(two_runs_copy))
    assert len(problems) == 1, problems
    path, problem = problems[0]
    assert Path(path).resolve() == ckpt_path(two_runs_copy, "alpha", 10).resolve()
    assert isinstance(problem, str) and problem


# --- edge cases found in review ---------------------------------------------------------


def save_pair(tmp_path, first, second, run="r"):
    """Two checkpoints of one run (steps 1 and 2); their paths."""
    ckpt = Checkpointer(str(tmp_path / "reg"), run, save_every=None, checkpoint_every=None)
    return ckpt.save_checkpoint(first, step=1), ckpt.save_checkpoint(second, step=2)


def test_diff_tells_integers_apart_beyond_float64_precision(tmp_path):
    a, b = save_pair(
        tmp_path,
        {"ids": np.array([2**53, 7], np.int64), "seed": 2**60},
        {"ids": np.array([2**53 + 1, 7], np.int64), "seed": 2**60 + 1},
    )
    result = run_json("diff", a, b, returncode=1)
    assert {d["path"]: d["max_abs"] for d in result["different"]} == {"ids": 1.0, "seed": 1.0}


def test_diff_keeps_leaves_whose_paths_print_alike_apart(tmp_path):
    a, b = save_pair(
        tmp_path,
        {"a/b": np.zeros(2), "a": {"b": np.zeros(2)}, 1: 0, "1": 0},
        {"a/b": np.zeros(2), "a": {"b": np.ones(2)}, 1: 0, "1": 9},
    )
    result = run_json("diff", a, b, returncode=1)
    assert len(result["different"]) == 2 and result["identical"] == 2, result


def test_diff_counts_a_nan_against_a_number_as_an_infinite_difference(tmp_path):
    a, b = save_pair(
        tmp_path,
        {"w": np.array([1.0, 2.0]), "v": np.array([np.nan]), "same": np.array([np.nan])},
        {"w": np.array([np.nan, 2.0]), "v": np.array([3.0]), "same": np.array([np.nan])},
    )
    done = run_cli("diff", a, b, "--json")
    assert done.returncode == 1, describe(done)
    assert "Warning" not in done.stderr, describe(done)
    result = json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    different = {d["path"]: d for d in result["different"]}
    assert set(different) == {"w", "v"} and result["identical"] == 1
    assert different["w"]["max_abs"] == "Infinity" and different["w"]["max_rel"] == 1.0


def test_a_run_whose_name_starts_with_state_is_still_a_run(tmp_path):
    registry = tmp_path / "reg"
    Checkpointer(str(registry), "state_space").save_checkpoint({"w": np.ones(3)}, step=5)
    listing = run_json("ls", registry / "state_space")
    assert [c["step"] for c in listing["checkpoints"]] == [5]
    assert run_cli("verify", registry / "state_space").returncode == 0


def test_verify_of_a_directory_without_checkpoints_fails(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_error(run_cli("verify", tmp_path / "empty"))


def test_storage_options_are_accepted_after_the_command(two_runs):
    done = run_cli("ls", two_runs.path, "--storage-options", "{}")
    assert done.returncode == 0, describe(done)


def test_a_crafted_safetensors_file_fails_cleanly_naming_it(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [10**30], "data_offsets": [0, 4]}}).encode()
    crafted = tmp_path / "crafted.safetensors"
    crafted.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    done = run_cli("convert", crafted, tmp_path / "reg/r/checkpoints/state_1")
    assert_error(done, returncode=1)
    assert "crafted.safetensors" in done.stderr


def test_export_refuses_a_dtype_safetensors_cannot_hold(tmp_path):
    import ml_dtypes

    (path,) = save_pair(tmp_path, {"q": np.zeros(4, ml_dtypes.int4)}, {"q": np.zeros(1)})[:1]
    done = run_cli("convert", path, tmp_path / "out.safetensors")
    assert_error(done)
    assert "int4" in done.stderr and not (tmp_path / "out.safetensors").exists()


def test_export_of_a_single_array_names_it_by_its_path(tmp_path):
    from safetensors.numpy import load_file

    (path,) = save_pair(tmp_path, {"params": {"w": np.ones((2, 3), np.float32)}}, {})[:1]
    run_ok("convert", path, tmp_path / "w.safetensors", "--only", "params/w")
    assert list(load_file(tmp_path / "w.safetensors")) == ["params/w"]


def test_convert_refuses_a_pickle_whose_step_is_not_a_step(tmp_path):
    legacy = tmp_path / "state_x.pyd"
    legacy.write_bytes(pickle.dumps({"state": {"w": np.ones(2)}, "step": -1}))
    done = run_cli("convert", legacy, tmp_path / "reg/r/checkpoints/state_x", "--allow-pickle")
    assert_error(done)
    assert "--step" in done.stderr
    assert not (tmp_path / "reg/r/checkpoints/state_x").exists()


def test_verify_from_python_never_starts_a_jax_backend(tmp_path):
    import jax

    (path,) = save_pair(tmp_path, {"key": jax.random.key(0), "w": np.ones(3)}, {})[:1]
    probe = (
        "import sys\n"
        "from learnax.checkpoint import verify\n"
        "from jax._src import xla_bridge\n"
        f"assert verify({str(path)!r}) == []\n"
        "print(xla_bridge.backends_are_initialized())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, describe(done)
    assert done.stdout.strip() == "False"


# === starting without jax ==================================================================

# Runs the command in this interpreter and reports which heavy modules it imported, on
# the last line of stderr.
IMPORT_PROBE = """
import json, sys
from learnax.cli import main
try:
    status = main(sys.argv[1:])
except SystemExit as e:  # --help, --version
    status = e.code
sys.stdout.flush()
heavy = [m for m in ("jax", "ml_dtypes", "numpy", "matplotlib", "tqdm") if m in sys.modules]
print(json.dumps({"status": status, "imported": heavy}), file=sys.stderr)
"""


def imported_by(*args) -> tuple[int, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, *(str(a) for a in args)],
        capture_output=True,
        text=True,
        env=cli_env(),
        stdin=subprocess.DEVNULL,
        timeout=TIMEOUT_S,
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return report["status"], set(report["imported"])


@pytest.mark.parametrize(
    "command, status, allowed",
    [
        (["--help"], 0, set()),
        (["--version"], 0, set()),
        (["ls", "{registry}"], 0, set()),
        (["ls", "{registry}/alpha", "--json"], 0, set()),
        (["show", "{registry}/alpha", "latest"], 0, set()),
        (["show", "{registry}/alpha", "best", "--json"], 0, set()),
        (["prune", "{registry}/alpha", "--keep", "1", "--dry-run"], 0, set()),
        (["prune", "{registry}/alpha", "--keep", "1", "--dry-run", "--json"], 0, set()),
        (["plot", "{registry}/alpha", "--metric", "val/loss", "--json"], 0, set()),
        # Comparing and checking data needs NumPy, but float32 data no ml_dtypes or jax.
        (["diff", "{ckpt_10}", "{ckpt_20}", "--json"], 1, {"numpy"}),
        (["verify", "{registry}"], 0, {"numpy"}),
    ],
    ids=lambda c: " ".join(c) if isinstance(c, list) else None,
)
def test_reading_commands_start_without_jax(two_runs, command, status, allowed):
    names = {
        "registry": two_runs.path,
        "ckpt_10": ckpt_path(two_runs.path, "alpha", 10),
        "ckpt_20": ckpt_path(two_runs.path, "alpha", 20),
    }
    got_status, imported = imported_by(*(c.format(**names) for c in command))
    assert got_status == status
    assert imported <= allowed, f"{' '.join(command)} imported {sorted(imported - allowed)}"


def test_show_of_a_bfloat16_checkpoint_needs_neither_numpy_nor_ml_dtypes(show_run):
    status, imported = imported_by("show", ckpt_path(show_run.path, "m", SHOW_STEP), "--json")
    assert status == 0 and imported == set()


def test_importing_the_package_imports_no_jax_until_a_checkpointer_is_used():
    probe = (
        "import sys, learnax.checkpoint as c\n"
        "before = 'jax' in sys.modules\n"
        "c.Checkpointer\n"
        "print(before, 'jax' in sys.modules, 'Checkpointer' in dir(c))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), timeout=60
    )
    assert done.stdout.split() == ["False", "True", "True"], describe(done)


def test_version_names_the_installed_version():
    from importlib.metadata import PackageNotFoundError, version

    import learnax

    try:
        expected = version("learnax")
    except PackageNotFoundError:
        expected = learnax.__version__
    assert run_ok("--version").stdout.strip() == f"learnax {expected}"


# === --json of every reporting command =====================================================


def test_verify_json_lists_every_checkpoint_ok(two_runs):
    report = run_json("verify", two_runs.path)
    assert len(report["checkpoints"]) == len(ALPHA_NAMES) + len(BETA_STEPS)
    assert {c["status"] for c in report["checkpoints"]} == {"ok"}
    assert (report["verified"], report["damaged"], report["legacy_pickles"]) == (8, 0, [])


def test_verify_json_names_the_damaged_checkpoint_and_exits_1(two_runs_copy):
    damage_tensor_data(ckpt_path(two_runs_copy, "alpha", 10))
    report = run_json("verify", two_runs_copy / "alpha", returncode=1)
    damaged = [c for c in report["checkpoints"] if c["status"] == "damaged"]
    assert [Path(c["path"]).name for c in damaged] == ["state_10"]
    assert "checksum" in damaged[0]["problem"]
    assert report["damaged"] == 1


def test_prune_json_dry_run_names_what_would_go_and_deletes_nothing(prune_run):
    before = files_listing(prune_run)
    report = run_json("prune", prune_run, "--keep", "2", "--dry-run")
    assert report["dry_run"] is True
    assert {Path(p).name for p in report["checkpoints"]} == {f"state_{s}" for s in (1, 2, 3, 4)}
    assert files_listing(prune_run) == before


def test_prune_json_names_what_it_deleted(prune_run):
    report = run_json("prune", prune_run, "--keep", "5")
    assert report["dry_run"] is False
    assert [Path(p).name for p in report["checkpoints"]] == ["state_1"]
    assert "state_1" not in state_dirs(prune_run)


def test_plot_json_is_the_series_without_matplotlib(two_runs, tmp_path):
    hidden = tmp_path / "no_matplotlib" / "matplotlib"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ModuleNotFoundError("no", name="matplotlib")\n')
    done = run_cli(
        "plot",
        two_runs.path / "alpha",
        "--metric",
        "val/loss",
        "--json",
        prepend_path=[hidden.parent],
    )
    assert done.returncode == 0, describe(done)
    series = json.loads(done.stdout)
    # The checkpoints' values: numbered 0..30 and latest/best at the same steps.
    assert series["points"] == [{"step": s, "value": ALPHA_LOSS[s]} for s in sorted(ALPHA_LOSS)]
    assert series["best"] == {"step": 20, "value": ALPHA_LOSS[20]}
    assert (series["metric"], series["maximize"]) == ("val/loss", False)


def test_plot_without_output_or_json_is_a_usage_error(two_runs):
    assert_error(run_cli("plot", two_runs.path / "alpha", "--metric", "val/loss"), 2)


def test_convert_json_names_what_it_wrote(show_run, tmp_path):
    out = tmp_path / "params.safetensors"
    report = run_json("convert", ckpt_path(show_run.path, "m", SHOW_STEP), out, "--only", "params")
    assert Path(report["written"]) == out and out.stat().st_size > 0


# === exit statuses and pipes ===============================================================


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="needs Linux's sysfs")
def test_an_io_error_exits_3(show_run):
    # Nobody, root included, may create a file in sysfs: a real PermissionError.
    done = run_cli("convert", ckpt_path(show_run.path, "m", SHOW_STEP), "/sys/learnax.safetensors")
    assert_error(done, 3)


@pytest.fixture(scope="module")
def many_checkpoints(tmp_path_factory) -> Path:
    """A run of 400 checkpoints (copies of one): `ls --json` prints ~90 KB, more than a
    pipe holds, so a reader that stops early makes the command write into a closed
    pipe."""
    registry = tmp_path_factory.mktemp("many") / "registry"
    ckpt = Checkpointer(registry, "r", save_every=None, checkpoint_every=None)
    first = Path(ckpt.save_checkpoint(beta_state(0), step=0, metrics={"loss": 0.5}))
    for step in range(1, 400):
        shutil.copytree(first, first.parent / f"state_{step}")
    return registry / "r"


def test_ls_json_into_head_stops_silently(many_checkpoints):
    shell = f"{shlex.quote(sys.executable)} -m learnax ls --json {shlex.quote(str(many_checkpoints))} | head -c 10"
    done = subprocess.run(
        ["sh", "-c", shell], capture_output=True, env=cli_env(), timeout=TIMEOUT_S
    )
    assert done.stdout == b'{\n  "path"'
    assert done.stderr == b"", done.stderr.decode()


def test_a_closed_pipe_exits_141_with_nothing_on_stderr(many_checkpoints):
    process = subprocess.Popen(
        [sys.executable, "-m", "learnax", "ls", "--json", str(many_checkpoints)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=cli_env(),
    )
    assert process.stdout.read(10) == b'{\n  "path"'
    process.stdout.close()  # the reader goes away with ~90 KB still to come
    stderr = process.stderr.read()
    assert process.wait(timeout=TIMEOUT_S) == 141
    assert stderr == b"", stderr.decode()


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_reader_gone_before_the_buffered_output_is_written_exits_141_silently(
    show_run, json_flag
):
    # As in a shell (no PYTHONUNBUFFERED): stdout is block-buffered, so the short output
    # is written only when flushed; the pipe's reader is gone before it starts.
    env = cli_env()
    env.pop("PYTHONUNBUFFERED", None)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "learnax", "ls", *json_flag, str(show_run.path)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=env,
            timeout=TIMEOUT_S,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr.decode()
    assert done.stderr == b"", done.stderr.decode()


def test_ctrl_c_exits_130(many_checkpoints):
    """SIGINT while verify works through 400 checkpoints: one line, status 130."""
    env = {**cli_env(), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "learnax", "verify", str(many_checkpoints)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    assert process.stdout.readline().startswith("ok ")  # verifying, 399 to go
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "learnax: error: interrupted"
    assert "Traceback" not in stderr


# === progress by bytes on a terminal =======================================================

# tqdm's bar by bytes: "verify:  42%|████▏     | 1.00M/2.38M [00:01<00:01, 1.02MB/s]"
BYTES_BAR = re.compile(r"\| *[\d.]+[kMG]?/[\d.]+[kMG]? \[.*B/s\]")


def on_a_terminal(*args) -> tuple[int, str, str]:
    """Run the command with its stderr on a pseudo-terminal; its status, stdout and all
    that it wrote to the terminal (of 24 x 120 characters)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "learnax", *(str(a) for a in args)],
        stdout=subprocess.PIPE,
        stderr=slave,
        stdin=subprocess.DEVNULL,
        env={**cli_env(), "TQDM_MININTERVAL": "0"},
    )
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the command closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    stdout = process.stdout.read().decode()
    process.stdout.close()
    return process.wait(timeout=TIMEOUT_S), stdout, terminal.decode(errors="replace")


@pytest.fixture(scope="module")
def big_run(tmp_path_factory) -> Path:
    """Run "big": three checkpoints of 8 MiB."""
    registry = tmp_path_factory.mktemp("big") / "registry"
    ckpt = Checkpointer(registry, "big", save_every=None, checkpoint_every=None)
    rng = np.random.default_rng(0)
    for step in (1, 2, 3):
        state = {f"w{i}": rng.standard_normal(1 << 18, dtype=np.float32) for i in range(8)}
        assert ckpt.save_checkpoint(state, step=step) is not None
    return registry / "big"


def test_verify_on_a_terminal_shows_a_bar_by_bytes(big_run):
    status, stdout, terminal = on_a_terminal("verify", big_run)
    assert status == 0, terminal
    assert "verify:" in terminal and BYTES_BAR.search(terminal), terminal
    assert stdout.splitlines()[-1] == "3 checkpoint(s) verified, 0 damaged"


def test_convert_on_a_terminal_shows_bars_by_bytes(big_run, tmp_path):
    dst = tmp_path / "reg" / "r" / "checkpoints" / "state_3"
    status, stdout, terminal = on_a_terminal("convert", big_run / "checkpoints/state_3", dst)
    assert status == 0, terminal
    assert "read:" in terminal and "write:" in terminal, terminal
    assert BYTES_BAR.search(terminal), terminal
    assert stdout.strip() == f"wrote {dst}"


def test_no_terminal_no_progress(big_run, tmp_path):
    dst = tmp_path / "reg" / "r" / "checkpoints" / "state_3"
    for args in (("verify", big_run), ("convert", big_run / "checkpoints/state_3", dst)):
        done = run_cli(*args)
        assert done.returncode == 0, describe(done)
        assert done.stderr == "", describe(done)


def test_verify_progress_counts_every_byte_of_every_checkpoint(two_runs):
    from learnax.checkpoint import find_checkpoints, verify

    calls = []
    assert verify(str(two_runs.path), progress=lambda *call: calls.append(call)) == []
    expected = sum(all_bytes(Path(c)) for c in find_checkpoints(str(two_runs.path)))
    assert {stage for stage, _, _ in calls} == {"verify"}
    assert {total for _, _, total in calls} == {expected}
    assert sum(n for _, n, _ in calls) == expected


def test_convert_progress_counts_the_source_read_and_the_arrays_written(show_run, tmp_path):
    from learnax.checkpoint import convert

    calls = []
    src = ckpt_path(show_run.path, "m", SHOW_STEP)
    dst = tmp_path / "reg" / "r" / "checkpoints" / "state_1"
    convert(str(src), str(dst), progress=lambda *call: calls.append(call))
    read = [(n, total) for stage, n, total in calls if stage == "read"]
    written = [(n, total) for stage, n, total in calls if stage == "write"]
    assert sum(n for n, _ in read) == read[0][1] == all_bytes(src)
    arrays = sum(nbytes for _, _, nbytes in SHOW_LEAVES.values())
    assert written[0][1] == arrays
    # The data files: the arrays and their safetensors headers.
    assert arrays <= sum(n for n, _ in written) == data_bytes(dst)
