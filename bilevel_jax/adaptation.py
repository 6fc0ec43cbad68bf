"""Adaptation matrices: the transposed Jacobian of an optax update w.r.t. its gradient.

SAMA (Choe et al., "Making Scalable Meta Learning Practical", NeurIPS 2023, §3.1)
adapts the meta-gradient to the base optimizer. Write an optax transform as
``(g, s, θ) -> (Δ, s')`` with ``θ' = θ + Δ`` and call ``u(g) = -Δ`` the *step*.
The adapted direction is the vector-Jacobian product

    v = J_u(g)ᵀ d,            d = ∇_θ L_meta(θ, λ),

evaluated at the gradient ``g`` and state ``s`` of a base step. For a chain
``u = f_n ∘ … ∘ f_1`` the transposed Jacobians are applied from last to first,
exactly like backprop.

Every rule here is the derivative of optax's *actual* update, bias correction
included (``docs/math.md`` derives the Adam rule and why the formula printed in the
seed papers is wrong):

================================  =============================================
transform                          ∂out/∂in
================================  =============================================
``scale(c)``                       ``c``
``scale_by_schedule(f)``           ``f(count)`` (``scale_by_learning_rate``)
``add_decayed_weights``, identity  ``1``
``trace(β)``                       ``1``, or ``1 + β`` with ``nesterov=True``
``scale_by_adam``                  ``[A(s+ε) − m̂(1−β₂)g/(c₂s)] / (s+ε)²`` with
                                   ``A = (1−β₁)/c₁``, evaluated without
                                   cancellation (see :func:`_adam_rule`)
``scale_by_rms``                   ``(ρn/c + ε) / (n̂+ε)^{3/2}`` (eps in sqrt)
``scale_by_rss``                   ``(S+ε) / (S'+ε)^{3/2}``
``clip(δ)``                        ``1{|g| ≤ δ}``
``clip_by_global_norm(c)``         rank one: ``(c/‖g‖)(w − ĝ(ĝ·w))`` if ``‖g‖ ≥ c``
================================  =============================================

How a rule is found: optax builds transforms as closures, so this module
recognises optax's own update functions (by qualified name) and reads their
hyper-parameters from the closure (``b1``, ``eps``…). A plain
``optax.adam(1e-3)`` therefore gets the closed form without restating anything.
``optax.chain``, ``optax.masked`` and ``optax.inject_hyperparams`` (whose inner
optimizer is rebuilt from the hyper-parameters in its state) are walked
through. Any transform that is not recognised uses the ``jax.vjp`` fallback
``jax.vjp(lambda g: -tx.update(g, s, θ)[0], g)[1](d)`` for that node only (the
same derivative by reverse-mode autodiff, without the closed form's care for
cancellation). ``adapt(..., rule="vjp")`` uses it for the whole update (the oracle
the closed forms are tested against).
Sign-based transforms (``scale_by_sign``, ``lion``) have a zero Jacobian almost
everywhere and are refused. :func:`describe` shows which path each node takes.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from bilevel_jax import _checks

__all__ = [
    "AdaptationError",
    "UnsupportedTransformError",
    "adapt",
    "describe",
    "exact_adapt",
]

PyTree = Any


class AdaptationError(ValueError):
    """Raised when the adaptation matrix of a transform cannot be computed.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx, p = optax.sgd(0.1), jnp.ones(2)
      >>> try:
      ...     adapt(tx, p, grads=p, state=tx.init(p), params=p, rule="newton")
      ... except AdaptationError as e:
      ...     print(e)
      rule must be 'closed_form' or 'vjp', got 'newton'
    """


class UnsupportedTransformError(AdaptationError):
    """Raised for transforms whose Jacobian is zero almost everywhere (sign-based).

    Example:
      >>> import optax
      >>> try:
      ...     describe(optax.lion(1e-3))
      ... except UnsupportedTransformError as e:
      ...     print("refused:", type(e).__name__)
      refused: UnsupportedTransformError
    """


# --------------------------------------------------------------------------- nodes


@dataclasses.dataclass(frozen=True)
class _Node:
    """One transform in the plan. ``vjp`` maps the cotangent of its output to its input."""

    name: str
    update_fn: Callable

    def forward(self, g, state, params):
        return self.update_fn(g, state, params)[0]

    def vjp(self, g, state, params, w):  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self, state) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _Rule(_Node):
    """A closed-form rule: ``rule(g, state, params, w) -> Jᵀw``."""

    rule: Callable = None  # type: ignore[assignment] - always given

    def vjp(self, g, state, params, w):
        return self.rule(g, state, params, w)

    def describe(self, state) -> str:
        return f"{self.name}: closed form"


@dataclasses.dataclass(frozen=True)
class _Fallback(_Node):
    """VJP of this node's update by reverse-mode autodiff (no closed form known)."""

    def vjp(self, g, state, params, w):
        def step(x):
            return self.update_fn(x, state, params)[0]

        try:
            out, pullback = jax.vjp(step, g)
            w = jax.tree.map(lambda wi, oi: jnp.asarray(wi, oi.dtype), w, out)
            return pullback(w)[0]
        except Exception as e:  # noqa: BLE001 - re-raised with the transform named
            raise AdaptationError(
                f"the optax transform {self.name!r} cannot be differentiated with respect "
                f"to its incoming gradient, so its adaptation matrix is unavailable "
                f"({type(e).__name__}: {e}). Use SAMA-NA (adapt=False) or a "
                f"differentiable optimizer."
            ) from e

    def describe(self, state) -> str:
        return f"{self.name}: jax.vjp fallback"


@dataclasses.dataclass(frozen=True)
class _Chain(_Node):
    children: tuple = ()

    def forward(self, g, state, params):
        for child, s in zip(self.children, state):
            g = child.forward(g, s, params)
        return g

    def vjp(self, g, state, params, w):
        if len(state) != len(self.children):
            raise AdaptationError(
                f"optax.chain of {len(self.children)} transforms got a state of length "
                f"{len(state)}: the optimizer state was not made by this transform's init."
            )
        inputs = []
        for child, s in zip(self.children, state):
            inputs.append(g)
            g = child.forward(g, s, params)
        for child, s, gi in reversed(list(zip(self.children, state, inputs))):
            w = child.vjp(gi, s, params, w)
        return w

    def describe(self, state) -> str:
        states = state if state is not None else (None,) * len(self.children)
        inner = ", ".join(c.describe(s) for c, s in zip(self.children, states))
        return f"chain({inner})"


@dataclasses.dataclass(frozen=True)
class _Masked(_Node):
    """``optax.masked(inner, mask)``: the inner Jacobian on masked leaves, identity elsewhere."""

    inner: _Node = None  # type: ignore[assignment] - always given
    mask: Any = None

    def _mask_tree(self, g):
        return self.mask(g) if callable(self.mask) else self.mask

    @staticmethod
    def _masked(tree, mask_tree):
        return jax.tree.map(lambda m, x: x if m else optax.MaskedNode(), mask_tree, tree)

    def vjp(self, g, state, params, w):
        mask_tree = self._mask_tree(g)
        mp = None if params is None else self._masked(params, mask_tree)
        w_in = self.inner.vjp(
            self._masked(g, mask_tree), state.inner_state, mp, self._masked(w, mask_tree)
        )
        return jax.tree.map(lambda m, a, b: a if m else b, mask_tree, w_in, w)

    def describe(self, state) -> str:
        inner_state = None if state is None else state.inner_state
        return f"masked({self.inner.describe(inner_state)})"


@dataclasses.dataclass(frozen=True)
class _Inject(_Node):
    """``optax.inject_hyperparams``: the inner optimizer is rebuilt from the state."""

    cells: dict = None  # type: ignore[assignment] - always given

    def _inner(self, state, params):
        c = self.cells
        dtype = c["hyperparam_dtype"]
        if dtype is None:
            dtype = optax.tree.dtype(params, "highest")
        hparams = {k: _convert_floats(v, dtype) for k, v in state.hyperparams.items()}
        hparams.update(
            {
                k: _convert_floats(f(state.hyperparams_states[k]), dtype)
                for k, f in c["sched_hps"].items()
            }
        )
        tx = c["inner_factory"](**c["other_hps"], **hparams)
        return _parse(tx.update)

    def vjp(self, g, state, params, w):
        return self._inner(state, params).vjp(g, state.inner_state, params, w)

    def describe(self, state) -> str:
        name = getattr(self.cells["inner_factory"], "__name__", "?")
        if state is None:
            return f"inject_hyperparams({name}): resolved from the state"
        inner = self._inner(state, state.hyperparams)  # any floating tree works for dtype
        return f"inject_hyperparams({inner.describe(state.inner_state)})"


def _convert_floats(x, dtype):
    # Mirrors optax.inject_hyperparams: strong jax arrays pass, floats are cast.
    if isinstance(x, jax.Array) and not getattr(x, "weak_type", False):
        return x
    current = x.dtype if hasattr(x, "dtype") else type(x)
    if jnp.issubdtype(current, jnp.floating):
        return jnp.asarray(x, dtype=dtype)
    return x


# --------------------------------------------------------------------------- rules


def _elementwise(fn):
    """Build a rule from ``fn(g, w, *state_leaves) -> Jᵀw`` applied leaf by leaf."""

    def rule(g, state, params, w):
        del params
        return jax.tree.map(lambda gi, wi: fn(gi, wi), g, w)

    return rule


def _bias(decay, count, dtype):
    return (1 - decay**count).astype(dtype)


def _scale_rule(cells):
    c = cells["step_size"]
    return lambda g, s, p, w: jax.tree.map(lambda gi, wi: (c * wi).astype(wi.dtype), g, w)


def _schedule_rule(cells):
    fn = cells["step_size_fn"]

    def rule(g, state, params, w):
        step = fn(state.count)
        return jax.tree.map(lambda wi: jnp.asarray(step, wi.dtype) * wi, w)

    return rule


def _identity_rule(cells):
    return lambda g, s, p, w: w


def _trace_rule(cells):
    factor = 1.0 + cells["decay"] if cells["nesterov"] else 1.0
    return lambda g, s, p, w: jax.tree.map(lambda wi: factor * wi, w)


def _clip_rule(cells):
    delta = cells["max_delta"]
    return _elementwise(lambda g, w: jnp.where(jnp.abs(g) <= delta, w, jnp.zeros_like(w)))


def _clip_global_rule(cells):
    c = cells["max_norm"]

    def rule(g, state, params, w):
        norm = optax.tree.norm(g)
        inner = optax.tree.vdot(g, w) / jnp.where(norm > 0, norm, 1.0) ** 2

        def clipped(gi, wi):
            return (c / norm).astype(wi.dtype) * (wi - (inner * gi).astype(wi.dtype))

        return jax.lax.cond(norm < c, lambda: w, lambda: jax.tree.map(clipped, g, w))

    return rule


def _adam_rule(cells):
    r"""Jacobian of ``scale_by_adam`` (optax's exact update, bias correction included).

    With t = count+1, c₁ = 1−β₁ᵗ, c₂ = 1−β₂ᵗ, m' = β₁m + (1−β₁)g, n' = β₂n + (1−β₂)g²,
    n̂ = n'/c₂, s = √(n̂ + ε_root), the update is m̂/(s+ε) with m̂ = m'/c₁ (optax's
    Nesterov form: m̂ = β₁m'/(1−β₁^{t+1}) + (1−β₁)g/c₁). Writing m̂ = A·g + B·m,

        ∂/∂g [m̂/(s+ε)] = [A(s+ε) − m̂(1−β₂)g/(c₂s)] / (s+ε)²
                       = [A·ε + A(β₂n/c₂ + ε_root)/s − B·m(1−β₂)g/(c₂s)] / (s+ε)²,

    using s − (1−β₂)g²/(c₂s) = (β₂n/c₂ + ε_root)/s. The second form has no
    cancellation: at the first step it is exactly ε/(|g|+ε)², which autodiff
    obtains only as a difference of O(1) terms. Where s = 0 (g = n = 0) the
    1/s terms are taken at their limit 0.
    """
    b1, b2, eps, eps_root, nesterov = (
        cells["b1"],
        cells["b2"],
        cells["eps"],
        cells["eps_root"],
        cells["nesterov"],
    )

    def rule(g, state, params, w):
        t = optax.safe_increment(state.count)

        def leaf(gi, mi, ni, wi):
            dt = gi.dtype
            c1, c2 = _bias(b1, t, dt), _bias(b2, t, dt)
            if nesterov:
                c1n = _bias(b1, optax.safe_increment(t), dt)
                a, b = b1 * (1 - b1) / c1n + (1 - b1) / c1, b1 * b1 / c1n
            else:
                a, b = (1 - b1) / c1, b1 / c1
            s = jnp.sqrt(((1 - b2) * gi**2 + b2 * ni) / c2 + eps_root)
            inv_s = jnp.where(s > 0, 1 / jnp.where(s > 0, s, 1), 0)
            numer = a * eps + (a * (b2 * ni / c2 + eps_root) - b * mi * (1 - b2) * gi / c2) * inv_s
            return (numer / (s + eps) ** 2 * wi).astype(wi.dtype)

        return jax.tree.map(leaf, g, state.mu, state.nu, w)

    return rule


def _rms_rule(cells):
    r"""Jacobian of ``scale_by_rms``: n' = ρn + (1−ρ)g², n̂ = n'/c (c = 1−ρᵗ or 1).

    eps in sqrt: ``g/√(n̂+ε)`` → ``(ρn/c + ε)/(n̂+ε)^{3/2}``;
    otherwise ``g/(√n̂+ε)`` → ``[(√n̂+ε) − (1−ρ)g²/(c√n̂)]/(√n̂+ε)² = [ε + ρn/(c√n̂)]/(√n̂+ε)²``.
    """
    decay, eps, bias_corr, in_sqrt = (
        cells["decay"],
        cells["eps"],
        cells["bias_correction"],
        cells["eps_in_sqrt"],
    )

    def rule(g, state, params, w):
        t = optax.safe_increment(state.count) if bias_corr else None

        def leaf(gi, ni, wi):
            c = _bias(decay, t, gi.dtype) if bias_corr else 1.0
            n_hat = ((1 - decay) * gi**2 + decay * ni) / c
            if in_sqrt:
                jac = (decay * ni / c + eps) / (n_hat + eps) ** 1.5
            else:
                # (r+ε) − (1−ρ)g²/(c·r) = ε + (ρn/c)/r: no cancellation.
                r = jnp.sqrt(n_hat)
                inv_r = jnp.where(r > 0, 1 / jnp.where(r > 0, r, 1), 0)
                jac = (eps + decay * ni / c * inv_r) / (r + eps) ** 2
            return (jac * wi).astype(wi.dtype)

        return jax.tree.map(leaf, g, state.nu, w)

    return rule


def _rss_rule(cells):
    r"""Jacobian of ``scale_by_rss`` (adagrad): S' = S + g² → ``(S+ε)/(S'+ε)^{3/2}`` (0 where S' = 0)."""
    eps = cells["eps"]

    def rule(g, state, params, w):
        def leaf(gi, si, wi):
            s_new = gi**2 + si
            jac = jnp.where(s_new > 0, (si + eps) / (s_new + eps) ** 1.5, 0)
            return (jac * wi).astype(wi.dtype)

        return jax.tree.map(leaf, g, state.sum_of_squares, w)

    return rule


# qualified name of optax's update closure -> (rule factory, closure variables it reads)
_RULES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "scale": (_scale_rule, ("step_size",)),
    "scale_by_schedule": (_schedule_rule, ("step_size_fn",)),
    "identity": (_identity_rule, ()),
    "add_decayed_weights": (_identity_rule, ("weight_decay",)),
    "trace": (_trace_rule, ("decay", "nesterov")),
    "clip": (_clip_rule, ("max_delta",)),
    "clip_by_global_norm": (_clip_global_rule, ("max_norm",)),
    "scale_by_adam": (_adam_rule, ("b1", "b2", "eps", "eps_root", "nesterov")),
    "scale_by_rms": (_rms_rule, ("decay", "eps", "bias_correction", "eps_in_sqrt")),
    "scale_by_rss": (_rss_rule, ("eps",)),
}

_SIGN_BASED = {
    "scale_by_sign": "it returns sign(g)",
    "scale_by_lion": "lion's default mode='hard' returns sign(β₁m + (1−β₁)g)",
}


def _cells(fn) -> dict:
    closure = getattr(fn, "__closure__", None) or ()
    return {n: c.cell_contents for n, c in zip(fn.__code__.co_freevars, closure)}


def _transform_name(fn) -> str:
    q = getattr(fn, "__qualname__", repr(fn))
    return q.split(".<locals>")[0] if ".<locals>" in q else q


def _parse(update_fn) -> _Node:
    """Turn an optax update function into a plan of closed-form and fallback nodes."""
    module = getattr(update_fn, "__module__", "") or ""
    qualname = getattr(update_fn, "__qualname__", "")
    name = _transform_name(update_fn)
    if not module.startswith("optax") or not hasattr(update_fn, "__code__"):
        return _Fallback(name, update_fn)
    cells = _cells(update_fn)

    if name == "with_extra_args_support" and "tx" in cells:
        return _parse(cells["tx"].update)
    if name == "chain" and "update_fns" in cells:
        children = tuple(_parse(u) for u in cells["update_fns"])
        return _Chain("chain", update_fn, children=children)
    if name == "masked" and {"inner", "mask"} <= cells.keys():
        return _Masked("masked", update_fn, inner=_parse(cells["inner"].update), mask=cells["mask"])
    if name.startswith("inject_") and "inner_factory" in cells and qualname.endswith("update_fn"):
        return _Inject(name, update_fn, cells=cells)
    if name in _SIGN_BASED and (name != "scale_by_lion" or cells.get("mode", "hard") == "hard"):
        raise UnsupportedTransformError(
            f"the optax transform {name!r} is sign-based ({_SIGN_BASED[name]}): its Jacobian "
            f"is zero almost everywhere, so SAMA's adaptation matrix would erase the "
            f"meta-gradient. Use SAMA-NA (adapt=False) with it, or a smooth optimizer "
            f"(e.g. optax.scale_by_lion(mode='smooth'), adam)."
        )
    if name in _RULES:
        factory, needed = _RULES[name]
        if set(needed) <= cells.keys():
            return _Rule(name, update_fn, rule=factory(cells))
    return _Fallback(name, update_fn)


# --------------------------------------------------------------------------- API


def _negate(tree):
    return jax.tree.map(jnp.negative, tree)


def adapt(
    tx: optax.GradientTransformation,
    d: PyTree,
    *,
    grads: PyTree,
    state: optax.OptState,
    params: PyTree,
    rule: Literal["closed_form", "vjp"] = "closed_form",
    exact: bool | None = None,
) -> PyTree:
    r"""Adapt a meta-gradient direction to an optax optimizer: ``v = J_u(g)ᵀ d``.

    ``u(g) = -tx.update(g, state, params)[0]`` is the step the optimizer subtracts
    from the parameters; ``v`` is how a change of the gradient ``g`` moves that
    step, weighted by ``d`` (SAMA, Choe et al. 2023, eq. 5). For plain SGD with
    learning rate η, ``v = η d``.

    Args:
      tx: the base optimizer (any optax ``GradientTransformation``).
      d: the direction to adapt, a pytree like ``params`` (∇_θ L_meta in SAMA).
      grads: the gradient ``g`` at which the Jacobian is taken.
      state: ``tx``'s state *before* the update with ``grads``.
      params: the parameters passed to ``tx.update``.
      rule: ``"closed_form"`` (default): each recognised optax transform uses its
        closed-form Jacobian (module docstring; ``jax.vjp`` for the nodes without one);
        ``"vjp"``: ``jax.vjp`` of the whole update (the oracle the closed forms are
        tested against; same derivative, different rounding).
      exact: deprecated; ``exact=True`` is ``rule="vjp"``, ``False`` is ``"closed_form"``.

    Returns:
      ``v``, a pytree with the structure of ``d``.

    Raises:
      UnsupportedTransformError: for sign-based transforms (zero Jacobian a.e.).
      AdaptationError: if a transform cannot be differentiated, if ``d``, ``grads``,
        ``params`` and ``state`` do not belong together, or for an unknown ``rule``.

    Example (Adam at its first step from a zero state: ``v = lr·ε/(|g|+ε)² d``):
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx, p = optax.adam(0.1, eps=1.0), jnp.zeros(2)
      >>> g, d = jnp.array([1.0, 3.0]), jnp.ones(2)
      >>> print(adapt(tx, d, grads=g, state=tx.init(p), params=p))
      [0.025  0.00625]
      >>> print(adapt(tx, d, grads=g, state=tx.init(p), params=p, rule="vjp"))
      [0.025  0.00625]
    """
    if exact is not None:
        warnings.warn(
            "adapt(exact=...) is deprecated; use adapt(rule='vjp') for jax.vjp of the whole "
            "update or rule='closed_form' (the default) for the closed-form rules",
            DeprecationWarning,
            stacklevel=2,
        )
        rule = "vjp" if exact else "closed_form"
    if rule not in ("closed_form", "vjp"):
        raise AdaptationError(f"rule must be 'closed_form' or 'vjp', got {rule!r}")
    _checks.same_structure(params=params, grads=grads, d=d)
    _checks.opt_state_matches(tx, state, params)
    if rule == "vjp":
        node: _Node = _Fallback(_transform_name(tx.update), tx.update)
    else:
        node = _parse(tx.update)
    # u = -Δ, so J_uᵀ d = J_Δᵀ (−d): one negation of the cotangent.
    return node.vjp(grads, state, params, _negate(d))


def exact_adapt(
    tx: optax.GradientTransformation,
    d: PyTree,
    *,
    grads: PyTree,
    state: optax.OptState,
    params: PyTree,
) -> PyTree:
    """Deprecated: use ``adapt(tx, d, ..., rule="vjp")``.

    Example:
      >>> import warnings
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx, p = optax.sgd(0.5), jnp.zeros(2)
      >>> with warnings.catch_warnings():
      ...     warnings.simplefilter("ignore", DeprecationWarning)
      ...     print(exact_adapt(tx, jnp.ones(2), grads=p, state=tx.init(p), params=p))
      [0.5 0.5]
    """
    warnings.warn(
        "exact_adapt is deprecated; use adapt(tx, d, grads=..., state=..., params=..., rule='vjp')",
        DeprecationWarning,
        stacklevel=2,
    )
    return adapt(tx, d, grads=grads, state=state, params=params, rule="vjp")


def describe(tx: optax.GradientTransformation, state: optax.OptState | None = None) -> str:
    """Say which adaptation path each part of ``tx`` uses (closed form or ``jax.vjp`` fallback).

    Pass the state to resolve ``optax.inject_hyperparams`` (its inner optimizer lives in
    the state).

    Example:
      >>> import optax
      >>> describe(optax.adam(1e-3))
      'chain(scale_by_adam: closed form, scale: closed form)'
      >>> describe(optax.amsgrad(1e-3))
      'chain(scale_by_amsgrad: jax.vjp fallback, scale: closed form)'
    """
    return _parse(tx.update).describe(state)
