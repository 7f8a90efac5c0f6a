"""A short check that learnax works with the oldest jax, numpy and ml_dtypes that
pyproject.toml declares: .ci/run installs exactly those in a fresh venv and runs this.

It covers what depends on those versions: jax arrays saved synchronously and in the
background (the on-device snapshot), typed PRNG keys (their implementation names),
bfloat16 and float8 (ml_dtypes), restores into a target with shardings, and reading
a checkpoint back through the inspection API and the command line. Exits non-zero,
with a traceback, at the first thing that fails.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from importlib.metadata import version
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from learnax.checkpoint import Checkpointer, list_checkpoints, read_info, verify


class Adam(NamedTuple):
    count: object
    mu: object


def make_state(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.standard_normal((64, 32), dtype=np.float32)),
            "b16": jnp.asarray(rng.standard_normal(32), dtype=jnp.bfloat16),
        },
        "opt": Adam(count=jnp.int32(seed), mu=np.zeros(32, np.float32)),
        "f8": rng.standard_normal(8).astype(ml_dtypes.float8_e4m3fn),
        "key": jax.random.key(seed),
        "rbg_key": jax.random.key(seed, impl="rbg"),
        "raw_key": jax.random.PRNGKey(seed),
        3: "int key",
        "lr": 1e-3,
    }


def check_equal(expected, actual, where: str = "") -> None:
    if isinstance(expected, dict):
        assert list(expected) == list(actual), where
        for key in expected:
            check_equal(expected[key], actual[key], f"{where}[{key!r}]")
    elif isinstance(expected, tuple):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual, strict=True)):
            check_equal(e, a, f"{where}[{i}]")
    elif isinstance(expected, jax.Array) and jax.dtypes.issubdtype(
        expected.dtype, jax.dtypes.prng_key
    ):
        assert jax.dtypes.issubdtype(actual.dtype, jax.dtypes.prng_key), where
        assert str(jax.random.key_impl(actual)) == str(jax.random.key_impl(expected)), where
        assert np.array_equal(jax.random.key_data(actual), jax.random.key_data(expected)), where
    elif isinstance(expected, (np.ndarray, np.generic, jax.Array)):
        expected, actual = np.asarray(expected), np.asarray(actual)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert actual.tobytes() == expected.tobytes(), where
    else:
        assert type(actual) is type(expected) and actual == expected, where


def check_sync_and_async(registry: str) -> None:
    for async_save in (False, True):
        run = f"async-{async_save}"
        with Checkpointer(registry, run, keep_best=True, async_save=async_save) as ckpt:
            for step in (1, 2):
                state = make_state(step)
                ckpt.maybe_save_checkpoints(state, step, {"val/loss": 1.0 / step})
                ckpt.save_checkpoint(state, step)
        ckpt = Checkpointer(registry, run, keep_best=True)
        assert ckpt.best_metric_value == 0.5, ckpt.best_metric_value
        loaded = ckpt.load_checkpoint(2)
        check_equal(make_state(2), loaded["state"])
        # The same key draws the same numbers after a restore.
        draw = jax.random.normal(loaded["state"]["key"], (3,))
        assert np.array_equal(draw, jax.random.normal(make_state(2)["key"], (3,)))


def check_target(registry: str) -> None:
    ckpt = Checkpointer(registry, "async-False")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=sharding)}
    params = ckpt.load_checkpoint(2, target=target)["state"]
    assert isinstance(params["w"], jax.Array) and params["w"].sharding == sharding
    check_equal(make_state(2)["params"]["w"], params["w"])


def check_inspection(registry: str) -> None:
    run = f"{registry}/async-True"
    names = [c.name for c in list_checkpoints(run)]
    assert names == ["best", "1", "2"], names
    assert read_info(f"{run}/checkpoints/state_2").step == 2
    assert verify(run) == []
    done = subprocess.run(
        [sys.executable, "-m", "learnax", "ls", run], capture_output=True, text=True
    )
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr


def main() -> None:
    print(
        "smoke test with "
        + ", ".join(f"{p} {version(p)}" for p in ("jax", "jaxlib", "numpy", "ml_dtypes"))
    )
    with tempfile.TemporaryDirectory() as registry:
        check_sync_and_async(registry)
        check_target(registry)
        check_inspection(registry)
    print("OK: learnax works with the declared minimum versions")


if __name__ == "__main__":
    main()
