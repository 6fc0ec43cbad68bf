"""Implicit differentiation of inner solvers (``custom_root`` / ``custom_fixed_point``).

Reference problem: ridge regression, θ*(λ) = argmin ‖Xθ − y‖² + Σ λ θ², solved by
gradient descent in ``lax.fori_loop`` (or ``lax.while_loop``) and differentiated
through the decorator. Closed form: A = XᵀX + diag(λ), θ* = A⁻¹Xᵀy,
dθ*/dλ_i = −A⁻¹ e_i θ*_i, so for the validation loss V(θ) = ‖X'θ − y'‖² with
g = ∇V(θ*): dV/dλ_i = −(A⁻¹g)_i θ*_i.
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import linalg
from bilevel_jax._checks import BilevelInputError
from bilevel_jax.implicit_diff import custom_fixed_point, custom_root, root_vjp

P = 5
RTOL = 1e-8  # Krylov / dense adjoint solves vs closed form (float64)
NEUMANN_RTOL = 1e-6  # Neumann series truncated at 400 terms
FD_RTOL = 1e-6  # central finite differences, h = 1e-5


def _data():
    rng = np.random.default_rng(0)
    return (
        jnp.asarray(rng.normal(size=(30, P))),
        jnp.asarray(rng.normal(size=30)),
        jnp.asarray(rng.normal(size=(20, P))),
        jnp.asarray(rng.normal(size=20)),
    )


def inner_loss(th, lam, X, y):
    return jnp.sum((X @ th - y) ** 2) + jnp.sum(lam * th**2)


def _gd(init, lam, X, y, n_steps=500):
    """Plain gradient descent; converges to ~1e-16 in 500 steps for this data."""
    step = 1.0 / (2 * (jnp.linalg.norm(X, 2) ** 2 + jnp.max(lam)))
    body = lambda _, th: th - step * jax.grad(inner_loss)(th, lam, X, y)  # noqa: E731
    return jax.lax.fori_loop(0, n_steps, body, init)


def _closed_grad(lam, X, y, Xv, yv):
    A = X.T @ X + jnp.diag(jnp.broadcast_to(lam, (P,)))
    th = jnp.linalg.solve(A, X.T @ y)
    g = 2 * Xv.T @ (Xv @ th - yv)
    per_coord = -jnp.linalg.solve(A, g) * th
    return per_coord.sum() if jnp.ndim(lam) == 0 else per_coord


def _neumann_kwargs(lam, X):
    # A = ∂_θF = 2(XᵀX + diag λ); eta = 1/λ_max(A) makes I − ηA a contraction.
    lmax = 2 * (jnp.linalg.norm(X, 2) ** 2 + jnp.max(jnp.asarray(lam)))
    return {"eta": float(1.0 / lmax), "maxiter": 400}


SOLVES = ["cg", "gmres", "bicgstab", "dense"]


def _solver(name, **kw):
    """``bilevel_jax.linalg.solve_<name>`` with ``kw`` bound."""
    return functools.partial(getattr(linalg, f"solve_{name}"), **kw)


def _ridge(solve, solver_kwargs=None):
    kw = {"tol": 1e-13} if solve in ("cg", "gmres", "bicgstab") else {}
    kw.update(solver_kwargs or {})
    return custom_root(jax.grad(inner_loss), solve=_solver(solve, **kw))(_gd)


def _val_fn(ridge, X, y, Xv, yv):
    def val(lam):
        th = ridge(jnp.zeros(P), lam, X, y)
        return jnp.sum((Xv @ th - yv) ** 2)

    return val


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("solve", SOLVES + ["neumann"])
@pytest.mark.parametrize("lam_kind", ["scalar", "vector"])
def test_ridge_hypergradient_matches_closed_form(x64, solve, lam_kind):
    X, y, Xv, yv = _data()
    lam = jnp.asarray(0.7) if lam_kind == "scalar" else jnp.linspace(0.2, 1.5, P)
    kw = _neumann_kwargs(lam, X) if solve == "neumann" else None
    val = _val_fn(_ridge(solve, kw), X, y, Xv, yv)
    got = jax.jit(jax.grad(val))(lam)
    want = _closed_grad(lam, X, y, Xv, yv)
    assert got.shape == jnp.shape(lam)
    np.testing.assert_allclose(got, want, rtol=NEUMANN_RTOL if solve == "neumann" else RTOL)


def test_ridge_hypergradient_matches_finite_differences(x64):
    X, y, Xv, yv = _data()
    val = jax.jit(_val_fn(_ridge("cg"), X, y, Xv, yv))
    h = 1e-5
    lam = 0.7
    fd = (val(jnp.asarray(lam + h)) - val(jnp.asarray(lam - h))) / (2 * h)
    np.testing.assert_allclose(jax.grad(val)(jnp.asarray(lam)), fd, rtol=FD_RTOL)

    lam_vec = jnp.linspace(0.2, 1.5, P)
    eye = jnp.eye(P)
    fd_vec = jnp.array([(val(lam_vec + h * e) - val(lam_vec - h * e)) / (2 * h) for e in eye])
    np.testing.assert_allclose(jax.grad(val)(lam_vec), fd_vec, rtol=FD_RTOL)


def test_init_gets_zero_cotangent(x64):
    X, y, Xv, yv = _data()
    ridge = _ridge("cg")
    val = lambda init, lam: jnp.sum((Xv @ ridge(init, lam, X, y) - yv) ** 2)  # noqa: E731
    g_init, g_lam = jax.jit(jax.grad(val, argnums=(0, 1)))(jnp.ones(P), jnp.asarray(0.7))
    np.testing.assert_array_equal(g_init, jnp.zeros(P))
    np.testing.assert_allclose(g_lam, _closed_grad(0.7, X, y, Xv, yv), rtol=RTOL)


# --------------------------------------------------------------------------- transformations


def test_under_jit_and_vmap(x64):
    X, y, Xv, yv = _data()
    grad = jax.grad(_val_fn(_ridge("cg"), X, y, Xv, yv))
    lams = jnp.array([0.1, 0.7, 2.0])
    eager = jnp.stack([jax.jit(grad)(l) for l in lams])
    np.testing.assert_allclose(grad(lams[1]), eager[1], rtol=1e-12)  # jit == eager
    vmapped = jax.jit(jax.vmap(grad))(lams)
    np.testing.assert_allclose(vmapped, eager, rtol=1e-10)
    want = jnp.stack([_closed_grad(l, X, y, Xv, yv) for l in lams])
    np.testing.assert_allclose(vmapped, want, rtol=RTOL)

    # a batch of per-coordinate λ vectors, and the forward solution itself
    lam_vecs = jnp.stack([jnp.linspace(0.2, 1.5, P), jnp.full(P, 0.4)])
    np.testing.assert_allclose(
        jax.jit(jax.vmap(grad))(lam_vecs),
        jnp.stack([jax.jit(grad)(l) for l in lam_vecs]),
        rtol=1e-10,
    )
    ridge = _ridge("cg")
    sols = jax.jit(jax.vmap(lambda l: ridge(jnp.zeros(P), l, X, y)))(lams)
    np.testing.assert_allclose(sols[2], ridge(jnp.zeros(P), lams[2], X, y), rtol=1e-12)


# --------------------------------------------------------------------------- argument kinds


def test_pytree_lambda(x64):
    """λ = {"l2": scalar, "center": vector}: L = ‖Xθ − y‖² + l2‖θ − center‖²."""
    X, y, Xv, yv = _data()

    def loss(th, lam, X, y):
        return jnp.sum((X @ th - y) ** 2) + lam["l2"] * jnp.sum((th - lam["center"]) ** 2)

    @custom_root(jax.grad(loss), solve=_solver("gmres", tol=1e-13))
    def solver(init, lam, X, y):
        step = 1.0 / (2 * (jnp.linalg.norm(X, 2) ** 2 + lam["l2"]))
        body = lambda _, th: th - step * jax.grad(loss)(th, lam, X, y)  # noqa: E731
        return jax.lax.fori_loop(0, 500, body, init)

    lam = {"l2": jnp.asarray(0.9), "center": jnp.linspace(-1.0, 1.0, P)}
    g = jax.grad(lambda l: jnp.sum((Xv @ solver(jnp.zeros(P), l, X, y) - yv) ** 2))(lam)

    # A θ = Xᵀy + l2·c  ⇒  dθ/dl2 = A⁻¹(c − θ),  dθ/dc = l2·A⁻¹  (A symmetric)
    A = X.T @ X + lam["l2"] * jnp.eye(P)
    th = jnp.linalg.solve(A, X.T @ y + lam["l2"] * lam["center"])
    Ainv_g = jnp.linalg.solve(A, 2 * Xv.T @ (Xv @ th - yv))
    assert set(g) == {"l2", "center"}
    np.testing.assert_allclose(g["l2"], Ainv_g @ (lam["center"] - th), rtol=RTOL)
    np.testing.assert_allclose(g["center"], lam["l2"] * Ainv_g, rtol=RTOL)


def test_several_positional_args_are_differentiated(x64):
    """Gradient w.r.t. the training targets y: dθ*/dy = A⁻¹Xᵀ."""
    X, y, Xv, yv = _data()
    ridge = _ridge("cg")
    lam = jnp.asarray(0.7)
    g_lam, g_y = jax.grad(
        lambda l, yy: jnp.sum((Xv @ ridge(jnp.zeros(P), l, X, yy) - yv) ** 2), argnums=(0, 1)
    )(lam, y)
    A = X.T @ X + lam * jnp.eye(P)
    th = jnp.linalg.solve(A, X.T @ y)
    np.testing.assert_allclose(g_lam, _closed_grad(lam, X, y, Xv, yv), rtol=RTOL)
    np.testing.assert_allclose(g_y, X @ jnp.linalg.solve(A, 2 * Xv.T @ (Xv @ th - yv)), rtol=RTOL)


def test_keyword_argument_is_differentiated(x64):
    X, y, Xv, yv = _data()

    def loss(th, X, y, *, lam):
        return inner_loss(th, lam, X, y)

    @custom_root(jax.grad(loss), solve=_solver("bicgstab", tol=1e-13))
    def solver(init, X, y, *, lam):
        return _gd(init, lam, X, y)

    val = jax.jit(lambda lam: jnp.sum((Xv @ solver(jnp.zeros(P), X, y, lam=lam) - yv) ** 2))
    lam = jnp.linspace(0.2, 1.5, P)
    g = jax.grad(val)(lam)
    np.testing.assert_allclose(g, _closed_grad(lam, X, y, Xv, yv), rtol=RTOL)
    h = 1e-5
    fd = jnp.array([(val(lam + h * e) - val(lam - h * e)) / (2 * h) for e in jnp.eye(P)])
    np.testing.assert_allclose(g, fd, rtol=FD_RTOL)
    np.testing.assert_allclose(jax.jit(jax.grad(val))(lam), g, rtol=1e-12)


def test_non_differentiable_arguments(x64):
    """Python int / str / None are static; an int array is traced with a float0 cotangent."""
    X, y, Xv, yv = _data()

    def loss(th, lam, X, y, n_steps, method, extra=None):
        assert method == "gd" and extra is None  # static values arrive unchanged
        return inner_loss(th, lam, X, y)

    @custom_root(jax.grad(loss), solve=linalg.solve_dense)
    def solver(init, lam, X, y, n_steps, method, extra=None):
        assert method == "gd" and extra is None
        return _gd(init, lam, X, y, n_steps)

    lam = jnp.asarray(0.7)
    want = _closed_grad(lam, X, y, Xv, yv)

    def val(l, n):
        return jnp.sum((Xv @ solver(jnp.zeros(P), l, X, y, n, "gd") - yv) ** 2)

    np.testing.assert_allclose(jax.grad(val)(lam, 500), want, rtol=RTOL)  # Python int: static
    # int array: traced (under jit a tracer), gets a float0 cotangent
    np.testing.assert_allclose(jax.jit(jax.grad(val))(lam, jnp.asarray(500)), want, rtol=RTOL)

    # jax.vjp w.r.t. the integer array: float0 cotangent, no error
    _, vjp = jax.vjp(lambda l, n: solver(jnp.zeros(P), l, X, y, n, "gd"), lam, jnp.asarray(500))
    g_lam, g_n = vjp(jnp.ones(P))
    assert g_n.dtype == jax.dtypes.float0
    assert np.isfinite(g_lam)


# --------------------------------------------------------------------------- fixed points


@pytest.mark.parametrize(
    "solve,kw",
    [
        ("gmres", {}),
        ("bicgstab", {}),
        ("dense", {}),
        ("cg", {}),
        ("neumann", {"eta": 1.0, "maxiter": 200}),
    ],
)
def test_fixed_point_tanh_closed_form(x64, solve, kw):
    """θ = λ·tanh(θ) + c elementwise (|λ| < 1): dθ/dλ = tanh θ / (1 − λ sech²θ)."""
    T = lambda th, lam, c: lam * jnp.tanh(th) + c  # noqa: E731

    @custom_fixed_point(T, solve=_solver(solve, **kw))
    def solver(init, lam, c):
        return jax.lax.fori_loop(0, 300, lambda _, th: T(th, lam, c), init)

    lam, c = jnp.linspace(-0.8, 0.8, P), jnp.linspace(0.5, -1.0, P)
    th = solver(jnp.zeros(P), lam, c)
    np.testing.assert_allclose(th, T(th, lam, c), atol=1e-14)
    g_lam, g_c = jax.grad(lambda l, cc: jnp.sum(solver(jnp.zeros(P), l, cc) ** 2), argnums=(0, 1))(
        lam, c
    )
    denom = 1 - lam / jnp.cosh(th) ** 2
    np.testing.assert_allclose(g_lam, 2 * th * jnp.tanh(th) / denom, rtol=RTOL)
    np.testing.assert_allclose(g_c, 2 * th / denom, rtol=RTOL)


@pytest.mark.parametrize("solve", ["gmres", "bicgstab", "dense", "neumann"])
def test_fixed_point_nonsymmetric_matches_unrolled_autodiff(x64, solve):
    """T(θ) = λ·tanh(Wθ) + c with W non-symmetric, ‖λW‖ ≤ 0.5: vs autodiff of 200 iterations."""
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(size=(P, P)))
    W = 0.5 * W / jnp.linalg.norm(W, 2)
    c = jnp.asarray(rng.normal(size=P))
    T = lambda th, lam, c: lam * jnp.tanh(W @ th) + c  # noqa: E731

    def unrolled(init, lam, c):
        return jax.lax.fori_loop(0, 200, lambda _, t: T(t, lam, c), init)

    kw = {"eta": 1.0, "maxiter": 200} if solve == "neumann" else {}
    solver = custom_fixed_point(T, solve=_solver(solve, **kw))(unrolled)

    outer = lambda f: lambda lam, c: jnp.sum(jnp.sin(f(jnp.zeros(P), lam, c)))  # noqa: E731
    lam = jnp.asarray(0.9)
    got = jax.grad(outer(solver), argnums=(0, 1))(lam, c)
    want = jax.grad(outer(unrolled), argnums=(0, 1))(lam, c)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=1e-12)


# --------------------------------------------------------------------------- aux, loops, errors


def test_has_aux_passes_aux_through(x64):
    X, y, Xv, yv = _data()

    @custom_root(jax.grad(inner_loss), solve=_solver("cg", tol=1e-13), has_aux=True)
    def solver(init, lam, X, y):
        th = _gd(init, lam, X, y)
        gnorm = jnp.linalg.norm(jax.grad(inner_loss)(th, lam, X, y))
        return th, {"n_iter": jnp.asarray(500), "grad_norm": gnorm, "status": "converged"}

    lam = jnp.asarray(0.7)
    th, aux = solver(jnp.zeros(P), lam, X, y)
    assert aux["status"] == "converged"
    assert aux["n_iter"].dtype == jnp.asarray(500).dtype and int(aux["n_iter"]) == 500
    assert float(aux["grad_norm"]) < 1e-10
    np.testing.assert_allclose(th, _gd(jnp.zeros(P), lam, X, y), rtol=1e-14)

    def val(l):
        th, aux = solver(jnp.zeros(P), l, X, y)
        return jnp.sum((Xv @ th - yv) ** 2), aux

    g, aux2 = jax.grad(val, has_aux=True)(lam)
    np.testing.assert_allclose(g, _closed_grad(lam, X, y, Xv, yv), rtol=RTOL)
    assert aux2["status"] == "converged" and int(aux2["n_iter"]) == 500

    def val_jit(l):  # jit cannot return the string leaf; the numeric aux comes out
        loss, aux = val(l)
        assert aux["status"] == "converged"  # static leaf seen at trace time
        return loss, aux["n_iter"]

    g, n_iter = jax.jit(jax.grad(val_jit, has_aux=True))(lam)
    np.testing.assert_allclose(g, _closed_grad(lam, X, y, Xv, yv), rtol=RTOL)
    assert int(n_iter) == 500


def test_while_loop_solver_becomes_differentiable(x64):
    X, y, Xv, yv = _data()

    def solver(init, lam, X, y):
        """Gradient descent until ‖∇L‖ < 1e-13: reverse mode cannot go through this."""
        step = 1.0 / (2 * (jnp.linalg.norm(X, 2) ** 2 + lam))

        def cond(c):
            th, k = c
            return (jnp.linalg.norm(jax.grad(inner_loss)(th, lam, X, y)) > 1e-13) & (k < 10_000)

        def body(c):
            th, k = c
            return th - step * jax.grad(inner_loss)(th, lam, X, y), k + 1

        return jax.lax.while_loop(cond, body, (init, 0))[0]

    lam = jnp.asarray(0.7)
    with pytest.raises(ValueError, match="while_loop"):
        jax.grad(lambda l: jnp.sum(solver(jnp.zeros(P), l, X, y)))(lam)

    decorated = custom_root(jax.grad(inner_loss), solve=_solver("cg", tol=1e-13))(solver)
    val = lambda l: jnp.sum((Xv @ decorated(jnp.zeros(P), l, X, y) - yv) ** 2)  # noqa: E731
    np.testing.assert_allclose(jax.grad(val)(lam), _closed_grad(lam, X, y, Xv, yv), rtol=RTOL)
    np.testing.assert_allclose(
        jax.jit(jax.grad(val))(lam), _closed_grad(lam, X, y, Xv, yv), rtol=RTOL
    )


def test_unknown_solver_name_lists_choices():
    """The deprecated string path still names the choices for an unknown name."""
    with pytest.raises(ValueError, match="unknown linear solver 'lu'") as e:
        custom_root(jax.grad(inner_loss), solve="lu")
    for name in ("cg", "gmres", "bicgstab", "neumann", "dense"):
        assert name in str(e.value)
    with pytest.raises(ValueError, match="choose one of"):
        custom_fixed_point(lambda t: t, solve="newton")


def test_bad_solver_keywords_are_rejected_early():
    with pytest.raises(TypeError, match=r"'solve_cg' does not accept the keywords \['eta'\]"):
        custom_root(jax.grad(inner_loss), solve=_solver("cg", eta=0.1))
    with pytest.raises(TypeError, match=r"does not accept the keywords \['maxiter'\]"):
        custom_root(jax.grad(inner_loss), solve=lambda matvec, b, *, x0=None: b, maxiter=3)
    with pytest.raises(TypeError, match="solve must be a callable"):
        custom_root(jax.grad(inner_loss), solve=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        custom_root(jax.grad(inner_loss), on_nonfinite="ignore")  # type: ignore[arg-type]


def test_default_adjoint_maxiter():
    """A bare linalg solver gets DEFAULT_MAXITER; a bound or explicit maxiter wins."""
    from bilevel_jax.implicit_diff import DEFAULT_MAXITER, _linear_solver

    assert _linear_solver(linalg.solve_cg).keywords == {"maxiter": DEFAULT_MAXITER}
    assert _linear_solver(_solver("gmres", maxiter=7)).keywords == {"maxiter": 7}
    assert _linear_solver(_solver("gmres", maxiter=7), maxiter=9)(
        lambda v: v, jnp.ones(2)
    ).shape == (2,)
    assert _linear_solver(linalg.solve_dense) is linalg.solve_dense  # takes no maxiter


def test_custom_linear_solver_callable(x64):
    X, y, Xv, yv = _data()
    calls = []

    def my_solve(matvec, b, *, x0=None, maxiter=50):
        calls.append(maxiter)
        return jax.scipy.sparse.linalg.cg(matvec, b, tol=1e-13, maxiter=maxiter)[0]

    lam = jnp.asarray(0.7)
    for ridge in (
        custom_root(jax.grad(inner_loss), solve=functools.partial(my_solve, maxiter=77))(_gd),
        custom_root(jax.grad(inner_loss), solve=my_solve, maxiter=77)(_gd),
    ):
        g = jax.grad(_val_fn(ridge, X, y, Xv, yv))(lam)
        np.testing.assert_allclose(g, _closed_grad(lam, X, y, Xv, yv), rtol=RTOL)
    assert calls == [77, 77]
    # a user's own solver keeps its own default maxiter (DEFAULT_MAXITER is for linalg's)
    ridge = custom_root(jax.grad(inner_loss), solve=my_solve)(_gd)
    jax.grad(_val_fn(ridge, X, y, Xv, yv))(lam)
    assert calls == [77, 77, 50]


def test_output_structure_mismatch_is_named():
    X, y, _, _ = _data()
    bad_tree = custom_root(lambda th, lam, X, y: {"g": jax.grad(inner_loss)(th, lam, X, y)})(_gd)
    with pytest.raises(BilevelInputError, match="shaped like the solver's output"):
        bad_tree(jnp.zeros(P), jnp.asarray(0.7), X, y)

    bad_shape = custom_root(lambda th, lam, X, y: jnp.zeros(P + 1))(_gd)
    with pytest.raises(BilevelInputError, match=r"shape \(5,\).*shape \(6,\)"):
        bad_shape(jnp.zeros(P), jnp.asarray(0.7), X, y)

    no_pair = custom_root(jax.grad(inner_loss), has_aux=True)(_gd)
    with pytest.raises(BilevelInputError, match=r"must return a pair \(θ\*, aux\)"):
        no_pair(jnp.zeros(P), jnp.asarray(0.7), X, y)

    int_out = custom_root(lambda th, *a: th)(lambda init, *a: jnp.arange(3))
    with pytest.raises(BilevelInputError, match="must be a floating array"):
        int_out(jnp.zeros(3))

    with pytest.raises(BilevelInputError, match="fixed_point_fn must return a pytree shaped"):
        custom_fixed_point(lambda th, a: (th, th))(lambda init, a: init)(jnp.zeros(2), 1.0)


def _singular_solver(solve, **kw):
    """F(θ, λ) = (θ − λ)³ has ∂_θF = 0 at its root θ = λ: the adjoint system is singular."""
    return custom_root(lambda th, lam: (th - lam) ** 3, solve=solve, **kw)(lambda init, lam: lam)


def test_nonfinite_adjoint_warns_eagerly(x64):
    f = _singular_solver(linalg.solve_dense)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        g = jax.grad(lambda l: jnp.sum(f(jnp.zeros(3), l)))(jnp.ones(3))
    assert not np.all(np.isfinite(g))


def test_nonfinite_adjoint_check_under_jit(x64):
    f = _singular_solver(linalg.solve_cg)  # on_nonfinite="warn" is the default
    with pytest.warns(RuntimeWarning, match="non-finite"):
        jax.jit(jax.grad(lambda l: jnp.sum(f(jnp.zeros(3), l))))(jnp.ones(3)).block_until_ready()
        jax.effects_barrier()
    # a well-posed problem under jit does not warn
    ok = custom_root(lambda th, lam: th - lam)(lambda i, lam: lam)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = jax.jit(jax.grad(lambda l: jnp.sum(ok(jnp.zeros(3), l) ** 2)))(jnp.ones(3))
        jax.effects_barrier()
    np.testing.assert_allclose(g, 2 * jnp.ones(3))


def test_nonfinite_adjoint_raise_and_skip(x64):
    grad = lambda f: jax.jit(jax.grad(lambda l: jnp.sum(f(jnp.zeros(3), l))))  # noqa: E731
    raising = _singular_solver(linalg.solve_cg, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="adjoint solution u"):  # eager
        jax.grad(lambda l: jnp.sum(raising(jnp.zeros(3), l)))(jnp.ones(3))
    # under jit the host callback's FloatingPointError reaches the caller wrapped by XLA
    with pytest.raises(
        (FloatingPointError, jax.errors.JaxRuntimeError), match="FloatingPointError.*adjoint"
    ):
        grad(raising)(jnp.ones(3)).block_until_ready()
        jax.effects_barrier()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = grad(_singular_solver(linalg.solve_cg, on_nonfinite="skip"))(jnp.ones(3))
        jax.effects_barrier()
    assert not np.all(np.isfinite(g))


# --------------------------------------------------------------------------- root_vjp


def test_root_vjp_ridge_closed_form(x64):
    """root_vjp on its own: F = ∇_θ L at θ* = (XᵀX + λI)⁻¹Xᵀy (λ a vector: diag λ).

    dθ*/dλ_i = −A⁻¹ e_i θ*_i and dθ*/dy = A⁻¹Xᵀ, so for a cotangent w the VJP is
    λ̄ = −(A⁻¹w) ⊙ θ* and ȳ = X A⁻¹ w (A = XᵀX + diag λ symmetric).
    """
    X, y, _, _ = _data()
    lam = jnp.linspace(0.2, 1.5, P)
    A = X.T @ X + jnp.diag(lam)
    theta = jnp.linalg.solve(A, X.T @ y)
    w = jnp.linspace(-1.0, 2.0, P)
    F = jax.grad(inner_loss)  # F(θ, λ, X, y) = 2(Aθ − Xᵀy), so ∂_θF = 2A
    for solve in (linalg.solve_dense, _solver("cg", maxiter=50, tol=1e-14)):
        g_lam, g_X, g_y = root_vjp(F, theta, (lam, X, y), w, solve=solve)
        Ainv_w = jnp.linalg.solve(A, w)
        np.testing.assert_allclose(g_lam, -Ainv_w * theta, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g_y, X @ Ainv_w, rtol=1e-10, atol=1e-12)
        # dθ*/dX: A θ = Xᵀy ⇒ X̄ = y (A⁻¹w)ᵀ − X (A⁻¹w θᵀ + θ (A⁻¹w)ᵀ)
        want_X = jnp.outer(y, Ainv_w) - X @ (jnp.outer(Ainv_w, theta) + jnp.outer(theta, Ainv_w))
        np.testing.assert_allclose(g_X, want_X, rtol=1e-10, atol=1e-12)
    # jit-able, and equal to custom_root's backward pass
    jitted = jax.jit(lambda *a: root_vjp(F, *a, solve=linalg.solve_dense))(theta, (lam, X, y), w)
    np.testing.assert_allclose(jitted[0], -jnp.linalg.solve(A, w) * theta, rtol=1e-10)


def test_root_vjp_integer_args_get_float0(x64):
    F = lambda th, a, n: th - a * n  # noqa: E731
    g_a, g_n = root_vjp(F, jnp.ones(2) * 3, (jnp.ones(2), jnp.asarray(3)), jnp.ones(2))
    np.testing.assert_allclose(g_a, 3 * jnp.ones(2))
    assert g_n.dtype == jax.dtypes.float0


def test_float32_default_precision():
    X, y, Xv, yv = (a.astype(jnp.float32) for a in _data())
    val = _val_fn(_ridge("cg", {"tol": 1e-6}), X, y, Xv, yv)
    lam = jnp.asarray(0.7, jnp.float32)
    g = jax.jit(jax.grad(val))(lam)
    assert g.dtype == jnp.float32
    with jax.enable_x64(True):
        want = _closed_grad(jnp.float64(0.7), *(np.asarray(a, np.float64) for a in (X, y, Xv, yv)))
    np.testing.assert_allclose(g, want, rtol=1e-3)
