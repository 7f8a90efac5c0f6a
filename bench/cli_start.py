"""How fast the ``learnax`` command starts, as a ratio to ``python -c "import jax"``.

Run by hand (``python bench/cli_start.py [--runs 7]``). Each command runs in a fresh
interpreter, as a user runs it, on a small registry written first (one run, latest +
best + two numbered float32 checkpoints); the median wall time of ``--runs`` runs is
printed with its ratio to the median of ``import jax`` measured in the same loop
(runs interleaved, so that a busy machine slows both alike). ``import jax`` is the
floor of any command that imports it; the commands that read manifests only should
take a fraction of it. ``python -c pass`` is the interpreter's own start, the floor of
every command.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def write_registry(root: Path) -> Path:
    """A run like examples/train.py's: latest, best, two numbered checkpoints."""
    script = (
        "import numpy as np\n"
        "from learnax.checkpoint import Checkpointer\n"
        f"c = Checkpointer({str(root)!r}, 'mlp', save_every=50, checkpoint_every=200,"
        " max_to_keep=2, keep_best=True)\n"
        "for step in range(0, 601, 50):\n"
        "    state = {'w': np.full((64, 64), step, np.float32), 'step': step}\n"
        "    c.maybe_save_checkpoints(state, step, {'val/loss': 1 / (step + 1)})\n"
        "c.wait_until_finished()\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=_env())
    return root / "mlp"


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    return env


def wall_s(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=_env(), stdout=subprocess.DEVNULL)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1):  # diff: 1 when the checkpoints differ
        raise SystemExit(f"{' '.join(argv)} failed with status {done.returncode}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each command (median)")
    args = parser.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        run = write_registry(Path(tmp))
        a, b = run / "checkpoints/state_400", run / "checkpoints/state_600"
        commands = {
            "import jax": [py, "-c", "import jax"],
            "python -c pass": [py, "-c", "pass"],
            "learnax --help": [py, "-m", "learnax", "--help"],
            "learnax --version": [py, "-m", "learnax", "--version"],
            "learnax ls REGISTRY": [py, "-m", "learnax", "ls", str(run.parent)],
            "learnax ls RUN": [py, "-m", "learnax", "ls", str(run)],
            "learnax show RUN latest": [py, "-m", "learnax", "show", str(run), "latest"],
            "learnax diff --json A B": [py, "-m", "learnax", "diff", "--json", str(a), str(b)],
            "learnax prune --dry-run": [
                py,
                *("-m", "learnax", "prune", str(run), "--keep", "1", "--dry-run"),
            ],
            "learnax plot --json": [
                py,
                *("-m", "learnax", "plot", str(run), "--metric", "val/loss", "--json"),
            ],
            "learnax verify RUN": [py, "-m", "learnax", "verify", str(run)],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for argv in commands.values():  # warm the file cache once
            subprocess.run(argv, env=_env(), stdout=subprocess.DEVNULL, check=False)
        for _ in range(args.runs):
            for name, argv in commands.items():
                times[name].append(wall_s(argv))
    jax_s = statistics.median(times["import jax"])
    print(f"{'command':<26} {'median':>9} {'/ import jax':>13}   ({args.runs} runs each)")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"{name:<26} {median * 1000:7.0f} ms {median / jax_s:12.2f}x")


if __name__ == "__main__":
    main()
