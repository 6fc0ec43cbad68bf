r"""Linear algebra over pytrees for implicit hypergradients.

Implicit differentiation needs products with the Hessian ``H = ∇²_θ L_b`` (or any
Jacobian of an optimality condition) and solves of ``A x = b``. Here ``A`` is a
*matvec* (a function pytree → pytree), so nothing of size n² is ever formed except
by :func:`solve_dense`, which is for small problems and tests.

- :func:`hvp`: ``H v`` by forward-over-reverse (``jax.jvp`` of ``jax.grad``).
- :func:`solve_cg`, :func:`solve_gmres`, :func:`solve_bicgstab`: Krylov solvers from
  ``jax.scipy.sparse.linalg`` with a fixed iteration budget (``maxiter``).
- :func:`solve_neumann`: ``x = η Σ_{j=0..K} (I − ηA)^j b`` (Lorraine et al. 2020).
- :func:`solve_dense`: materialise ``A`` column by column and ``jnp.linalg.solve``.

Every solver takes ``(matvec, b, *, x0=None, ...)`` and returns a pytree like ``b``.

Inside ``shard_map`` (a mesh axis is manual, e.g. under
:func:`bilevel_jax.parallel.data_parallel`) the Krylov solvers run their own iterations
(:func:`_cg_manual`, :func:`_bicgstab_manual`, :func:`_gmres_manual`) instead of
``jax.scipy.sparse.linalg``, whose ``custom_linear_solve`` fails there when the matvec closes
over arrays (``pvary is a invariant->variant collective``) and whose GMRES/BiCGStab loops start
from device-invariant constants. They compute the same iterations with every loop value typed
like the data (varying across devices); they are not differentiated implicitly (the
hypergradient methods and :func:`bilevel_jax.custom_root` never differentiate the solve).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
from jax.scipy.sparse import linalg as sparse_linalg

__all__ = [
    "hvp",
    "solve_cg",
    "solve_gmres",
    "solve_bicgstab",
    "solve_neumann",
    "solve_dense",
    "SOLVERS",
    "get_solver",
]

PyTree = Any
Matvec = Callable[[PyTree], PyTree]


def hvp(f: Callable, params: PyTree, v: PyTree, *args) -> PyTree:
    """Hessian-vector product ``∇²f(params) v`` by forward-over-reverse autodiff.

    Example:
      >>> f = lambda x: jnp.sum(x**3)  # ∇²f = diag(6x)
      >>> print(hvp(f, jnp.array([1.0, 2.0]), jnp.ones(2)))
      [ 6. 12.]
    """
    return jax.jvp(lambda p: jax.grad(f)(p, *args), (params,), (v,))[1]


def _manual() -> bool:
    """Whether we trace inside ``shard_map``/``pmap`` (some mesh axis is manual)."""
    return bool(jax.sharding.get_abstract_mesh().manual_axes)


def _like(tree: PyTree, ref: jax.Array) -> PyTree:
    """``tree`` typed to vary across devices as ``ref`` does (adds an exact zero of ``ref``'s
    device variance; no-op outside ``shard_map``)."""
    return jax.tree.map(lambda x: x + jnp.zeros_like(ref, shape=(), dtype=jnp.result_type(x)), tree)


def _vdot(x: PyTree, y: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(jax.tree.map(lambda a, b: jnp.vdot(a, b, precision="highest"), x, y))
    total = leaves[0]
    for leaf in leaves[1:]:
        total = total + leaf
    return total


def _axpy(a: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """``a·x + y`` leafwise."""
    return jax.tree.map(lambda xi, yi: a * xi + yi, x, y)


def _cg_manual(matvec: Matvec, b: PyTree, x0: PyTree, *, maxiter: int, tol: float) -> PyTree:
    """The iterations of ``jax.scipy.sparse.linalg.cg`` (relative tolerance on ‖r‖), typed for
    ``shard_map``."""
    r0 = jax.tree.map(jnp.subtract, b, matvec(x0))
    gamma0 = _vdot(r0, r0)
    atol2 = tol**2 * _vdot(b, b)
    x0, r0, p0, k0 = _like((x0, r0, r0, 0), gamma0)

    def cond(c):
        _, _, gamma, _, k = c
        return (gamma > atol2) & (k < maxiter)

    def body(c):
        x, r, gamma, p, k = c
        ap = matvec(p)
        alpha = gamma / _vdot(p, ap)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        gamma_new = _vdot(r, r)
        return x, r, gamma_new, _axpy(gamma_new / gamma, p, r), k + 1

    return jax.lax.while_loop(cond, body, (x0, r0, gamma0, p0, k0))[0]


def _bicgstab_manual(matvec: Matvec, b: PyTree, x0: PyTree, *, maxiter: int, tol: float) -> PyTree:
    """The iterations of ``jax.scipy.sparse.linalg.bicgstab``, typed for ``shard_map``."""
    r0 = jax.tree.map(jnp.subtract, b, matvec(x0))
    rs0 = _vdot(r0, r0)
    atol2 = tol**2 * _vdot(b, b)
    one = jnp.ones((), rs0.dtype)
    init = _like((x0, r0, r0, one, one, one, r0, r0, 0), rs0)

    def cond(c):
        r, k = c[1], c[-1]
        return (_vdot(r, r) > atol2) & (k < maxiter) & (k >= 0)

    def body(c):
        x, r, rhat, alpha, omega, rho, p, q, k = c
        rho_ = _vdot(rhat, r)
        beta = rho_ / rho * alpha / omega
        p_ = _axpy(beta, _axpy(-omega, q, p), r)
        q_ = matvec(p_)
        alpha_ = rho_ / _vdot(rhat, q_)
        s = _axpy(-alpha_, q_, r)
        exit_early = _vdot(s, s) < atol2
        t = matvec(s)
        omega_ = _vdot(t, s) / _vdot(t, t)
        x_half = _axpy(alpha_, p_, x)
        x_ = jax.tree.map(
            lambda a, b: jnp.where(exit_early, a, b), x_half, _axpy(omega_, s, x_half)
        )
        r_ = jax.tree.map(lambda a, b: jnp.where(exit_early, a, b), s, _axpy(-omega_, t, s))
        k_ = jnp.where((omega_ == 0) | (alpha_ == 0), -11, k + 1)
        k_ = jnp.where(rho_ == 0, -10, k_)
        return x_, r_, rhat, alpha_, omega_, rho_, p_, q_, k_

    return jax.lax.while_loop(cond, body, init)[0]


def _gmres_manual(
    matvec: Matvec, b: PyTree, x0: PyTree, *, maxiter: int, tol: float, restart: int
) -> PyTree:
    """Restarted GMRES (Arnoldi with classical Gram–Schmidt twice, the small least-squares
    problem by its normal equations, as ``jax.scipy``'s ``solve_method="batched"``), on the
    flattened vector, typed for ``shard_map``."""
    flat_b, unravel = ravel_pytree(b)
    a = lambda v: ravel_pytree(matvec(unravel(v)))[0]  # noqa: E731
    n, dtype = flat_b.size, flat_b.dtype
    m = min(restart, n)
    eps = jnp.finfo(dtype).eps
    b_norm = jnp.linalg.norm(flat_b)
    atol = tol * b_norm

    def one_restart(x, r, r_norm):
        basis = jnp.zeros((m + 1, n), dtype).at[0].set(jnp.where(r_norm > eps, r / r_norm, 0.0))
        hess = jnp.eye(m, m + 1, dtype=dtype)  # row k: the overlaps of A v_k; identity if unused
        basis, hess = _like((basis, hess), r_norm)

        def arnoldi(k, c):
            basis, hess, done = c
            w = a(basis[k])
            w_norm0 = jnp.linalg.norm(w)
            h = basis @ w
            w = w - basis.T @ h
            h2 = basis @ w
            w, h = w - basis.T @ h2, h + h2
            w_norm = jnp.linalg.norm(w)
            ok = w_norm > eps * w_norm0
            basis = basis.at[k + 1].set(jnp.where(ok & ~done, w / w_norm, 0.0))
            h = h.at[k + 1].set(jnp.where(ok, w_norm, 0.0))
            hess = hess.at[k].set(jnp.where(done, hess[k], h))
            return basis, hess, done | ~ok

        basis, hess, _ = jax.lax.fori_loop(
            0, m, arnoldi, (basis, hess, _like(jnp.zeros((), bool), r_norm))
        )
        beta = jnp.zeros(m + 1, dtype).at[0].set(r_norm)
        gram = hess @ hess.T
        y = jax.scipy.linalg.solve(gram, hess @ beta, assume_a="pos")
        x = x + basis[:m].T @ y
        r = flat_b - a(x)
        return x, r, jnp.linalg.norm(r)

    x = ravel_pytree(x0)[0]
    r = flat_b - a(x)
    r_norm = jnp.linalg.norm(r)
    x, r, k = _like((x, r, 0), r_norm)

    def cond(c):
        return (c[3] < maxiter) & (c[2] > atol)

    def body(c):
        x, r, r_norm, k = c
        return (*one_restart(x, r, r_norm), k + 1)

    return unravel(jax.lax.while_loop(cond, body, (x, r, r_norm, k))[0])


def _damped(matvec: Matvec, damping: float) -> Matvec:
    if not damping:
        return matvec
    return lambda x: jax.tree.map(lambda a, b: a + damping * b, matvec(x), x)


def _krylov(manual: Callable, library: Callable, matvec, b, x0, damping, **kw) -> PyTree:
    """Solve ``(A + δI) x = b`` with ``manual`` inside ``shard_map`` (see :func:`_manual`),
    else with ``jax.scipy.sparse.linalg``'s ``library``."""
    a = _damped(matvec, damping)
    if _manual():
        x0 = jax.tree.map(jnp.zeros_like, b) if x0 is None else x0
        return manual(a, b, x0, **kw)
    return library(a, b, x0=x0, **kw)[0]


def solve_cg(
    matvec: Matvec,
    b: PyTree,
    *,
    x0: PyTree | None = None,
    maxiter: int = 10,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> PyTree:
    """Conjugate gradient for ``(A + δI) x = b`` (A symmetric positive definite).

    Example:
      >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> print(solve_cg(lambda x: A @ x, jnp.array([1.0, 2.0])).round(4))
      [0.0909 0.6364]
    """
    return _krylov(_cg_manual, sparse_linalg.cg, matvec, b, x0, damping, maxiter=maxiter, tol=tol)


def solve_gmres(
    matvec: Matvec,
    b: PyTree,
    *,
    x0: PyTree | None = None,
    maxiter: int = 10,
    tol: float = 1e-10,
    damping: float = 0.0,
    restart: int = 20,
) -> PyTree:
    """GMRES for ``(A + δI) x = b`` (any nonsingular A).

    Example:
      >>> A = jnp.array([[2.0, 1.0], [0.0, 3.0]])  # not symmetric
      >>> print(solve_gmres(lambda x: A @ x, jnp.array([3.0, 3.0])).round(4))
      [1. 1.]
    """
    library = functools.partial(sparse_linalg.gmres, solve_method="batched")
    return _krylov(
        _gmres_manual, library, matvec, b, x0, damping, maxiter=maxiter, tol=tol, restart=restart
    )


def solve_bicgstab(
    matvec: Matvec,
    b: PyTree,
    *,
    x0: PyTree | None = None,
    maxiter: int = 10,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> PyTree:
    """BiCGStab for ``(A + δI) x = b`` (any nonsingular A).

    Example:
      >>> A = jnp.array([[2.0, 1.0], [0.0, 3.0]])
      >>> print(solve_bicgstab(lambda x: A @ x, jnp.array([3.0, 3.0])).round(4))
      [1. 1.]
    """
    return _krylov(
        _bicgstab_manual, sparse_linalg.bicgstab, matvec, b, x0, damping, maxiter=maxiter, tol=tol
    )


def solve_neumann(
    matvec: Matvec,
    b: PyTree,
    *,
    x0: PyTree | None = None,
    maxiter: int = 10,
    eta: float = 0.01,
    damping: float = 0.0,
) -> PyTree:
    r"""Truncated Neumann series ``x = η Σ_{j=0..K} (I − ηA)^j b`` with K = ``maxiter``.

    Converges to ``A⁻¹b`` when ``0 < η < 2/λ_max(A)`` and A is positive definite;
    the error after K terms is ``(I − ηA)^{K+1} A⁻¹ b``. ``x0`` is ignored.

    Example:
      >>> A = jnp.diag(jnp.array([1.0, 2.0]))
      >>> print(solve_neumann(lambda x: A @ x, jnp.ones(2), maxiter=60, eta=0.5).round(4))
      [1.  0.5]
    """
    del x0
    a = _damped(matvec, damping)

    def body(_, carry):
        term, total = carry
        term = jax.tree.map(lambda t, at: t - eta * at, term, a(term))
        return term, jax.tree.map(jnp.add, total, term)

    _, total = jax.lax.fori_loop(0, maxiter, body, (b, b))
    return jax.tree.map(lambda t: eta * t, total)


def solve_dense(
    matvec: Matvec, b: PyTree, *, x0: PyTree | None = None, damping: float = 0.0, **unused
) -> PyTree:
    """Materialise ``A + δI`` (n matvecs, vmapped) and solve exactly. For small problems.

    Example:
      >>> A = jnp.array([[2.0, 1.0], [0.0, 3.0]])
      >>> matvec = lambda t: {"x": A @ t["x"]}  # any pytree
      >>> print(solve_dense(matvec, {"x": jnp.array([3.0, 3.0])})["x"].round(4))
      [1. 1.]
    """
    del x0, unused
    flat_b, unravel = ravel_pytree(b)
    a = _damped(matvec, damping)
    flat_matvec = lambda x: ravel_pytree(a(unravel(x)))[0]  # noqa: E731
    # the basis vectors vary across devices as b does (inside shard_map a tangent or cotangent
    # must be typed like its primal); outside shard_map this adds an exact zero
    eye = _like(jnp.eye(flat_b.size, dtype=flat_b.dtype), jnp.zeros_like(flat_b, shape=()))
    matrix = jax.vmap(flat_matvec, in_axes=1, out_axes=1)(eye)
    return unravel(jnp.linalg.solve(matrix, flat_b))


#: The linear solvers by name (``custom_root(solve="cg")`` and the like): each is
#: ``solver(matvec, b, **kwargs) -> x``.
SOLVERS: dict[str, Callable] = {
    "cg": solve_cg,
    "gmres": solve_gmres,
    "bicgstab": solve_bicgstab,
    "neumann": solve_neumann,
    "dense": solve_dense,
}


def get_solver(solve: str | Callable) -> Callable:
    """Look up a solver by name (``cg``, ``gmres``, ``bicgstab``, ``neumann``, ``dense``) or pass one.

    Only the deprecated string spellings (``custom_root(solve="cg")``,
    ``Implicit(solve="cg")``) use it; pass the solver function itself instead.

    Example:
      >>> get_solver("cg") is solve_cg
      True
    """
    if callable(solve):
        return solve
    try:
        return SOLVERS[solve]
    except KeyError:
        raise ValueError(
            f"unknown linear solver {solve!r}; choose one of {sorted(SOLVERS)}"
        ) from None
