"""SAMA's adaptation through optax wrappers and at a zero gradient (issue 12, items 1-2).

Oracles: ``jax.vjp`` of the real wrapped update in float64 where it is finite, and
the analytic limit at a leaf with zero gradient and zero second moment (where
autodiff of √ν at ν = 0 gives NaN).
"""

from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.adaptation import AdaptationError

LR, EPS = 1e-2, 1e-8


# --------------------------------------------------------------------------- the repros


def _base_loss(th, lam, x):
    return jnp.mean(jax.nn.sigmoid(lam) * (x @ th["w"] - 1.0) ** 2)  # th["unused"]: zero grad


def _meta_loss(th, lam, x):
    return jnp.mean((x @ th["w"] - 1.0) ** 2)


def _run(tx, theta, base=_base_loss, meta=_meta_loss, steps=10):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 4))
    step = bj.bilevel_step(base, meta, tx, optax.adam(1e-2), bj.sama())
    st = step.init(theta, jnp.zeros(8))
    fn = jax.jit(step)
    for _ in range(steps):
        st, _ = fn(st, x, x[0])
    return st


THETA = {"w": jnp.zeros(4), "unused": jnp.zeros(2)}

ITEM1 = {
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(1e-2), 5),
    "partition": lambda: optax.partition(
        {"a": optax.adam(1e-2), "b": optax.sgd(1e-2)}, {"w": "b", "unused": "a"}
    ),
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(1e-2), "b": optax.sgd(1e-2)}, {"w": "a", "unused": "a"}
    ),
    "muon": lambda: optax.contrib.muon(1e-2),
    "adafactor": lambda: optax.adafactor(1e-2),
    "novograd": lambda: optax.novograd(1e-2),
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(1e-2),
}


@pytest.mark.parametrize("name", sorted(ITEM1))
def test_item1_zero_gradient_leaf_no_skipped_meta_steps(name):
    # Before: the vjp fallback differentiated √ν at ν = 0 -> NaN -> all 10 meta steps skipped.
    st = _run(ITEM1[name](), THETA)
    assert int(st.skipped_meta) == 0
    lam = np.asarray(st.meta_params)
    assert np.all(np.isfinite(lam)) and np.any(lam != 0)


def test_item1_muon_zero_gradient_matrix_no_skipped_meta_steps():
    # Before: muon's Newton-Schulz step divides by ‖μ̂‖; autodiff of the norm at a zero
    # matrix gave NaN, so with an unused weight matrix every meta step was skipped.
    st = _run(optax.contrib.muon(1e-2), {"w": jnp.zeros(4), "unused": jnp.zeros((3, 2))})
    assert int(st.skipped_meta) == 0
    assert np.all(np.isfinite(np.asarray(st.meta_params)))
    assert np.any(np.asarray(st.meta_params) != 0)


def test_item2_multisteps_fresh_hypergradient_is_not_zero():
    # Before: the fresh update lands on a non-boundary mini-step, v = 0, λ stays 0.
    st = _run(optax.MultiSteps(optax.adam(1e-2), 4), THETA, steps=3)
    assert int(st.skipped_meta) == 0
    assert np.all(np.asarray(st.meta_params) != 0)


def test_item2_lookahead_plain_params_error_names_lookahead_params():
    # Before: "cannot be differentiated with respect to its incoming gradient" (wrong blame).
    tx = optax.lookahead(optax.adam(1e-2), 5, 0.5)
    with pytest.raises(AdaptationError, match=r"LookaheadParams.*init_synced"):
        bj.adapt(tx, THETA, grads=THETA, state=tx.init(THETA), params=THETA)
    with pytest.raises(AdaptationError, match=r"LookaheadParams"):  # before: AttributeError
        _run(tx, THETA, steps=1)


def test_item2_lookahead_runs_with_lookahead_params():
    # Before: optax's raw pytree error (the LookaheadParams gradient went to the fast optimizer).
    def base(th, lam, x):
        return _base_loss(th.fast, lam, x)

    def meta(th, lam, x):
        return _meta_loss(th.fast, lam, x)

    tx = optax.lookahead(optax.adam(1e-2), 2, 0.5)
    st = _run(tx, optax.LookaheadParams.init_synced(THETA), base, meta, steps=4)
    assert int(st.skipped_meta) == 0
    assert np.all(np.asarray(st.meta_params) != 0)
    assert np.all(np.asarray(st.base_params.slow["w"]) != 0)  # the sync happened


# --------------------------------------------------------------------------- oracles


def _tree(seed, like, scale=1.0):
    leaves, tdef = jax.tree.flatten(like)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(
        tdef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    )


def _params():
    return {"a": jnp.ones((3, 4)), "b": jnp.linspace(-1.0, 1.0, 5), "c": jnp.ones(2)}


def _state(tx, params, steps):
    state = tx.init(params)
    for i in range(steps):
        _, state = tx.update(_tree(100 + i, params), state, params)
    return state


def _vjp(update, g, d, *args):
    """``J_uᵀ d`` for the step ``u = −update(g, *args)`` by reverse-mode autodiff.

    Jitted with the state as an argument, like adapt: optax's float32 schedules round
    differently when evaluated eagerly or constant-folded (9e-8 for a warmup schedule).
    """

    def run(g, d, *args):
        out, pullback = jax.vjp(lambda x: update(x, *args), g)
        return pullback(jax.tree.map(lambda x: -x, d))[0]

    return jax.jit(run)(g, d, *args)


def _gain(tx, g, d, s, p):
    """``max|Δ/g ⊙ d|``, the secant gain of the update (as in test_adaptation.py).

    Where a Jacobian entry is a difference of two terms of this size (Adafactor's first
    step is ε₁/(g² + ε₁)^{3/2}, Adam's ε/(|g|+ε)²) autodiff cannot be more accurate than
    rtol times it, so the oracle is only that exact there.
    """
    delta, _ = tx.update(g, s, p)
    return max(
        float(jnp.max(jnp.abs(u / x * y))) for u, x, y in zip(*map(jax.tree.leaves, (delta, g, d)))
    )


def _close(a, b, rtol=1e-10, gain=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * gain)


def _adapt(tx, d, g, s, p):
    return jax.jit(lambda d, g, s, p: bj.adapt(tx, d, grads=g, state=s, params=p))(d, g, s, p)


WRAPPED = {
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(LR, eps=0.1), 3),
    "partition": lambda: optax.partition(
        {"x": optax.adam(LR, eps=0.1), "y": optax.rmsprop(LR, eps=0.1), "z": optax.sgd(LR)},
        {"a": "x", "b": "y", "c": "z"},
    ),
    "partition_fn": lambda: optax.partition(
        {"x": optax.adam(LR, eps=0.1), "y": optax.sgd(LR, momentum=0.9)},
        lambda t: {k: ("x" if k == "a" else "y") for k in t},
    ),
    "schedule_free_adamw": lambda: optax.contrib.schedule_free_adamw(LR, warmup_steps=5, eps=0.1),
    "schedule_free_sgd": lambda: optax.contrib.schedule_free_sgd(LR, warmup_steps=5),
    "novograd": lambda: optax.novograd(LR, eps=0.1, weight_decay=0.01),
    "adafactor": lambda: optax.adafactor(LR, min_dim_size_to_factor=3, clipping_threshold=None),
    "clip_by_block_rms": lambda: optax.chain(optax.clip_by_block_rms(0.9), optax.scale(-LR)),
}


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("name", sorted(WRAPPED))
def test_walked_wrapper_equals_vjp_of_real_update(x64, name, steps):
    tx, p = WRAPPED[name](), _params()
    s = _state(tx, p, steps)
    g, d = _tree(1, p), _tree(2, p)
    assert "fallback" not in bj.describe(tx, s), bj.describe(tx, s)
    ref = _vjp(lambda x, s, p: tx.update(x, s, p)[0], g, d, s, p)
    _close(_adapt(tx, d, g, s, p), ref, gain=_gain(tx, g, d, s, p))


def test_clip_by_block_rms_both_regimes(x64):
    tx, p = optax.clip_by_block_rms(1.0), {"small": jnp.ones(3), "big": jnp.ones(3)}
    g = {"small": jnp.array([0.1, -0.2, 0.3]), "big": jnp.array([2.0, -3.0, 1.0])}
    d = _tree(2, p)
    v = _adapt(tx, d, g, tx.init(p), p)
    _close(v, _vjp(lambda x, p: tx.update(x, (), p)[0], g, d, p))
    _close(v["small"], -d["small"])  # not clipped: identity (Δ = g here, u = −g)


def test_apply_if_finite_rejected_update_has_zero_jacobian(x64):
    tx, p = WRAPPED["apply_if_finite"](), _params()
    g = jax.tree.map(lambda x: x.at[0].set(jnp.nan), _tree(1, p))
    v = _adapt(tx, _tree(2, p), g, tx.init(p), p)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(v))


@pytest.mark.parametrize("mean", [True, False])
def test_multisteps_boundary_equals_vjp_and_between_uses_inner_update(x64, mean):
    k, inner = 3, optax.adam(LR, eps=0.1)
    tx, p = optax.MultiSteps(inner, k, use_grad_mean=mean), _params()
    g, d = _tree(1, p), _tree(2, p)
    for n in range(2 * k):  # mini-steps 0, 1, 2 (boundary), 0, 1, 2 (boundary)
        s = _state(tx, p, n)
        v = _adapt(tx, d, g, s, p)
        if n % k == k - 1:
            _close(v, _vjp(lambda x, s, p: tx.update(x, s, p)[0], g, d, s, p))
            continue
        # between boundaries: the real update is 0; adapt goes through the inner update
        # at the running accumulation Ĝ, weighted by ∂G/∂g.
        m = n % k
        if mean:
            acc = jax.tree.map(lambda gi, a, m=m: a + (gi - a) / (m + 1), g, s.acc_grads)
            scale = 1.0 / k
        else:
            acc = jax.tree.map(lambda gi, a, m=m: (gi + a) * k / (m + 1), g, s.acc_grads)
            scale = 1.0
        ref = _vjp(lambda x, s, p: inner.update(x, s, p)[0], acc, d, s.inner_opt_state, p)
        _close(v, jax.tree.map(lambda r, c=scale: c * r, ref))
        assert any(np.any(np.asarray(x) != 0) for x in jax.tree.leaves(v))


@pytest.mark.parametrize("steps", [0, 1, 2, 4])  # sync_period 3: step 2 syncs
def test_lookahead_equals_vjp_of_real_update(x64, steps):
    fast = optax.adam(LR, eps=0.1)
    tx = optax.lookahead(fast, 3, 0.4)
    p0 = _params()
    p = optax.LookaheadParams(fast=_tree(5, p0), slow=_tree(6, p0))
    s = tx.init(p)
    for i in range(steps):
        _, s = tx.update(_tree(100 + i, p0), s, p)
    g = _tree(1, p0)
    d = optax.LookaheadParams(fast=_tree(2, p0), slow=_tree(3, p0))
    ref = _vjp(lambda x, s, p: tx.update(x, s, p)[0], g, d, s, p)
    for grads in (g, optax.LookaheadParams(fast=g, slow=jax.tree.map(jnp.zeros_like, g))):
        v = _adapt(tx, d, grads, s, p)
        assert isinstance(v, optax.LookaheadParams)
        _close(v.fast, ref)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(v.slow))
    ref_vjp = bj.adapt(tx, d, grads=g, state=s, params=p, rule="vjp")
    _close(ref_vjp.fast, ref)


# --------------------------------------------------------------------------- zero gradient


def _zero_leaf_case(tx, p):
    """g and state zero on leaf "c" (first step): v there is the analytic limit."""
    g = dict(_tree(1, p), c=jnp.zeros_like(p["c"]))
    d = _tree(2, p)
    v = _adapt(tx, d, g, tx.init(p), p)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(v))
    return v, d


LIMITS = {
    # Adam / RMS-prop at g = ν = 0: ∂/∂g [g/(|g|+ε)] = 1/ε (× lr)
    "apply_if_finite": (lambda: optax.apply_if_finite(optax.adam(LR, eps=EPS), 3), LR / EPS),
    "partition": (
        lambda: optax.partition(
            {"x": optax.adam(LR, eps=EPS), "y": optax.sgd(LR)}, {"a": "y", "b": "y", "c": "x"}
        ),
        LR / EPS,
    ),
    "partition_sgd": (
        lambda: optax.partition(
            {"x": optax.adam(LR, eps=EPS), "y": optax.sgd(LR)}, {"a": "x", "b": "x", "c": "y"}
        ),
        LR,
    ),
    "multisteps": (lambda: optax.MultiSteps(optax.adam(LR, eps=EPS), 4), LR / EPS / 4),
    "novograd": (lambda: optax.novograd(LR, eps=EPS), LR / EPS),
    "schedule_free_adamw": (lambda: optax.contrib.schedule_free_adamw(LR, eps=EPS), LR / EPS),
    # Adafactor: ν = ε₁ = 1e-30, g·ν^{-1/2}, times max(rms(θ_c), 1e-3) (θ_c = 0)
    "adafactor": (lambda: optax.adafactor(LR), LR * 1e-3 * (1e-30) ** -0.5),
}


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_zero_gradient_equals_analytic_limit(x64, name):
    make, gain = LIMITS[name]
    p = dict(_params(), c=jnp.zeros(2))
    v, d = _zero_leaf_case(make(), p)
    _close(v["c"], gain * d["c"])


def test_adafactor_factored_zero_leaf_limit_float32():
    # float32: autodiff of ν**-0.5 at ν = 1e-30 forms ν^{-3/2} = inf and gives NaN.
    tx, p = optax.adafactor(LR, min_dim_size_to_factor=3), {"m": jnp.zeros((4, 3))}
    g, d = {"m": jnp.zeros((4, 3))}, _tree(2, {"m": jnp.zeros((4, 3))})
    v = _adapt(tx, d, g, tx.init(p), p)
    # row factor (ν_r/mean ν_r)^{-1/2} = 1, column factor ε₁^{-1/2}
    _close(v["m"], LR * 1e-3 * float(np.float32(1e-30)) ** -0.5 * d["m"], rtol=1e-6)


def test_lookahead_zero_gradient_limit(x64):
    tx, p0 = optax.lookahead(optax.adam(LR, eps=EPS), 2, 0.4), {"c": jnp.zeros(2)}
    p = optax.LookaheadParams.init_synced(p0)
    g = {"c": jnp.zeros(2)}
    df, ds = cast(dict, _tree(2, p0)), cast(dict, _tree(3, p0))
    d = optax.LookaheadParams(fast=df, slow=ds)
    s = cast(optax.LookaheadState, tx.init(p))
    _close(_adapt(tx, d, g, s, p).fast["c"], LR / EPS * df["c"])
    s = s._replace(steps_since_sync=jnp.ones((), jnp.int32))  # the sync step: α(d_f + d_s)
    _close(_adapt(tx, d, g, s, p).fast["c"], 0.4 * LR / EPS * (df["c"] + ds["c"]))


MUON_CASES = [
    (pre, adaptive, nesterov, coeffs)
    for pre in ("frobenius", "spectral", "aol", "schatten")
    for adaptive in (False, True)
    for nesterov, coeffs in ((True, None), (False, ((3.0, -3.2, 1.2), (2.0, -1.5, 0.5))))
]


@pytest.mark.parametrize(("pre", "adaptive", "nesterov", "coeffs"), MUON_CASES)
def test_muon_zero_matrix_equals_central_difference(x64, pre, adaptive, nesterov, coeffs):
    # Oracle: (u(hw) − u(−hw))/2h at h = 1e-18. Muon is k·μ̂ + O(‖μ̂‖²/ε) near 0, so the
    # difference is exact up to ~h‖w‖/ε = 1e-10 relative (ε = 1e-8); autodiff gives NaN.
    kw = {} if coeffs is None else {"ns_coeffs": coeffs}
    tx = optax.contrib.scale_by_muon(
        preconditioning=pre, adaptive=adaptive, nesterov=nesterov, **kw
    )
    p = jnp.zeros((3, 4))
    s = tx.update(jnp.zeros_like(p), tx.init(p), p)[1]  # count 1, μ = 0
    w = jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype)
    v = _adapt(tx, -w, jnp.zeros_like(p), s, p)  # J_Δᵀ w
    h = 1e-18
    up, um = (jnp.asarray(tx.update(x, s, p)[0]) for x in (h * w, -h * w))
    fd = (up - um) / (2 * h)
    if adaptive:  # ⟨μ̂, O(μ̂)⟩O(μ̂) is cubic at 0: slope 0 (fd sees only the cubic rest)
        np.testing.assert_array_equal(v, 0.0)
        assert float(jnp.max(jnp.abs(fd))) < 1e-6
    else:
        np.testing.assert_allclose(v, fd, rtol=1e-8)


def test_muon_nonzero_matrix_is_vjp_of_real_update(x64):
    tx = optax.contrib.scale_by_muon()
    p, g = jnp.ones((3, 4)), _tree(1, jnp.ones((3, 4)))
    s, d = _state(tx, p, 2), _tree(2, p)
    _close(_adapt(tx, d, g, s, p), _vjp(lambda x, s, p: tx.update(x, s, p)[0], g, d, s, p))


# --------------------------------------------------------------------------- describe


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (
            lambda: optax.apply_if_finite(optax.adam(1.0), 2),
            "apply_if_finite(chain(scale_by_adam: closed form, scale: closed form))",
        ),
        (
            lambda: optax.partition({"x": optax.sgd(1.0)}, "x"),
            "partition('x': chain(identity: closed form, scale: closed form))",
        ),
        (
            lambda: optax.MultiSteps(optax.sgd(1.0), 2),
            "MultiSteps(chain(identity: closed form, scale: closed form); adapted through the "
            "inner update the accumulated gradient takes, weight 1/k)",
        ),
        (
            lambda: optax.lookahead(optax.sgd(1.0), 2, 0.5),
            "lookahead(chain(identity: closed form, scale: closed form); fast parameters)",
        ),
        (
            lambda: optax.contrib.schedule_free_sgd(1.0),
            "schedule_free(chain(identity: closed form, scale: closed form))",
        ),
        (
            lambda: optax.contrib.scale_by_muon(),
            "scale_by_muon: jax.vjp, closed-form limit at a zero matrix",
        ),
        (
            lambda: optax.novograd(1.0),
            "chain(scale_by_novograd: closed form, scale: closed form)",
        ),
    ],
)
def test_describe_names_the_path_of_each_part(make, expected):
    assert bj.describe(make()) == expected
