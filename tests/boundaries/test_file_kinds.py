"""Files of other kinds where a checkpoint's files should be: a FIFO, a link to a device,
a sparse file over the size cap, a manifest crafted to make the JSON parser allocate.
Only regular files are opened, never without bound and never blocking; a bad checkpoint
is skipped, the run still opens, lists and loads the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from helpers import small_state

from learnax.checkpoint import Checkpointer, list_checkpoints

# Runs each case in a fresh process with a deadline: a blocking open would hang the
# test run itself otherwise.
PROBE = textwrap.dedent(
    """
    import json, resource, sys, time
    from learnax.checkpoint import Checkpointer, CheckpointCorruptedError, verify
    registry, name = sys.argv[1], sys.argv[2]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    out = {}
    ckpt = Checkpointer(registry, "run")
    out["listed"] = sorted(ckpt.list_available_checkpoints())
    try:
        ckpt.load_checkpoint(name)
        out["load"] = "ok"
    except CheckpointCorruptedError as e:
        out["load"] = "corrupted: " + str(e)
    out["latest_step"] = ckpt.load_latest()["step"]
    out["damaged"] = [p for p, _ in verify(registry)]
    out["seconds"] = time.monotonic() - t0
    out["rss_growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps(out))
    """
)


def _probe(registry: str, name: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, registry, name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "learnax", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def run_with_latest(registry):
    """A run with state_1 (numbered) and state_latest at step 2."""
    ckpt = Checkpointer(registry, "run")
    ckpt.save_checkpoint(small_state(1), step=1)
    latest = ckpt.save_latest(small_state(2), step=2)
    return ckpt, latest


def test_a_fifo_manifest_never_blocks(registry, run_with_latest):
    ckpt, latest = run_with_latest
    manifest = os.path.join(latest, "manifest.json")
    os.remove(manifest)
    os.mkfifo(manifest)
    out = _probe(registry, "latest")
    assert out["load"].startswith("corrupted") and "regular file" in out["load"]
    assert out["latest_step"] == 1 and out["listed"] == ["step_1"]
    for command in (["show", latest], ["verify", latest], ["ls", ckpt.checkpoint_dir]):
        done = _cli(*command)
        assert "Traceback" not in done.stderr, done.stderr
    assert _cli("verify", latest).returncode == 1


def test_a_manifest_linked_to_a_device_is_not_read(registry, run_with_latest):
    _, latest = run_with_latest
    manifest = os.path.join(latest, "manifest.json")
    os.remove(manifest)
    os.symlink("/dev/zero", manifest)
    out = _probe(registry, "latest")
    assert out["load"].startswith("corrupted") and "link" in out["load"]
    assert out["latest_step"] == 1
    assert out["seconds"] < 60


def test_a_data_file_that_is_a_fifo_is_damage_not_a_hang(registry, run_with_latest):
    _, latest = run_with_latest
    (data,) = [n for n in os.listdir(latest) if n.endswith(".safetensors")]
    os.remove(os.path.join(latest, data))
    os.mkfifo(os.path.join(latest, data))
    out = _probe(registry, "latest")
    assert out["load"].startswith("corrupted") and "regular file" in out["load"]
    assert out["latest_step"] == 1
    assert any(p.endswith("state_latest") for p in out["damaged"])


def test_a_sparse_manifest_over_the_cap_skips_that_checkpoint_only(registry, run_with_latest):
    ckpt, latest = run_with_latest
    with open(os.path.join(latest, "manifest.json"), "r+b") as f:
        f.truncate(1 << 30)  # 1 GiB of holes: no disk used, far over the cap
    out = _probe(registry, "latest")
    assert out["load"].startswith("corrupted") and "larger than" in out["load"]
    assert out["latest_step"] == 1
    assert out["rss_growth_mb"] < 200
    rows = {c.name: c.status for c in list_checkpoints(ckpt.checkpoint_dir)}
    assert rows["1"] == "ok" and rows["latest"] != "ok"
    assert _cli("ls", ckpt.checkpoint_dir).returncode == 0


def _framed(body: bytes) -> bytes:
    return b'{"checksum":"crc32:%08x","manifest":' % zlib.crc32(body) + body + b"}\n"


@pytest.mark.parametrize("filler", [b"0,", b"{},", b"[],"])
def test_a_manifest_of_many_tiny_values_is_refused_before_parsing(
    registry, run_with_latest, filler
):
    _, latest = run_with_latest
    count = (30 << 20) // len(filler)
    body = b'{"format":"learnax.checkpoint/2","step":2,"junk":[' + filler * count + b"0]}"
    with open(os.path.join(latest, "manifest.json"), "wb") as f:
        f.write(_framed(body))
    out = _probe(registry, "latest")
    assert out["load"].startswith("corrupted") and "values" in out["load"]
    assert out["latest_step"] == 1
    assert out["rss_growth_mb"] < 150  # the 30 MB file, not 20x it


def test_a_checkpoint_directory_that_is_a_regular_file_loads_nothing(make_checkpointer):
    ckpt = make_checkpointer()
    ckpt.save_checkpoint({"w": np.ones(3)}, step=1)
    with open(os.path.join(ckpt.checkpoint_dir, "state_9"), "w") as f:
        f.write("{}")
    assert ckpt.load_checkpoint(9) is None
    assert ckpt.load_latest()["step"] == 1
