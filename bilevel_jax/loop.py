r"""The bilevel training step: K base steps (``lax.scan``) then one meta step, as one pure function.

    step  = bj.bilevel_step(base_loss, meta_loss, base_tx, meta_tx, bj.sama())
    state = step.init(base_params, meta_params, rng=jax.random.PRNGKey(0))
    state, metrics = jax.jit(step, donate_argnums=0)(state, base_batches, meta_batch)

``base_batches`` is a pytree whose leaves have a leading axis of length K (one base
batch per step); ``meta_batch`` is one meta batch. Each call is

1. the **base phase** (:meth:`BilevelStep.base_phase`): K base steps
   ``θ ← θ + Δ(∇_θ L_b(θ, λ; B_k), s, θ)`` with ``base_tx``, each one
   :func:`bilevel_jax.base_step`, all in one ``lax.scan``; for SAMA's ``adapt_from="last"``
   the scan also keeps the last step's gradient, and its pre-update optimizer state is
   recovered from the updated one (:func:`bilevel_jax.adaptation.rewind`), so that no extra
   pass and no second copy of the optimizer state are needed;
2. the **meta phase** (:meth:`BilevelStep.meta_phase`): the hypergradient of ``method`` at
   the final θ on the last base batch and the meta batch, the update of λ with ``meta_tx``
   (any optax optimizer) and, for methods with ``step_along_v`` (``bj.sama(step_along_v=True)``),
   the base step along v (``θ ← θ − εv``, SAMA §3.2);
3. the next state: a fresh RNG key, the counters ``base_steps`` / ``meta_steps``, the metrics.

**Safe failure.** A base step whose loss or gradient is not finite leaves θ and the
base optimizer state bit-identical and increments ``skipped_base``; a meta step whose
hypergradient is not finite leaves λ, the meta optimizer state and the method state
unchanged and increments ``skipped_meta`` (like ``optax.apply_if_finite``). That is
``on_nonfinite="skip"`` (the default); ``"warn"`` also warns and ``"raise"`` raises
``FloatingPointError`` at the first non-finite step (under ``jit``: inside
:func:`bilevel_jax.nonfinite_errors`, which :func:`bilevel_jax.fit` uses). Use :func:`check_skips` (or
:func:`bilevel_jax.fit`'s ``max_skips``) to stop a run that keeps failing. As in
``optax.apply_if_finite``, the base step checks the loss and the gradient, not the update: an
optimizer that turns a finite gradient into a non-finite update is not caught there. When the *last* base step is skipped, SAMA's
``adapt_from="last"`` sees its non-finite gradient and the meta step is skipped too.

**Stateful models.** With ``stateful=True`` the losses take a fourth argument, the
non-differentiated ``model_state`` (batch statistics, RNG streams…), and
``base_loss`` returns ``(loss, new_model_state)``; the new state is threaded through
the base steps, and the meta step sees it as a constant.

**RNG.** With ``use_rng=True`` the losses also receive ``rng=`` (a fresh key per base
step, and one for the meta step) split from ``state.rng``.

**Online data selection** (``selection=``, ``train_loss=``; :mod:`bilevel_jax.selection`,
Grangier et al. 2023). Each base batch is a *big* batch; each base step scores it with
``selection.score_fn(λ, big)`` under ``stop_gradient``, keeps ``k`` examples (top-k, sampled
∝ softmax without replacement, or uniform) and steps θ on the λ-free ``train_loss`` of the
kept examples. The meta step's base loss is ``base_loss`` (the weighted loss) on the batch
``selection.meta_batch`` picks from the last big batch. Everything stays inside the one
compiled step; the random choices use keys split from ``state.rng``, so no state is added
and resumed runs are deterministic. Without a selection the step is unchanged.

**Data parallelism** (``axis_name``, set by :func:`bilevel_jax.parallel.data_parallel`;
``docs/parallel.md``).
Each base step averages the gradient, the loss and — with ``stateful=True`` — the new model
state across devices in one all-reduce (batch statistics become the mean of the devices'
statistics, as with synchronised running averages); the meta step averages its results in
one more. With ``use_rng=True`` each device folds its index into the keys, so dropout masks
differ across shards while ``state.rng`` stays replicated.

**Mixed precision.** With ``compute_dtype=jnp.bfloat16`` the *base steps* see θ, λ and the
floating batch leaves cast to bf16, while the master parameters, gradients and optimizer
states stay in float32. The meta step runs in float32 unless ``meta_compute_dtype`` says
otherwise: SAMA's central difference subtracts two λ-gradients that agree to O(ε), which
bf16 (8 mantissa bits) cannot resolve — measured on the MNIST reweighting problem, a bf16
meta step gave a meta-gradient with cosine −0.48 to the float32 one, a float32 meta step
after bf16 base steps cosine 1.0000 (``tests/test_mixed_precision.py``; ``docs/precision.md``).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel_jax import _checks, _nonfinite, adaptation, parallel
from bilevel_jax.base_step import base_step
from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    HypergradMethod,
    all_finite,
)
from bilevel_jax.hypergrad.sama import sama
from bilevel_jax.selection import Selection, gather

__all__ = [
    "BilevelState",
    "BilevelStep",
    "BasePhase",
    "bilevel_step",
    "init_bilevel_state",
    "check_skips",
    "TooManySkipsError",
]

PyTree = Any
SYNC = ("mean", "full_batch")


class TooManySkipsError(FloatingPointError):
    """Raised when more base or meta steps were skipped as non-finite than allowed.

    >>> issubclass(TooManySkipsError, FloatingPointError)
    True
    """

    # set by ``fit`` before it re-raises: the state it stopped at and this call's log records
    state: BilevelState
    history: list[dict]


def _deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} is deprecated; use {new}", DeprecationWarning, stacklevel=stacklevel)


class BilevelState(NamedTuple):
    """Everything a bilevel run carries between steps (a pytree: jit, donate and checkpoint it).

    Attributes:
      base_params: θ (the master copy, float32 or wider under mixed precision).
      meta_params: λ.
      base_opt_state: the base optimizer's state.
      meta_opt_state: the meta optimizer's state.
      method_state: the hypergradient method's state (SOBA's z, CG's warm start…).
      model_state: non-differentiated model state (batch statistics, RNG streams), or None.
      rng: a PRNG key split by the step when ``use_rng=True``.
      base_steps: base steps taken (including skipped ones).
      meta_steps: meta steps taken (including skipped ones).
      skipped_base: base steps skipped because their loss or gradient was not finite.
      skipped_meta: meta steps skipped because their hypergradient was not finite.

    ``step`` and ``meta_step`` are the deprecated names of ``base_steps`` and ``meta_steps``.

    >>> import jax.numpy as jnp, optax, bilevel_jax as bj
    >>> step = bj.bilevel_step(lambda t, l, b: jnp.sum((t - l) ** 2),
    ...                        lambda t, l, b: jnp.sum(t**2), optax.sgd(0.1), optax.sgd(0.1))
    >>> state = step.init(jnp.ones(2), jnp.zeros(2))
    >>> int(state.base_steps), int(state.meta_steps), int(state.skipped_base)
    (0, 0, 0)
    """

    base_params: PyTree
    meta_params: PyTree
    base_opt_state: optax.OptState
    meta_opt_state: optax.OptState
    method_state: PyTree
    model_state: PyTree
    rng: jax.Array
    base_steps: jax.Array
    meta_steps: jax.Array
    skipped_base: jax.Array
    skipped_meta: jax.Array

    @property
    def step(self) -> jax.Array:
        """Deprecated: ``base_steps``."""
        _deprecated("BilevelState.step", "BilevelState.base_steps")
        return self.base_steps

    @property
    def meta_step(self) -> jax.Array:
        """Deprecated: ``meta_steps``."""
        _deprecated("BilevelState.meta_step", "BilevelState.meta_steps")
        return self.meta_steps


class BasePhase(NamedTuple):
    """What :meth:`BilevelStep.base_phase` returns besides the new state.

    Attributes:
      losses: the K base losses, shape ``(K,)`` (float32 or wider).
      finite: which of the K base steps were applied (loss and gradient finite), ``(K,)``.
      last_batch: the last base batch (the meta step's base batch).
      last_grad: the last base step's gradient, for a method that uses it (SAMA's
        ``adapt_from="last"``; its ``uses_last_step``); else None.
      last_opt_state: the base optimizer state before the last base step (recovered from the
        updated state where :func:`~bilevel_jax.adaptation.rewind` can, which is exact up to
        float32 rounding), for a method that uses it; else None.
      selected: with a :class:`~bilevel_jax.selection.Selection`: the indices each base step
        kept from its big batch, ``(K, k)`` int32 (per device under data parallelism); else None.
      scores: with a selection: the scores of every big batch, ``(K, n)``; else None.

    With a selection, ``last_batch`` is the meta step's base batch that
    ``Selection.meta_batch`` chose from the last big batch, and ``last_grad`` the gradient of
    ``train_loss`` on the last kept examples (the gradient the base optimizer saw).

    >>> BasePhase._fields
    ('losses', 'finite', 'last_batch', 'last_grad', 'last_opt_state', 'selected', 'scores')
    """

    losses: jax.Array
    finite: jax.Array
    last_batch: PyTree
    last_grad: PyTree
    last_opt_state: optax.OptState | None
    selected: jax.Array | None = None
    scores: jax.Array | None = None


def _after_base_steps(state: BilevelState, carry: tuple, oks: jax.Array) -> BilevelState:
    """``state`` after K base steps: their final ``(θ, s, model_state)`` and the counters
    (``oks``: which of the K steps were finite)."""
    theta, s, model_state = carry
    return state._replace(
        base_params=theta,
        base_opt_state=s,
        model_state=model_state,
        base_steps=state.base_steps + oks.shape[0],
        skipped_base=state.skipped_base + jnp.sum(~oks, dtype=jnp.int32),
    )


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _keep_if(ok, new, old):
    """``new`` if ``ok`` else ``old``, for any pytree (PRNG keys included), by ``lax.cond``."""
    return jax.lax.cond(ok, lambda: new, lambda: old)


def _cast_floats(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree
    )


def _check_meta_tx_precision(meta_tx, meta_params: PyTree, meta_opt_state) -> None:
    """Warn at init when λ has a float16 leaf and ``meta_tx`` turns a small finite
    hypergradient into a non-finite update (Adam's ``eps=1e-8`` is 0 in float16, so
    ``m / (√v + eps)`` divides by zero once ``v`` underflows): every such meta step would be
    skipped. A probe update with a 1e-4 gradient, run only when a float16 leaf exists."""
    leaves = jax.tree.leaves(meta_params)
    if not any(jnp.result_type(x) == jnp.float16 for x in leaves):
        return
    probe = jax.tree.map(lambda x: jnp.full_like(x, 1e-4), meta_params)
    try:
        upd, _ = meta_tx.update(probe, meta_opt_state, meta_params)
        finite = bool(all_finite(upd))
    except Exception:  # noqa: BLE001 - traced (init under jit/vmap) or unusual optimizer: no probe
        return
    if not finite:
        warnings.warn(
            "bilevel_step.init: the meta parameters have float16 leaves, and meta_tx turns a "
            "small hypergradient (1e-4) into an update that is not finite (e.g. Adam's "
            "eps=1e-8 underflows to 0 in float16), so such meta steps would all be skipped. "
            "Keep the meta parameters in float32 (cast them with jnp.float32); "
            "meta_compute_dtype sets the precision the meta losses run in.",
            RuntimeWarning,
            stacklevel=3,
        )


def _leading_size(base_batches: PyTree) -> int:
    """K, the common leading axis of ``base_batches`` (checked; clear errors otherwise)."""
    leaves = jax.tree.leaves(base_batches)
    if not leaves:
        raise _checks.BilevelInputError("base_batches is empty: it has no array leaves")
    sizes = {x.shape[0] if jnp.ndim(x) else None for x in leaves}
    if len(sizes) != 1 or None in sizes:
        raise _checks.BilevelInputError(
            "every leaf of base_batches needs the same leading axis (the K base steps); "
            f"got leading sizes {sorted(map(str, sizes))}"
        )
    k = int(sizes.pop())  # type: ignore[arg-type] - None was excluded above
    if k == 0:
        raise _checks.BilevelInputError("base_batches has K = 0 base steps; K must be at least 1")
    for p, x in jax.tree_util.tree_flatten_with_path(base_batches)[0]:
        if jnp.ndim(x) >= 2 and x.shape[1] == 0:
            raise _checks.BilevelInputError(
                f"base batch leaf {jax.tree_util.keystr(p)} is empty (shape {x.shape})"
            )
    return k


@dataclasses.dataclass(frozen=True, kw_only=True)
class BilevelStep:
    """The pure step built by :func:`bilevel_step`: ``step(state, base_batches, meta_batch)``.

    The fields are :func:`bilevel_step`'s arguments. Besides ``__call__`` (base phase →
    meta phase → next state) the two phases can be called on their own:
    :meth:`base_phase` and :meth:`meta_phase`.

    >>> import jax, jax.numpy as jnp, optax, bilevel_jax as bj
    >>> step = bj.BilevelStep(
    ...     base_loss=lambda t, l, b: jnp.sum((t - l * b) ** 2),
    ...     meta_loss=lambda t, l, b: jnp.sum((t - b) ** 2),
    ...     base_tx=optax.sgd(0.1), meta_tx=optax.sgd(0.1), method=bj.sama())
    >>> state = step.init(jnp.zeros(2), jnp.ones(2))
    >>> state, metrics = jax.jit(step)(state, jnp.ones((3, 2)), 2 * jnp.ones(2))
    >>> int(state.base_steps), int(state.meta_steps), sorted(metrics)[:3]
    (3, 1, ['base_loss', 'base_skipped', 'eps'])
    """

    base_loss: Callable
    meta_loss: Callable
    base_tx: optax.GradientTransformation
    meta_tx: optax.GradientTransformation
    method: HypergradMethod = dataclasses.field(default_factory=sama)
    stateful: bool = False
    use_rng: bool = False
    compute_dtype: Any = None
    meta_compute_dtype: Any = None
    axis_name: str | None = None
    sync: str = "mean"
    on_nonfinite: str = "skip"
    loss_reduction: str | None = None
    selection: Selection | None = None
    train_loss: Callable | None = None
    # the identically-zero-hypergradient warning is given once per step object
    _zero_once: _nonfinite._Once = dataclasses.field(
        default_factory=_nonfinite._Once, init=False, repr=False, compare=False
    )

    @property
    def zero_hypergradient_warned(self) -> bool:
        """Whether this step has warned that a hypergradient was exactly 0 in every leaf (the
        warning is given once per step object; under ``jit`` it arrives with the step's
        effects, so call ``jax.effects_barrier()`` before reading this).

        >>> import jax.numpy as jnp, optax, bilevel_jax as bj
        >>> base = lambda th, lam, x: jnp.mean((th - x) ** 2) + jnp.sum(lam * th**2)
        >>> meta = lambda th, lam, x: jnp.mean((th - x) ** 2)
        >>> step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(1.0), bj.sama_na(0.1))
        >>> state, _ = step(step.init(jnp.full(2, 0.5), jnp.full(2, 0.5)), jnp.ones((1, 2)), jnp.ones(2))
        >>> step.zero_hypergradient_warned
        False
        """
        return self._zero_once.done

    def __repr__(self) -> str:
        """The constructor call with functions by name and transforms by their settings (no
        memory addresses), so that results can record ``repr(step)``."""
        parts = [
            f"{f.name}={_checks.callable_repr(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.repr and f.init
        ]
        return f"BilevelStep({', '.join(parts)})"

    def __post_init__(self):
        if self.sync == "exact":
            _deprecated('sync="exact"', 'sync="full_batch"', stacklevel=4)
            object.__setattr__(self, "sync", "full_batch")
        if self.sync not in SYNC:
            raise ValueError(f"sync must be 'mean' or 'full_batch', got {self.sync!r}")
        if self.sync == "full_batch" and not self.method.supports_exact_sync:
            raise ValueError(
                f"sync='full_batch' is implemented for SAMA-type methods (sama, sama_na, darts); "
                f"{self.method.name} supports the default sync='mean' (mean of per-device estimates)"
            )
        _check_loss_reduction(self.sync, self.loss_reduction)
        _nonfinite.check_mode(self.on_nonfinite, "bilevel_step")
        _validate_selection(self.selection, self.train_loss)

    # -- the data-parallel pieces (no-ops without axis_name; docs/parallel.md) ------------------
    def _local(self, tree):
        return parallel.local(tree, self.axis_name)

    def _mean(self, tree):
        return parallel.mean(tree, self.axis_name)

    def _key(self, rng):
        return parallel.key(rng, self.axis_name)

    @property
    def _method(self) -> HypergradMethod:
        """The method, synchronised over the devices for ``sync="full_batch"``."""
        if self.sync == "full_batch" and self.axis_name is not None:
            return self.method.synced(self.axis_name)
        return self.method

    # -- losses in the (θ, λ, batch) form the methods expect ------------------------------------
    def _base(self, model_state, rng, dtype):
        def loss(theta, lam, batch):
            args = _cast_floats((theta, lam, batch), dtype)
            kw = {"rng": self._key(rng)} if self.use_rng else {}
            if self.stateful:
                out, new_state = self.base_loss(*args, model_state, **kw)
            else:
                out, new_state = self.base_loss(*args, **kw), model_state
            return jnp.asarray(out, jnp.promote_types(out.dtype, jnp.float32)), new_state

        return loss

    def _train(self, model_state, rng, dtype, valid):
        """``train_loss`` (λ-free) in the ``(θ, λ, batch) -> (loss, model_state)`` form of
        :meth:`_base`; its loss is NaN when ``valid`` is False (non-finite scores), so that
        :func:`~bilevel_jax.base_step` skips the step (the gradient stays finite)."""

        def loss(theta, lam, batch):
            del lam  # the kept examples are trained on with uniform weights
            theta, batch = _cast_floats((theta, batch), dtype)
            kw = {"rng": self._key(rng)} if self.use_rng else {}
            fn: Callable = self.train_loss  # type: ignore[assignment] - set with a selection
            if self.stateful:
                out, new_state = fn(theta, batch, model_state, **kw)
            else:
                out, new_state = fn(theta, batch, **kw), model_state
            out = jnp.asarray(out, jnp.promote_types(out.dtype, jnp.float32))
            return jnp.where(valid, out, jnp.nan), new_state

        return loss

    def _meta(self, model_state, rng, dtype):
        def loss(theta, lam, batch):
            args = _cast_floats((theta, lam, batch), dtype)
            kw = {"rng": self._key(rng)} if self.use_rng else {}
            out = (
                self.meta_loss(*args, model_state, **kw)
                if self.stateful
                else self.meta_loss(*args, **kw)
            )
            return jnp.asarray(out, jnp.promote_types(out.dtype, jnp.float32))

        return loss

    def init(
        self,
        base_params: PyTree,
        meta_params: PyTree,
        *,
        model_state: PyTree = None,
        rng: jax.Array | None = None,
    ) -> BilevelState:
        """A fresh :class:`BilevelState` (optimizer and method states from their ``init``).

        Every leaf is a new buffer (nothing aliases the arguments or another leaf), so the
        state can be donated to ``jax.jit(step, donate_argnums=0)``.

        >>> import jax.numpy as jnp, optax, bilevel_jax as bj
        >>> step = bj.bilevel_step(lambda t, l, b: jnp.sum(t * l), lambda t, l, b: jnp.sum(t),
        ...                        optax.sgd(0.1), optax.sgd(0.1))
        >>> step.init(jnp.ones(2), jnp.ones(2)).base_params
        Array([1., 1.], dtype=float32)
        """
        zero = jnp.zeros([], jnp.int32)
        state = BilevelState(
            base_params=base_params,
            meta_params=meta_params,
            base_opt_state=self.base_tx.init(base_params),
            meta_opt_state=self.meta_tx.init(meta_params),
            method_state=self.method.init(base_params, meta_params),
            model_state=model_state,
            rng=jax.random.PRNGKey(0) if rng is None else rng,
            base_steps=zero,
            meta_steps=zero,
            skipped_base=zero,
            skipped_meta=zero,
        )
        _check_meta_tx_precision(self.meta_tx, state.meta_params, state.meta_opt_state)
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def _check(self, state: BilevelState, base_batches: PyTree, meta_batch: PyTree = None) -> int:
        """Trace-time input checks (clear errors and warnings); returns K."""
        k = _leading_size(base_batches)
        _checks.float_leaves(state.base_params, "base_params")
        _checks.float_leaves(state.meta_params, "meta_params")
        _checks.opt_state_matches(self.base_tx, state.base_opt_state, state.base_params)
        _checks.opt_state_matches(self.meta_tx, state.meta_opt_state, state.meta_params)
        first = jax.tree.map(lambda x: x[0], base_batches)
        _checks.warn_missing_k_axis(first, meta_batch, k, "bilevel_step", stacklevel=5)
        base, meta = self._user_losses(state.model_state)
        theta, lam = state.base_params, state.meta_params
        hint = (
            "with stateful=True base_loss must return (loss, new_model_state)"
            if self.stateful
            else "base_loss returned a tuple: for (loss, new_model_state) pass stateful=True to "
            "bilevel_step (the losses then take the model state as their fourth argument)"
        )
        _checks.scalar_loss(base, "base_loss", theta, lam, first, tuple_hint=hint)
        _checks.scalar_loss(meta, "meta_loss", theta, lam, meta_batch)
        if self.selection is not None:
            self._check_selection(state, first)
        # λ may reach the step another way: optimizer hyperparameters (base_tx), or a method
        # with its own objective (bj.domain_classifier)
        if not (
            getattr(self.method, "hyperparams", None)
            or getattr(self.method, "own_objective", False)
        ):
            _checks.warn_unreached(
                [lambda m: base(theta, m, first), lambda m: meta(theta, m, meta_batch)],
                lam,
                "bilevel_step",
                stacklevel=5,
            )
        return k

    def _check_selection(self, state: BilevelState, big: PyTree) -> None:
        """Trace-time checks of the selection: scores of shape (n,), k within n, a scalar
        λ-free ``train_loss`` on the kept examples."""
        sel: Selection = self.selection  # type: ignore[assignment] - only called with one
        try:
            scores = jax.eval_shape(sel.scores, state.meta_params, big)
            k = sel.keep_count(scores.shape[0])
            sel.meta_count(scores.shape[0])
        except (ValueError, TypeError) as e:
            raise _checks.BilevelInputError(str(e)) from e
        kept = jax.tree.map(lambda x: jax.ShapeDtypeStruct((k, *x.shape[1:]), x.dtype), big)
        model_state = state.model_state
        kw = {"rng": jax.random.PRNGKey(0)} if self.use_rng else {}
        fn: Callable = self.train_loss  # type: ignore[assignment] - set with a selection

        def train(theta, lam, batch):
            del lam
            if not self.stateful:
                return fn(theta, batch, **kw)
            out = fn(theta, batch, model_state, **kw)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise _checks.BilevelInputError(
                    "with stateful=True train_loss must return (loss, new_model_state); got "
                    f"{type(out).__name__}"
                )
            return out[0]

        _checks.scalar_loss(
            train,
            "train_loss",
            state.base_params,
            state.meta_params,
            kept,
            tuple_hint="train_loss(base_params, batch) returned a tuple: for (loss, "
            "new_model_state) pass stateful=True to bilevel_step",
        )

    def _user_losses(self, model_state):
        """The user's losses as ``(θ, λ, batch) -> loss`` with nothing cast (for the checks);
        with ``stateful=True`` base_loss's ``(loss, new_model_state)`` is checked and unpacked."""
        kw = {"rng": jax.random.PRNGKey(0)} if self.use_rng else {}

        def base(theta, lam, batch):
            args = _cast_floats((theta, lam, batch), self.compute_dtype)
            if not self.stateful:
                return self.base_loss(*args, **kw)
            out = self.base_loss(*args, model_state, **kw)
            if not (isinstance(out, tuple) and len(out) == 2):
                raise _checks.BilevelInputError(
                    "with stateful=True base_loss must return (loss, new_model_state); got "
                    f"{type(out).__name__}. Without model state, drop stateful=True."
                )
            return out[0]

        def meta(theta, lam, batch):
            args = _cast_floats((theta, lam, batch), self.meta_compute_dtype)
            extra = (model_state,) if self.stateful else ()
            return self.meta_loss(*args, *extra, **kw)

        return base, meta

    def _base_step(self, carry, meta_params, batch, key, make_loss=None):
        """One base step (:func:`bilevel_jax.base_step`), its model state kept only if finite.

        ``make_loss(model_state, key, dtype)`` builds the loss (default :meth:`_base`)."""
        theta, s, model_state = carry
        lam = self._local(meta_params)
        write = getattr(self.method, "write_hyperparams", None)  # optimizer hyperparameters in λ
        if write is not None:  # (bj.itd/dds(hyperparams=...)) also drive the base steps
            s = write(s, lam)
        r = base_step(
            (self._base if make_loss is None else make_loss)(model_state, key, self.compute_dtype),
            self.base_tx,
            theta,
            s,
            lam,
            batch,
            has_aux=True,
            reduce=self._mean,  # one all-reduce: gradient, loss and (stateful) model state
            local=self._local,
        )
        _nonfinite.report(
            r.finite,
            self.on_nonfinite,
            where="bilevel_step: a base step's loss or gradient",
            tree=r.grad,
        )
        new_model_state = _keep_if(r.finite, r.aux, model_state)
        return (r.params, r.opt_state, new_model_state), (r.loss, r.finite), (r.grad, s)

    def _selection_step(self, carry, meta_params, big, key):
        """One base step with a selection: score the big batch, keep ``k`` examples by the rule
        (no gradient through the choice), step θ on ``train_loss`` of the kept examples.
        A big batch with a non-finite score is skipped like a non-finite loss."""
        sel: Selection = self.selection  # type: ignore[assignment] - only called with one
        loss_key, sel_key = jax.random.split(key)
        lam, batch = _cast_floats((self._local(meta_params), big), self.compute_dtype)
        scores = sel.scores(lam, batch)
        idx = sel.choose(self._key(sel_key), scores)
        valid = jnp.all(jnp.isfinite(scores))
        carry, (loss, ok), last = self._base_step(
            carry,
            meta_params,
            gather(big, idx),
            loss_key,
            make_loss=lambda ms, k, dt: self._train(ms, k, dt, valid),
        )
        return carry, (loss, ok, idx, scores), last

    @property
    def _uses_last_step(self) -> bool:
        """Whether the method reads the last base step's gradient and pre-update state
        (SAMA's ``adapt_from="last"``; a method without the attribute is given them)."""
        return bool(getattr(self._method, "uses_last_step", True))

    def _steps(self, state: BilevelState, k: int, step_i: Callable):
        """The K base steps ``step_i(carry, i) -> (carry, outs, (g, s))``: the final carry, the
        stacked ``outs`` and, for a method that uses the last step, its gradient and
        pre-update state (else None, None).

        All K steps run in one ``lax.scan``. The last step's gradient is carried through it
        (it is written where the scan keeps it; no copy), and its pre-update state is
        recovered after the scan from the updated one (:func:`bilevel_jax.adaptation.rewind`),
        so that it is never held beside the updated state. Only for an optimizer whose state
        cannot be rewound are K − 1 steps scanned and the last one run after the scan, where
        its pre-update state comes for free (measured: carrying the state through the scan
        instead cost 18 % of a base step on a 1.9M-parameter MLP)."""
        carry0 = (state.base_params, state.base_opt_state, state.model_state)
        if not self._uses_last_step:
            carry, outs = jax.lax.scan(lambda c, i: step_i(c, i)[:2], carry0, jnp.arange(k))
            return carry, outs, None, None
        if adaptation.can_rewind(self.base_tx, state.base_opt_state, state.base_params):
            shapes = jax.eval_shape(lambda c: step_i(c, 0)[2][0], carry0)
            g0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

            def body(c, i):
                new, outs, (g, _) = step_i(c[0], i)
                return (new, g), outs

            (carry, g), outs = jax.lax.scan(body, (carry0, g0), jnp.arange(k))
            theta, s, _ = carry
            ok = outs[1][-1]  # a skipped last step left the state as it was before it
            last_s = _select(ok, adaptation.rewind(self.base_tx, g, s, theta), s)
            return carry, outs, g, last_s
        carry, outs = jax.lax.scan(lambda c, i: step_i(c, i)[:2], carry0, jnp.arange(k - 1))
        carry, out_k, (g, last_s) = step_i(carry, k - 1)
        outs = jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), outs, out_k)
        return carry, outs, g, last_s

    def _selection_phase(self, state: BilevelState, base_batches: PyTree):
        """:meth:`base_phase` with a selection."""
        sel: Selection = self.selection  # type: ignore[assignment] - only called with one
        k = _leading_size(base_batches)
        keys = jax.random.split(state.rng, k + 1)  # one per base step, one for the meta batch
        lam = state.meta_params
        batches = jax.tree.map(jnp.asarray, base_batches)
        carry, outs, last_g, last_s = self._steps(
            state,
            k,
            lambda c, i: self._selection_step(
                c, lam, jax.tree.map(lambda x: x[i], batches), keys[i]
            ),
        )
        losses, oks, selected, scores = outs
        big = jax.tree.map(lambda x: x[-1], batches)
        n = scores.shape[1]
        meta_idx = sel.meta_indices(self._key(keys[k]), n, selected[-1])
        meta_base = big if meta_idx is None else gather(big, meta_idx)
        new = _after_base_steps(state, carry, oks)
        return new, BasePhase(losses, oks, meta_base, last_g, last_s, selected, scores)

    def base_phase(
        self, state: BilevelState, base_batches: PyTree
    ) -> tuple[BilevelState, BasePhase]:
        """The K base steps; returns the state after them and a :class:`BasePhase`.

        Updates ``base_params``, ``base_opt_state``, ``model_state``, ``base_steps`` and
        ``skipped_base``; the base steps' keys (``use_rng=True``) are split from
        ``state.rng`` (``__call__`` passes a key split off for them).

        With a ``selection`` each step scores its big batch, keeps ``k`` examples and steps θ
        on ``train_loss`` of them (keys for the random rules are split from ``state.rng``
        too); the returned :class:`BasePhase` then also holds the kept indices and the scores,
        and its ``last_batch`` is the meta step's base batch (``Selection.meta_batch``).

        >>> import jax.numpy as jnp, optax, bilevel_jax as bj
        >>> step = bj.bilevel_step(lambda t, l, b: jnp.sum((t - b) ** 2),
        ...                        lambda t, l, b: jnp.sum(t**2), optax.sgd(0.25), optax.sgd(0.1))
        >>> state, base = step.base_phase(step.init(jnp.zeros(2), jnp.zeros(2)), jnp.ones((2, 2)))
        >>> state.base_params, base.losses, int(state.base_steps)  # θ ← θ − 0.25 · 2 (θ − 1)
        (Array([0.75, 0.75], dtype=float32), Array([2. , 0.5], dtype=float32), 2)
        """
        if self.selection is not None:
            return self._selection_phase(state, base_batches)
        k = _leading_size(base_batches)
        keys = jax.random.split(state.rng, k)
        lam = state.meta_params
        batches = jax.tree.map(jnp.asarray, base_batches)
        carry, (losses, oks), last_g, last_s = self._steps(  # batches indexed in place
            state,
            k,
            lambda c, i: self._base_step(c, lam, jax.tree.map(lambda x: x[i], batches), keys[i]),
        )
        last_batch = jax.tree.map(lambda x: x[-1], batches)
        new = _after_base_steps(state, carry, oks)
        return new, BasePhase(losses, oks, last_batch, last_g, last_s)

    def _hypergrad(self, state, base_batch, meta_batch, last_grad, last_opt_state):
        """The method's hypergradient at ``state``: under data parallelism every input is
        per-device and the result is the mean of the per-device estimates (one all-reduce)."""
        model_state, rng, dtype = state.model_state, state.rng, self.meta_compute_dtype
        base = self._base(model_state, rng, dtype)
        problem = BilevelProblem(
            lambda th, lam, b: base(th, lam, b)[0],
            self._meta(model_state, rng, dtype),
            self.base_tx,
        )
        theta, lam, s = self._local((state.base_params, state.meta_params, state.base_opt_state))
        last_g, last_s = self._local((last_grad, last_opt_state))
        inputs = BilevelInputs(theta, lam, s, base_batch, meta_batch, last_g, last_s)
        hg, method_state = self._method.hypergrad(problem, inputs, self._local(state.method_state))
        if self.axis_name is None:
            return hg, method_state
        meta_grad, base_update, meta_loss, info, method_state = self._mean(
            (hg.meta_grad, hg.base_update, hg.meta_loss, hg.info, method_state)
        )
        finite = all_finite(meta_grad, base_update)
        return Hypergrad(meta_grad, base_update, meta_loss, finite, info), method_state

    def meta_phase(
        self,
        state: BilevelState,
        base_batch: PyTree,
        meta_batch: PyTree,
        *,
        last_grad: PyTree = None,
        last_opt_state: optax.OptState | None = None,
    ) -> tuple[BilevelState, Hypergrad]:
        """One meta step at ``state.base_params``; returns the new state and the hypergradient.

        Computes the method's hypergradient on ``base_batch`` (the last base batch) and
        ``meta_batch``, updates λ with ``meta_tx`` and, for methods with ``step_along_v``,
        applies the base step along v to θ. A non-finite hypergradient or meta update leaves
        λ, the meta optimizer state, the method state and θ unchanged and counts in
        ``skipped_meta``; ``meta_steps`` grows by one. The losses' keys (``use_rng=True``)
        derive from ``state.rng``, which is returned unchanged. ``last_grad`` and
        ``last_opt_state`` are the last base step's gradient and pre-update optimizer state
        (:class:`BasePhase`; needed by SAMA's ``adapt_from="last"`` only). The returned
        :class:`~bilevel_jax.Hypergrad` has ``finite`` False when the step was skipped.

        >>> import jax.numpy as jnp, optax, bilevel_jax as bj
        >>> base = lambda th, lam, x: jnp.mean((th - x) ** 2) + jnp.sum(lam * th**2)
        >>> meta = lambda th, lam, x: jnp.mean((th - x) ** 2)
        >>> step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(1.0), bj.sama_na(0.1))
        >>> state = step.init(jnp.full(2, 0.5), jnp.full(2, 0.5))
        >>> new, hg = step.meta_phase(state, jnp.ones(2), jnp.ones(2))
        >>> int(new.meta_steps), bool(hg.finite), bool(jnp.all(new.meta_params < 0.5))
        (1, True, True)
        """
        hg, method_state = self._hypergrad(state, base_batch, meta_batch, last_grad, last_opt_state)
        lam = state.meta_params
        upd, meta_opt_state = self.meta_tx.update(hg.meta_grad, state.meta_opt_state, lam)
        # an overflowing norm (a diverging neumann series) counts as non-finite too
        ok = hg.finite & _nonfinite.norm_finite(hg.meta_grad) & all_finite(upd)
        _nonfinite.report(
            ok, self.on_nonfinite, where="bilevel_step: the hypergradient", tree=hg.meta_grad
        )
        _nonfinite.warn_if_zero(
            hg.meta_grad,
            where="bilevel_step: the hypergradient",
            once=self._zero_once,
            active=ok,
            hint=_nonfinite.ZERO_HINT,
        )
        theta = state.base_params
        if self.method.step_along_v:
            if hg.base_update is None:
                raise ValueError(f"{self.method.name} has step_along_v but no base update")
            theta = _select(ok, optax.apply_updates(theta, hg.base_update), theta)
        new = state._replace(
            base_params=theta,
            meta_params=_select(ok, optax.apply_updates(lam, upd), lam),
            meta_opt_state=_select(ok, meta_opt_state, state.meta_opt_state),
            method_state=_select(ok, method_state, state.method_state),
            meta_steps=state.meta_steps + 1,
            skipped_meta=state.skipped_meta + (~ok).astype(jnp.int32),
        )
        return new, hg._replace(finite=ok)

    def phases(
        self, state: BilevelState, base_batches: PyTree, meta_batch: PyTree
    ) -> tuple[BilevelState, BasePhase, Hypergrad]:
        """What ``__call__`` computes, before it is reduced to metrics: the new state, the
        :class:`BasePhase` (per-step losses, and with a ``selection`` the kept indices and the
        scores) and the meta step's :class:`~bilevel_jax.Hypergrad`.

        ``state.rng`` is split three ways, for the base phase, the meta phase and the next state,
        exactly as in ``__call__``, so both give the same new state. Inputs are not checked here
        (``__call__`` checks them).

        >>> import jax.numpy as jnp, optax, bilevel_jax as bj
        >>> sel = bj.Selection(score_fn=lambda lam, b: b @ lam, keep=1)
        >>> step = bj.bilevel_step(lambda t, l, b: jnp.mean(b @ l) * jnp.sum(t**2),
        ...                        lambda t, l, b: jnp.sum(t**2), optax.sgd(0.1), optax.sgd(0.1),
        ...                        selection=sel, train_loss=lambda t, b: jnp.sum((t - b) ** 2))
        >>> state = step.init(jnp.zeros(2), jnp.array([1.0, 0.0]))
        >>> big = jnp.array([[[0.0, 1.0], [2.0, 0.0], [1.0, 1.0]]])  # K = 1 step, n = 3
        >>> state, base, hg = step.phases(state, big, jnp.zeros(2))
        >>> base.selected  # the example with the largest score b @ λ, per base step
        Array([[1]], dtype=int32)
        """
        rng, base_rng, meta_rng = jax.random.split(state.rng, 3)
        state, base = self.base_phase(state._replace(rng=base_rng), base_batches)
        state, hg = self.meta_phase(
            state._replace(rng=meta_rng),
            base.last_batch,
            meta_batch,
            last_grad=base.last_grad,
            last_opt_state=base.last_opt_state,
        )
        return state._replace(rng=rng), base, hg

    def __call__(
        self, state: BilevelState, base_batches: PyTree, meta_batch: PyTree
    ) -> tuple[BilevelState, dict]:
        """K base steps then one meta step; returns the new state and scalar metrics.

        With a ``selection`` the metrics also hold ``selected_score`` (the mean score of the
        kept examples over the K steps) and ``score`` (the mean score of the big batches).
        """
        self._check(state, base_batches, meta_batch)
        state, base, hg = self.phases(state, base_batches, meta_batch)
        good = jnp.maximum(jnp.sum(base.finite), 1)
        metrics = {
            "base_loss": jnp.sum(jnp.where(base.finite, base.losses, 0.0)) / good,
            "meta_loss": jnp.asarray(hg.meta_loss, jnp.float32),
            "hypergrad_norm": optax.tree.norm(hg.meta_grad).astype(jnp.float32),
            "base_skipped": jnp.sum(~base.finite, dtype=jnp.int32),
            "meta_skipped": (~hg.finite).astype(jnp.int32),
            **{k: jnp.asarray(v, jnp.float32) for k, v in hg.info.items()},
        }
        if base.scores is not None and base.selected is not None:  # one tiny all-reduce (DP)
            kept = jnp.take_along_axis(base.scores, base.selected, axis=1)
            kept_mean, all_mean = self._mean((jnp.mean(kept), jnp.mean(base.scores)))
            metrics["selected_score"] = jnp.asarray(kept_mean, jnp.float32)
            metrics["score"] = jnp.asarray(all_mean, jnp.float32)
        return state, metrics


def _check_loss_reduction(sync: str, loss_reduction: str | None) -> None:
    """``sync="full_batch"`` needs the losses declared as batch means (docs/parallel.md)."""
    if loss_reduction not in (None, "mean"):
        raise ValueError(f"loss_reduction must be None or 'mean', got {loss_reduction!r}")
    if sync == "full_batch" and loss_reduction != "mean":
        raise ValueError(
            "sync='full_batch' reproduces the single-device full-batch step only when both "
            "losses are means over the batch (per-example terms averaged, plus terms that do not "
            "depend on the batch): then the full-batch loss is the mean of equal shards' losses. "
            "bilevel_jax cannot check this; declare it with loss_reduction='mean'. A ratio such as "
            "sum(w * l) / sum(w) is not such a loss (the mean of per-shard ratios is not the "
            "full-batch ratio): use sync='mean' (the mean of per-device estimates) or write the "
            "loss as a mean over examples (docs/parallel.md)"
        )


def _validate_selection(selection: Selection | None, train_loss: Callable | None) -> None:
    """A selection needs a λ-free ``train_loss`` and vice versa."""
    if selection is None:
        if train_loss is not None:
            raise ValueError(
                "train_loss is the λ-free loss of the examples a selection keeps; it needs "
                "selection=bj.selection.Selection(...). Without a selection, base_loss trains θ."
            )
        return
    if not isinstance(selection, Selection):
        raise TypeError(
            f"selection must be a bj.selection.Selection, got {type(selection).__name__}"
        )
    if train_loss is None or not callable(train_loss):
        raise ValueError(
            "a selection trains θ on the kept examples with train_loss(base_params, batch) "
            "(uniform weights, no meta parameters); pass train_loss=... to bilevel_step. "
            "base_loss (the weighted loss) is the meta step's base loss."
        )


def bilevel_step(
    base_loss: Callable,
    meta_loss: Callable,
    base_tx: optax.GradientTransformation,
    meta_tx: optax.GradientTransformation,
    method: HypergradMethod | None = None,
    *,
    stateful: bool = False,
    use_rng: bool = False,
    compute_dtype: Any = None,
    meta_compute_dtype: Any = None,
    axis_name: str | None = None,
    sync: str = "mean",
    on_nonfinite: str = "skip",
    base_step_along_v: bool | None = None,
    loss_reduction: str | None = None,
    selection: Selection | None = None,
    train_loss: Callable | None = None,
) -> BilevelStep:
    r"""Build the pure, jit-able bilevel step (see the module docstring).

    Args:
      base_loss: ``L_b(θ, λ, batch[, model_state][, rng=]) -> loss`` (``(loss, model_state)``
        with ``stateful=True``).
      meta_loss: ``L_m(θ, λ, batch[, model_state][, rng=]) -> loss``.
      base_tx: the optimizer of θ.
      meta_tx: the optimizer of λ (applied to the hypergradient, e.g. ``optax.adam(1e-3)``).
      method: the hypergradient method (default ``bj.sama()``). A method with
        ``step_along_v`` (``bj.sama(step_along_v=True)``) also gets its base step along v
        applied to θ after each meta update.
      stateful: the losses take and ``base_loss`` returns a non-differentiated model state.
      use_rng: pass ``rng=`` keys split from ``state.rng`` to the losses.
      compute_dtype: e.g. ``jnp.bfloat16`` to run the base steps in bf16 over float32 masters.
      meta_compute_dtype: the dtype the meta step's losses run in (default: the parameters'
        own, float32 under mixed precision; bf16 here breaks SAMA's finite difference).
      axis_name: inside ``shard_map``/``pmap`` over this axis, average each base step's
        gradient in one all-reduce and the meta step's per-device results in one more
        (:func:`bilevel_jax.parallel.data_parallel` sets it for you).
      sync: ``"mean"`` (default): the meta step's result is the mean of per-device estimates
        (one all-reduce; the SAMA paper's and Betty's semantics). ``"full_batch"``
        (methods with ``supports_exact_sync``: SAMA-type): d and the fresh adaptation
        gradient are averaged first, so the result equals the single-device full-batch one
        (two to three all-reduces) **when both losses are means over the batch**, which it
        needs declared by ``loss_reduction="mean"``. ``"exact"`` is its deprecated name.
      loss_reduction: ``"mean"`` declares that each loss's value on a batch is the mean of
        per-example terms plus terms that do not depend on the batch, so the full-batch loss
        is the mean of the losses of equal shards. Required by ``sync="full_batch"``; a ratio
        such as ``Σ w ℓ / Σ w`` is not such a loss (``docs/parallel.md``).
      on_nonfinite: a non-finite base or meta step is always skipped and counted
        (``skipped_base`` / ``skipped_meta``); ``"skip"`` (default) does only that,
        ``"warn"`` also warns (``RuntimeWarning``), ``"raise"`` raises ``FloatingPointError``.
      base_step_along_v: deprecated: the method's ``step_along_v`` alone now decides
        (``True`` still checks that the method has it).
      selection: online data selection (Grangier et al. 2023; :mod:`bilevel_jax.selection`):
        each base batch is a *big* batch; every base step scores it with
        ``selection.score_fn(λ, big)`` (no gradient), keeps ``k`` examples by
        ``selection.rule`` and steps θ on ``train_loss`` of them. The meta step's base loss
        is ``base_loss`` (e.g. the softmax-weighted loss) on the batch ``selection.meta_batch``
        chooses from the last big batch. Under :func:`~bilevel_jax.parallel.data_parallel`
        each device selects from its own shard. Default None: θ trains on ``base_loss``.
      train_loss: with a selection: ``train_loss(θ, batch[, model_state][, rng=]) -> loss``
        (``(loss, model_state)`` with ``stateful=True``), the λ-free loss of the kept
        examples (uniform weights).

    Returns:
      A :class:`BilevelStep`: ``step(state, base_batches, meta_batch) -> (state, metrics)``
      and ``step.init(base_params, meta_params, model_state=, rng=)``.

    >>> import jax, jax.numpy as jnp, optax, bilevel_jax as bj
    >>> base = lambda th, lam, x: jnp.mean((th - x) ** 2) + jnp.sum(lam * th**2)
    >>> meta = lambda th, lam, x: jnp.mean((th - x) ** 2)
    >>> step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1), bj.sama(0.1))
    >>> state = step.init(jnp.zeros(2), jnp.full(2, 0.5))
    >>> for _ in range(3):
    ...     state, metrics = jax.jit(step)(state, jnp.ones((4, 2)), jnp.ones(2))
    >>> int(state.base_steps), int(state.meta_steps), bool(metrics["meta_loss"] < 1.0)
    (12, 3, True)

    With online data selection (Grangier et al. 2023): each base step keeps the 2 best-scored
    of its 8 examples and trains θ on them with uniform weights; the meta step's base loss is
    the softmax-weighted loss on those 2.

    >>> score = lambda lam, x: x @ lam
    >>> per_example = lambda th, x: (x @ th - 1.0) ** 2
    >>> weighted = lambda th, lam, x: jnp.sum(
    ...     bj.selection.softmax_weights(score(lam, x)) * per_example(th, x))
    >>> step = bj.bilevel_step(weighted, lambda th, lam, x: jnp.mean(per_example(th, x)),
    ...                        optax.sgd(0.1), optax.sgd(0.1), bj.sama(0.1),
    ...                        selection=bj.Selection(score_fn=score, keep=2),
    ...                        train_loss=lambda th, x: jnp.mean(per_example(th, x)))
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 3))  # K = 4 big batches of 8
    >>> state, metrics = jax.jit(step)(step.init(jnp.zeros(3), jnp.ones(3)), x, x[0])
    >>> int(state.base_steps), bool(metrics["selected_score"] > metrics["score"])
    (4, True)
    """
    method = sama() if method is None else method
    if base_step_along_v is not None:
        _deprecated("bilevel_step(base_step_along_v=...)", "bj.sama(step_along_v=True)")
        if base_step_along_v and not method.step_along_v:
            raise ValueError(
                f"base_step_along_v=True needs a method that returns a base update; "
                f"{method.name} does not (use bj.sama(..., step_along_v=True))"
            )
    if sync == "exact":
        _deprecated('sync="exact"', 'sync="full_batch"')
        sync = "full_batch"
    return BilevelStep(
        base_loss=base_loss,
        meta_loss=meta_loss,
        base_tx=base_tx,
        meta_tx=meta_tx,
        method=method,
        stateful=stateful,
        use_rng=use_rng,
        compute_dtype=compute_dtype,
        meta_compute_dtype=meta_compute_dtype,
        axis_name=axis_name,
        sync=sync,
        on_nonfinite=on_nonfinite,
        loss_reduction=loss_reduction,
        selection=selection,
        train_loss=train_loss,
    )


def init_bilevel_state(
    step: BilevelStep,
    base_params: PyTree,
    meta_params: PyTree,
    *,
    model_state: PyTree = None,
    rng: jax.Array | None = None,
) -> BilevelState:
    """Deprecated: ``step.init(...)``, a fresh state for ``step``.

    >>> import warnings, jax.numpy as jnp, optax, bilevel_jax as bj
    >>> step = bj.bilevel_step(lambda t, l, b: jnp.sum(t * l), lambda t, l, b: jnp.sum(t),
    ...                        optax.sgd(0.1), optax.sgd(0.1))
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     state = bj.init_bilevel_state(step, jnp.ones(2), jnp.ones(2))
    >>> w[0].category.__name__, int(state.meta_steps)
    ('DeprecationWarning', 0)
    """
    _deprecated("init_bilevel_state(step, ...)", "step.init(...)")
    return step.init(base_params, meta_params, model_state=model_state, rng=rng)


def check_skips(state: Any, max_skips: int | None) -> None:
    """Raise :class:`TooManySkipsError` when more than ``max_skips`` steps were skipped (host-side).

    ``state`` is anything with ``skipped_base`` and ``skipped_meta``.

    >>> from types import SimpleNamespace
    >>> check_skips(SimpleNamespace(skipped_base=1, skipped_meta=0), max_skips=1)  # within
    >>> check_skips(SimpleNamespace(skipped_base=2, skipped_meta=0), max_skips=1)
    Traceback (most recent call last):
    ...
    bilevel_jax.loop.TooManySkipsError: 2 base steps and 0 meta steps were skipped ...
    """
    if max_skips is None:
        return
    base, meta = int(state.skipped_base), int(state.skipped_meta)
    if base > max_skips or meta > max_skips:
        raise TooManySkipsError(
            f"{base} base steps and {meta} meta steps were skipped because their loss or "
            f"gradient was not finite (limit {max_skips}); the state holds the last finite "
            "values. Lower the learning rates, check the data for NaN/inf, or raise max_skips."
        )
