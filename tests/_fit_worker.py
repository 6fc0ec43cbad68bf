"""Subprocess worker for tests/test_fit.py: a bilevel run with ``bj.fit`` that checkpoints and
resumes; with ``FIT_KILL_AT=k`` it SIGKILLs itself when the data for meta step k is requested.

    python tests/_fit_worker.py DIR OUT.npz

Writes θ and λ of the final state to OUT.npz and prints DONE.
"""

from __future__ import annotations

import itertools
import os
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel_jax as bj
from bilevel_jax.checkpoint import Checkpointer

N, F, K, BATCH, META_STEPS = 256, 6, 3, 16, 40


def main() -> None:
    directory, out = sys.argv[1], sys.argv[2]
    kill_at = int(os.environ.get("FIT_KILL_AT", -1))
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(N, F), jnp.float32)
    y = jnp.asarray(rng.randn(N), jnp.float32)
    xm, ym = jnp.asarray(rng.randn(32, F), jnp.float32), jnp.asarray(rng.randn(32), jnp.float32)

    def base_loss(th, lam, idx):
        r = jnp.tanh(x[idx] @ th["w"]) - y[idx]
        return jnp.sum(jax.nn.sigmoid(lam[idx]) * r**2) / jnp.sum(jax.nn.sigmoid(lam[idx]))

    def meta_loss(th, lam, batch):
        xb, yb = batch
        return jnp.mean((jnp.tanh(xb @ th["w"]) - yb) ** 2)

    def base_batches(start):
        for t in itertools.count(start):
            if t == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            yield np.random.default_rng(t).choice(N, (K, BATCH))

    step = bj.bilevel_step(
        base_loss,
        meta_loss,
        optax.adam(1e-2),
        optax.adam(1e-1),
        bj.sama(adapt_from="last"),
        use_rng=False,
    )
    state = step.init({"w": jnp.full((F,), 0.1)}, jnp.zeros(N))
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        state, _ = bj.fit(
            step,
            state,
            base_batches,
            itertools.repeat((xm, ym)),
            num_meta_steps=META_STEPS,
            checkpointer=ckpt,
            checkpoint_every=5,
            resume=True,
            progress=False,
        )
    np.savez(
        out,
        w=np.asarray(state.base_params["w"]),
        lam=np.asarray(state.meta_params),
        meta_steps=int(state.meta_steps),
    )
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
