"""The pure bilevel step: equality with a Python loop, safe skipping, input errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

K, B, F, NM = 4, 8, 3, 6


def _data(dtype=jnp.float32, seed=0, steps=3):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    xs = jax.random.normal(k[0], (steps, K, B, F), dtype)
    ys = jax.random.normal(k[1], (steps, K, B), dtype)
    meta = (jax.random.normal(k[2], (NM, F), dtype), jax.random.normal(k[3], (NM,), dtype))
    return xs, ys, meta


def base_loss(th, lam, batch):
    x, y = batch
    r = jnp.tanh(x @ th["w"]) - y
    return jnp.mean(jax.nn.softplus(lam["a"]) * r**2) + jnp.sum(lam["c"] * th["w"] ** 2)


def meta_loss(th, lam, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ th["w"]) - y) ** 2)


def _init(dtype=jnp.float32):
    return {"w": jnp.full((F,), 0.1, dtype)}, {
        "a": jnp.zeros(B, dtype),
        "c": jnp.full(F, 0.01, dtype),
    }


def _leaves_equal(a, b):
    return all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


@pytest.mark.parametrize(
    "method, along_v",
    [
        (bj.sama(adapt_from="last"), False),
        (bj.sama(step_along_v=True), True),
        (bj.neumann(3, 0.1), False),
    ],
    ids=["sama_last", "sama_base_step", "neumann"],
)
def test_jitted_step_equals_a_python_loop(x64, method, along_v):
    xs, ys, meta = _data(jnp.float64)
    btx, mtx = optax.adam(1e-2), optax.adam(1e-1)
    step = bj.bilevel_step(base_loss, meta_loss, btx, mtx, method)
    th0, lam0 = _init(jnp.float64)
    state = step.init(th0, lam0)
    jstep = jax.jit(step, donate_argnums=0)
    for t in range(xs.shape[0]):
        state, metrics = jstep(state, (xs[t], ys[t]), meta)

    th, bs, lam, ms = th0, btx.init(th0), lam0, mtx.init(lam0)
    problem = bj.BilevelProblem(base_loss, meta_loss, btx)
    mstate = method.init(th, lam)
    for t in range(xs.shape[0]):
        for i in range(K):
            g = jax.grad(base_loss)(th, lam, (xs[t, i], ys[t, i]))
            last_g, last_s = g, bs
            upd, bs = btx.update(g, bs, th)
            th = optax.apply_updates(th, upd)
        inputs = bj.BilevelInputs(th, lam, bs, (xs[t, -1], ys[t, -1]), meta, last_g, last_s)
        hg, mstate = method.hypergrad(problem, inputs, mstate)
        upd, ms = mtx.update(hg.meta_grad, ms, lam)
        lam = optax.apply_updates(lam, upd)
        if along_v:
            th = optax.apply_updates(th, hg.base_update)

    for a, b in zip(
        jax.tree.leaves((state.base_params, state.meta_params)), jax.tree.leaves((th, lam))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)
    assert int(state.base_steps) == 3 * K and int(state.meta_steps) == 3
    assert int(state.skipped_base) == 0 and int(state.skipped_meta) == 0
    assert np.isfinite(float(metrics["meta_loss"]))


def test_nan_base_batch_is_a_bit_identical_no_op():
    xs, ys, meta = _data()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    jstep = jax.jit(step)
    state = step.init(*_init())
    bad = xs[0].at[1, 0, 0].set(jnp.nan)
    with_nan, m = jstep(state, (bad, ys[0]), meta)
    keep = jnp.array([0, 2, 3])
    without, _ = jstep(state, (xs[0][keep], ys[0][keep]), meta)
    assert _leaves_equal(with_nan.base_params, without.base_params)
    assert _leaves_equal(with_nan.base_opt_state, without.base_opt_state)
    assert _leaves_equal(with_nan.meta_params, without.meta_params)
    assert int(with_nan.skipped_base) == 1 and int(m["base_skipped"]) == 1
    assert int(with_nan.base_steps) == K  # the skipped step is still counted as taken


def test_all_base_steps_nan_leaves_theta_and_state_bit_identical():
    xs, ys, meta = _data()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    state = step.init(*_init())
    new, _ = jax.jit(step)(state, (jnp.full_like(xs[0], jnp.nan), ys[0]), meta)
    assert _leaves_equal(new.base_params, state.base_params)
    assert _leaves_equal(new.base_opt_state, state.base_opt_state)
    assert int(new.skipped_base) == K


def test_nan_meta_batch_skips_the_meta_step_bit_identically():
    xs, ys, meta = _data()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1), bj.soba(0.1))
    state = step.init(*_init())
    bad_meta = (meta[0].at[0, 0].set(jnp.inf), meta[1])
    new, m = jax.jit(step)(state, (xs[0], ys[0]), bad_meta)
    assert _leaves_equal(new.meta_params, state.meta_params)
    assert _leaves_equal(new.meta_opt_state, state.meta_opt_state)
    assert _leaves_equal(new.method_state, state.method_state)
    assert int(new.skipped_meta) == 1 and int(m["meta_skipped"]) == 1
    assert not _leaves_equal(new.base_params, state.base_params)  # base steps were fine
    with pytest.raises(bj.TooManySkipsError, match="1 meta steps were skipped"):
        bj.check_skips(new, max_skips=0)
    bj.check_skips(new, max_skips=1)  # within the limit


@pytest.mark.parametrize(
    "batches, match",
    [
        (lambda xs, ys: (xs[0][:0], ys[0][:0]), "K = 0"),
        (lambda xs, ys: (xs[0][:, :0], ys[0][:, :0]), "is empty"),
        (lambda xs, ys: (xs[0], ys[0][:2]), "same leading axis"),
        (lambda xs, ys: (), "no array leaves"),
    ],
    ids=["k0", "empty_batch", "ragged_k", "no_leaves"],
)
def test_bad_batches_are_refused_at_trace_time(batches, match):
    xs, ys, meta = _data()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    with pytest.raises(bj.BilevelInputError, match=match):
        jax.jit(step)(step.init(*_init()), batches(xs, ys), meta)


def test_state_with_mismatched_params_names_the_leaf():
    xs, ys, meta = _data()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    state = step.init(*_init())
    state = state._replace(base_params={"w": jnp.zeros(F + 1)})
    with pytest.raises(bj.BilevelInputError, match=r"\['w'\].*shape"):
        jax.jit(step)(state, (xs[0], ys[0]), meta)


def test_model_state_is_threaded_through_successful_base_steps_only():
    xs, ys, meta = _data()

    def stateful_base(th, lam, batch, count):
        return base_loss(th, lam, batch), count + 1

    def stateful_meta(th, lam, batch, count):
        return meta_loss(th, lam, batch)

    step = bj.bilevel_step(
        stateful_base, stateful_meta, optax.adam(1e-2), optax.adam(1e-1), stateful=True
    )
    state = step.init(*_init(), model_state=jnp.zeros([], jnp.int32))
    bad = xs[0].at[2, 0, 0].set(jnp.nan)
    new, _ = jax.jit(step)(state, (bad, ys[0]), meta)
    assert int(new.model_state) == K - 1


def test_rng_keys_are_fresh_per_step_and_deterministic():
    xs, ys, meta = _data()

    def noisy_base(th, lam, batch, seen, *, rng):  # records each base step's key
        return base_loss(th, lam, batch), jnp.roll(seen, 1, axis=0).at[0].set(rng)

    def noisy_meta(th, lam, batch, seen, *, rng):
        return meta_loss(th, lam, batch)

    step = bj.bilevel_step(
        noisy_base, noisy_meta, optax.adam(1e-2), optax.adam(1e-1), stateful=True, use_rng=True
    )
    seen0 = jnp.zeros((K, 2), jnp.uint32)
    state = step.init(*_init(), model_state=seen0, rng=jax.random.PRNGKey(7))
    a, _ = jax.jit(step)(state, (xs[0], ys[0]), meta)
    b, _ = jax.jit(step)(state, (xs[0], ys[0]), meta)
    assert _leaves_equal(a, b)  # deterministic given state.rng
    keys = {tuple(np.asarray(k)) for k in a.model_state}
    assert len(keys) == K  # one distinct key per base step
    c, _ = jax.jit(step)(a, (xs[0], ys[0]), meta)
    assert not {tuple(np.asarray(k)) for k in c.model_state} & keys  # and new ones next call


def test_deprecated_base_step_along_v_requires_a_method_with_step_along_v():
    with (
        pytest.warns(DeprecationWarning, match="base_step_along_v"),
        pytest.raises(ValueError, match="base_step_along_v=True needs"),
    ):
        bj.bilevel_step(
            base_loss, meta_loss, optax.sgd(0.1), optax.sgd(0.1), bj.cg(3), base_step_along_v=True
        )


def test_the_method_switch_alone_applies_the_base_step_along_v():
    """``sama(step_along_v=True)`` is enough; the old second flag only warns and agrees."""
    xs, ys, meta = _data()
    tx = (optax.adam(1e-2), optax.adam(1e-1))
    along = bj.bilevel_step(base_loss, meta_loss, *tx, bj.sama(0.1, step_along_v=True))
    plain = bj.bilevel_step(base_loss, meta_loss, *tx, bj.sama(0.1))
    with pytest.warns(DeprecationWarning, match=r"use bj.sama\(step_along_v=True\)"):
        old = bj.bilevel_step(
            base_loss, meta_loss, *tx, bj.sama(0.1, step_along_v=True), base_step_along_v=True
        )
    state = along.init(*_init())
    a, _ = jax.jit(along)(state, (xs[0], ys[0]), meta)
    b, _ = jax.jit(plain)(state, (xs[0], ys[0]), meta)
    c, _ = jax.jit(old)(state, (xs[0], ys[0]), meta)
    assert _leaves_equal(a, c) and _leaves_equal(a.meta_params, b.meta_params)
    # θ differs from the plain step by exactly the applied base update −εv
    phase, _ = plain.base_phase(
        state._replace(rng=jax.random.split(state.rng, 3)[1]), (xs[0], ys[0])
    )
    assert not _leaves_equal(a.base_params, b.base_params)
    assert _leaves_equal(b.base_params, phase.base_params)


def test_init_buffers_do_not_alias_so_the_state_can_be_donated():
    th, lam = _init()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    state = step.init(th, lam)
    ptrs = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
    assert len(set(ptrs)) == len(ptrs)
    xs, ys, meta = _data()
    new, _ = jax.jit(step, donate_argnums=0)(state, (xs[0], ys[0]), meta)
    assert float(th["w"][0]) == pytest.approx(0.1)  # the caller's params were copied, not donated
    assert int(new.meta_steps) == 1


def test_bf16_compute_keeps_float32_masters():
    xs, ys, meta = _data()
    step = bj.bilevel_step(
        base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1), compute_dtype=jnp.bfloat16
    )
    state = step.init(*_init())
    new, m = jax.jit(step)(state, (xs[0], ys[0]), meta)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((new.base_params, new.meta_params)))
    assert all(
        x.dtype == jnp.float32
        for x in jax.tree.leaves(new.base_opt_state)
        if jnp.issubdtype(x.dtype, jnp.floating)
    )
    assert m["eps"].dtype == jnp.float32 and np.isfinite(float(m["meta_loss"]))


def test_state_with_another_dtype_names_the_leaf():
    xs, ys, meta = _data()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    state = step.init(*_init())
    bf16_state = optax.adam(1e-2).init(
        jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.base_params)
    )
    with pytest.raises(bj.BilevelInputError, match=r"mu\b.*dtype bfloat16.*float32"):
        jax.jit(step)(state._replace(base_opt_state=bf16_state), (xs[0], ys[0]), meta)


def test_batch_the_loss_cannot_take_is_reported_at_trace_time():
    xs, ys, meta = _data()
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    wrong = (jnp.ones((K, B, F + 2)), ys[0])  # features do not match θ
    with pytest.raises(
        bj.BilevelInputError, match=r"calling base_loss\(base_params, meta_params, batch\) failed"
    ):
        jax.jit(step)(step.init(*_init()), wrong, meta)


def test_a_skipped_last_base_step_skips_a_last_adapted_meta_step_too():
    """adapt_from="last" takes the last base step's gradient: non-finite there -> no meta step."""
    xs, ys, meta = _data()
    step = bj.bilevel_step(
        base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1), bj.sama(0.1, adapt_from="last")
    )
    state = step.init(*_init())
    bad = xs[0].at[-1, 0, 0].set(jnp.nan)  # only the last of the K base batches
    new, m = jax.jit(step)(state, (bad, ys[0]), meta)
    assert int(new.skipped_base) == 1 and int(new.skipped_meta) == 1
    assert _leaves_equal(new.meta_params, state.meta_params)
    assert not _leaves_equal(new.base_params, state.base_params)  # the other K-1 steps ran


def test_phases_compose_to_the_step_bit_identically():
    """``base_phase`` → ``meta_phase`` with the keys ``__call__`` splits is ``__call__``."""
    xs, ys, meta = _data()
    step = bj.bilevel_step(
        base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1), bj.sama(0.1, adapt_from="last")
    )
    state = step.init(*_init(), rng=jax.random.PRNGKey(5))

    def by_phases(state, batches, meta_batch):
        rng, base_rng, meta_rng = jax.random.split(state.rng, 3)
        state, base = step.base_phase(state._replace(rng=base_rng), batches)
        state, hg = step.meta_phase(
            state._replace(rng=meta_rng),
            base.last_batch,
            meta_batch,
            last_grad=base.last_grad,
            last_opt_state=base.last_opt_state,
        )
        return state._replace(rng=rng), base, hg

    # Op by op (no jit): the same operations give the same bits whatever XLA's code generator
    # does with two differently fused programs (the suite's classic fusion emitter rounds them
    # differently, tests/_xla.py)
    with jax.disable_jit():
        a, m = step(state, (xs[0], ys[0]), meta)
        b, base, hg = by_phases(state, (xs[0], ys[0]), meta)
    assert _leaves_equal(a, b)
    assert base.losses.shape == (K,) and bool(base.finite.all()) and bool(hg.finite)
    assert float(m["meta_loss"]) == float(hg.meta_loss)


def test_base_phase_is_k_calls_of_bj_base_step_and_meta_phase_the_method():
    """Oracle: K calls of the public base step, then the method and the meta optimizer."""
    xs, ys, meta = _data()
    btx, mtx, method = optax.adam(1e-2), optax.adam(1e-1), bj.soba(0.1)
    step = bj.bilevel_step(base_loss, meta_loss, btx, mtx, method)
    state = step.init(*_init())

    def by_hand(th, s, lam, ms, mstate):
        for i in range(K):
            r = bj.base_step(base_loss, btx, th, s, lam, (xs[0][i], ys[0][i]))
            th, s = r.params, r.opt_state
        problem = bj.BilevelProblem(base_loss, meta_loss, btx)
        inputs = bj.BilevelInputs(th, lam, s, (xs[0][-1], ys[0][-1]), meta)
        hg, mstate = method.hypergrad(problem, inputs, mstate)
        upd, ms = mtx.update(hg.meta_grad, ms, lam)
        return th, s, optax.apply_updates(lam, upd), ms, mstate

    new, _ = jax.jit(step)(state, (xs[0], ys[0]), meta)
    expect = jax.jit(by_hand)(
        state.base_params,
        state.base_opt_state,
        state.meta_params,
        state.meta_opt_state,
        state.method_state,
    )
    got = (new.base_params, new.base_opt_state, new.meta_params, new.meta_opt_state)
    for a, b in zip(jax.tree.leaves((got, new.method_state)), jax.tree.leaves(expect)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_counters_have_new_names_and_the_old_ones_warn():
    step = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1))
    state = step.init(*_init())._replace(base_steps=jnp.int32(8), meta_steps=jnp.int32(2))
    assert state._fields[7:] == ("base_steps", "meta_steps", "skipped_base", "skipped_meta")
    with pytest.warns(DeprecationWarning, match="base_steps"):
        assert int(state.step) == 8
    with pytest.warns(DeprecationWarning, match="meta_steps"):
        assert int(state.meta_step) == 2
    with pytest.warns(DeprecationWarning, match=r"step.init\(...\)"):
        bj.init_bilevel_state(step, *_init())


def test_bilevel_step_is_built_by_keyword():
    with pytest.raises(TypeError):
        bj.BilevelStep(base_loss, meta_loss, optax.sgd(0.1), optax.sgd(0.1))  # type: ignore[misc]
    step = bj.BilevelStep(
        base_loss=base_loss, meta_loss=meta_loss, base_tx=optax.sgd(0.1), meta_tx=optax.sgd(0.1)
    )
    assert step.method.name == "sama" and step.on_nonfinite == "skip"


@pytest.mark.parametrize("where", ["base", "meta"])
def test_on_nonfinite_warn_and_raise(where):
    xs, ys, meta = _data()
    batches = (xs[0].at[1, 0, 0].set(jnp.nan) if where == "base" else xs[0], ys[0])
    meta_batch = (meta[0].at[0, 0].set(jnp.inf), meta[1]) if where == "meta" else meta
    match = "a base step's loss or gradient" if where == "base" else "the hypergradient"

    def make(mode):
        return bj.bilevel_step(
            base_loss, meta_loss, optax.adam(1e-2), optax.adam(1e-1), on_nonfinite=mode
        )

    skip = make("skip")
    state = skip.init(*_init())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "skip" says nothing
        ref, _ = jax.jit(skip)(state, batches, meta_batch)
        jax.effects_barrier()
    warn = make("warn")
    with pytest.warns(RuntimeWarning, match=f"bilevel_step: {match} is not finite"):
        new, _ = jax.jit(warn)(state, batches, meta_batch)
        jax.effects_barrier()
    assert _leaves_equal(new, ref)  # still skipped and counted, as with "skip"
    with pytest.raises(Exception, match=f"{match} is not finite"):
        jax.block_until_ready(jax.jit(make("raise"))(state, batches, meta_batch))
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        make("ignore")
    # a finite step calls back nowhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(jax.jit(make("raise"))(state, (xs[0], ys[0]), meta))
