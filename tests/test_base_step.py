"""bj.base_step (the one base step) and the shared non-finite convention (_nonfinite)."""

import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import _nonfinite

A = np.array([[1.0, 2.0], [0.5, -1.0], [3.0, 0.0]], np.float32)
B = np.array([1.0, -2.0, 0.5], np.float32)
W0 = np.array([0.3, -0.7], np.float32)


def quad(w, a, b):
    r = a @ w - b
    return 0.5 * jnp.sum(r * r)


def test_adam_step_matches_hand_computation():
    lr, eps = 0.1, 1e-8
    tx = optax.adam(lr, eps=eps)
    w = jnp.asarray(W0)
    r = jax.jit(lambda w, s: bj.base_step(quad, tx, w, s, A, B))(w, tx.init(w))
    a, b, w64 = A.astype(np.float64), B.astype(np.float64), W0.astype(np.float64)
    res = a @ w64 - b
    g = a.T @ res  # ∇ 0.5‖Aw − b‖²
    # Adam's first step: m = (1 − β1) g, v = (1 − β2) g², m̂ = m / (1 − β1¹), v̂ = v / (1 − β2¹),
    # update = −lr m̂ / (√v̂ + eps) (≈ −lr g / |g|). The constants as optax holds them in
    # float32: 1 − β is rounded from the Python float, the bias correction 1 − β^t is taken
    # from float32 β (they differ by 1e-5 relative for β2, which moves the update by 6e-6).
    f32 = lambda x: np.float64(np.float32(x))  # noqa: E731
    m_hat = f32(1 - 0.9) * g / (1 - f32(0.9))
    v_hat = f32(1 - 0.999) * g**2 / (1 - f32(0.999))
    np.testing.assert_allclose(r.loss, 0.5 * res @ res, rtol=1e-6)
    np.testing.assert_allclose(r.grad, g, rtol=1e-6)
    np.testing.assert_allclose(r.params, w64 - lr * m_hat / (np.sqrt(v_hat) + eps), rtol=1e-6)
    assert int(r.opt_state[0].count) == 1
    assert bool(r.finite) and r.aux is None


def test_bit_identical_to_the_hand_written_step():
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-3))
    w = jnp.asarray(W0)
    s = tx.init(w)

    def by_hand(w, s):
        loss, g = jax.value_and_grad(quad)(w, A, B)
        u, s2 = tx.update(g, s, w)
        return optax.apply_updates(w, u), s2, loss, g

    r = jax.jit(lambda w, s: bj.base_step(quad, tx, w, s, A, B))(w, s)
    chex.assert_trees_all_equal((r.params, r.opt_state, r.loss, r.grad), jax.jit(by_hand)(w, s))


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(lambda w, b: jnp.sum(w + jnp.nan * b), id="nan-loss"),
        pytest.param(lambda w, b: jnp.sum(jnp.sqrt(jnp.abs(w - b))), id="inf-grad"),
    ],
)
@pytest.mark.parametrize("jit", [False, True])
def test_nonfinite_step_leaves_params_and_state_bit_identical(bad, jit):
    tx = optax.adam(0.1)
    w = jnp.asarray(W0)
    s = tx.update(jnp.ones(2), tx.init(w), w)[1]  # a non-trivial state
    fn = lambda w, s: bj.base_step(bad, tx, w, s, jnp.asarray(W0))  # noqa: E731
    r = (jax.jit(fn) if jit else fn)(w, s)
    assert not bool(r.finite)
    chex.assert_trees_all_equal((r.params, r.opt_state), (w, s))


def test_reduce_is_applied_before_the_check_and_the_update():
    tx = optax.sgd(0.5)
    w = jnp.asarray(W0)
    seen = []

    def reduce(tree):
        seen.append(jax.tree.structure(tree))
        return jax.tree.map(lambda x: 2.0 * x, tree)

    def loss(w):
        return jnp.sum(w**2), {"m": w}

    r = bj.base_step(loss, tx, w, tx.init(w), has_aux=True, reduce=reduce)
    np.testing.assert_allclose(r.grad, 4.0 * W0, rtol=1e-6)  # 2 · ∇‖w‖²
    np.testing.assert_allclose(r.loss, 2.0 * np.sum(W0**2), rtol=1e-6)
    np.testing.assert_allclose(r.aux["m"], 2.0 * W0, rtol=1e-6)
    np.testing.assert_allclose(r.params, W0 - 0.5 * 4.0 * W0, rtol=1e-6)
    assert len(seen) == 1
    # a reduce that makes the gradient non-finite skips the step
    r = bj.base_step(
        loss, tx, w, tx.init(w), has_aux=True, reduce=lambda t: jax.tree.map(lambda x: x / 0, t)
    )
    assert not bool(r.finite)
    chex.assert_trees_all_equal(r.params, w)


def test_has_aux_returns_aux_even_when_skipped():
    tx = optax.sgd(0.1)
    w = jnp.asarray(W0)

    def loss(w, x):
        return jnp.sum(w * x), {"stat": jnp.mean(x)}

    r = bj.base_step(loss, tx, w, tx.init(w), jnp.array([1.0, 3.0]), has_aux=True)
    assert bool(r.finite)
    np.testing.assert_allclose(r.aux["stat"], 2.0)
    np.testing.assert_allclose(r.params, W0 - 0.1 * np.array([1.0, 3.0]), rtol=1e-6)
    r = bj.base_step(loss, tx, w, tx.init(w), jnp.array([jnp.inf, 3.0]), has_aux=True)
    assert not bool(r.finite) and np.isinf(r.aux["stat"])
    chex.assert_trees_all_equal(r.params, w)


def test_check_finite_false_always_applies_and_still_reports():
    tx = optax.sgd(0.1)
    w = jnp.asarray(W0)
    bad = lambda w: jnp.sum(w) * jnp.nan  # noqa: E731
    r = bj.base_step(bad, tx, w, tx.init(w), check_finite=False)
    assert not bool(r.finite)
    assert np.all(np.isnan(r.params))
    # finite and applied: the same result as with the check (up to rounding: eagerly the
    # update runs op by op, under the check's lax.cond as one compiled branch)
    r1 = bj.base_step(quad, tx, w, tx.init(w), A, B, check_finite=False)
    r2 = bj.base_step(quad, tx, w, tx.init(w), A, B)
    chex.assert_trees_all_close(r1, r2, rtol=1e-6)
    # differentiable through the step (ITD/DDS use it so)
    outer = jax.grad(
        lambda w: quad(bj.base_step(quad, tx, w, tx.init(w), A, B, check_finite=False)[0], A, B)
    )(w)
    assert np.all(np.isfinite(outer))


def test_local_view_is_differentiated_and_params_updated():
    tx = optax.sgd(0.5)
    w = jnp.asarray(W0)
    r = bj.base_step(
        lambda v: jnp.sum(v**2), tx, w, tx.init(w), local=lambda p: p + 1.0
    )  # gradient at w + 1, applied to w
    np.testing.assert_allclose(r.grad, 2.0 * (W0 + 1.0), rtol=1e-6)
    np.testing.assert_allclose(r.params, W0 - 0.5 * 2.0 * (W0 + 1.0), rtol=1e-6)


# ----------------------------------------------------------------------------- _nonfinite


def test_check_mode():
    assert _nonfinite.check_mode("skip", "here") == "skip"
    with pytest.raises(ValueError, match=r"here: on_nonfinite must be one of 'raise', 'warn'"):
        _nonfinite.check_mode("ignore", "here")


@pytest.mark.parametrize("jit", [False, True])
def test_report_raise_names_the_leaves(jit):
    def f(x):
        _nonfinite.report(_nonfinite.all_finite(x), "raise", where="the thing", tree=x)
        return x

    fn = jax.jit(f) if jit else f
    fn({"ok": jnp.ones(2)})  # finite: nothing
    with pytest.raises(Exception, match=r"the thing is not finite.*\['bad'\]") as e:
        jax.block_until_ready(fn({"ok": jnp.ones(2), "bad": jnp.array([0.0, jnp.nan])}))
    assert "FloatingPointError" in repr(e.value) or isinstance(e.value, FloatingPointError)


@pytest.mark.parametrize("jit", [False, True])
def test_report_warn_and_skip(jit):
    def f(x, mode):
        _nonfinite.report(jnp.all(jnp.isfinite(x)), mode, where="x", tree=x)
        return x

    for mode, n in [("warn", 1), ("skip", 0)]:
        fn = jax.jit(f, static_argnums=1) if jit else f
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fn(jnp.ones(2), mode)
            fn(jnp.array([jnp.inf]), mode)
            jax.effects_barrier()
        msgs = [x for x in w if issubclass(x.category, RuntimeWarning)]
        assert len(msgs) == n, [str(x.message) for x in w]
        if n:
            assert "x is not finite" in str(msgs[0].message)


def test_report_inside_scan_only_calls_back_on_nonfinite_steps():
    def body(c, x):
        _nonfinite.report(jnp.isfinite(x), "warn", where="step")
        return c, x

    xs = jnp.array([1.0, jnp.nan, 2.0, jnp.inf])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        jax.jit(lambda xs: jax.lax.scan(body, 0.0, xs))(xs)
        jax.effects_barrier()
    assert len([x for x in w if issubclass(x.category, RuntimeWarning)]) == 2
