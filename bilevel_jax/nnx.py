r"""Flax NNX modules as the pure pytrees that :func:`bilevel_jax.bilevel_step` works with.

The library only sees pytrees. An ``nnx.Module`` is split once into a static
``graphdef``, its parameters θ (a pure nested dict: what the optimizer and the
hypergradient see) and the rest (batch statistics, dropout RNG streams…), which
goes in :attr:`BilevelState.model_state <bilevel_jax.BilevelState>` with
``bilevel_step(..., stateful=True)``::

    graphdef, theta, rest = bj.nnx.split_params(model)

    def base_loss(theta, lam, batch, rest):              # stateful=True: returns the new rest
        x, y = batch
        logits, rest = bj.nnx.apply(graphdef, theta, rest, x, train=True)
        return weighted_ce(logits, y, lam), rest

    def meta_loss(theta, lam, batch, rest):              # sees the rest as a constant
        logits, _ = bj.nnx.apply(graphdef, theta, rest, batch[0], train=False)
        return ce(logits, batch[1])

    step  = bj.bilevel_step(base_loss, meta_loss, base_tx, meta_tx, bj.sama(), stateful=True)
    state = step.init(theta, lam, model_state=rest)

Gradients are taken with respect to θ only; the rest is threaded through the base steps
as a non-differentiated value (BatchNorm running averages follow their own update rule),
and the meta step's finite differences all see the same rest (so the same dropout mask).

Flax is imported when these functions are called, never at ``import bilevel_jax``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["split_params", "merge", "apply"]

PyTree = Any


def _param_filter(wrt):
    from flax import nnx

    return nnx.Param if wrt is None else wrt


def split_params(module, wrt=None) -> tuple[Any, dict, dict]:
    """Split an ``nnx.Module`` into ``(graphdef, params, rest)`` (the last two pure dicts).

    Args:
      module: the module.
      wrt: the NNX filter of the differentiated variables (default ``nnx.Param``).

    Returns:
      ``graphdef`` (static), ``params`` (θ or λ: a nested dict of arrays, ready for optax
      and checkpoints) and ``rest`` (every other variable: batch statistics, RNG keys and
      counts; ``{}`` if there are none).

    Example:
      >>> from flax import nnx
      >>> graphdef, params, rest = split_params(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> sorted(params), params["kernel"].shape, rest
      (['bias', 'kernel'], (2, 3), {})
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(module, _param_filter(wrt), ...)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def merge(graphdef, params: PyTree, rest: PyTree | None = None):
    """Rebuild the module from :func:`split_params`' pieces (``rest=None`` means ``{}``).

    Example:
      >>> from flax import nnx
      >>> graphdef, params, _ = split_params(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> type(merge(graphdef, params)).__name__
      'Linear'
    """
    from flax import nnx

    return nnx.merge(graphdef, params, {} if rest is None else rest)


def apply(graphdef, params: PyTree, rest: PyTree, *args, wrt=None, method=None, **kwargs):
    """Call the module rebuilt from ``(graphdef, params, rest)``; returns ``(out, new_rest)``.

    ``new_rest`` holds the variables the call updated (BatchNorm running averages in
    training mode, advanced RNG counts), as a pure dict shaped like ``rest``; pass it
    back as the base loss's new model state.

    Args:
      graphdef: from :func:`split_params`.
      params: from :func:`split_params`.
      rest: from :func:`split_params`.
      *args: the call's positional arguments (e.g. ``x``).
      **kwargs: the call's keyword arguments (e.g. ``train=True``).
      wrt: the filter given to :func:`split_params` (default ``nnx.Param``).
      method: call this method by name instead of ``__call__``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> graphdef, params, rest = split_params(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))
      >>> out, new_rest = apply(graphdef, params, rest, jnp.ones((4, 2)))
      >>> out.shape, new_rest
      ((4, 3), {})
    """
    from flax import nnx

    module = merge(graphdef, params, rest)
    fn = module if method is None else getattr(module, method)
    out = fn(*args, **kwargs)
    _, _, new_rest = nnx.split(module, _param_filter(wrt), ...)
    return out, nnx.to_pure_dict(new_rest)
