"""How fast learnax saves and loads, against the raw-disk limit and its peers.

Run by hand: ``python bench/run.py`` (see ``bench/README.md``). In one process run it
times, on three states of float32 jax arrays, a raw write+fsync and a raw read of the
same bytes (the limit), learnax's sync save, load and async save, Orbax's
``StandardCheckpointer``, pickle (what the original learnax did) and
``safetensors.numpy``, and prints medians with their ratios to the raw limit and to
learnax. Peak extra resident memory of each operation is measured in a fresh
subprocess per method, from the kernel's own high-water mark (``VmHWM``, reset through
``/proc/self/clear_refs``), so no short peak is missed and no method inherits another's
freed-but-resident memory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.metadata
import inspect
import json
import logging
import os
import pickle
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MiB = 1024 * 1024
KiB = 1024
SLOW_REP_S = 60.0  # one rep slower than this: at most SLOW_REP_CAP measured reps
SLOW_REP_CAP = 2
NOOP_CALLS = 100_000


@dataclass(frozen=True)
class Size:
    key: str
    leaves: int
    leaf_shape: tuple[int, int]

    @property
    def leaf_bytes(self) -> int:
        return self.leaf_shape[0] * self.leaf_shape[1] * 4

    @property
    def total_bytes(self) -> int:
        return self.leaves * self.leaf_bytes

    def describe(self) -> str:
        return (
            f"{self.total_bytes / MiB:.3g} MiB in {self.leaves:,} leaves of "
            f"{_bytes(self.leaf_bytes)} {self.leaf_shape} float32"
        )


SIZES = {
    "a": Size("a", 64, (1024, 2048)),  # 64 x 8 MiB = 512 MiB
    "b": Size("b", 4000, (64, 64)),  # 4,000 x 16 KiB = 62.5 MiB
    "c": Size("c", 200, (80, 128)),  # 200 x 40 KiB = 7.8 MiB
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    kind: str  # "write" or "read": which raw figure it is compared with
    method: str
    vs: tuple[str, ...] = ()  # learnax rows to compare with, first one measured wins
    rss: bool = False  # whether its peak extra RSS is measured


ROWS = [
    Row("raw_write", "raw write + fsync", "write", "raw", rss=True),
    Row("raw_read", "raw read (readinto)", "read", "raw", rss=True),
    Row("learnax_save", "learnax save (sync, durable)", "write", "learnax", rss=True),
    Row("learnax_load", "learnax load -> numpy", "read", "learnax", rss=True),
    Row("learnax_load_jax", "learnax load target= -> jax", "read", "learnax", rss=True),
    Row("learnax_async_block", "learnax async: save returns", "write", "learnax_async"),
    Row("learnax_async_wait", "learnax async: wait_until_fin.", "write", "learnax_async"),
    Row("learnax_async_total", "learnax async: total", "write", "learnax_async", rss=True),
    Row(
        "orbax_save_block",
        "orbax save returns",
        "write",
        "orbax",
        vs=("learnax_async_block",),
    ),
    Row(
        "orbax_save_total",
        "orbax save + wait_until_fin.",
        "write",
        "orbax",
        vs=("learnax_async_total", "learnax_save"),
        rss=True,
    ),
    Row(
        "orbax_restore",
        "orbax restore -> jax",
        "read",
        "orbax",
        vs=("learnax_load_jax",),
        rss=True,
    ),
    Row(
        "pickle_save",
        "pickle device_get+dump+fsync",
        "write",
        "pickle",
        vs=("learnax_save",),
        rss=True,
    ),
    Row("pickle_load", "pickle load -> numpy", "read", "pickle", vs=("learnax_load",), rss=True),
    Row(
        "safetensors_save",
        "safetensors device_get+save+fsync",
        "write",
        "safetensors",
        vs=("learnax_save",),
        rss=True,
    ),
    Row(
        "safetensors_load",
        "safetensors load -> numpy",
        "read",
        "safetensors",
        vs=("learnax_load",),
        rss=True,
    ),
]
ROW_BY_KEY = {row.key: row for row in ROWS}


# ------------------------------------------------------------------ states


def make_state(size: Size, seed: int = 0) -> dict[str, Any]:
    """A dict of float32 jax arrays on the default device, from seeded random data."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    state = {
        f"layer_{i:04d}": jnp.asarray(rng.standard_normal(size.leaf_shape, dtype=np.float32))
        for i in range(size.leaves)
    }
    return jax.block_until_ready(state)


# ------------------------------------------------------------------ probes
#
# A method wraps each operation in ``probe.span(row_key)``. The same method code is
# timed by a Stopwatch in the main process and measured by a PeakRss in a subprocess.


class Stopwatch:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, key: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - start


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _release_free_memory() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0, own process).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakRss:
    def __init__(self) -> None:
        self.extra_mib: dict[str, float] = {}

    @contextlib.contextmanager
    def span(self, key: str) -> Iterator[None]:
        if not ROW_BY_KEY[key].rss:
            yield
            return
        _release_free_memory()
        _reset_peak_rss()
        base = _status_kib("VmHWM")
        yield
        self.extra_mib[key] = (_status_kib("VmHWM") - base) / 1024


# ------------------------------------------------------------------ methods


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Method:
    """One way of saving and loading the state; ``save``/``load`` wrap every timed
    operation in ``probe.span``, ``clean`` removes what ``save`` wrote."""

    name = ""

    def __init__(self, directory: str, state: dict[str, Any]) -> None:
        self.directory = directory
        self.state = state
        os.makedirs(directory, exist_ok=True)

    def save(self, step: int, probe: Any) -> None:
        raise NotImplementedError

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        raise NotImplementedError

    def clean(self, step: int) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory, exist_ok=True)

    def close(self) -> None:
        pass


class RawMethod(Method):
    name = "raw"

    def __init__(self, directory: str, state: dict[str, Any]) -> None:
        super().__init__(directory, state)
        self.host = [np.asarray(x) for x in state.values()]

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, f"raw_{step}.bin")

    def save(self, step: int, probe: Any) -> None:
        with probe.span("raw_write"):
            with open(self._path(step), "wb") as f:
                for array in self.host:
                    f.write(memoryview(array).cast("B"))
                f.flush()
                os.fsync(f.fileno())

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        # Allocated, not touched: the page faults of the output are part of the read,
        # as they are for every other method.
        out = [np.empty_like(a) for a in self.host]
        before_read()
        with probe.span("raw_read"):
            with open(self._path(step), "rb", buffering=0) as f:
                for array in out:
                    view = memoryview(array).cast("B")
                    while view:
                        n = f.readinto(view)
                        if not n:
                            raise EOFError(self._path(step))
                        view = view[n:]
        del out


class LearnaxMethod(Method):
    name = "learnax"

    def __init__(self, directory: str, state: dict[str, Any]) -> None:
        super().__init__(directory, state)
        from learnax.checkpoint import Checkpointer

        self.ckpt = Checkpointer(directory, "sync", save_every=None, checkpoint_every=None)

    def save(self, step: int, probe: Any) -> None:
        with probe.span("learnax_save"):
            path = self.ckpt.save_checkpoint(self.state, step=step)
        if path is None:
            raise RuntimeError("learnax save_checkpoint returned None (see its log)")

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        import jax

        before_read()
        with probe.span("learnax_load"):
            loaded = self.ckpt.load_checkpoint(step)
        del loaded
        before_read()
        with probe.span("learnax_load_jax"):
            loaded = self.ckpt.load_checkpoint(step, target=self.state)
            jax.block_until_ready(loaded["state"])
        del loaded

    def clean(self, step: int) -> None:
        shutil.rmtree(os.path.join(self.ckpt.checkpoint_dir, f"state_{step}"))


class LearnaxAsyncMethod(Method):
    name = "learnax_async"

    def __init__(self, directory: str, state: dict[str, Any]) -> None:
        super().__init__(directory, state)
        from learnax.checkpoint import Checkpointer

        self.ckpt = Checkpointer(
            directory, "async", save_every=None, checkpoint_every=None, async_save=True
        )

    def save(self, step: int, probe: Any) -> None:
        with probe.span("learnax_async_total"):
            with probe.span("learnax_async_block"):
                self.ckpt.save_checkpoint(self.state, step=step)
            with probe.span("learnax_async_wait"):
                self.ckpt.wait_until_finished()

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        pass  # the same files as the sync save: its load rows cover it

    def clean(self, step: int) -> None:
        shutil.rmtree(os.path.join(self.ckpt.checkpoint_dir, f"state_{step}"))

    def close(self) -> None:
        self.ckpt.close()


class OrbaxMethod(Method):
    name = "orbax"

    def __init__(self, directory: str, state: dict[str, Any]) -> None:
        super().__init__(directory, state)
        import jax
        import orbax.checkpoint as ocp

        self.checkpointer = ocp.StandardCheckpointer()
        self.abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

    def _path(self, step: int) -> str:
        return os.path.join(os.path.abspath(self.directory), f"orbax_{step}")

    def save(self, step: int, probe: Any) -> None:
        with probe.span("orbax_save_total"):
            with probe.span("orbax_save_block"):
                self.checkpointer.save(self._path(step), self.state)
            self.checkpointer.wait_until_finished()

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        import jax

        before_read()
        with probe.span("orbax_restore"):
            restored = self.checkpointer.restore(self._path(step), self.abstract)
            jax.block_until_ready(restored)
        del restored

    def clean(self, step: int) -> None:
        shutil.rmtree(self._path(step))

    def close(self) -> None:
        self.checkpointer.close()


class PickleMethod(Method):
    name = "pickle"
    fsync = True  # the original learnax never fsynced: bench/nested.py times both

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, f"{self.name}_{step}.pyd")

    def save(self, step: int, probe: Any) -> None:
        import jax

        with probe.span(f"{self.name}_save"):
            # What the original learnax wrote: the whole dict, pickled.
            record = {"state": jax.device_get(self.state), "step": step, "time": time.time()}
            with open(self._path(step), "wb") as f:
                pickle.dump(record, f)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            del record

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        before_read()
        with probe.span("pickle_load"):
            with open(self._path(step), "rb") as f:
                loaded = pickle.load(f)
        del loaded

    def clean(self, step: int) -> None:
        os.remove(self._path(step))


class SafetensorsMethod(Method):
    name = "safetensors"

    def _path(self, step: int) -> str:
        return os.path.join(self.directory, f"state_{step}.safetensors")

    def save(self, step: int, probe: Any) -> None:
        import jax
        from safetensors.numpy import save_file

        with probe.span("safetensors_save"):
            save_file(jax.device_get(self._tensors()), self._path(step))
            _fsync_path(self._path(step))

    def _tensors(self) -> Any:
        """What ``save_file`` is given: a flat dict of arrays (the state of case (a),
        (b) and (c) already is one)."""
        return self.state

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        from safetensors.numpy import load_file

        before_read()
        with probe.span("safetensors_load"):
            loaded = load_file(self._path(step))
        del loaded

    def clean(self, step: int) -> None:
        os.remove(self._path(step))


METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        RawMethod,
        LearnaxMethod,
        LearnaxAsyncMethod,
        OrbaxMethod,
        PickleMethod,
        SafetensorsMethod,
    )
}
PEER_MODULES = {"orbax": "orbax.checkpoint", "pickle": "pickle", "safetensors": "safetensors.numpy"}


def learnax_has_async() -> bool:
    from learnax.checkpoint import Checkpointer

    return "async_save" in inspect.signature(Checkpointer).parameters


def quiet_logging() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("learnax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    with contextlib.suppress(ImportError):
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)


# ------------------------------------------------------------------ page cache


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def can_drop_caches() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


# ------------------------------------------------------------------ timing run


@dataclass
class SizeResult:
    size: Size
    times: dict[str, list[float]] = field(default_factory=dict)
    rss_mib: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def time_size(
    size: Size, methods: list[str], root: str, reps: int, warmup: int, cold: bool
) -> SizeResult:
    result = SizeResult(size)
    state = make_state(size)
    before_read = drop_caches if cold else (lambda: None)
    instances = [METHODS[m](os.path.join(root, f"{size.key}-{m}"), state) for m in methods]
    measured = dict.fromkeys(methods, 0)
    limit = dict.fromkeys(methods, reps)
    for rep in range(warmup + reps):
        is_warmup = rep < warmup
        step = rep + 1
        # Rotating the order spreads whatever one method leaves behind over all others.
        shift = rep % len(instances)
        for method in instances[shift:] + instances[:shift]:
            if is_warmup and limit[method.name] < reps:
                continue
            if not is_warmup and measured[method.name] >= limit[method.name]:
                continue
            watch = Stopwatch()
            start = time.perf_counter()
            # Flush what earlier methods left for the disk (deleted files, journal), so
            # that this save's fsync pays only for its own writes.
            os.sync()
            gc.collect()
            method.save(step, watch)
            gc.collect()
            method.load(step, watch, before_read)
            method.clean(step)
            took = time.perf_counter() - start
            if not is_warmup:
                measured[method.name] += 1
                for key, seconds in watch.seconds.items():
                    result.times.setdefault(key, []).append(seconds)
            if took > SLOW_REP_S and limit[method.name] > SLOW_REP_CAP:
                limit[method.name] = SLOW_REP_CAP
                result.notes.append(
                    f"{method.name}: one rep took {took:.0f} s (> {SLOW_REP_S:.0f} s), "
                    f"so at most {SLOW_REP_CAP} measured reps"
                )
    for method in instances:
        method.close()
    return result


def noop_maybe_save_us(root: str) -> dict[str, float]:
    """Median time of ``maybe_save_checkpoints`` on a step where nothing is due."""
    from learnax.checkpoint import Checkpointer

    ckpt = Checkpointer(root, "noop", save_every=1000, checkpoint_every=5000)
    state = make_state(Size("noop", 8, (64, 64)))
    clock = time.perf_counter_ns
    calls = np.empty(NOOP_CALLS, dtype=np.int64)
    empty = np.empty(NOOP_CALLS, dtype=np.int64)
    for i in range(NOOP_CALLS):
        t0 = clock()
        ckpt.maybe_save_checkpoints(state, 1)
        calls[i] = clock() - t0
    for i in range(NOOP_CALLS):
        t0 = clock()
        empty[i] = clock() - t0
    return {
        "median_us": float(np.median(calls)) / 1000,
        "min_us": float(calls.min()) / 1000,
        "timer_overhead_us": float(np.median(empty)) / 1000,
    }


# ------------------------------------------------------------------ RSS subprocess


def rss_child(config: dict[str, Any]) -> dict[str, float]:
    """Runs in a fresh interpreter: the peak extra RSS of one method's operations."""
    quiet_logging()
    import jax  # noqa: F401  (imported before the baseline, like the state)

    cls = METHODS[config["method"]]
    root = config["dir"]
    # A tiny save + load first, so that one-time setup (thread pools, lazy imports)
    # is not charged to the measured operation.
    tiny = make_state(Size("tiny", 2, (8, 8)), seed=1)
    warm = cls(os.path.join(root, "warmup"), tiny)
    warm.save(1, Stopwatch())
    warm.load(1, Stopwatch(), lambda: None)
    warm.clean(1)
    warm.close()
    del warm, tiny

    state = make_state(SIZES[config["size"]])
    method = cls(os.path.join(root, "measured"), state)
    probe = PeakRss()
    method.save(1, probe)
    method.load(1, probe, lambda: None)
    method.clean(1)
    method.close()
    return probe.extra_mib


def measure_rss(size: Size, method: str, root: str) -> tuple[dict[str, float], str | None]:
    directory = tempfile.mkdtemp(prefix=f"rss-{size.key}-{method}-", dir=root)
    config = {"size": size.key, "method": method, "dir": directory}
    try:
        done = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--rss-child", json.dumps(config)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {}, f"RSS of {method} not measured: subprocess failed ({tail})"
    return json.loads(done.stdout.strip().splitlines()[-1]), None


# ------------------------------------------------------------------ report


def _bytes(n: int) -> str:
    return f"{n // MiB} MiB" if n % MiB == 0 else f"{n // KiB} KiB"


def _seconds(s: float) -> str:
    return f"{s:.0f}" if s >= 100 else f"{s:#.3g}"


def table_rows(result: SizeResult, reps: int) -> list[list[str]]:
    median = {k: statistics.median(v) for k, v in result.times.items() if v}
    raw = {"write": median.get("raw_write"), "read": median.get("raw_read")}
    rows = []
    for row in ROWS:
        if row.key not in median:
            continue
        m = median[row.key]
        n = len(result.times[row.key])
        ref = next((k for k in row.vs if k in median), None)
        rss = result.rss_mib.get(row.key)
        rows.append(
            [
                row.label,
                f"{n}" if n == reps else f"{n}!",
                _seconds(m),
                _seconds(min(result.times[row.key])),
                f"{result.size.total_bytes / m / 1e9:.2f}",
                f"{m / raw[row.kind]:.2f}" if raw[row.kind] else "-",
                f"{m / median[ref]:.2f}" if ref else "-",
                f"{rss:.0f}" if rss is not None else "-",
            ]
        )
    return rows


HEADERS = ["operation", "n", "median s", "min s", "GB/s", "x raw", "vs learnax", "+RSS MiB"]


def format_table(rows: list[list[str]], markdown: bool, headers: list[str] = HEADERS) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |"]
        lines.append("|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|")
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join([first] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def summary(result: SizeResult) -> str:
    median = {k: statistics.median(v) for k, v in result.times.items() if v}

    def ratio(a: str, b: str) -> str:
        return f"{median[a] / median[b]:.2f}" if a in median and b in median else "n/a"

    return (
        f"learnax save / raw write = {ratio('learnax_save', 'raw_write')}, "
        f"learnax load / raw read = {ratio('learnax_load', 'raw_read')}, "
        f"async blocking / sync save = {ratio('learnax_async_block', 'learnax_save')}"
    )


def machine_info(directory: str) -> dict[str, str]:
    info = {"cpu": "?", "cores": str(os.cpu_count()), "ram": "?", "filesystem": "?"}
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor() or "?"
    with contextlib.suppress(OSError, RuntimeError):
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        info["ram"] = f"{kib / 1024**2:.1f} GiB"
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        out = subprocess.run(["df", "-T", directory], capture_output=True, text=True).stdout
        device, fstype = out.strip().splitlines()[-1].split()[:2]
        info["filesystem"] = f"{fstype} on {device}"
    return info


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for dist in ("jax", "jaxlib", "numpy", "orbax-checkpoint", "safetensors", "learnax"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = "not installed"
    return found


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="a,b,c", help="which states: a,b,c (default all)")
    parser.add_argument("--reps", type=int, default=5, help="measured reps (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed reps first (default 1)")
    parser.add_argument("--dir", help="where to write (default: a fresh temp dir, removed)")
    parser.add_argument(
        "--peers", default="orbax,pickle,safetensors", help="peers to measure (default all)"
    )
    parser.add_argument("--cold", action="store_true", help="drop the page cache before reads")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--json", metavar="FILE", help="also write all raw timings here")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rss_child is None:
        unknown = set(args.sizes.split(",")) - set(SIZES)
        if unknown:
            parser.error(f"unknown sizes {sorted(unknown)}; choose from a,b,c")
        unknown = set(filter(None, args.peers.split(","))) - set(PEER_MODULES)
        if unknown:
            parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(PEER_MODULES)}")
        if args.reps < 1:
            parser.error("--reps must be >= 1")
    return args


def choose_methods(
    peers: list[str], modules: dict[str, str] = PEER_MODULES
) -> tuple[list[str], list[str]]:
    """The methods to time (the peers whose module imports) and a line for each left
    out; ``modules`` names the module each peer needs."""
    methods, skipped = ["raw", "learnax"], []
    if learnax_has_async():
        methods.append("learnax_async")
    else:
        skipped.append("learnax async: skipped (this Checkpointer has no async_save yet)")
    for peer in peers:
        try:
            importlib.import_module(modules[peer])
        except ImportError as e:
            skipped.append(f"{peer}: skipped (cannot import {modules[peer]}: {e})")
        else:
            methods.append(peer)
    return methods, skipped


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.rss_child is not None:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return
    quiet_logging()
    import jax

    started = time.perf_counter()
    if args.cold:
        try:
            drop_caches()
        except OSError as e:
            sys.exit(f"--cold needs to write /proc/sys/vm/drop_caches (root): {e}")
    root = args.dir or tempfile.mkdtemp(prefix="learnax-bench-")
    made_root = args.dir is None
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=root)
    methods, skipped = choose_methods(list(filter(None, args.peers.split(","))))
    out = print

    machine = machine_info(work)
    out("learnax checkpoint benchmark")
    out(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; "
        f"--dir {root}: {machine['filesystem']}"
    )
    out("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    out(f"jax device: {jax.devices()[0]}")
    if args.cold:
        page_cache = "cold (dropped with drop_caches before every read of every method)"
    else:
        page_cache = "warm (every file is read right after it is written"
        page_cache += "; --cold drops it before each read)" if can_drop_caches() else ")"
    out(f"page cache: {page_cache}")
    out(f"reps: {args.reps} measured after {args.warmup} warm-up; medians, min as well")
    for line in skipped:
        out(line)
    out("")

    report: dict[str, Any] = {
        "machine": machine,
        "versions": versions(),
        "config": {
            "reps": args.reps,
            "warmup": args.warmup,
            "cold": args.cold,
            "methods": methods,
            "skipped": skipped,
        },
        "sizes": {},
    }
    try:
        for key in args.sizes.split(","):
            size = SIZES[key]
            result = time_size(size, methods, work, args.reps, args.warmup, args.cold)
            if not args.no_rss:
                for method in methods:
                    extra, problem = measure_rss(size, method, work)
                    result.rss_mib.update(extra)
                    if problem:
                        result.notes.append(problem)
            title = f"({key}) {size.describe()}"
            out(f"### {title}\n" if args.markdown else title)
            out(format_table(table_rows(result, args.reps), args.markdown))
            for note in result.notes:
                out(f"note: {note}")
            out(("\n" if args.markdown else "") + summary(result))
            out("")
            report["sizes"][key] = {
                "description": size.describe(),
                "bytes": size.total_bytes,
                "times_s": result.times,
                "rss_extra_mib": result.rss_mib,
                "notes": result.notes,
            }
        noop = noop_maybe_save_us(work)
        report["maybe_save_checkpoints_noop"] = noop
        out(
            f"maybe_save_checkpoints on a step with nothing due: median "
            f"{noop['median_us']:.2f} us, min {noop['min_us']:.2f} us over {NOOP_CALLS:,} "
            f"calls, each timed (timer overhead {noop['timer_overhead_us']:.2f} us included)"
        )
    finally:
        shutil.rmtree(root if made_root else work, ignore_errors=True)
    finish_report(report, started, args.json, out, "raw timings")


def finish_report(
    report: dict[str, Any],
    started: float,
    json_path: str | None,
    out: Callable[[str], None],
    what: str,
) -> None:
    """Print the total run time; write ``report`` (with it) to ``json_path`` if given."""
    report["elapsed_s"] = time.perf_counter() - started
    out(f"total run time: {report['elapsed_s']:.0f} s")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        out(f"{what} written to {json_path}")


if __name__ == "__main__":
    main()
