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

**Gradient alignment** (``dds(lr=0.0)``, the ρ → 0 limit of DDS with ``lr = ρ``): write
``h(ρ) = ∇_λ L_m(θ − ρ g(λ), λ)`` with ``g = ∇_θ L_b`` and ``d = ∇_θ L_m``. Then
``h(0) = ∇_λ L_m`` (the direct term) and

    h'(0) = −∇_λ ⟨∇_θL_m(θ, λ), ∇_θL_b(θ, λ)⟩ = −(∂²L_b/∂λ∂θ) d − (∂²L_m/∂λ∂θ) g,

the gradient of the (negated) alignment of the meta and base gradients (the second term
vanishes when L_m does not read λ). ``dds(lr=0.0)`` returns ``h(0) + h'(0)``, so that
``dds(lr=ρ) = ∇_λL_m + ρ·(dds(0) − ∇_λL_m) + O(ρ²)``: the look-ahead direction with the
step scale divided out. For per-example weights, ``L_b = Σ_x w(x; λ) ℓ(x; θ)`` and a
λ-free L_m, it is ``−Σ_x ⟨∇_θℓ(x), d⟩ ∇_λ w(x)``: descent raises the weight of examples
whose gradient aligns with the meta gradient (Wang et al. 2020; Grangier et al.,
arXiv:2311.11973). It is computed exactly, as ``h(0)`` and ``h'(0)`` by one ``jax.jvp`` in ρ
of the look-ahead λ-gradient, not by a difference.

Differentiating *through* Adam-type optimizers needs ``eps_root > 0`` (e.g.
``optax.adam(lr, eps_root=1e-8)``): the derivative of ``√n`` at n = 0 is infinite
and turns the hypergradient into NaN at zero gradients (``docs/precision.md``).

**Optimizer hyperparameters as meta parameters** (hypergradient descent; Maclaurin et al.
2015, Baydin et al. 2018): build the base optimizer with ``optax.inject_hyperparams`` and
give the method a mapping from hyperparameter names to entries of λ,
``itd(K, hyperparams={"learning_rate": "lr"})`` (or to functions of λ, e.g.
``{"learning_rate": lambda lam: jnp.exp(lam["log_lr"])}``). Before every unrolled step the
method writes those values into the ``inject_hyperparams`` state (:func:`set_hyperparams`),
so ``θ_K`` — and the hypergradient — depend on them. :meth:`Unrolled.write_hyperparams` does
the same for the base steps that train θ (``bilevel_step`` calls it before each base step).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bilevel_jax import _checks
from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    MethodBase,
    PyTree,
    assemble,
    check_problem,
)

__all__ = ["Unrolled", "itd", "dds", "set_hyperparams"]

_INJECT = (optax.InjectStatefulHyperparamsState, optax.InjectHyperparamsState)


def _is_inject(x: Any) -> bool:
    return isinstance(x, _INJECT)


def set_hyperparams(opt_state: optax.OptState, values: Mapping[str, Any]) -> optax.OptState:
    """``opt_state`` with the ``optax.inject_hyperparams`` entries ``values`` written into it.

    The next ``tx.update`` uses the written values, and the write is differentiable: a
    gradient through the update reaches them. Each name must be a numeric hyperparameter of
    exactly one ``inject_hyperparams`` state inside ``opt_state`` (which may be a chain);
    values keep the stored entry's dtype and must have its shape.

    Raises:
      ValueError: no ``inject_hyperparams`` state, an unknown or ambiguous name, a
        hyperparameter driven by a schedule (optax recomputes it at every step), or a
        value of the wrong shape.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> theta = jnp.ones(2)
      >>> def moved(lr):  # θ after one step with learning rate lr, differentiably
      ...     s = set_hyperparams(tx.init(theta), {"learning_rate": lr})
      ...     return tx.update(jnp.ones(2), s)[0].sum()
      >>> moved(0.5), jax.grad(moved)(0.5)  # −2 lr and its derivative −2
      (Array(-1., dtype=float32), Array(-2., dtype=float32, weak_type=True))
    """
    nodes = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_inject) if _is_inject(n)]
    if not nodes:
        raise ValueError(
            f"set_hyperparams: the optimizer state has no optax.inject_hyperparams state, so "
            f"{sorted(values)} cannot be set. Build the optimizer with it, e.g. "
            "optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)."
        )
    for name in values:
        owners = [n for n in nodes if name in n.hyperparams]
        if not owners:
            known = sorted(k for n in nodes for k in n.hyperparams)
            raise ValueError(
                f"set_hyperparams: no inject_hyperparams state has a hyperparameter {name!r}; "
                f"the numeric ones are {known} (static_args and fixed arguments are not "
                "injected: pass the value to inject_hyperparams(...)(...) as a number)."
            )
        if len(owners) > 1:
            raise ValueError(
                f"set_hyperparams: {len(owners)} inject_hyperparams states have a hyperparameter "
                f"{name!r}; the name is ambiguous. Give the inner transforms distinct names "
                "(e.g. one inject_hyperparams around a factory with distinct arguments)."
            )
        if name in getattr(owners[0], "hyperparams_states", {}):
            raise ValueError(
                f"set_hyperparams: {name!r} is driven by a schedule, which optax recomputes from "
                "the step count at every update; pass a number to inject_hyperparams instead."
            )

    def write(node):
        if not _is_inject(node):
            return node
        hp = dict(node.hyperparams)
        for name, value in values.items():
            if name in hp:
                old, value = jnp.asarray(hp[name]), jnp.asarray(value)
                if value.shape != old.shape:
                    raise ValueError(
                        f"set_hyperparams: {name!r} has shape {old.shape} in the optimizer "
                        f"state, got a value of shape {value.shape}"
                    )
                hp[name] = value.astype(old.dtype)
        return node._replace(hyperparams=hp)

    return jax.tree.map(write, opt_state, is_leaf=_is_inject)


@dataclasses.dataclass(frozen=True, kw_only=True, repr=False, eq=False)
class Unrolled(MethodBase):
    """Reverse-mode differentiation through ``unroll`` base steps (see the module docstring).

    Attributes:
      unroll: number of base steps K taken from the current θ.
      truncate: differentiate only through the last ``truncate`` steps (None: all).
      stacked: ``base_batch`` has a leading axis of length K, one batch per step;
        otherwise the same batch is used for every step.
      remat: rematerialise each step in the backward pass (less memory, more compute).
      lr: if set, the unrolled step is plain SGD with this rate instead of the base optimizer;
        ``lr=0.0`` (one step only) is the gradient-alignment limit (the module docstring).
      hyperparams: optimizer hyperparameters that are meta parameters: a mapping from the
        name of a numeric ``optax.inject_hyperparams`` argument of the base optimizer to the
        key of λ (a dict) holding its value, or to a function ``λ -> value``. The values are
        written into the base optimizer state before every unrolled step
        (:func:`set_hyperparams`), so the hypergradient includes their derivative.
      name: the method's name.

    ``Hypergrad.meta_loss`` is ``L_m(θ_K)``, the meta loss after the unrolled steps.

    Example:
      >>> Unrolled(unroll=3, remat=True)
      Unrolled(unroll=3, truncate=None, stacked=False, remat=True, lr=None, name='itd')

      Learning SGD's learning rate (hypergradient descent) on ``L_b = ½‖θ − 1‖²``:
      after K = 2 steps from θ = 0, ``θ_2 = 1 − (1 − η)²``; with ``L_m = ½‖θ − 2‖²`` the
      hypergradient is ``−2(1 − η)(2 − θ_2)``, −2 · 0.8 · 1.64 = −2.624 at η = 0.2.

      >>> import jax.numpy as jnp, optax, bilevel_jax as bj
      >>> base_tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
      >>> problem = bj.BilevelProblem(lambda th, lam, b: 0.5 * jnp.sum((th - 1.0) ** 2),
      ...                             lambda th, lam, b: 0.5 * jnp.sum((th - 2.0) ** 2), base_tx)
      >>> method = bj.itd(2, hyperparams={"learning_rate": "lr"})
      >>> theta, lam = jnp.zeros(1), {"lr": jnp.asarray(0.2)}
      >>> inputs = bj.BilevelInputs(theta, lam, base_tx.init(theta), None, None)
      >>> hg, _ = method.hypergrad(problem, inputs, method.init(theta, lam))
      >>> round(float(hg.meta_grad["lr"]), 4)
      -2.624
    """

    unroll: int = 10
    truncate: int | None = None
    stacked: bool = False
    remat: bool = False
    lr: float | None = None
    hyperparams: Any = dataclasses.field(default=(), repr=False)
    name: str = "itd"

    def __post_init__(self):
        hp = self.hyperparams
        if isinstance(hp, Mapping):
            hp = tuple(sorted(hp.items()))
        elif hp is None:
            hp = ()
        elif isinstance(hp, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in hp):
            hp = tuple(sorted(hp, key=lambda p: p[0]))  # the stored form (dataclasses.replace)
        else:
            raise TypeError(
                f"{self.name}: hyperparams must be a mapping from hyperparameter names to keys "
                f"of λ or functions of λ, e.g. {{'learning_rate': 'lr'}}; got {hp!r}"
            )
        for name, spec in hp:
            if not isinstance(name, str) or not (isinstance(spec, str) or callable(spec)):
                raise TypeError(
                    f"{self.name}: hyperparams maps a hyperparameter name (str) to a key of λ "
                    f"(str) or a function of λ; got {name!r}: {spec!r}"
                )
        object.__setattr__(self, "hyperparams", hp)
        if hp and self.lr is not None:
            raise ValueError(
                f"{self.name}: lr={self.lr} replaces the base optimizer by plain SGD, which has "
                "no inject_hyperparams state to write hyperparams into; drop lr and build the "
                "base optimizer with optax.inject_hyperparams instead."
            )
        if self.unroll < 1:
            raise ValueError(f"unroll must be at least 1, got {self.unroll}")
        if self.lr is not None and self.lr == 0 and self.unroll != 1:
            raise ValueError(
                f"{self.name}: lr=0 means the gradient-alignment limit of a one-step look-ahead "
                f"(dds(lr=0.0)); it is not defined for unroll={self.unroll}. Use dds(lr=0.0), "
                "or a positive lr."
            )
        if self.truncate is not None and not 1 <= self.truncate <= self.unroll:
            raise ValueError(f"truncate must be in [1, unroll={self.unroll}], got {self.truncate}")

    def __repr__(self) -> str:
        out = super().__repr__()
        if not self.hyperparams:
            return out
        items = ", ".join(f"{k!r}: {_checks.callable_repr(v)}" for k, v in self.hyperparams)
        return f"{out[:-1]}, hyperparams={{{items}}})"

    def hyperparam_values(self, meta_params: PyTree) -> dict[str, Any]:
        """The hyperparameter values that ``hyperparams`` reads from λ (empty without it).

        >>> import jax.numpy as jnp
        >>> m = itd(2, hyperparams={"learning_rate": "lr", "momentum": lambda lam: lam["b"] ** 2})
        >>> m.hyperparam_values({"lr": 0.1, "b": 0.5})
        {'learning_rate': 0.1, 'momentum': 0.25}
        """
        out = {}
        for name, spec in self.hyperparams:
            if callable(spec):
                out[name] = spec(meta_params)
                continue
            if not isinstance(meta_params, Mapping) or spec not in meta_params:
                keys = sorted(meta_params) if isinstance(meta_params, Mapping) else None
                raise ValueError(
                    f"{self.name}: hyperparams reads {name!r} from meta_params[{spec!r}], but "
                    + (f"λ has the keys {keys}" if keys is not None else "λ is not a dict")
                    + f"; put it in λ (e.g. {{{spec!r}: 0.1, ...}}) or map {name!r} to a "
                    "function of λ"
                )
            out[name] = meta_params[spec]
        return out

    def write_hyperparams(self, opt_state: optax.OptState, meta_params: PyTree) -> optax.OptState:
        """``opt_state`` with the hyperparameters read from λ written into it (unchanged
        without ``hyperparams``); call it before each base step that trains θ so the base
        training uses the learned values (:func:`bilevel_jax.bilevel_step` does).

        >>> import jax.numpy as jnp, optax
        >>> tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
        >>> s = dds(hyperparams={"learning_rate": "lr"}).write_hyperparams(
        ...     tx.init(jnp.zeros(2)), {"lr": jnp.asarray(0.3)})
        >>> s.hyperparams["learning_rate"]
        Array(0.3, dtype=float32)
        """
        if not self.hyperparams:
            return opt_state
        return set_hyperparams(opt_state, self.hyperparam_values(meta_params))

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
        if self.lr is not None and self.lr == 0:
            return self._alignment(problem, inputs, first), state
        tx = problem.base_tx if self.lr is None else optax.sgd(self.lr)
        opt_state = inputs.base_opt_state if self.lr is None else tx.init(inputs.base_params)
        self.write_hyperparams(opt_state, inputs.meta_params)  # trace-time checks of the names
        frozen = self.unroll - (self.truncate or self.unroll)

        def run(carry, lam_used, start, length, remat):
            """``length`` steps from step ``start``; an unstacked batch is closed over, not copied."""

            def step(c, batch):
                theta, s = c
                batch = first if batch is None else batch
                g = jax.grad(problem.base_loss)(theta, lam_used, batch)
                s = self.write_hyperparams(s, lam_used)  # λ's hyperparameters, differentiably
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

    def _alignment(self, problem: BilevelProblem, inputs: BilevelInputs, batch) -> Hypergrad:
        """``h(0) + h'(0)`` of ``h(ρ) = ∇_λ L_m(θ − ρ∇_θL_b(θ, λ), λ)`` (module docstring)."""
        theta = inputs.base_params

        def lookahead(rho):
            def meta_after_step(lam):
                g = jax.grad(problem.base_loss)(theta, lam, batch)
                moved = jax.tree.map(lambda t, gi: t - rho.astype(gi.dtype) * gi, theta, g)
                return problem.meta_loss(moved, lam, inputs.meta_batch)

            return jax.value_and_grad(meta_after_step)(inputs.meta_params)

        zero, one = jnp.zeros([], jnp.float32), jnp.ones([], jnp.float32)
        (value, direct), (_, slope) = jax.jvp(lookahead, (zero,), (one,))
        return assemble(inputs.meta_params, direct, slope, value)


def itd(
    unroll: int = 10,
    *,
    truncate: int | None = None,
    stacked: bool = False,
    remat: bool = False,
    hyperparams: Mapping[str, str | Callable] | None = None,
) -> Unrolled:
    """Iterative differentiation through ``unroll`` steps of the base optimizer.

    ``hyperparams`` makes optimizer hyperparameters meta parameters (:class:`Unrolled`).

    Example:
      >>> m = itd(5, truncate=2)
      >>> m.unroll, m.truncate, m.name
      (5, 2, 'itd')
    """
    return Unrolled(
        unroll=unroll,
        truncate=truncate,
        stacked=stacked,
        remat=remat,
        hyperparams=hyperparams or (),
        name="itd",
    )


def dds(
    lr: float | None = None, *, hyperparams: Mapping[str, str | Callable] | None = None
) -> Unrolled:
    """One-step look-ahead: ``∇_λ L_m(θ + Δ(∇_θL_b(θ, λ)), λ)`` (``Δ = −lr·g`` when ``lr`` is set).

    ``lr=0.0`` is gradient alignment, the ρ → 0 limit with the step scale divided out:

        dds(0) = ∇_λ L_m − ∇_λ ⟨∇_θL_m, ∇_θL_b⟩,   so   dds(ρ) = ∇_λL_m + ρ (dds(0) − ∇_λL_m) + O(ρ²)

    (the module docstring); ``lr > 0`` and ``lr=None`` are unchanged by it.
    ``hyperparams`` makes optimizer hyperparameters meta parameters (:class:`Unrolled`).

    Example:
      >>> m = dds(0.1)
      >>> m.unroll, m.lr, m.name
      (1, 0.1, 'dds')

      Per-example weights ``L_b = Σ_i λ_i (θ − a_i)²/2`` and ``L_m = (θ − 1)²/2`` at θ = 0:
      ``d = −1`` and ``∇_θℓ_i = −a_i``, so the alignment direction is ``−⟨∇ℓ_i, d⟩ = −a_i``.

      >>> import jax.numpy as jnp, optax, bilevel_jax as bj
      >>> a = jnp.array([1.0, -2.0])
      >>> problem = bj.BilevelProblem(lambda th, lam, b: jnp.sum(lam * (th - a) ** 2) / 2,
      ...                             lambda th, lam, b: jnp.sum((th - 1.0) ** 2) / 2, optax.sgd(0.1))
      >>> theta = jnp.zeros(1)
      >>> inputs = bj.BilevelInputs(theta, jnp.ones(2), optax.sgd(0.1).init(theta), None, None)
      >>> dds(0.0).hypergrad(problem, inputs, None)[0].meta_grad
      Array([-1.,  2.], dtype=float32)
    """
    return Unrolled(unroll=1, lr=lr, hyperparams=hyperparams or (), name="dds")
