r"""SOBA: a single-loop hypergradient with a warm-started linear-system estimate.

Reference: M. Dagréou, P. Ablin, S. Vaiter, T. Moreau, "A framework for bilevel
optimization that enables stochastic and global variance reduction algorithms",
NeurIPS 2022. The Adam-on-z and uniform-loss-HVP variants follow D. Grangier, P. Ablin,
A. Hannun, "Bilevel Optimization to Learn Training Distributions for Language Modeling
under Domain Shift" (arXiv:2311.11973).

SOBA keeps ``z ≈ −H⁻¹ d`` (H = ∇²_θ L_b, d = ∇_θ L_m) in its state and refines it
by one step per meta step, using a single Hessian-vector product. ``z`` minimises the
quadratic ``q(z) = ½ zᵀHz + dᵀz``, whose gradient is the residual ``r = Hz + d``:

    z_{t+1} = z_t − ρ_t (H z_t + d),          h = (∂²L_b/∂λ∂θ) z_{t+1},

so the meta-gradient is ``∇_λ L_m + h``. This implementation evaluates ``h`` at the
refreshed ``z_{t+1}`` (so the first meta step already sees −ρ d). ``z`` converges to
``−H⁻¹d`` for fixed θ, λ when ``0 < ρ < 2/λ_max(H)``.

Variants (all keyword options of :func:`soba`):

- ``z_tx``: any optax transform steps z on the residual, ``(u, s) = z_tx.update(r, s, z)``,
  ``z_{t+1} = z_t + u``; ``optax.sgd(ρ)`` is the plain step above (bit for bit), and
  ``optax.adam(...)`` is the paper variant of Grangier et al.
- ``hvp_loss(θ, λ, batch)``: H is the Hessian of this loss on the base batch instead of
  L_b's (e.g. the *uniform* loss of the selected batch when L_b is a weighted loss), so z
  tracks ``−H_hvp⁻¹ d``; the cross term still comes from L_b.
- ``fused=True``: one ``jax.vjp`` of ``(θ, λ) ↦ ∇_θL_b(θ, λ)`` at the cotangent z_t
  returns both ``H z_t`` and ``(∂²L_b/∂λ∂θ) z_t`` in one pass, so ``h`` is evaluated at
  z_t (before this step's update, the simultaneous form of Dagréou et al.'s Algorithm 1)
  instead of z_{t+1}: for fixed θ, λ its meta-gradient at step t+1 is the unfused one
  at step t, and the first meta step gives ``h = 0`` from z₀ = 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel_jax import _checks
from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    Loss,
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
    """SOBA's state: ``z ≈ −H⁻¹d``, the meta-step count (for ρ schedules) and z_tx's state.

    Every leaf is an array (a pytree a checkpoint can hold); ``z_opt_state`` is the
    ``z_tx`` state, ``optax.EmptyState()`` (no leaves) for the plain ρ step.

    Example:
      >>> import jax.numpy as jnp
      >>> state = soba().init(jnp.ones(3), None)
      >>> state.z, int(state.count), state.z_opt_state
      (Array([0., 0., 0.], dtype=float32), 0, EmptyState())
    """

    z: PyTree
    count: jax.Array
    z_opt_state: optax.OptState = optax.EmptyState()


_NEW_FIELDS = {"z_tx": None, "hvp_loss": None, "fused": False}


def _hvp(loss: Loss, inputs: BilevelInputs, v: PyTree) -> PyTree:
    """``∇²_θ loss(θ, λ; B) v`` by forward-over-reverse (``base_hvp`` for any loss)."""
    grad = jax.grad(loss)
    return jax.jvp(
        lambda th: grad(th, inputs.meta_params, inputs.base_batch), (inputs.base_params,), (v,)
    )[1]


def _fused_products(problem: BilevelProblem, inputs: BilevelInputs, z: PyTree):
    """``(H z, (∂²L_b/∂λ∂θ) z)`` from one ``jax.vjp`` of ``(θ, λ) ↦ ∇_θL_b`` at cotangent z.

    The θ-cotangent is ``(∂∇_θL_b/∂θ)ᵀ z = Hᵀz = Hz`` and the λ-cotangent is
    ``(∂∇_θL_b/∂λ)ᵀ z = ∇_λ⟨∇_θL_b, z⟩``, the mixed product.
    """
    grad_base = jax.grad(problem.base_loss)
    _, vjp = jax.vjp(
        lambda th, lam: grad_base(th, lam, inputs.base_batch),
        inputs.base_params,
        inputs.meta_params,
    )
    return vjp(z)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class SOBA(MethodBase):
    """SOBA (see the module docstring).

    Attributes:
      rho: ρ, a float or a schedule ``count -> ρ_t`` (printed by name in the ``repr``);
        None when ``z_tx`` steps z.
      z_tx: an optax transform that steps z on the residual ``Hz + d`` (None: the plain
        step ``z − ρ(Hz + d)``); printed as ``transform``.
      hvp_loss: ``loss(θ, λ, batch)`` whose θ-Hessian on the base batch is H (None: L_b).
      fused: take ``Hz`` and the cross term from one vjp of ∇_θL_b at z_t (L_b's Hessian
        only, so not with ``hvp_loss``).
      name: the method's name.

    The ``repr`` shows ``z_tx``, ``hvp_loss`` and ``fused`` only when they are set, so
    ``soba(ρ)`` prints as before.

    Raises:
      TypeError: ``z_tx`` is not an ``optax.GradientTransformation`` (e.g. the factory
        ``optax.adam`` instead of ``optax.adam(1e-3)``), ``hvp_loss`` is not callable,
        ``fused`` is not a bool.
      ValueError: both or neither of ``rho`` and ``z_tx``; ``fused=True`` with ``hvp_loss``.

    Example:
      >>> SOBA(rho=0.05)
      SOBA(rho=0.05, name='soba')
      >>> import optax
      >>> SOBA(rho=None, z_tx=optax.sgd(1e-3), fused=True)
      SOBA(rho=None, z_tx=chain(identity, scale(step_size=-0.001)), fused=True, name='soba')
    """

    rho: float | Callable[[Any], Any] | None = 0.01
    z_tx: optax.GradientTransformation | None = dataclasses.field(default=None, repr=False)
    hvp_loss: Loss | None = dataclasses.field(default=None, repr=False)
    fused: bool = dataclasses.field(default=False, repr=False)
    name: str = "soba"
    info_keys = ("residual_norm",)

    def __post_init__(self):
        if self.z_tx is not None and not isinstance(self.z_tx, optax.GradientTransformation):
            hint = " (a factory such as optax.adam must be called)" if callable(self.z_tx) else ""
            raise TypeError(
                f"{self.name}: z_tx must be an optax.GradientTransformation that steps z, e.g. "
                f"optax.sgd(0.1) or optax.adam(1e-3); got {_checks.callable_repr(self.z_tx)}{hint}"
            )
        if self.z_tx is not None and self.rho is not None:
            raise ValueError(
                f"{self.name}: rho={_checks.callable_repr(self.rho)} and z_tx are both set; z_tx "
                "steps z with its own learning rate, so pass rho=None (soba(z_tx=...) does), or "
                "drop z_tx for the plain step z − ρ(Hz + d)"
            )
        if self.z_tx is None and self.rho is None:
            raise ValueError(
                f"{self.name}: give the step of z, either rho (a float or a schedule) or z_tx "
                "(an optax transform, e.g. optax.sgd(0.1))"
            )
        if self.hvp_loss is not None and not callable(self.hvp_loss):
            raise TypeError(
                f"{self.name}: hvp_loss must be a function loss(base_params, meta_params, batch) "
                f"-> scalar; got {self.hvp_loss!r}"
            )
        if not isinstance(self.fused, bool):
            raise TypeError(f"{self.name}: fused must be True or False, got {self.fused!r}")
        if self.fused and self.hvp_loss is not None:
            raise ValueError(
                f"{self.name}: fused=True takes Hz and the cross term from one vjp of the base "
                f"loss's gradient, so H is L_b's Hessian; it cannot use hvp_loss="
                f"{_checks.callable_repr(self.hvp_loss)}. Use fused=False with a custom "
                "hvp_loss (one HVP of hvp_loss and one mixed product of L_b per step)."
            )

    def __repr__(self) -> str:
        parts = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _NEW_FIELDS and value is _NEW_FIELDS[f.name]:
                continue
            parts.append(f"{f.name}={_checks.callable_repr(value)}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def init(self, base_params: PyTree, meta_params: PyTree) -> SobaState:
        """``z = 0`` (shaped like θ), a zero count and ``z_tx.init(z)`` (empty without z_tx)."""
        del meta_params
        needs_base_params(self.name, base_params)
        z = jax.tree.map(jnp.zeros_like, base_params)
        z_opt_state = optax.EmptyState() if self.z_tx is None else self.z_tx.init(z)
        return SobaState(z, jnp.zeros([], jnp.int32), z_opt_state)

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: SobaState
    ) -> tuple[Hypergrad, SobaState]:
        """One SOBA step: ``r = Hz + d``, z stepped on r, then ``h = (∂²L_b/∂λ∂θ) z``."""
        check_problem(problem, inputs)
        if self.hvp_loss is not None:
            _checks.scalar_loss(
                self.hvp_loss, "hvp_loss", inputs.base_params, inputs.meta_params, inputs.base_batch
            )
        meta_val, d, direct = meta_value_and_grads(problem, inputs)
        h = None
        if self.fused:
            hz, h = _fused_products(problem, inputs, state.z)
        elif self.hvp_loss is None:
            hz = base_hvp(problem, inputs)(state.z)
        else:
            hz = _hvp(self.hvp_loss, inputs, state.z)
        residual = jax.tree.map(jnp.add, hz, d)
        if self.z_tx is None:
            rho = self.rho(state.count) if callable(self.rho) else self.rho
            z = jax.tree.map(lambda zi, ri: zi - rho * ri, state.z, residual)
            z_opt_state = state.z_opt_state
        else:
            updates, z_opt_state = self.z_tx.update(residual, state.z_opt_state, state.z)
            z = optax.apply_updates(state.z, updates)
        if h is None:
            h = mixed_product(problem, inputs, z)
        info = {"residual_norm": wide_norm(residual)}
        new_state = SobaState(z, state.count + 1, z_opt_state)
        return assemble(inputs.meta_params, direct, h, meta_val, info=info), new_state


def soba(
    rho: float | Callable[[Any], Any] | None = None,
    *,
    z_tx: optax.GradientTransformation | None = None,
    hvp_loss: Loss | None = None,
    fused: bool = False,
) -> SOBA:
    """SOBA with step ρ (constant or a schedule of the meta-step count), or z stepped by ``z_tx``.

    Args:
      rho: the step of ``z ← z − ρ(Hz + d)``; 0.01 when neither ``rho`` nor ``z_tx`` is given.
      z_tx: an optax transform that steps z on the residual ``Hz + d`` (the gradient of
        ``½zᵀHz + dᵀz``); ``optax.sgd(ρ)`` reproduces ``soba(ρ)`` bit for bit, and
        ``optax.adam(lr)`` is the variant of Grangier et al. (arXiv:2311.11973).
      hvp_loss: ``loss(θ, λ, batch)`` whose Hessian on the base batch is H, e.g. the
        unweighted loss of the selected batch; z then tracks ``−H_hvp⁻¹ d``.
      fused: one vjp of ∇_θL_b at z_t gives Hz_t and ``(∂²L_b/∂λ∂θ) z_t`` (fewer FLOPs;
        h lags the unfused one by one step; not with ``hvp_loss``).

    Example:
      >>> import optax
      >>> soba(optax.constant_schedule(0.1)).rho(0)
      0.1
      >>> soba(0.05).info_keys
      ('residual_norm',)
      >>> soba(z_tx=optax.adam(1e-3)).rho is None
      True
    """
    if rho is None and z_tx is None:
        rho = 0.01
    return SOBA(rho=rho, z_tx=z_tx, hvp_loss=hvp_loss, fused=fused, name="soba")
