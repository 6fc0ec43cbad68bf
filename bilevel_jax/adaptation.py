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

==================================  =============================================
transform                           ∂out/∂in
==================================  =============================================
``scale(c)``                        ``c``
``scale_by_schedule(f)``            ``f(count)`` (``scale_by_learning_rate``)
``add_decayed_weights``, identity   ``1``
``trace(β)``                        ``1``, or ``1 + β`` with ``nesterov=True``
``scale_by_adam``                   ``[A(s+ε) − m̂(1−β₂)g/(c₂s)] / (s+ε)²`` with
                                    ``A = (1−β₁)/c₁``, evaluated without
                                    cancellation (see :func:`_adam_rule`)
``scale_by_rms``                    ``(ρn/c + ε) / (n̂+ε)^{3/2}`` (eps in sqrt)
``scale_by_rss``                    ``(S+ε) / (S'+ε)^{3/2}``
``clip(δ)``                         ``1{|g| ≤ δ}``
``clip_by_global_norm(c)``          rank one: ``(c/‖g‖)(w − ĝ(ĝ·w))`` if ``‖g‖ ≥ c``
``clip_by_block_rms(τ)``            per leaf: ``1``, or ``(τ/rms)(w − û(û·w))``
``scale_by_novograd``               ``w/(r+ε) − (a/r)g(g·w)/(r+ε)²`` (limit 0 at r = 0)
``scale_by_param_block_rms``        ``max(rms(θ), min_scale)``
``scale_by_factored_rms``           ``jax.vjp`` of a copy of optax's update with an
                                    overflow-free derivative of ``ν^{-1/2}``
``contrib.scale_by_muon``           ``jax.vjp`` of optax's update; at a zero matrix
                                    the limit ``k·∂μ̂/∂g`` (see :func:`_muon_rule`)
==================================  =============================================

Wrappers are walked to their inner transforms:

- ``apply_if_finite(inner)``: the inner rule when the update is accepted, 0 when rejected.
- ``partition`` / ``multi_transform`` (and so ``muon``): each label's rule on its leaves.
- ``MultiSteps(inner, k)``: a mini-step that does not update has a zero Jacobian, so the
  rule goes through the inner update that the accumulated gradient ``G`` will take:
  ``(∂G/∂g)·J_inner(Ĝ)ᵀw`` with ``∂G/∂g = 1/k`` (mean) and ``Ĝ`` the running
  accumulation; at the boundary mini-step this is the Jacobian of the update itself.
- ``lookahead(fast)``: params are ``optax.LookaheadParams``; the fast optimizer's rule,
  mixed as ``α(w_fast + w_slow)`` at a sync step; ``v`` has θ's structure, slow part 0.
- ``contrib.schedule_free(base)``: ``(b1·c + 1 − b1)`` times the base rule.

At a leaf with zero gradient and zero second moment (an unused head, an embedding
row no batch has reached) these rules take the limit, where autodiff of ``√ν`` at
``ν = 0`` (or of muon's ``‖μ̂‖`` at a zero matrix) gives NaN (and every SAMA meta step
would be skipped).

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
    "can_rewind",
    "describe",
    "exact_adapt",
    "rewind",
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

    # whether this node's output depends on the parameters (then a stateful node after it
    # cannot be rewound exactly from the updated parameters; see ``rewind``)
    reads_params = True

    def rewind(self, g, state, params):
        """The state before the update of ``g`` that produced ``state`` (see :func:`rewind`)."""
        del g, params
        if not jax.tree.leaves(state):  # a stateless transform: nothing to undo
            return state
        raise AdaptationError(
            f"the state of the optax transform {self.name!r} cannot be recovered from the "
            f"updated state and the gradient"
        )

    def rewinds_with_grad(self, state) -> bool:
        """Whether :meth:`rewind` reads the incoming gradient (a moment, not just a count)."""
        return bool(jax.tree.leaves(state))

    def describe(self, state) -> str:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class _Rule(_Node):
    """A closed-form rule: ``rule(g, state, params, w) -> Jᵀw``."""

    rule: Callable = None  # type: ignore[assignment] - always given
    how: str = "closed form"
    # ``unstep(g, state) -> state before the update`` where the update can be inverted
    unstep: Callable | None = None
    unstep_reads_grad: bool = True

    @property
    def reads_params(self) -> bool:  # type: ignore[override]
        return self.name in _READS_PARAMS

    def vjp(self, g, state, params, w):
        return self.rule(g, state, params, w)

    def rewind(self, g, state, params):
        if self.unstep is None:
            return super().rewind(g, state, params)
        return self.unstep(g, state)

    def rewinds_with_grad(self, state) -> bool:
        if self.unstep is None:
            return super().rewinds_with_grad(state)
        return self.unstep_reads_grad

    def describe(self, state) -> str:
        return f"{self.name}: {self.how}"


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

    @property
    def reads_params(self) -> bool:  # type: ignore[override]
        return any(c.reads_params for c in self.children)

    def rewind(self, g, state, params):
        if len(state) != len(self.children):
            raise AdaptationError(
                f"optax.chain of {len(self.children)} transforms got a state of length "
                f"{len(state)}: the optimizer state was not made by this transform's init."
            )
        out, after = [], None  # after: the first transform so far whose output reads θ
        for child, s in zip(self.children, state):
            if after is not None and child.rewinds_with_grad(s):
                raise AdaptationError(
                    f"the state of {child.name!r} cannot be recovered exactly: its input "
                    f"depends on the parameters before the update (through {after!r}), and "
                    f"only the updated ones are known"
                )
            pre = child.rewind(g, s, params)
            out.append(pre)
            if child.reads_params and after is None:
                after = child.name
            g = child.forward(g, pre, params)
        return tuple(out)

    def rewinds_with_grad(self, state) -> bool:
        return any(c.rewinds_with_grad(s) for c, s in zip(self.children, state))

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

    @property
    def reads_params(self) -> bool:  # type: ignore[override]
        return self.inner.reads_params

    def rewind(self, g, state, params):
        mask_tree = self._mask_tree(g)
        mp = None if params is None else self._masked(params, mask_tree)
        inner = self.inner.rewind(self._masked(g, mask_tree), state.inner_state, mp)
        return state._replace(inner_state=inner)

    def rewinds_with_grad(self, state) -> bool:
        return self.inner.rewinds_with_grad(state.inner_state)

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


@dataclasses.dataclass(frozen=True)
class _IfFinite(_Node):
    """``optax.apply_if_finite(inner, k)``: the inner Jacobian when the update is accepted, else 0.

    The update is ``inner.update(g)`` when ``g`` is finite (or after more than ``k``
    consecutive non-finite gradients) and ``0`` otherwise; the accept/reject decision
    is locally constant in ``g``, so the Jacobian is the inner one or zero.
    """

    inner: _Node = None  # type: ignore[assignment] - always given
    max_errors: Any = None

    def vjp(self, g, state, params, w):
        isfinite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(g)]))
        count = jnp.where(isfinite, 0, optax.safe_increment(state.notfinite_count))
        accept = jnp.logical_or(isfinite, count > self.max_errors)
        w_in = self.inner.vjp(g, state.inner_state, params, w)
        return jax.tree.map(lambda a: jnp.where(accept, a, jnp.zeros_like(a)), w_in)

    def describe(self, state) -> str:
        inner_state = None if state is None else state.inner_state
        return f"apply_if_finite({self.inner.describe(inner_state)})"


@dataclasses.dataclass(frozen=True)
class _Partition(_Node):
    """``optax.partition`` / ``optax.multi_transform``: each label's rule on its own leaves.

    optax applies ``masked(tx_label, labels == label)`` for each label in turn; the
    masks are disjoint, so the Jacobian is block diagonal with one block per label.
    """

    labels: Any = None
    groups: tuple = ()  # (label, _Node) pairs in optax's order

    def _masks(self, g):
        labels = self.labels(g) if callable(self.labels) else self.labels
        return [jax.tree.map(lambda lab, k=k: lab == k, labels) for k, _ in self.groups]

    def vjp(self, g, state, params, w):
        for (label, node), mask in zip(self.groups, self._masks(g)):
            masked = _Masked(f"partition[{label!r}]", node.update_fn, inner=node, mask=mask)
            w = masked.vjp(g, state.inner_states[label], params, w)
        return w

    @property
    def reads_params(self) -> bool:  # type: ignore[override]
        return any(node.reads_params for _, node in self.groups)

    def rewind(self, g, state, params):
        inner = dict(state.inner_states)
        for (label, node), mask in zip(self.groups, self._masks(g)):
            masked = _Masked(f"partition[{label!r}]", node.update_fn, inner=node, mask=mask)
            inner[label] = masked.rewind(g, state.inner_states[label], params)
        return state._replace(inner_states=inner)

    def rewinds_with_grad(self, state) -> bool:
        return any(
            node.rewinds_with_grad(state.inner_states[label].inner_state)
            for label, node in self.groups
        )

    def describe(self, state) -> str:
        parts = []
        for label, node in self.groups:
            s = None if state is None else state.inner_states[label].inner_state
            parts.append(f"{label!r}: {node.describe(s)}")
        return f"partition({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class _MultiSteps(_Node):
    r"""``optax.MultiSteps(inner, k)``: through the inner update the accumulated gradient takes.

    Between boundaries MultiSteps returns 0, so the literal Jacobian of a mini-step
    that does not update is 0 (what ``rule="vjp"`` gives), and SAMA's adapted
    direction would vanish. The gradient ``g`` of this mini-step enters the
    accumulated gradient ``G`` that the inner optimizer steps with at the boundary,
    with ``∂G/∂g = 1/k`` (mean, the default) or ``1`` (``use_grad_mean=False``). The
    rule is ``(∂G/∂g) · J_inner(Ĝ)ᵀ w`` at the inner state, where ``Ĝ`` is the running
    accumulation including ``g`` (the running mean; the running sum scaled by
    ``k/(n+1)`` for sums). At the boundary mini-step ``Ĝ = G`` and this is exactly the
    Jacobian of the update. A mini-step rejected by ``should_skip_update_fn`` gives 0.
    """

    inner: _Node = None  # type: ignore[assignment] - always given
    ms: Any = None  # the optax.MultiSteps object

    def vjp(self, g, state, params, w):
        ms = self.ms
        k = ms._every_k_schedule(state.gradient_step)
        skip, _ = ms._should_skip_update_fn(g, state.gradient_step, params)
        n = state.mini_step
        acc = jax.tree.map(lambda gi, a: ms._acc_update(gi, a, n_acc=n), g, state.acc_grads)
        acc = optax.tree.cast_like(acc, g)
        if ms._use_grad_mean:
            scale = 1.0 / k
        else:
            scale = 1.0
            acc = jax.tree.map(lambda a: a * (k / (n + 1)).astype(a.dtype), acc)
        w_in = self.inner.vjp(acc, state.inner_opt_state, params, w)
        return jax.tree.map(
            lambda a: jnp.where(skip, jnp.zeros_like(a), (a * scale).astype(a.dtype)), w_in
        )

    def describe(self, state) -> str:
        inner_state = None if state is None else state.inner_opt_state
        how = "1/k" if self.ms._use_grad_mean else "1 (summed)"
        return (
            f"MultiSteps({self.inner.describe(inner_state)}; adapted through the inner update "
            f"the accumulated gradient takes, weight {how})"
        )


@dataclasses.dataclass(frozen=True)
class _Lookahead(_Node):
    r"""``optax.lookahead(fast, k, α)``: the fast optimizer's Jacobian, mixed at a sync step.

    Params are ``LookaheadParams(fast, slow)`` and the gradient is the fast one. The
    update is ``(fast: Δ, slow: 0)`` between syncs and ``(fast: αΔ + c, slow: αΔ + c')``
    at a sync step (``Δ`` the fast optimizer's update), so with the cotangent
    ``w = (w_f, w_s)``: ``J_fastᵀ(w_f)`` between syncs and ``J_fastᵀ(α(w_f + w_s))`` at a sync.
    """

    inner: _Node = None  # type: ignore[assignment] - always given
    sync_period: Any = None
    slow_step_size: Any = None

    def vjp(self, g, state, params, w):
        sync = (state.steps_since_sync == (self.sync_period - 1)).astype(jnp.result_type(float))
        a = self.slow_step_size

        def mix(wf, ws):
            s = sync.astype(wf.dtype)
            return ((1 - s * (1 - a)) * wf + (s * a) * ws).astype(wf.dtype)

        w_fast = jax.tree.map(mix, w.fast, w.slow)
        return self.inner.vjp(g, state.fast_state, params.fast, w_fast)

    def describe(self, state) -> str:
        inner_state = None if state is None else state.fast_state
        return f"lookahead({self.inner.describe(inner_state)}; fast parameters)"


@dataclasses.dataclass(frozen=True)
class _ScheduleFree(_Node):
    r"""``optax.contrib.schedule_free(base, lr, b1)``: a scalar times the base Jacobian.

    ``z' = z + Δ_base``, ``x' = (1−c)x + c z'``, ``y' = b1 x' + (1−b1) z'`` and the
    update is ``y' − y``, so ``∂update/∂Δ_base = b1·c + 1 − b1`` with optax's averaging
    weight ``c = w_t/Σw`` (computed from the state exactly as optax does).
    """

    inner: _Node = None  # type: ignore[assignment] - always given
    cells: dict = None  # type: ignore[assignment] - always given

    def _ck(self, state):
        lr, power = self.cells["learning_rate"], self.cells["weight_lr_power"]
        if callable(lr):
            lr = jnp.asarray(lr(state.step_count), dtype=state.max_lr.dtype)
        weight = jnp.maximum(state.max_lr, lr) ** power
        total = state.weight_sum + weight
        return jnp.where(
            jnp.logical_or(jnp.isnan(weight), jnp.isnan(total)),
            jnp.full(weight.shape, jnp.nan),
            jnp.nan_to_num(weight / total, nan=0.0, posinf=jnp.inf),
        )

    def vjp(self, g, state, params, w):
        b1, ck = self.cells["b1"], self._ck(state)
        w = jax.tree.map(lambda wi: (ck * (b1 * wi) + (1.0 - b1) * wi).astype(wi.dtype), w)
        return self.inner.vjp(g, state.base_optimizer_state, params, w)

    def describe(self, state) -> str:
        inner_state = None if state is None else state.base_optimizer_state
        return f"schedule_free({self.inner.describe(inner_state)})"


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


def _block_rms_rule(cells):
    r"""Jacobian of ``clip_by_block_rms(τ)`` per leaf: ``u / max(1, rms(u)/τ)``.

    Identity where ``rms(u) ≤ τ`` (a neighbourhood of ``u = 0`` included, where
    autodiff of ``√mean(u²)`` gives NaN); else ``(τ/rms)(w − û(û·w))`` with
    ``û = u/‖u‖``.
    """
    tau = cells["threshold"]

    def rule(g, state, params, w):
        def leaf(u, wi):
            rms = jnp.sqrt(jnp.mean(jnp.abs(u) ** 2))
            clipped = rms / tau > 1
            sq = jnp.sum(jnp.abs(u) ** 2)
            dot = jnp.sum(u * wi) / jnp.where(clipped, sq, 1)
            scale = tau / jnp.where(clipped, rms, 1)
            return jnp.where(clipped, scale * (wi - dot * u), wi).astype(wi.dtype)

        return jax.tree.map(leaf, g, w)

    return rule


def _param_block_rms_rule(cells):
    """Jacobian of ``scale_by_param_block_rms``: ``max(rms(θ), min_scale)`` per leaf (linear)."""
    min_scale = cells["min_scale"]

    def rule(g, state, params, w):
        def leaf(wi, pi):
            return (wi * optax.safe_root_mean_squares(pi, min_scale)).astype(wi.dtype)

        return jax.tree.map(leaf, w, params)

    return rule


def _novograd_rule(cells):
    r"""Jacobian of ``scale_by_novograd`` (one second moment per leaf).

    With ``ν' = ‖g‖²`` at the first step and ``β₂ν + (1−β₂)‖g‖²`` after (``a`` = 1 or
    ``1−β₂`` its derivative in ``‖g‖²``), ``r = √(ν' + ε_root)`` and the update
    ``μ' = g/(r+ε) + wd·θ (+ β₁μ)``:

        Jᵀw = w/(r+ε) − (a/r)·g(g·w)/(r+ε)²,

    whose second term is taken at its limit 0 where ``r = 0`` (``g = ν = 0``): autodiff
    of ``‖g‖`` at ``g = 0`` gives NaN there.
    """
    b2 = _cells(cells["update_nu"])["b2"]
    mu_cells = _cells(_cells(cells["init_mu"])["mu_addition"])
    eps, eps_root = mu_cells["eps"], mu_cells["eps_root"]

    def rule(g, state, params, w):
        first = optax.safe_increment(state.count) == 1

        def leaf(gi, ni, wi):
            sq = jnp.linalg.norm(gi) ** 2
            nu = jnp.where(first, sq.astype(ni.dtype), (1 - b2) * sq + b2 * ni)
            a = jnp.where(first, 1.0, 1.0 - b2)
            r = jnp.sqrt(nu + eps_root)
            inv_r = jnp.where(r > 0, 1 / jnp.where(r > 0, r, 1), 0)
            out = wi / (r + eps) - (a * inv_r * jnp.sum(gi * wi) / (r + eps) ** 2) * gi
            return out.astype(wi.dtype)

        return jax.tree.map(leaf, g, state.nu, w)

    return rule


@jax.custom_jvp
def _inv_sqrt(x):
    return x**-0.5


@_inv_sqrt.defjvp
def _inv_sqrt_jvp(primals, tangents):
    # d x^{-1/2} = -½ x^{-1/2} (dx/x): the same derivative as autodiff's -½ x^{-3/2} dx,
    # written so that x^{-3/2} (1e45 at Adafactor's ε₁ = 1e-30) never overflows float32.
    (x,), (t,) = primals, tangents
    y = x**-0.5
    return y, -0.5 * y * (t / x)


@jax.custom_jvp
def _div(a, b):
    return a / b


@_div.defjvp
def _div_jvp(primals, tangents):
    # d(a/b) = (da − q·db)/b: autodiff's a·db/b² underflows b² to 0 at b = 1e-30 in float32.
    (a, b), (ta, tb) = primals, tangents
    q = a / b
    return q, (ta - q * tb) / b


def _factored_rms_rule(cells):
    r"""Jacobian of ``scale_by_factored_rms`` (Adafactor's second moment).

    ``jax.vjp`` of a copy of optax's update (same operations, same rounding) in which
    the derivative of ``v^{-1/2}`` is written ``−½v^{-1/2}(dv/v)`` and that of ``a/b``
    ``(da − (a/b)db)/b``. Autodiff of optax's ``v ** -0.5`` forms ``v^{-3/2}`` (and of
    ``a/b`` forms ``b²``), which overflow float32 where ``g = v = 0`` (``v = ε₁ = 1e-30``)
    and give ``∞·0 = NaN`` at the zero gradient.
    """
    from optax._src import factorized  # the private helper optax's update calls

    decay_rate_fn, decay_rate, step_offset = (
        cells["decay_rate_fn"],
        cells["decay_rate"],
        cells["step_offset"],
    )
    factored, min_dim, epsilon = (
        cells["factored"],
        cells["min_dim_size_to_factor"],
        cells["epsilon"],
    )

    def leaf_update(grad, v_row, v_col, v, param, step):
        dtype = param.dtype
        decay = decay_rate_fn(step - step_offset, decay_rate)
        dims = factorized._factored_dims(param.shape, factored, min_dim)
        grad_sqr = jnp.abs(grad) ** 2 + epsilon
        if dims is not None:
            d1, d0 = dims
            new_row = (decay * v_row + (1.0 - decay) * jnp.mean(grad_sqr, axis=d0)).astype(dtype)
            new_col = (decay * v_col + (1.0 - decay) * jnp.mean(grad_sqr, axis=d1)).astype(dtype)
            reduced_d1 = d1 - 1 if d1 > d0 else d1
            row_col_mean = jnp.mean(new_row, axis=reduced_d1, keepdims=True)
            row_factor = _inv_sqrt(_div(new_row, row_col_mean))
            col_factor = _inv_sqrt(new_col)
            return (
                grad * jnp.expand_dims(row_factor, axis=d0) * jnp.expand_dims(col_factor, axis=d1)
            )
        new_v = (decay * v + (1.0 - decay) * grad_sqr).astype(dtype)
        return grad * _inv_sqrt(new_v)

    def rule(g, state, params, w):
        def leaf(gi, v_row, v_col, v, pi):
            return leaf_update(gi, v_row, v_col, v, pi, state.count)

        def update(x):
            return jax.tree.map(leaf, x, state.v_row, state.v_col, state.v, params)

        out, pullback = jax.vjp(update, g)
        return pullback(jax.tree.map(lambda wi, oi: jnp.asarray(wi, oi.dtype), w, out))[0]

    return rule


def _muon_slope_at_zero(cells, ns_coeffs, dtype):
    """Slope ``k`` of muon's orthogonalisation at a zero matrix, where it is ``k·X + O(‖X‖²)``.

    Each Newton–Schulz step ``c₀X + c₁(XXᵀ)X + c₂(XXᵀ)²X`` has slope ``c₀`` at 0; the
    preconditioning ``X/(‖X‖+ε)`` ('frobenius', 'spectral') has slope ``1/ε``; the
    Schatten-4 first step rescales by ``1/√ε₄`` (ε₄ the clip of that step, 1e-8 in optax);
    AOL needs no limit (autodiff is finite there). ``adaptive=True`` multiplies by
    ``⟨μ̂, O(μ̂)⟩``, which is quadratic, so the slope is 0.
    """
    from optax.contrib import _muon  # the private helpers scale_by_muon calls

    coeffs = jnp.asarray(ns_coeffs, dtype)
    if coeffs.ndim == 1:
        gain = coeffs[0] ** jnp.asarray(cells["ns_steps"], dtype)
    else:
        gain = jnp.prod(coeffs[:, 0])
    pre = cells["preconditioning"]
    if pre in ("frobenius", "spectral"):
        gain = gain / cells["eps"]
    elif pre == "schatten":
        import inspect

        eps4 = inspect.signature(_muon._schatten_first_newton_schulz_iteration).parameters["eps"]
        gain = gain / jnp.sqrt(jnp.asarray(eps4.default, dtype))
    return jnp.zeros((), dtype) if cells["adaptive"] else gain


_MUON_HOW = "jax.vjp, closed-form limit at a zero matrix"


def _muon_rule(cells, update_fn):
    r"""Jacobian of ``optax.contrib.scale_by_muon`` (Newton–Schulz orthogonalised momentum).

    ``jax.vjp`` of optax's own update, except on a matrix whose bias-corrected momentum
    ``μ̂`` is exactly zero (an unused weight matrix): there autodiff differentiates
    ``‖μ̂‖`` at 0 and gives NaN, while the update is ``k·μ̂ + O(‖μ̂‖²)`` with ``k`` from
    :func:`_muon_slope_at_zero`, so the Jacobian is ``k·∂μ̂/∂g·I`` with
    ``∂μ̂/∂g = (1−β)/(1−βᶜ)``, plus ``β(1−β)/(1−βᶜ⁺¹)`` with Nesterov (``c`` the new count).
    """
    beta, nesterov = cells["beta"], cells["nesterov"]

    def rule(g, state, params, w):
        out, pullback = jax.vjp(lambda x: update_fn(x, state, params)[0], g)
        vjp = pullback(jax.tree.map(lambda wi, oi: jnp.asarray(wi, oi.dtype), w, out))[0]
        c = optax.safe_increment(state.count)

        def leaf(gi, mi, vi, wi):
            dtype = vi.dtype
            mu = beta * mi + (1 - beta) * gi
            mu_hat = mu / (1 - beta**c)
            dmu = (1 - beta) / (1 - beta**c)
            if nesterov:
                mu_hat = beta * mu / (1 - beta ** (c + 1)) + (1 - beta) * gi / (1 - beta**c)
                dmu = dmu + beta * (1 - beta) / (1 - beta ** (c + 1))
            k = (dmu * _muon_slope_at_zero(cells, state.ns_coeffs, dtype)).astype(dtype)
            limit = (k * wi).astype(dtype)
            return jnp.where((mu_hat == 0) & ~jnp.isfinite(vi), limit, vi)

        return jax.tree.map(leaf, g, state.mu, vjp, w)

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
    "clip_by_block_rms": (_block_rms_rule, ("threshold",)),
    "scale_by_novograd": (_novograd_rule, ("update_nu", "init_mu")),
    "scale_by_param_block_rms": (_param_block_rms_rule, ("min_scale",)),
    "scale_by_muon": (
        _muon_rule,
        ("beta", "eps", "nesterov", "ns_steps", "preconditioning", "adaptive"),
    ),
    "scale_by_factored_rms": (
        _factored_rms_rule,
        (
            "decay_rate_fn",
            "decay_rate",
            "step_offset",
            "factored",
            "min_dim_size_to_factor",
            "epsilon",
        ),
    ),
}

# --------------------------------------------------------------------------- rewinding
# The state before an update, recovered from the state after it and the gradient: the
# moment updates m' = β m + (1 − β) f(g) are solved for m (same arithmetic as optax's
# update, so a zero moment is recovered as exactly zero), and counts step back by one.


def _solve_moment(new, g_term, decay):
    """``m`` from ``m' = (1 − β)·g_term + β·m`` (0 where β = 0, when ``m`` is not used)."""
    nonzero = jnp.asarray(decay) != 0
    m = (new - (1 - decay) * g_term) / jnp.where(nonzero, decay, 1)
    return jnp.where(nonzero, m, 0).astype(new.dtype)


def _count_back(count):
    return count - jnp.ones_like(count)


def _adam_unstep(cells):
    b1, b2 = cells["b1"], cells["b2"]

    def unstep(g, state):
        mu = jax.tree.map(lambda gi, mi: _solve_moment(mi, gi, b1), g, state.mu)
        # a second moment is never negative; rounding may leave −ulp where it was 0
        nu = jax.tree.map(lambda gi, ni: jnp.maximum(_solve_moment(ni, gi**2, b2), 0), g, state.nu)
        return state._replace(count=_count_back(state.count), mu=mu, nu=nu)

    return unstep


def _rms_unstep(cells):
    decay = cells["decay"]

    def unstep(g, state):
        nu = jax.tree.map(
            lambda gi, ni: jnp.maximum(_solve_moment(ni, gi**2, decay), 0), g, state.nu
        )
        if "count" in state._fields:
            return state._replace(count=_count_back(state.count), nu=nu)
        return state._replace(nu=nu)

    return unstep


def _rss_unstep(cells):
    def unstep(g, state):
        s = jax.tree.map(lambda gi, si: jnp.maximum(si - gi**2, 0), g, state.sum_of_squares)
        return state._replace(sum_of_squares=s)

    return unstep


def _trace_unstep(cells):
    decay = cells["decay"]

    def unstep(g, state):
        # t' = g + β t  →  t = (t' − g)/β
        nonzero = jnp.asarray(decay) != 0

        def leaf(gi, ti):
            t = (ti - gi) / jnp.where(nonzero, decay, 1)
            return jnp.where(nonzero, t, 0).astype(ti.dtype)

        return state._replace(trace=jax.tree.map(leaf, g, state.trace))

    return unstep


def _schedule_unstep(cells):
    return lambda g, state: state._replace(count=_count_back(state.count))


# name -> (factory(cells) -> unstep(g, state), whether unstep reads g)
_UNSTEPS: dict[str, tuple[Callable, bool]] = {
    "scale_by_adam": (_adam_unstep, True),
    "scale_by_rms": (_rms_unstep, True),
    "scale_by_rss": (_rss_unstep, True),
    "trace": (_trace_unstep, True),
    "scale_by_schedule": (_schedule_unstep, False),
}

# rules whose output reads the parameters
_READS_PARAMS = frozenset({"add_decayed_weights", "scale_by_param_block_rms"})

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
    owner = getattr(update_fn, "__self__", None)
    if isinstance(owner, optax.MultiSteps):
        return _MultiSteps("MultiSteps", update_fn, inner=_parse(owner.inner_opt.update), ms=owner)
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
    if name == "apply_if_finite" and {"inner", "max_consecutive_errors"} <= cells.keys():
        return _IfFinite(
            name,
            update_fn,
            inner=_parse(cells["inner"].update),
            max_errors=cells["max_consecutive_errors"],
        )
    if name == "partition" and {"transforms", "param_labels"} <= cells.keys():
        groups = tuple((k, _parse(t.update)) for k, t in cells["transforms"].items())
        return _Partition(name, update_fn, labels=cells["param_labels"], groups=groups)
    if name == "lookahead" and {"fast_optimizer", "sync_period", "slow_step_size"} <= cells.keys():
        return _Lookahead(
            name,
            update_fn,
            inner=_parse(cells["fast_optimizer"].update),
            sync_period=cells["sync_period"],
            slow_step_size=cells["slow_step_size"],
        )
    if (
        name == "schedule_free"
        and {
            "base_optimizer",
            "learning_rate",
            "b1",
            "weight_lr_power",
        }
        <= cells.keys()
    ):
        inner = _parse(cells["base_optimizer"].update)
        return _ScheduleFree(name, update_fn, inner=inner, cells=cells)
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
            if factory is _muon_rule:  # autodiff of optax's own update, with a limit at 0
                return _Rule(name, update_fn, rule=_muon_rule(cells, update_fn), how=_MUON_HOW)
            unstep, reads_grad = None, True
            if name in _UNSTEPS:
                unstep_factory, reads_grad = _UNSTEPS[name]
                unstep = unstep_factory(cells)
            return _Rule(
                name,
                update_fn,
                rule=factory(cells),
                unstep=unstep,
                unstep_reads_grad=reads_grad,
            )
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
        ``params`` and ``state`` do not belong together, or for an unknown ``rule``;
        for ``optax.lookahead``, if ``params`` is not an ``optax.LookaheadParams``.

    Wrappers (``apply_if_finite``, ``partition``, ``MultiSteps``, ``lookahead``,
    ``schedule_free``) are walked as the module docstring says. ``rule="vjp"`` stays
    the literal derivative: 0 on a ``MultiSteps`` mini-step that does not update.

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
    if _is_lookahead(tx):
        return _adapt_lookahead(tx, d, grads=grads, state=state, params=params, rule=rule)
    _checks.same_structure(params=params, grads=grads, d=d)
    _checks.opt_state_matches(tx, state, params)
    if rule == "vjp":
        node: _Node = _Fallback(_transform_name(tx.update), tx.update)
    else:
        node = _parse(tx.update)
    # u = -Δ, so J_uᵀ d = J_Δᵀ (−d): one negation of the cotangent.
    return node.vjp(grads, state, params, _negate(d))


def rewind(
    tx: optax.GradientTransformation,
    grads: PyTree,
    state: optax.OptState,
    params: PyTree,
) -> optax.OptState:
    r"""The optimizer state *before* the update that took ``grads`` to ``state``.

    SAMA's ``adapt_from="last"`` takes the adaptation matrix at the last base step's
    gradient ``g`` and pre-update state. Instead of keeping the pre-update state alive until
    the meta step (for Adam two θ-sized buffers), the training loop keeps only ``g`` and
    recovers the state by solving optax's moment updates (the reference implementation of
    SAMA does the same): for ``scale_by_adam``

        m = (m' − (1−β₁)g)/β₁,    ν = max((ν' − (1−β₂)g²)/β₂, 0),    t = t' − 1,

    likewise ``scale_by_rms`` (ν), ``scale_by_rss`` (S = S' − g²), ``trace``
    (t = (t' − g)/β) and ``scale_by_schedule`` (the count); stateless transforms are
    unchanged; ``chain``, ``masked`` and ``partition`` are walked. The products are computed
    as optax computes them, so a moment that was zero (the first step; a leaf no gradient had
    reached) is recovered as exactly zero; elsewhere the recovered moments carry float32
    rounding of the subtraction (``tests/test_rewind.py`` measures the adapted direction
    against the exact VJP at the true state).

    Args:
      tx: the optimizer.
      grads: the gradient of the update.
      state: ``tx``'s state after the update.
      params: the parameters after the update (read by transforms such as
        ``add_decayed_weights`` on the way to the next transform).

    Returns:
      The pre-update state, with the structure of ``state``.

    Raises:
      AdaptationError: for a transform whose state cannot be recovered exactly (any other
        stateful transform; a state stored below float32, whose rounding cannot be undone;
        a stateful transform whose input depends on the pre-update parameters, such as
        ``chain(add_decayed_weights, scale_by_adam)``; ``lookahead``), naming it.
        :func:`can_rewind` asks without raising.

    Example (Adam after one step from a zero state):
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx, p, g = optax.adam(0.1), jnp.zeros(2), jnp.array([1.0, -2.0])
      >>> s0 = tx.init(p)
      >>> _, s1 = tx.update(g, s0, p)
      >>> back = rewind(tx, g, s1, p)
      >>> print(back[0].count, back[0].mu, back[0].nu)
      0 [0. 0.] [0. 0.]
    """
    if _is_lookahead(tx):
        raise AdaptationError("optax.lookahead's state cannot be rewound (its sync step)")
    _checks.same_structure(params=params, grads=grads)
    _checks.opt_state_matches(tx, state, params)
    for leaf in jax.tree.leaves(state):
        dtype = jnp.asarray(leaf).dtype
        if jnp.issubdtype(dtype, jnp.complexfloating) or (
            jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32
        ):
            raise AdaptationError(
                f"the optimizer state holds a {dtype} leaf: its rounding cannot be undone, "
                f"so the pre-update state cannot be recovered exactly (keep it instead)"
            )
    return _parse(tx.update).rewind(grads, state, params)


def can_rewind(tx: optax.GradientTransformation, state: optax.OptState, params: PyTree) -> bool:
    """Whether :func:`rewind` can recover ``tx``'s pre-update state (decided at trace time).

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> p = jnp.zeros(2)
      >>> can_rewind(optax.adam(1e-3), optax.adam(1e-3).init(p), p)
      True
      >>> tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(1e-3))
      >>> can_rewind(tx, tx.init(p), p)  # Adam's input reads the pre-update θ
      False
    """
    try:
        jax.eval_shape(lambda g, s, p: rewind(tx, g, s, p), params, state, params)
    except AdaptationError:
        return False
    return True


def _is_lookahead(tx) -> bool:
    fn = getattr(tx, "update", None)
    module = getattr(fn, "__module__", "") or ""
    return module.startswith("optax") and _transform_name(fn) == "lookahead"


def _lookahead_params_error(params) -> AdaptationError:
    return AdaptationError(
        "optax.lookahead keeps fast and slow parameters: the base parameters must be an "
        f"optax.LookaheadParams(fast=..., slow=...), got {type(params).__name__}. Start from "
        "optax.LookaheadParams.init_synced(params) and let the base loss read params.fast "
        "(the gradient is taken with respect to the fast parameters)."
    )


def lookahead_fast_grad(tx, grads: PyTree, params: PyTree) -> PyTree:
    """The gradient ``tx.update`` expects: the fast part for ``optax.lookahead``, else ``grads``.

    With ``θ = LookaheadParams(fast, slow)`` autodiff gives a gradient of the same
    structure (zero slow part); optax's lookahead wants the fast gradient only.

    Example:
      >>> import jax.numpy as jnp
      >>> import optax
      >>> tx = optax.lookahead(optax.sgd(0.1), 2, 0.5)
      >>> th = optax.LookaheadParams.init_synced(jnp.ones(2))
      >>> print(lookahead_fast_grad(tx, th, th))
      [1. 1.]
    """
    if not _is_lookahead(tx):
        return grads
    if not isinstance(params, optax.LookaheadParams):
        raise _lookahead_params_error(params)
    if isinstance(grads, optax.LookaheadParams):
        return grads.fast
    return grads


def _adapt_lookahead(tx, d, *, grads, state, params, rule):
    """``adapt`` for ``optax.lookahead``: ``v`` is shaped like θ, zero on the slow part."""
    g = lookahead_fast_grad(tx, grads, params)
    _checks.same_structure(params=params, d=d)
    try:
        _checks.same_structure(fast_params=params.fast, grads=g)
    except _checks.BilevelInputError as e:
        raise AdaptationError(
            "optax.lookahead takes the gradient with respect to the fast parameters: grads "
            "must have the structure of params.fast (or of the LookaheadParams, whose slow "
            f"part is ignored). {e}"
        ) from e
    _checks.opt_state_matches(tx, state, params)
    node = _Fallback("lookahead", tx.update) if rule == "vjp" else _parse(tx.update)
    v_fast = node.vjp(g, state, params, _negate(d))
    return optax.LookaheadParams(fast=v_fast, slow=jax.tree.map(jnp.zeros_like, d.slow))


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
      >>> describe(optax.apply_if_finite(optax.sgd(1e-3), 5))
      'apply_if_finite(chain(identity: closed form, scale: closed form))'
    """
    return _parse(tx.update).describe(state)
