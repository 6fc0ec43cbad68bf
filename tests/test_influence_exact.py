"""Exact influence (``bilevel_jax.influence.exact``) against closed forms, ``bj.exact()``,
leave-one-out retraining, dense curvature oracles and the forward-only estimator.

Convention (``bilevel_jax.influence``): ``L(θ; w) = (1/n) Σ w_i ℓ_i + R``,
``influence(i, q) = g_qᵀ (C + δI)⁻¹ g_i = −n · d f_q(θ*(w))/d w_i``; removing example i changes
``f_q`` by about ``+influence(i, q)/n``.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import bilevel_jax as bj
from bilevel_jax.influence.exact import CURVATURES, forward_influence, influence
from experiments import data

# ----------------------------------------------------------------- problems and numpy oracles


def ridge_loss(th, b):
    return 0.5 * (b["x"] @ th - b["y"]) ** 2


def _ridge(n=20, d=5, m=7, lam=0.3, seed=0):
    """Ridge regression at its exact minimiser, with the closed-form gradients and Hessian."""
    rng = np.random.default_rng(seed)
    x, xq = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    beta = rng.normal(size=d)
    y, yq = x @ beta + 0.3 * rng.normal(size=n), xq @ beta + 0.3 * rng.normal(size=m)
    hess = x.T @ x / n + lam * np.eye(d)
    theta = np.linalg.solve(hess, x.T @ y / n)
    g = (x @ theta - y)[:, None] * x
    gq = (xq @ theta - yq)[:, None] * xq
    train = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    test = {"x": jnp.asarray(xq), "y": jnp.asarray(yq)}
    reg = lambda th: 0.5 * lam * jnp.sum(th**2)  # noqa: E731
    return jnp.asarray(theta), train, test, reg, g, gq, hess


def logistic_loss(th, b):
    z = b["x"] @ th["w"] + th["b"]
    return jax.nn.softplus(z) - b["y"] * z


def _fit_logistic(a, y, lam_vec, iters=60):
    """Newton's method in float64 (numpy) for mean logistic loss + ½ Σ lam_vec θ²."""
    n = a.shape[0]
    th = np.zeros(a.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(a @ th)))
        grad = a.T @ (p - y) / n + lam_vec * th
        hess = a.T @ (a * (p * (1 - p))[:, None]) / n + np.diag(lam_vec)
        th = th - np.linalg.solve(hess, grad)
    p = 1 / (1 + np.exp(-(a @ th)))
    assert np.linalg.norm(a.T @ (p - y) / n + lam_vec * th) < 1e-12
    return th


def _logistic_oracle(x, y, xq, yq, lam):
    """θ* (bias unregularised) and the closed forms: per-example gradients, Hessian, Fisher."""
    a, aq = np.c_[x, np.ones(len(x))], np.c_[xq, np.ones(len(xq))]
    lam_vec = np.r_[np.full(x.shape[1], lam), 0.0]
    th = _fit_logistic(a, y, lam_vec)
    p, pq = 1 / (1 + np.exp(-(a @ th))), 1 / (1 + np.exp(-(aq @ th)))
    g, gq = (p - y)[:, None] * a, (pq - yq)[:, None] * aq
    n = len(x)
    hess = a.T @ (a * (p * (1 - p))[:, None]) / n + np.diag(lam_vec)
    fisher = g.T @ g / n + np.diag(lam_vec)
    params = {"w": jnp.asarray(th[:-1]), "b": jnp.asarray(th[-1])}
    reg = lambda t: 0.5 * lam * jnp.sum(t["w"] ** 2)  # noqa: E731
    return params, reg, g, gq, hess, fisher


def _synthetic_logistic(n=40, d=4, m=6, lam=0.05, seed=1):
    rng = np.random.default_rng(seed)
    beta = rng.normal(size=d)
    x, xq = rng.normal(size=(n, d)), rng.normal(size=(m, d))
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ beta)))).astype(float)
    yq = (rng.random(m) < 1 / (1 + np.exp(-(xq @ beta)))).astype(float)
    params, reg, g, gq, hess, fisher = _logistic_oracle(x, y, xq, yq, lam)
    train = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    test = {"x": jnp.asarray(xq), "y": jnp.asarray(yq)}
    return params, train, test, reg, g, gq, hess, fisher


def _oracle(gq, curvature, g, damping=0.0):
    """``g_qᵀ (C + δI)⁻¹ g_i`` by a dense float64 numpy solve."""
    return gq @ np.linalg.solve(curvature + damping * np.eye(len(curvature)), g.T)


def _close(actual, expected, rel):
    """Max error relative to the largest entry of the oracle."""
    err = float(np.max(np.abs(np.asarray(actual) - expected)) / np.max(np.abs(expected)))
    assert err < rel, err
    return err


# ----------------------------------------------------------------- closed forms and bj.exact()


@pytest.mark.parametrize("m", [7, 25], ids=["fewer_queries", "fewer_train"])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_ridge_equals_closed_form(x64, m, damping):
    theta, train, test, reg, g, gq, hess = _ridge(m=m)
    expected = _oracle(gq, hess, g, damping)
    dense = influence(ridge_loss, theta, train, test, regularizer=reg, damping=damping)
    assert dense.shape == (m, 20) and dense.dtype == jnp.float64
    _close(dense, expected, 1e-12)
    cg = influence(
        ridge_loss, theta, train, test, regularizer=reg, damping=damping, solver="cg", tol=1e-14
    )
    _close(cg, expected, 1e-11)
    # any solver(matvec, b) -> x, e.g. GMRES from bilevel_jax.linalg
    gmres = lambda mv, b: bj.linalg.solve_gmres(mv, b, maxiter=5, tol=1e-14)  # noqa: E731
    _close(
        influence(ridge_loss, theta, train, test, regularizer=reg, damping=damping, solver=gmres),
        expected,
        1e-11,
    )


@pytest.mark.parametrize("damping", [0.0, 0.2])
def test_logistic_equals_closed_form_and_minus_n_times_exact_hypergradient(x64, damping):
    params, train, test, reg, g, gq, hess, _ = _synthetic_logistic()
    n = g.shape[0]
    inf = influence(logistic_loss, params, train, test, regularizer=reg, damping=damping)
    _close(inf, _oracle(gq, hess, g, damping), 1e-12)

    # the library's hypergradient: λ = w, base loss mean(w ℓ) + R, meta loss = query q's loss
    problem_base = lambda th, w, b: jnp.mean(w * logistic_loss(th, b)) + reg(th)  # noqa: E731
    tx = optax.sgd(0.1)
    for q in range(3):
        query = jax.tree.map(lambda a, q=q: a[q : q + 1], test)
        problem = bj.BilevelProblem(
            problem_base, lambda th, w, b: jnp.sum(logistic_loss(th, b)), tx
        )
        inputs = bj.BilevelInputs(params, jnp.ones(n), tx.init(params), train, query)
        hg, _ = bj.exact(damping=damping).hypergrad(problem, inputs, optax.EmptyState())
        _close(inf[q], -n * np.asarray(hg.meta_grad), 1e-12)


def test_scalar_query_loss_gives_a_vector_and_a_vector_query_loss_a_matrix(x64):
    params, train, test, reg, g, gq, hess, _ = _synthetic_logistic()
    mean_loss = lambda th, q: jnp.mean(logistic_loss(th, q))  # noqa: E731
    inf = influence(logistic_loss, params, train, test, query_loss=mean_loss, regularizer=reg)
    assert inf.shape == (g.shape[0],)
    _close(inf, _oracle(gq.mean(0), hess, g), 1e-12)
    two = lambda th, q: jnp.stack([jnp.mean(logistic_loss(th, q)), jnp.sum(th["w"])])  # noqa: E731
    gq2 = np.stack([gq.mean(0), np.r_[np.ones(g.shape[1] - 1), 0.0]])
    _close(
        influence(logistic_loss, params, train, test, query_loss=two, regularizer=reg),
        _oracle(gq2, hess, g),
        1e-12,
    )


def test_jit_and_traced_damping(x64):
    theta, train, test, reg, g, gq, hess = _ridge()
    fn = jax.jit(lambda th, d: influence(ridge_loss, th, train, test, regularizer=reg, damping=d))
    _close(fn(theta, 0.5), _oracle(gq, hess, g, 0.5), 1e-12)


def test_repeated_calls_compile_once(x64):
    """The same losses and settings reuse one compiled program: a new θ, new data of the same
    shapes or a new damping do not recompile (each call used to jit a fresh closure)."""
    from bilevel_jax.influence import exact

    theta, train, test, reg, g, gq, hess = _ridge()
    traces = []

    def loss(th, b):  # counts its traces; the input checks trace it too (abstractly)
        traces.append(1)
        return ridge_loss(th, b)

    exact._jit_of.cache_clear()
    first = influence(loss, theta, train, test, regularizer=reg, damping=0.1)
    after_first = len(traces)
    second = influence(loss, 2 * theta, train, test, regularizer=reg, damping=0.5)
    during_second = len(traces) - after_first
    info = exact._jit_of.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert during_second < after_first  # only the input checks traced it again
    _close(first, _oracle(gq, hess, g, 0.1), 1e-12)
    assert not np.allclose(first, second)
    fwd = [forward_influence(loss, theta, train, test, regularizer=reg) for _ in range(2)]
    assert exact._jit_of.cache_info().hits == 2
    np.testing.assert_array_equal(fwd[0], fwd[1])


# ----------------------------------------------------------------- leave-one-out retraining


def test_predicts_leave_one_out_retraining_on_digits(x64):
    """L2 logistic regression, digits 3 vs 8 (sklearn's 8×8 digits, real data): retrain with each
    of 30 examples removed (w_i = 0, Newton to machine precision) and compare the change of each
    query loss with +influence/n."""
    digits = data.load_digits()
    keep = np.flatnonzero((digits.y == 3) | (digits.y == 8))
    rng = np.random.default_rng(0)
    keep = rng.permutation(keep)
    x = digits.x[keep].astype(np.float64)
    y = (digits.y[keep] == 8).astype(np.float64)
    x_tr, y_tr, x_te, y_te = x[:240], y[:240], x[240:], y[240:]
    lam = 3e-2
    params, reg, g, gq, hess, _ = _logistic_oracle(x_tr, y_tr, x_te, y_te, lam)
    n = len(x_tr)
    train = {"x": jnp.asarray(x_tr), "y": jnp.asarray(y_tr)}
    test = {"x": jnp.asarray(x_te), "y": jnp.asarray(y_te)}
    inf = np.asarray(influence(logistic_loss, params, train, test, regularizer=reg))
    mean_inf = np.asarray(
        influence(
            logistic_loss,
            params,
            train,
            test,
            query_loss=lambda th, q: jnp.mean(logistic_loss(th, q)),
            regularizer=reg,
        )
    )

    a, a_te = np.c_[x_tr, np.ones(n)], np.c_[x_te, np.ones(len(x_te))]
    lam_vec = np.r_[np.full(x_tr.shape[1], lam), 0.0]
    theta = np.r_[np.asarray(params["w"]), float(params["b"])]

    def query_losses(th):
        z = a_te @ th
        return np.logaddexp(0.0, z) - y_te * z

    def retrain(i, weight):
        """θ*(w) with w_i = weight (the others 1), by Newton from θ* (quadratic convergence)."""
        w = np.ones(n)
        w[i] = weight
        th = theta.copy()
        for _ in range(8):
            p = 1 / (1 + np.exp(-(a @ th)))
            grad = a.T @ (w * (p - y_tr)) / n + lam_vec * th
            h = a.T @ (a * (w * p * (1 - p))[:, None]) / n + np.diag(lam_vec)
            th = th - np.linalg.solve(h, grad)
        assert (
            np.linalg.norm(a.T @ (w * (1 / (1 + np.exp(-(a @ th))) - y_tr)) / n + lam_vec * th)
            < 1e-13
        )
        return th

    removed = rng.choice(n, size=30, replace=False)
    actual = np.array([query_losses(retrain(i, 0.0)) - query_losses(theta) for i in removed])

    # the derivative itself: down-weighting by t = 1e-4 changes f by t·influence/n + O(t²)
    t = 1e-4
    for i in removed[:5]:
        change = (query_losses(retrain(i, 1.0 - t)) - query_losses(theta)) / t * n
        np.testing.assert_allclose(change, inf[:, i], rtol=2e-3, atol=2e-3 * np.abs(inf).max())

    # three test examples and the mean test loss
    for q in range(3):
        pred = inf[q, removed] / n
        r = np.corrcoef(pred, actual[:, q])[0, 1]
        slope = np.dot(pred, actual[:, q]) / np.dot(pred, pred)
        assert r > 0.99 and 0.9 < slope < 1.1, (q, r, slope)
    pred = mean_inf[removed] / n
    r = np.corrcoef(pred, actual.mean(1))[0, 1]
    slope = np.dot(pred, actual.mean(1)) / np.dot(pred, pred)
    assert r > 0.99 and 0.9 < slope < 1.1, (r, slope)


# ----------------------------------------------------------------- curvatures


def test_curvature_choices_against_dense_oracles(x64):
    params, train, test, reg, g, gq, hess, fisher = _synthetic_logistic()
    kw: dict[str, Any] = {"regularizer": reg, "damping": 0.1}
    _close(
        influence(logistic_loss, params, train, test, curvature="fisher", **kw),
        _oracle(gq, fisher, g, 0.1),
        1e-12,
    )
    _close(  # fisher by CG: Jᵀ(J v)/n, no n × p matrix
        influence(
            logistic_loss, params, train, test, curvature="fisher", solver="cg", tol=1e-14, **kw
        ),
        _oracle(gq, fisher, g, 0.1),
        1e-11,
    )
    # gradient dot products: C = I, so (1 + δ)⁻¹ g_qᵀ g_i (R is not used)
    _close(
        influence(logistic_loss, params, train, test, curvature="identity", **kw),
        gq @ g.T / 1.1,
        1e-12,
    )
    # Gauss–Newton of a linear model with logistic loss is its Hessian
    outputs_fn = lambda th, b: b["x"] @ th["w"] + th["b"]  # noqa: E731
    output_loss = lambda z, b: jax.nn.softplus(z) - b["y"] * z  # noqa: E731
    gn = influence(
        logistic_loss,
        params,
        train,
        test,
        curvature="gauss_newton",
        outputs_fn=outputs_fn,
        output_loss=output_loss,
        **kw,
    )
    _close(gn, _oracle(gq, hess, g, 0.1), 1e-12)
    assert set(CURVATURES) == {"hessian", "gauss_newton", "fisher", "identity"}


def _mlp():
    """A 3-8-3 tanh MLP with softmax cross-entropy, at random parameters (not a minimum)."""
    rng = np.random.default_rng(3)
    params = {
        "w1": jnp.asarray(rng.normal(size=(3, 8))),
        "b1": jnp.asarray(0.1 * rng.normal(size=8)),
        "w2": jnp.asarray(rng.normal(size=(8, 3))),
        "b2": jnp.zeros(3),
    }
    batch = lambda k: {  # noqa: E731
        "x": jnp.asarray(rng.normal(size=(k, 3))),
        "y": jnp.asarray(rng.integers(0, 3, size=k)),
    }
    train, test = batch(15), batch(4)

    def outputs_fn(th, b):
        return jnp.tanh(b["x"] @ th["w1"] + th["b1"]) @ th["w2"] + th["b2"]

    def output_loss(z, b):
        return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, b["y"][:, None], 1)[:, 0]

    loss = lambda th, b: output_loss(outputs_fn(th, b), b)  # noqa: E731
    reg = lambda th: 0.05 * jnp.sum(ravel_pytree(th)[0] ** 2)  # noqa: E731
    return params, train, test, outputs_fn, output_loss, loss, reg


def test_gauss_newton_and_hessian_of_an_mlp_against_autodiff_oracles(x64):
    params, train, test, outputs_fn, output_loss, loss, reg = _mlp()
    flat, unravel = ravel_pytree(params)
    n, p = 15, flat.size
    g = np.asarray(jax.jit(jax.jacrev(lambda f: loss(unravel(f), train)))(flat))
    gq = np.asarray(jax.jit(jax.jacrev(lambda f: loss(unravel(f), test)))(flat))
    # dense Gauss–Newton: Σ_i J_iᵀ Λ_i J_i / n + ∇²R, J_i by jacfwd, Λ_i by jax.hessian
    jac = np.asarray(jax.jit(jax.jacfwd(lambda f: outputs_fn(unravel(f), train)))(flat))
    z = outputs_fn(params, train)  # (n, 3)

    def lam_i(zi, yi):
        return jax.hessian(lambda u: output_loss(u[None], {"y": yi[None]})[0])(zi)

    lam = np.asarray(jax.jit(jax.vmap(lam_i))(z, train["y"]))  # (n, 3, 3)
    gn = np.einsum("nap,nab,nbq->pq", jac, lam, jac) / n + 0.1 * np.eye(p)
    got = influence(
        loss,
        params,
        train,
        test,
        regularizer=reg,
        curvature="gauss_newton",
        outputs_fn=outputs_fn,
        output_loss=output_loss,
    )
    _close(got, _oracle(gq, gn, g), 1e-10)
    # the exact Hessian (indefinite here) by jax.hessian of the flat objective
    hess = np.asarray(
        jax.jit(jax.hessian(lambda f: jnp.mean(loss(unravel(f), train)) + reg(unravel(f))))(flat)
    )
    hessian_inf = influence(loss, params, train, test, regularizer=reg)
    _close(hessian_inf, _oracle(gq, hess, g), 1e-10)
    assert np.max(np.abs(np.asarray(hessian_inf) - np.asarray(got))) > 1e-3  # they differ


# ----------------------------------------------------------------- forward-only estimator


def test_forward_influence_equals_exact_influence_for_the_mean_query_loss(x64):
    params, train, test, reg, g, gq, hess, _ = _synthetic_logistic()
    mean_loss = lambda th, q: jnp.mean(logistic_loss(th, q))  # noqa: E731
    exact = np.asarray(
        influence(logistic_loss, params, train, test, query_loss=mean_loss, regularizer=reg)
    )
    _close(exact, _oracle(gq.mean(0), hess, g), 1e-12)
    errors = {}
    for difference in ("sequential", "vmap"):
        fwd = forward_influence(
            logistic_loss, params, train, test, regularizer=reg, difference=difference
        )
        assert fwd.shape == exact.shape and fwd.dtype == jnp.float64
        errors[difference] = _close(fwd, exact, 1e-6)
    jvp = forward_influence(
        logistic_loss, params, train, test, regularizer=reg, difference="jvp", solver="dense"
    )
    _close(jvp, exact, 1e-12)
    # the error of the central difference is O(ε²): halving α divides it by about 4
    err = [
        np.max(
            np.abs(
                np.asarray(
                    forward_influence(logistic_loss, params, train, test, regularizer=reg, alpha=a)
                )
                - exact
            )
        )
        for a in (0.4, 0.2)
    ]
    assert 3.5 < err[0] / err[1] < 4.5, err
    # identity curvature: no solve, the SAMA-NA direction: gradient dot products with g_f
    _close(
        forward_influence(logistic_loss, params, train, test, curvature="identity"),
        g @ gq.mean(0),
        1e-6,
    )


def test_forward_influence_gauss_newton_cg_on_an_mlp(x64):
    params, train, test, outputs_fn, output_loss, loss, reg = _mlp()
    kw: dict[str, Any] = {
        "regularizer": reg,
        "curvature": "gauss_newton",
        "outputs_fn": outputs_fn,
        "output_loss": output_loss,
    }
    exact = influence(
        loss, params, train, test, query_loss=lambda th, q: jnp.mean(loss(th, q)), **kw
    )
    _close(forward_influence(loss, params, train, test, tol=1e-14, **kw), exact, 1e-6)


def test_forward_influence_in_float32_with_the_default_alpha():
    theta, train, test, reg, g, gq, hess = _ridge()
    theta = theta.astype(jnp.float32)
    train = jax.tree.map(lambda a: a.astype(jnp.float32), train)
    test = jax.tree.map(lambda a: a.astype(jnp.float32), test)
    fwd = forward_influence(ridge_loss, theta, train, test, regularizer=reg)
    assert fwd.dtype == jnp.float32
    _close(fwd, _oracle(gq.mean(0), hess, g), 2e-4)  # measured 2.1e-5


# ----------------------------------------------------------------- errors


def test_bad_inputs_raise_clear_errors(x64):
    theta, train, test, reg, *_ = _ridge()
    err = bj.BilevelInputError
    with pytest.raises(err, match=r"one loss per example, shape \(20,\)"):
        influence(lambda th, b: jnp.mean(ridge_loss(th, b)), theta, train, test)
    with pytest.raises(err, match="disagree on the number of examples"):
        influence(ridge_loss, theta, {"x": train["x"], "y": train["y"][:-1]}, test)
    with pytest.raises(err, match="leaf .* is a scalar"):
        influence(ridge_loss, theta, {"x": train["x"], "y": jnp.float64(0.0)}, test)
    with pytest.raises(err, match=r"shape \(\) or \(m,\)"):
        influence(ridge_loss, theta, train, test, query_loss=lambda th, q: jnp.ones((2, 2)))
    with pytest.raises(err, match="pass query_batch"):
        influence(ridge_loss, theta, train)
    with pytest.raises(err, match=r"damping \(δ in C \+ δI\) must be a finite number >= 0"):
        influence(ridge_loss, theta, train, test, damping=-0.1)
    with pytest.raises(err, match="damping"):
        influence(ridge_loss, theta, train, test, damping=float("nan"))
    with pytest.raises(err, match="unknown curvature 'hesian'; choose one of hessian"):
        influence(ridge_loss, theta, train, test, curvature="hesian")  # type: ignore[arg-type]
    with pytest.raises(err, match="unknown solver 'lu'"):
        influence(ridge_loss, theta, train, test, solver="lu")  # type: ignore[arg-type]
    with pytest.raises(err, match="maxiter must be an integer >= 1"):
        influence(ridge_loss, theta, train, test, solver="cg", maxiter=0)
    with pytest.raises(err, match="needs the loss split as outputs"):
        influence(ridge_loss, theta, train, test, curvature="gauss_newton")
    with pytest.raises(err, match="curvature='gauss_newton' only"):
        influence(ridge_loss, theta, train, test, outputs_fn=lambda th, b: b["x"] @ th)
    with pytest.raises(err, match="regularizer.* must return a scalar"):
        influence(ridge_loss, theta, train, test, regularizer=lambda th: th)
    with pytest.raises(err, match="dtype int"):
        influence(ridge_loss, jnp.arange(5), train, test)
    with pytest.raises(err, match="calling per_example_loss"):
        influence(lambda th, b: b["missing"] @ th, theta, train, test)
    with pytest.raises(err, match="must return one scalar"):
        forward_influence(ridge_loss, theta, train, test, query_loss=ridge_loss)
    with pytest.raises(err, match="alpha"):
        forward_influence(ridge_loss, theta, train, test, alpha=0.0)
    with pytest.raises(err, match="unknown difference 'forward'"):
        forward_influence(ridge_loss, theta, train, test, difference="forward")  # type: ignore[arg-type]
    with pytest.raises(err, match="unknown curvature"):
        forward_influence(ridge_loss, theta, train, test, curvature="ggn")  # type: ignore[arg-type]


def test_a_singular_curvature_raises_instead_of_returning_nan(x64):
    theta, train, test, *_ = _ridge()
    # the loss sees only a + b: the Hessian [[H, H], [H, H]] is singular
    params = {"a": theta, "b": jnp.zeros_like(theta)}
    loss = lambda th, b: ridge_loss(th["a"] + th["b"], b)  # noqa: E731
    with pytest.raises(FloatingPointError, match="add damping"):
        influence(loss, params, train, test)
    assert np.all(np.isfinite(np.asarray(influence(loss, params, train, test, damping=1e-3))))
