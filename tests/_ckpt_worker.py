"""Subprocess worker for tests/test_checkpoint.py: a small deterministic training run
that checkpoints every ``--every`` steps and resumes from the newest checkpoint.

    python tests/_ckpt_worker.py DIR OUT.npz [--steps 200] [--every 20]

Environment (for the SIGKILL test):
  CKPT_KILL_AT=k          SIGKILL itself at the start of step k (between checkpoints).
  CKPT_KILL_AFTER_SAVE=k  SIGKILL itself right after save(k) returns.

Prints ``RESUMED <step> <data_position>`` or ``FRESH``, ``SAVED <step>`` after each save,
and ``DONE`` after writing the final parameters to OUT.npz.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bilevel_jax.checkpoint import Checkpointer

N, D, H, BATCH = 512, 8, 16, 32


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # int32
    key: jax.Array  # typed PRNG key, split every step (input noise)


def data():
    rng = np.random.RandomState(0)
    x = rng.randn(N, D).astype(np.float32)
    y = np.tanh(x @ rng.randn(D, 1).astype(np.float32)) + 0.1 * rng.randn(N, 1).astype(np.float32)
    perm = rng.permutation(N)  # batches are perm[(i*BATCH) % N : ...] for data position i*BATCH
    return x, y, perm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("directory")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=20)
    a = ap.parse_args()
    kill_at = int(os.environ.get("CKPT_KILL_AT", -1))
    kill_after_save = int(os.environ.get("CKPT_KILL_AFTER_SAVE", -1))

    x, y, perm = data()
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2))
    k1, k2 = jax.random.split(jax.random.PRNGKey(42))
    params = {
        "w1": jax.random.normal(k1, (D, H), jnp.float32) / np.sqrt(D),
        "b1": jnp.zeros((H,), jnp.float32),
        "w2": jax.random.normal(k2, (H, 1), jnp.float32) / np.sqrt(H),
        "b2": jnp.zeros((1,), jnp.float32),
    }
    state = TrainState(params, tx.init(params), jnp.int32(0), jax.random.key(7))

    def loss(p, xb, yb):
        h = jnp.tanh(xb @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] + p["b2"] - yb) ** 2)

    @jax.jit
    def train_step(s: TrainState, xb, yb) -> TrainState:
        key, sub = jax.random.split(s.key)
        xb = xb + 0.01 * jax.random.normal(sub, xb.shape)
        g = jax.grad(loss)(s.params, xb, yb)
        updates, opt_state = tx.update(g, s.opt_state, s.params)
        new_params = cast(dict, optax.apply_updates(s.params, updates))
        return TrainState(new_params, opt_state, s.step + 1, key)

    ckpt = Checkpointer(a.directory, max_to_keep=2)
    pos = 0
    if ckpt.latest_step() is not None:
        step, state, extra = ckpt.restore(state)
        pos = extra["data_position"]
        assert int(state.step) == step and pos == step * BATCH, (step, int(state.step), pos)
        print(f"RESUMED {step} {pos}", flush=True)
    else:
        print("FRESH", flush=True)

    for i in range(int(state.step), a.steps):
        if i == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        idx = perm[np.arange(pos, pos + BATCH) % N]
        state = train_step(state, x[idx], y[idx])
        pos += BATCH
        if (i + 1) % a.every == 0:
            ckpt.save(i + 1, state, extra={"data_position": pos, "rng_seed": 7})
            print(f"SAVED {i + 1}", flush=True)
            if i + 1 == kill_after_save:
                os.kill(os.getpid(), signal.SIGKILL)
    ckpt.close()
    arrays: dict[str, Any] = {k: np.asarray(v) for k, v in state.params.items()}
    np.savez(a.out, **arrays)
    print("DONE", flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
