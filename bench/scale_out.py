"""How learnax scales out: fsspec storage (memory://, S3) and multi-host saves.

Run by hand: ``python bench/scale_out.py`` (see ``bench/README.md``). Part ``s3`` times
learnax saving and loading one state to local disk, to ``memory://`` (fsspec in-process)
and to S3 served by a moto server subprocess on 127.0.0.1, next to the raw limit of
that server (one object put and got with s3fs). Part ``multihost`` saves and restores a
sharded global state from 2 JAX processes x 2 CPU devices and from 1 process x 4
devices, and reports each process's time and bytes written and read.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

# bench/run.py, next to this file (sys.path[0] when run as a script): its helpers.
import run as bench_run

MiB = 1024 * 1024
PARTS = ("s3", "multihost")
HOST = "127.0.0.1"
RUN_ID = "bench"

# Part s3: leaves of 8 MiB of float32.
LEAF_SHAPE = (1024, 2048)
LEAF_BYTES = LEAF_SHAPE[0] * LEAF_SHAPE[1] * 4
BUCKET = "learnax-bench"
REGION = "us-east-1"
SERVER_START_S = 60.0  # for moto to answer HTTP: a hang guard
SERVER_STOP_S = 10.0

# Part multihost: arrays of 16 MiB, sharded by rows over a (4,) mesh of 4 CPU devices.
MH_SHAPE = (2048, 2048)
MH_ARRAY_BYTES = MH_SHAPE[0] * MH_SHAPE[1] * 4
MH_DEVICES = 4
# (label, processes, devices per process): the same 4 devices either way.
TOPOLOGIES = [("2 processes x 2 devices", 2, 2), ("1 process x 4 devices", 1, 4)]
HEARTBEAT_S = 60  # JAX aborts the survivors of a dead peer after this many seconds


def median_min(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), min(values)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    # A collection now, not inside the timed call, charges no operation for the garbage
    # of the one before.
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def seconds(s: float) -> str:
    return bench_run._seconds(s)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "numpy", "fsspec", "s3fs", "moto", "boto3", "learnax"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


# ======================================================================== part s3


def make_numpy_state(total_bytes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        f"layer_{i:03d}": rng.standard_normal(LEAF_SHAPE, dtype=np.float32)
        for i in range(total_bytes // LEAF_BYTES)
    }


class MotoServer:
    """``python -m moto.server -H 127.0.0.1 -p <port>`` in a subprocess, its output
    in a log file (shown when it does not start)."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def storage_options(self) -> dict[str, Any]:
        return {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("MOTO_PORT", None)  # it would override -p
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            with contextlib.suppress(urllib.error.URLError, OSError):
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2) as r:
                    if r.status == 200:
                        return
            time.sleep(0.05)
        with open(self.log_path, errors="replace") as f:
            raise RuntimeError(f"moto server did not start; its output:\n{f.read()[-3000:]}")

    def create_bucket(self) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=BUCKET)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(SERVER_STOP_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(SERVER_STOP_S)


def manifest_body(path: str, options: dict | None) -> dict[str, Any]:
    """The body of a committed checkpoint's manifest.json, on any storage."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path, **(options or {}))
    return json.loads(fs.cat_file(f"{root}/manifest.json"))["manifest"]


class LearnaxStore:
    """learnax's Checkpointer on one storage; save and load are timed, loads verified."""

    def __init__(
        self, name: str, url: str, state: dict[str, np.ndarray], options: dict | None = None
    ) -> None:
        from learnax.checkpoint import Checkpointer

        self.name = name
        self.state = state
        self.options = options
        self.data_files = 0  # in the last checkpoint saved, from its manifest
        # max_to_keep=1: the save of step N deletes step N-1, as a run with retention
        # would, so storage does not grow with the reps.
        self.ckpt = Checkpointer(
            url,
            RUN_ID,
            save_every=None,
            checkpoint_every=None,
            max_to_keep=1,
            storage_options=options,
        )

    def save(self, step: int) -> dict[str, float]:
        took, path = timed(lambda: self.ckpt.save_checkpoint(self.state, step=step))
        if path is None:
            raise RuntimeError(f"learnax save to {self.name} returned None (see its log)")
        # Checked after the clock stopped: retention left this step alone.
        listed = list(self.ckpt.list_available_checkpoints())
        if listed != [f"step_{step}"]:
            raise RuntimeError(f"{self.name}: after saving step {step}, listed {listed}")
        self.data_files = len(manifest_body(path, self.options)["files"])
        return {f"{self.name}_save": took}

    def load(self, step: int) -> dict[str, float]:
        took, restored = timed(lambda: self.ckpt.load_checkpoint(step))
        # Checked after the clock stopped: a benchmark of wrong data would be worthless.
        if restored is None or restored["step"] != step:
            raise RuntimeError(f"learnax load of step {step} from {self.name} failed")
        for key, value in self.state.items():
            if not np.array_equal(restored["state"][key], value):
                raise RuntimeError(f"learnax load from {self.name}: {key} differs")
        return {f"{self.name}_load": took}

    def clean(self, step: int) -> None:
        pass  # retention deletes the previous step during the next save


class RawS3:
    """The server's limit: the state's bytes as one object, put and got with s3fs."""

    name = "raw"

    def __init__(self, state: dict[str, np.ndarray], options: dict) -> None:
        import s3fs

        self.fs = s3fs.S3FileSystem(**options)
        self.views = [memoryview(a).cast("B") for a in state.values()]
        # Concatenated once, outside the clock: the one-PUT row times the PUT only.
        self.blob = b"".join(self.views)

    def _key(self, kind: str, step: int) -> str:
        return f"{BUCKET}/raw/{kind}-{step}.bin"

    def save(self, step: int) -> dict[str, float]:
        def stream() -> None:
            # What an uploader does: the leaves' buffers written to an open object
            # (a multipart upload in s3fs's default part size), no concatenated copy.
            with self.fs.open(self._key("stream", step), "wb") as f:
                for view in self.views:
                    f.write(view)

        took_stream, _ = timed(stream)
        took_one, _ = timed(lambda: self.fs.pipe_file(self._key("one", step), self.blob))
        return {"raw_put_stream": took_stream, "raw_put_one": took_one}

    def load(self, step: int) -> dict[str, float]:
        took, data = timed(lambda: self.fs.cat_file(self._key("stream", step)))
        if data != self.blob:
            raise RuntimeError("raw S3 get returned other bytes than were put")
        return {"raw_get": took}

    def clean(self, step: int) -> None:
        self.fs.rm([self._key("stream", step), self._key("one", step)])


@dataclass(frozen=True)
class S3Row:
    key: str
    label: str
    kind: str  # "save" or "load"
    vs_raw: bool  # compared with the raw S3 figure of its kind
    vs_local: bool  # compared with learnax on local disk


S3_ROWS = [
    S3Row("local_save", "learnax save: local disk", "save", False, False),
    S3Row("memory_save", "learnax save: memory://", "save", False, True),
    S3Row("s3_save", "learnax save: s3:// (moto)", "save", True, True),
    S3Row("raw_put_stream", "raw S3 put: open('wb') stream", "save", True, False),
    S3Row("raw_put_one", "raw S3 put: pipe_file (1 PUT)", "save", True, False),
    S3Row("local_load", "learnax load: local disk", "load", False, False),
    S3Row("memory_load", "learnax load: memory://", "load", False, True),
    S3Row("s3_load", "learnax load: s3:// (moto)", "load", True, True),
    S3Row("raw_get", "raw S3 get: cat_file", "load", True, False),
]
S3_HEADERS = ["operation", "n", "median s", "min s", "GB/s", "x raw S3", "x local"]
RAW_OF = {"save": "raw_put_stream", "load": "raw_get"}
LOCAL_OF = {"save": "local_save", "load": "local_load"}


def time_stores(stores: list[Any], reps: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for rep in range(warmup + reps):
        step = rep + 1
        # Rotating the order spreads drift (and what one store leaves behind) over all.
        shift = rep % len(stores)
        for store in stores[shift:] + stores[:shift]:
            # Dirty pages of earlier writes flushed now, so the local save's fsync pays
            # for its own writes only (as in bench/run.py).
            os.sync()
            measured = store.save(step) | store.load(step)
            store.clean(step)
            if rep >= warmup:
                for key, took in measured.items():
                    times.setdefault(key, []).append(took)
    return times


def s3_table(times: dict[str, list[float]], total_bytes: int) -> list[list[str]]:
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = []
    for row in S3_ROWS:
        if row.key not in times:
            continue
        m, low = median_min(times[row.key])
        raw, local = median.get(RAW_OF[row.kind]), median.get(LOCAL_OF[row.kind])
        rows.append(
            [
                row.label,
                str(len(times[row.key])),
                seconds(m),
                seconds(low),
                f"{total_bytes / m / 1e9:.3f}",
                f"{m / raw:.2f}" if row.vs_raw and raw else "-",
                f"{m / local:.2f}" if row.vs_local and local else "-",
            ]
        )
    return rows


def s3_summary(times: dict[str, list[float]]) -> list[str]:
    median = {k: statistics.median(v) for k, v in times.items()}

    def ratio(a: str, b: str) -> str:
        return f"{median[a] / median[b]:.2f}" if a in median and b in median else "n/a"

    return [
        f"learnax S3 save / raw S3 put (stream) = {ratio('s3_save', 'raw_put_stream')}, "
        f"/ raw S3 put (1 PUT) = {ratio('s3_save', 'raw_put_one')}",
        f"learnax S3 load / raw S3 get = {ratio('s3_load', 'raw_get')}",
        f"S3 / local disk: save = {ratio('s3_save', 'local_save')}, "
        f"load = {ratio('s3_load', 'local_load')}",
        f"memory:// / local disk: save = {ratio('memory_save', 'local_save')}, "
        f"load = {ratio('memory_load', 'local_load')}",
    ]


def run_s3(args: argparse.Namespace, root: str, out: Callable[[str], None]) -> dict[str, Any]:
    import fsspec

    total = args.mib * MiB
    state = make_numpy_state(total)
    title = (
        f"Part s3: {args.mib} MiB in {len(state)} leaves of {LEAF_BYTES // MiB} MiB "
        f"{LEAF_SHAPE} float32 (numpy)"
    )
    server = MotoServer(os.path.join(root, "moto-server.log"))
    memory_url = f"memory://learnax-bench-{os.getpid()}"
    try:
        server.start()
        server.create_bucket()
        options = server.storage_options()
        stores = [
            LearnaxStore("local", os.path.join(root, "local"), state),
            LearnaxStore("memory", memory_url, state),
            LearnaxStore("s3", f"s3://{BUCKET}/registry", state, options),
            RawS3(state, options),
        ]
        times = time_stores(stores, args.reps, args.warmup)
    finally:
        server.stop()
        with contextlib.suppress(FileNotFoundError):
            fsspec.filesystem("memory").rm(memory_url, recursive=True)
    out(f"### {title}\n" if args.markdown else title)
    out(f"moto server: {server.endpoint_url} (a subprocess, stopped now)")
    out("")
    out(bench_run.format_table(s3_table(times, total), args.markdown, S3_HEADERS))
    out("")
    files = {store.name: store.data_files for store in stores if store.name != "raw"}
    lines = s3_summary(times) + [
        "data files per learnax checkpoint (from its manifest): "
        + ", ".join(f"{name} {n}" for name, n in files.items())
        + "; each raw row is one object, put or got in one stream"
    ]
    for line in lines:
        out(line + ("  " if args.markdown else ""))
    out("")
    return {"title": title, "bytes": total, "times_s": times, "data_files": files}


# ================================================================== part multihost


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def mh_array(index: int) -> np.ndarray:
    """Array ``index`` of the multi-host state: seeded, so every process builds the same."""
    return np.random.default_rng([7, index]).standard_normal(MH_SHAPE, dtype=np.float32)


def start_jax(config: dict[str, Any]) -> Any:
    # The parent put XLA_FLAGS in this interpreter's environment; jax reads it at import.
    if "jax" in sys.modules:
        raise RuntimeError("jax was imported before XLA_FLAGS could take effect")
    import jax

    jax.config.update("jax_platforms", "cpu")
    if config["processes"] > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"{HOST}:{config['port']}",
            num_processes=config["processes"],
            process_id=config["process_id"],
            heartbeat_timeout_seconds=HEARTBEAT_S,
            initialization_timeout=max(1, int(config["timeout"])),
        )
    if jax.device_count() != MH_DEVICES:
        raise RuntimeError(f"{jax.device_count()} devices, expected {MH_DEVICES}")
    return jax


def written_by(path: str, process: int) -> tuple[int, int]:
    """Bytes and number of the data files ``process`` wrote, from the committed manifest."""
    with open(os.path.join(path, "manifest.json")) as f:
        body = json.load(f)["manifest"]
    mine = [v["bytes"] for v in body["files"].values() if v.get("process", 0) == process]
    return sum(mine), len(mine)


def check_restored(jax: Any, restored: dict[str, Any], full: list[np.ndarray], step: int) -> None:
    """Every shard this process holds equals the saved data (after the clock stopped)."""
    if restored is None or restored["step"] != step:
        raise RuntimeError(f"load_checkpoint({step}) returned {restored!r:.200}")
    for i, a in enumerate(full):
        leaf = restored["state"][f"w{i:02d}"]
        if not isinstance(leaf, jax.Array):
            raise RuntimeError(f"w{i:02d} restored as {type(leaf).__name__}, not a jax.Array")
        for shard in leaf.addressable_shards:
            if not np.array_equal(np.asarray(shard.data), a[shard.index]):
                raise RuntimeError(f"w{i:02d} differs on device {shard.device}")


def mh_child_run(config: dict[str, Any]) -> dict[str, Any]:
    """One process of a topology: save and restore the sharded state, timed."""
    jax = start_jax(config)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from learnax.checkpoint import Checkpointer

    mesh = Mesh(np.array(jax.devices()).reshape(MH_DEVICES), ("rows",))
    sharding = NamedSharding(mesh, PartitionSpec("rows"))
    full = [mh_array(i) for i in range(config["arrays"])]
    state = {
        f"w{i:02d}": jax.make_array_from_callback(MH_SHAPE, sharding, lambda idx, a=a: a[idx])
        for i, a in enumerate(full)
    }
    jax.block_until_ready(state)
    target = {k: jax.ShapeDtypeStruct(MH_SHAPE, np.float32, sharding=sharding) for k in state}
    ckpt = Checkpointer(
        config["registry"],
        RUN_ID,
        save_every=None,
        checkpoint_every=None,
        max_to_keep=1,
        multihost_timeout=config["timeout"],
    )
    me = jax.process_index()
    reps = []
    for rep in range(config["warmup"] + config["reps"]):
        step = rep + 1
        # Earlier writes flushed first (as in part s3), so this save's fsyncs pay for its
        # own data only; then all processes start together, so their times compare.
        os.sync()
        multihost_utils.sync_global_devices(f"save {step}")
        before = io_counters()
        save_s, path = timed(lambda s=step: ckpt.save_checkpoint(state, step=s))
        wchar = io_counters()["wchar"] - before["wchar"]
        if path is None:
            raise RuntimeError(f"save_checkpoint(step={step}) returned None (see its log)")
        data_bytes, data_files = written_by(path, me)
        multihost_utils.sync_global_devices(f"load {step}")
        before = io_counters()
        load_s, restored = timed(
            lambda s=step: jax.block_until_ready(ckpt.load_checkpoint(s, target=target))
        )
        rchar = io_counters()["rchar"] - before["rchar"]
        check_restored(jax, restored, full, step)
        del restored
        if rep >= config["warmup"]:
            reps.append(
                {
                    "save_s": save_s,
                    "load_s": load_s,
                    "data_bytes": data_bytes,
                    "data_files": data_files,
                    "save_wchar": wchar,
                    "load_rchar": rchar,
                }
            )
    return {
        "process": me,
        "processes": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "reps": reps,
    }


def mh_child(config: dict[str, Any]) -> None:
    """Entry of a child: its findings (or error) go to ``config["result"]`` as JSON."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    status = 0
    try:
        result = mh_child_run(config)
    except BaseException:
        result, status = {"error": traceback.format_exc()}, 1
    tmp = config["result"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, config["result"])
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 0 and config["processes"] > 1:
        import jax

        jax.distributed.shutdown()  # a barrier: the processes leave together
    # Skip interpreter teardown: jax's atexit hooks would try a shutdown again, and after
    # an error the peer may never answer it.
    os._exit(status)


def launch_topology(
    processes: int, devices: int, work: str, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Run ``processes`` children with ``devices`` CPU devices each; their results."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env["JAX_PLATFORMS"] = "cpu"
    children = []
    for i in range(processes):
        config = {
            "processes": processes,
            "process_id": i,
            "port": port,
            "registry": os.path.join(work, "registry"),
            "result": os.path.join(work, f"result-{i}.json"),
            "arrays": args.mh_mib * MiB // MH_ARRAY_BYTES,
            "reps": args.reps,
            "warmup": args.warmup,
            "timeout": args.timeout,
        }
        log = open(os.path.join(work, f"child-{i}.log"), "wb")
        command = [sys.executable, os.path.abspath(__file__), "--mh-child", json.dumps(config)]
        children.append(
            (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env), log)
        )
    try:
        deadline = time.monotonic() + args.timeout
        for proc, _ in children:
            proc.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop_children(children)
        logs = "\n".join(f"--- child {i} ---\n{log_tail(work, i)}" for i in range(processes))
        raise RuntimeError(
            f"multi-host children still running after {args.timeout:.0f} s, killed:\n{logs}"
        ) from None
    finally:
        stop_children(children)
    return [collect_child(work, i, proc.returncode) for i, (proc, _) in enumerate(children)]


def stop_children(children: list[tuple[subprocess.Popen, Any]]) -> None:
    # Only the children this script started, by their handles.
    for proc, log in children:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def log_tail(work: str, i: int) -> str:
    with open(os.path.join(work, f"child-{i}.log"), errors="replace") as f:
        return f.read()[-4000:]


def collect_child(work: str, i: int, returncode: int) -> dict[str, Any]:
    path = os.path.join(work, f"result-{i}.json")
    result = {}
    if os.path.exists(path):
        with open(path) as f:
            result = json.load(f)
    if returncode != 0 or "error" in result or "reps" not in result:
        raise RuntimeError(
            f"multi-host child {i} failed (exit status {returncode}):\n"
            f"{result.get('error', '(no result)')}\n--- its output ---\n{log_tail(work, i)}"
        )
    return result


MH_HEADERS = [
    "topology",
    "process",
    "save med s",
    "save min s",
    "load med s",
    "load min s",
    "data written MiB",
    "wchar save MiB",
    "rchar load MiB",
]


def mh_rows(label: str, results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for r in sorted(results, key=lambda r: r["process"]):
        reps = r["reps"]
        save, save_min = median_min([x["save_s"] for x in reps])
        load, load_min = median_min([x["load_s"] for x in reps])

        def mib(key: str, reps: list[dict[str, Any]] = reps) -> str:
            return f"{statistics.median(x[key] for x in reps) / MiB:.1f}"

        rows.append(
            [
                label,
                f"{r['process']} ({r['local_devices']} dev)",
                seconds(save),
                seconds(save_min),
                seconds(load),
                seconds(load_min),
                mib("data_bytes"),
                mib("save_wchar"),
                mib("load_rchar"),
            ]
        )
    return rows


def slowest(results: list[dict[str, Any]], key: str) -> float:
    """Median over reps of the slowest process's time: when the job can go on."""
    per_rep = zip(*[[x[key] for x in r["reps"]] for r in results], strict=True)
    return statistics.median(max(times) for times in per_rep)


def mh_summary(by_label: dict[str, list[dict[str, Any]]], total: int) -> list[str]:
    lines = []
    for label, results in by_label.items():
        save, load = slowest(results, "save_s"), slowest(results, "load_s")
        lines.append(
            f"{label}: save {seconds(save)} s ({total / save / 1e9:.3f} GB/s), "
            f"load {seconds(load)} s ({total / load / 1e9:.3f} GB/s), slowest process"
        )
    if len(by_label) == 2:
        (multi_label, multi), (single_label, single) = by_label.items()
        lines.append(
            f"{multi_label} / {single_label}: "
            f"save = {slowest(multi, 'save_s') / slowest(single, 'save_s'):.2f}, "
            f"load = {slowest(multi, 'load_s') / slowest(single, 'load_s'):.2f}"
        )
    return lines


def run_multihost(
    args: argparse.Namespace, root: str, out: Callable[[str], None]
) -> dict[str, Any]:
    total = args.mh_mib * MiB
    arrays = total // MH_ARRAY_BYTES
    title = (
        f"Part multihost: {args.mh_mib} MiB global state, {arrays} arrays {MH_SHAPE} float32 "
        f"sharded by rows over a ({MH_DEVICES},) mesh, saved to local disk"
    )
    by_label: dict[str, list[dict[str, Any]]] = {}
    for label, processes, devices in TOPOLOGIES:
        work = tempfile.mkdtemp(prefix=f"mh-{processes}p-", dir=root)
        by_label[label] = launch_topology(processes, devices, work, args)
        shutil.rmtree(work, ignore_errors=True)
    rows = [row for label, results in by_label.items() for row in mh_rows(label, results)]
    out(f"### {title}\n" if args.markdown else title)
    out("")
    out(bench_run.format_table(rows, args.markdown, MH_HEADERS))
    out("")
    for line in mh_summary(by_label, total):
        out(line + ("  " if args.markdown else ""))
    out("")
    return {"title": title, "bytes": total, "topologies": by_label}


# ======================================================================== main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", default="s3,multihost", help="s3,multihost (default both)")
    parser.add_argument("--reps", type=int, default=3, help="measured reps (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed reps first (default 1)")
    parser.add_argument("--mib", type=int, default=256, help="part s3 state, MiB (multiple of 8)")
    parser.add_argument(
        "--mh-mib", type=int, default=256, help="part multihost state, MiB (multiple of 16)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds for each multi-host topology"
    )
    parser.add_argument("--dir", help="where to write (default: a fresh temp dir, removed)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--json", metavar="FILE", help="also write every rep's figures here")
    parser.add_argument("--mh-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mh_child is None:
        unknown = set(args.part.split(",")) - set(PARTS)
        if unknown:
            parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PARTS)}")
        if args.reps < 1 or args.warmup < 0:
            parser.error("--reps must be >= 1 and --warmup >= 0")
        if args.mib < 8 or args.mib % 8:
            parser.error("--mib must be a positive multiple of 8 (leaves of 8 MiB)")
        if args.mh_mib < 16 or args.mh_mib % 16:
            parser.error("--mh-mib must be a positive multiple of 16 (arrays of 16 MiB)")
    return args


def header(root: str, args: argparse.Namespace, out: Callable[[str], None]) -> dict[str, Any]:
    machine = bench_run.machine_info(root)
    found = versions()
    out("learnax scale-out benchmark")
    out(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; "
        f"--dir {root}: {machine['filesystem']}"
    )
    out("versions: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    out(f"reps: {args.reps} measured after {args.warmup} warm-up; medians, min as well")
    out("")
    return {"machine": machine, "versions": found}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.mh_child is not None:
        mh_child(json.loads(args.mh_child))
        return
    # learnax logs failures on logger "learnax": shown, not hidden.
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    started = time.perf_counter()
    made_root = args.dir is None
    root = args.dir or tempfile.mkdtemp(prefix="learnax-scale-out-")
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=root)
    out = print
    report: dict[str, Any] = header(work, args, out)
    report["config"] = {k: v for k, v in vars(args).items() if k != "mh_child"}
    try:
        parts = args.part.split(",")
        if "s3" in parts:
            report["s3"] = run_s3(args, work, out)
        if "multihost" in parts:
            report["multihost"] = run_multihost(args, work, out)
    finally:
        shutil.rmtree(root if made_root else work, ignore_errors=True)
    bench_run.finish_report(report, started, args.json, out, "every rep's figures")


if __name__ == "__main__":
    main()
