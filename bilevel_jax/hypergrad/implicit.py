r"""Implicit hypergradients: Neumann series, conjugate gradient and the exact dense solve.

At a minimiser θ*(λ) of L_b, the implicit function theorem gives

    dL_m/dλ = ∇_λ L_m − (∂²L_b/∂λ∂θ) H⁻¹ d,      H = ∇²_θ L_b,  d = ∇_θ L_m.

The methods differ only in how ``p ≈ H⁻¹ d`` is obtained, always with
Hessian-vector products (forward-over-reverse) on the last base batch:

- **Neumann** (Lorraine, Vicol & Duvenaud, AISTATS 2020): ``p = η Σ_{j=0..K}(I − ηH)^j d``
  with K = ``maxiter``.
- **CG** (Pedregosa, ICML 2016; Rajeswaran et al. 2019): ``maxiter`` conjugate-gradient
  iterations on ``(H + δI) p = d``, optionally warm-started from the last meta step.
- **Exact**: dense ``H`` (n HVPs, vmapped) and a direct solve — small problems and tests.

Then ``h = −(∂²L_b/∂λ∂θ) p`` by one forward-over-reverse product.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import optax

from bilevel_jax import linalg
from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    MethodBase,
    PyTree,
    assemble,
    base_hvp,
    check_problem,
    meta_value_and_grads,
    mixed_product,
    needs_base_params,
)

__all__ = ["Implicit", "ImplicitState", "neumann", "cg", "exact"]


class ImplicitState(NamedTuple):
    """Warm start of a CG-type method: the last solution ``p ≈ H⁻¹ d``.

    Example:
      >>> import jax.numpy as jnp
      >>> cg(warm_start=True).init(jnp.zeros(3), None)
      ImplicitState(p=Array([0., 0., 0.], dtype=float32))
    """

    p: PyTree


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class Implicit(MethodBase):
    """An implicit hypergradient ``∇_λL_m − (∂²L_b/∂λ∂θ) H⁻¹ d`` with a chosen linear solver.

    Attributes:
      solver: the linear solver for ``H p = d``, called as ``solver(matvec, d, x0=x0)``; any
        function of :mod:`bilevel_jax.linalg` with its settings bound by
        :func:`functools.partial` (``partial(linalg.solve_cg, maxiter=10, damping=0.0)``), or
        your own with that signature.
      warm_start: start the solver from the previous meta step's ``p`` (kept in the state).
      name: the method's name.

    The keywords ``solve`` (a solver name), ``maxiter``, ``damping`` and ``eta`` are the
    deprecated way to choose the solver; use ``solver=partial(...)`` instead.

    Example:
      >>> import functools
      >>> from bilevel_jax import linalg
      >>> m = Implicit(solver=functools.partial(linalg.solve_gmres, maxiter=20), name="gmres")
      >>> m
      Implicit(solver=partial(solve_gmres, maxiter=20), warm_start=False, name='gmres')
      >>> m.solver.keywords
      {'maxiter': 20}
    """

    solver: Callable[..., PyTree] = functools.partial(linalg.solve_cg, maxiter=10)
    warm_start: bool = False
    name: str = "cg"
    solve: dataclasses.InitVar[str | Callable | None] = None
    maxiter: dataclasses.InitVar[int | None] = None
    damping: dataclasses.InitVar[float | None] = None
    eta: dataclasses.InitVar[float | None] = None

    def __post_init__(self, solve, maxiter, damping, eta) -> None:
        if (solve, maxiter, damping, eta) == (None, None, None, None):
            return
        if self.solver is not _DEFAULT_SOLVER:
            raise TypeError("Implicit: pass either solver=... or the deprecated solve/maxiter/...")
        warnings.warn(
            "Implicit(solve=..., maxiter=..., damping=..., eta=...) is deprecated; pass the "
            "linear solver as a callable, e.g. Implicit(solver=functools.partial("
            "bilevel_jax.linalg.solve_cg, maxiter=10, damping=0.0))",
            DeprecationWarning,
            stacklevel=4,
        )
        solve = "cg" if solve is None else solve
        kwargs = {"damping": 0.0 if damping is None else damping}
        if solve != "dense":
            kwargs["maxiter"] = 10 if maxiter is None else maxiter
        if solve == "neumann":
            kwargs["eta"] = 0.01 if eta is None else eta
        object.__setattr__(self, "solver", functools.partial(linalg.get_solver(solve), **kwargs))

    def init(self, base_params: PyTree, meta_params: PyTree) -> PyTree:
        """Zeros like θ when warm-starting, else an empty state."""
        del meta_params
        if not self.warm_start:
            return optax.EmptyState()
        needs_base_params(self.name, base_params)
        return ImplicitState(p=jax.tree.map(jax.numpy.zeros_like, base_params))

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: PyTree
    ) -> tuple[Hypergrad, PyTree]:
        """Solve ``H p = d`` on the base batch with ``solver``, then ``h = −(∂²L_b/∂λ∂θ) p``."""
        check_problem(problem, inputs)
        meta_val, d, direct = meta_value_and_grads(problem, inputs)
        x0 = state.p if self.warm_start else None
        p = self.solver(base_hvp(problem, inputs), d, x0=x0)
        h = jax.tree.map(jax.numpy.negative, mixed_product(problem, inputs, p))
        new_state = ImplicitState(p=p) if self.warm_start else state
        return assemble(inputs.meta_params, direct, h, meta_val), new_state


_DEFAULT_SOLVER = next(f.default for f in dataclasses.fields(Implicit) if f.name == "solver")


def _maxiter(fn: str, maxiter: int, default: int, k: int | None) -> int:
    """``maxiter``, or the deprecated ``k=`` (with a warning)."""
    if k is None:
        return maxiter
    if maxiter != default:
        raise TypeError(f"{fn}() got both maxiter and the deprecated k; pass maxiter only")
    warnings.warn(
        f"{fn}(k=...) is deprecated; use {fn}(maxiter=...) (iteration counts of linear "
        "solvers are called maxiter everywhere)",
        DeprecationWarning,
        stacklevel=3,
    )
    return k


def neumann(
    maxiter: int = 5, eta: float = 0.01, *, damping: float = 0.0, k: int | None = None
) -> Implicit:
    """Neumann-series hypergradient (Lorraine et al. 2020): ``p = η Σ_{j=0..K}(I − ηH)^j d``.

    Args:
      maxiter: K, the number of series terms after the first.
      eta: the step η (needs 0 < η < 2/λ_max(H)).
      damping: δ in ``(H + δI) p = d``.
      k: deprecated spelling of ``maxiter``.

    Example:
      >>> neumann(10, eta=0.1)
      Implicit(solver=partial(solve_neumann, maxiter=10, eta=0.1, damping=0.0), warm_start=False, name='neumann')
    """
    maxiter = _maxiter("neumann", maxiter, 5, k)
    if not (isinstance(maxiter, int) and maxiter >= 0):
        raise ValueError(f"neumann: maxiter must be an integer >= 0; got {maxiter!r}")
    if isinstance(eta, int | float) and not (math.isfinite(eta) and eta > 0):
        raise ValueError(
            f"neumann: eta must be a positive finite number (the series converges for "
            f"0 < eta < 2/λ_max of the base Hessian); got {eta!r}"
        )
    solver = functools.partial(linalg.solve_neumann, maxiter=maxiter, eta=eta, damping=damping)
    return Implicit(solver=solver, warm_start=False, name="neumann")


def cg(
    maxiter: int = 10, *, damping: float = 0.0, warm_start: bool = False, k: int | None = None
) -> Implicit:
    """Conjugate-gradient hypergradient: ``maxiter`` CG iterations on ``(H + δI) p = d``.

    Args:
      maxiter: the number of CG iterations (it stops earlier at relative residual 1e-10).
      damping: δ.
      warm_start: start from the previous meta step's solution (kept in the method state;
        needs a θ template at init).
      k: deprecated spelling of ``maxiter``.

    Example:
      >>> cg(20, warm_start=True)
      Implicit(solver=partial(solve_cg, maxiter=20, damping=0.0), warm_start=True, name='cg')
    """
    maxiter = _maxiter("cg", maxiter, 10, k)
    solver = functools.partial(linalg.solve_cg, maxiter=maxiter, damping=damping)
    return Implicit(solver=solver, warm_start=warm_start, name="cg")


def exact(*, damping: float = 0.0) -> Implicit:
    """Implicit hypergradient with a dense Hessian and a direct solve (small problems only).

    Example:
      >>> exact()
      Implicit(solver=partial(solve_dense, damping=0.0), warm_start=False, name='exact')
    """
    solver = functools.partial(linalg.solve_dense, damping=damping)
    return Implicit(solver=solver, warm_start=False, name="exact")
