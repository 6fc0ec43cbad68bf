"""The JAXopt migration guide (docs/migration/jaxopt.md), checked against JAXopt itself.

Each test builds one problem of the guide and differentiates it with JAXopt and with
bilevel_jax in float64. The gradients must agree with each other and with an oracle that
neither library computes: a closed form, or a dense implicit-function-theorem solve at a
Newton solution. Direct (dense) adjoint solves must agree to rtol 1e-8. Iterative ones get a
looser bound only where the reason is written beside it.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest

import bilevel_jax as bj

jaxopt = pytest.importorskip(
    "jaxopt", reason="jaxopt is not installed (test extra): pip install jaxopt"
)
from jaxopt import implicit_diff as jid  # noqa: E402
from jaxopt import linear_solve as jls  # noqa: E402

DIRECT_RTOL = 1e-8


def rel(a, b) -> float:
    """Max-norm relative error of ``a`` against the reference ``b``."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# --------------------------------------------------------------------------- ridge


def ridge_problem():
    """The guide's ridge regression: θ*(λ) = argmin ½‖Xθ − y‖² + ½λ‖θ‖², a validation loss."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    X, X_val = jax.random.normal(k1, (40, 5)), jax.random.normal(k2, (20, 5))
    w_true = jnp.array([1.0, -2.0, 0.5, 0.0, 3.0])
    y = X @ w_true + jax.random.normal(k3, (40,))
    y_val = X_val @ w_true

    def inner_loss(theta, lam):
        return 0.5 * jnp.sum((X @ theta - y) ** 2) + 0.5 * lam * theta @ theta

    def ridge(init, lam):
        return jnp.linalg.solve(X.T @ X + lam * jnp.eye(5), X.T @ y)

    def val_loss(theta):
        return 0.5 * jnp.sum((X_val @ theta - y_val) ** 2)

    def closed_form(lam):
        A = X.T @ X + lam * jnp.eye(5)
        theta = jnp.linalg.solve(A, X.T @ y)
        return -jax.grad(val_loss)(theta) @ jnp.linalg.solve(A, theta)

    return inner_loss, ridge, val_loss, closed_form


def test_ridge_custom_root_cg_and_direct_solves_match_jaxopt_and_closed_form(x64):
    inner_loss, ridge, val_loss, closed_form = ridge_problem()
    F = jax.grad(inner_loss)
    lam = jnp.asarray(3.0)

    def grad(decorator):
        solver = decorator(ridge)
        return jax.grad(lambda l: val_loss(solver(None, l)))(lam)

    oracle = closed_form(lam)
    jx_lu = grad(jid.custom_root(F, solve=jls.solve_lu))
    jx_cholesky = grad(jid.custom_root(F, solve=jls.solve_cholesky))
    bj_dense = grad(bj.custom_root(F, solve=bj.linalg.solve_dense))
    assert rel(bj_dense, jx_lu) <= DIRECT_RTOL
    assert rel(bj_dense, jx_cholesky) <= DIRECT_RTOL
    assert rel(bj_dense, oracle) <= DIRECT_RTOL
    assert rel(jx_lu, oracle) <= DIRECT_RTOL

    # CG on both sides, both stopped at a relative residual of 1e-12: on this 5×5 system
    # (condition number 2.5) CG converges in at most 5 iterations, so the bound is the direct
    # one. Measured: 4e-16 against the closed form, 0 between the libraries.
    jx_cg = grad(jid.custom_root(F, solve=functools.partial(jls.solve_cg, tol=1e-12)))
    bj_cg = grad(bj.custom_root(F, solve=functools.partial(bj.linalg.solve_cg, tol=1e-12)))
    assert rel(bj_cg, jx_cg) <= DIRECT_RTOL
    assert rel(bj_cg, oracle) <= DIRECT_RTOL
    # bilevel_jax's defaults (CG, tol 1e-10, maxiter 100) reach the same value too
    assert rel(grad(bj.custom_root(F)), oracle) <= DIRECT_RTOL
    # the value of the guide's printed output (a regression check on the page itself)
    assert f"{float(bj_cg):.10f}" == "0.1046587811"


# --------------------------------------------------------------------------- fixed point

W = ((0.3, 0.8, 0.0), (-0.5, 0.2, 0.4), (0.1, -0.7, 0.3))  # ∂_θT is not symmetric


def fixed_point_problem():
    """The guide's contraction T(θ, λ) = 0.5 tanh(Wθ) + λ and its dense oracle."""
    w = jnp.array(W)

    def T(theta, lam):
        return 0.5 * jnp.tanh(w @ theta) + lam

    def iterate(init, lam):
        return jax.lax.fori_loop(0, 100, lambda _, th: T(th, lam), init)

    target = jnp.array([1.0, 0.0, -1.0])
    lam = jnp.array([0.3, -0.2, 0.5])

    def grad(solver, lam=lam):
        return jax.grad(lambda l: 0.5 * jnp.sum((solver(jnp.zeros(3), l) - target) ** 2))(lam)

    theta = iterate(jnp.zeros(3), lam)
    jac = jax.jacobian(T)(theta, lam)
    oracle = jnp.linalg.solve((jnp.eye(3) - jac).T, theta - target)
    return T, iterate, grad, oracle, lam, target


def test_custom_fixed_point_matches_jaxopt_and_dense_oracle(x64):
    T, iterate, grad, oracle, lam, target = fixed_point_problem()
    # direct adjoint solves
    jx_lu = grad(jid.custom_fixed_point(T, solve=jls.solve_lu)(iterate))
    bj_dense = grad(bj.custom_fixed_point(T, solve=bj.linalg.solve_dense)(iterate))
    assert rel(bj_dense, jx_lu) <= DIRECT_RTOL
    assert rel(bj_dense, oracle) <= DIRECT_RTOL
    # Krylov adjoints: JAXopt's default (CG on the normal equations, here with tol 1e-12 in
    # place of its 1e-5) and GMRES against bilevel_jax's default GMRES; on a 3×3 system GMRES
    # is exact after 3 Arnoldi steps and normal CG after 3 iterations, so the direct bound
    # holds. Measured: ≤ 1.3e-16.
    tight_normal_cg = functools.partial(jls.solve_normal_cg, tol=1e-12)
    jx_normal_cg = grad(jid.custom_fixed_point(T, solve=tight_normal_cg)(iterate))
    tight_gmres = functools.partial(jls.solve_gmres, tol=1e-12)
    jx_gmres = grad(jid.custom_fixed_point(T, solve=tight_gmres)(iterate))
    bj_gmres = grad(bj.custom_fixed_point(T)(iterate))
    for got in (jx_normal_cg, jx_gmres):
        assert rel(bj_gmres, got) <= DIRECT_RTOL
    assert rel(bj_gmres, oracle) <= DIRECT_RTOL

    # JAXopt's own solver class, differentiated implicitly by default. It stops at
    # ‖T(θ) − θ‖ ≤ 1e-12, so its θ* is off by about that; measured: 9e-14.
    fpi = jaxopt.FixedPointIteration(
        fixed_point_fun=T, maxiter=100, tol=1e-12, implicit_diff_solve=jls.solve_lu
    )
    g_fpi = jax.grad(lambda l: 0.5 * jnp.sum((fpi.run(jnp.zeros(3), l).params - target) ** 2))(lam)
    assert rel(bj_dense, g_fpi) <= DIRECT_RTOL

    # The guide's warning: the same fixed point as a root of θ − T with bilevel_jax's default
    # CG is silently wrong (∂_θF is not symmetric), while GMRES there is right.
    root_fn = lambda th, lam: th - T(th, lam)  # noqa: E731
    wrong = grad(bj.custom_root(root_fn)(iterate))
    assert bool(jnp.all(jnp.isfinite(wrong))) and rel(wrong, oracle) > 0.5
    right = grad(bj.custom_root(root_fn, solve=bj.linalg.solve_gmres)(iterate))
    assert rel(right, oracle) <= DIRECT_RTOL


def test_linear_solvers_plug_into_the_other_library(x64):
    """The adjoint systems are posed alike, so the solvers can be exchanged (guide, 'Linear
    solvers'); and the guide's normal-equation CG recipe for bilevel_jax is correct."""
    T, iterate, grad, oracle, _, _ = fixed_point_problem()
    root_fn = lambda th, lam: th - T(th, lam)  # noqa: E731
    # a JAXopt solver in bj.custom_root, a bj.linalg solver in JAXopt's custom_root
    jx_in_bj = functools.partial(jls.solve_normal_cg, tol=1e-12)
    assert rel(grad(bj.custom_root(root_fn, solve=jx_in_bj)(iterate)), oracle) <= DIRECT_RTOL
    bj_in_jx = functools.partial(bj.linalg.solve_gmres, maxiter=100)
    assert rel(grad(jid.custom_root(root_fn, solve=bj_in_jx)(iterate)), oracle) <= DIRECT_RTOL

    def solve_normal_cg(matvec, b, *, x0=None, maxiter=100, tol=1e-10, damping=0.0):
        rmatvec = lambda v: jax.linear_transpose(matvec, b)(v)[0]  # noqa: E731
        normal = lambda x: rmatvec(matvec(x))  # noqa: E731
        return bj.linalg.solve_cg(
            normal, rmatvec(b), x0=x0, maxiter=maxiter, tol=tol, damping=damping
        )

    recipe = grad(bj.custom_root(root_fn, solve=solve_normal_cg)(iterate))
    assert rel(recipe, oracle) <= DIRECT_RTOL

    # dense solves with a ridge: JAXopt's ridge= is bilevel_jax's damping=
    M = jax.random.normal(jax.random.PRNGKey(0), (6, 6))
    A, b = jnp.eye(6) + 0.3 * M, jnp.arange(1.0, 7.0)
    x_jx = jls.solve_lu(lambda v: A @ v, b, ridge=0.5)
    x_bj = bj.linalg.solve_dense(lambda v: A @ v, b, damping=0.5)
    assert rel(x_bj, x_jx) <= DIRECT_RTOL
    assert rel(x_bj, jnp.linalg.solve(A + 0.5 * jnp.eye(6), b)) <= DIRECT_RTOL


def test_has_aux_passes_aux_through_without_gradient(x64):
    inner_loss, ridge, val_loss, _ = ridge_problem()
    F = jax.grad(inner_loss)

    def with_aux(init, lam):
        return ridge(init, lam), {"lam_twice": 2.0 * lam}

    results = {}
    for name, dec in {
        "jaxopt": jid.custom_root(F, has_aux=True, solve=jls.solve_lu),
        "bj": bj.custom_root(F, has_aux=True, solve=bj.linalg.solve_dense),
    }.items():
        solver = dec(with_aux)
        theta, aux = solver(None, 3.0)
        assert float(aux["lam_twice"]) == 6.0
        aux_grad = jax.grad(lambda l, s=solver: s(None, l)[1]["lam_twice"])(jnp.asarray(3.0))
        assert float(aux_grad) == 0.0  # not differentiated in either library
        results[name] = jax.grad(lambda l, s=solver: val_loss(s(None, l)[0]))(jnp.asarray(3.0))
    assert rel(results["bj"], results["jaxopt"]) <= DIRECT_RTOL


# --------------------------------------------------------------------------- OptaxSolver


def logistic_problem():
    """The guide's L2-regularised logistic regression (regulariser exp(log λ))."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    w_true = jnp.array([1.0, -2.0, 0.5, 0.0, 1.0])
    X, X_val = jax.random.normal(k[0], (40, 5)), jax.random.normal(k[1], (20, 5))
    y = (X @ w_true + 0.5 * jax.random.normal(k[2], (40,)) > 0).astype(jnp.float64)
    y_val = (X_val @ w_true > 0).astype(jnp.float64)

    def logistic(theta, X, y):
        z = X @ theta
        return jnp.mean(jax.nn.softplus(z) - y * z)

    def inner_loss(theta, log_lam, X, y):
        return logistic(theta, X, y) + 0.5 * jnp.exp(log_lam) * theta @ theta

    return logistic, inner_loss, X, y, X_val, y_val


def test_optax_solver_implicit_diff_matches_an_optax_loop_in_bj_custom_root(x64):
    logistic, inner_loss, X, y, X_val, y_val = logistic_problem()
    tx = optax.sgd(1.0, momentum=0.5)
    maxiter, tol = 500, 1e-10

    solver = jaxopt.OptaxSolver(
        fun=inner_loss,
        opt=tx,
        maxiter=maxiter,
        tol=tol,
        implicit_diff=True,
        implicit_diff_solve=functools.partial(jls.solve_cg, tol=1e-12),
    )

    @bj.custom_root(
        jax.grad(inner_loss),
        has_aux=True,
        solve=functools.partial(bj.linalg.solve_cg, maxiter=100, tol=1e-12),
    )
    def optax_solve(init, log_lam, X, y):
        def cond(carry):
            return (carry[3] > tol) & (carry[2] < maxiter)

        def body(carry):
            theta, state, i, _ = carry
            g = jax.grad(inner_loss)(theta, log_lam, X, y)
            updates, state = tx.update(g, state, theta)
            return optax.apply_updates(theta, updates), state, i + 1, optax.tree.norm(g)

        theta, _, i, _ = jax.lax.while_loop(cond, body, (init, tx.init(init), 0, jnp.inf))
        return theta, {"iterations": i}

    def val_jx(log_lam, X):
        return logistic(solver.run(jnp.zeros(5), log_lam, X, y).params, X_val, y_val)

    def val_bj(log_lam, X):
        return logistic(optax_solve(jnp.zeros(5), log_lam, X, y)[0], X_val, y_val)

    log_lam = jnp.asarray(-1.0)
    run = solver.run(jnp.zeros(5), log_lam, X, y)
    theta_bj, aux = optax_solve(jnp.zeros(5), log_lam, X, y)
    assert int(run.state.iter_num) == int(aux["iterations"]) < maxiter  # converged, same steps
    assert rel(theta_bj, run.params) <= DIRECT_RTOL

    # gradients in λ and in the data X (a cotangent for every array argument), both libraries:
    # the two loops take the same optax steps and both adjoint CG solves run to 1e-12 on a 5×5
    # system, so the direct bound holds. Measured: 0 (bit-identical).
    g_jx = jax.grad(val_jx, argnums=(0, 1))(log_lam, X)
    g_bj = jax.grad(val_bj, argnums=(0, 1))(log_lam, X)
    assert rel(g_bj[0], g_jx[0]) <= DIRECT_RTOL
    assert rel(g_bj[1], g_jx[1]) <= DIRECT_RTOL

    # oracle: Newton's method to machine precision and a dense implicit-function solve
    theta = jnp.zeros(5)
    for _ in range(20):
        H = jax.hessian(inner_loss)(theta, log_lam, X, y)
        theta = theta - jnp.linalg.solve(H, jax.grad(inner_loss)(theta, log_lam, X, y))
    H = jax.hessian(inner_loss)(theta, log_lam, X, y)
    cross = jax.jacobian(jax.grad(inner_loss), argnums=1)(theta, log_lam, X, y)
    oracle = -cross @ jnp.linalg.solve(H, jax.grad(logistic)(theta, X_val, y_val))
    # Looser than the direct bound: the optax loops stop at ‖∇_θL‖ ≤ 1e-10, so θ* is off by
    # up to 1e-10/μ (μ ≥ exp(−1) ≈ 0.37, the regulariser), which passes into the gradient
    # linearly. Measured: 1.8e-10 for both.
    assert rel(g_bj[0], oracle) <= 1e-7
    assert rel(g_jx[0], oracle) <= 1e-7
