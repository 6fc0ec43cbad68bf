r"""Unrolled hypergradients: ITD (reverse mode through K optax steps) and DDS (one step).

**ITD** (iterative differentiation; Maclaurin et al. 2015, Franceschi et al. 2017,
MAML-style): starting from the current (θ₀, s₀), take K steps of the base optimizer,
``θ_{k+1} = θ_k + Δ(∇_θ L_b(θ_k, λ; B_k), s_k, θ_k)``, and return the exact gradient
``d L_m(θ_K(λ), λ) / dλ`` of that unrolled map by reverse-mode autodiff. With
``truncate = T`` only the last T steps are differentiated (Shaban et al. 2019).
Memory grows with the number of differentiated steps (``remat=True`` trades it for
recomputation).

**DDS** (one-step look-ahead, the "DDS" of the Apple data-selection work and of
Fan et al.): ``h = ∇_λ L_m(θ − ρ ∇_θ L_b(θ, λ), λ)``, i.e. ITD with K = 1. With
``lr=None`` the step is the base optimizer's own update.

Differentiating *through* Adam-type optimizers needs ``eps_root > 0`` (e.g.
``optax.adam(lr, eps_root=1e-8)``): the derivative of ``√n`` at n = 0 is infinite
and turns the hypergradient into NaN at zero gradients (``docs/precision.md``).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    MethodBase,
    PyTree,
    assemble,
    check_problem,
)

__all__ = ["Unrolled", "itd", "dds"]


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class Unrolled(MethodBase):
    """Reverse-mode differentiation through ``unroll`` base steps (see the module docstring).

    Attributes:
      unroll: number of base steps K taken from the current θ.
      truncate: differentiate only through the last ``truncate`` steps (None: all).
      stacked: ``base_batch`` has a leading axis of length K, one batch per step;
        otherwise the same batch is used for every step.
      remat: rematerialise each step in the backward pass (less memory, more compute).
      lr: if set, the unrolled step is plain SGD with this rate instead of the base optimizer.
      name: the method's name.

    ``Hypergrad.meta_loss`` is ``L_m(θ_K)``, the meta loss after the unrolled steps.

    Example:
      >>> Unrolled(unroll=3, remat=True)
      Unrolled(unroll=3, truncate=None, stacked=False, remat=True, lr=None, name='itd')
    """

    unroll: int = 10
    truncate: int | None = None
    stacked: bool = False
    remat: bool = False
    lr: float | None = None
    name: str = "itd"

    def __post_init__(self):
        if self.unroll < 1:
            raise ValueError(f"unroll must be at least 1, got {self.unroll}")
        if self.truncate is not None and not 1 <= self.truncate <= self.unroll:
            raise ValueError(f"truncate must be in [1, unroll={self.unroll}], got {self.truncate}")

    def init(self, base_params: PyTree, meta_params: PyTree) -> optax.EmptyState:
        """Unrolled methods keep no state across meta steps."""
        del base_params, meta_params
        return optax.EmptyState()

    def _check_stacked(self, batch):
        lead = {x.shape[0] if x.ndim else None for x in jax.tree.leaves(batch)}
        if lead != {self.unroll}:
            raise ValueError(
                f"{self.name}: stacked=True needs every base_batch leaf to have a leading "
                f"axis of length unroll={self.unroll}; got leading sizes {sorted(map(str, lead))}"
            )

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: PyTree
    ) -> tuple[Hypergrad, PyTree]:
        """Unroll K steps from the current (θ, state) and differentiate L_m(θ_K, λ) w.r.t. λ."""
        batches = inputs.base_batch
        if self.stacked:
            self._check_stacked(batches)
            first = jax.tree.map(lambda x: x[0], batches)
        else:
            first = batches
        check_problem(problem, inputs._replace(base_batch=first))
        tx = problem.base_tx if self.lr is None else optax.sgd(self.lr)
        opt_state = inputs.base_opt_state if self.lr is None else tx.init(inputs.base_params)
        frozen = self.unroll - (self.truncate or self.unroll)

        def run(carry, lam_used, start, length, remat):
            """``length`` steps from step ``start``; an unstacked batch is closed over, not copied."""

            def step(c, batch):
                theta, s = c
                batch = first if batch is None else batch
                g = jax.grad(problem.base_loss)(theta, lam_used, batch)
                upd, s = tx.update(g, s, theta)
                return (optax.apply_updates(theta, upd), s), None

            body = jax.checkpoint(step) if remat else step
            xs = (
                jax.tree.map(lambda x: x[start : start + length], batches) if self.stacked else None
            )
            return jax.lax.scan(body, carry, xs, length=length)[0]

        def unrolled_meta_loss(lam):
            carry = (inputs.base_params, opt_state)
            if frozen:
                carry = jax.lax.stop_gradient(
                    run(carry, jax.lax.stop_gradient(lam), 0, frozen, False)
                )
            theta_k, _ = run(carry, lam, frozen, self.unroll - frozen, self.remat)
            return problem.meta_loss(theta_k, lam, inputs.meta_batch)

        value, grad = jax.value_and_grad(unrolled_meta_loss)(inputs.meta_params)
        return assemble(inputs.meta_params, None, grad, value), state


def itd(
    unroll: int = 10, *, truncate: int | None = None, stacked: bool = False, remat: bool = False
) -> Unrolled:
    """Iterative differentiation through ``unroll`` steps of the base optimizer.

    Example:
      >>> m = itd(5, truncate=2)
      >>> m.unroll, m.truncate, m.name
      (5, 2, 'itd')
    """
    return Unrolled(unroll=unroll, truncate=truncate, stacked=stacked, remat=remat, name="itd")


def dds(lr: float | None = None) -> Unrolled:
    """One-step look-ahead: ``∇_λ L_m(θ + Δ(∇_θL_b(θ, λ)), λ)`` (``Δ = −lr·g`` when ``lr`` is set).

    Example:
      >>> m = dds(0.1)
      >>> m.unroll, m.lr, m.name
      (1, 0.1, 'dds')
    """
    return Unrolled(unroll=1, lr=lr, name="dds")
