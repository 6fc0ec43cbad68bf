r"""The bilevel training step: K base steps (``lax.scan``) then one meta step, as one pure function.

    step  = bj.bilevel_step(base_loss, meta_loss, base_tx, meta_tx, bj.sama())
    state = bj.init_bilevel_state(step, base_params, meta_params, rng=jax.random.PRNGKey(0))
    state, metrics = jax.jit(step, donate_argnums=0)(state, base_batches, meta_batch)

``base_batches`` is a pytree whose leaves have a leading axis of length K (one base
batch per step); ``meta_batch`` is one meta batch. Each call

1. takes K base steps ``θ ← θ + Δ(∇_θ L_b(θ, λ; B_k), s, θ)`` with ``base_tx``,
   carrying the last step's gradient and pre-update state so that SAMA's
   ``adapt_from="last"`` needs no extra pass;
2. computes the hypergradient of ``method`` at the final θ on the last base batch and
   the meta batch, and updates λ with ``meta_tx`` (any optax optimizer);
3. optionally applies the method's base step along v (``θ ← θ − εv``, SAMA §3.2).

**Safe failure.** A base step whose loss or gradient is not finite leaves θ and the
base optimizer state bit-identical and increments ``skipped_base``; a meta step whose
hypergradient is not finite leaves λ, the meta optimizer state and the method state
unchanged and increments ``skipped_meta`` (like ``optax.apply_if_finite``). Use
:func:`check_skips` (or :func:`bilevel_jax.fit`'s ``max_skips``) to stop a run that
keeps failing. As in ``optax.apply_if_finite``, the base step checks the loss and the
gradient, not the update: an optimizer that turns a finite gradient into a non-finite
update is not caught there. When the *last* base step is skipped, SAMA's
``adapt_from="last"`` sees its non-finite gradient and the meta step is skipped too.

**Stateful models.** With ``stateful=True`` the losses take a fourth argument, the
non-differentiated ``model_state`` (batch statistics, RNG streams…), and
``base_loss`` returns ``(loss, new_model_state)``; the new state is threaded through
the base steps, and the meta step sees it as a constant.

**RNG.** With ``use_rng=True`` the losses also receive ``rng=`` (a fresh key per base
step, and one for the meta step) split from ``state.rng``.

**Data parallelism** (``axis_name``, set by :func:`bilevel_jax.parallel.data_parallel`).
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
after bf16 base steps cosine 1.0000 (``tests/test_mixed_precision.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel_jax import _checks
from bilevel_jax.hypergrad.base import BilevelInputs, BilevelProblem, HypergradMethod, all_finite
from bilevel_jax.hypergrad.sama import sama

__all__ = [
    "BilevelState",
    "BilevelStep",
    "bilevel_step",
    "init_bilevel_state",
    "check_skips",
    "TooManySkipsError",
]

PyTree = Any


class TooManySkipsError(FloatingPointError):
    """Raised when more base or meta steps were skipped as non-finite than allowed."""


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
      step: base steps taken (including skipped ones).
      meta_step: meta steps taken (including skipped ones).
      skipped_base: base steps skipped because their loss or gradient was not finite.
      skipped_meta: meta steps skipped because their hypergradient was not finite.
    """

    base_params: PyTree
    meta_params: PyTree
    base_opt_state: optax.OptState
    meta_opt_state: optax.OptState
    method_state: PyTree
    model_state: PyTree
    rng: jax.Array
    step: jax.Array
    meta_step: jax.Array
    skipped_base: jax.Array
    skipped_meta: jax.Array


def _select(ok, new, old):
    return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)


def _inexact(x) -> bool:
    return jnp.issubdtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x), jnp.inexact)


def _cast_floats(tree, dtype):
    if dtype is None:
        return tree
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree
    )


@dataclasses.dataclass(frozen=True)
class BilevelStep:
    """The pure step built by :func:`bilevel_step`; call it as ``step(state, base_batches, meta_batch)``."""

    base_loss: Callable
    meta_loss: Callable
    base_tx: optax.GradientTransformation
    meta_tx: optax.GradientTransformation
    method: HypergradMethod
    base_step_along_v: bool = False
    stateful: bool = False
    use_rng: bool = False
    compute_dtype: Any = None
    meta_compute_dtype: Any = None
    axis_name: str | None = None
    sync: str = "mean"

    def __post_init__(self):
        if self.sync not in ("mean", "exact"):
            raise ValueError(f"sync must be 'mean' or 'exact', got {self.sync!r}")
        if self.sync == "exact" and not hasattr(self.method, "axis_name"):
            raise ValueError(
                f"sync='exact' is implemented for SAMA-type methods (sama, sama_na, darts); "
                f"{self.method.name} supports the default sync='mean' (mean of per-device estimates)"
            )

    def _local(self, tree):
        """Mark replicated floating values as per-device, so gradients stay local (DESIGN §4)."""
        if self.axis_name is None:
            return tree
        return jax.tree.map(
            lambda x: jax.lax.pcast(x, self.axis_name, to="varying") if _inexact(x) else x, tree
        )

    def _mean(self, tree):
        """One all-reduce: flatten the floating leaves of ``tree`` into one buffer and average
        it over devices. Other leaves (counters, PRNG keys) must already agree across devices
        (they do when they do not depend on the data) and are passed through."""
        if self.axis_name is None:
            return tree
        leaves, treedef = jax.tree.flatten(tree)
        idx = [i for i, x in enumerate(leaves) if _inexact(x)]
        flat, unravel = ravel_pytree([leaves[i] for i in idx])
        for i, m in zip(idx, unravel(jax.lax.pmean(flat, self.axis_name))):
            leaves[i] = m
        return jax.tree.unflatten(treedef, leaves)

    def _key(self, rng):
        """Under data parallelism each device draws its own randomness (dropout masks…)."""
        if self.axis_name is None:
            return rng
        return jax.random.fold_in(rng, jax.lax.axis_index(self.axis_name))

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
            step=zero,
            meta_step=zero,
            skipped_base=zero,
            skipped_meta=zero,
        )
        return jax.tree.map(lambda x: jnp.array(x, copy=True), state)

    def _check(self, state: BilevelState, base_batches: PyTree) -> int:
        leaves = jax.tree.leaves(base_batches)
        if not leaves:
            raise _checks.BilevelInputError("base_batches is empty: it has no array leaves")
        sizes = {x.shape[0] if jnp.ndim(x) else None for x in leaves}
        if len(sizes) != 1 or None in sizes:
            raise _checks.BilevelInputError(
                "every leaf of base_batches needs the same leading axis (the K base steps); "
                f"got leading sizes {sorted(map(str, sizes))}"
            )
        k = sizes.pop()
        if k == 0:
            raise _checks.BilevelInputError(
                "base_batches has K = 0 base steps; K must be at least 1"
            )
        for p, x in jax.tree_util.tree_flatten_with_path(base_batches)[0]:
            if jnp.ndim(x) >= 2 and x.shape[1] == 0:
                raise _checks.BilevelInputError(
                    f"base batch leaf {jax.tree_util.keystr(p)} is empty (shape {x.shape})"
                )
        _checks.opt_state_matches(self.base_tx, state.base_opt_state, state.base_params)
        _checks.opt_state_matches(self.meta_tx, state.meta_opt_state, state.meta_params)
        first = jax.tree.map(lambda x: x[0], base_batches)
        key = jax.random.PRNGKey(0)
        _checks.scalar_loss(
            lambda th, lam, b: self._base(state.model_state, key, self.compute_dtype)(th, lam, b)[
                0
            ],
            "base_loss",
            state.base_params,
            state.meta_params,
            first,
        )
        return k

    def __call__(
        self, state: BilevelState, base_batches: PyTree, meta_batch: PyTree
    ) -> tuple[BilevelState, dict]:
        """K base steps then one meta step; returns the new state and scalar metrics."""
        self._check(state, base_batches)
        rng, base_rng, meta_rng = jax.random.split(state.rng, 3)
        k = jax.tree.leaves(base_batches)[0].shape[0]
        base_keys = jax.random.split(base_rng, k)

        def base_step(carry, batch, key):
            """One base step; also returns its gradient and pre-update state (for "last")."""
            theta, s, model_state, skipped = carry
            (loss, new_model_state), g = jax.value_and_grad(
                self._base(model_state, key, self.compute_dtype), has_aux=True
            )(self._local(theta), self._local(state.meta_params), batch)
            # one all-reduce: the gradient, the loss and (stateful models) the new model state
            g, loss, new_model_state = self._mean((g, loss, new_model_state))
            # Like optax.apply_if_finite, the gradient (and loss) is checked, not the update,
            # and the update runs under lax.cond rather than being computed and then selected
            # with jnp.where: measured on the 784-1024-1024-10 MLP, checking g and the update
            # and selecting cost 17 % of a base step, the cond costs nothing measurable.
            ok = jnp.isfinite(loss) & all_finite(g)

            def apply(_):
                upd, s_new = self.base_tx.update(g, s, theta)
                return optax.apply_updates(theta, upd), s_new, new_model_state

            theta_new, s_new, model_state = jax.lax.cond(
                ok, apply, lambda _: (theta, s, model_state), None
            )
            return (
                (theta_new, s_new, model_state, skipped + (~ok).astype(jnp.int32)),
                (loss, ok),
                (g, s),
            )

        # K − 1 steps in a scan and the last one outside it, so that the last step's gradient
        # and state (SAMA's adapt_from="last") come for free instead of being carried through
        # every step (measured: carrying them cost 18 % of a base step on a 1.9M-param MLP)
        init = (
            state.base_params,
            state.base_opt_state,
            state.model_state,
            jnp.zeros([], jnp.int32),
        )
        base_batches = jax.tree.map(jnp.asarray, base_batches)
        carry, (losses, oks) = jax.lax.scan(  # indexes the batches in place (no sliced copy)
            lambda c, i: base_step(c, jax.tree.map(lambda x: x[i], base_batches), base_keys[i])[:2],
            init,
            jnp.arange(k - 1),
        )
        last_batch = jax.tree.map(lambda x: x[-1], base_batches)
        (theta, s, model_state, n_skip), (loss_k, ok_k), (last_g, last_s) = base_step(
            carry, last_batch, base_keys[-1]
        )
        losses = jnp.concatenate([losses, loss_k[None]])
        oks = jnp.concatenate([oks, ok_k[None]])

        meta_dtype = self.meta_compute_dtype
        base_fn = lambda th, lam, b: self._base(model_state, meta_rng, meta_dtype)(th, lam, b)[0]  # noqa: E731
        problem = BilevelProblem(
            base_fn, self._meta(model_state, meta_rng, meta_dtype), self.base_tx
        )
        # under data parallelism every input of the meta step is per-device (local estimates)
        inputs = BilevelInputs(
            *self._local((theta, state.meta_params, s)),
            last_batch,
            meta_batch,
            *self._local((last_g, last_s)),
        )
        method = self.method
        if self.sync == "exact" and self.axis_name is not None:
            method = dataclasses.replace(method, axis_name=self.axis_name)
        hg, method_state = method.hypergrad(problem, inputs, self._local(state.method_state))
        if self.axis_name is not None:  # the mean of per-device estimates, in one all-reduce
            meta_grad, base_update, meta_loss, info, method_state = self._mean(
                (hg.meta_grad, hg.base_update, hg.meta_loss, hg.info, method_state)
            )
            hg = hg._replace(
                meta_grad=meta_grad,
                base_update=base_update,
                meta_loss=meta_loss,
                info=info,
                finite=all_finite(meta_grad, base_update),
            )
        upd, meta_opt_state = self.meta_tx.update(
            hg.meta_grad, state.meta_opt_state, state.meta_params
        )
        ok = hg.finite & all_finite(upd)
        meta_params = _select(ok, optax.apply_updates(state.meta_params, upd), state.meta_params)
        if self.base_step_along_v:
            if hg.base_update is None:
                raise ValueError(
                    f"base_step_along_v=True needs a method that returns a base update; "
                    f"{self.method.name} does not (use bj.sama(..., base_step=True))"
                )
            theta = _select(ok, optax.apply_updates(theta, hg.base_update), theta)

        new_state = BilevelState(
            base_params=theta,
            meta_params=meta_params,
            base_opt_state=s,
            meta_opt_state=_select(ok, meta_opt_state, state.meta_opt_state),
            method_state=_select(ok, method_state, state.method_state),
            model_state=model_state,
            rng=rng,
            step=state.step + k,
            meta_step=state.meta_step + 1,
            skipped_base=state.skipped_base + n_skip,
            skipped_meta=state.skipped_meta + (~ok).astype(jnp.int32),
        )
        good = jnp.maximum(jnp.sum(oks), 1)
        metrics = {
            "base_loss": jnp.sum(jnp.where(oks, losses, 0.0)) / good,
            "meta_loss": jnp.asarray(hg.meta_loss, jnp.float32),
            "hypergrad_norm": optax.tree.norm(hg.meta_grad).astype(jnp.float32),
            "base_skipped": n_skip,
            "meta_skipped": (~ok).astype(jnp.int32),
            **{k_: jnp.asarray(v, jnp.float32) for k_, v in hg.info.items()},
        }
        return new_state, metrics


def bilevel_step(
    base_loss: Callable,
    meta_loss: Callable,
    base_tx: optax.GradientTransformation,
    meta_tx: optax.GradientTransformation,
    method: HypergradMethod | None = None,
    *,
    base_step_along_v: bool = False,
    stateful: bool = False,
    use_rng: bool = False,
    compute_dtype: Any = None,
    meta_compute_dtype: Any = None,
    axis_name: str | None = None,
    sync: str = "mean",
) -> BilevelStep:
    r"""Build the pure, jit-able bilevel step (see the module docstring).

    Args:
      base_loss: ``L_b(θ, λ, batch[, model_state][, rng=]) -> loss`` (``(loss, model_state)``
        with ``stateful=True``).
      meta_loss: ``L_m(θ, λ, batch[, model_state][, rng=]) -> loss``.
      base_tx: the optimizer of θ.
      meta_tx: the optimizer of λ (applied to the hypergradient, e.g. ``optax.adam(1e-3)``).
      method: the hypergradient method (default ``bj.sama()``).
      base_step_along_v: apply the method's base update after each meta step (SAMA with
        ``base_step=True``).
      stateful: the losses take and ``base_loss`` returns a non-differentiated model state.
      use_rng: pass ``rng=`` keys split from ``state.rng`` to the losses.
      compute_dtype: e.g. ``jnp.bfloat16`` to run the base steps in bf16 over float32 masters.
      meta_compute_dtype: the dtype the meta step's losses run in (default: the parameters'
        own, float32 under mixed precision; bf16 here breaks SAMA's finite difference).
      axis_name: inside ``shard_map``/``pmap`` over this axis, average each base step's
        gradient in one all-reduce and the meta step's per-device results in one more
        (:func:`bilevel_jax.parallel.data_parallel` sets it for you).
      sync: ``"mean"`` (default): the meta step's result is the mean of per-device estimates
        (one all-reduce; the SAMA paper's and Betty's semantics). ``"exact"`` (SAMA-type
        methods): d and the fresh adaptation gradient are averaged first, so the result equals
        the single-device full-batch one (two to three all-reduces).

    Returns:
      A :class:`BilevelStep`: ``step(state, base_batches, meta_batch) -> (state, metrics)``
      and ``step.init(base_params, meta_params, model_state=, rng=)``.
    """
    return BilevelStep(
        base_loss,
        meta_loss,
        base_tx,
        meta_tx,
        sama() if method is None else method,
        base_step_along_v,
        stateful,
        use_rng,
        compute_dtype,
        meta_compute_dtype,
        axis_name,
        sync,
    )


def init_bilevel_state(
    step: BilevelStep,
    base_params: PyTree,
    meta_params: PyTree,
    *,
    model_state: PyTree = None,
    rng: jax.Array | None = None,
) -> BilevelState:
    """``step.init(...)``: a fresh state for ``step``."""
    return step.init(base_params, meta_params, model_state=model_state, rng=rng)


def check_skips(state: BilevelState, max_skips: int | None) -> None:
    """Raise :class:`TooManySkipsError` when more than ``max_skips`` steps were skipped (host-side)."""
    if max_skips is None:
        return
    base, meta = int(state.skipped_base), int(state.skipped_meta)
    if base > max_skips or meta > max_skips:
        raise TooManySkipsError(
            f"{base} base steps and {meta} meta steps were skipped because their loss or "
            f"gradient was not finite (limit {max_skips}); the state holds the last finite "
            "values. Lower the learning rates, check the data for NaN/inf, or raise max_skips."
        )
