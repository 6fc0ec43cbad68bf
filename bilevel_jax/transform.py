r"""``meta_grad``: a hypergradient method as an optax transform on the meta parameters.

    meta_tx = optax.chain(bj.meta_grad(base_loss, meta_loss, base_tx, bj.sama()),
                          optax.adam(1e-3))
    state   = meta_tx.init(meta_params)
    updates, state = meta_tx.update(
        jax.tree.map(jnp.zeros_like, meta_params), state, meta_params,
        base_params=θ, base_opt_state=s, base_batch=B, meta_batch=B')
    meta_params = optax.apply_updates(meta_params, updates)

The transform adds the hypergradient dL_m(θ*(λ), λ)/dλ to the incoming updates
(pass zeros, or the gradient of a regularizer on λ) and hands the sum to the rest
of the chain. Extra arguments are keyword-only and mirror
:class:`~bilevel_jax.hypergrad.base.BilevelInputs`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import io_callback

from bilevel_jax import _checks
from bilevel_jax.hypergrad.base import BilevelInputs, BilevelProblem, HypergradMethod, Loss
from bilevel_jax.hypergrad.sama import sama

__all__ = ["MetaGradState", "meta_grad"]

PyTree = Any


class MetaGradState(NamedTuple):
    """State of :func:`meta_grad`.

    Attributes:
      count: meta steps taken (including skipped ones).
      nonfinite_count: meta steps whose hypergradient was not finite (and was dropped).
      method_state: the hypergradient method's own state.
      meta_loss: the meta loss at the last meta step.
      info: the method's diagnostics at the last meta step (SAMA: ``eps``, ``v_norm``).
    """

    count: jax.Array
    nonfinite_count: jax.Array
    method_state: PyTree
    meta_loss: jax.Array
    info: dict


def _raise_nonfinite(finite, meta_grad) -> None:
    if not bool(finite):
        bad = _checks.nonfinite_leaves(meta_grad)
        raise FloatingPointError(
            "bilevel_jax.meta_grad: the hypergradient is not finite "
            f"(non-finite leaves of the meta-gradient: {', '.join(bad) or 'none; the base step along v is'}). "
            "Check the losses for NaN/inf, lower the learning rates or alpha, or pass "
            "on_nonfinite='skip' to drop such meta steps and count them instead."
        )


def meta_grad(
    base_loss: Loss,
    meta_loss: Loss,
    base_tx: optax.GradientTransformation,
    method: HypergradMethod | None = None,
    *,
    on_nonfinite: Literal["raise", "skip"] = "raise",
    base_params: PyTree | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""An optax transform that adds the hypergradient of a bilevel problem to the updates.

    ``update(updates, state, params, *, base_params, base_opt_state, base_batch,
    meta_batch, last_grad=None, last_opt_state=None)`` returns
    ``updates + dL_m(θ*(λ), λ)/dλ`` with the derivative estimated by ``method``
    (SAMA by default: Choe et al., "Making Scalable Meta Learning Practical", 2023).

    Args:
      base_loss: ``L_b(θ, λ, batch) -> scalar``.
      meta_loss: ``L_m(θ, λ, batch) -> scalar``.
      base_tx: the optimizer that trains θ.
      method: the hypergradient method (default ``bilevel_jax.sama()``).
      on_nonfinite: a non-finite hypergradient is never passed on: the updates
        are left unchanged and ``nonfinite_count`` grows. With ``"raise"`` (default)
        the call also raises ``FloatingPointError`` naming the bad leaves (under
        ``jit`` it surfaces as a runtime error carrying that message; the host
        callback runs only when a value is non-finite). ``"skip"`` only counts.
      base_params: θ, or a template with its shapes and dtypes; needed only by methods
        whose state is shaped like θ (``soba()``, ``cg(warm_start=True)``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``; compose it with ``optax.chain``.
    """
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    method = sama() if method is None else method
    if getattr(method, "base_step", False):
        raise ValueError(
            f"{method.name} with base_step=True takes a step on the base parameters, which an "
            "optax transform of the meta parameters cannot apply. Call the method's hypergrad "
            "(or bilevel_jax.sama_hypergrad) directly and apply Hypergrad.base_update to θ."
        )
    info_keys = tuple(getattr(method, "info_keys", ()))
    problem = BilevelProblem(base_loss, meta_loss, base_tx)
    template = base_params

    def init_fn(params):
        return MetaGradState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            method_state=method.init(template, params),
            meta_loss=jnp.zeros([], jnp.float32),
            info={k: jnp.zeros([], jnp.float32) for k in info_keys},
        )

    def update_fn(
        updates,
        state,
        params=None,
        *,
        base_params=None,
        base_opt_state=None,
        base_batch=None,
        meta_batch=None,
        last_grad=None,
        last_opt_state=None,
        **extra_args,
    ):
        del extra_args
        missing = [
            n
            for n, x in [
                ("params", params),
                ("base_params", base_params),
                ("base_opt_state", base_opt_state),
                ("base_batch", base_batch),
                ("meta_batch", meta_batch),
            ]
            if x is None
        ]
        if missing:
            raise ValueError(
                "bilevel_jax.meta_grad.update needs the meta params and the keyword "
                f"arguments base_params, base_opt_state, base_batch, meta_batch; missing: {missing}"
            )
        _checks.same_structure(params=params, updates=updates)
        inputs = BilevelInputs(
            base_params, params, base_opt_state, base_batch, meta_batch, last_grad, last_opt_state
        )
        result, method_state = method.hypergrad(problem, inputs, state.method_state)
        if on_nonfinite == "raise":  # the host callback only runs on the non-finite branch
            # io_callback (unlike jax.debug.callback) propagates the exception to the caller
            jax.lax.cond(
                result.finite,
                lambda mg: None,
                lambda mg: io_callback(_raise_nonfinite, None, result.finite, mg),
                result.meta_grad,
            )
        new_updates = jax.tree.map(
            lambda u, h: jnp.where(result.finite, u + h.astype(u.dtype), u),
            updates,
            result.meta_grad,
        )
        new_state = MetaGradState(
            count=optax.safe_increment(state.count),
            nonfinite_count=state.nonfinite_count + (~result.finite).astype(jnp.int32),
            method_state=jax.tree.map(
                lambda new, old: jnp.where(result.finite, new, old),
                method_state,
                state.method_state,
            ),
            meta_loss=jnp.asarray(result.meta_loss, jnp.float32),
            info={k: jnp.asarray(result.info[k], jnp.float32) for k in info_keys},
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
