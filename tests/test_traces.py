"""The bilevel step under ``jit`` and ``bj.fit`` compile once per shape (``chex.assert_max_traces``).

A retrace (a state leaf whose dtype drifts between calls, a Python scalar that changes, a
fresh closure per call) would recompile the whole bilevel step every meta step; these tests
catch it.
"""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

K, B, F = 3, 8, 4


def base_loss(th, lam, batch):
    x, y = batch
    return jnp.mean(jax.nn.softplus(x @ lam) * (x @ th - y) ** 2) + 1e-3 * jnp.sum(th**2)


def meta_loss(th, lam, batch):
    x, y = batch
    return jnp.mean((x @ th - y) ** 2)


def _batches(seed, k=K, b=B):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(k, b, F)), jnp.float32),
        jnp.asarray(rng.normal(size=(k, b)), jnp.float32),
    )


META = (jnp.ones((6, F)), jnp.zeros(6))


@pytest.fixture(autouse=True)
def _fresh_trace_counter():
    chex.clear_trace_counter()
    yield
    chex.clear_trace_counter()


@pytest.mark.parametrize(
    "method, kw",
    [
        (bj.sama(0.1, adapt_from="last", step_along_v=True), {}),
        (bj.soba(0.1), {"on_nonfinite": "warn"}),
        (bj.sama(0.1), {"compute_dtype": jnp.bfloat16}),
    ],
    ids=["sama_along_v", "soba_warn", "sama_bf16"],
)
def test_jitted_bilevel_step_compiles_once_per_shape(method, kw):
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-2), method, **kw)
    state = step.init(jnp.zeros(F), jnp.zeros(F))

    traces = []  # an exact count besides chex's upper bound

    @chex.assert_max_traces(n=1)
    def one_shape(state, base_batches, meta_batch):
        traces.append("one_shape")
        return step(state, base_batches, meta_batch)

    jitted = jax.jit(one_shape, donate_argnums=0)
    for t in range(4):  # state from the previous call, new data of the same shape
        state, metrics = jitted(state, _batches(t), META)
    assert traces == ["one_shape"]
    assert int(state.meta_steps) == 4 and np.isfinite(float(metrics["meta_loss"]))

    @chex.assert_max_traces(n=2)
    def two_shapes(state, base_batches, meta_batch):
        traces.append(jax.tree.leaves(base_batches)[0].shape[0])
        return step(state, base_batches, meta_batch)

    jitted = jax.jit(two_shapes)
    for t in range(3):
        state, _ = jitted(state, _batches(t), META)
    for t in range(3):  # K = 5 base steps per meta step: one more compile, then none
        state, _ = jitted(state, _batches(t, k=5), META)
    assert traces == ["one_shape", K, 5]
    assert int(state.base_steps) == 4 * K + 3 * K + 3 * 5


def test_fit_traces_its_step_once_over_a_run(tmp_path):
    step = bj.bilevel_step(
        base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-2), bj.sama(0.1, adapt_from="last")
    )

    @chex.assert_max_traces(n=1)
    def traced_step(state, base_batches, meta_batch):
        return step(state, base_batches, meta_batch)

    evals = []
    state, history = bj.fit(
        traced_step,
        step.init(jnp.zeros(F), jnp.zeros(F)),
        lambda start: (_batches(t) for t in itertools.count(start)),
        itertools.repeat(META),
        num_meta_steps=8,
        eval_fn=lambda s: evals.append(1) or {"loss": meta_loss(s.base_params, None, META)},
        eval_every=3,
        log_path=tmp_path / "log.jsonl",
        progress=False,
        sync_lag=2,
    )
    assert int(state.meta_steps) == 8 and len(history) == 8 and len(evals) == 3
    assert [r["meta_steps"] for r in history] == list(range(1, 9))
    assert [r["base_steps"] for r in history] == [K * i for i in range(1, 9)]
