"""The public inspection functions that the ``learnax`` command prints: where a path
points, a registry's runs, a run's checkpoints, one checkpoint by name, a metric's
history; and the command itself importing nothing but public names."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

import learnax.cli
from learnax.checkpoint import (
    Checkpointer,
    checkpoint_path,
    find_checkpoints,
    list_checkpoints,
    list_runs,
    locate,
    metric_history,
)

LOSSES = {10: 0.9, 20: 0.4, 30: 0.6}


def _state(x: float) -> dict:
    return {"w": np.full((3,), x, np.float32), "b": np.float32(x)}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A run with latest (30), best (20, val/loss=0.4) and numbered 10, 20, 30."""
    ckpt = Checkpointer(
        str(tmp_path), "r", save_every=10, checkpoint_every=10, keep_best=True, async_save=False
    )
    for step, loss in LOSSES.items():
        ckpt.maybe_save_checkpoints(_state(step), step, {"val/loss": loss, "acc": step / 100})
    return tmp_path / "r"


def test_locate_tells_registry_run_and_checkpoint_apart(run):
    assert locate(str(run.parent)).kind == "registry"
    assert locate(str(run)).kind == "run"
    assert locate(str(run / "checkpoints" / "state_20")) == (
        "checkpoint",
        str(run / "checkpoints" / "state_20"),
    )
    assert locate(f"file://{run}").path == str(run)
    with pytest.raises(FileNotFoundError):
        locate(str(run / "nothing-here"))


def test_list_runs_sums_up_each_run_from_its_manifests(run):
    (summary,) = list_runs(str(run.parent))
    assert (summary.name, summary.path, summary.checkpoints) == ("r", str(run), 5)
    assert summary.newest_step == 30
    assert summary.best == {"metric": "val/loss", "value": 0.4, "step": 20}
    on_disk = sum(p.stat().st_size for p in run.rglob("*") if p.is_file())
    assert 0 < summary.nbytes <= on_disk
    assert summary.last_write is not None


def test_list_checkpoints_orders_and_marks_a_damaged_data_file(run):
    data = next((run / "checkpoints" / "state_10").glob("data-*.safetensors"))
    data.write_bytes(data.read_bytes()[:-1])
    rows = list_checkpoints(str(run))
    assert [r.name for r in rows] == ["latest", "best", "10", "20", "30"]
    status = {r.name: r.status for r in rows}
    assert status == {"latest": "ok", "best": "ok", "10": "damaged", "20": "ok", "30": "ok"}
    damaged = next(r for r in rows if r.name == "10")
    assert damaged.problem and data.name in damaged.problem
    ok = next(r for r in rows if r.name == "20")
    assert (ok.step, ok.metrics, ok.problem) == (20, {"val/loss": 0.4, "acc": 0.2}, None)


@pytest.mark.parametrize(
    ("name", "directory"),
    [("latest", "state_latest"), ("best", "state_best"), ("20", "state_20"),
     ("step_20", "state_20"), ("state_20", "state_20")],
)  # fmt: skip
def test_checkpoint_path_takes_each_name_a_user_sees(run, name, directory):
    assert checkpoint_path(str(run), name) == str(run / "checkpoints" / directory)


@pytest.mark.parametrize("name", ["../../etc", "a/b", "", ".."])
def test_checkpoint_path_refuses_a_name_that_leaves_the_run(run, name):
    with pytest.raises(ValueError):
        checkpoint_path(str(run), name)


def test_find_checkpoints_of_a_registry_run_and_checkpoint(run):
    names = ["state_latest", "state_best", "state_10", "state_20", "state_30"]
    expected = [str(run / "checkpoints" / n) for n in names]
    assert find_checkpoints(str(run.parent)) == expected
    assert find_checkpoints(str(run)) == expected
    assert find_checkpoints(expected[2]) == expected[2:3]


def test_metric_history_follows_the_recorded_best_and_its_direction(run):
    history = metric_history(str(run), "val/loss")
    assert history.points == LOSSES
    assert (history.best_step, history.best_value, history.maximize) == (20, 0.4, False)
    accuracy = metric_history(str(run), "acc", maximize=True)
    assert (accuracy.best_step, accuracy.best_value) == (30, 0.3)
    with pytest.raises(ValueError, match="no checkpoint"):
        metric_history(str(run), "nope")


def test_metric_history_skips_non_finite_values(tmp_path):
    ckpt = Checkpointer(str(tmp_path), "r", checkpoint_every=1, async_save=False)
    for step, loss in ((1, math.nan), (2, 0.5), (3, math.inf)):
        ckpt.maybe_save_checkpoints(_state(step), step, {"loss": loss})
    assert metric_history(str(tmp_path / "r"), "loss").points == {2: 0.5}


def test_the_command_prints_what_the_functions_return(run, capsys):
    assert learnax.cli.main(["ls", str(run), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    expected = list_checkpoints(str(run))
    assert [(r["name"], r["step"], r["status"]) for r in rows] == [
        (c.name, c.step, c.status) for c in expected
    ]


def test_the_command_imports_only_public_names():
    """The CLI is a client of the public API: anything it needs, a script can do."""
    tree = ast.parse(Path(learnax.cli.__file__).read_text())
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("learnax"):
            modules = [node.module]
            # Its own printing helpers (learnax/_cli_output.py) are the command's, not the
            # library's.
            names = [alias.name for alias in node.names if alias.name != "_cli_output"]
        elif isinstance(node, ast.Import):
            modules = [a.name for a in node.names if a.name.startswith("learnax")]
            names = []
        else:
            continue
        for module in modules:
            private += [p for p in module.split(".") if p.startswith("_")]
        private += [n for n in names if n.startswith("_")]
    assert private == [], f"learnax/cli.py imports private names: {private}"
    import learnax.checkpoint as public

    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "learnax.checkpoint"
        for alias in node.names
    }
    assert imported <= set(public.__all__), imported - set(public.__all__)
