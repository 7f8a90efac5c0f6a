"""What the metric history costs a training loop: a step that reports nothing (must
stay what it was), a step that reports metrics (one JSON line appended), on a local
disk and on ``memory://`` (an object store's way: kept in memory until a commit), and
one compaction of a full history. Run by hand:

    PYTHONPATH=src python bench/history.py [--reports 20000]

Prints medians per call, and ratios against the no-op step.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax.numpy as jnp
import numpy as np

from learnax.checkpoint import Checkpointer


def median_us(fn, calls: int) -> float:
    clock = time.perf_counter_ns
    times = np.empty(calls, dtype=np.int64)
    for i in range(calls):
        t0 = clock()
        fn(i)
        times[i] = clock() - t0
    return float(np.median(times)) / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reports", type=int, default=20000)
    args = parser.parse_args()
    state = {"w": jnp.ones((64, 64))}
    root = tempfile.mkdtemp()
    ckpt = Checkpointer(root, "bench", save_every=None, checkpoint_every=None)
    noop = median_us(lambda i: ckpt.maybe_save_checkpoints(state, i), args.reports)
    print(f"step reporting nothing:          {noop:8.3f} us")
    floats = median_us(
        lambda i: ckpt.maybe_save_checkpoints(state, i, {"loss": 0.5, "lr": 1e-3}), args.reports
    )
    print(f"step reporting 2 floats (local): {floats:8.3f} us  ({floats / noop:.0f}x no-op)")
    loss = jnp.asarray(0.5)
    jaxv = median_us(lambda i: ckpt.maybe_save_checkpoints(state, i, {"loss": loss}), args.reports)
    print(f"step reporting a jax scalar:     {jaxv:8.3f} us  ({jaxv / noop:.0f}x no-op)")
    ckpt.close()
    size = sum(
        os.path.getsize(os.path.join(root, "bench", "history", n))
        for n in os.listdir(os.path.join(root, "bench", "history"))
    )
    print(f"history on disk after {3 * args.reports} reports: {size / 1024:.0f} KiB")

    mem = Checkpointer(
        f"memory://bench-{os.getpid()}", "bench", save_every=None, checkpoint_every=None
    )
    memv = median_us(lambda i: mem.maybe_save_checkpoints(state, i, {"loss": 0.5}), args.reports)
    print(f"step reporting 1 float (memory://): {memv:8.3f} us")
    mem.close()

    # One compaction of a history at its bound (16 MiB by default).
    from learnax.checkpoint import _history

    writer = _history.HistoryWriter(_history.LocalStorage(), os.path.join(root, "full"))
    i = 0
    while writer._bytes <= _history.max_bytes() - 4096:
        writer.report(i, {"train/loss": 0.5 + i * 1e-9, "lr": 1e-3})
        i += 1
    writer.close()
    t0 = time.perf_counter()
    with writer._lock:
        writer._compact()
    print(
        f"compaction of {i} records ({_history.max_bytes() >> 20} MiB): "
        f"{time.perf_counter() - t0:.2f} s"
    )
    t0 = time.perf_counter()
    n = len(_history.read_history(_history.LocalStorage(), os.path.join(root, "full")))
    print(f"reading the compacted history back ({n} records): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main()
