"""SAMA against exact autodiff of the mixed second derivative (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.adaptation import adapt


def _problem(dtype=jnp.float64):
    """A small non-quadratic problem: a tanh network with per-example weights and an L2 λ."""
    k = jax.random.split(jax.random.PRNGKey(0), 8)
    n, m, f, h = 32, 16, 6, 5
    x, xm = jax.random.normal(k[0], (n, f), dtype), jax.random.normal(k[1], (m, f), dtype)
    y = (jax.random.normal(k[2], (n,), dtype) > 0).astype(dtype)
    ym = (jax.random.normal(k[3], (m,), dtype) > 0).astype(dtype)
    theta = {
        "w1": 0.5 * jax.random.normal(k[4], (f, h), dtype),
        "w2": 0.5 * jax.random.normal(k[5], (h,), dtype),
    }
    lam = {
        "logit": 0.3 * jax.random.normal(k[6], (n,), dtype),
        "l2": jnp.full((f, h), 0.05, dtype),
    }

    def logits(th, xb):
        return jnp.tanh(xb @ th["w1"]) @ th["w2"]

    def base_loss(th, lam, batch):
        xb, yb = batch
        per_ex = optax.sigmoid_binary_cross_entropy(logits(th, xb), yb)
        return jnp.mean(jax.nn.sigmoid(lam["logit"]) * per_ex) + jnp.sum(lam["l2"] * th["w1"] ** 2)

    def meta_loss(th, lam, batch):
        xb, yb = batch
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(th, xb), yb))

    return base_loss, meta_loss, theta, lam, (x, y), (xm, ym)


def _mixed(base_loss, theta, lam, batch, v):
    """−(∂²L_b/∂λ∂θ) v by exact autodiff: −∇_λ ⟨∇_θ L_b(θ, λ), v⟩."""
    inner = lambda l: optax.tree.vdot(jax.grad(base_loss)(theta, l, batch), v)  # noqa: E731
    return jax.tree.map(jnp.negative, jax.grad(inner)(lam))


def _max_err(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _max_abs(a):
    return max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(a))


def _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state, **kw):
    return jax.jit(
        lambda th, l: bj.sama_hypergrad(
            base_loss,
            meta_loss,
            base_params=th,
            meta_params=l,
            base_tx=tx,
            base_opt_state=state,
            base_batch=bb,
            meta_batch=mb,
            **kw,
        )
    )(theta, lam)


def _alpha_sweep(tx, state, v_of, **kw):
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    d = jax.grad(meta_loss)(theta, lam, mb)
    exact = _mixed(base_loss, theta, lam, bb, v_of(d, theta, lam, bb))
    errs = []
    for alpha in [1e-1, 1e-2, 1e-3]:
        out = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state, alpha=alpha, **kw)
        errs.append(_max_err(out.meta_grad, exact) / _max_abs(exact))
    return errs


def _assert_second_order(errs):
    # central difference: error ∝ ε² = (α/‖v‖)², so each 10× smaller α gives ≈100× less error
    for big, small in zip(errs, errs[1:]):
        assert 50 < big / small < 200, errs
    assert errs[-1] < 1e-6, errs


def test_sama_sgd_equals_exact_mixed_derivative_with_alpha_squared_error(x64):
    lr = 0.1
    tx = optax.sgd(lr)
    theta = _problem()[2]
    errs = _alpha_sweep(tx, tx.init(theta), lambda d, *_: jax.tree.map(lambda x: lr * x, d))
    _assert_second_order(errs)


def test_sama_na_equals_mixed_derivative_without_adaptation(x64):
    tx = optax.adam(1e-3)
    theta = _problem()[2]
    errs = _alpha_sweep(tx, tx.init(theta), lambda d, *_: d, adapt=False)
    _assert_second_order(errs)


def _late_adam_state(tx, theta, lam, bb, base_loss, steps=5):
    state = tx.init(theta)
    for _ in range(steps):
        g = jax.grad(base_loss)(theta, lam, bb)
        upd, state = tx.update(g, state, theta)
        theta = optax.apply_updates(theta, upd)
    return theta, state


def test_sama_adam_equals_mixed_derivative_along_exact_adapted_direction(x64):
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    tx = optax.adamw(1e-2, weight_decay=1e-3)
    theta, state = _late_adam_state(tx, theta, lam, bb, base_loss)
    d = jax.grad(meta_loss)(theta, lam, mb)
    g = jax.grad(base_loss)(theta, lam, bb)
    v = adapt(tx, d, grads=g, state=state, params=theta, rule="vjp")
    exact = _mixed(base_loss, theta, lam, bb, v)
    errs = []
    for alpha in [1e-1, 1e-2, 1e-3]:
        out = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state, alpha=alpha)
        errs.append(_max_err(out.meta_grad, exact) / _max_abs(exact))
    _assert_second_order(errs)


def test_adaptation_changes_the_direction_under_adam(x64):
    """SAMA and SAMA-NA differ under Adam (they coincide only up to scale under SGD)."""
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    tx = optax.adam(1e-2)
    theta, state = _late_adam_state(tx, theta, lam, bb, base_loss)
    a = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state).meta_grad
    b = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state, adapt=False).meta_grad
    fa, fb = (
        jnp.concatenate([x.ravel() for x in jax.tree.leaves(a)]),
        jnp.concatenate([x.ravel() for x in jax.tree.leaves(b)]),
    )
    cos = float(fa @ fb / (jnp.linalg.norm(fa) * jnp.linalg.norm(fb)))
    assert cos < 0.999, cos


def test_direct_term_is_added(x64):
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    reg = lambda th, l, b: meta_loss(th, l, b) + 0.5 * jnp.sum(l["l2"] ** 2)  # noqa: E731
    tx = optax.sgd(0.1)
    state = tx.init(theta)
    with_direct = _run(base_loss, reg, theta, lam, bb, mb, tx, state)
    without = _run(base_loss, reg, theta, lam, bb, mb, tx, state, direct=False)
    np.testing.assert_allclose(
        with_direct.meta_grad["l2"] - without.meta_grad["l2"], lam["l2"], rtol=1e-12
    )
    np.testing.assert_allclose(
        with_direct.meta_grad["logit"], without.meta_grad["logit"], rtol=1e-12
    )


def test_vmap_and_sequential_differences_agree(x64):
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    tx = optax.adam(1e-2)
    theta, state = _late_adam_state(tx, theta, lam, bb, base_loss)
    a = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state, difference="vmap")
    b = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state, difference="sequential")
    assert _max_err(a.meta_grad, b.meta_grad) <= 1e-12 * _max_abs(a.meta_grad)


def test_last_with_the_fresh_gradient_equals_fresh(x64):
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    tx = optax.adam(1e-2)
    theta, state = _late_adam_state(tx, theta, lam, bb, base_loss)
    g = jax.grad(base_loss)(theta, lam, bb)
    fresh = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, state, adapt_from="fresh")
    last = _run(
        base_loss,
        meta_loss,
        theta,
        lam,
        bb,
        mb,
        tx,
        state,
        adapt_from="last",
        last_grad=g,
        last_opt_state=state,
    )
    # same numbers, possibly fused in another order by XLA
    assert _max_err(fresh.meta_grad, last.meta_grad) <= 1e-14 * _max_abs(fresh.meta_grad)


def test_last_uses_the_given_gradient_and_state(x64):
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    tx = optax.adam(1e-2)
    theta0, state0 = theta, tx.init(theta)
    theta, state = _late_adam_state(tx, theta, lam, bb, base_loss)
    g_old = jax.grad(base_loss)(theta0, lam, bb)
    last = _run(
        base_loss,
        meta_loss,
        theta,
        lam,
        bb,
        mb,
        tx,
        state,
        adapt_from="last",
        last_grad=g_old,
        last_opt_state=state0,
        alpha=1e-4,
    )
    d = jax.grad(meta_loss)(theta, lam, mb)
    v = adapt(tx, d, grads=g_old, state=state0, params=theta, rule="vjp")
    exact = _mixed(base_loss, theta, lam, bb, v)
    assert _max_err(last.meta_grad, exact) < 1e-7 * _max_abs(exact)


def test_last_without_its_inputs_is_an_error():
    base_loss, meta_loss, theta, lam, bb, mb = _problem(jnp.float32)
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match="last_grad and last_opt_state"):
        bj.sama_hypergrad(
            base_loss,
            meta_loss,
            base_params=theta,
            meta_params=lam,
            base_tx=tx,
            base_opt_state=tx.init(theta),
            base_batch=bb,
            meta_batch=mb,
            adapt_from="last",
        )


def test_base_update_is_minus_eps_v_with_norm_alpha(x64):
    lr, alpha = 0.1, 0.7
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    tx = optax.sgd(lr)
    out = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, tx.init(theta), alpha=alpha)
    d = jax.grad(meta_loss)(theta, lam, mb)
    eps = float(out.info["eps"])
    np.testing.assert_allclose(
        float(out.info["v_norm"]), lr * float(optax.tree.norm(d)), rtol=1e-12
    )
    np.testing.assert_allclose(eps, alpha / float(out.info["v_norm"]), rtol=1e-12)
    for u, di in zip(jax.tree.leaves(out.base_update), jax.tree.leaves(d)):
        np.testing.assert_allclose(u, -eps * lr * di, rtol=1e-12)
    np.testing.assert_allclose(float(optax.tree.norm(out.base_update)), alpha, rtol=1e-12)


def test_zero_direction_gives_zero_not_nan():
    base_loss, _, theta, lam, bb, mb = _problem(jnp.float32)
    flat_meta = lambda th, l, b: jnp.sum(l["l2"]) * 0.0 + 1.0  # noqa: E731  (no θ dependence)
    tx = optax.adam(1e-3)
    out = _run(base_loss, flat_meta, theta, lam, bb, mb, tx, tx.init(theta))
    assert bool(out.finite)
    assert _max_abs(out.meta_grad) == 0.0 and _max_abs(out.base_update) == 0.0
    assert float(out.info["eps"]) == 0.0


def test_bf16_params_use_float32_eps_and_agree_with_float32():
    base_loss, meta_loss, theta, lam, bb, mb = _problem(jnp.float32)
    tx = optax.sgd(0.1)
    ref = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, tx.init(theta))
    theta16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), theta)
    out = _run(base_loss, meta_loss, theta16, lam, bb, mb, tx, tx.init(theta16))
    assert out.info["eps"].dtype == jnp.float32
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out.base_update))
    a = jnp.concatenate([x.ravel() for x in jax.tree.leaves(ref.meta_grad)])
    b = jnp.concatenate([x.ravel() for x in jax.tree.leaves(out.meta_grad)])
    assert float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b))) > 0.99


def test_method_object_matches_function(x64):
    base_loss, meta_loss, theta, lam, bb, mb = _problem()
    tx = optax.adam(1e-2)
    problem = bj.BilevelProblem(base_loss, meta_loss, tx)
    inputs = bj.BilevelInputs(theta, lam, tx.init(theta), bb, mb)
    method = bj.sama(0.5)
    out, state = jax.jit(method.hypergrad, static_argnums=0)(
        problem, inputs, method.init(theta, lam)
    )
    ref = _run(base_loss, meta_loss, theta, lam, bb, mb, tx, tx.init(theta), alpha=0.5)
    assert _max_err(out.meta_grad, ref.meta_grad) == 0.0
    assert out.base_update is None  # step_along_v defaults to off
    assert bj.sama(step_along_v=True).hypergrad(problem, inputs, state)[0].base_update is not None
    assert bj.sama_na().adapt is False and bj.sama_na().name == "sama_na"


def test_nonfinite_result_is_flagged():
    base_loss, meta_loss, theta, lam, bb, mb = _problem(jnp.float32)
    nan_loss = lambda th, l, b: base_loss(th, l, b) * jnp.nan  # noqa: E731
    tx = optax.sgd(0.1)
    out = _run(nan_loss, meta_loss, theta, lam, bb, mb, tx, tx.init(theta))
    assert not bool(out.finite)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"alpha": 0.0}, "alpha must be positive"),
        ({"difference": "forward"}, "difference must be"),
        ({"adapt_from": "best"}, "adapt_from must be"),
    ],
)
def test_bad_options_are_rejected(kw, match):
    base_loss, meta_loss, theta, lam, bb, mb = _problem(jnp.float32)
    tx = optax.sgd(0.1)
    with pytest.raises(ValueError, match=match):
        bj.sama_hypergrad(
            base_loss,
            meta_loss,
            base_params=theta,
            meta_params=lam,
            base_tx=tx,
            base_opt_state=tx.init(theta),
            base_batch=bb,
            meta_batch=mb,
            **kw,
        )


def test_non_scalar_loss_is_rejected():
    base_loss, meta_loss, theta, lam, bb, mb = _problem(jnp.float32)
    vector_loss = lambda th, l, b: jnp.stack([base_loss(th, l, b)] * 2)  # noqa: E731
    tx = optax.sgd(0.1)
    with pytest.raises(bj.BilevelInputError, match="base_loss must return a scalar"):
        bj.sama_hypergrad(
            vector_loss,
            meta_loss,
            base_params=theta,
            meta_params=lam,
            base_tx=tx,
            base_opt_state=tx.init(theta),
            base_batch=bb,
            meta_batch=mb,
        )


@pytest.mark.parametrize("adapt", [True, False])
def test_state_not_matching_params_is_rejected(adapt):
    base_loss, meta_loss, theta, lam, bb, mb = _problem(jnp.float32)
    tx = optax.adam(1e-3)
    wrong = tx.init({"w1": theta["w1"]})
    with pytest.raises(bj.BilevelInputError, match="optimizer state does not match"):
        bj.sama_hypergrad(
            base_loss,
            meta_loss,
            base_params=theta,
            meta_params=lam,
            base_tx=tx,
            base_opt_state=wrong,
            base_batch=bb,
            meta_batch=mb,
            adapt=adapt,
        )


def test_nonfinite_meta_loss_is_flagged_not_zeroed():
    """A NaN direction v must not be mistaken for ‖v‖ = 0 (which gives an exact zero)."""
    base_loss, meta_loss, theta, lam, bb, mb = _problem(jnp.float32)
    nan_meta = lambda th, l, b: meta_loss(th, l, b) * jnp.nan  # noqa: E731
    tx = optax.adam(1e-3)
    out = _run(base_loss, nan_meta, theta, lam, bb, mb, tx, tx.init(theta))
    assert not bool(out.finite)
    assert not bool(jnp.all(jnp.isfinite(out.meta_grad["logit"])))
