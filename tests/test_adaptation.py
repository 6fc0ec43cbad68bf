"""Closed-form adaptation rules against ``adapt(rule="vjp")``, jax.vjp of the whole update."""

from typing import cast

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.adaptation import adapt

SCHED = optax.cosine_decay_schedule(1e-2, 100)
WD_MASK = lambda p: {"w": True, "b": False}  # noqa: E731

# name -> (factory, expected describe() fragment). Factories so each dtype builds its own.
OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "sgd_schedule": lambda: optax.sgd(SCHED, momentum=0.9),
    "adam": lambda: optax.adam(1e-3),
    "adam_nesterov": lambda: optax.adam(1e-3, nesterov=True),
    "adam_eps_root": lambda: optax.adam(1e-3, eps_root=1e-8),
    "adamw": lambda: optax.adamw(1e-3, weight_decay=1e-2),
    "adamw_schedule_mask": lambda: optax.adamw(SCHED, weight_decay=1e-2, mask=WD_MASK),
    "rmsprop": lambda: optax.rmsprop(1e-3),
    "adagrad": lambda: optax.adagrad(0.1),
    "scale_by_adam": lambda: optax.scale_by_adam(b1=0.8, b2=0.99, eps=1e-6),
    "scale_by_rms_eps_outside": lambda: optax.scale_by_rms(eps_in_sqrt=False),
    "scale_by_rms_bias_corrected": lambda: optax.scale_by_rms(bias_correction=True),
    "scale_by_rss": lambda: optax.scale_by_rss(),
    "trace": lambda: optax.trace(0.9),
    "scale": lambda: optax.scale(-0.3),
    "lr_constant": lambda: optax.scale_by_learning_rate(0.05),
    "lr_schedule": lambda: optax.scale_by_learning_rate(SCHED),
    "add_decayed_weights": lambda: optax.add_decayed_weights(1e-2),
    "clip": lambda: optax.chain(optax.clip(0.5), optax.sgd(0.1)),
    "clip_by_global_norm_active": lambda: optax.clip_by_global_norm(0.5),
    "clip_by_global_norm_inactive": lambda: optax.clip_by_global_norm(1e3),
    "chain_clip_adamw_schedule": lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(SCHED, weight_decay=1e-2)
    ),
    "inject_adam": lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-3, b1=0.85),
    "inject_adamw_schedule": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=SCHED, weight_decay=1e-2
    ),
}


def _params(dtype):
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "w": jax.random.normal(k1, (7, 5), dtype),
        "b": jax.random.normal(k2, (5,), dtype),
    }


def _like(params, seed, scale=1.0):
    leaves, tdef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tdef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _state(tx, params, steps):
    """State after ``steps`` updates with random gradients (0 = the very first step)."""
    state = tx.init(params)
    for i in range(steps):
        _, state = tx.update(_like(params, 100 + i), state, params)
    return state


def _compare(name, dtype, steps, rtol):
    """Closed form vs ``jax.vjp`` of the whole update, elementwise.

    Tolerance: ``rtol·|ref| + rtol·max|Δ/g ⊙ d|``. The second term is rtol times the
    secant gain of the update: a Jacobian entry that is a difference of two terms of
    that size (Adam's first step is ε/(|g|+ε)² = [(|g|+ε) − |g|]/(|g|+ε)²) cannot be
    obtained by autodiff more accurately than that, so the oracle itself is only
    that exact there. Where no cancellation occurs the rtol term dominates.
    """
    tx = OPTIMIZERS[name]()
    params = _params(dtype)
    state = _state(tx, params, steps)
    g, d = _like(params, 1), _like(params, 2)
    v = jax.jit(lambda g, s, p, d: bj.adapt(tx, d, grads=g, state=s, params=p))(g, state, params, d)
    ref = adapt(tx, d, grads=g, state=state, params=params, rule="vjp")
    delta, _ = tx.update(g, state, params)
    assert "fallback" not in bj.describe(tx, state), bj.describe(tx, state)
    for a, b, di, gi, ui in zip(*map(jax.tree.leaves, (v, ref, d, g, delta))):
        assert a.dtype == dtype
        gain = float(jnp.max(jnp.abs(ui / gi * di)))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * gain)


@pytest.mark.parametrize("steps", [0, 30], ids=["first_step", "late_step"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_closed_form_equals_exact_vjp_float64(x64, name, steps):
    _compare(name, jnp.float64, steps, rtol=1e-10)


@pytest.mark.parametrize("steps", [0, 30], ids=["first_step", "late_step"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_closed_form_equals_exact_vjp_float32(name, steps):
    _compare(name, jnp.float32, steps, rtol=1e-5)


# float32: optax's bias correction 1 − 0.999 rounds with relative error 1.3e-5 in float32,
# and the rule (like optax's update) uses that rounded value; the formula below is ideal.
@pytest.mark.parametrize("dtype, rtol", [("float64", 1e-13), ("float32", 5e-5)])
def test_adam_first_step_is_exact_without_cancellation(dtype, rtol):
    """At t = 1: m̂ = g, s = |g|, so ∂u/∂g = lr·ε/(|g|+ε)² exactly (tiny, yet computed to rtol)."""
    lr, eps = 1e-3, 1e-8
    with jax.enable_x64(dtype == "float64"):
        tx = optax.adam(lr, eps=eps)
        params = _params(jnp.dtype(dtype))
        g, d = _like(params, 1), _like(params, 2)
        v = bj.adapt(tx, d, grads=g, state=tx.init(params), params=params)
        for key in params:
            expected = lr * eps / (jnp.abs(g[key]) + eps) ** 2 * d[key]
            np.testing.assert_allclose(v[key], expected, rtol=rtol)


def test_sgd_adaptation_is_learning_rate_times_d(x64):
    params = _params(jnp.float64)
    tx = optax.sgd(0.1)
    d = _like(params, 3)
    v = bj.adapt(tx, d, grads=_like(params, 4), state=tx.init(params), params=params)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(d)):
        np.testing.assert_allclose(a, 0.1 * b, rtol=1e-14)


def test_adam_rule_matches_written_formula(x64):
    """Form (1) of docs/math.md §2.1 (quotient rule), written out independently, at a late step."""
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-3
    tx = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    params = _params(jnp.float64)
    state = _state(tx, params, 7)
    g, d = _like(params, 5), _like(params, 6)
    v = bj.adapt(tx, d, grads=g, state=state, params=params)
    adam_state = cast(tuple, state)[0]  # adam = chain(scale_by_adam, …): its ScaleByAdamState
    t = 8
    c1, c2 = 1 - b1**t, 1 - b2**t
    for key in params:
        gi, m, n = g[key], adam_state.mu[key], adam_state.nu[key]
        m_hat = (b1 * m + (1 - b1) * gi) / c1
        n_hat = (b2 * n + (1 - b2) * gi**2) / c2
        s = jnp.sqrt(n_hat)
        jac = ((1 - b1) / c1 * (s + eps) - m_hat * (1 - b2) * gi / (c2 * s)) / (s + eps) ** 2
        np.testing.assert_allclose(v[key], lr * jac * d[key], rtol=1e-10)


def test_adam_first_step_zero_gradient_is_finite(x64):
    """At g = n = 0 autodiff gives NaN (0·∞); the closed form takes the limit."""
    tx = optax.adam(1e-3)
    params = _params(jnp.float64)
    zeros = jax.tree.map(jnp.zeros_like, params)
    v = bj.adapt(tx, _like(params, 1), grads=zeros, state=tx.init(params), params=params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(v))


def test_plain_optax_adam_gets_closed_form_without_restating():
    assert bj.describe(optax.adam(1e-3)) == "chain(scale_by_adam: closed form, scale: closed form)"


def test_describe_reports_fallback_for_unknown_transform():
    tx = optax.chain(optax.scale_by_amsgrad(), optax.scale(-1e-3))
    text = bj.describe(tx)
    assert "scale_by_amsgrad: jax.vjp fallback" in text and "scale: closed form" in text


def test_fallback_node_is_exact_inside_a_chain(x64):
    tx = optax.chain(optax.clip_by_global_norm(0.5), optax.scale_by_amsgrad(), optax.scale(-1e-3))
    params = _params(jnp.float64)
    state = _state(tx, params, 5)
    g, d = _like(params, 1), _like(params, 2)
    v = bj.adapt(tx, d, grads=g, state=state, params=params)
    ref = adapt(tx, d, grads=g, state=state, params=params, rule="vjp")
    chex.assert_trees_all_close(v, ref, rtol=1e-10, atol=0.0)


def test_describe_resolves_inject_hyperparams_from_state():
    tx = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    params = _params(jnp.float32)
    assert "resolved from the state" in bj.describe(tx)
    assert bj.describe(tx, tx.init(params)) == (
        "inject_hyperparams(chain(scale_by_adam: closed form, scale: closed form))"
    )


@pytest.mark.parametrize(
    "tx, name",
    [
        (optax.lion(1e-3), "scale_by_lion"),
        (optax.scale_by_sign(), "scale_by_sign"),
        (optax.chain(optax.clip(1.0), optax.scale_by_sign(), optax.scale(-0.1)), "scale_by_sign"),
    ],
)
def test_sign_based_transforms_are_refused(tx, name):
    params = _params(jnp.float32)
    with pytest.raises(bj.UnsupportedTransformError, match=name) as info:
        bj.adapt(tx, params, grads=params, state=tx.init(params), params=params)
    assert "sign" in str(info.value) and "SAMA-NA" in str(info.value)


def test_smooth_lion_uses_the_fallback(x64):
    tx = optax.chain(optax.scale_by_lion(mode="smooth"), optax.scale(-1e-3))
    params = _params(jnp.float64)
    state = _state(tx, params, 3)
    assert "scale_by_lion: jax.vjp fallback" in bj.describe(tx, state)
    g, d = _like(params, 1), _like(params, 2)
    v = bj.adapt(tx, d, grads=g, state=state, params=params)
    assert all(bool(jnp.any(x != 0)) for x in jax.tree.leaves(v))


def _while_loop_transform():
    """A custom transform that reverse-mode autodiff cannot differentiate."""

    def update_fn(updates, state, params=None):
        def scale_down(g):
            return jax.lax.while_loop(lambda x: jnp.max(jnp.abs(x)) > 1.0, lambda x: x / 2, g)

        return jax.tree.map(scale_down, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def test_non_differentiable_transform_gives_clear_error():
    tx = _while_loop_transform()
    params = _params(jnp.float32)
    with pytest.raises(bj.AdaptationError, match="cannot be differentiated") as info:
        bj.adapt(tx, params, grads=params, state=tx.init(params), params=params)
    assert "_while_loop_transform" in str(info.value)


def test_state_from_other_params_is_rejected():
    tx = optax.adam(1e-3)
    params = _params(jnp.float32)
    other = {"w": jnp.zeros((7, 5)), "b": jnp.zeros((4,))}
    with pytest.raises(bj.BilevelInputError, match=r"\['b'\].*shape"):
        bj.adapt(tx, params, grads=params, state=tx.init(other), params=params)


def test_state_of_other_optimizer_is_rejected():
    params = _params(jnp.float32)
    with pytest.raises(bj.BilevelInputError, match="structure differs"):
        bj.adapt(
            optax.adam(1e-3), params, grads=params, state=optax.sgd(0.1).init(params), params=params
        )


def test_mismatched_direction_is_rejected():
    tx = optax.sgd(0.1)
    params = _params(jnp.float32)
    with pytest.raises(bj.BilevelInputError, match="'d'"):
        bj.adapt(tx, {"w": params["w"]}, grads=params, state=tx.init(params), params=params)
