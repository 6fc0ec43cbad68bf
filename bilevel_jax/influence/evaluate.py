r"""Evaluating attributions: the linear datamodeling score (LDS) and brittleness.

An attribution method gives a score ``τ(q, i)`` for every query ``q`` and training example ``i``
(for :mod:`bilevel_jax.influence`, ``τ = influence``: positive when example ``i`` helps ``q``).
The **linear datamodeling score** (Park et al., "TRAK: Attributing Model Behavior at Scale",
ICML 2023; Choe, thesis ch. 4) asks how well the sum of the scores of a training subset ``S``
predicts what a model *retrained on S* does on ``q``:

.. math::

    \mathrm{LDS}(q) = \rho_{\rm Spearman}\Big(\big[\textstyle\sum_{i \in S_j} τ(q, i)\big]_{j},\;
                      \big[y_q(θ^*(S_j))\big]_j\Big),

over ``m`` random subsets ``S_j`` (usually half of the training set), where ``y_q`` is a measure
of how *well* the retrained model does on ``q`` (higher is better: minus the query loss, or the
correct-class margin), so that helpful examples (positive ``τ``) predict a higher ``y_q``. The
subsets are 0/1 per-example weights ``w`` — this library's λ — so the retraining is
``jax.vmap`` of one training function over the masks (:func:`retrain_on_masks`).

**Brittleness** (Ilyas et al. 2022; the thesis' counterfactual test): remove the ``k`` training
examples with the largest scores for a query, retrain, and check whether the query's prediction
flips; a better attribution flips more queries with fewer removals (:func:`top_k_removal_masks`
builds the weights).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["subset_masks", "retrain_on_masks", "spearman", "lds", "top_k_removal_masks"]

PyTree = Any


def subset_masks(key: jax.Array, n: int, num_subsets: int, fraction: float = 0.5) -> jax.Array:
    """``(num_subsets, n)`` 0/1 float32 masks, each keeping ``round(fraction · n)`` examples
    chosen uniformly without replacement (independently per subset).

    >>> import jax
    >>> m = subset_masks(jax.random.PRNGKey(0), 10, 3)
    >>> m.shape, m.sum(axis=1).tolist()
    ((3, 10), [5.0, 5.0, 5.0])
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"subset_masks: n must be an int >= 2, got {n!r}")
    if not isinstance(num_subsets, int) or num_subsets < 1:
        raise ValueError(f"subset_masks: num_subsets must be an int >= 1, got {num_subsets!r}")
    size = round(fraction * n)
    if not 0 < size < n:
        raise ValueError(
            f"subset_masks: fraction={fraction} keeps {size} of {n} examples; it must keep at "
            "least one and drop at least one"
        )
    keys = jax.random.split(key, num_subsets)

    def one(k):
        keep = jax.random.permutation(k, n)[:size]
        return jnp.zeros(n, jnp.float32).at[keep].set(1.0)

    return jax.vmap(one)(keys)


def retrain_on_masks(train_fn: Callable[[jax.Array], PyTree], masks: jax.Array) -> PyTree:
    """``jax.vmap(train_fn)(masks)``: one retraining per mask, all in one compiled program.

    ``train_fn(w)`` trains from a fixed initialisation with per-example weights ``w`` (shape
    ``(n,)``) and returns what the evaluation needs (e.g. the query losses); it must be pure and
    traceable (a ``lax.scan`` or ``lax.fori_loop`` of optimizer steps).

    >>> import jax.numpy as jnp
    >>> x = jnp.array([1.0, 2.0, 3.0, 10.0])
    >>> fit_mean = lambda w: jnp.sum(w * x) / jnp.sum(w)  # "training" a mean with weights w
    >>> retrain_on_masks(fit_mean, jnp.array([[1.0, 1, 1, 0], [1, 1, 1, 1]]))
    Array([2., 4.], dtype=float32)
    """
    masks = jnp.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"retrain_on_masks: masks must be (num_subsets, n), got {masks.shape}")
    return jax.vmap(train_fn)(masks)


def _rank(x: jax.Array) -> jax.Array:
    """Ranks 0..m−1 along the last axis, ties given their average rank."""
    order = jnp.argsort(x, axis=-1)
    ranks = jnp.argsort(order, axis=-1).astype(jnp.result_type(x.dtype, jnp.float32))
    # average the ranks of equal values: mean rank over each group of ties
    eq = x[..., :, None] == x[..., None, :]
    return jnp.sum(jnp.where(eq, ranks[..., None, :], 0.0), -1) / jnp.sum(eq, -1)


def spearman(a: jax.Array, b: jax.Array) -> jax.Array:
    """Spearman's rank correlation of ``a`` and ``b`` along the last axis (ties: average ranks).

    >>> import jax.numpy as jnp
    >>> float(spearman(jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.array([10.0, 20.0, 25.0, 100.0])))
    1.0
    >>> float(spearman(jnp.array([1.0, 2.0, 3.0]), jnp.array([3.0, 2.0, 1.0])))
    -1.0
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != b.shape or a.shape[-1] < 2:
        raise ValueError(
            f"spearman: a and b must have the same shape with >= 2 entries along the last axis; "
            f"got {a.shape} and {b.shape}"
        )
    ra, rb = _rank(a), _rank(b)
    ra = ra - ra.mean(-1, keepdims=True)
    rb = rb - rb.mean(-1, keepdims=True)
    denom = jnp.sqrt(jnp.sum(ra**2, -1) * jnp.sum(rb**2, -1))
    return jnp.sum(ra * rb, -1) / jnp.where(denom > 0, denom, jnp.nan)


def lds(scores: jax.Array, masks: jax.Array, outcomes: jax.Array) -> jax.Array:
    r"""Linear datamodeling score of each query: Spearman over subsets of ``Σ_{i∈S} τ(q, i)``
    against the retrained models' ``outcomes`` (module docstring).

    Args:
      scores: ``(n_query, n_train)`` attribution scores ``τ(q, i)`` (positive = helpful).
      masks: ``(num_subsets, n_train)`` 0/1 weights of the retraining subsets.
      outcomes: ``(num_subsets, n_query)`` how well each retrained model does on each query,
        higher is better (e.g. minus the query loss).

    Returns:
      ``(n_query,)`` LDS values (NaN for a query whose predictions or outcomes are constant
      over the subsets: no ranking to correlate); average them with ``jnp.nanmean``.

    >>> import jax.numpy as jnp
    >>> tau = jnp.array([[1.0, -1.0, 0.5]])               # one query, three training examples
    >>> masks = jnp.array([[1.0, 0, 0], [0, 1, 0], [1, 0, 1], [0, 1, 1]])
    >>> outcomes = (masks @ tau.T) + 0.01                 # a model that is exactly linear
    >>> lds(tau, masks, outcomes).tolist()
    [1.0]
    """
    scores, masks, outcomes = jnp.asarray(scores), jnp.asarray(masks), jnp.asarray(outcomes)
    if scores.ndim != 2 or masks.ndim != 2 or outcomes.ndim != 2:
        raise ValueError(
            "lds: scores (n_query, n_train), masks (num_subsets, n_train) and outcomes "
            f"(num_subsets, n_query) must be 2-D; got {scores.shape}, {masks.shape}, "
            f"{outcomes.shape}"
        )
    if masks.shape[1] != scores.shape[1] or outcomes.shape != (masks.shape[0], scores.shape[0]):
        raise ValueError(
            f"lds: shapes disagree: scores {scores.shape} (n_query, n_train), masks "
            f"{masks.shape} (num_subsets, n_train), outcomes {outcomes.shape} "
            "(num_subsets, n_query)"
        )
    predicted = masks @ scores.T  # (num_subsets, n_query)
    return spearman(predicted.T, outcomes.T)


def top_k_removal_masks(scores: jax.Array, k: int) -> jax.Array:
    """``(n_query, n_train)`` weights that drop, for each query, its ``k`` highest-scored
    (most helpful) training examples and keep the rest (brittleness: retrain on each and see
    whether the query's prediction flips).

    >>> import jax.numpy as jnp
    >>> top_k_removal_masks(jnp.array([[0.1, 3.0, -2.0, 1.0]]), 2)
    Array([[1., 0., 1., 0.]], dtype=float32)
    """
    scores = jnp.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(
            f"top_k_removal_masks: scores must be (n_query, n_train), got {scores.shape}"
        )
    if not isinstance(k, int) or not 0 < k < scores.shape[1]:
        raise ValueError(
            f"top_k_removal_masks: k must be an int in [1, n_train), got {k!r} "
            f"(n_train = {scores.shape[1]})"
        )
    _, top = jax.lax.top_k(scores, k)
    rows = jnp.arange(scores.shape[0])[:, None]
    return jnp.ones(scores.shape, jnp.float32).at[rows, top].set(0.0)
