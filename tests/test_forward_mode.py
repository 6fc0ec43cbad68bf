"""SAMA with the forward-mode mixed product (``difference="jvp"``) against exact autodiff.

``h = −∂/∂t ∇_λL_b(θ + t v, λ)|_{t=0}`` by ``jax.jvp`` is compared with the oracle
``−∇_λ⟨∇_θL_b(θ, λ), v⟩`` (reverse over reverse, float64), on a Meta-Weight-Net-like loss
``L_b = Σ w_i ℓ_i / Σ w_i`` whose weighting net sees ``stop_gradient(ℓ_i)`` (or ``ℓ_i``).
The central difference evaluates ∇_λL_b at θ ± εv, where the stopped ℓ_i moves too: it
estimates the mixed derivative of the loss *without* the stop-gradient (Betty's semantics),
so the two estimands differ with it and agree without it.

All these tests fail before the forward-mode product existed (``difference="jvp"`` was
rejected with ``ValueError: difference must be 'vmap' or 'sequential'``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.adaptation import adapt
from bilevel_jax.hypergrad.base import forward_mixed_product
from tests.test_mixed_precision import CAPTURE, cosine, problem  # noqa: F401 (fixture)


def _mwn_problem(stop_gradient: bool, dtype=jnp.float64):
    """tanh network θ, Meta-Weight-Net λ (1-8-1, tanh) weighting per-example cross entropies."""
    k = jax.random.split(jax.random.PRNGKey(0), 10)
    n, m, f, hid = 32, 16, 6, 5
    x, xm = jax.random.normal(k[0], (n, f), dtype), jax.random.normal(k[1], (m, f), dtype)
    y = (jax.random.normal(k[2], (n,), dtype) > 0).astype(dtype)
    ym = (jax.random.normal(k[3], (m,), dtype) > 0).astype(dtype)
    theta = {
        "w1": 0.7 * jax.random.normal(k[4], (f, hid), dtype),
        "w2": 0.7 * jax.random.normal(k[5], (hid,), dtype),
    }
    lam = {
        "a": jax.random.normal(k[6], (8,), dtype),
        "b": 0.5 * jax.random.normal(k[7], (8,), dtype),
        "c": jax.random.normal(k[8], (8,), dtype),
        "d": jnp.asarray(0.1, dtype),
    }

    def per_example(th, xb, yb):
        logits = jnp.tanh(xb @ th["w1"]) @ th["w2"]
        return optax.sigmoid_binary_cross_entropy(logits, yb)

    def weights(lam, s):
        hidden = jnp.tanh(s[:, None] * lam["a"] + lam["b"])
        return jax.nn.sigmoid(hidden @ lam["c"] + lam["d"])

    def base_loss(th, lam, batch):
        ce = per_example(th, *batch)
        w = weights(lam, jax.lax.stop_gradient(ce) if stop_gradient else ce)
        return jnp.sum(w * ce) / jnp.sum(w)

    def meta_loss(th, lam, batch):
        return jnp.mean(per_example(th, *batch))

    return base_loss, meta_loss, theta, lam, (x, y), (xm, ym)


def _oracle(base_loss, theta, lam, batch, v):
    """−(∂²L_b/∂λ∂θ) v by reverse over reverse: −∇_λ⟨∇_θL_b(θ, λ), v⟩ (no JVP involved)."""
    inner = lambda l: optax.tree.vdot(jax.grad(base_loss)(theta, l, batch), v)  # noqa: E731
    return jax.tree.map(jnp.negative, jax.grad(inner)(lam))


def _h(base_loss, meta_loss, theta, lam, bb, mb, tx, state, **kw):
    """SAMA's h alone (no direct term)."""
    return bj.sama_hypergrad(
        base_loss,
        meta_loss,
        base_params=theta,
        meta_params=lam,
        base_tx=tx,
        base_opt_state=state,
        base_batch=bb,
        meta_batch=mb,
        direct=False,
        **kw,
    )


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def _adam_state(base_loss, theta, lam, bb, tx, steps=3):
    """θ and Adam's state after a few steps (so that the adaptation is not the identity)."""
    s = tx.init(theta)
    for _ in range(steps):
        u, s = tx.update(jax.grad(base_loss)(theta, lam, bb), s, theta)
        theta = optax.apply_updates(theta, u)
    return theta, s


@pytest.mark.parametrize("stop_gradient", [True, False], ids=["stop_gradient", "plain"])
@pytest.mark.parametrize("adapted", [True, False], ids=["sama", "sama_na"])
def test_forward_product_equals_autodiff_mixed_derivative(x64, stop_gradient, adapted):
    base_loss, meta_loss, theta, lam, bb, mb = _mwn_problem(stop_gradient)
    tx = optax.adam(0.05)
    theta, s = _adam_state(base_loss, theta, lam, bb, tx)
    d = jax.grad(meta_loss)(theta, lam, mb)
    v = adapt(tx, d, grads=jax.grad(base_loss)(theta, lam, bb), state=s, params=theta)
    v = v if adapted else d
    out = _h(
        base_loss, meta_loss, theta, lam, bb, mb, tx, s, adapt=adapted, difference="jvp", alpha=0.7
    )
    want = _oracle(base_loss, theta, lam, bb, v)
    err = float(jnp.max(jnp.abs(_flat(out.meta_grad) - _flat(want))))
    scale = float(jnp.max(jnp.abs(_flat(want))))
    print(f"max |h_jvp − oracle| = {err:.1e} (max |oracle| = {scale:.3f})")
    assert scale > 1e-3  # a non-trivial product
    assert err <= 1e-12 and err <= 1e-12 * scale
    # ε still sets the base step along v: −εv with ε = α/‖v‖, as for the central difference
    np.testing.assert_allclose(out.info["eps"], 0.7 / optax.tree.norm(v), rtol=1e-14)
    assert out.meta_grad["d"].dtype == jnp.float64


def test_two_estimands_differ_with_stop_gradient_and_agree_without(x64):
    """SAMA-NA (v = ∇_θL_m, the same v for both losses), central difference at α = 1e-4."""
    results = {}
    for sg in (True, False):
        base_loss, meta_loss, theta, lam, bb, mb = _mwn_problem(sg)
        tx = optax.sgd(0.1)
        s = tx.init(theta)
        kw = dict(adapt=False, alpha=1e-4)
        results[sg] = {
            "jvp": _flat(
                _h(
                    base_loss, meta_loss, theta, lam, bb, mb, tx, s, difference="jvp", **kw
                ).meta_grad
            ),
            "central": _flat(_h(base_loss, meta_loss, theta, lam, bb, mb, tx, s, **kw).meta_grad),
            "oracle": _flat(
                _oracle(base_loss, theta, lam, bb, jax.grad(meta_loss)(theta, lam, mb))
            ),
        }

    def rel(a, b):
        return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

    with_sg, without = results[True], results[False]
    gap = rel(with_sg["central"], with_sg["jvp"])
    print(
        f"with stop_gradient: |central − jvp|/|jvp| = {gap:.3f}; "
        f"without: {rel(without['central'], without['jvp']):.1e}"
    )
    # with stop_gradient: the forward product is the mixed derivative of the loss as written ...
    assert rel(with_sg["jvp"], with_sg["oracle"]) <= 1e-12
    # ... the central difference that of the loss with the stop-gradient removed (to O(ε²))
    assert rel(with_sg["central"], without["oracle"]) <= 1e-6
    assert gap >= 0.1
    # without stop_gradient the two agree (to the central difference's O(ε²) and round-off)
    assert rel(without["central"], without["jvp"]) <= 1e-6


def test_zero_direction_gives_zero_and_nan_propagates(x64):
    base_loss, _, theta, lam, bb, _ = _mwn_problem(True)
    zero = jax.tree.map(jnp.zeros_like, theta)
    h, eps, v_norm = forward_mixed_product(base_loss, theta, lam, bb, zero, 1.0)
    assert float(v_norm) == 0.0 and float(eps) == 0.0
    assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(h))
    nan = jax.tree.map(lambda t: jnp.full_like(t, jnp.nan), theta)
    h, _, _ = forward_mixed_product(base_loss, theta, lam, bb, nan, 1.0)
    assert all(bool(jnp.all(jnp.isnan(x))) for x in jax.tree.leaves(h))


def test_methods_and_bilevel_step_accept_jvp(x64):
    base_loss, meta_loss, theta, lam, bb, mb = _mwn_problem(True)
    assert bj.sama(difference="jvp").difference == "jvp"
    assert bj.sama_na(difference="jvp").difference == "jvp"
    assert bj.darts(difference="jvp").difference == "jvp"
    assert bj.darts().difference == "sequential" and bj.sama().difference == "sequential"
    tx = optax.sgd(0.1)
    batches = jax.tree.map(lambda x: x[None], bb)
    new = {}
    for diff in ("jvp", "sequential"):
        step = bj.bilevel_step(
            base_loss, meta_loss, tx, CAPTURE, bj.sama(0.5, difference=diff, step_along_v=True)
        )
        new[diff] = jax.jit(step)(step.init(theta, lam), batches, mb)[0]
    # the base step along v (−εv) is the same; the meta-gradients are the two estimands
    for a, b in zip(
        jax.tree.leaves(new["jvp"].base_params), jax.tree.leaves(new["sequential"].base_params)
    ):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-15)
    theta_k = optax.apply_updates(
        theta, tx.update(jax.grad(base_loss)(theta, lam, bb), tx.init(theta))[0]
    )
    d = jax.grad(meta_loss)(theta_k, lam, mb)
    v = adapt(
        tx, d, grads=jax.grad(base_loss)(theta_k, lam, bb), state=tx.init(theta), params=theta_k
    )
    want = _oracle(base_loss, theta_k, lam, bb, v)
    got = new["jvp"].meta_opt_state  # CAPTURE stores the hypergradient; L_m ignores λ
    assert float(jnp.max(jnp.abs(_flat(got) - _flat(want)))) <= 1e-12
    d_na = bj.darts(difference="jvp")
    out_d = _h(
        base_loss,
        meta_loss,
        theta,
        lam,
        bb,
        mb,
        tx,
        tx.init(theta),
        alpha=d_na.alpha,
        adapt=False,
        difference="jvp",
    )
    out_n = _h(
        base_loss,
        meta_loss,
        theta,
        lam,
        bb,
        mb,
        tx,
        tx.init(theta),
        alpha=7.0,
        adapt=False,
        difference="jvp",
    )
    np.testing.assert_array_equal(_flat(out_d.meta_grad), _flat(out_n.meta_grad))  # h ignores α


# ---------------------------------------------------------------------------------------------
# bf16 meta step (the MNIST reweighting problem of tests/test_mixed_precision.py)

ALPHA = 0.1


def _meta_grad(p, difference, dtype):
    """The hypergradient of one bilevel step (K = 1) with base and meta steps in ``dtype``."""
    step = bj.bilevel_step(
        p["losses"].base,
        p["losses"].meta,
        p["base_tx"],
        CAPTURE,
        bj.sama(ALPHA, adapt_from="last", difference=difference),
        compute_dtype=dtype,
        meta_compute_dtype=dtype,
    )
    state = step.init(p["theta"], p["lam"])._replace(base_opt_state=p["s"])
    return jax.jit(step)(state, p["batches"], p["meta"])[0].meta_opt_state


def test_bf16_meta_step_with_the_forward_product_matches_float32(problem):  # noqa: F811
    cos = {}
    for diff in ("jvp", "sequential"):
        cos[diff] = cosine(_meta_grad(problem, diff, None), _meta_grad(problem, diff, jnp.bfloat16))
    print(
        f"bf16 vs float32 meta step, SAMA alpha={ALPHA}: cosine jvp {cos['jvp']:.4f}, "
        f"central difference (sequential) {cos['sequential']:.4f}"
    )
    assert cos["jvp"] >= 0.99
    assert not cos["sequential"] >= 0.9  # the central difference cancels in bf16
