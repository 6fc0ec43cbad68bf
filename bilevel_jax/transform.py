r"""``meta_grad``: a hypergradient method as an optax transform on the meta parameters::

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

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel_jax import _checks, _nonfinite
from bilevel_jax._nonfinite import OnNonfinite
from bilevel_jax.hypergrad.base import BilevelInputs, BilevelProblem, HypergradMethod, Loss
from bilevel_jax.hypergrad.sama import sama

__all__ = ["MetaGradState", "meta_grad"]

PyTree = Any
_REQUIRED = ("params", "base_params", "base_opt_state", "base_batch", "meta_batch")


class MetaGradState(NamedTuple):
    """State of :func:`meta_grad`.

    Attributes:
      count: meta steps taken (including skipped ones).
      nonfinite_count: meta steps whose hypergradient was not finite (and was dropped).
      method_state: the hypergradient method's own state.
      meta_loss: the meta loss at the last meta step.
      info: the method's diagnostics at the last meta step (SAMA: ``eps``, ``v_norm``).

    >>> import jax.numpy as jnp, optax, bilevel_jax as bj
    >>> mg = bj.meta_grad(lambda t, l, b: jnp.sum(t * l), lambda t, l, b: jnp.sum(t**2),
    ...                   optax.sgd(0.1))
    >>> state = mg.init(jnp.ones(2))
    >>> int(state.count), sorted(state.info)
    (0, ['eps', 'v_norm'])
    """

    count: jax.Array
    nonfinite_count: jax.Array
    method_state: PyTree
    meta_loss: jax.Array
    info: dict


def _check_method(method: HypergradMethod) -> HypergradMethod:
    if method.step_along_v:
        raise ValueError(
            f"{method.name} with step_along_v=True takes a step on the base parameters, which "
            "an optax transform of the meta parameters cannot apply. Use bilevel_jax.bilevel_step "
            "(or call the method's hypergrad directly and apply Hypergrad.base_update to θ)."
        )
    return method


def _init_fn(method: HypergradMethod, template: PyTree):
    def init_fn(params):
        return MetaGradState(
            count=jnp.zeros([], jnp.int32),
            nonfinite_count=jnp.zeros([], jnp.int32),
            method_state=method.init(template, params),
            meta_loss=jnp.zeros([], jnp.float32),
            info={k: jnp.zeros([], jnp.float32) for k in method.info_keys},
        )

    return init_fn


def _check_args(updates, **required) -> None:
    missing = [n for n in _REQUIRED if required[n] is None]
    if missing:
        raise ValueError(
            "bilevel_jax.meta_grad.update needs the meta params and the keyword "
            f"arguments base_params, base_opt_state, base_batch, meta_batch; missing: {missing}"
        )
    _checks.same_structure(params=required["params"], updates=updates)
    _checks.float_leaves(required["base_params"], "base_params")
    _checks.float_leaves(required["params"], "meta_params")


def _apply(updates, state: MetaGradState, result, method_state, info_keys) -> tuple:
    """``updates + meta_grad`` and the new state; a non-finite result is dropped and counted."""
    ok = result.finite
    new_updates = jax.tree.map(
        lambda u, h: jnp.where(ok, u + h.astype(u.dtype), u), updates, result.meta_grad
    )
    new_state = MetaGradState(
        count=jnp.asarray(optax.safe_increment(state.count)),
        nonfinite_count=state.nonfinite_count + (~ok).astype(jnp.int32),
        method_state=jax.tree.map(
            lambda new, old: jnp.where(ok, new, old), method_state, state.method_state
        ),
        meta_loss=jnp.asarray(result.meta_loss, jnp.float32),
        info={k: jnp.asarray(result.info[k], jnp.float32) for k in info_keys},
    )
    return new_updates, new_state


_NO_STATE = object()  # model_state not passed


def _stateful_problem(problem: BilevelProblem, stateful: bool, model_state: Any) -> BilevelProblem:
    """The (θ, λ, batch) losses the methods expect; with ``stateful`` the model state is bound
    (``base_loss`` returns ``(loss, new_state)``; the new state is dropped, as in bilevel_step)."""
    if not stateful:
        if model_state is not _NO_STATE:
            raise ValueError(
                "bilevel_jax.meta_grad.update got model_state= but the transform was built "
                "without stateful=True; build it with meta_grad(..., stateful=True) so that "
                "the losses receive the model state as their fourth argument"
            )
        return problem
    if model_state is _NO_STATE:
        raise ValueError(
            "bilevel_jax.meta_grad(..., stateful=True).update needs model_state= (the "
            "non-differentiated model state the losses take as their fourth argument)"
        )
    base_loss: Callable[..., Any] = problem.base_loss  # (θ, λ, batch, model_state) here
    meta_loss: Callable[..., Any] = problem.meta_loss
    return dataclasses.replace(
        problem,
        base_loss=lambda th, lam, b: base_loss(th, lam, b, model_state)[0],
        meta_loss=lambda th, lam, b: meta_loss(th, lam, b, model_state),
    )


def _update_fn(
    method: HypergradMethod, problem: BilevelProblem, on_nonfinite: str, stateful: bool = False
):
    once = _nonfinite._Once()  # the identically-zero-hypergradient warning: once per transform

    def update_fn(
        updates,
        state,
        params: Any = None,
        *,
        base_params: Any = None,
        base_opt_state: Any = None,
        base_batch: Any = None,
        meta_batch: Any = None,
        last_grad: Any = None,
        last_opt_state: Any = None,
        model_state: Any = _NO_STATE,
        **extra_args,
    ):
        del extra_args
        _check_args(
            updates,
            params=params,
            base_params=base_params,
            base_opt_state=base_opt_state,
            base_batch=base_batch,
            meta_batch=meta_batch,
        )
        inputs = BilevelInputs(
            base_params,
            params,
            base_opt_state,
            base_batch,
            meta_batch,
            last_grad,
            last_opt_state,
        )
        bound = _stateful_problem(problem, stateful, model_state)
        if not getattr(method, "hyperparams", None):  # else λ also reaches base_tx
            _checks.warn_unreached(
                [
                    lambda m: bound.base_loss(base_params, m, base_batch),
                    lambda m: bound.meta_loss(base_params, m, meta_batch),
                ],
                params,
                "bilevel_jax.meta_grad",
            )
        result, method_state = method.hypergrad(bound, inputs, state.method_state)
        # an overflowing norm (a diverging neumann series) counts as non-finite too
        result = result._replace(finite=result.finite & _nonfinite.norm_finite(result.meta_grad))
        _nonfinite.report(
            result.finite,
            on_nonfinite,
            where="bilevel_jax.meta_grad: the hypergradient",
            tree=result.meta_grad,
        )
        _nonfinite.warn_if_zero(
            result.meta_grad,
            where="bilevel_jax.meta_grad: the hypergradient",
            once=once,
            active=result.finite,
            hint=_nonfinite.ZERO_HINT,
        )
        return _apply(updates, state, result, method_state, method.info_keys)

    return update_fn


def meta_grad(
    base_loss: Loss | Callable[..., Any],
    meta_loss: Loss | Callable[..., Any],
    base_tx: optax.GradientTransformation,
    method: HypergradMethod | None = None,
    *,
    on_nonfinite: OnNonfinite = "raise",
    base_params: PyTree | None = None,
    stateful: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""An optax transform that adds the hypergradient of a bilevel problem to the updates.

    ``update(updates, state, params, *, base_params, base_opt_state, base_batch,
    meta_batch, last_grad=None, last_opt_state=None[, model_state])`` returns
    ``updates + dL_m(θ*(λ), λ)/dλ`` with the derivative estimated by ``method``
    (SAMA by default: Choe et al., "Making Scalable Meta Learning Practical", 2023).

    Args:
      base_loss: ``L_b(θ, λ, batch) -> scalar``.
      meta_loss: ``L_m(θ, λ, batch) -> scalar``.
      base_tx: the optimizer that trains θ.
      method: the hypergradient method (default ``bilevel_jax.sama()``); one with
        ``step_along_v`` is refused (a meta transform cannot step θ).
      on_nonfinite: a non-finite hypergradient is never passed on: the updates
        are left unchanged and ``nonfinite_count`` grows. With ``"raise"`` (default)
        the call also raises ``FloatingPointError`` naming the bad leaves; under
        ``jit`` JAX hands it out as ``jax.errors.JaxRuntimeError`` carrying that
        message, which :func:`bilevel_jax.nonfinite_errors` turns back into the
        ``FloatingPointError`` (``with bj.nonfinite_errors(): jitted_step(...)``).
        ``"warn"`` warns (``RuntimeWarning``) instead; ``"skip"`` only counts. Every
        mode works under ``vmap`` (e.g. over tasks), and the host callback runs only
        when a value is non-finite.
      base_params: θ, or a template with its shapes and dtypes; needed only by methods
        whose state is shaped like θ (``soba()``, ``cg(warm_start=True)``).
      stateful: as in :func:`bilevel_jax.bilevel_step`: the losses take a fourth argument,
        the non-differentiated model state (batch statistics, RNG streams…), passed to
        ``update`` as ``model_state=``, and ``base_loss`` returns ``(loss, new_model_state)``;
        the meta step sees the state as a constant and does not return a new one.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; compose it with ``optax.chain``.

    >>> import jax, jax.numpy as jnp, optax, bilevel_jax as bj
    >>> base = lambda th, lam, x: jnp.mean((th - x) ** 2) + jnp.sum(lam * th**2)
    >>> meta = lambda th, lam, x: jnp.mean((th - x) ** 2)
    >>> tx = optax.sgd(0.1)
    >>> meta_tx = optax.chain(bj.meta_grad(base, meta, tx, bj.sama_na(0.1)), optax.sgd(1.0))
    >>> theta, lam = jnp.full(2, 0.5), jnp.full(2, 0.5)
    >>> updates, state = meta_tx.update(
    ...     jnp.zeros(2), meta_tx.init(lam), lam, base_params=theta,
    ...     base_opt_state=tx.init(theta), base_batch=jnp.ones(2), meta_batch=jnp.ones(2))
    >>> updates.shape, int(state[0].count), bool(jnp.all(updates < 0))
    ((2,), 1, True)

    With a model state (``stateful=True``; here a running mean the losses read):

    >>> def base_s(th, lam, x, ms):
    ...     return jnp.mean((th - x - ms["mean"]) ** 2) + jnp.sum(lam * th**2), ms
    >>> meta_s = lambda th, lam, x, ms: jnp.mean((th - x - ms["mean"]) ** 2)
    >>> mg = bj.meta_grad(base_s, meta_s, tx, bj.exact(), stateful=True)
    >>> h, _ = mg.update(jnp.zeros(2), mg.init(lam), lam, base_params=theta,
    ...                  base_opt_state=tx.init(theta), base_batch=jnp.ones(2),
    ...                  meta_batch=jnp.ones(2), model_state={"mean": jnp.zeros(2)})
    >>> h.shape
    (2,)
    """
    _nonfinite.check_mode(on_nonfinite, "bilevel_jax.meta_grad")
    method = _check_method(sama() if method is None else method)
    problem = BilevelProblem(base_loss, meta_loss, base_tx)
    return optax.GradientTransformationExtraArgs(
        _init_fn(method, base_params), _update_fn(method, problem, on_nonfinite, stateful)
    )
