"""bilevel_jax.fit: equals the hand-written loop, logs, skips, interrupts, resumes."""

import itertools
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import warnings
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.checkpoint import Checkpointer

N, D, C, K, B = 64, 5, 3, 2, 8

_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(N, D)), jnp.float32)
Y = jnp.asarray(_rng.integers(0, C, N), jnp.int32)


def base_loss(theta, lam, batch):
    x, y, idx = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(x @ theta["w"] + theta["b"], y)
    w = jax.nn.sigmoid(lam[idx])
    return jnp.sum(w * ce) / jnp.sum(w)


def meta_loss(theta, lam, batch):
    del lam
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(x @ theta["w"] + theta["b"], y).mean()


STEP = bj.bilevel_step(
    base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1), bj.sama(adapt_from="last")
)
META = (X[:16], Y[:16])


def fresh_state():
    theta = {"w": 0.1 * jax.random.normal(jax.random.key(1), (D, C)), "b": jnp.zeros(C)}
    return STEP.init(theta, jnp.zeros(N))


def batches_at(t, nan=False):
    """The K stacked base batches of meta step t (deterministic in t)."""
    idx = np.random.default_rng(t).integers(0, N, (K, B))
    x = np.asarray(X)[idx]
    if nan:
        x = np.full_like(x, np.nan)
    return x, np.asarray(Y)[idx], idx


def base_fn(start, nan_from=None):
    for t in itertools.count(start):
        yield batches_at(t, nan=nan_from is not None and t >= nan_from)


def assert_trees_equal(a, b):
    chex.assert_trees_all_equal(a, b)  # same structure, bit-identical leaves


def manual(n):
    jstep = jax.jit(STEP)
    state, ms = fresh_state(), []
    for t in range(n):
        state, m = jstep(state, batches_at(t), META)
        ms.append(jax.device_get(m))
    return state, ms


def read_log(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_fit_equals_manual_steps_and_logs_one_line_per_step(tmp_path):
    log = tmp_path / "m.jsonl"
    evals = []

    def eval_fn(state):
        evals.append(int(state.meta_steps))
        return {"meta": meta_loss(state.base_params, None, META)}

    state, hist = bj.fit(
        STEP,
        fresh_state(),
        base_fn,
        itertools.repeat(META),
        num_meta_steps=7,
        eval_fn=eval_fn,
        eval_every=3,
        log_path=log,
        progress=False,
    )
    ref, ref_metrics = manual(7)
    assert_trees_equal(state, ref)  # bit-identical on CPU
    assert int(state.meta_steps) == 7 and int(state.base_steps) == 7 * K

    lines = read_log(log)
    assert lines == hist
    assert [r["meta_steps"] for r in lines] == list(range(1, 8))
    assert [r["base_steps"] for r in lines] == [K * i for i in range(1, 8)]
    for rec, m in zip(lines, ref_metrics):
        for k, v in m.items():
            assert math.isfinite(rec[k]) and rec[k] == float(v), k
    assert evals == [3, 6, 7]  # every 3 and after the last step
    assert [r["meta_steps"] for r in lines if "eval" in r] == [3, 6, 7]
    assert all(math.isfinite(r["eval"]["meta"]) for r in lines if "eval" in r)


def test_fit_with_plain_iterators_without_donation_or_jit():
    state0 = fresh_state()
    state, hist = bj.fit(
        STEP,
        state0,
        (batches_at(t) for t in range(3)),
        [META] * 3,
        num_meta_steps=3,
        donate=False,
        progress=False,
    )
    assert_trees_equal(state, manual(3)[0])
    assert_trees_equal(state0, fresh_state())  # not donated: still readable, unchanged
    state, hist = bj.fit(
        STEP, fresh_state(), [batches_at(0)], [META], num_meta_steps=1, jit=False, progress=False
    )
    # eager vs jit may round apart
    chex.assert_trees_all_close(state, manual(1)[0], rtol=1e-5, atol=1e-7)
    assert len(hist) == 1


def test_data_running_out_warns_and_stops():
    with pytest.warns(UserWarning, match="ran out after 2 of 5"):
        state, hist = bj.fit(
            STEP,
            fresh_state(),
            [batches_at(0), batches_at(1)],
            itertools.repeat(META),
            num_meta_steps=5,
            progress=False,
        )
    assert int(state.meta_steps) == 2 and len(hist) == 2
    state, hist = bj.fit(
        STEP,
        fresh_state(),
        [batches_at(0)],
        itertools.repeat(META),
        num_meta_steps=None,
        progress=False,
    )
    assert int(state.meta_steps) == 1


def test_max_skips_stops_with_clear_error(tmp_path):
    log = tmp_path / "m.jsonl"
    with pytest.raises(bj.TooManySkipsError, match="base steps") as e:
        bj.fit(
            STEP,
            fresh_state(),
            lambda s: base_fn(s, nan_from=3),
            itertools.repeat(META),
            num_meta_steps=50,
            max_skips=3,
            log_path=log,
            progress=False,
        )
    state = e.value.state
    assert int(state.skipped_base) > 3
    assert int(state.meta_steps) < 50  # stopped early (at most sync_lag steps after the limit)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.base_params))
    lines = read_log(log)
    assert len(lines) == int(state.meta_steps) == len(e.value.history)
    assert [r["base_skipped"] for r in lines[:3]] == [0, 0, 0] and lines[3]["base_skipped"] == K
    # without a limit the same run completes, θ frozen at its last finite value
    state, _ = bj.fit(
        STEP,
        fresh_state(),
        lambda s: base_fn(s, nan_from=3),
        itertools.repeat(META),
        num_meta_steps=6,
        progress=False,
    )
    assert int(state.skipped_base) == 3 * K
    ref, _ = manual(3)
    assert_trees_equal(state.base_params, ref.base_params)


class _Interrupt:
    """eval_fn that raises KeyboardInterrupt at a given meta step."""

    def __init__(self, at):
        self.at = at

    def __call__(self, state):
        if int(state.meta_steps) == self.at:
            raise KeyboardInterrupt
        return {"meta": meta_loss(state.base_params, None, META)}


def test_interrupt_in_eval_fn_checkpoints_and_resume_matches(tmp_path):
    ckpt, log = Checkpointer(tmp_path / "ckpt", max_to_keep=2), tmp_path / "m.jsonl"
    kw: dict[str, Any] = dict(
        num_meta_steps=10, eval_every=2, log_path=log, checkpointer=ckpt, progress=False
    )
    with pytest.raises(KeyboardInterrupt):
        bj.fit(STEP, fresh_state(), base_fn, itertools.repeat(META), eval_fn=_Interrupt(6), **kw)
    assert ckpt.latest_step() == 6
    _, saved, extra = ckpt.restore(fresh_state())
    assert extra["data_position"] == 6 and int(saved.meta_steps) == 6
    assert [r["meta_steps"] for r in read_log(log)] == [1, 2, 3, 4, 5, 6]

    state, hist = bj.fit(
        STEP,
        fresh_state(),
        base_fn,
        itertools.repeat(META),
        eval_fn=_Interrupt(-1),
        resume=True,
        **kw,
    )
    assert [r["meta_steps"] for r in hist] == [7, 8, 9, 10]
    assert_trees_equal(state, manual(10)[0])
    assert [r["meta_steps"] for r in read_log(log)] == list(range(1, 11))
    assert ckpt.latest_step() == 10  # the final state is saved too


def test_interrupt_from_plain_iterator_and_resume_with_recreated_iterator(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")

    def stream(interrupt_at=None):  # a plain (not factory) deterministic generator
        for t in itertools.count():
            if t == interrupt_at:
                raise KeyboardInterrupt
            yield batches_at(t)

    with pytest.raises(KeyboardInterrupt):
        bj.fit(
            STEP,
            fresh_state(),
            stream(interrupt_at=4),
            itertools.repeat(META),
            num_meta_steps=9,
            checkpointer=ckpt,
            progress=False,
        )
    assert ckpt.latest_step() == 4
    state, hist = bj.fit(
        STEP,
        fresh_state(),
        stream(),
        itertools.repeat(META),
        num_meta_steps=9,
        checkpointer=ckpt,
        resume=True,
        progress=False,
    )
    assert len(hist) == 5
    assert_trees_equal(state, manual(9)[0])


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    ckpt, log = Checkpointer(tmp_path / "ckpt"), tmp_path / "m.jsonl"

    def crashing(start):
        for t in itertools.count(start):
            if t == 7:
                raise RuntimeError("node died")  # not an interrupt: no checkpoint on the way out
            yield batches_at(t)

    kw: dict[str, Any] = dict(
        num_meta_steps=12, checkpoint_every=3, checkpointer=ckpt, log_path=log, progress=False
    )
    with pytest.raises(RuntimeError, match="node died"):
        bj.fit(STEP, fresh_state(), crashing, itertools.repeat(META), **kw)
    assert ckpt.all_steps() == [3, 6]
    assert [r["meta_steps"] for r in read_log(log)] == list(range(1, 8))
    state, _ = bj.fit(STEP, fresh_state(), base_fn, itertools.repeat(META), resume=True, **kw)
    assert_trees_equal(state, manual(12)[0])
    assert [r["meta_steps"] for r in read_log(log)] == list(range(1, 13))  # step 7 not doubled
    # resuming a finished run is a no-op
    again, hist = bj.fit(STEP, fresh_state(), base_fn, itertools.repeat(META), resume=True, **kw)
    assert hist == [] and int(again.meta_steps) == 12


def test_fresh_run_refuses_a_directory_with_checkpoints(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt")
    bj.fit(
        STEP,
        fresh_state(),
        base_fn,
        itertools.repeat(META),
        num_meta_steps=2,
        checkpointer=ckpt,
        progress=False,
    )
    with pytest.raises(ValueError, match="resume=True"):
        bj.fit(
            STEP,
            fresh_state(),
            base_fn,
            itertools.repeat(META),
            num_meta_steps=2,
            checkpointer=ckpt,
            progress=False,
        )
    with pytest.raises(ValueError, match="needs a checkpointer"):
        bj.fit(STEP, fresh_state(), base_fn, itertools.repeat(META), num_meta_steps=2, resume=True)


def test_tensorboard_is_optional(tmp_path):
    try:
        import tensorboardX  # noqa: F401  # pyright: ignore[reportMissingImports]  (optional: the test covers its absence)
    except ImportError:
        try:
            import torch.utils.tensorboard  # noqa: F401  # pyright: ignore[reportMissingImports]  (optional: the test covers its absence)
        except ImportError:
            with pytest.warns(UserWarning, match="tensorboard"):
                bj.fit(
                    STEP,
                    fresh_state(),
                    base_fn,
                    itertools.repeat(META),
                    num_meta_steps=2,
                    tensorboard_dir=tmp_path / "tb",
                    progress=False,
                )
            return
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bj.fit(
            STEP,
            fresh_state(),
            base_fn,
            itertools.repeat(META),
            num_meta_steps=2,
            tensorboard_dir=tmp_path / "tb",
            progress=False,
        )
    assert any((tmp_path / "tb").iterdir())


def test_progress_bar_runs(capsys):
    bj.fit(
        STEP,
        fresh_state(),
        base_fn,
        itertools.repeat(META),
        num_meta_steps=3,
        progress=True,
        desc="sama",
    )
    assert "sama" in capsys.readouterr().err


def test_sigkill_during_fit_then_resume_is_bit_identical(tmp_path):
    """A bilevel run killed with SIGKILL mid-training and resumed ends bit-identical."""
    worker = pathlib.Path(__file__).resolve().parent / "_fit_worker.py"
    repo = str(worker.parents[1])

    def run(directory, out, kill_at=None):
        env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("FIT_KILL_AT", None)
        if kill_at is not None:
            env["FIT_KILL_AT"] = str(kill_at)
        return subprocess.run(
            [sys.executable, str(worker), str(directory), str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    ref = run(tmp_path / "ref", tmp_path / "ref.npz")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run(tmp_path / "run", tmp_path / "run.npz", kill_at=23)  # last checkpoint: 20
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr[-2000:])
    assert not (tmp_path / "run.npz").exists()
    resumed = run(tmp_path / "run", tmp_path / "run.npz")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "run.npz")
    assert int(a["meta_steps"]) == int(b["meta_steps"]) == 40
    assert a["w"].tobytes() == b["w"].tobytes() and a["lam"].tobytes() == b["lam"].tobytes()


def test_ctrl_c_during_a_periodic_save_writes_the_interrupt_checkpoint(tmp_path):
    """Issue 12 item 5: SIGINT while orbax writes a periodic checkpoint. fit must re-raise
    KeyboardInterrupt (not an orbax FileNotFoundError / NOT_FOUND), write the interrupt
    checkpoint only after the interrupted save is cleaned up (before the fix it was written over
    that save's unfinalized temporary directory, racing its writers), leave no temporary
    directory, and the newest checkpoint restores bit-identically."""
    worker = pathlib.Path(__file__).resolve().parent / "_fit_sigint_worker.py"
    repo = str(worker.parents[1])
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(worker), str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert "SIGNAL_IN_SAVE" in lines, proc.stdout  # the signal went out mid-save
    assert "RESAVE writer_alive=False tmp=[]" in lines, proc.stdout
    assert "RAISED KeyboardInterrupt ''" in lines, proc.stdout + proc.stderr[-3000:]
    assert "DIR 2 4" in lines, proc.stdout  # no *.orbax-checkpoint-tmp left
    assert "NEWEST 4 IDENTICAL True" in lines, proc.stdout
