"""One process of a multi-host test (run by tests/test_multihost.py, not collected).

    python tests/multihost_worker.py <scenario> <out_dir> <process_id> <params json>

The parent starts N of these with ``XLA_FLAGS=--xla_force_host_platform_device_count=D``
in their environment. With ``num_processes`` > 1 in the params, each joins the others
through ``jax.distributed.initialize`` on 127.0.0.1 (gloo CPU collectives). The
scenario runs, and its findings go to ``<out_dir>/result-<process_id>.json``: what the
calls returned, bytes read or written (``/proc/self/io``), and, for every restored
leaf, its type, sharding and a digest of the data of each shard this process holds.
The parent recomputes the expected data (``expected_array``) and compares. An
exception is reported in the result under ``"error"`` (exit status 1).

The deterministic data and the digests are defined here (numpy only: the parent
imports this module after its own jax import, the worker sets up jax in ``main``).
"""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import signal
import sys
import time
import traceback

import ml_dtypes
import numpy as np

RUN = "run"
KILL_AFTER = 9 << 20  # bytes of its data file process 1 writes before it dies ("kill")
STEP = 10  # the step of the checkpoint saved by the "save" scenario

# The saved state: (path, shape, dtype, PartitionSpec over the save mesh (2, 2) with
# axes ("x", "y"); None for a numpy leaf). All 2-D sharded arrays are 2 MiB or more,
# the two big ones 16 MiB, so a process needing part of one reads part of it.
LEAVES = [
    (("params", "sharded"), (4096, 1024), "float32", (("x", "y"),)),  # rows over 4 devices
    (("params", "bf16"), (4096, 2048), "bfloat16", ("x",)),  # rows over processes
    (("replicated",), (256, 256), "float32", ()),  # on every device
    (("partial", "rows"), (1024, 512), "float32", ("x", None)),  # replicated along y
    (("partial", "grid"), (1024, 1024), "float32", ("x", "y")),  # 2-D sharded
    (("host",), (3000,), "int32", None),  # a numpy leaf
]


def dtype_of(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# The leaves sharded over processes at save time, and their bytes.
SHARDED = [path for path, _, _, spec in LEAVES if spec]
SHARDED_BYTES = sum(
    int(np.prod(shape)) * dtype_of(dtype).itemsize
    for path, shape, dtype, _ in LEAVES
    if path in SHARDED
)


def expected_array(path: tuple[str, ...], seed: int = 0, scale: int = 1) -> np.ndarray:
    """The full value of leaf ``path`` of ``expected_state(seed, scale=scale)``: every
    dimension divided by ``scale`` (a small state for many saves)."""
    (index,) = [i for i, leaf in enumerate(LEAVES) if leaf[0] == path]
    _, shape, dtype, _ = LEAVES[index]
    shape = tuple(max(1, n // scale) for n in shape)
    rng = np.random.default_rng([seed, index])
    if dtype == "int32":
        return rng.integers(-(2**31), 2**31 - 1, size=shape, dtype=np.int32)
    return rng.standard_normal(shape, dtype=np.float32).astype(dtype_of(dtype))


def nest(pairs) -> dict:
    """{path tuple: value} -> nested dicts."""
    out: dict = {}
    for path, value in pairs:
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def expected_state(seed: int = 0, step: int = STEP, scale: int = 1) -> dict:
    """The state as numpy arrays (and the int step), as a load without target returns it."""
    state = nest((path, expected_array(path, seed, scale)) for path, *_ in LEAVES)
    state["step"] = step
    return state


def digest(a) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.name}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------- worker


def io_counters() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def slices_json(index, shape) -> list[list[int]]:
    out = []
    for s, n in zip(index, shape, strict=True):
        start, stop, _ = s.indices(n)
        out.append([start, stop])
    return out


def describe(value, target=None) -> dict:
    """What a restored leaf is, with a digest of each piece of data this process holds."""
    import jax

    if isinstance(value, jax.Array):
        info = {
            "kind": "jax",
            "dtype": value.dtype.name,
            "shape": list(value.shape),
            "sharding": repr(value.sharding),
            "shards": sorted(
                (
                    {
                        "index": slices_json(s.index, value.shape),
                        "device": s.device.id,
                        "digest": digest(np.asarray(s.data)),
                    }
                    for s in value.addressable_shards
                ),
                key=lambda d: (d["device"], d["index"]),
            ),
        }
        if target is not None and getattr(target, "sharding", None) is not None:
            info["sharding_equals_target"] = bool(value.sharding == target.sharding)
            info["target_sharding"] = repr(target.sharding)
            info["target_indices"] = sorted(
                (
                    {"index": slices_json(idx, value.shape), "device": d.id}
                    for d, idx in target.sharding.addressable_devices_indices_map(
                        tuple(target.shape)
                    ).items()
                ),
                key=lambda d: (d["device"], d["index"]),
            )
        return info
    if isinstance(value, (np.ndarray, np.generic)):
        return {
            "kind": "numpy",
            "type": type(value).__name__,
            "dtype": value.dtype.name,
            "shape": list(np.shape(value)),
            "digest": digest(value),
        }
    return {"kind": "python", "type": type(value).__name__, "value": repr(value)}


def describe_tree(tree, target=None) -> dict:
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    targets = (
        [t for _, t in jax.tree_util.tree_flatten_with_path(target)[0]]
        if target is not None
        else [None] * len(flat)
    )
    return {
        jax.tree_util.keystr(path): describe(value, like)
        for (path, value), like in zip(flat, targets, strict=True)
    }


def describe_load(restored, target=None) -> dict | None:
    if restored is None:
        return None
    return {
        "step": restored["step"],
        "metrics": restored.get("metrics"),
        "leaves": describe_tree(restored["state"], target),
    }


class Worker:
    def __init__(self, scenario: str, out_dir: str, process_id: int, params: dict):
        self.scenario = scenario
        self.out_dir = out_dir
        self.process_id = process_id
        self.params = params
        self.num_processes = params.get("num_processes", 1)
        self.result: dict = {"scenario": scenario, "process_id": process_id}

    def log(self, *parts) -> None:
        line = " ".join(str(p) for p in parts)
        print(f"[p{self.process_id} {time.strftime('%H:%M:%S')}] {line}", flush=True)

    def write_result(self) -> None:
        path = os.path.join(self.out_dir, f"result-{self.process_id}.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f, indent=1, default=repr)
        os.replace(tmp, path)

    # ------------------------------------------------------------------- jax set-up

    def start_jax(self):
        flags = os.environ.get("XLA_FLAGS", "")
        assert "--xla_force_host_platform_device_count=" in flags, flags
        assert "jax" not in sys.modules, "jax imported before XLA_FLAGS took effect"
        import jax

        jax.config.update("jax_platforms", "cpu")
        if self.num_processes > 1:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                coordinator_address=f"127.0.0.1:{self.params['port']}",
                num_processes=self.num_processes,
                process_id=self.process_id,
                heartbeat_timeout_seconds=self.params.get("heartbeat_timeout", 30),
                initialization_timeout=self.params.get("initialization_timeout", 60),
            )
        self.result["process_count"] = jax.process_count()
        self.result["process_index"] = jax.process_index()
        self.result["device_count"] = jax.device_count()
        self.result["local_device_count"] = jax.local_device_count()
        self.result["devices"] = [[d.id, d.process_index] for d in jax.devices()]
        self.log("jax ready:", jax.process_count(), "processes,", jax.device_count(), "devices")
        return jax

    def mesh(self, shape, axes):
        import jax

        return jax.sharding.Mesh(np.array(jax.devices()).reshape(shape), axes)

    def global_state(self, mesh, seed: int = 0, step: int = STEP, scale: int = 1):
        """The state as global jax arrays (numpy leaf stays numpy) on the save mesh."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        pairs = []
        for path, _, _, spec in LEAVES:
            full = expected_array(path, seed, scale)
            if spec is None:
                pairs.append((path, full))
                continue
            sharding = NamedSharding(mesh, PartitionSpec(*spec))
            pairs.append(
                (
                    path,
                    jax.make_array_from_callback(full.shape, sharding, lambda idx, a=full: a[idx]),
                )
            )
        state = nest(pairs)
        state["step"] = step
        return state

    def target(self, mesh, specs: dict, scale: int = 1, cast: str | None = None):
        """ShapeDtypeStructs on ``mesh`` with ``specs[path]`` (default: replicated);
        a numpy leaf gets a numpy target, the step an int. ``cast``: the dtype the
        target asks for in place of float32 (restored with ``allow_cast``)."""
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        pairs = []
        for path, shape, dtype_name, spec in LEAVES:
            full_shape = tuple(max(1, n // scale) for n in shape)
            dtype = dtype_of(cast if cast and dtype_name == "float32" else dtype_name)
            if spec is None:
                pairs.append((path, np.zeros(full_shape, dtype)))
                continue
            sharding = NamedSharding(mesh, PartitionSpec(*specs.get(path, ())))
            pairs.append((path, jax.ShapeDtypeStruct(full_shape, dtype, sharding=sharding)))
        state = nest(pairs)
        state["step"] = 0
        return state

    def checkpointer(self, **kwargs):
        from learnax.checkpoint import Checkpointer

        if self.params.get("storage_options") is not None:
            kwargs.setdefault("storage_options", self.params["storage_options"])
        return Checkpointer(self.params["registry"], self.params.get("run", RUN), **kwargs)

    def timed_load(self, name: str, load):
        """Run ``load()``, recording its time and /proc/self/io deltas."""
        before, t0 = io_counters(), time.monotonic()
        restored = load()
        elapsed, after = time.monotonic() - t0, io_counters()
        self.result[name + "_seconds"] = elapsed
        self.result[name + "_rchar"] = after["rchar"] - before["rchar"]
        self.result[name + "_read_bytes"] = after["read_bytes"] - before["read_bytes"]
        return restored

    # -------------------------------------------------------------------- scenarios

    def scenario_hello(self):
        """Two processes see each other: a global array and a collective over it."""
        jax = self.start_jax()
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec

        mesh = self.mesh((2, 2), ("x", "y"))
        full = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
        arr = jax.make_array_from_callback(
            full.shape, NamedSharding(mesh, PartitionSpec(("x", "y"))), lambda idx: full[idx]
        )
        self.result["global_shape"] = list(arr.shape)
        self.result["fully_addressable"] = arr.is_fully_addressable
        self.result["shards"] = [
            {"index": slices_json(s.index, arr.shape), "device": s.device.id}
            for s in arr.addressable_shards
        ]
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(arr)
        self.result["sum"] = float(np.asarray(total.addressable_shards[0].data))
        self.result["expected_sum"] = float(full.sum())

    def scenario_save(self):
        """Both processes save the global state at STEP."""
        jax = self.start_jax()
        mesh = self.mesh((2, 2), ("x", "y"))
        state = self.global_state(mesh)
        ckpt = self.checkpointer(save_every=None, checkpoint_every=None)
        jax.block_until_ready(state)
        before = io_counters()
        self.result["path"] = ckpt.save_checkpoint(state, step=STEP)
        after = io_counters()
        self.result["wchar"] = after["wchar"] - before["wchar"]
        self.result["listed"] = ckpt.list_available_checkpoints()

    def scenario_restore(self):
        """Load step ``params["step"]`` with a target on a mesh given in params, or
        without target; ``params["loads"]`` lists {"name", "mesh", "axes", "specs"}."""
        self.start_jax()
        ckpt = self.checkpointer(save_every=None, checkpoint_every=None)
        step = self.params.get("step", STEP)
        loads = self.params["loads"]
        for load in loads:
            name = load["name"]
            try:
                if load.get("mesh") is None:
                    restored = self.timed_load(name, lambda: ckpt.load_checkpoint(step))
                    self.result[name] = describe_load(restored)
                else:
                    mesh = self.mesh(tuple(load["mesh"]), tuple(load["axes"]))
                    specs = {tuple(k.split("/")): spec_of(v) for k, v in load["specs"].items()}
                    cast = load.get("cast")
                    target = self.target(mesh, specs, cast=cast)
                    restored = self.timed_load(
                        name,
                        lambda t=target, c=cast is not None: ckpt.load_checkpoint(
                            step, target=t, allow_cast=c
                        ),
                    )
                    self.result[name] = describe_load(
                        restored, None if restored is None else target
                    )
            except Exception:
                self.result[name + "_error"] = traceback.format_exc()  # the parent shows it
                self.log(name, "failed:", self.result[name + "_error"].strip().splitlines()[-1])

    def scenario_policy(self):
        """maybe_save_checkpoints over steps 1..6, process 1 passing other metrics."""
        jax = self.start_jax()
        mesh = self.mesh((2, 2), ("x", "y"))
        losses = self.params["losses"][self.process_id]
        ckpt = self.checkpointer(**self.params["policy"])
        self.result["steps"] = []
        for step in range(1, len(losses) + 1):
            state = self.global_state(mesh, seed=step, step=step, scale=16)
            jax.block_until_ready(state)
            saved = ckpt.maybe_save_checkpoints(state, step, {"loss": losses[step - 1]})
            self.result["steps"].append(
                {"step": step, "saved": saved, "best_metric_value": ckpt.best_metric_value}
            )
            self.log("step", step, saved, ckpt.best_metric_value)
        self.result["listed"] = ckpt.list_available_checkpoints()

    def scenario_async(self):
        """An async save: returns, the caller deletes its arrays, then waits."""
        jax = self.start_jax()
        mesh = self.mesh((2, 2), ("x", "y"))
        state = self.global_state(mesh, seed=5, step=5)
        ckpt = self.checkpointer(save_every=None, checkpoint_every=None, async_save=True)
        jax.block_until_ready(state)
        t0 = time.monotonic()
        self.result["returned"] = ckpt.save_checkpoint(state, step=5)
        self.result["return_seconds"] = time.monotonic() - t0
        for leaf in jax.tree_util.tree_leaves(state):
            if isinstance(leaf, jax.Array):
                leaf.delete()  # the save must have taken its own snapshot
        ckpt.wait_until_finished()
        self.result["wait_seconds"] = time.monotonic() - t0
        self.result["listed"] = ckpt.list_available_checkpoints()
        ckpt.close()

    def scenario_unshared(self):
        """Each process saves to its own directory, as on hosts that do not share it."""
        jax = self.start_jax()
        mesh = self.mesh((2, 2), ("x", "y"))
        self.params["registry"] = self.params["registries"][self.process_id]
        ckpt = self.checkpointer(save_every=None, checkpoint_every=None, multihost_timeout=30)
        state = self.global_state(mesh)
        jax.block_until_ready(state)
        t0 = time.monotonic()
        self.result["path"] = ckpt.save_checkpoint(state, step=STEP)
        self.result["seconds"] = time.monotonic() - t0
        self.result["listed"] = ckpt.list_available_checkpoints()

    def scenario_one_sided(self):
        """Calls that only some processes make: a Checkpointer made on process 0 alone
        (to load), and a metric only process 0 reports; the calls after them still
        line up."""
        jax = self.start_jax()
        mesh = self.mesh((2, 2), ("x", "y"))
        state = self.global_state(mesh, seed=1, step=1)
        jax.block_until_ready(state)
        policy = {
            "save_every": 1,
            "checkpoint_every": None,
            "keep_best": True,
            "metric_name": "loss",
            "multihost_timeout": 3,
        }
        if self.process_id == 0:
            t0 = time.monotonic()
            self.checkpointer(**policy).load_latest()
            self.result["solo_seconds"] = time.monotonic() - t0
        ckpt = self.checkpointer(**policy)
        self.result["steps"] = []
        for step, metrics in (
            (1, {"loss": 2.0}),
            (2, {"loss": 1.0} if self.process_id == 0 else None),  # process 0 only
            (3, {"loss": 3.0}),
        ):
            saved = ckpt.maybe_save_checkpoints(state, step, metrics)
            self.result["steps"].append(
                {"step": step, "saved": saved, "best_metric_value": ckpt.best_metric_value}
            )

    def scenario_same_run_id_twice(self):
        """Two Checkpointers with one run id, in two registries, and a third on the same
        run as the first: their exchanges never share keys, so every save commits."""
        jax = self.start_jax()
        from learnax.checkpoint import Checkpointer

        mesh = self.mesh((2, 2), ("x", "y"))
        state = self.global_state(mesh, seed=1, step=1)
        jax.block_until_ready(state)
        policy = {"save_every": 1, "checkpoint_every": 2, "multihost_timeout": 10}
        first = Checkpointer(self.params["registry"], RUN, **policy)
        other = Checkpointer(self.params["registry"] + "-other", RUN, **policy)
        again = Checkpointer(self.params["registry"], RUN, **policy)
        self.result["saved"] = [
            [ckpt.maybe_save_checkpoints(state, step) for ckpt in (first, other, again)]
            for step in (1, 2)
        ]

    def scenario_slow_commit(self):
        """Process 0 takes longer than the others wait: they give up, and process 0
        then refuses to commit, so every process returns None."""
        jax = self.start_jax()
        from learnax.checkpoint import _multihost

        mesh = self.mesh((2, 2), ("x", "y"))
        ckpt = self.checkpointer(save_every=None, checkpoint_every=None, multihost_timeout=2)
        state = self.global_state(mesh, seed=1, step=1)
        jax.block_until_ready(state)
        if self.process_id == 0:
            original = _multihost.Coordinator.check_not_abandoned

            def slow_check(coord, key):
                time.sleep(self.params["delay"])  # a slow process 0, e.g. a slow disk
                return original(coord, key)

            _multihost.Coordinator.check_not_abandoned = slow_check
        t0 = time.monotonic()
        self.result["path"] = ckpt.save_checkpoint(state, step=1)
        self.result["seconds"] = time.monotonic() - t0
        self.result["listed"] = ckpt.list_available_checkpoints()

    def scenario_kill(self):
        """Step 1 commits; at step 2 process 1 SIGKILLs itself mid data write."""
        jax = self.start_jax()
        from learnax.checkpoint import _storage

        mesh = self.mesh((2, 2), ("x", "y"))
        ckpt = self.checkpointer(
            save_every=None,
            checkpoint_every=None,
            multihost_timeout=self.params["multihost_timeout"],
        )
        state = self.global_state(mesh, seed=1, step=1)
        jax.block_until_ready(state)
        self.result["step1"] = ckpt.save_checkpoint(state, step=1)
        self.log("step 1 saved:", self.result["step1"])

        armed = [False]
        original = _storage.LocalStorage.write_durable

        def write_durable(storage, path, chunks):
            if not (armed[0] and self.process_id == 1 and "safetensors" in os.fspath(path)):
                return original(storage, path, chunks)

            def crash_half_way():
                # Die at the first chunk boundary past KILL_AFTER bytes (past the first
                # 8 MiB writev batch, so part of the file is on disk), else at the end.
                given = 0
                for chunk in chunks:
                    if given >= KILL_AFTER:
                        self.log("killing myself in the middle of", path, "after", given)
                        os.kill(os.getpid(), signal.SIGKILL)
                    given += memoryview(chunk).nbytes
                    yield chunk
                self.log("killing myself at the end of", path, "after", given)
                os.kill(os.getpid(), signal.SIGKILL)

            return original(storage, path, crash_half_way())

        _storage.LocalStorage.write_durable = write_durable
        state = self.global_state(mesh, seed=2, step=2)
        jax.block_until_ready(state)
        armed[0] = True
        t0 = time.monotonic()
        self.result["step2"] = ckpt.save_checkpoint(state, step=2)
        self.result["step2_seconds"] = time.monotonic() - t0
        self.log("step 2 returned", self.result["step2"], "after", self.result["step2_seconds"])
        self.result["exit"] = "os._exit"  # the peer is dead: no distributed shutdown


def spec_of(value):
    """JSON spec -> PartitionSpec args: a list whose items are None, an axis, or a list."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in value)


def main() -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent's hang report
    scenario, out_dir, process_id, params = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    worker = Worker(scenario, out_dir, process_id, json.loads(params))
    status = 0
    try:
        getattr(worker, "scenario_" + scenario)()
    except BaseException:
        worker.result["error"] = traceback.format_exc()  # the parent shows it
        worker.log("failed:", worker.result["error"].strip().splitlines()[-1])
        status = 1
    worker.write_result()
    worker.log("result written, status", status)
    sys.stdout.flush()
    sys.stderr.flush()
    if status == 0 and worker.result.get("exit") != "os._exit" and worker.num_processes > 1:
        import jax

        jax.distributed.shutdown()  # a barrier: every process leaves together
        worker.log("distributed shutdown done")
        sys.stdout.flush()
    # Skip interpreter teardown (jax's atexit hooks would try a shutdown again).
    os._exit(status)


if __name__ == "__main__":
    main()
