"""The interface shared by every hypergradient method.

A *problem* is the pair of losses and the base optimizer:

    base_loss(base_params, meta_params, batch) -> scalar      L_b(θ, λ; B)
    meta_loss(base_params, meta_params, batch) -> scalar      L_m(θ, λ; B')

A *method* (SAMA, SAMA-NA, …) is a frozen keyword-only dataclass with optax-style
``init(base_params, meta_params) -> state`` and
``hypergrad(problem, inputs, state) -> (Hypergrad, state)``; both are pure and
jit-able, and any state a method keeps across meta steps is explicit. Every attribute
that callers (the bilevel loop, :func:`bilevel_jax.meta_grad`, the studies) read is
declared by :class:`HypergradMethod`; the ``repr`` of a method reads like its
constructor call and is deterministic, so results can record ``repr(method)``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax

from bilevel_jax import _checks

PyTree = Any
Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]


@dataclasses.dataclass(frozen=True)
class BilevelProblem:
    """The static part of a bilevel problem: both losses and the base optimizer.

    Attributes:
      base_loss: ``L_b(θ, λ, batch) -> scalar``, the training loss shaped by λ.
      meta_loss: ``L_m(θ, λ, batch) -> scalar``, the clean/target objective.
      base_tx: the optax transform that trains θ on ``base_loss``.

    Example:
      >>> import optax
      >>> loss = lambda th, lam, batch: jnp.sum((th - lam) ** 2)
      >>> problem = BilevelProblem(loss, loss, optax.sgd(0.1))
      >>> problem.base_tx is not None
      True
    """

    base_loss: Loss
    meta_loss: Loss
    base_tx: optax.GradientTransformation


class BilevelInputs(NamedTuple):
    """The dynamic inputs of one meta step.

    Attributes:
      base_params: θ, the current base parameters.
      meta_params: λ, the meta parameters.
      base_opt_state: the base optimizer state at θ.
      base_batch: the base batch B of the last base step (used by finite differences).
      meta_batch: the meta batch B'.
      last_grad: optional gradient of the last base step (SAMA ``adapt_from="last"``).
      last_opt_state: optional base optimizer state before the last base step.

    Example:
      >>> import optax
      >>> th, lam = jnp.zeros(2), jnp.ones(2)
      >>> inputs = BilevelInputs(th, lam, optax.sgd(0.1).init(th), None, None)
      >>> inputs.last_grad is None
      True
    """

    base_params: PyTree
    meta_params: PyTree
    base_opt_state: optax.OptState
    base_batch: PyTree
    meta_batch: PyTree
    last_grad: PyTree | None = None
    last_opt_state: optax.OptState | None = None


class Hypergrad(NamedTuple):
    """What a method returns for one meta step.

    Attributes:
      meta_grad: the estimate of dL_m(θ*(λ), λ)/dλ, a pytree like λ.
      base_update: an update for θ (SAMA's base step along v, ``-εv``), or None.
      meta_loss: L_m at the current θ on the meta batch.
      finite: True when ``meta_grad`` (and ``base_update``) hold no NaN/inf.
      info: method diagnostics (for SAMA: ``eps`` and ``v_norm``).

    Example:
      >>> import optax
      >>> import bilevel_jax as bj
      >>> loss = lambda th, lam, batch: jnp.sum((th - lam) ** 2)
      >>> problem = bj.BilevelProblem(loss, loss, optax.sgd(0.1))
      >>> th, lam = jnp.zeros(2), jnp.ones(2)
      >>> inputs = bj.BilevelInputs(th, lam, optax.sgd(0.1).init(th), None, None)
      >>> hg, _ = bj.sama().hypergrad(problem, inputs, None)
      >>> hg.meta_grad.shape, bool(hg.finite), sorted(hg.info), hg.base_update
      ((2,), True, ['eps', 'v_norm'], None)
    """

    meta_grad: PyTree
    base_update: PyTree | None
    meta_loss: jax.Array
    finite: jax.Array
    info: dict


@runtime_checkable
class HypergradMethod(Protocol):
    """A hypergradient method: everything the bilevel loop and :func:`~bilevel_jax.meta_grad` use.

    Attributes:
      name: a short name (``"sama"``, ``"cg"``, …) used in messages and logs.
      info_keys: the keys of :attr:`Hypergrad.info` this method fills (diagnostics).
      step_along_v: the method returns :attr:`Hypergrad.base_update` and the caller must
        apply it to θ after the meta update (SAMA's base step along v; False elsewhere).
      supports_exact_sync: :meth:`synced` is available (data parallelism that reproduces
        the full-batch result; SAMA-type methods only).
      uses_last_step: optional; True when :meth:`hypergrad` reads ``inputs.last_grad`` and
        ``inputs.last_opt_state`` (SAMA's ``adapt_from="last"``). The bilevel loop passes
        None for both to a method that says False, and carries nothing for them through the
        base steps; a method without the attribute is given them.

    Methods:
      synced(axis_name): a copy that averages d = ∇_θL_m, ∇_λL_m and the fresh gradient over
        the device axis ``axis_name`` (inside ``shard_map``/``pmap``); raises ValueError naming
        the method when ``supports_exact_sync`` is False.
      init(base_params, meta_params): the state the method keeps across meta steps.
      hypergrad(problem, inputs, state): ``(Hypergrad, new_state)`` for one meta step.

    Example:
      >>> import bilevel_jax as bj
      >>> m = bj.sama()
      >>> isinstance(m, bj.HypergradMethod), m.name, m.info_keys, m.step_along_v
      (True, 'sama', ('eps', 'v_norm'), False)
      >>> bj.cg().supports_exact_sync, bj.sama().synced("data").axis_name
      (False, 'data')
    """

    @property
    def name(self) -> str: ...

    @property
    def info_keys(self) -> tuple[str, ...]: ...

    @property
    def step_along_v(self) -> bool: ...

    @property
    def supports_exact_sync(self) -> bool: ...

    def synced(self, axis_name: str) -> HypergradMethod: ...

    def init(self, base_params: PyTree, meta_params: PyTree) -> PyTree: ...

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: PyTree
    ) -> tuple[Hypergrad, PyTree]: ...


def _value_key(x: Any) -> Any:
    if isinstance(x, functools.partial):
        kw = tuple(sorted((k, _value_key(v)) for k, v in x.keywords.items()))
        return ("partial", _value_key(x.func), tuple(map(_value_key, x.args)), kw)
    return x


class MethodBase:
    """Defaults of the :class:`HypergradMethod` contract shared by the built-in methods.

    Subclasses are frozen keyword-only dataclasses declared with ``repr=False, eq=False`` so
    that this ``__repr__`` (the constructor call with every field, callables by name) and
    value equality/hash (two ``cg(5)`` are equal, although each holds its own
    ``functools.partial``) are used.

    Example:
      >>> import bilevel_jax as bj
      >>> bj.cg(5)
      Implicit(solver=partial(solve_cg, maxiter=5, damping=0.0), warm_start=False, name='cg')
      >>> bj.itd(3).step_along_v, bj.itd(3).supports_exact_sync
      (False, False)
    """

    info_keys: tuple[str, ...] = ()
    step_along_v: bool = False
    supports_exact_sync: bool = False
    uses_last_step: bool = False
    name: str

    def synced(self, axis_name: str) -> Any:
        """Raise: only methods with ``supports_exact_sync`` can synchronise exactly."""
        raise ValueError(
            f"{self.name} cannot reproduce the full-batch result under data parallelism "
            f"(axis {axis_name!r}); exact synchronisation (sync='full_batch') is implemented for "
            "SAMA-type methods (sama, sama_na, darts). Use the default sync='mean' (the mean "
            "of the per-device estimates)."
        )

    def _key(self) -> tuple:
        """The settings, with ``functools.partial`` solvers compared by function and keywords."""
        return tuple(_value_key(getattr(self, f.name)) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._key() == self._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        try:
            return hash((type(self), self._key()))
        except TypeError:  # an unhashable setting (e.g. an array bound to a solver)
            return hash((type(self), repr(self)))

    def __repr__(self) -> str:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        args = ", ".join(
            f"{f.name}={_checks.callable_repr(getattr(self, f.name))}" for f in fields if f.repr
        )
        return f"{type(self).__name__}({args})"


def all_finite(*trees: PyTree) -> jax.Array:
    """True when every floating leaf of every tree is finite (None trees are skipped)."""
    leaves = [x for t in trees if t is not None for x in jax.tree.leaves(t)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _wide(x: jax.Array) -> jax.Array:
    """Cast to float32 or wider (bf16/f16 → f32; f32/f64 unchanged)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_problem(problem: BilevelProblem, inputs: BilevelInputs) -> None:
    """Trace-time checks shared by all methods: scalar losses and a matching optimizer state."""
    _checks.scalar_loss(
        problem.base_loss, "base_loss", inputs.base_params, inputs.meta_params, inputs.base_batch
    )
    _checks.scalar_loss(
        problem.meta_loss, "meta_loss", inputs.base_params, inputs.meta_params, inputs.meta_batch
    )
    _checks.opt_state_matches(problem.base_tx, inputs.base_opt_state, inputs.base_params)


def meta_value_and_grads(problem: BilevelProblem, inputs: BilevelInputs):
    """``(L_m, d = ∇_θ L_m, ∇_λ L_m)`` at the current θ on the meta batch."""
    value, (d, direct) = jax.value_and_grad(problem.meta_loss, argnums=(0, 1))(
        inputs.base_params, inputs.meta_params, inputs.meta_batch
    )
    return value, d, direct


def mixed_product(problem: BilevelProblem, inputs: BilevelInputs, p: PyTree) -> PyTree:
    r"""``(∂²L_b/∂λ∂θ) p = ∂/∂t ∇_λ L_b(θ + t p, λ; B)|_{t=0}`` by forward-over-reverse."""
    grad_meta = jax.grad(problem.base_loss, argnums=1)
    return jax.jvp(
        lambda th: grad_meta(th, inputs.meta_params, inputs.base_batch),
        (inputs.base_params,),
        (p,),
    )[1]


def base_hvp(problem: BilevelProblem, inputs: BilevelInputs):
    """The matvec ``v ↦ ∇²_θ L_b(θ, λ; B) v`` (forward-over-reverse)."""
    grad_base = jax.grad(problem.base_loss)

    def matvec(v):
        return jax.jvp(
            lambda th: grad_base(th, inputs.meta_params, inputs.base_batch),
            (inputs.base_params,),
            (v,),
        )[1]

    return matvec


def assemble(
    meta_params: PyTree,
    direct: PyTree | None,
    h: PyTree,
    meta_loss: jax.Array,
    *,
    base_update: PyTree | None = None,
    info: dict | None = None,
) -> Hypergrad:
    """``Hypergrad`` with ``meta_grad = ∇_λ L_m + h`` in λ's dtype (sum in float32 or wider)."""

    def combine(hi, lam, di=None):
        out = _wide(hi) if di is None else _wide(hi) + _wide(di)
        return out.astype(lam.dtype)

    if direct is None:
        meta_grad = jax.tree.map(combine, h, meta_params)
    else:
        meta_grad = jax.tree.map(combine, h, meta_params, direct)
    return Hypergrad(
        meta_grad=meta_grad,
        base_update=base_update,
        meta_loss=meta_loss,
        finite=all_finite(meta_grad, base_update),
        info=info or {},
    )


def needs_base_params(method_name: str, base_params: PyTree | None) -> None:
    """Raise a clear error when a method with θ-shaped state is initialised without θ."""
    if base_params is None:
        raise ValueError(
            f"{method_name} keeps θ-shaped state across meta steps, so it needs the base "
            "parameters (or a template of them) at init: method.init(base_params, meta_params), "
            "or bilevel_jax.meta_grad(..., base_params=θ)."
        )


def wide_norm(tree: PyTree) -> jax.Array:
    """Global 2-norm over all leaves, accumulated in float32 or wider."""
    leaves = [jnp.sum(jnp.square(_wide(x))) for x in jax.tree.leaves(tree)]
    return jnp.sqrt(sum(leaves)) if leaves else jnp.asarray(0.0, jnp.float32)


def forward_mixed_product(
    base_loss: Loss,
    theta: PyTree,
    lam: PyTree,
    batch: PyTree,
    v: PyTree,
    alpha,
):
    r"""``h = −∂/∂t ∇_λL_b(θ + t v, λ)|_{t=0} = −(∂²L_b/∂λ∂θ) v`` by ``jax.jvp``, no ε.

    Forward-over-reverse: one JVP of the λ-gradient at θ along ``2⁻ᵉv`` with ``2ᵉ ≈ ‖v‖`` (a
    power of two, so the rescaling is exact and the tangent is O(1) in any dtype the loss
    casts to), scaled back by ``2ᵉ``. It is exact up to rounding, nothing is subtracted (no cancellation in
    float32 or bf16), and it is the derivative of the loss as written: a ``stop_gradient`` inside
    ``base_loss`` blocks the θ-tangent as it blocks ∇_θ, whereas :func:`central_difference`
    evaluates ∇_λL_b at θ ± εv and so differentiates through it (``docs/math.md``, section 5).
    θ and v enter in float32 or wider, as in :func:`central_difference`. ``ε = α/‖v‖`` is
    returned for SAMA's base step along v (``−εv``) only; h does not depend on α. ``‖v‖ = 0``
    gives ``h = 0``; a NaN v propagates. Returns ``(h, eps, v_norm)`` like
    :func:`central_difference`.

    >>> loss = lambda th, lam, b: jnp.sum(lam * jnp.sin(th))
    >>> th, lam, v = jnp.array([0.0, 1.0]), jnp.array([2.0, 3.0]), jnp.array([1.0, 1.0])
    >>> h, eps, v_norm = forward_mixed_product(loss, th, lam, None, v, 1.0)
    >>> print(h, jnp.allclose(h, -jnp.cos(th) * v))
    [-1.        -0.5403023] True
    """
    v_norm = wide_norm(v)
    nonzero = v_norm != 0  # NaN counts as nonzero so that it propagates and is flagged
    eps = jnp.where(nonzero, alpha / jnp.where(nonzero, v_norm, 1.0), 0.0)
    _, e = jnp.frexp(v_norm)  # ‖v‖ = m·2ᵉ with m in [0.5, 1); e = 0 for 0, inf and NaN
    primal = jax.tree.map(_wide, theta)
    tangent = jax.tree.map(lambda p, vi: jnp.ldexp(_wide(vi), -e).astype(p.dtype), primal, v)
    grad_meta = jax.grad(base_loss, argnums=1)
    _, jv = jax.jvp(lambda th: grad_meta(th, lam, batch), (primal,), (tangent,))
    h = jax.tree.map(lambda x: jnp.where(nonzero, -jnp.ldexp(_wide(x), e), 0.0), jv)
    return h, eps, v_norm


def central_difference(
    base_loss: Loss,
    theta: PyTree,
    lam: PyTree,
    batch: PyTree,
    v: PyTree,
    alpha,
    *,
    difference: str = "sequential",
):
    r"""``h = −[∇_λL_b(θ+εv, λ) − ∇_λL_b(θ−εv, λ)]/(2ε)`` with ``ε = α/‖v‖``.

    ``h ≈ −(∂²L_b/∂λ∂θ) v`` with O(ε²) error. ‖v‖, ε, the perturbed parameters and the
    difference are computed in float32 or wider. ``‖v‖ = 0`` gives exactly ``h = 0`` (the two
    evaluations coincide, though batched kernels may round them differently); a NaN ``v``
    propagates. ``difference="sequential"`` evaluates the two gradients one after the
    other (one θ-sized buffer for both points), ``"vmap"`` in one batched pass. Returns
    ``(h, eps, v_norm)``.
    """
    v_norm = wide_norm(v)
    nonzero = v_norm != 0  # NaN counts as nonzero so that it propagates and is flagged
    eps = jnp.where(nonzero, alpha / jnp.where(nonzero, v_norm, 1.0), 0.0)
    grad_meta = jax.grad(base_loss, argnums=1)

    def grad_at(sign):
        shifted = jax.tree.map(lambda t, vi: _wide(t) + sign * eps * _wide(vi), theta, v)
        return jax.tree.map(_wide, grad_meta(shifted, lam, batch))

    if difference == "vmap":
        stacked = jax.vmap(grad_at)(jnp.array([1.0, -1.0], eps.dtype))
        g_plus = jax.tree.map(lambda x: x[0], stacked)
        g_minus = jax.tree.map(lambda x: x[1], stacked)
    else:
        # One θ-sized buffer for both points: θ+εv is written over v (when v is not needed
        # afterwards), and θ−εv is formed as 2θ − (θ+εv) over θ+εv once the "+" pass is done
        # (the barrier orders it). 2θ − (θ+εv) rounds like θ − εv (to ulp(θ)), so the
        # difference keeps its accuracy; the peak memory of the meta step drops by one to two
        # θ-sized buffers (experiments/benchmark.py).
        plus = jax.tree.map(lambda t, vi: _wide(t) + eps * _wide(vi), theta, v)
        g_plus = jax.tree.map(_wide, grad_meta(plus, lam, batch))
        g_plus, plus = jax.lax.optimization_barrier((g_plus, plus))
        minus = jax.tree.map(lambda t, p: 2 * _wide(t) - p, theta, plus)
        g_minus = jax.tree.map(_wide, grad_meta(minus, lam, batch))
    denom = jnp.where(nonzero, 2.0 * eps, 1.0)
    h = jax.tree.map(lambda a, b: jnp.where(nonzero, -(a - b) / denom, 0.0), g_plus, g_minus)
    return h, eps, v_norm
