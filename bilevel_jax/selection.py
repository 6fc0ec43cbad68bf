r"""Online data selection: score a big batch, keep a fraction of it, train θ on the kept part.

Grangier, Ablin & Hannun, "Bilevel Optimization to Learn Training Distributions for Language
Modeling under Domain Shift" (arXiv:2311.11973). A cheap weighting network ``w(x; λ)`` scores
each example of a **big** generic batch :math:`B` of ``n`` examples; each base step keeps
``k`` of them — the ``k`` best scores (:func:`top_k`), ``k`` drawn without replacement with
probabilities :math:`\propto \mathrm{softmax}(s)` (:func:`sample_without_replacement`), or
``k`` uniformly at random (:func:`uniform`) — and steps θ on the kept examples :math:`S` with
**uniform** weights,

.. math::

    \theta \leftarrow \theta + \Delta\Big(\nabla_\theta \tfrac{1}{k}\textstyle\sum_{i\in S}
    \ell_i(\theta)\Big), \qquad S = \mathrm{select}(s(\lambda; B)),

a base loss that does not depend on λ (the choice of ``S`` carries no gradient). λ is learnt
by a hypergradient method whose base loss is the **weighted** loss
:math:`L_b(\theta, \lambda; B') = \sum_{i \in B'} w_i(\lambda)\, \ell_i(\theta)` with
:math:`w = \mathrm{softmax}(s(\lambda; B'))` over the batch (:func:`softmax_weights`), on a
batch :math:`B'` chosen by :attr:`Selection.meta_batch`: the selected examples, a uniformly
random subset of the big batch, or the whole big batch.

:class:`Selection` holds these choices; pass it to :func:`bilevel_jax.bilevel_step` together
with the λ-free ``train_loss(θ, batch)``::

    sel = bj.selection.Selection(score_fn=lambda lam, b: b["x"] @ lam, keep=0.25)
    step = bj.bilevel_step(weighted_loss, meta_loss, base_tx, meta_tx, bj.sama(),
                           selection=sel, train_loss=uniform_loss)

The functions here are pure and choose under ``jax.lax.stop_gradient``: indices are integers,
so no gradient flows through the choice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax import _checks

__all__ = [
    "Selection",
    "top_k",
    "sample_without_replacement",
    "uniform",
    "lookup",
    "contrastive_scores",
    "gather",
    "batch_size",
    "softmax_weights",
    "sigmoid_weights",
    "weighted_mean",
]

PyTree = Any
RULES = ("top_k", "sample", "uniform")
META_BATCHES = ("selected", "random", "big")


def _check_k(k: Any, n: int, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{what} must be a Python int, got {k!r}")
    if not 1 <= k <= n:
        raise ValueError(f"{what} must be between 1 and the batch size {n}, got {k}")
    return k


def _check_scores(scores: jax.Array, name: str = "scores") -> jax.Array:
    scores = jnp.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f"{name} must be one score per example, shape (n,); got {scores.shape}")
    if not jnp.issubdtype(scores.dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got {scores.dtype}")
    return scores


def top_k(scores: jax.Array, k: int) -> jax.Array:
    r"""The indices of the ``k`` largest scores, best first: :math:`S = \arg\mathrm{top}_k\, s`.

    Ties go to the lower index (as in ``jax.lax.top_k``; ``np.argsort(-s, kind="stable")[:k]``).
    The scores are ``stop_gradient``-ed: the choice carries no gradient.

    Args:
      scores: ``(n,)`` floating scores.
      k: how many to keep, ``1 <= k <= n``.

    Returns:
      ``(k,)`` int32 indices, sorted by score, largest first.

    >>> import jax.numpy as jnp
    >>> top_k(jnp.array([0.1, 3.0, -1.0, 3.0, 2.0]), 3)
    Array([1, 3, 4], dtype=int32)
    """
    scores = _check_scores(scores)
    _check_k(k, scores.shape[0])
    return jax.lax.top_k(jax.lax.stop_gradient(scores), k)[1].astype(jnp.int32)


def sample_without_replacement(key: jax.Array, logits: jax.Array, k: int) -> jax.Array:
    r"""``k`` distinct indices drawn with probabilities :math:`\propto \mathrm{softmax}(\text{logits})`.

    Gumbel-top-k (Vieira 2014; Kool, van Hoof & Welling, "Stochastic Beams and Where to Find
    Them", ICML 2019): with :math:`g_i` i.i.d. standard Gumbel,
    :math:`\arg\mathrm{top}_k(\text{logits} + g)` is distributed as drawing ``k`` times without
    replacement, each draw picking a remaining ``i`` with probability
    :math:`e^{\text{logits}_i} / \sum_{j \text{ remaining}} e^{\text{logits}_j}`. In particular
    the first index is distributed as ``softmax(logits)``. The logits are ``stop_gradient``-ed.
    A ``-inf`` logit is never drawn while finite ones remain.

    Args:
      key: a PRNG key.
      logits: ``(n,)`` floating unnormalised log-probabilities.
      k: how many to draw, ``1 <= k <= n``.

    Returns:
      ``(k,)`` distinct int32 indices, in the order drawn.

    >>> import jax, jax.numpy as jnp
    >>> idx = sample_without_replacement(jax.random.PRNGKey(0), jnp.zeros(6), 4)
    >>> idx.shape, idx.dtype, len(set(idx.tolist()))
    ((4,), dtype('int32'), 4)
    """
    logits = _check_scores(logits, "logits")
    _check_k(k, logits.shape[0])
    g = jax.random.gumbel(key, logits.shape, logits.dtype)
    return top_k(jax.lax.stop_gradient(logits) + g, k)


def uniform(key: jax.Array, n: int, k: int) -> jax.Array:
    """``k`` distinct indices of ``range(n)``, uniformly at random (a random permutation's head).

    Args:
      key: a PRNG key.
      n: the batch size.
      k: how many to draw, ``1 <= k <= n``.

    Returns:
      ``(k,)`` distinct int32 indices.

    >>> import jax
    >>> idx = uniform(jax.random.PRNGKey(0), 10, 3)
    >>> idx.shape, bool(((idx >= 0) & (idx < 10)).all()), len(set(idx.tolist()))
    ((3,), True, 3)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive Python int, got {n!r}")
    _check_k(k, n)
    return jax.random.permutation(key, n)[:k].astype(jnp.int32)


def lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """Precomputed per-example values by example id: ``table[ids]`` (e.g. scores of a fixed scorer).

    ``table`` has one row per example id of the dataset and ``ids`` are the batch's example ids.
    Concrete ``ids`` outside ``[0, len(table))`` raise ``IndexError``; under ``jit`` they give
    NaN (negative ids do not wrap around), which makes a selection step skip (never a silent
    wrong choice).

    >>> import jax.numpy as jnp
    >>> lookup(jnp.array([0.5, -1.0, 2.0]), jnp.array([2, 0]))
    Array([2. , 0.5], dtype=float32)
    """
    table, ids = jnp.asarray(table), jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be integer example ids, got {ids.dtype}")
    if table.ndim < 1 or not jnp.issubdtype(table.dtype, jnp.floating):
        raise TypeError(
            f"table must be a floating array with one row per example id; got "
            f"{table.dtype}{list(table.shape)}"
        )
    try:
        concrete = np.asarray(ids)
    except jax.errors.TracerArrayConversionError:  # under jit: no check, NaN for a bad id
        concrete = None
    if concrete is not None and concrete.size:
        lo, hi = int(concrete.min()), int(concrete.max())
        if lo < 0 or hi >= table.shape[0]:
            raise IndexError(
                f"example ids must lie in [0, {table.shape[0]}) (the table's rows); "
                f"got ids from {lo} to {hi}"
            )
    n = table.shape[0]
    ok = (ids >= 0) & (ids < n)  # no wrap-around of negative ids
    values = jnp.take(table, jnp.clip(ids, 0, n - 1), axis=0)
    return jnp.where(ok.reshape(ok.shape + (1,) * (table.ndim - 1)), values, jnp.nan)


def contrastive_scores(
    per_example_loss: Callable[[PyTree, PyTree], jax.Array],
    theta_generic: PyTree,
    theta_specific: PyTree,
    batch: PyTree,
) -> jax.Array:
    r"""Contrastive data selection scores, :math:`s_i = \ell(\theta_g; x_i) - \ell(\theta_s; x_i)`.

    The cross-entropy difference of Moore & Lewis, "Intelligent Selection of Language Model
    Training Data", ACL 2010, as used online by Wang et al., "Denoising Neural Machine
    Translation Training with Trusted Data and Online Data Selection", WMT 2018: ``θ_g`` is a
    model trained on the generic data, ``θ_s`` the same model fine-tuned on the target
    (specific) data, and an example scores high when the specific model explains it better
    than the generic one. The scorer is fixed, so compute the scores once per dataset and
    select with :func:`lookup` (a table by example id) and ``Selection(rule="top_k")``.

    Args:
      per_example_loss: ``per_example_loss(theta, batch) -> (n,)``, one loss per example.
      theta_generic: the generic model's parameters, :math:`\theta_g`.
      theta_specific: the target-fine-tuned model's parameters, :math:`\theta_s`.
      batch: the examples to score (leading axis = examples).

    Returns:
      ``(n,)`` scores, ``per_example_loss(theta_generic, batch) -
      per_example_loss(theta_specific, batch)``.

    >>> import jax.numpy as jnp
    >>> loss = lambda th, x: (x - th) ** 2  # a model is a mean; the loss, a squared error
    >>> contrastive_scores(loss, 0.0, 2.0, jnp.array([0.0, 1.0, 2.0]))  # generic 0, target 2
    Array([-4.,  0.,  4.], dtype=float32)
    """
    if not callable(per_example_loss):
        raise TypeError(
            "contrastive_scores: per_example_loss must be a callable per_example_loss(theta, "
            f"batch) -> (n,) losses, got {per_example_loss!r}"
        )
    losses = []
    for which, theta in (("theta_generic", theta_generic), ("theta_specific", theta_specific)):
        out = jnp.asarray(per_example_loss(theta, batch))
        if out.ndim != 1:
            raise ValueError(
                f"contrastive_scores: per_example_loss({which}, batch) must return one loss per "
                f"example, shape (n,); got shape {out.shape}"
            )
        if not jnp.issubdtype(out.dtype, jnp.floating):
            raise TypeError(
                f"contrastive_scores: per_example_loss({which}, batch) must return floating "
                f"losses, got {out.dtype}"
            )
        losses.append(out)
    generic, specific = losses
    if generic.shape != specific.shape:
        raise ValueError(
            "contrastive_scores: per_example_loss returned shapes "
            f"{generic.shape} (theta_generic) and {specific.shape} (theta_specific) on the "
            "same batch; they must match"
        )
    return generic - specific


def gather(batch: PyTree, idx: jax.Array) -> PyTree:
    """The examples ``idx`` of a batch: ``x[idx]`` for every leaf (leading axis = examples).

    >>> import jax.numpy as jnp
    >>> b = {"x": jnp.arange(8.0).reshape(4, 2), "y": jnp.arange(4)}
    >>> gather(b, jnp.array([3, 1]))["y"]
    Array([3, 1], dtype=int32)
    """
    return jax.tree.map(lambda x: jnp.asarray(x)[idx], batch)


def softmax_weights(scores: jax.Array) -> jax.Array:
    r"""Weights over the batch, :math:`w_i = e^{s_i} / \sum_j e^{s_j}` (they sum to 1).

    The weighted base loss of Grangier et al. is :math:`\sum_i w_i \ell_i(\theta)`.

    >>> import jax.numpy as jnp
    >>> w = softmax_weights(jnp.array([0.0, 0.0, jnp.log(2.0)]))
    >>> w, float(w.sum())
    (Array([0.25, 0.25, 0.5 ], dtype=float32), 1.0)
    """
    return jax.nn.softmax(_check_scores(scores))


def sigmoid_weights(scores: jax.Array) -> jax.Array:
    r"""Per-example weights in (0, 1), :math:`w_i = \sigma(s_i) = 1 / (1 + e^{-s_i})`.

    Use with :func:`weighted_mean` (they do not sum to 1).

    >>> import jax.numpy as jnp
    >>> sigmoid_weights(jnp.array([0.0, 100.0]))
    Array([0.5, 1. ], dtype=float32)
    """
    return jax.nn.sigmoid(_check_scores(scores))


def weighted_mean(losses: jax.Array, weights: jax.Array) -> jax.Array:
    r"""The weighted mean :math:`\sum_i w_i \ell_i / \sum_i w_i` of per-example losses.

    With :func:`softmax_weights` the denominator is 1 and this is :math:`\sum_i w_i \ell_i`.

    >>> import jax.numpy as jnp
    >>> weighted_mean(jnp.array([1.0, 3.0]), jnp.array([1.0, 3.0]))
    Array(2.5, dtype=float32)
    """
    losses, weights = jnp.asarray(losses), jnp.asarray(weights)
    if losses.shape != weights.shape:
        raise ValueError(
            f"losses and weights need the same shape; got {losses.shape} and {weights.shape}"
        )
    return jnp.sum(weights * losses) / jnp.sum(weights)


def _count(value: Any, n: int, what: str) -> int:
    """An int count, or a fraction of ``n`` rounded to the nearest int (at least 1)."""
    k = value if isinstance(value, int) else max(1, round(value * n))
    if k > n:
        raise ValueError(
            f"Selection: {what}={value!r} keeps more examples than the big batch has ({n}); "
            f"use at most {n} (under data parallelism: the per-device batch) or a fraction"
        )
    return k


def _check_amount(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Selection: {what} must be an int count or a float fraction in (0, 1], got {value!r}"
        )
    if isinstance(value, int) and value < 1:
        raise ValueError(f"Selection: {what} must be at least 1 example, got {value}")
    if isinstance(value, float) and not 0.0 < value <= 1.0:
        raise ValueError(f"Selection: {what} as a fraction must lie in (0, 1], got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Selection:
    r"""How each base step chooses its examples from a big batch (Grangier et al. 2023).

    Each base step scores its big batch of ``n`` examples, :math:`s = \text{score\_fn}(\lambda,
    B)` (under ``stop_gradient``), keeps ``k`` of them by ``rule`` and steps θ on
    ``train_loss(θ, B[S])`` (:func:`bilevel_jax.bilevel_step`'s ``train_loss``, uniform
    weights). The meta step's base loss (``base_loss(θ, λ, batch)``, typically
    :math:`\sum_i \mathrm{softmax}(s)_i \ell_i`) is evaluated on the batch ``meta_batch`` chooses
    from the **last** base step's big batch.

    Attributes:
      score_fn: ``score_fn(meta_params, big_batch) -> (n,)`` scores, one per example.
      keep: the examples kept per base step: an int count, or a float fraction in (0, 1] of
        the big batch (``k = max(1, round(keep · n))``). Under data parallelism ``n`` is the
        per-device batch: each device selects from its own shard.
      rule: ``"top_k"`` (the ``k`` best scores, :func:`top_k`), ``"sample"`` (``k`` without
        replacement ∝ ``softmax(scores)``, :func:`sample_without_replacement`) or
        ``"uniform"`` (``k`` uniformly at random, scores unused, :func:`uniform`).
      meta_batch: the meta step's base batch: ``"selected"`` (the last step's kept examples),
        ``"random"`` (a uniform random subset of the last big batch, ``meta_size`` examples)
        or ``"big"`` (the whole last big batch).
      meta_size: with ``meta_batch="random"``: its size, an int count or a fraction of the big
        batch (default: ``keep``). Not allowed with the other ``meta_batch`` choices.

    The random draws come from keys split off ``state.rng``, so a run (and a resumed run) is
    deterministic.

    >>> import jax.numpy as jnp, bilevel_jax as bj
    >>> def score(lam, batch):
    ...     return batch["x"] @ lam
    >>> sel = bj.selection.Selection(score_fn=score, keep=0.25, rule="sample")
    >>> sel
    Selection(score_fn=score, keep=0.25, rule='sample', meta_batch='selected', meta_size=None)
    >>> sel.keep_count(32), sel.meta_count(32)
    (8, 8)
    >>> bj.selection.Selection(score_fn=score, keep=0)
    Traceback (most recent call last):
    ...
    ValueError: Selection: keep must be at least 1 example, got 0
    """

    score_fn: Callable[[PyTree, PyTree], jax.Array]
    keep: int | float
    rule: str = "top_k"
    meta_batch: str = "selected"
    meta_size: int | float | None = None

    def __post_init__(self):
        if not callable(self.score_fn):
            raise TypeError(
                "Selection: score_fn must be a callable score_fn(meta_params, big_batch) -> (n,) "
                f"scores, got {self.score_fn!r}"
            )
        _check_amount(self.keep, "keep")
        if self.rule not in RULES:
            raise ValueError(f"Selection: rule must be one of {RULES}, got {self.rule!r}")
        if self.meta_batch not in META_BATCHES:
            raise ValueError(
                f"Selection: meta_batch must be one of {META_BATCHES}, got {self.meta_batch!r}"
            )
        if self.meta_size is not None:
            if self.meta_batch != "random":
                raise ValueError(
                    f"Selection: meta_size sets the size of meta_batch='random'; with "
                    f"meta_batch={self.meta_batch!r} the size is given, drop meta_size"
                )
            _check_amount(self.meta_size, "meta_size")

    def __repr__(self) -> str:
        args = ", ".join(
            f"{f.name}={_checks.callable_repr(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
        )
        return f"Selection({args})"

    @property
    def needs_key(self) -> bool:
        """Whether the rule draws randomness (``"sample"``, ``"uniform"``).

        >>> Selection(score_fn=lambda lam, b: b, keep=2).needs_key
        False
        """
        return self.rule != "top_k"

    def keep_count(self, n: int) -> int:
        """``k``, the examples kept out of a big batch of ``n`` (checked against ``n``).

        >>> Selection(score_fn=lambda lam, b: b, keep=0.5).keep_count(7)
        4
        """
        return _count(self.keep, n, "keep")

    def meta_count(self, n: int) -> int:
        """The size of the meta step's base batch chosen from a big batch of ``n``.

        >>> Selection(score_fn=lambda lam, b: b, keep=2, meta_batch="big").meta_count(10)
        10
        """
        if self.meta_batch == "big":
            return n
        if self.meta_batch == "random" and self.meta_size is not None:
            return _count(self.meta_size, n, "meta_size")
        return self.keep_count(n)

    def scores(self, meta_params: PyTree, big_batch: PyTree) -> jax.Array:
        """``score_fn(meta_params, big_batch)`` under ``stop_gradient``, checked to be ``(n,)``.

        >>> import jax.numpy as jnp
        >>> sel = Selection(score_fn=lambda lam, b: b @ lam, keep=1)
        >>> sel.scores(jnp.array([1.0, -1.0]), jnp.array([[2.0, 1.0], [0.0, 3.0]]))
        Array([ 1., -3.], dtype=float32)
        """
        n = batch_size(big_batch)
        s = jnp.asarray(self.score_fn(jax.lax.stop_gradient(meta_params), big_batch))
        if s.shape != (n,):
            raise ValueError(
                f"Selection: score_fn must return one score per example of the big batch, "
                f"shape ({n},); got {s.shape}"
            )
        if not jnp.issubdtype(s.dtype, jnp.floating):
            raise TypeError(f"Selection: score_fn must return floating scores, got {s.dtype}")
        return jax.lax.stop_gradient(s)

    def choose(self, key: jax.Array, scores: jax.Array) -> jax.Array:
        """The ``k`` indices kept by ``rule`` from ``(n,)`` scores (``key`` unused by top-k).

        >>> import jax, jax.numpy as jnp
        >>> sel = Selection(score_fn=lambda lam, b: b, keep=2)
        >>> sel.choose(jax.random.PRNGKey(0), jnp.array([0.0, 5.0, 1.0]))
        Array([1, 2], dtype=int32)
        """
        n = scores.shape[0]
        k = self.keep_count(n)
        if self.rule == "top_k":
            return top_k(scores, k)
        if self.rule == "sample":
            return sample_without_replacement(key, scores, k)
        return uniform(key, n, k)

    def meta_indices(self, key: jax.Array, n: int, selected: jax.Array) -> jax.Array | None:
        """The indices of the meta step's base batch in the last big batch (None: all of it).

        >>> import jax, jax.numpy as jnp
        >>> sel = Selection(score_fn=lambda lam, b: b, keep=2)
        >>> sel.meta_indices(jax.random.PRNGKey(0), 5, jnp.array([4, 1]))
        Array([4, 1], dtype=int32)
        """
        if self.meta_batch == "big":
            return None
        if self.meta_batch == "selected":
            return selected
        return uniform(key, n, self.meta_count(n))


def batch_size(batch: PyTree) -> int:
    """The number of examples of a batch: the common leading axis of its leaves (checked).

    >>> import jax.numpy as jnp
    >>> batch_size({"x": jnp.zeros((5, 3)), "y": jnp.zeros(5)})
    5
    """
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree.leaves(batch)}
    if not sizes or None in sizes or len(sizes) != 1:
        raise ValueError(
            "Selection: every leaf of the big batch needs the same leading axis (the examples); "
            f"got leading sizes {sorted(map(str, sizes))}"
        )
    return int(sizes.pop())  # type: ignore[arg-type] - None was excluded above
