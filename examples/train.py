"""Train a small flax MLP regressor with optax, checkpointing with learnax.

Run it, stop it, run it again: the second run resumes from the newest checkpoint.

    python examples/train.py --fresh --stop-at 300   # "preempted" after step 300
    python examples/train.py                         # Resuming from step 300

The data is synthetic and made here, so the script needs no downloads and runs in
seconds on a laptop CPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from learnax.checkpoint import Checkpointer

IN_DIM, HIDDEN, BATCH = 8, 64, 128
EVAL_EVERY = 50  # every `latest` save (save_every=50) then carries a fresh val/loss


class TrainState(NamedTuple):
    params: Any
    opt_state: Any
    step: Any  # a jnp.int32 scalar: the number of optimizer steps taken


class MLP(nn.Module):
    hidden: int = HIDDEN

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(self.hidden)(x))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(1)(x)[..., 0]


def teacher(x):
    # A fixed nonlinear target, so the MLP has something real to learn.
    w = jax.random.normal(jax.random.key(1234), (IN_DIM,))
    return jnp.sin(x @ w) + 0.5 * jnp.cos(x[..., 0] * x[..., 1])


def make_batch(step: int):
    # The batch is a pure function of the step, so a resumed run sees exactly the
    # batches the interrupted run would have seen: resuming changes nothing.
    x = jax.random.normal(jax.random.fold_in(jax.random.key(0), step), (BATCH, IN_DIM))
    return x, teacher(x)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--registry", default="./runs", help="where runs keep their checkpoints")
    p.add_argument("--run-id", default="demo", help="one run = one checkpoint directory")
    p.add_argument("--steps", type=int, default=600, help="total optimizer steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stop-at", type=int, help="exit after this step (simulates preemption)")
    p.add_argument("--fresh", action="store_true", help="delete the run directory first")
    return p.parse_args()


def main():
    args = parse_args()
    if args.fresh:
        shutil.rmtree(os.path.join(args.registry, args.run_id), ignore_errors=True)

    model = MLP()
    # inject_hyperparams keeps the learning rate inside opt_state, so it is
    # checkpointed with everything else and survives a restart.
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=args.lr)

    # A held-out set drawn from a different key than any training batch.
    x_val = jax.random.normal(jax.random.key(1), (512, IN_DIM))
    y_val = teacher(x_val)

    params = model.init(jax.random.key(42), x_val[:1])
    fresh_state = TrainState(params, tx.init(params), jnp.asarray(0, jnp.int32))

    def loss_fn(params, x, y):
        return jnp.mean((model.apply(params, x) - y) ** 2)

    @jax.jit
    def train_step(state: TrainState, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, x, y)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), loss

    eval_loss = jax.jit(lambda params: loss_fn(params, x_val, y_val))

    ckpt = Checkpointer(
        args.registry,
        args.run_id,
        save_every=50,  # rolling `state_latest`: cheap, bounds the work lost to a crash
        checkpoint_every=200,  # numbered `state_<step>` snapshots...
        max_to_keep=2,  # ...of which only the newest two are kept
        keep_best=True,  # `state_best`: lowest val/loss seen so far
        metric_name="val/loss",
    )
    print(f"Checkpoints in {ckpt.checkpoint_dir}")

    # Restoring into `fresh_state` hands back a TrainState of jax arrays with the
    # same structure (optax NamedTuples included), ready for the jitted step.
    restored = ckpt.load_latest(target=fresh_state)
    if restored is not None:
        state, start = restored["state"], restored["step"]
        print(f"Resuming from step {start}")
    else:
        state, start = fresh_state, 0
        print("Starting a new run")

    for step in range(start + 1, args.steps + 1):
        state, loss = train_step(state, *make_batch(step))

        metrics = None
        if step % EVAL_EVERY == 0:
            # float() waits for the device; only do it on eval steps, never every step.
            metrics = {"val/loss": float(eval_loss(state.params)), "train/loss": float(loss)}

        # Called every step: it saves latest / numbered / best only when due.
        saved = ckpt.maybe_save_checkpoints(state, step, metrics)

        if step % 100 == 0:
            print(
                f"step {step:4d}  train/loss {metrics['train/loss']:.4f}  "
                f"val/loss {metrics['val/loss']:.4f}  saved: {', '.join(saved) or '-'}"
            )
        if step == args.stop_at:
            print(f"Stopping after step {step} (simulated preemption); run again to resume.")
            return

    print("Available checkpoints:")
    for name, path in ckpt.list_available_checkpoints().items():
        print(f"  {name:10s} {path}")

    # A subtree target restores just the params out of the saved TrainState.
    best = ckpt.load_best(target=fresh_state.params)
    if best is not None:
        print(
            f"Best val/loss {ckpt.best_metric_value:.4f} at step {best['step']} "
            f"(re-evaluated from state_best: {float(eval_loss(best['state'])):.4f})"
        )


if __name__ == "__main__":
    main()
