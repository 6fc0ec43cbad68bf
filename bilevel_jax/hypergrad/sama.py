r"""SAMA: first-order meta-gradients adapted to the base optimizer.

Reference: S. K. Choe et al., "Making Scalable Meta Learning Practical",
NeurIPS 2023, §3 (and Betty's ``sama`` implementation).

For base parameters θ, meta parameters λ, base loss L_b and meta loss L_m, one
meta step computes

    d  = ∇_θ L_m(θ, λ; B')
    v  = J_u(g)ᵀ d                    adaptation to the optimizer (v = d for SAMA-NA)
    ε  = α / ‖v‖₂                      one global norm, in float32 or wider
    h  = −[∇_λ L_b(θ + εv, λ; B) − ∇_λ L_b(θ − εv, λ; B)] / (2ε)
    dL_m/dλ ≈ ∇_λ L_m(θ, λ; B') + h

``h`` is a central difference of the mixed second derivative
``−(∂²L_b/∂λ∂θ) v`` with O(ε²) error, so only first-order passes are needed,
and the two λ-gradients stop at λ (for data reweighting they touch only the
weighting network). SAMA also returns ``−εv``, the base step along v (paper §3.2).

``difference="jvp"`` replaces the central difference by the forward-mode product
``h = −∂/∂t ∇_λ L_b(θ + t v, λ; B)|_{t=0}`` (``jax.jvp`` of the λ-gradient): exact, no
cancellation in low precision, and it respects a ``stop_gradient`` in L_b, which the central
difference differentiates through (``docs/math.md``, section 5).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

import jax
import optax

from bilevel_jax.adaptation import adapt as _adapt
from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    Loss,
    MethodBase,
    PyTree,
    _wide,
    assemble,
    central_difference,
    check_problem,
    forward_mixed_product,
    meta_value_and_grads,
)

__all__ = ["SAMA", "sama", "sama_na", "sama_hypergrad"]


def sama_hypergrad(
    base_loss: Loss,
    meta_loss: Loss,
    *,
    base_params: PyTree,
    meta_params: PyTree,
    base_tx: optax.GradientTransformation,
    base_opt_state: optax.OptState,
    base_batch: PyTree,
    meta_batch: PyTree,
    alpha: float = 0.1,
    adapt: bool = True,
    adapt_from: Literal["fresh", "last"] = "fresh",
    last_grad: PyTree | None = None,
    last_opt_state: optax.OptState | None = None,
    difference: Literal["vmap", "sequential", "jvp"] = "sequential",
    direct: bool = True,
    axis_name: str | None = None,
) -> Hypergrad:
    r"""SAMA meta-gradient for one meta step (pure and jit-able).

    Computes ``∇_λ L_m + h`` with ``h = −[∇_λ L_b(θ+εv) − ∇_λ L_b(θ−εv)]/(2ε)``,
    ``v = J_u(g)ᵀ ∇_θ L_m`` and ``ε = α/‖v‖`` (Choe et al. 2023, eqs. 5–6).

    Args:
      base_loss: ``L_b(θ, λ, batch) -> scalar``.
      meta_loss: ``L_m(θ, λ, batch) -> scalar``.
      base_params: θ after the last base step.
      meta_params: λ.
      base_tx: the base optimizer; its adaptation rule comes from
        :mod:`bilevel_jax.adaptation` (closed form where known, exact VJP otherwise).
      base_opt_state: ``base_tx``'s state at θ.
      base_batch: the last base batch B (the central difference is taken on it).
      meta_batch: the meta batch B'.
      alpha: α in ε = α/‖v‖, the length of the perturbation of θ (default 0.1, chosen on
        the main job, ``experiments/README.md``, "SAMA's radius α": the earlier default 1.0 lost
        seeds there).
      adapt: False gives SAMA-NA (v = d, no adaptation).
      adapt_from: ``"fresh"``: the Jacobian is taken at ``∇_θ L_b(θ, λ; B)`` and
        ``base_opt_state`` (one extra backward); ``"last"``: at ``last_grad`` and
        ``last_opt_state``, the gradient and pre-update state of the last base step
        (Betty's choice, free inside a training loop).
      last_grad, last_opt_state: required with ``adapt_from="last"``.
      difference: ``"sequential"`` (default) evaluates the two λ-gradients one after the
        other, with θ+εv and θ−εv sharing one θ-sized buffer; ``"vmap"`` evaluates them in
        one batched pass (both perturbed copies and activations alive at once). Measured on
        CPU (``experiments/benchmark.py``, MLP 784-1024-1024-10): sequential needs 28 % less
        temporary memory and is no slower, hence the default; vmap may pay off on
        accelerators with small batches. ``"jvp"``: no finite difference but the exact
        forward-mode product ``h = −∂/∂t ∇_λL_b(θ + t v)|_{t=0}`` (``jax.jvp``
        of the λ-gradient); α then only sets the base step along v, ``−εv``. It respects a
        ``stop_gradient`` in ``base_loss`` (the mixed derivative of the update as written,
        as CG/Neumann/exact compute it) where the central difference differentiates through
        it (Betty's estimand), and it stays accurate with the meta step in bf16
        (``docs/math.md``, section 5; costs in ``experiments/README.md``).
      direct: include the direct term ∇_λ L_m (zero when L_m ignores λ).
      axis_name: exact data parallelism inside ``shard_map``/``pmap``: d, ∇_λL_m and the fresh
        adaptation gradient are averaged over this axis before the (local) central
        difference, so that averaging the returned local results equals the full-batch
        single-device result (for mean losses over equal shards). Costs one all-reduce for
        d and ∇_λL_m and one for the fresh gradient.

    Returns:
      A :class:`Hypergrad` whose ``base_update`` is ``−εv`` in θ's dtype and whose
      ``info`` holds ``eps`` and ``v_norm``. If ``‖v‖ = 0`` the meta-gradient's
      finite-difference part is exactly zero (never NaN).

    Precision: ‖v‖, ε, the perturbed parameters θ ± εv and the difference are
    computed in float32 or wider; bf16 base parameters are perturbed in float32
    and the loss sees float32 parameters (``docs/precision.md``).

    :func:`sama` builds the method object that calls this function once per meta step;
    use this one directly when you have the arrays and no training loop.

    Example (quadratic losses, where the central difference is exact):
      >>> import jax.numpy as jnp
      >>> import optax
      >>> base = lambda th, lam, b: jnp.sum((th - lam) ** 2)
      >>> meta = lambda th, lam, b: jnp.sum((th - 2.0) ** 2)
      >>> tx, th = optax.sgd(0.5), jnp.zeros(2)
      >>> hg = sama_hypergrad(
      ...     base, meta, base_params=th, meta_params=jnp.ones(2), base_tx=tx,
      ...     base_opt_state=tx.init(th), base_batch=None, meta_batch=None,
      ... )
      >>> print(hg.meta_grad, float(hg.info["eps"]) > 0)
      [-4. -4.] True
    """
    if difference not in ("vmap", "sequential", "jvp"):
        raise ValueError(
            f"difference must be 'sequential', 'vmap' (central differences) or 'jvp' (the "
            f"forward-mode product), got {difference!r}"
        )
    if adapt_from not in ("fresh", "last"):
        raise ValueError(f"adapt_from must be 'fresh' or 'last', got {adapt_from!r}")
    if not isinstance(alpha, jax.Array) and not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha!r}")
    problem = BilevelProblem(base_loss, meta_loss, base_tx)
    inputs = BilevelInputs(base_params, meta_params, base_opt_state, base_batch, meta_batch)
    check_problem(problem, inputs)
    meta_val, d, direct_grad = meta_value_and_grads(problem, inputs)
    if axis_name is not None:
        d, direct_grad = jax.lax.pmean((d, direct_grad), axis_name)

    if adapt:
        if adapt_from == "last":
            if last_grad is None or last_opt_state is None:
                raise ValueError(
                    "adapt_from='last' needs last_grad and last_opt_state (the gradient and "
                    "the pre-update optimizer state of the last base step)"
                )
            g, s = last_grad, last_opt_state
        else:
            g, s = jax.grad(base_loss)(base_params, meta_params, base_batch), base_opt_state
            if axis_name is not None:
                g = jax.lax.pmean(g, axis_name)
        v = _adapt(base_tx, d, grads=g, state=s, params=base_params)
    else:
        v = d

    if difference == "jvp":
        h, eps, v_norm = forward_mixed_product(
            base_loss, base_params, meta_params, base_batch, v, alpha
        )
    else:
        h, eps, v_norm = central_difference(
            base_loss, base_params, meta_params, base_batch, v, alpha, difference=difference
        )
    base_update = jax.tree.map(lambda vi, t: (-eps * _wide(vi)).astype(t.dtype), v, base_params)
    return assemble(
        meta_params,
        direct_grad if direct else None,
        h,
        meta_val,
        base_update=base_update,
        info={"eps": eps, "v_norm": v_norm},
    )


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class SAMA(MethodBase):
    """SAMA as a hypergradient method object (see :func:`sama_hypergrad` for the math).

    Build it with :func:`sama`, :func:`sama_na` or :func:`~bilevel_jax.darts`, or by keyword.

    Attributes:
      alpha: α in ε = α/‖v‖.
      adapt: False for SAMA-NA.
      adapt_from: ``"fresh"`` or ``"last"`` (see :func:`sama_hypergrad`).
      difference: ``"sequential"`` or ``"vmap"`` (central differences) or ``"jvp"`` (the
        exact forward-mode product; see :func:`sama_hypergrad`).
      step_along_v: return the base step along v, ``−εv``, as :attr:`Hypergrad.base_update`;
        the bilevel loop then applies it to θ after the meta update (paper §3.2).
      axis_name: exact synchronisation over this device axis (see :func:`sama_hypergrad`);
        set by :meth:`synced` (``bilevel_step(..., sync="full_batch")``).
      name: the method's name.

    Example:
      >>> SAMA(alpha=0.5, step_along_v=True)
      SAMA(alpha=0.5, adapt=True, adapt_from='fresh', difference='sequential', step_along_v=True, axis_name=None, name='sama')
      >>> SAMA(alpha=0.5).synced("data").axis_name
      'data'
    """

    alpha: float = 0.1
    adapt: bool = True
    adapt_from: Literal["fresh", "last"] = "fresh"
    difference: Literal["vmap", "sequential", "jvp"] = "sequential"
    step_along_v: bool = False
    axis_name: str | None = None
    name: str = "sama"
    info_keys = ("eps", "v_norm")
    supports_exact_sync = True

    def __post_init__(self) -> None:
        alpha = self.alpha  # checked here, not first when the step is traced
        if isinstance(alpha, int | float) and not (math.isfinite(alpha) and alpha > 0):
            raise ValueError(
                f"{self.name}: alpha must be a positive finite number (ε = α/‖v‖ is the "
                f"finite-difference step); got {alpha!r}. The usual range is 0.01 to 1."
            )

    @property
    def uses_last_step(self) -> bool:
        """True for ``adapt_from="last"`` with the adaptation (the loop keeps the last gradient).

        >>> SAMA(adapt_from="last").uses_last_step, SAMA(adapt_from="last", adapt=False).uses_last_step
        (True, False)
        """
        return self.adapt and self.adapt_from == "last"

    @property
    def base_step(self) -> bool:
        """Deprecated: use ``step_along_v``."""
        _deprecated_base_step(stacklevel=3)
        return self.step_along_v

    def synced(self, axis_name: str) -> SAMA:
        """A copy whose meta step averages d, ∇_λL_m and the fresh gradient over ``axis_name``."""
        return dataclasses.replace(self, axis_name=axis_name)

    def init(self, base_params: PyTree, meta_params: PyTree) -> optax.EmptyState:
        """SAMA keeps no state across meta steps."""
        del base_params, meta_params
        return optax.EmptyState()

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: PyTree
    ) -> tuple[Hypergrad, PyTree]:
        """One SAMA meta step on ``inputs``; returns the result and the (empty) state."""
        out = sama_hypergrad(
            problem.base_loss,
            problem.meta_loss,
            base_params=inputs.base_params,
            meta_params=inputs.meta_params,
            base_tx=problem.base_tx,
            base_opt_state=inputs.base_opt_state,
            base_batch=inputs.base_batch,
            meta_batch=inputs.meta_batch,
            alpha=self.alpha,
            adapt=self.adapt,
            adapt_from=self.adapt_from,
            last_grad=inputs.last_grad,
            last_opt_state=inputs.last_opt_state,
            difference=self.difference,
            axis_name=self.axis_name,
        )
        if not self.step_along_v:
            out = out._replace(base_update=None)
        return out, state


def _deprecated_base_step(stacklevel: int) -> None:
    warnings.warn(
        "base_step is deprecated; use step_along_v (e.g. bj.sama(step_along_v=True)): the "
        "method switch alone now makes bilevel_step apply the base step along v",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def _step_along_v(step_along_v: bool, base_step: bool | None) -> bool:
    if base_step is None:
        return step_along_v
    _deprecated_base_step(stacklevel=4)
    return bool(base_step) or step_along_v


def sama(
    alpha: float = 0.1,
    *,
    adapt_from: Literal["fresh", "last"] = "fresh",
    difference: Literal["vmap", "sequential", "jvp"] = "sequential",
    step_along_v: bool = False,
    base_step: bool | None = None,
) -> SAMA:
    """SAMA with the optimizer adaptation (Choe et al. 2023). See :func:`sama_hypergrad`.

    Args:
      alpha: α in ε = α/‖v‖.
      adapt_from: where the adaptation Jacobian is taken (``"fresh"`` or ``"last"``).
      difference: ``"sequential"`` or ``"vmap"`` evaluation of the central difference, or
        ``"jvp"``: the exact forward-mode product instead (see :func:`sama_hypergrad`).
      step_along_v: also take SAMA's base step ``θ ← θ − εv`` after each meta update
        (applied by :func:`~bilevel_jax.bilevel_step`; :func:`~bilevel_jax.meta_grad` rejects it).
      base_step: deprecated spelling of ``step_along_v``.

    Example:
      >>> m = sama(0.1, step_along_v=True)
      >>> m.alpha, m.adapt, m.step_along_v, m.name
      (0.1, True, True, 'sama')
    """
    return SAMA(
        alpha=alpha,
        adapt=True,
        adapt_from=adapt_from,
        difference=difference,
        step_along_v=_step_along_v(step_along_v, base_step),
        name="sama",
    )


def sama_na(
    alpha: float = 0.1,
    *,
    difference: Literal["vmap", "sequential", "jvp"] = "sequential",
    step_along_v: bool = False,
    base_step: bool | None = None,
) -> SAMA:
    """SAMA-NA: SAMA without the adaptation matrix (v = ∇_θ L_m).

    Arguments as in :func:`sama` (``base_step`` is the deprecated ``step_along_v``).

    Example:
      >>> m = sama_na(0.1)
      >>> m.adapt, m.name
      (False, 'sama_na')
    """
    return SAMA(
        alpha=alpha,
        adapt=False,
        adapt_from="fresh",
        difference=difference,
        step_along_v=_step_along_v(step_along_v, base_step),
        name="sama_na",
    )
