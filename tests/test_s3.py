"""Object storage: a Checkpointer on ``s3://`` against a real S3-compatible server
(moto's server in a subprocess on 127.0.0.1), and on ``memory://`` and ``file://``.

On object storage a checkpoint is the prefix ``state_<name>/`` holding its data files
and ``manifest.json``, written last: its presence is the commit. Every test gets its
own fresh bucket; what the Checkpointer wrote is inspected with s3fs and boto3
clients of the test's own (never the Checkpointer's), so that caches cannot hide
what really is on the server.

The heavy cases run in child processes: a writer SIGKILLed while a large checkpoint
is being uploaded (killed from here once its upload has reached the server), and the
peak memory of uploading a 256 MiB state.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import inspect
import json
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from helpers import (
    assert_tree_equal,
    checkpoint_dir_entries,
    is_lock_file,
    learnax_errors,
    numbered_steps,
    skipped_once,
    small_state,
)
from moto_server import MotoServer, TcpProxy

import learnax
from learnax.checkpoint import CheckpointCorruptedError, Checkpointer
from learnax.checkpoint._storage import fsspec as learnax_fsspec_storage

fsspec = pytest.importorskip("fsspec")
s3fs = pytest.importorskip("s3fs")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")
pytest.importorskip("moto.server")  # the server's own dependencies (moto[server])

RUN = "run"
MANIFEST = "manifest.json"
DATA_FILE = re.compile(r"data-[^/]+-(p\d+-)?\d+\.safetensors")
# For the failure tests: fail fast instead of retrying for minutes.
FAST_FAIL = {
    "config_kwargs": {
        "retries": {"max_attempts": 1},
        "connect_timeout": 1,
        "read_timeout": 5,
    }
}
FAILED_SAVE_SECONDS = 30.0  # a failed save must give up within this (it took ~1 s here)
CHILD_TIMEOUT = 120.0  # seconds a child process may take: a hang guard


# --- the server and a bucket per test ---------------------------------------------


@dataclasses.dataclass
class Bucket:
    """A fresh bucket on the server, with clients of the test's own to inspect it."""

    name: str
    server: MotoServer
    fs: object  # s3fs.S3FileSystem, without instance or listing caches
    client: object  # boto3 S3 client

    @property
    def storage_options(self) -> dict:
        return self.server.storage_options()

    @property
    def url(self) -> str:
        """The registry of the tests: ``s3://<bucket>/reg``."""
        return f"s3://{self.name}/reg"

    def checkpoint_dir(self, run: str = RUN) -> str:
        return f"{self.url}/{run}/checkpoints"

    def checkpointer(self, run: str = RUN, **kwargs) -> Checkpointer:
        kwargs.setdefault("storage_options", self.storage_options)
        return Checkpointer(self.url, run, **kwargs)

    def key(self, url: str) -> str:
        prefix = f"s3://{self.name}/"
        assert url.startswith(prefix), url
        return url[len(prefix) :]

    def keys(self, url: str) -> set[str]:
        """Every object under the prefix ``url``, relative to it (listed afresh)."""
        prefix = self.key(url).rstrip("/") + "/"
        found = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        ):
            found.update(o["Key"][len(prefix) :] for o in page.get("Contents", []))
        return found

    def sizes(self, url: str) -> dict[str, int]:
        prefix = self.key(url).rstrip("/") + "/"
        found = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.name, Prefix=prefix
        ):
            found.update({o["Key"][len(prefix) :]: o["Size"] for o in page.get("Contents", [])})
        return found

    def read(self, url: str) -> bytes:
        return self.client.get_object(Bucket=self.name, Key=self.key(url))["Body"].read()

    def write(self, url: str, data: bytes) -> None:
        self.fs.pipe(url, data)

    def exists(self, url: str) -> bool:
        return self.key(url) in {
            o["Key"]
            for o in self.client.list_objects_v2(Bucket=self.name, Prefix=self.key(url)).get(
                "Contents", []
            )
        }

    def manifest(self, checkpoint_url: str) -> dict:
        """The manifest value of ``<checkpoint_url>/manifest.json``."""
        return json.loads(self.read(f"{checkpoint_url}/{MANIFEST}"))["manifest"]

    def delete(self) -> None:
        """Delete every object and upload in the bucket, then the bucket itself."""
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name):
            for o in page.get("Contents", []):
                self.client.delete_object(Bucket=self.name, Key=o["Key"])
        for u in self.client.list_multipart_uploads(Bucket=self.name).get("Uploads", []):
            self.client.abort_multipart_upload(
                Bucket=self.name, Key=u["Key"], UploadId=u["UploadId"]
            )
        self.client.delete_bucket(Bucket=self.name)


@pytest.fixture
def bucket(moto_server):
    name = f"learnax-{uuid.uuid4().hex[:16]}"
    client = moto_server.client()
    client.create_bucket(Bucket=name)
    fs = s3fs.S3FileSystem(
        **moto_server.storage_options(), skip_instance_cache=True, use_listings_cache=False
    )
    yield Bucket(name, moto_server, fs, client)
    moto_server.reset()  # frees the server's memory: some tests upload hundreds of MB


def only_committed_checkpoints(bucket: Bucket, checkpoint_dir: str) -> dict[str, set[str]]:
    """Check that everything under ``checkpoint_dir`` belongs to a committed checkpoint:
    each ``state_*/`` prefix holds ``manifest.json`` and exactly the files it names.
    Returns the files of each checkpoint by name."""
    by_checkpoint: dict[str, set[str]] = collections.defaultdict(set)
    for key in bucket.keys(checkpoint_dir):
        name, _, rest = key.partition("/")
        if not rest:
            assert is_lock_file(name), f"stray object {key} in {checkpoint_dir}"
            continue
        assert name.startswith("state_") and "/" not in rest, f"stray object {key}"
        by_checkpoint[name].add(rest)
    for name, files in by_checkpoint.items():
        assert MANIFEST in files, f"{name}/ holds {sorted(files)} but no {MANIFEST}"
        named = set(bucket.manifest(f"{checkpoint_dir}/{name}")["files"])
        assert files == named | {MANIFEST}, (
            f"{name}/ holds {sorted(files)}; its manifest names {sorted(named)}"
        )
        for file in named:
            assert DATA_FILE.fullmatch(file), f"{name}/{file} is not named data-<id>-<i>"
    return dict(by_checkpoint)


# --- states -------------------------------------------------------------------------


class TrainState(NamedTuple):
    params: dict
    opt_state: object
    step: object


def rich_state() -> dict:
    """jax and NumPy arrays of several dtypes, a typed PRNG key, an optax Adam state
    (NamedTuples), a NamedTuple train state, nested dicts and lists, Python scalars."""
    rng = np.random.default_rng(7)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.standard_normal((8, 16), dtype=np.float32)),
            "bias": jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32),
        },
        "embed": jnp.asarray(rng.standard_normal((4, 8), dtype=np.float32), dtype=jnp.bfloat16),
    }
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 0.5), params)
    _, opt_state = optimizer.update(grads, opt_state, params)  # non-zero moments
    return {
        "train": TrainState(params=params, opt_state=opt_state, step=jnp.int32(7)),
        "rng": jax.random.key(42),
        "tokens": np.arange(-50, 950, dtype=np.int64),
        "mask": np.array([-128, 0, 127], dtype=np.int8),
        "scale": rng.standard_normal(10).astype(ml_dtypes.bfloat16),
        "lr": 0.001,
        "epoch": 3,
        "done": False,
        "name": "demo",
        "nothing": None,
        "history": [1.5, 2, [3, "x"]],
    }


def losses(step: int) -> float:
    """The metric of the policy tests: improves until step 7, then gets worse."""
    return abs(step - 7) + 0.5


POLICY = dict(save_every=2, checkpoint_every=3, max_to_keep=2, keep_best=True, metric_name="loss")


def train_twelve_steps(ckpt: Checkpointer) -> None:
    for step in range(1, 13):
        ckpt.maybe_save_checkpoints(small_state(step), step, {"loss": losses(step)})


# --- the server ----------------------------------------------------------------------


def test_moto_server_answers_s3_requests(bucket):
    bucket.write(f"s3://{bucket.name}/probe/hello.txt", b"hello")
    assert bucket.fs.cat(f"s3://{bucket.name}/probe/hello.txt") == b"hello"
    assert bucket.keys(f"s3://{bucket.name}/probe") == {"hello.txt"}
    assert bucket.fs.find(f"s3://{bucket.name}") == [f"{bucket.name}/probe/hello.txt"]


# --- saving and loading ------------------------------------------------------------


def test_save_to_s3_returns_the_url_of_the_checkpoint_and_loads_back_bit_exact(bucket):
    ckpt = bucket.checkpointer()
    assert ckpt.checkpoint_dir == bucket.checkpoint_dir()
    state = rich_state()

    path = ckpt.save_checkpoint(state, step=7, metrics={"val/loss": 0.25})

    assert path == f"{bucket.checkpoint_dir()}/state_7"
    assert set(only_committed_checkpoints(bucket, bucket.checkpoint_dir())) == {"state_7"}
    loaded = ckpt.load_checkpoint(7)
    assert loaded["step"] == 7
    assert loaded["metrics"] == {"val/loss": 0.25}
    assert_tree_equal(state, loaded["state"])


def test_list_on_s3_gives_s3_urls_of_latest_best_and_numbered(bucket):
    ckpt = bucket.checkpointer(keep_best=True, metric_name="loss")
    assert ckpt.save_checkpoint(small_state(5), step=5) is not None
    assert ckpt.save_checkpoint(small_state(10), step=10) is not None
    assert ckpt.update_best_checkpoint(small_state(8), 0.5, step=8)
    assert ckpt.save_latest(small_state(11), step=11) is not None

    directory = bucket.checkpoint_dir()
    assert ckpt.list_available_checkpoints() == {
        "latest": f"{directory}/state_latest",
        "best": f"{directory}/state_best",
        "step_5": f"{directory}/state_5",
        "step_10": f"{directory}/state_10",
    }


def test_steps_and_latest_step_on_s3_read_manifests_only(bucket):
    ckpt = bucket.checkpointer()
    for step in (5, 10):
        assert ckpt.save_checkpoint(small_state(step), step=step) is not None
    latest = ckpt.save_latest(small_state(12), step=12)
    assert (ckpt.steps(), ckpt.latest_step()) == ([5, 10], 12)
    for file in bucket.manifest(latest)["files"]:  # latest's data gone: still its step
        bucket.client.delete_object(Bucket=bucket.name, Key=bucket.key(f"{latest}/{file}"))
    assert (ckpt.steps(), ckpt.latest_step()) == ([5, 10], 12)
    assert bucket.checkpointer().latest_step() == 12


def test_a_mistyped_run_id_on_s3_warns_naming_the_run_meant(bucket):
    from learnax.checkpoint import RunIdWarning

    assert bucket.checkpointer("alpha").save_checkpoint(small_state(1), step=1) is not None
    bucket.checkpointer("alpah-phantom")  # no checkpoint: never offered
    with pytest.warns(RunIdWarning, match=r"did you mean 'alpha'\?"):
        assert bucket.checkpointer("alpah").load_latest() is None


@pytest.fixture
def no_grace(monkeypatch):
    """Leftovers count as old at once (on object stores the writer's cleanup spares
    those younger than an hour, which may be another job's save in progress)."""
    monkeypatch.setattr(learnax_fsspec_storage, "LEFTOVER_GRACE_S", 0.0)


def test_uncommitted_prefix_on_s3_is_not_listed_and_the_next_writer_removes_it(bucket, no_grace):
    ckpt = bucket.checkpointer()
    assert ckpt.save_checkpoint(small_state(5), step=5) is not None
    listing = ckpt.list_available_checkpoints()
    leftover = f"{bucket.checkpoint_dir()}/state_999"
    bucket.write(f"{leftover}/data-0123456789abcdef-0.safetensors", b"\0" * 4096)

    assert ckpt.list_available_checkpoints() == listing
    assert ckpt.load_checkpoint(999) is None

    fresh = bucket.checkpointer()
    assert bucket.keys(leftover) != set()  # opening a run never deletes: it may be a reader
    assert fresh.list_available_checkpoints() == listing
    assert fresh.save_checkpoint(small_state(6), step=6) is not None
    assert bucket.keys(leftover) == set()  # the writer's first commit cleaned up
    assert set(only_committed_checkpoints(bucket, bucket.checkpoint_dir())) == {
        "state_5",
        "state_6",
    }
    assert_tree_equal(small_state(5), fresh.load_checkpoint(5)["state"])


def test_young_leftovers_on_s3_are_kept_as_a_save_in_progress_elsewhere(bucket):
    ckpt = bucket.checkpointer()
    path = ckpt.save_checkpoint(small_state(5), step=5)
    in_progress = f"{bucket.checkpoint_dir()}/state_6/data-0123456789abcdef-0.safetensors"
    bucket.write(in_progress, b"\0" * 4096)
    other = f"{path}/data-ffffffffffffffff-0.safetensors"
    bucket.write(other, b"\0" * 4096)

    assert bucket.checkpointer().save_checkpoint(small_state(7), step=7) is not None

    assert bucket.exists(in_progress) and bucket.exists(other)
    assert_tree_equal(small_state(5), ckpt.load_checkpoint(5)["state"])


def test_data_file_no_manifest_names_is_removed_by_the_next_writer_on_s3(bucket, no_grace):
    ckpt = bucket.checkpointer()
    path = ckpt.save_checkpoint(small_state(5), step=5)
    named = set(bucket.manifest(path)["files"])
    stray = f"{path}/data-ffffffffffffffff-0.safetensors"
    bucket.write(stray, b"\0" * 4096)

    reader = bucket.checkpointer()
    assert bucket.exists(stray)
    assert reader.save_latest(small_state(6), step=6) is not None

    assert bucket.keys(path) == named | {MANIFEST}
    assert_tree_equal(small_state(5), ckpt.load_checkpoint(5)["state"])


# --- the policy: retention, best, restart -----------------------------------------


def test_retention_on_s3_leaves_no_object_of_a_pruned_checkpoint(bucket):
    ckpt = bucket.checkpointer(**POLICY)
    train_twelve_steps(ckpt)

    assert numbered_steps(ckpt) == [9, 12]
    for step in (3, 6):
        assert bucket.keys(f"{bucket.checkpoint_dir()}/state_{step}") == set()
    assert set(only_committed_checkpoints(bucket, bucket.checkpoint_dir())) == {
        "state_9",
        "state_12",
        "state_latest",
        "state_best",
    }
    assert ckpt.load_latest()["step"] == 12


def test_best_on_s3_is_the_checkpoint_of_the_best_metric(bucket):
    ckpt = bucket.checkpointer(**POLICY)
    train_twelve_steps(ckpt)

    best = ckpt.load_best()
    assert best["step"] == 7
    assert best["metrics"] == {"loss": 0.5}
    assert_tree_equal(small_state(7), best["state"])


def test_restarted_checkpointer_on_s3_has_the_stored_best_metric_value(bucket):
    train_twelve_steps(bucket.checkpointer(**POLICY))

    restarted = bucket.checkpointer(**POLICY)

    assert restarted.best_metric_value == 0.5
    assert not restarted.update_best_checkpoint(small_state(13), 0.75, step=13)
    assert restarted.load_best()["step"] == 7


def test_load_latest_after_overwrites_on_s3_gives_the_newest_and_only_its_files_remain(bucket):
    ckpt = bucket.checkpointer()
    for step in range(1, 5):
        assert ckpt.save_latest(small_state(step), step=step) is not None

    restored = ckpt.load_latest()
    assert restored["step"] == 4
    assert_tree_equal(small_state(4), restored["state"])
    latest = f"{bucket.checkpoint_dir()}/state_latest"
    assert bucket.manifest(latest)["step"] == 4
    assert bucket.keys(latest) == set(bucket.manifest(latest)["files"]) | {MANIFEST}


def test_async_save_to_s3_is_committed_after_wait_until_finished(bucket):
    state = rich_state()
    with bucket.checkpointer(async_save=True) as ckpt:
        path = ckpt.save_checkpoint(state, step=3)
        assert path == f"{bucket.checkpoint_dir()}/state_3"
        ckpt.wait_until_finished()

        assert bucket.exists(f"{path}/{MANIFEST}")
        assert_tree_equal(state, ckpt.load_checkpoint(3)["state"])


def test_async_save_to_s3_returns_before_the_upload_is_committed(bucket):
    state = {"w": np.arange(8 << 20, dtype=np.float32)}  # 32 MB: ~0.3 s to upload here
    with bucket.checkpointer(async_save=True) as ckpt:
        path = ckpt.save_checkpoint(state, step=3)
        committed_at_return = bucket.exists(f"{path}/{MANIFEST}")
        ckpt.wait_until_finished()
        assert not committed_at_return
        assert bucket.exists(f"{path}/{MANIFEST}")


def test_target_of_shape_dtype_structs_restores_jax_arrays_from_s3(bucket):
    state = {
        "w": jnp.arange(24, dtype=jnp.float32).reshape(4, 6),
        "emb": jnp.linspace(0.0, 1.0, 10).astype(jnp.bfloat16),
        "count": jnp.int32(5),
    }
    ckpt = bucket.checkpointer()
    assert ckpt.save_checkpoint(state, step=1) is not None
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    restored = ckpt.load_checkpoint(1, target=target)["state"]

    for leaf in jax.tree_util.tree_leaves(restored):
        assert isinstance(leaf, jax.Array)
    assert_tree_equal(state, jax.device_get(restored))


# --- damage and failures ------------------------------------------------------------


def test_damaged_data_object_on_s3_is_detected_and_load_latest_falls_back(bucket):
    ckpt = bucket.checkpointer()
    assert ckpt.save_checkpoint(small_state(1), step=1) is not None
    path = ckpt.save_checkpoint(small_state(2), step=2)
    files = bucket.manifest(path)["files"]
    damaged = max(files, key=lambda f: files[f]["bytes"])
    data = bytearray(bucket.read(f"{path}/{damaged}"))
    data[-1] ^= 0x01  # the last byte of the tensor data
    bucket.write(f"{path}/{damaged}", bytes(data))

    with pytest.raises(CheckpointCorruptedError, match=re.escape(damaged)):
        ckpt.load_checkpoint(2)
    with skipped_once("state_2"):
        restored = ckpt.load_latest()
    assert restored["step"] == 1
    assert_tree_equal(small_state(1), restored["state"])


def test_save_to_a_deleted_bucket_returns_none_and_logs_on_learnax_logger(bucket, caplog):
    ckpt = bucket.checkpointer(storage_options=bucket.server.storage_options(**FAST_FAIL))
    bucket.delete()

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="learnax"):
        assert ckpt.save_checkpoint(small_state(1), step=1) is None
    assert time.monotonic() - start < FAILED_SAVE_SECONDS
    assert learnax_errors(caplog)


def test_save_while_the_server_is_unreachable_returns_none_and_earlier_ones_stay(bucket, caplog):
    proxy = TcpProxy(bucket.server.port)
    try:
        options = bucket.server.storage_options(**FAST_FAIL)
        options["client_kwargs"]["endpoint_url"] = proxy.endpoint_url
        ckpt = bucket.checkpointer(storage_options=options)
        assert ckpt.save_checkpoint(small_state(1), step=1) is not None
        assert ckpt.save_latest(small_state(1), step=1) is not None
        listing = ckpt.list_available_checkpoints()

        proxy.cut()
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="learnax"):
            assert ckpt.save_checkpoint(small_state(2), step=2) is None
            assert ckpt.save_latest(small_state(2), step=2) is None
        elapsed = time.monotonic() - start
        proxy.restore()

        assert elapsed < 2 * FAILED_SAVE_SECONDS
        assert learnax_errors(caplog)
        assert ckpt.list_available_checkpoints() == listing
        assert ckpt.load_checkpoint(2) is None
        assert_tree_equal(small_state(1), ckpt.load_checkpoint(1)["state"])
        assert ckpt.load_latest()["step"] == 1
        assert bucket.keys(f"{bucket.checkpoint_dir()}/state_2") == set()
    finally:
        proxy.close()


# --- a writer killed mid-upload -------------------------------------------------------


def big_state(step: int) -> dict:
    """~157 MB in one array, every byte a function of the step."""
    words = np.arange(150 << 18, dtype=np.uint32)
    words *= np.uint32(2654435761)
    words ^= np.uint32(step)
    return {"params": {"kernel": words.view(np.float32).reshape(-1, 1024)}, "step": np.int64(step)}


# Saves step 1 (small) as numbered and latest, then starts saving the big state at
# step 2 (as a numbered checkpoint or as latest) and waits there for its SIGKILL.
KILLED_WRITER = (
    textwrap.dedent(
        """
    import json, sys
    import numpy as np
    from learnax.checkpoint import Checkpointer

    """
    )
    + inspect.getsource(small_state)
    + inspect.getsource(big_state)
    + textwrap.dedent(
        """
    url, options, kind = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    ckpt = Checkpointer(url, "run", storage_options=options)
    assert ckpt.save_checkpoint(small_state(1), step=1) is not None
    assert ckpt.save_latest(small_state(1), step=1) is not None
    state = big_state(2)
    print("SAVING", flush=True)
    if kind == "numbered":
        saved = ckpt.save_checkpoint(state, step=2)
    else:
        saved = ckpt.save_latest(state, step=2)
    print("SAVED", saved, flush=True)
    """
    )
)


def child_env() -> dict:
    """The environment of a child process: it imports the same learnax as this test."""
    env = dict(os.environ)
    src = str(Path(learnax.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


class Child:
    """A child Python process whose stdout lines are read by a thread as they come."""

    def __init__(self, code: str, args: list[str], stderr_path: Path) -> None:
        self.stderr_path = stderr_path
        self._stderr = open(stderr_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=child_env(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def poll_line(self) -> str | None:
        """The next line if one came, else None (without waiting)."""
        try:
            line = self.lines.get_nowait()
        except queue.Empty:
            return None
        if line is None:
            raise AssertionError(f"the child exited; {self.stderr()}")
        self.seen.append(line)
        return line

    def expect(self, prefix: str, timeout: float = CHILD_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"no {prefix!r} line in {timeout} s; {self.stderr()}"
                ) from None
            if line is None:
                raise AssertionError(f"the child exited before {prefix!r}; {self.stderr()}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def stderr(self) -> str:
        self._stderr.flush()
        return f"its stderr ends:\n{self.stderr_path.read_bytes()[-3000:].decode(errors='replace')}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._stderr.close()


def upload_in_progress(bucket: Bucket, prefix: str, before: set[str]) -> str | None:
    """What shows that the large data file is reaching the server under ``prefix``: a
    multipart upload with a part already received, or a new object of at least 1 MiB.
    (Small new objects, such as a data file of the small leaves, are not enough: the
    kill is to land in the middle of the large upload.)"""
    for upload in bucket.client.list_multipart_uploads(Bucket=bucket.name, Prefix=prefix).get(
        "Uploads", []
    ):
        parts = bucket.client.list_parts(
            Bucket=bucket.name, Key=upload["Key"], UploadId=upload["UploadId"]
        ).get("Parts", [])
        if parts:
            return f"multipart upload of {upload['Key']} with {len(parts)} part(s)"
    sizes = bucket.sizes(f"s3://{bucket.name}/{prefix}")
    new = sorted(k for k, size in sizes.items() if k not in before and size >= 1 << 20)
    return f"new large object(s) {new}" if new else None


@pytest.mark.parametrize("kind", ["numbered", "latest"])
def test_writer_killed_mid_upload_leaves_the_previous_checkpoint_and_no_leftovers(
    bucket, tmp_path, kind, no_grace
):
    directory = bucket.checkpoint_dir()
    prefix = bucket.key(directory) + "/"
    options = json.dumps(bucket.storage_options)
    child = Child(KILLED_WRITER, [bucket.url, options, kind], tmp_path / "writer.stderr")
    try:
        child.expect("SAVING")
        before = bucket.keys(directory)
        deadline = time.monotonic() + CHILD_TIMEOUT
        while (evidence := upload_in_progress(bucket, prefix, before)) is None:
            line = child.poll_line()
            assert line is None, f"the save finished before any upload was seen: {line}"
            assert time.monotonic() < deadline, "no upload of step 2 reached the server"
            time.sleep(0.005)
    finally:
        child.kill()
    assert not any(line.startswith("SAVED") for line in child.seen), child.seen
    # The kill landed before the commit: step 2's manifest was never written.
    assert not bucket.exists(f"{directory}/state_2/{MANIFEST}"), evidence
    assert bucket.manifest(f"{directory}/state_latest")["step"] == 1, evidence

    ckpt = bucket.checkpointer()

    assert "step_2" not in ckpt.list_available_checkpoints()
    assert set(ckpt.list_available_checkpoints()) == {"latest", "step_1"}
    restored = ckpt.load_latest()
    assert restored["step"] == 1
    assert_tree_equal(small_state(1), restored["state"])
    assert_tree_equal(small_state(1), ckpt.load_checkpoint("latest")["state"])
    # The next writer's first commit removes what the killed upload left.
    assert ckpt.save_checkpoint(small_state(3), step=3) is not None
    assert set(only_committed_checkpoints(bucket, directory)) == {
        "state_1",
        "state_3",
        "state_latest",
    }


# --- memory use of a large upload ---------------------------------------------------

STATE_BYTES = 256 << 20

# Saves a 256 MiB state to S3 and reports the resident memory before the save and its
# peak during it (VmHWM, reset to the current RSS just before when the kernel allows).
MEMORY_PROBE = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from learnax.checkpoint import Checkpointer

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    url, options, state_bytes = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    ckpt = Checkpointer(url, "run", storage_options=options)
    # Warm up: every import, connection and code path of an upload, on a small state.
    assert ckpt.save_checkpoint({"w": np.ones(4 << 20, np.float32)}, step=0) is not None
    # Built in place: no temporary copies that would raise the peak before the save.
    words = np.arange(state_bytes // 4, dtype=np.uint32)
    words *= np.uint32(2654435761)
    state = {"params": {"kernel": words.view(np.float32)}, "step": np.int64(1)}
    rss_before = status("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        reset = True
    except OSError:
        reset = False
    path = ckpt.save_checkpoint(state, step=1)
    peak = status("VmHWM")
    print(json.dumps({"path": path, "rss_before": rss_before, "peak": peak, "reset": reset}))
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
def test_uploading_a_large_state_to_s3_does_not_copy_it_in_memory(bucket, tmp_path):
    options = json.dumps(bucket.storage_options)
    stderr_path = tmp_path / "probe.stderr"
    with open(stderr_path, "wb") as stderr:
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, bucket.url, options, str(STATE_BYTES)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_env(),
            timeout=CHILD_TIMEOUT,
        )
    assert result.returncode == 0, stderr_path.read_bytes()[-3000:].decode(errors="replace")
    report = json.loads(result.stdout.decode().strip().splitlines()[-1])
    assert report["path"] == f"{bucket.checkpoint_dir()}/state_1"
    # The save really uploaded the whole state.
    sizes = bucket.sizes(report["path"])
    assert sum(sizes.values()) >= STATE_BYTES
    # A copy of the whole state (e.g. the file built in memory before the upload) would
    # add at least STATE_BYTES; a streaming upload holds a few parts (96 MB measured
    # here with 32 MiB parts).
    growth = report["peak"] - report["rss_before"]
    assert growth < 0.5 * STATE_BYTES, (
        f"saving a {STATE_BYTES >> 20} MB state raised the peak RSS by {growth >> 20} MB "
        f"(VmHWM reset before the save: {report['reset']})"
    )


# --- other fsspec URLs -----------------------------------------------------------------


def test_memory_url_registry_saves_lists_and_loads():
    root = f"learnax-{uuid.uuid4().hex[:16]}"
    registry = f"memory://{root}/reg"
    memory = fsspec.filesystem("memory")
    try:
        ckpt = Checkpointer(registry, RUN)
        directory = f"{registry}/{RUN}/checkpoints"
        assert ckpt.checkpoint_dir == directory

        assert ckpt.save_checkpoint(small_state(1), step=1) == f"{directory}/state_1"
        assert ckpt.save_latest(small_state(2), step=2) == f"{directory}/state_latest"

        assert ckpt.list_available_checkpoints() == {
            "latest": f"{directory}/state_latest",
            "step_1": f"{directory}/state_1",
        }
        assert memory.isfile(f"{directory}/state_1/{MANIFEST}")
        assert_tree_equal(small_state(1), ckpt.load_checkpoint(1)["state"])
        restored = Checkpointer(registry, RUN).load_latest()
        assert restored["step"] == 2
        assert_tree_equal(small_state(2), restored["state"])
    finally:
        if memory.exists(f"/{root}"):
            memory.rm(f"/{root}", recursive=True)


def test_file_url_registry_is_the_same_directory_as_the_plain_path(tmp_path):
    plain = tmp_path / "reg"
    by_url = Checkpointer(f"file://{plain}", RUN)
    by_path = Checkpointer(str(plain), RUN)

    path = by_url.save_checkpoint(small_state(1), step=1)
    assert by_path.save_latest(small_state(2), step=2) is not None

    directory = plain / RUN / "checkpoints"
    assert path is not None and path.removeprefix("file://") == str(directory / "state_1")
    assert checkpoint_dir_entries(directory) == {"state_1", "state_latest"}
    assert (directory / "state_1" / MANIFEST).is_file()
    assert set(by_url.list_available_checkpoints()) == {"latest", "step_1"}
    assert_tree_equal(small_state(1), by_path.load_checkpoint(1)["state"])
    assert_tree_equal(small_state(2), by_url.load_latest()["state"])


class FullDiskFile:
    """A file being written on a filesystem whose files have no ``discard`` (as sftp's
    and smb's have none): ``write`` and ``close`` only. The disk is full once the file
    holds ``room`` bytes: a write past that stores what fits and fails with ENOSPC."""

    def __init__(self, path: str, room: int | None) -> None:
        self._f = open(path, "wb")  # closed by close()
        self._room = room
        self.closed = False

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if self._room is not None and self._f.tell() + data.nbytes > self._room:
            self._f.write(data[: self._room - self._f.tell()])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()
        self.closed = True


def full_disk_filesystem(room: int | None) -> str:
    """Register ``fulldisk://``, a directory tree on this disk whose files are
    :class:`FullDiskFile`; returns the protocol's URL prefix."""
    from fsspec.implementations.local import LocalFileSystem

    class FullDisk(LocalFileSystem):
        protocol = "fulldisk"
        root_marker = "/"

        @classmethod
        def _strip_protocol(cls, path):
            return super()._strip_protocol(str(path).replace("fulldisk://", "/", 1))

        def _open(self, path, mode="rb", **kwargs):
            if "w" in mode:
                return FullDiskFile(self._strip_protocol(path), room)
            return super()._open(path, mode, **kwargs)

    fsspec.register_implementation("fulldisk", FullDisk, clobber=True)
    return "fulldisk://"


def test_a_failed_write_on_a_filesystem_without_discard_leaves_no_partial_file(tmp_path):
    """On an fsspec filesystem whose files cannot be discarded, a write that fails
    half-way (a full disk) closes the file and removes it: the storage itself leaves no
    file cut short under its name, whoever its caller is."""

    def storage(room: int | None) -> learnax_fsspec_storage.FsspecStorage:
        protocol = full_disk_filesystem(room).removesuffix("://")
        return learnax_fsspec_storage.FsspecStorage(fsspec.filesystem(protocol))

    chunks = [b"x" * 1000, b"y" * 1000]
    assert storage(room=None).write_durable(str(tmp_path / "whole.bin"), chunks) == 2000
    with pytest.raises(OSError, match="No space left"):
        storage(room=1500).write_durable(str(tmp_path / "cut.bin"), chunks)

    assert sorted(os.listdir(tmp_path)) == ["whole.bin"], "a partial file was left"


# --- the command line on S3 -----------------------------------------------------------


def learnax_cli(bucket, *args: str) -> subprocess.CompletedProcess:
    options = json.dumps(bucket.storage_options)
    return subprocess.run(
        [sys.executable, "-m", "learnax", "--storage-options", options, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_command_line_lists_shows_and_verifies_checkpoints_on_s3(bucket):
    ckpt = bucket.checkpointer(save_every=1, checkpoint_every=2, keep_best=True)
    for step in (1, 2):
        ckpt.maybe_save_checkpoints(small_state(step), step, {"val/loss": 1.0 / step})

    listing = learnax_cli(bucket, "ls", bucket.url, "--json")
    assert listing.returncode == 0, listing.stderr
    (run,) = json.loads(listing.stdout)["runs"]
    assert (run["run"], run["newest_step"], run["best"]["step"]) == (RUN, 2, 2)

    shown = learnax_cli(bucket, "show", f"{bucket.url}/{RUN}", "latest", "--json")
    assert shown.returncode == 0, shown.stderr
    leaves = {leaf["path"]: leaf for leaf in json.loads(shown.stdout)["leaves"]}
    assert leaves["params/w"]["shape"] == [3, 4] and leaves["params/w"]["dtype"] == "float32"

    verified = learnax_cli(bucket, "verify", f"{bucket.url}/{RUN}")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("ok ") == 3  # latest, best, state_2


def test_the_command_line_reports_a_damaged_object_on_s3(bucket):
    ckpt = bucket.checkpointer()
    path = ckpt.save_checkpoint(small_state(1), step=1)
    (name,) = bucket.manifest(path)["files"]
    raw = bytearray(bucket.read(f"{path}/{name}"))
    raw[-1] ^= 0xFF
    bucket.write(f"{path}/{name}", bytes(raw))

    verified = learnax_cli(bucket, "verify", path)

    assert verified.returncode == 1
    assert "DAMAGED" in verified.stdout and name in verified.stdout
