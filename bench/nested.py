"""How learnax does on a nested training state, at scale, and with a frozen subtree.

Run by hand: ``python bench/nested.py`` (see ``bench/README.md``). In one run it times,
on a transformer's parameters with their optax Adam state (~4,000 jax leaves, 62.5 MiB,
leaves from 4 bytes to 4 MiB), learnax's save, load, load into a target and async save
against a plain write+fsync and read of the same bytes and against pickle (what the
original learnax did), ``safetensors.numpy`` and Orbax; then how save and load scale
with the number of leaves (1k to 100k) and with the bytes (64 MiB to 2 GiB); then what
a frozen subtree passed through unchanged costs (incremental saves, bytes on disk, a
step where latest, numbered and best are all due). Each figure is printed beside its
goal. Only learnax's public API is used, so the script runs on any version of it.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from run import PEER_MODULES as RUN_PEER_MODULES
from run import (
    Method,
    MiB,
    OrbaxMethod,
    PickleMethod,
    SafetensorsMethod,
    Stopwatch,
    choose_methods,
    finish_report,
    format_table,
    machine_info,
    quiet_logging,
    versions,
)
from run import RawMethod as _RunRawMethod

GiB = 1024 * MiB
PEER_MODULES = {**RUN_PEER_MODULES, "pickle_nofsync": "pickle"}


# ------------------------------------------------------------------ states


def make_transformer_state(
    layers: int = 83, d: int = 64, vocab: int = 16384, seq: int = 4096, seed: int = 0
) -> dict[str, Any]:
    """Plain-dict transformer parameters and their Adam state after one update.

    Per layer: attention q/k/v/o kernels (d, d) with biases, two layer norms, an MLP
    up (d, 4d) and down (4d, d) with biases; plus token and position embeddings and a
    final layer norm. One Adam update with random gradients makes mu and nu non-zero.
    """
    import jax
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> Any:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)

    def dense(n_in: int, n_out: int) -> dict[str, Any]:
        return {"kernel": rand(n_in, n_out), "bias": rand(n_out)}

    def norm() -> dict[str, Any]:
        return {"scale": rand(d), "bias": rand(d)}

    params = {
        "embed": rand(vocab, d),
        "pos_embed": rand(seq, d),
        "layers": {
            f"layer_{i:03d}": {
                "attn": {name: dense(d, d) for name in ("q", "k", "v", "o")},
                "ln1": norm(),
                "ln2": norm(),
                "mlp": {"up": dense(d, 4 * d), "down": dense(4 * d, d)},
            }
            for i in range(layers)
        },
        "ln_f": norm(),
    }
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda p: rand(*p.shape), params)
    _, opt_state = optimizer.update(grads, opt_state, params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.array(0)}
    return jax.block_until_ready(state)


def make_uniform_state(leaves: int, total_bytes: int, seed: int = 0) -> dict[str, Any]:
    """``leaves`` float32 arrays of equal size, about ``total_bytes`` in all, in a dict
    three levels deep (10 x 10 x leaves/100)."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    size = max(1, total_bytes // leaves // 4)
    state: dict[str, Any] = {}
    for i in range(leaves):
        leaf = jnp.asarray(rng.standard_normal(size, dtype=np.float32))
        state.setdefault(f"a{i % 10}", {}).setdefault(f"b{i // 10 % 10}", {})[f"c{i // 100}"] = leaf
    return jax.block_until_ready(state)


def fresh_copy(state: Any) -> Any:
    """The same values in new jax arrays, as after a training step: learnax may skip
    arrays that are the very objects of its previous save, and these are not."""
    import jax
    import jax.numpy as jnp

    return jax.block_until_ready(jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def tree_stats(state: Any) -> tuple[int, int, int, int]:
    """Leaves, bytes, smallest and largest leaf bytes."""
    import jax

    sizes = [x.nbytes for x in jax.tree.leaves(state)]
    return len(sizes), sum(sizes), min(sizes), max(sizes)


def flat_named(state: Any) -> dict[str, Any]:
    import jax

    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def shape_dtype_tree(state: Any) -> Any:
    import jax

    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)


# ------------------------------------------------------------------ methods
#
# The method classes of run.py, on a nested state: every rep hands each method a fresh
# copy of the state (``set_state``) before its save.


class RawMethod(_RunRawMethod):
    """One file of the concatenated leaf bytes, written + fsynced and read back."""

    def __init__(self, directory: str, state: Any) -> None:
        Method.__init__(self, directory, state)
        self.set_state(state)

    def set_state(self, state: Any) -> None:
        import jax

        self.state = state
        self.host = [np.asarray(x) for x in jax.tree.leaves(state)]


class LearnaxMethod(Method):
    """``save_latest`` on one Checkpointer reused across reps, ``load_latest``."""

    name = "learnax"

    def __init__(self, directory: str, state: Any, target_load: bool = True) -> None:
        super().__init__(directory, state)
        from learnax.checkpoint import Checkpointer

        self.ckpt = Checkpointer(directory, "sync", save_every=None, checkpoint_every=None)
        self.target_load = target_load
        self.abstract = shape_dtype_tree(state)

    def save(self, step: int, probe: Any) -> None:
        with probe.span("learnax_save"):
            path = self.ckpt.save_latest(self.state, step=step)
        if path is None:
            raise RuntimeError("learnax save_latest returned None (see its log)")

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        import jax

        with probe.span("learnax_load"):
            loaded = self.ckpt.load_latest()
        if loaded is None or loaded["step"] != step:
            raise RuntimeError(f"learnax load_latest did not return step {step}")
        del loaded
        if self.target_load:
            with probe.span("learnax_load_target"):
                loaded = self.ckpt.load_latest(target=self.abstract)
                jax.block_until_ready(loaded["state"])
            del loaded

    def clean(self, step: int) -> None:
        pass  # the next save_latest replaces this one, as in a training run


class LearnaxAsyncMethod(LearnaxMethod):
    name = "learnax_async"

    def __init__(self, directory: str, state: Any) -> None:
        Method.__init__(self, directory, state)
        from learnax.checkpoint import Checkpointer

        self.ckpt = Checkpointer(
            directory, "async", save_every=None, checkpoint_every=None, async_save=True
        )

    def save(self, step: int, probe: Any) -> None:
        with probe.span("learnax_async_block"):
            self.ckpt.save_latest(self.state, step=step)
        self.ckpt.wait_until_finished()  # outside the timing

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        pass

    def close(self) -> None:
        self.ckpt.close()


class NestedOrbaxMethod(OrbaxMethod):
    def set_state(self, state: Any) -> None:
        self.state = state


class PickleNoFsyncMethod(PickleMethod):
    """The original learnax's pickle, without the fsync it never did."""

    name = "pickle_nofsync"
    fsync = False

    def load(self, step: int, probe: Any, before_read: Callable[[], None]) -> None:
        pass  # the same bytes as the pickle with fsync: its load row covers it


class FlatSafetensorsMethod(SafetensorsMethod):
    """``safetensors.numpy.save_file`` of the flattened leaves (named by tree path,
    flattened inside the timing), fsync; ``load_file`` (a flat dict back)."""

    def _tensors(self) -> Any:
        return flat_named(self.state)


METHODS: dict[str, Callable[[str, Any], Method]] = {
    "raw": RawMethod,
    "learnax": LearnaxMethod,
    "learnax_async": LearnaxAsyncMethod,
    "orbax": NestedOrbaxMethod,
    "pickle": PickleMethod,
    "pickle_nofsync": PickleNoFsyncMethod,
    "safetensors": FlatSafetensorsMethod,
}


def set_state(method: Method, state: Any) -> None:
    if hasattr(method, "set_state"):
        method.set_state(state)
    else:
        method.state = state


def time_methods(
    state: Any, methods: list[Method], reps: int, warmup: int, fresh: bool = True
) -> dict[str, list[float]]:
    """Every method saves, loads and cleans once per rep, in an order rotated from rep
    to rep, each save after an untimed ``os.sync()`` and with a fresh copy of ``state``
    (made once per rep, untimed). Returns the seconds of every span, warm-up left out."""
    times: dict[str, list[float]] = {}
    for rep in range(warmup + reps):
        step = rep + 1
        current = fresh_copy(state) if fresh else state
        for method in methods:
            set_state(method, current)
        shift = rep % len(methods)
        for method in methods[shift:] + methods[:shift]:
            watch = Stopwatch()
            os.sync()
            gc.collect()
            method.save(step, watch)
            gc.collect()
            method.load(step, watch, lambda: None)
            method.clean(step)
            if rep >= warmup:
                for key, seconds in watch.seconds.items():
                    times.setdefault(key, []).append(seconds)
        del current
    return times


# ------------------------------------------------------------------ report helpers


def _ms(s: float) -> str:
    ms = s * 1000
    return f"{ms:.0f}" if ms >= 100 else f"{ms:#.3g}"


def _median(times: dict[str, list[float]], key: str) -> float | None:
    return statistics.median(times[key]) if times.get(key) else None


class Goals:
    """Lines 'figure = value (goal ...): met / NOT met', kept for the JSON too."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def check(self, label: str, value: float | None, goal: str, met: bool | None) -> str:
        self.items.append({"figure": label, "value": value, "goal": goal, "met": met})
        if value is None:
            return f"{label}: not measured (goal {goal})"
        verdict = "met" if met else "NOT met"
        return f"{label} = {value:.2f} (goal {goal}): {verdict}"


# ------------------------------------------------------------------ part 1: nested


NESTED_ROWS = [
    # key, label, kind (the plain row it is compared with), learnax row it is compared with
    ("raw_write", "plain write + fsync", "raw_write", None),
    ("learnax_save", "learnax save_latest (sync)", "raw_write", None),
    ("pickle_save", "pickle dump + fsync", "raw_write", "learnax_save"),
    ("pickle_nofsync_save", "pickle dump, no fsync", "raw_write", "learnax_save"),
    ("safetensors_save", "safetensors save_file + fsync", "raw_write", "learnax_save"),
    ("orbax_save_block", "orbax save returns", "raw_write", "learnax_async_block"),
    ("orbax_save_total", "orbax save + wait_until_fin.", "raw_write", "learnax_save"),
    ("learnax_async_block", "learnax async: save_latest returns", "raw_write", None),
    ("raw_read", "plain read (readinto)", "raw_read", None),
    ("learnax_load", "learnax load_latest() -> numpy", "raw_read", None),
    ("pickle_load", "pickle load", "raw_read", "learnax_load"),
    ("safetensors_load", "safetensors load_file (flat)", "raw_read", "learnax_load"),
    ("learnax_load_target", "learnax load_latest(target=SDS)", "raw_read", None),
    ("orbax_restore", "orbax restore (abstract)", "raw_read", "learnax_load_target"),
]


def nested_part(
    root: str, reps: int, warmup: int, peers: list[str], out: Callable[[str], None]
) -> dict[str, Any]:

    state = make_transformer_state()
    leaves, nbytes, smallest, largest = tree_stats(state)
    out(
        f"## (1-4) nested transformer + optax Adam state: 83 layers, d=64, vocab 16384, "
        f"seq 4096: {leaves:,} jax leaves, {nbytes:,} bytes ({nbytes / MiB:.2f} MiB), "
        f"leaves of {smallest:,} B to {largest / MiB:.0f} MiB"
    )
    names, skipped = choose_methods(peers, PEER_MODULES)
    methods = [METHODS[n](os.path.join(root, f"nested-{n}"), state) for n in names]
    # A peer that fails on this state (Orbax on a jax it does not support) is reported
    # and dropped, not allowed to stop the run.
    for method in list(methods):
        try:
            time_methods(state, [method], reps=0, warmup=1)
        except Exception as e:  # noqa: BLE001
            skipped.append(f"{method.name}: failed on this state ({type(e).__name__}: {e})")
            methods.remove(method)
    # That pass was each method's warm-up rep.
    times = time_methods(state, methods, reps, max(0, warmup - 1))
    for method in methods:
        method.close()
    for line in skipped:
        out(line)

    median = {k: statistics.median(v) for k, v in times.items() if v}
    rows = []
    for key, label, kind, vs in NESTED_ROWS:
        if key not in median:
            continue
        m = median[key]
        rows.append(
            [
                label,
                str(len(times[key])),
                _ms(m),
                _ms(min(times[key])),
                f"{nbytes / m / 1e9:.2f}",
                f"{m / median[kind]:.2f}" if kind in median else "-",
                f"{m / median[vs]:.2f}" if vs in median else "-",
            ]
        )
    headers = ["operation", "n", "median ms", "min ms", "GB/s", "x plain", "vs learnax"]
    out(format_table(rows, markdown=False, headers=headers))

    def ratio(a: str, b: str) -> float | None:
        return median[a] / median[b] if a in median and b in median else None

    def le(value: float | None, limit: float) -> bool | None:
        return None if value is None else value <= limit

    def faster(peer: str, mine: str) -> tuple[float | None, bool | None]:
        r = ratio(peer, mine)
        return r, None if r is None else r > 1

    goals = Goals()
    lines = [
        goals.check(
            "save: learnax / plain write+fsync",
            r := ratio("learnax_save", "raw_write"),
            "<= 1.5",
            le(r, 1.5),
        )
    ]
    for peer, label in [
        ("pickle_save", "pickle+fsync"),
        ("pickle_nofsync_save", "pickle, no fsync"),
        ("safetensors_save", "safetensors+fsync"),
    ]:
        r, ok = faster(peer, "learnax_save")
        lines.append(goals.check(f"save: {label} / learnax", r, "> 1", ok))
    r = ratio("learnax_load", "raw_read")
    lines.append(goals.check("load: learnax / plain read", r, "<= 2", le(r, 2)))
    for peer, label in [("pickle_load", "pickle"), ("safetensors_load", "safetensors")]:
        r, ok = faster(peer, "learnax_load")
        lines.append(goals.check(f"load: {label} / learnax", r, "> 1", ok))
    r = ratio("learnax_load_target", "raw_read")
    lines.append(goals.check("target load: learnax / plain read", r, "<= 3", le(r, 3)))
    r = ratio("learnax_async_block", "learnax_save")
    lines.append(goals.check("async: save_latest blocking / sync save", r, "<= 0.10", le(r, 0.10)))
    if "orbax_save_total" in median:
        lines.append(
            f"(orbax: save+wait / learnax save = {ratio('orbax_save_total', 'learnax_save'):.2f}, "
            f"restore / learnax target load = "
            f"{ratio('orbax_restore', 'learnax_load_target'):.2f})"
        )
    out("")
    for line in lines:
        out(line)
    out("")
    return {
        "leaves": leaves,
        "bytes": nbytes,
        "times_s": times,
        "skipped": skipped,
        "goals": goals.items,
    }


# ------------------------------------------------------------------ part 2: scaling


def scaling_part(
    root: str, reps: int, warmup: int, quick: bool, out: Callable[[str], None]
) -> dict[str, Any]:
    configs = [(1_000, 64 * MiB), (4_000, 64 * MiB), (10_000, 64 * MiB)]
    notes = []
    if quick:
        notes.append("--quick: 100k leaves and 2 GiB skipped")
    else:
        configs.append((100_000, 64 * MiB))
    configs += [(4_000, 512 * MiB)]
    if not quick:
        free, why = _room_for(2 * GiB, root)
        if free:
            configs.append((4_000, 2 * GiB))
        else:
            notes.append(f"2 GiB skipped: {why}")
    out("## (5) scaling: learnax save_latest / load_latest() against the plain limit")
    out(
        "uniform float32 leaves in a dict 3 levels deep; by leaves at ~64 MiB in all, "
        "by bytes at 4,000 leaves"
    )
    for note in notes:
        out(note)
    results = []
    rows = []
    for leaves, total in configs:
        state = make_uniform_state(leaves, total)
        n, nbytes, _, _ = tree_stats(state)
        directory = os.path.join(root, f"scale-{leaves}-{total}")
        methods = [
            RawMethod(directory + "-raw", state),
            LearnaxMethod(directory + "-learnax", state, target_load=False),
        ]
        times = time_methods(state, methods, reps, warmup)
        for method in methods:
            method.close()
        del state, methods
        shutil.rmtree(directory + "-raw", ignore_errors=True)
        shutil.rmtree(directory + "-learnax", ignore_errors=True)
        med = {k: statistics.median(v) for k, v in times.items()}
        results.append({"leaves": n, "bytes": nbytes, "times_s": times})
        rows.append(
            [
                f"{n:,}",
                f"{nbytes / MiB:.1f}",
                f"{nbytes // n:,}",
                _ms(med["raw_write"]),
                _ms(med["learnax_save"]),
                f"{med['learnax_save'] / med['raw_write']:.2f}",
                f"{med['learnax_save'] / n * 1e6:.1f}",
                _ms(med["raw_read"]),
                _ms(med["learnax_load"]),
                f"{med['learnax_load'] / med['raw_read']:.2f}",
                f"{med['learnax_load'] / n * 1e6:.1f}",
            ]
        )
        gc.collect()
    headers = [
        "leaves",
        "MiB",
        "B/leaf",
        "plain wr ms",
        "save ms",
        "x plain",
        "save us/leaf",
        "plain rd ms",
        "load ms",
        "x plain",
        "load us/leaf",
    ]
    out(format_table(rows, markdown=False, headers=headers))
    out("")
    return {"configs": results, "notes": notes}


def _room_for(nbytes: int, root: str) -> tuple[bool, str]:
    """Whether RAM (5x: state, its fresh copy, loaded copy, plain read, slack) and disk
    (3x: plain file, checkpoint, slack) hold a state of ``nbytes``."""
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    disk = shutil.disk_usage(root).free
    if avail < 5 * nbytes:
        return False, f"{avail / GiB:.1f} GiB of RAM available, {5 * nbytes / GiB:.0f} needed"
    if disk < 3 * nbytes:
        return False, f"{disk / GiB:.1f} GiB free on disk, {3 * nbytes / GiB:.0f} needed"
    return True, ""


def plot_scaling(scaling: dict[str, Any], path: str, out: Callable[[str], None]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        out(f"--plot {path}: matplotlib is not installed, no plot")
        return
    configs = scaling["configs"]
    by_leaves = sorted(
        (c for c in configs if 60 * MiB <= c["bytes"] <= 68 * MiB), key=lambda c: c["leaves"]
    )
    by_bytes = sorted((c for c in configs if c["leaves"] == 4_000), key=lambda c: c["bytes"])
    series = [
        ("learnax_save", "learnax save", "C0", "-"),
        ("raw_write", "plain write+fsync", "C0", ":"),
        ("learnax_load", "learnax load", "C1", "-"),
        ("raw_read", "plain read", "C1", ":"),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, group, x_of, xlabel in [
        (axes[0], by_leaves, lambda c: c["leaves"], "leaves (~64 MiB in all)"),
        (axes[1], by_bytes, lambda c: c["bytes"] / MiB, "MiB (4,000 leaves)"),
    ]:
        for key, label, color, style in series:
            xs = [x_of(c) for c in group]
            ys = [statistics.median(c["times_s"][key]) * 1000 for c in group]
            ax.plot(xs, ys, style, marker="o", color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median ms")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title("time vs leaves")
    axes[1].set_title("time vs bytes")
    axes[0].legend(fontsize=8)
    fig.suptitle("learnax against the plain limit (2-core shared VM, warm page cache)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    out(f"plot written to {path}")


# ------------------------------------------------------------------ part 3: frozen subtree


def disk_bytes(directory: str) -> int:
    """Allocated bytes under ``directory``, each inode once (hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for parent, dirs, files in os.walk(directory):
        for name in dirs + files:
            st = os.lstat(os.path.join(parent, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def make_frozen_state(frozen_bytes: int, trainable_bytes: int) -> tuple[Any, Any]:
    """A frozen subtree (4 MiB leaves) and a trainable one (64 KiB leaves)."""
    frozen = make_uniform_state(max(1, frozen_bytes // (4 * MiB)), frozen_bytes, seed=1)
    trainable = make_uniform_state(max(1, trainable_bytes // (64 * 1024)), trainable_bytes, seed=2)
    return frozen, trainable


def step_state(frozen: Any, trainable: Any, step: int) -> dict[str, Any]:
    """The state at ``step``: the SAME frozen arrays, new trainable arrays."""
    import jax
    import jax.numpy as jnp

    trainable = jax.block_until_ready(jax.tree.map(lambda x: x + 1e-3 * step, trainable))
    return {"frozen": frozen, "trainable": trainable, "step": jnp.array(step)}


def dedup_part(root: str, reps: int, frozen_mib: int, out: Callable[[str], None]) -> dict[str, Any]:
    from learnax.checkpoint import Checkpointer

    frozen, trainable = make_frozen_state(frozen_mib * MiB, MiB)
    _, one_state, _, _ = tree_stats(step_state(frozen, trainable, 0))
    f_leaves = tree_stats(frozen)[0]
    t_leaves = tree_stats(trainable)[0]
    out(
        f"## (6) frozen subtree: {frozen_mib} MiB in {f_leaves} frozen leaves (the same "
        f"jax.Array objects every step) + 1 MiB in {t_leaves} trainable leaves (new every "
        f"step) + step; {one_state:,} bytes per state"
    )
    steps = 4
    first: list[float] = []
    later: list[float] = []
    on_disk: list[int] = []
    for rep in range(reps):
        ckpt = Checkpointer(
            root, f"dedup-{rep}", save_every=None, checkpoint_every=1, max_to_keep=None
        )
        for step in range(1, steps + 1):
            state = step_state(frozen, trainable, step)
            os.sync()
            t0 = time.perf_counter()
            saved = ckpt.maybe_save_checkpoints(state, step)
            took = time.perf_counter() - t0
            if "numbered" not in saved:
                raise RuntimeError(f"numbered checkpoint of step {step} not saved")
            (first if step == 1 else later).append(took)
        on_disk.append(disk_bytes(ckpt.checkpoint_dir))
        ckpt.close()
        shutil.rmtree(os.path.join(root, f"dedup-{rep}"), ignore_errors=True)

    # A step where latest, numbered and best are all due, against one save_latest of
    # the same state; both on a Checkpointer that has saved the step before.
    all_due: list[float] = []
    latest_only: list[float] = []
    all_due_first: list[float] = []
    latest_first: list[float] = []
    for rep in range(reps):
        both = Checkpointer(
            root,
            f"alldue-{rep}",
            save_every=1,
            checkpoint_every=1,
            max_to_keep=2,
            keep_best=True,
        )
        only = Checkpointer(root, f"latest-{rep}", save_every=None, checkpoint_every=None)
        for step in range(1, steps + 1):
            state = step_state(frozen, trainable, step)
            pair = [("all", both), ("latest", only)]
            for kind, ckpt in pair if (rep + step) % 2 else pair[::-1]:
                os.sync()
                t0 = time.perf_counter()
                if kind == "all":
                    saved = ckpt.maybe_save_checkpoints(state, step, {"val/loss": 1.0 / step})
                    if set(saved) != {"latest", "numbered", "best"}:
                        raise RuntimeError(f"step {step}: saved only {sorted(saved)}")
                elif ckpt.save_latest(state, step) is None:
                    raise RuntimeError("save_latest returned None")
                took = time.perf_counter() - t0
                if kind == "all":
                    (all_due_first if step == 1 else all_due).append(took)
                else:
                    (latest_first if step == 1 else latest_only).append(took)
        both.close()
        only.close()
        shutil.rmtree(os.path.join(root, f"alldue-{rep}"), ignore_errors=True)
        shutil.rmtree(os.path.join(root, f"latest-{rep}"), ignore_errors=True)

    med = statistics.median

    def row(label: str, times: list[float], against: list[float] | None) -> list[str]:
        ratio = "-" if against is None else f"{med(times) / med(against):.2f}"
        return [label, str(len(times)), _ms(med(times)), _ms(min(times)), ratio]

    rows = [
        row("first save (full)", first, first),
        row("later saves (incremental)", later, first),
        row("save_latest, step 1", latest_first, None),
        row("latest+numbered+best due, step 1", all_due_first, latest_first),
        row("save_latest, steps 2-4", latest_only, None),
        row("latest+numbered+best due, steps 2-4", all_due, latest_only),
    ]
    out(format_table(rows, False, ["operation", "n", "median ms", "min ms", "ratio"]))
    disk = med(on_disk)
    out(
        f"bytes on disk of {steps} numbered checkpoints (st_blocks*512, each inode once): "
        f"{disk:,} = {disk / one_state:.2f} states"
    )
    goals = Goals()
    out("")
    for label, value, limit in [
        ("incremental / first full save", med(later) / med(first), 0.15),
        (f"{steps} numbered checkpoints on disk / one state", disk / one_state, 1.3),
        ("all due / one save_latest (steps 2-4)", med(all_due) / med(latest_only), 1.3),
    ]:
        out(goals.check(label, value, f"<= {limit}", value <= limit))
    out("")
    return {
        "frozen_bytes": frozen_mib * MiB,
        "state_bytes": one_state,
        "first_save_s": first,
        "incremental_save_s": later,
        "disk_bytes_4_numbered": on_disk,
        "all_due_s": all_due,
        "save_latest_s": latest_only,
        "all_due_step1_s": all_due_first,
        "save_latest_step1_s": latest_first,
        "goals": goals.items,
    }


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="nested,scaling,dedup", help="which parts to run")
    parser.add_argument("--reps", type=int, default=5, help="measured reps (default 5)")
    parser.add_argument("--scale-reps", type=int, default=3, help="reps of scaling (3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed reps first (default 1)")
    parser.add_argument("--quick", action="store_true", help="skip 100k leaves and 2 GiB")
    parser.add_argument("--frozen-mib", type=int, default=256, help="frozen subtree MiB")
    parser.add_argument(
        "--peers", default="orbax,pickle,pickle_nofsync,safetensors", help="peers to measure"
    )
    parser.add_argument("--dir", help="where to write (default: a fresh temp dir, removed)")
    parser.add_argument("--json", metavar="FILE", help="also write all timings here")
    parser.add_argument("--plot", metavar="PNG", help="plot the scaling part here")
    args = parser.parse_args(argv)
    unknown = set(args.parts.split(",")) - {"nested", "scaling", "dedup"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}")
    unknown = set(filter(None, args.peers.split(","))) - set(PEER_MODULES)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(PEER_MODULES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logging()
    import jax

    started = time.perf_counter()
    root = args.dir or tempfile.mkdtemp(prefix="learnax-nested-")
    made_root = args.dir is None
    os.makedirs(root, exist_ok=True)
    work = tempfile.mkdtemp(prefix="run-", dir=root)
    parts = args.parts.split(",")
    out = print
    machine = machine_info(work)
    out("learnax nested / scaling / frozen-subtree benchmark")
    out(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram']} RAM; "
        f"--dir {root}: {machine['filesystem']}"
    )
    out("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    out(f"jax device: {jax.devices()[0]}; page cache warm (reads right after writes)")
    out(f"reps: {args.reps} (scaling {args.scale_reps}) after {args.warmup} warm-up; medians")
    out("")
    report: dict[str, Any] = {"machine": machine, "versions": versions(), "args": vars(args)}
    try:
        if "nested" in parts:
            peers = list(filter(None, args.peers.split(",")))
            report["nested"] = nested_part(work, args.reps, args.warmup, peers, out)
        if "scaling" in parts:
            report["scaling"] = scaling_part(work, args.scale_reps, args.warmup, args.quick, out)
            if args.plot:
                plot_scaling(report["scaling"], args.plot, out)
        if "dedup" in parts:
            report["dedup"] = dedup_part(work, max(1, args.scale_reps), args.frozen_mib, out)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(root if made_root else work, ignore_errors=True)
    finish_report(report, started, args.json, out, "timings")


if __name__ == "__main__":
    main()
