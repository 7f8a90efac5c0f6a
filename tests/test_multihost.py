"""Multi-host saves and restores with real multi-process JAX on 127.0.0.1.

Each test starts N processes of ``tests/multihost_worker.py`` (``launch``): they join
through ``jax.distributed.initialize`` (gloo CPU collectives), each with D CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=D``), share one registry directory,
and write what they saw to a result JSON that the test reads. The data is a function of
a seed (``multihost_worker.expected_array``), recomputed here to check every shard.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from helpers import assert_tree_equal, checkpoint_dir_entries
from multihost_worker import (
    LEAVES,
    RUN,
    SHARDED,
    SHARDED_BYTES,
    STEP,
    digest,
    expected_state,
)
from multihost_worker import expected_array as _expected_array
from safetensors.numpy import load_file

from learnax.checkpoint import Checkpointer

WORKER = Path(__file__).with_name("multihost_worker.py")
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------- the launcher


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    """What N worker processes left: exit statuses, outputs and result JSONs."""

    scenario: str
    returncodes: list[int | None]
    stdouts: list[str]
    stderrs: list[str]
    results: list[dict | None]
    elapsed: float
    timed_out: bool
    killed_early: list[int] = field(default_factory=list)

    def report(self, tail: int = 6000) -> str:
        lines = [
            f"scenario {self.scenario!r}: {len(self.returncodes)} processes, "
            f"{self.elapsed:.1f} s, exit statuses {self.returncodes}"
            + (" (TIMED OUT, killed)" if self.timed_out else "")
            + (f" (killed after a peer failed: {self.killed_early})" if self.killed_early else "")
        ]
        for i, (out, err, res) in enumerate(
            zip(self.stdouts, self.stderrs, self.results, strict=True)
        ):
            lines.append(f"----- process {i} stdout -----\n{out[-tail:]}")
            lines.append(f"----- process {i} stderr -----\n{err[-tail:]}")
            if res is None:
                lines.append(f"----- process {i}: no result file")
            elif "error" in res:
                lines.append(f"----- process {i} error -----\n{res['error']}")
        return "\n".join(lines)

    def check(self, allowed: dict[int, int] | None = None) -> list[dict]:
        """Assert that every process exited 0 (or as ``allowed``: {process: status})
        and wrote a result without error; return the results."""
        allowed = allowed or {}
        for i, rc in enumerate(self.returncodes):
            expected = allowed.get(i, 0)
            assert rc == expected, f"process {i} exited {rc}, not {expected}\n{self.report()}"
            if i in allowed:
                continue
            res = self.results[i]
            assert res is not None, f"process {i} wrote no result\n{self.report()}"
            assert "error" not in res, f"process {i} failed\n{self.report()}"
        return self.results  # type: ignore[return-value]


def launch(
    scenario: str,
    out_dir: Path,
    *,
    processes: int,
    devices: int,
    params: dict | None = None,
    timeout: float = 60.0,
    grace: float = 8.0,
    expected_deaths: tuple[int, ...] = (),
) -> Launch:
    """Run ``processes`` workers of ``scenario`` with ``devices`` CPU devices each.

    Waits until all have exited, at most ``timeout`` seconds (then all are killed,
    after a faulthandler stack dump). Once one process has failed (a non-zero status
    not in ``expected_deaths``), the others get ``grace`` seconds, then are killed:
    they would otherwise wait for their dead peer until JAX's heartbeat timeout.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    params = dict(params or {}, num_processes=processes)
    if processes > 1:
        params.setdefault("port", free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
        PYTHONFAULTHANDLER="1",
        OMP_NUM_THREADS="1",
    )
    procs, files = [], []
    t0 = time.monotonic()
    for i in range(processes):
        stdout = open(out_dir / f"stdout-{i}.txt", "wb")  # noqa: SIM115
        stderr = open(out_dir / f"stderr-{i}.txt", "wb")  # noqa: SIM115
        files += [stdout, stderr]
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(out_dir), str(i), json.dumps(params)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                env=env,
                cwd=REPO,
            )
        )
    timed_out, killed_early = False, []
    fail_deadline = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                break
            now = time.monotonic()
            failed = [
                i
                for i, c in enumerate(codes)
                if c is not None and c != 0 and i not in expected_deaths
            ]
            if failed and fail_deadline is None:
                fail_deadline = now + grace
            if now - t0 > timeout:
                timed_out = True
                _kill_all(procs, dump_stacks=True)
                break
            if fail_deadline is not None and now > fail_deadline:
                killed_early = [i for i, c in enumerate(codes) if c is None]
                _kill_all(procs, dump_stacks=True)
                break
            time.sleep(0.05)
    finally:
        _kill_all(procs, dump_stacks=False)
        for f in files:
            f.close()
    elapsed = time.monotonic() - t0
    results = []
    for i in range(processes):
        path = out_dir / f"result-{i}.json"
        results.append(json.loads(path.read_text()) if path.exists() else None)
    return Launch(
        scenario=scenario,
        returncodes=[p.returncode for p in procs],
        stdouts=[
            (out_dir / f"stdout-{i}.txt").read_text(errors="replace") for i in range(processes)
        ],
        stderrs=[
            (out_dir / f"stderr-{i}.txt").read_text(errors="replace") for i in range(processes)
        ],
        results=results,
        elapsed=elapsed,
        timed_out=timed_out,
        killed_early=killed_early,
    )


def _kill_all(procs: list[subprocess.Popen], *, dump_stacks: bool) -> None:
    alive = [p for p in procs if p.poll() is None]
    if dump_stacks and alive:
        for p in alive:  # faulthandler prints every thread's stack to stderr
            os.kill(p.pid, signal.SIGUSR1)
        time.sleep(1.0)
    for p in alive:
        if p.poll() is None:
            p.kill()
    for p in alive:
        p.wait()


# ------------------------------------------------------------------------ the tests


def test_processes_see_each_other(tmp_path):
    """The launcher's own check: 2 processes x 2 devices form one 4-device system,
    jax.devices() lists process 0's devices first, and a collective over a global
    array built from both processes' shards gives the right sum on both."""
    run = launch("hello", tmp_path, processes=2, devices=2, timeout=60)
    results = run.check()
    for i, res in enumerate(results):
        assert res["process_count"] == 2, run.report()
        assert res["process_index"] == i, run.report()
        assert res["device_count"] == 4, run.report()
        assert res["local_device_count"] == 2, run.report()
        assert [p for _, p in res["devices"]] == [0, 0, 1, 1], run.report()
        assert res["fully_addressable"] is False, run.report()
        assert [s["index"][0] for s in res["shards"]] == (
            [[0, 16], [16, 32]] if i == 0 else [[32, 48], [48, 64]]
        ), run.report()
        assert res["sum"] == res["expected_sum"], run.report()
    assert results[0]["devices"] == results[1]["devices"], run.report()


# ------------------------------------------------------------ expected values, checks


@functools.lru_cache(maxsize=64)
def expected_array(path: tuple[str, ...], seed: int = 0, scale: int = 1) -> np.ndarray:
    a = _expected_array(path, seed, scale)
    a.flags.writeable = False
    return a


def leaf_key(path: tuple[str, ...]) -> str:
    """jax.tree_util.keystr of a dict path, as the worker names leaves."""
    return "".join(f"[{k!r}]" for k in path)


def as_slices(index: list[list[int]]) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in index)


def restore_problems(
    described, *, seed: int, step: int, with_target: bool, cast: str | None = None
) -> list[str]:
    """What is wrong in a worker's description of a restored state (empty: nothing).

    With a target, every array leaf but the numpy one must be a jax array on exactly
    the target's sharding, holding on this process the target's shards with the
    expected data (float32 leaves as numpy's ``astype(cast)`` of it, when the target
    asked for ``cast``); without, every array leaf is the full numpy array."""
    if described is None:
        return ["the load returned None"]
    problems = []
    if described["step"] != step:
        problems.append(f"step {described['step']} != {step}")
    leaves = described["leaves"]
    expected_keys = {leaf_key(path) for path, *_ in LEAVES} | {"['step']"}
    if set(leaves) != expected_keys:
        problems.append(f"leaves {sorted(leaves)} != {sorted(expected_keys)}")
    for path, _, _, spec in LEAVES:
        got = leaves.get(leaf_key(path))
        if got is None:
            continue
        full = expected_array(path, seed)
        if cast is not None and full.dtype == np.float32:
            full = full.astype(ml_dtypes.bfloat16 if cast == "bfloat16" else cast)
        where = leaf_key(path)
        if with_target and spec is not None:
            if got["kind"] != "jax":
                problems.append(f"{where}: a {got['kind']} {got.get('type')}, not a jax array")
                continue
            if (got["dtype"], got["shape"]) != (full.dtype.name, list(full.shape)):
                problems.append(
                    f"{where}: {got['dtype']}{got['shape']} != {full.dtype}{full.shape}"
                )
                continue
            if not got["sharding_equals_target"]:
                problems.append(
                    f"{where}: sharding {got['sharding']} != target {got['target_sharding']}"
                )
            held = [(s["device"], s["index"]) for s in got["shards"]]
            wanted = [(s["device"], s["index"]) for s in got["target_indices"]]
            if held != wanted:
                problems.append(f"{where}: shards {held} != the target's {wanted}")
            for shard in got["shards"]:
                if shard["digest"] != digest(full[as_slices(shard["index"])]):
                    problems.append(f"{where}: wrong data in shard {shard['index']}")
        else:
            if got["kind"] != "numpy" or got["type"] != "ndarray":
                problems.append(f"{where}: a {got['kind']} {got.get('type')}, not numpy")
                continue
            if got["digest"] != digest(full):
                problems.append(
                    f"{where}: {got['dtype']}{got['shape']} is not the expected "
                    f"{full.dtype}{full.shape} data"
                )
    got = leaves.get("['step']")
    if got is not None and (got["kind"], got["type"], got["value"]) != (
        "python",
        "int",
        repr(step),
    ):
        problems.append(f"['step']: {got} is not the int {step}")
    return problems


def assert_restored(
    run: Launch, name: str, *, seed=0, step=STEP, with_target: bool, cast: str | None = None
) -> None:
    results = run.check()
    for i, res in enumerate(results):
        assert name + "_error" not in res, f"process {i}: {res[name + '_error']}\n{run.report()}"
        problems = restore_problems(
            res[name], seed=seed, step=step, with_target=with_target, cast=cast
        )
        assert not problems, f"process {i}:\n" + "\n".join(problems) + "\n" + run.report(2000)


def read_manifest(checkpoint: str | Path) -> dict:
    text = (Path(checkpoint) / "manifest.json").read_text(encoding="utf-8")
    return json.loads(text)["manifest"]


def safetensors_tensor_bytes(path: Path) -> dict[str, int]:
    """{tensor name: data bytes} from a safetensors file's header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {
        name: info["data_offsets"][1] - info["data_offsets"][0]
        for name, info in header.items()
        if name != "__metadata__"
    }


def leaf_of_shape(shape) -> tuple[str, ...]:
    """The saved leaf with this shape (every leaf of the state has its own shape)."""
    (path,) = [p for p, s, _, _ in LEAVES if list(s) == list(shape)]
    return path


def manifest_pieces(manifest: dict):
    """(leaf path, file, tensor, slices) of every stored piece of every array."""
    for name, info in manifest["arrays"].items():
        path = leaf_of_shape(info["shape"])
        if "shards" in info:
            for shard in info["shards"]:
                yield path, shard["file"], shard["tensor"], as_slices(shard["slice"])
        else:
            yield path, info["file"], name, tuple(slice(0, n) for n in info["shape"])


def nbytes(path: tuple[str, ...]) -> int:
    return expected_array(path).nbytes


def expected_bytes_written(process: int) -> int:
    """Tensor bytes process ``process`` writes in the 2 x 2 save: half of every array
    sharded over the processes ("x" is the process axis of the save mesh); process 0
    also the replicated array (its replica 0 is on device 0) and the numpy leaf."""
    total = sum(nbytes(path) // 2 for path in SHARDED)
    if process == 0:
        total += nbytes(("replicated",)) + nbytes(("host",))
    return total


# ---------------------------------------------------- one 2 x 2 save shared by tests


@dataclass
class Saved:
    registry: Path
    run: Launch

    @property
    def checkpoint_dir(self) -> Path:
        return self.registry / RUN / "checkpoints"

    def results(self) -> list[dict]:
        return self.run.check()

    def path(self) -> Path:
        results = self.results()
        assert results[0]["path"] is not None, f"the 2 x 2 save returned None\n{self.run.report()}"
        return Path(results[0]["path"])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Saved:
    """The state of multihost_worker.LEAVES, saved at STEP by 2 processes x 2 devices."""
    base = tmp_path_factory.mktemp("saved")
    registry = base / "registry"
    run = launch("save", base / "save", processes=2, devices=2, params={"registry": str(registry)})
    return Saved(registry, run)


def restore_launch(saved: Saved, out_dir: Path, *, processes: int, devices: int, loads: list):
    saved.path()  # the save worked (else this says why)
    return launch(
        "restore",
        out_dir,
        processes=processes,
        devices=devices,
        params={"registry": str(saved.registry), "step": STEP, "loads": loads},
    )


# -------------------------------------------------------------------------- saving


def test_both_processes_return_the_same_committed_path(saved):
    results = saved.results()
    paths = [res["path"] for res in results]
    assert paths[0] is not None, saved.run.report()
    assert paths[0] == paths[1], saved.run.report()
    assert Path(paths[0]) == saved.checkpoint_dir / f"state_{STEP}"
    assert (Path(paths[0]) / "manifest.json").is_file()
    for res in results:
        assert res["listed"].get(f"step_{STEP}") == paths[0], saved.run.report()


def test_each_process_writes_only_the_shards_it_holds(saved):
    checkpoint = saved.path()
    manifest = read_manifest(checkpoint)
    written = {0: 0, 1: 0}
    for name, info in manifest["files"].items():
        match = re.fullmatch(r"data-.+-p(\d+)-\d+\.safetensors", name)
        assert match, f"{name} is not named data-<id>-p<k>-<i>.safetensors"
        assert info.get("process") in (0, 1), f"{name}: {info}"
        assert int(match.group(1)) == info["process"], f"{name}: {info}"
        written[info["process"]] += sum(safetensors_tensor_bytes(checkpoint / name).values())
    expected = {k: expected_bytes_written(k) for k in (0, 1)}
    assert written == expected, f"tensor bytes per process {written}, expected {expected}"
    # And what each process wrote at all during its save (its /proc/self/io wchar).
    for k, res in enumerate(saved.results()):
        assert expected[k] <= res["wchar"] <= expected[k] + (4 << 20), (
            f"process {k} wrote {res['wchar']} bytes for its {expected[k]} bytes of data"
        )


def test_a_run_directory_that_the_hosts_do_not_share_fails_the_save_clearly(tmp_path):
    """Each process saving to a directory of its own (hosts with local disks): process 0
    cannot see the others' files, so nothing is committed and every save returns None,
    at once, not after the timeout."""
    registries = [str(tmp_path / f"host{i}") for i in range(2)]
    run = launch(
        "unshared", tmp_path / "out", processes=2, devices=2, params={"registries": registries}
    )
    results = run.check()
    assert [r["path"] for r in results] == [None, None], run.report()
    assert all(r["seconds"] < 20 for r in results), run.report()
    assert all(r["listed"] == {} for r in results), run.report()
    assert "not visible to process 0" in run.report(), run.report()


def test_replicated_shards_are_written_once(saved):
    checkpoint = saved.path()
    manifest = read_manifest(checkpoint)
    stored = sum(
        sum(safetensors_tensor_bytes(checkpoint / name).values()) for name in manifest["files"]
    )
    logical = sum(nbytes(path) for path, *_ in LEAVES)
    assert stored == logical
    # Every element of every array is stored exactly once.
    coverage = {path: np.zeros(shape, np.uint8) for path, shape, _, _ in LEAVES}
    for path, _, _, slices in manifest_pieces(manifest):
        coverage[path][slices] += 1
    for path, counts in coverage.items():
        assert (counts == 1).all(), f"{leaf_key(path)}: elements stored {np.unique(counts)} times"


def test_multihost_data_files_open_with_safetensors(saved):
    checkpoint = saved.path()
    manifest = read_manifest(checkpoint)
    assert checkpoint_dir_entries(checkpoint) == {"manifest.json", *manifest["files"]}
    tensors = {name: load_file(checkpoint / name) for name in manifest["files"]}
    used = set()
    for path, file, tensor, slices in manifest_pieces(manifest):
        data = tensors[file][tensor]
        expected = expected_array(path)[slices]
        assert data.dtype == expected.dtype, f"{file} {tensor}"
        assert data.shape == expected.shape, f"{file} {tensor}"
        assert data.tobytes() == expected.tobytes(), (
            f"{file} {tensor}: not {leaf_key(path)}{slices}"
        )
        used.add((file, tensor))
    assert used == {(file, t) for file, ts in tensors.items() for t in ts}


# ------------------------------------------------------------------------ restoring


def test_restore_on_one_process_without_target_gives_the_full_arrays(saved):
    saved.path()
    restored = Checkpointer(saved.registry, RUN).load_checkpoint(STEP)
    assert restored is not None and restored["step"] == STEP
    assert_tree_equal(expected_state(), restored["state"])
    for path, *_ in LEAVES:
        leaf = restored["state"]
        for key in path:
            leaf = leaf[key]
        assert type(leaf) is np.ndarray, leaf_key(path)


def test_restore_on_one_process_with_four_devices_onto_another_mesh(saved, tmp_path):
    """1 process x 4 devices, a 1-D mesh ("d",), each array laid out differently."""
    loads = [
        {
            "name": "target",
            "mesh": [4],
            "axes": ["d"],
            "specs": {
                "params/sharded": [None, "d"],
                "params/bf16": ["d"],
                "replicated": ["d"],
                "partial/rows": [],
                "partial/grid": ["d", None],
            },
        }
    ]
    run = restore_launch(saved, tmp_path, processes=1, devices=4, loads=loads)
    assert_restored(run, "target", with_target=True)


def test_restore_on_four_processes_reads_only_what_each_needs(saved, tmp_path):
    """4 processes x 1 device, every sharded array's rows over the 4 processes: each
    gets its quarter, and reads well under half of the sharded arrays' bytes."""
    specs = {"/".join(path): ["p"] for path in SHARDED}
    loads = [{"name": "target", "mesh": [4], "axes": ["p"], "specs": specs}]
    run = restore_launch(saved, tmp_path, processes=4, devices=1, loads=loads)
    assert_restored(run, "target", with_target=True)
    for i, res in enumerate(run.results):
        assert res["target_rchar"] < SHARDED_BYTES // 2, (
            f"process {i} read {res['target_rchar']} bytes to get a quarter of "
            f"{SHARDED_BYTES} bytes of sharded arrays"
        )


def test_a_damaged_block_fails_only_the_process_that_reads_it(saved, tmp_path):
    """A partial restore verifies every 1 MiB block it reads: a bit flipped in the last
    quarter of params/sharded fails the process that restores that quarter, naming the file,
    while the three others (which never read that block) restore their parts."""
    saved.path()
    registry = tmp_path / "registry"
    shutil.copytree(saved.registry, registry)
    checkpoint = registry / RUN / "checkpoints" / f"state_{STEP}"
    manifest = read_manifest(checkpoint)
    rows = manifest["arrays"]["params/sharded"]["shape"][0]
    (shard,) = [
        s
        for s in manifest["arrays"]["params/sharded"]["shards"]
        if s["slice"][0] == [rows * 3 // 4, rows]
    ]
    with open(checkpoint / shard["file"], "r+b") as f:
        header_len = int.from_bytes(f.read(8), "little")
        begin, end = json.loads(f.read(header_len))[shard["tensor"]]["data_offsets"]
        f.seek(8 + header_len + (begin + end) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    specs = {"/".join(path): ["p"] for path in SHARDED}
    loads = [{"name": "target", "mesh": [4], "axes": ["p"], "specs": specs}]
    run = launch(
        "restore",
        tmp_path / "out",
        processes=4,
        devices=1,
        params={"registry": str(registry), "step": STEP, "loads": loads},
    )
    results = run.check()
    error = results[3].get("target_error") or ""
    assert "CheckpointCorruptedError" in error and shard["file"] in error, run.report()
    for i in range(3):
        assert "target_error" not in results[i], f"process {i}\n{run.report()}"
        problems = restore_problems(results[i]["target"], seed=0, step=STEP, with_target=True)
        assert not problems, f"process {i}:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def restored_2x2(saved, tmp_path_factory) -> Launch:
    """One 2 x 2 launch: a load onto columns, the same with float32 cast to bfloat16,
    then a load without target."""
    columns = {"/".join(path): [None, "x"] for path in SHARDED}
    columns["partial/grid"] = ["y", "x"]
    loads = [
        {"name": "columns", "mesh": [2, 2], "axes": ["x", "y"], "specs": columns},
        {"name": "cast", "mesh": [2, 2], "axes": ["x", "y"], "specs": columns, "cast": "bfloat16"},
        {"name": "no_target"},
    ]
    out = tmp_path_factory.mktemp("restore_2x2")
    return restore_launch(saved, out, processes=2, devices=2, loads=loads)


def test_restore_on_two_processes_onto_columns_instead_of_rows(restored_2x2):
    assert_restored(restored_2x2, "columns", with_target=True)


def test_allow_cast_casts_each_piece_of_an_array_spanning_two_processes(restored_2x2):
    assert_restored(restored_2x2, "cast", with_target=True, cast="bfloat16")


def test_restore_on_two_processes_without_target_gives_every_process_the_full_arrays(
    restored_2x2,
):
    assert_restored(restored_2x2, "no_target", with_target=False)


# --------------------------------------------------- a single-host checkpoint on 2 x 2

SINGLE_RUN, SINGLE_STEP, SINGLE_SEED = "single", 3, 3


@pytest.fixture(scope="module")
def single_host_restored(tmp_path_factory) -> Launch:
    """A checkpoint saved by this (one) process, loaded by 2 processes x 2 devices with
    a sharded target and without target."""
    base = tmp_path_factory.mktemp("single")
    registry = base / "registry"
    state = expected_state(seed=SINGLE_SEED, step=SINGLE_STEP)
    assert Checkpointer(registry, SINGLE_RUN).save_checkpoint(state, step=SINGLE_STEP)
    specs = {"/".join(path): [["x", "y"]] for path in SHARDED}
    specs["partial/grid"] = ["x", "y"]
    loads = [
        {"name": "target", "mesh": [2, 2], "axes": ["x", "y"], "specs": specs},
        {"name": "no_target"},
    ]
    return launch(
        "restore",
        base / "restore",
        processes=2,
        devices=2,
        params={"registry": str(registry), "run": SINGLE_RUN, "step": SINGLE_STEP, "loads": loads},
    )


def test_single_host_checkpoint_restores_sharded_on_two_processes(single_host_restored):
    assert_restored(
        single_host_restored, "target", seed=SINGLE_SEED, step=SINGLE_STEP, with_target=True
    )


def test_single_host_checkpoint_loads_without_target_on_two_processes(single_host_restored):
    assert_restored(
        single_host_restored, "no_target", seed=SINGLE_SEED, step=SINGLE_STEP, with_target=False
    )


# ---------------------------------------------------------------- policy, async, kill

POLICY = dict(save_every=2, checkpoint_every=2, max_to_keep=2, keep_best=True, metric_name="loss")
# Losses at steps 1..6. By process 0's, the best improves at steps 1, 2 and 4; by
# process 1's it would at 1, 2, 3 and 5.
LOSSES = [[5.0, 3.0, 4.0, 2.0, 6.0, 2.5], [9.0, 1.0, 0.5, 7.0, 0.1, 8.0]]


def test_maybe_save_checkpoints_agrees_across_processes_on_process_0s_metrics(tmp_path):
    registry = tmp_path / "registry"
    run = launch(
        "policy",
        tmp_path / "policy",
        processes=2,
        devices=2,
        params={"registry": str(registry), "policy": POLICY, "losses": LOSSES},
        timeout=90,
    )
    results = run.check()
    steps0, steps1 = results[0]["steps"], results[1]["steps"]
    assert steps0 == steps1, f"the processes disagree:\n{steps0}\n{steps1}"
    checkpoint_dir = registry / RUN / "checkpoints"
    saved_keys = {
        1: {"best"},
        2: {"latest", "numbered", "best"},
        3: set(),
        4: {"latest", "numbered", "best"},
        5: set(),
        6: {"latest", "numbered"},
    }
    best_after = {1: 5.0, 2: 3.0, 3: 3.0, 4: 2.0, 5: 2.0, 6: 2.0}
    for record in steps0:
        step, saved = record["step"], record["saved"]
        assert set(saved) == saved_keys[step], f"step {step}: {saved}"
        names = {"latest": "state_latest", "numbered": f"state_{step}", "best": "state_best"}
        for key, path in saved.items():
            assert Path(path) == checkpoint_dir / names[key], f"step {step}: {saved}"
        assert record["best_metric_value"] == best_after[step], f"step {step}: {record}"
    ckpt = Checkpointer(registry, RUN, **POLICY)  # a restart: it reads the stored best
    assert set(ckpt.list_available_checkpoints()) == {"latest", "best", "step_4", "step_6"}
    best = ckpt.load_best()
    assert best["step"] == 4 and best["metrics"] == {"loss": 2.0}
    assert_tree_equal(expected_state(seed=4, step=4, scale=16), best["state"])
    assert ckpt.best_metric_value == 2.0
    latest = ckpt.load_latest()
    assert latest["step"] == 6
    assert_tree_equal(expected_state(seed=6, step=6, scale=16), latest["state"])
    # The metric history is process 0's alone: its losses, each step once, and its saves.
    history = ckpt.metric_history()
    reports = [(r["step"], r["metrics"]) for r in history if "metrics" in r]
    assert reports == [(step, {"loss": loss}) for step, loss in enumerate(LOSSES[0], 1)]
    saves = sorted((r["step"], r["saved"]) for r in history if "saved" in r)
    names = {"latest": "latest", "best": "best"}
    expected = sorted(
        (step, names.get(key, str(step))) for step, keys in saved_keys.items() for key in keys
    )
    assert saves == expected


def test_async_save_on_two_processes(tmp_path):
    """save_checkpoint returns, the callers delete their arrays, wait_until_finished:
    both processes return and list the same checkpoint, which holds the state."""
    registry = tmp_path / "registry"
    run = launch(
        "async", tmp_path / "async", processes=2, devices=2, params={"registry": str(registry)}
    )
    results = run.check()
    path = str(registry / RUN / "checkpoints" / "state_5")
    assert [res["returned"] for res in results] == [path, path], run.report()
    assert [res["listed"].get("step_5") for res in results] == [path, path], run.report()
    restored = Checkpointer(registry, RUN).load_checkpoint(5)
    assert restored["step"] == 5
    assert_tree_equal(expected_state(seed=5, step=5), restored["state"])


def test_process_killed_mid_save_makes_the_save_fail_everywhere_and_leaves_step_1(tmp_path):
    """Process 1 SIGKILLs itself while writing its data file of step 2: process 0's
    save returns None within seconds (multihost_timeout=5), and the run reads as
    if step 2 had never been saved."""
    registry = tmp_path / "registry"
    run = launch(
        "kill",
        tmp_path / "kill",
        processes=2,
        devices=2,
        params={"registry": str(registry), "multihost_timeout": 5, "heartbeat_timeout": 60},
        timeout=50,
        expected_deaths=(1,),
    )
    results = run.check(allowed={1: -signal.SIGKILL})
    assert "killing myself in the middle of" in run.stdouts[1], run.report()
    res = results[0]
    checkpoint_dir = registry / RUN / "checkpoints"
    assert res["step1"] == str(checkpoint_dir / "state_1"), run.report()
    assert res["step2"] is None, run.report()
    assert res["step2_seconds"] < 20, run.report()
    ckpt = Checkpointer(registry, RUN)
    assert "step_2" not in ckpt.list_available_checkpoints()
    restored = ckpt.load_latest()
    assert restored["step"] == 1
    assert_tree_equal(expected_state(seed=1, step=1), restored["state"])
    # The next writer's first commit removes what step 2 left.
    assert ckpt.save_checkpoint(restored["state"], step=3) is not None
    assert checkpoint_dir_entries(checkpoint_dir) == {"state_1", "state_3"}


def test_calls_made_by_one_process_only_fail_alone_and_later_calls_line_up(tmp_path):
    """A Checkpointer made on process 0 alone does not wait for the others; a best
    checkpoint only process 0 asks for fails (nothing is committed), and the saves of
    the next step succeed on both processes with the same result."""
    run = launch(
        "one_sided",
        tmp_path / "out",
        processes=2,
        devices=2,
        params={"registry": str(tmp_path / "registry")},
        timeout=120,
    )
    results = run.check()
    assert results[0]["solo_seconds"] < 3, run.report()
    steps = [r["steps"] for r in results]
    # Step 1: both save latest and best.
    assert steps[0][0]["saved"] == steps[1][0]["saved"], run.report()
    assert set(steps[0][0]["saved"]) == {"latest", "best"}, run.report()
    # Step 3: latest again, the same on both; best stays at step 1's 2.0 everywhere.
    assert steps[0][2]["saved"] == steps[1][2]["saved"], run.report()
    assert "latest" in steps[0][2]["saved"], run.report()
    assert [s[2]["best_metric_value"] for s in steps] == [2.0, 2.0], run.report()
    ckpt = Checkpointer(str(tmp_path / "registry"), RUN, metric_name="loss")
    assert ckpt.load_best()["step"] == 1
    assert ckpt.load_latest()["step"] == 3


def test_checkpointers_of_one_run_id_never_share_coordination_keys(tmp_path):
    """Two registries holding a run of the same id, and a second Checkpointer on one of
    them, in one job: every save of each commits (keys are per Checkpointer, not per
    run id), and the processes agree on every path."""
    registry = str(tmp_path / "registry")
    run = launch(
        "same_run_id_twice",
        tmp_path / "out",
        processes=2,
        devices=2,
        params={"registry": registry},
        timeout=120,
    )
    results = run.check()
    assert results[0]["saved"] == results[1]["saved"], run.report()
    for per_step, step in zip(results[0]["saved"], (1, 2), strict=True):
        for saved in per_step:
            assert saved.get("latest"), run.report()
            assert ("numbered" in saved) == (step == 2), run.report()
    for reg in (registry, registry + "-other"):
        assert Checkpointer(reg, RUN).load_latest()["step"] == 2


def test_a_process_0_slower_than_the_others_wait_commits_nothing(tmp_path):
    """Process 1 gives up waiting for process 0's word; process 0 sees that before it
    commits, so both return None and no checkpoint appears (never one process with a
    path and the other with None)."""
    run = launch(
        "slow_commit",
        tmp_path / "out",
        processes=2,
        devices=2,
        params={"registry": str(tmp_path / "registry"), "delay": 7},
        timeout=120,
    )
    results = run.check()
    assert [r["path"] for r in results] == [None, None], run.report()
    assert all(r["listed"] == {} for r in results), run.report()


def test_a_multi_host_save_to_s3_restores_on_another_process_count(tmp_path):
    """Object storage and multi-host together: 2 processes x 2 devices save to a real
    S3-compatible server (moto on 127.0.0.1), 4 processes x 1 device restore their
    quarters from it."""
    pytest.importorskip("s3fs")
    pytest.importorskip("boto3")
    from moto_server import MotoServer

    server = MotoServer().start()
    try:
        server.create_bucket("multihost")
        params = {"registry": "s3://multihost/reg", "storage_options": server.storage_options()}
        saved = launch("save", tmp_path / "save", processes=2, devices=2, params=params)
        results = saved.check()
        assert (
            results[0]["path"]
            == results[1]["path"]
            == f"s3://multihost/reg/{RUN}/checkpoints/state_{STEP}"
        ), saved.report()
        specs = {"/".join(path): ["p"] for path in SHARDED}
        loads = [{"name": "target", "mesh": [4], "axes": ["p"], "specs": specs}]
        run = launch(
            "restore",
            tmp_path / "restore",
            processes=4,
            devices=1,
            params={**params, "step": STEP, "loads": loads},
        )
        assert_restored(run, "target", with_target=True)
    finally:
        server.close()
