r"""Implicit hypergradients: Neumann series, conjugate gradient and the exact dense solve.

At a minimiser θ*(λ) of L_b, the implicit function theorem gives

    dL_m/dλ = ∇_λ L_m − (∂²L_b/∂λ∂θ) H⁻¹ d,      H = ∇²_θ L_b,  d = ∇_θ L_m.

The methods differ only in how ``p ≈ H⁻¹ d`` is obtained, always with
Hessian-vector products (forward-over-reverse) on the last base batch:

- **Neumann** (Lorraine, Vicol & Duvenaud, AISTATS 2020): ``p = η Σ_{j=0..K}(I − ηH)^j d``.
- **CG** (Pedregosa, ICML 2016; Rajeswaran et al. 2019): K conjugate-gradient
  iterations on ``(H + δI) p = d``, optionally warm-started from the last meta step.
- **Exact**: dense ``H`` (n HVPs, vmapped) and a direct solve — small problems and tests.

Then ``h = −(∂²L_b/∂λ∂θ) p`` by one forward-over-reverse product.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import optax

from bilevel_jax import linalg
from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
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
    """Warm start of a CG-type method: the last solution ``p ≈ H⁻¹ d``."""

    p: PyTree


@dataclasses.dataclass(frozen=True)
class Implicit:
    """An implicit hypergradient ``∇_λL_m − (∂²L_b/∂λ∂θ) H⁻¹ d`` with a chosen linear solver.

    Attributes:
      solve: a name in :data:`bilevel_jax.linalg.SOLVERS` (``neumann``, ``cg``, ``gmres``,
        ``bicgstab``, ``dense``).
      maxiter: iterations (Neumann terms K, or Krylov iterations).
      damping: δ in ``(H + δI) p = d``.
      eta: Neumann step η (needs 0 < η < 2/λ_max(H)).
      warm_start: start the solver from the previous meta step's ``p`` (kept in the state).
      name: the method's name.
    """

    solve: str = "cg"
    maxiter: int = 10
    damping: float = 0.0
    eta: float = 0.01
    warm_start: bool = False
    name: str = "cg"
    info_keys = ()

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
        """Solve ``(H + δI) p = d`` on the base batch, then ``h = −(∂²L_b/∂λ∂θ) p``."""
        check_problem(problem, inputs)
        meta_val, d, direct = meta_value_and_grads(problem, inputs)
        solver = linalg.get_solver(self.solve)
        kwargs = {"maxiter": self.maxiter, "damping": self.damping}
        if self.solve == "neumann":
            kwargs["eta"] = self.eta
        if self.solve == "dense":
            kwargs = {"damping": self.damping}
        x0 = state.p if self.warm_start else None
        p = solver(base_hvp(problem, inputs), d, x0=x0, **kwargs)
        h = jax.tree.map(jax.numpy.negative, mixed_product(problem, inputs, p))
        new_state = ImplicitState(p=p) if self.warm_start else state
        return assemble(inputs.meta_params, direct, h, meta_val), new_state


def neumann(k: int = 5, eta: float = 0.01, *, damping: float = 0.0) -> Implicit:
    """Neumann-series hypergradient with K = ``k`` terms and step η (Lorraine et al. 2020)."""
    return Implicit("neumann", k, damping, eta, False, "neumann")


def cg(k: int = 10, *, damping: float = 0.0, warm_start: bool = False) -> Implicit:
    """Conjugate-gradient hypergradient: ``k`` CG iterations on ``(H + δI) p = d``."""
    return Implicit("cg", k, damping, 0.0, warm_start, "cg")


def exact(*, damping: float = 0.0) -> Implicit:
    """Implicit hypergradient with a dense Hessian and a direct solve (small problems only)."""
    return Implicit("dense", 0, damping, 0.0, False, "exact")
