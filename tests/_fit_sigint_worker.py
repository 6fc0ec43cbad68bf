"""Subprocess worker for tests/test_fit.py: Ctrl-C (SIGINT) while ``bj.fit`` writes a periodic
checkpoint.

    python tests/_fit_sigint_worker.py DIR

The save of meta step ``SAVE_AT`` sends SIGINT to this process from a second thread ``DELAY_S``
after orbax starts writing, while orbax's background write of one item is held back for
``SLOW_WRITE_S`` (a deterministic stand-in for a large state). Prints ``SIGNAL_IN_SAVE`` if the save was still running when the
signal went out, the exception ``fit`` ended with (``RAISED <type> <message>``), the checkpoint
directory's entries (``DIR ...``) and whether the newest checkpoint equals the same number of
steps run by hand, bit for bit (``NEWEST <step> IDENTICAL <bool>``). When fit writes its interrupt
checkpoint it prints ``RESAVE writer_alive=<bool> tmp=[...]``: whether the interrupted save's
writer was still running and which temporary directories were there (both must be gone).
"""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bilevel_jax as bj
from bilevel_jax.checkpoint import Checkpointer

N_LAM, F, K, BATCH, SAVE_AT, DELAY_S, SLOW_WRITE_S = 1_000_000, 6, 2, 16, 4, 0.5, 3.0


def main() -> None:
    # Ctrl-C as in a terminal: a process started with SIGINT ignored (e.g. under a pytest-xdist
    # worker, whose children inherit the ignored disposition) would never see the signal
    signal.signal(signal.SIGINT, signal.default_int_handler)
    directory = sys.argv[1]
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(BATCH * 8, F), jnp.float32)

    def base_loss(th, lam, idx):
        r = jnp.tanh(x[idx % x.shape[0]] @ th["w"]) - 1.0
        return jnp.mean(jax.nn.sigmoid(lam[idx]) * r**2)

    def meta_loss(th, lam, idx):
        return jnp.mean((jnp.tanh(x[idx % x.shape[0]] @ th["w"]) - 0.5) ** 2)

    step = bj.bilevel_step(base_loss, meta_loss, optax.sgd(0.1), optax.adam(1e-2), bj.sama())
    state = step.init({"w": jnp.full((F,), 0.1)}, jnp.zeros(N_LAM))

    fired = []

    # orbax writes each item in a background thread that the saving thread joins; slow down the
    # JSON item's write of the interrupted save, so the signal lands while that write is in
    # flight (the window in which fit's interrupt checkpoint raced the unfinished save)
    from orbax.checkpoint._src.handlers import json_checkpoint_handler as jch

    json_save = jch.JsonCheckpointHandler._save_fn

    async def slow_json_save(self, x, directory):
        if len(fired) == 1 and not slowed:
            slowed.append(threading.current_thread())
            time.sleep(SLOW_WRITE_S)
        return await json_save(self, x, directory)

    slowed: list = []
    jch.JsonCheckpointHandler._save_fn = slow_json_save

    class SlowlyInterrupted(Checkpointer):
        def save(self, step, state, extra=None, **kw):
            if step == SAVE_AT and fired:  # fit's interrupt checkpoint
                writer_alive = any(t.is_alive() for t in slowed)
                tmp = [p for p in os.listdir(directory) if "orbax-checkpoint-tmp" in p]
                print(f"RESAVE writer_alive={writer_alive} tmp={tmp}", flush=True)
            if step != SAVE_AT or fired:
                return super().save(step, state, extra, **kw)
            fired.append(step)  # once: the interrupt checkpoint (same step) is saved in peace
            done = threading.Event()

            def interrupt():
                time.sleep(DELAY_S)
                if not done.is_set():
                    print("SIGNAL_IN_SAVE", flush=True)
                os.kill(os.getpid(), signal.SIGINT)

            manager_save = self._manager.save

            def orbax_save(*args, **kwargs):  # the signal goes out while orbax writes the step
                threading.Thread(target=interrupt, daemon=True).start()
                return manager_save(*args, **kwargs)

            self._manager.save = orbax_save
            try:
                return super().save(step, state, extra, **kw)
            finally:
                done.set()
                self._manager.save = manager_save

    def base_batches(start):
        for t in itertools.count(start):
            yield np.random.default_rng(t).choice(BATCH * 8, (K, BATCH))

    def meta_batches(start):
        for t in itertools.count(start):
            yield np.random.default_rng(10_000 + t).choice(BATCH * 8, BATCH)

    with SlowlyInterrupted(directory, max_to_keep=3) as ckpt:
        try:
            state, _ = bj.fit(
                step,
                state,
                base_batches,
                meta_batches,
                num_meta_steps=20,
                checkpointer=ckpt,
                checkpoint_every=2,
                donate=False,
                progress=False,
            )
            print("RAISED none", flush=True)
        except BaseException as e:  # noqa: BLE001 - the test checks which one
            print(f"RAISED {type(e).__name__} {str(e)[:300]!r}", flush=True)
            if os.environ.get("SIGINT_WORKER_DEBUG"):
                import traceback

                traceback.print_exception(e)
    # before any new Checkpointer opens the directory (it would remove stale temporaries)
    print("DIR", " ".join(sorted(os.listdir(directory))), flush=True)
    with Checkpointer(directory) as ckpt:
        newest = ckpt.latest_step()
        got = ckpt.restore(template=state).state
    assert newest is not None, "no checkpoint was written"
    # the oracle: the same jitted step from the same start, run by hand for `newest` meta steps
    ref = step.init({"w": jnp.full((F,), 0.1)}, jnp.zeros(N_LAM))
    run, bases, metas = jax.jit(step), base_batches(0), meta_batches(0)
    for _ in range(int(newest)):
        ref, _ = run(ref, next(bases), next(metas))
    same = all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref))
    )
    print("NEWEST", newest, "IDENTICAL", same, flush=True)


if __name__ == "__main__":
    main()
