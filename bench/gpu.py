"""What only an accelerator shows: learnax with its arrays on a GPU.

Run by hand on a machine with a GPU (``python bench/gpu.py --json out.json``); it
prints medians in ms. On the GPU's default device it measures, for the nested
transformer + Adam state of ``bench/nested.py`` (~4,000 leaves, 62.5 MiB) and for a
2 GiB state of 64 leaves:

- ``jax.device_get`` of the whole state (the device-to-host transfer alone);
- learnax's synchronous save (transfer + write + fsync), and a plain write + fsync of
  the same bytes from host memory;
- how long an async save blocks the caller (a copy on the GPU, no transfer), and the
  save's total time to ``wait_until_finished``;
- ``load_latest()`` to numpy, and ``load_latest(target=...)`` back onto the GPU (the
  arrays' own shardings), against a plain read;
- a frozen 1 GiB subtree on the GPU passed through unchanged with a small trainable
  part: the incremental save (nothing of the frozen part crosses to the host).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from nested import make_transformer_state  # noqa: E402

from learnax.checkpoint import Checkpointer  # noqa: E402


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        times.append(fn())
    return statistics.median(times) * 1e3


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fresh(state: Any) -> Any:
    out = jax.tree_util.tree_map(
        lambda x: x + 0 if not jnp.issubdtype(x.dtype, jnp.integer) else x + 1, state
    )
    jax.block_until_ready(out)
    return out


def plain_write_read(nbytes: int, root: str) -> tuple[float, float]:
    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    path = os.path.join(root, "plain.bin")

    def write() -> float:
        os.sync()
        t = time.perf_counter()
        with open(path, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t

    def read() -> float:
        out = np.empty(nbytes, np.uint8)
        t = time.perf_counter()
        with open(path, "rb") as f:
            f.readinto(memoryview(out))
        return time.perf_counter() - t

    return median_ms(write, 3), median_ms(read, 3)


def measure(name: str, state: Any, root: str, reps: int) -> dict[str, float]:
    leaves = jax.tree_util.tree_leaves(state)
    nbytes = sum(x.nbytes for x in leaves)
    out: dict[str, float] = {"leaves": len(leaves), "MiB": nbytes / 2**20}
    gets = []
    for _ in range(reps):
        s = fresh(state)
        gets.append(timed(lambda s=s: jax.device_get(s)))
    out["device_get"] = statistics.median(gets) * 1e3
    out["plain_write_fsync"], out["plain_read"] = plain_write_read(nbytes, root)

    sync = Checkpointer(root, f"{name}-sync", save_every=1, checkpoint_every=None)
    sync.save_latest(fresh(state), step=0)
    saves = []
    for step in range(1, reps + 1):
        s = fresh(state)
        saves.append(timed(lambda s=s, step=step: sync.save_latest(s, step=step)))
    out["save_sync"] = statistics.median(saves) * 1e3

    async_ckpt = Checkpointer(
        root, f"{name}-async", save_every=1, checkpoint_every=None, async_save=True
    )
    async_ckpt.save_latest(fresh(state), step=0)
    async_ckpt.wait_until_finished()
    blocks, totals = [], []
    for step in range(1, reps + 1):
        s = fresh(state)
        t = time.perf_counter()
        async_ckpt.save_latest(s, step=step)
        blocks.append(time.perf_counter() - t)
        async_ckpt.wait_until_finished()
        totals.append(time.perf_counter() - t)
    async_ckpt.close()
    out["async_blocks"] = statistics.median(blocks) * 1e3
    out["async_total"] = statistics.median(totals) * 1e3

    out["load_numpy"] = median_ms(lambda: timed(sync.load_latest), reps)
    target = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )

    def load_target() -> None:
        jax.block_until_ready(sync.load_latest(target=target)["state"])

    load_target()
    out["load_target_gpu"] = median_ms(lambda: timed(load_target), reps)
    return out


def frozen_part(root: str, reps: int) -> dict[str, float]:
    key = jax.random.key(0)
    frozen = {
        f"w{i}": jax.random.normal(jax.random.fold_in(key, i), (4096, 4096 // 4)) for i in range(64)
    }
    jax.block_until_ready(frozen)
    ckpt = Checkpointer(root, "frozen", save_every=None, checkpoint_every=1)

    def state(step: int) -> dict[str, Any]:
        return {"frozen": frozen, "train": {"w": jnp.full((512, 512), step, jnp.float32)}}

    first = timed(lambda: ckpt.save_checkpoint(state(0), step=0))
    later = [
        timed(lambda step=step: ckpt.save_checkpoint(state(step), step=step))
        for step in range(1, reps + 1)
    ]
    return {
        "frozen_MiB": sum(x.nbytes for x in frozen.values()) / 2**20,
        "first_save": first * 1e3,
        "incremental_save": statistics.median(later) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--quick", action="store_true", help="a smoke test: no 2 GiB state")
    args = parser.parse_args()
    print("devices:", jax.devices(), "jax", jax.__version__, flush=True)
    results: dict[str, Any] = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        nested = make_transformer_state()
        nested = jax.device_put(nested, jax.devices()[0])
        results["nested"] = measure("nested", nested, root, args.reps)
        print("nested", json.dumps(results["nested"], indent=1), flush=True)
        del nested
        if not args.quick:
            big = {f"w{i}": jnp.ones((4096, 2048), jnp.float32) * i for i in range(64)}
            results["2GiB"] = measure("big", big, root, 3)
            print("2GiB", json.dumps(results["2GiB"], indent=1), flush=True)
            del big
        results["frozen"] = frozen_part(root, args.reps)
        print("frozen", json.dumps(results["frozen"], indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
