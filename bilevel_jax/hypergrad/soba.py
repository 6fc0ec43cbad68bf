r"""SOBA: a single-loop hypergradient with a warm-started linear-system estimate.

Reference: M. Dagréou, P. Ablin, S. Vaiter, T. Moreau, "A framework for bilevel
optimization that enables stochastic and global variance reduction algorithms",
NeurIPS 2022.

SOBA keeps ``z ≈ −H⁻¹ d`` (H = ∇²_θ L_b, d = ∇_θ L_m) in its state and refines it
by one step per meta step, using a single Hessian-vector product:

    z_{t+1} = z_t − ρ_t (H z_t + d),          h = (∂²L_b/∂λ∂θ) z_{t+1},

so the meta-gradient is ``∇_λ L_m + h``. This implementation evaluates ``h`` at the
refreshed ``z_{t+1}`` (so the first meta step already sees −ρ d). ``z`` converges to
``−H⁻¹d`` for fixed θ, λ when ``0 < ρ < 2/λ_max(H)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
    wide_norm,
)

__all__ = ["SOBA", "SobaState", "soba"]


class SobaState(NamedTuple):
    """SOBA's state: the estimate ``z ≈ −H⁻¹d`` and the meta-step count (for ρ schedules).

    Example:
      >>> import jax.numpy as jnp
      >>> state = soba().init(jnp.ones(3), None)
      >>> state.z, int(state.count)
      (Array([0., 0., 0.], dtype=float32), 0)
    """

    z: PyTree
    count: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class SOBA(MethodBase):
    """SOBA (see the module docstring).

    Attributes:
      rho: ρ, a float or a schedule ``count -> ρ_t`` (printed by name in the ``repr``).
      name: the method's name.

    Example:
      >>> SOBA(rho=0.05)
      SOBA(rho=0.05, name='soba')
    """

    rho: float | Callable[[Any], Any] = 0.01
    name: str = "soba"
    info_keys = ("residual_norm",)

    def init(self, base_params: PyTree, meta_params: PyTree) -> SobaState:
        """``z = 0`` (shaped like θ) and a zero count."""
        del meta_params
        needs_base_params(self.name, base_params)
        return SobaState(jax.tree.map(jnp.zeros_like, base_params), jnp.zeros([], jnp.int32))

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: SobaState
    ) -> tuple[Hypergrad, SobaState]:
        """One SOBA step: ``z ← z − ρ(Hz + d)``, then ``h = (∂²L_b/∂λ∂θ) z``."""
        check_problem(problem, inputs)
        meta_val, d, direct = meta_value_and_grads(problem, inputs)
        rho = self.rho(state.count) if callable(self.rho) else self.rho
        residual = jax.tree.map(jnp.add, base_hvp(problem, inputs)(state.z), d)
        z = jax.tree.map(lambda zi, ri: zi - rho * ri, state.z, residual)
        h = mixed_product(problem, inputs, z)
        info = {"residual_norm": wide_norm(residual)}
        new_state = SobaState(z, state.count + 1)
        return assemble(inputs.meta_params, direct, h, meta_val, info=info), new_state


def soba(rho: float | Callable[[Any], Any] = 0.01) -> SOBA:
    """SOBA with step ρ (constant or a schedule of the meta-step count).

    Example:
      >>> import optax
      >>> soba(optax.constant_schedule(0.1)).rho(0)
      0.1
      >>> soba(0.05).info_keys
      ('residual_norm',)
    """
    return SOBA(rho=rho, name="soba")
