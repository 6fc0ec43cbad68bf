r"""DARTS hypergradients: the T1–T2 finite difference and the second-order virtual step.

Reference: H. Liu, K. Simonyan, Y. Yang, "DARTS: Differentiable Architecture Search",
ICLR 2019, eqs. (6)–(8); Betty's ``darts`` (Choe et al. 2023).

- :func:`darts` is Betty's ``darts``: SAMA-NA with α = 0.01, i.e.
  ``h = −[∇_λL_b(θ+εd) − ∇_λL_b(θ−εd)]/(2ε)``, ``ε = α/‖d‖`` (T1–T2 with the
  identity in place of H⁻¹).
- :func:`darts_second_order` is the original DARTS: a virtual SGD step
  ``θ' = θ − ξ∇_θL_b(θ, λ)``, ``d' = ∇_θL_m(θ', λ)``, ``ε = α/‖d'‖`` and

      dL_m/dλ ≈ ∇_λL_m(θ', λ) − ξ [∇_λL_b(θ+εd', λ) − ∇_λL_b(θ−εd', λ)] / (2ε).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import optax

from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    MethodBase,
    PyTree,
    assemble,
    central_difference,
    check_problem,
)
from bilevel_jax.hypergrad.sama import SAMA

__all__ = ["DartsSecondOrder", "darts", "darts_second_order"]


def darts(
    alpha: float = 0.01,
    *,
    difference: Literal["vmap", "sequential", "jvp"] = "sequential",
    step_along_v: bool = False,
) -> SAMA:
    """Betty's DARTS / T1–T2: SAMA-NA with a small finite-difference radius α = 0.01.

    ``difference`` and ``step_along_v`` as in :func:`~bilevel_jax.sama` (with ``"jvp"`` the
    product is exact and α only sets the base step along v).

    Example:
      >>> m = darts()
      >>> m.alpha, m.adapt, m.name
      (0.01, False, 'darts')
    """
    return SAMA(
        alpha=alpha,
        adapt=False,
        adapt_from="fresh",
        difference=difference,
        step_along_v=step_along_v,
        name="darts",
    )


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class DartsSecondOrder(MethodBase):
    """Original DARTS with a virtual SGD step of size ξ (see the module docstring).

    Attributes:
      xi: ξ, the virtual SGD step size (usually the base learning rate).
      alpha: α in ε = α/‖d'‖.
      name: the method's name.

    Example:
      >>> DartsSecondOrder(xi=0.1)
      DartsSecondOrder(xi=0.1, alpha=0.01, name='darts2')
    """

    xi: float
    alpha: float = 0.01
    name: str = "darts2"
    info_keys = ("eps",)

    def init(self, base_params: PyTree, meta_params: PyTree) -> optax.EmptyState:
        """Stateless."""
        del base_params, meta_params
        return optax.EmptyState()

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: PyTree
    ) -> tuple[Hypergrad, PyTree]:
        """Virtual step, meta gradient at θ', central difference of ∇_λ L_b along d' at θ."""
        check_problem(problem, inputs)
        theta, lam, batch = inputs.base_params, inputs.meta_params, inputs.base_batch
        g = jax.grad(problem.base_loss)(theta, lam, batch)
        virtual = jax.tree.map(lambda t, gi: t - self.xi * gi, theta, g)
        meta_val, (d, direct) = jax.value_and_grad(problem.meta_loss, argnums=(0, 1))(
            virtual, lam, inputs.meta_batch
        )
        h, eps, _ = central_difference(problem.base_loss, theta, lam, batch, d, self.alpha)
        h = jax.tree.map(lambda x: self.xi * x, h)
        return assemble(lam, direct, h, meta_val, info={"eps": eps}), state


def darts_second_order(xi: float, alpha: float = 0.01) -> DartsSecondOrder:
    """Original second-order DARTS with virtual step ξ (usually the base learning rate).

    Example:
      >>> m = darts_second_order(0.1)
      >>> m.xi, m.alpha, m.info_keys
      (0.1, 0.01, ('eps',))
    """
    return DartsSecondOrder(xi=xi, alpha=alpha, name="darts2")
