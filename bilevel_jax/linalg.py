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
"""

from __future__ import annotations

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


def _damped(matvec: Matvec, damping: float) -> Matvec:
    if not damping:
        return matvec
    return lambda x: jax.tree.map(lambda a, b: a + damping * b, matvec(x), x)


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
    return sparse_linalg.cg(_damped(matvec, damping), b, x0=x0, tol=tol, maxiter=maxiter)[0]


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
    return sparse_linalg.gmres(
        _damped(matvec, damping),
        b,
        x0=x0,
        tol=tol,
        maxiter=maxiter,
        restart=restart,
        solve_method="batched",
    )[0]


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
    return sparse_linalg.bicgstab(_damped(matvec, damping), b, x0=x0, tol=tol, maxiter=maxiter)[0]


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
    matrix = jax.vmap(flat_matvec, in_axes=1, out_axes=1)(jnp.eye(flat_b.size, dtype=flat_b.dtype))
    return unravel(jnp.linalg.solve(matrix, flat_b))


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
