r"""Baseline attribution scores: gradient dot products, TRAK-style projection, representation similarity.

Every function returns an ``(m, n)`` matrix (queries × training examples) with the sign of
:mod:`bilevel_jax.influence`: a larger score means training example ``i`` is more helpful to
query ``q`` (with ``L(θ; w) = (1/n) Σ_i w_i ℓ_i(θ) + R(θ)``, ``influence(i, q) =
g_qᵀ (C + δI)⁻¹ g_i = −n · d f_q(θ*(w))/d w_i``; these baselines replace ``C`` by simpler
matrices or the gradients by features).

- :func:`grad_dot`: ``g_qᵀ g_i`` (``C = I``; the inner product of TracIn at one checkpoint,
  Pruthi et al., NeurIPS 2020).
- :func:`trak_scores`: ``φ_qᵀ (ΦᵀΦ + δI)⁻¹ φ_i`` with ``φ = Pᵀ g`` a seeded Gaussian random
  projection of the full flattened gradient (Park et al., "TRAK: Attributing Model Behavior at
  Scale", ICML 2023, one model, **without** their ensembling over models and their
  ``Q = diag(1 − p_i)`` output-probability reweighting, and with the loss gradient in place of
  their margin gradient). ``ΦᵀΦ`` is ``n`` times the projected empirical Fisher, so at ``δ = 0``
  the score is ``1/n`` times the projected-Fisher influence of the package's convention.
- :func:`representation_similarity`: the cosine of feature vectors (e.g. the last hidden
  layer), ``⟨h_q, h_i⟩ / (‖h_q‖ ‖h_i‖)`` (Hanawa et al., "Evaluation of Similarity-based
  Explanations", ICLR 2021); a zero feature vector scores 0.

Per-example gradients are pytrees with the examples along axis 0 of every leaf (e.g.
:func:`~bilevel_jax.influence.logra.per_example_grads`); the parameters scored are the leaves
passed (pass a sub-pytree to choose them).

>>> import jax.numpy as jnp
>>> from bilevel_jax.influence import baselines
>>> g = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])}   # 3 examples
>>> baselines.grad_dot(g, g).tolist()
[[1.0, 0.0, 1.0], [0.0, 4.0, 2.0], [1.0, 2.0, 2.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._checks import concrete as _concrete

__all__ = ["grad_dot", "trak_scores", "representation_similarity"]

PyTree = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def _rows(per_example: PyTree, name: str) -> list[jax.Array]:
    """Each leaf as an ``(n, p_leaf)`` matrix; all leaves share ``n``."""
    flat = jax.tree_util.tree_flatten_with_path(per_example)[0]
    if not flat:
        raise ValueError(f"{name} has no array leaves; pass per-example gradients (n in front)")
    n = None
    out = []
    for path, leaf in flat:
        leaf = jnp.asarray(leaf)
        where = jax.tree_util.keystr(path) or "<root>"
        if leaf.ndim == 0:
            raise ValueError(
                f"{name}{where} is a scalar; every leaf needs the examples along axis 0"
            )
        if n is None:
            n = leaf.shape[0]
        elif leaf.shape[0] != n:
            raise ValueError(
                f"{name}{where} has {leaf.shape[0]} examples along axis 0, other leaves {n}"
            )
        out.append(leaf.reshape(leaf.shape[0], -1))
    return out


def _pair(query_grads: PyTree, train_grads: PyTree) -> tuple[list[jax.Array], list[jax.Array]]:
    sq = jax.tree.structure(query_grads)
    st = jax.tree.structure(train_grads)
    if sq != st:
        raise ValueError(
            f"query_grads and train_grads must have the same pytree structure; got {sq} and {st}"
        )
    q, t = _rows(query_grads, "query_grads"), _rows(train_grads, "train_grads")
    for j, (a, b) in enumerate(zip(q, t)):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"leaf {j}: query gradients of {a.shape[1]} entries per example, training "
                f"gradients of {b.shape[1]}; they must be gradients of the same parameters"
            )
    return q, t


def grad_dot(query_grads: PyTree, train_grads: PyTree) -> jax.Array:
    r"""Gradient dot products ``S_{qi} = g_qᵀ g_i`` over the leaves passed.

    The package's influence with ``C = I`` and ``δ = 0`` (TracIn's inner product at one
    checkpoint: Pruthi et al., "Estimating Training Data Influence by Tracing Gradient
    Descent", NeurIPS 2020).

    Args:
      query_grads: per-example gradients of the queries (``m`` along axis 0 of every leaf).
      train_grads: per-example gradients of the training examples (``n`` in front), the same
        pytree structure and trailing shapes.

    Returns:
      ``(m, n)`` scores.

    Raises:
      ValueError: different structures or shapes, or leaves without an example axis.

    Example:
      >>> import jax.numpy as jnp
      >>> q = {"a": jnp.ones((1, 2)), "b": jnp.ones((1, 3))}
      >>> t = {"a": jnp.ones((2, 2)), "b": jnp.zeros((2, 3))}
      >>> grad_dot(q, t).tolist()
      [[2.0, 2.0]]
    """
    q, t = _pair(query_grads, train_grads)
    return sum(
        (jnp.matmul(a, b.T, precision=_HIGHEST) for a, b in zip(q, t)),
        start=jnp.zeros((q[0].shape[0], t[0].shape[0]), jnp.result_type(*q, *t)),
    )


def trak_scores(
    query_grads: PyTree,
    train_grads: PyTree,
    key: jax.Array,
    k: int,
    damping: float = 0.0,
) -> jax.Array:
    r"""TRAK-style scores ``S = Φ_q (ΦᵀΦ + δI)⁻¹ Φᵀ`` of Gaussian-projected gradients.

    .. math::

        \Phi = G P, \quad P_{jl} \sim \mathcal N(0, 1/k), \qquad
        S_{qi} = \phi_q^\top (\Phi^\top \Phi + \delta I)^{-1} \phi_i ,

    with ``G`` (``n × p``) the full flattened per-example gradients (leaves in pytree order,
    each row-major) and ``P`` (``p × k``) drawn from ``key`` (leaf ``j``'s rows from
    ``fold_in(key, j)``), the same for queries and training examples. Park et al., "TRAK:
    Attributing Model Behavior at Scale" (ICML 2023), eq. (9) for one model, **without** the
    ensembling over models and the ``Q`` reweighting by ``1 − p`` (and with whatever gradient is
    passed, e.g. the loss gradient, instead of their margin gradient). At ``δ = 0`` it is
    ``1/n`` times the projected-Fisher influence (``F = ΦᵀΦ/n``) of the package's convention.

    Args:
      query_grads, train_grads: per-example gradients (``m`` and ``n`` in front), same structure.
      key: a PRNG key (the projection is a function of it: same key, same scores).
      k: the projected dimension (``1 ≤ k``).
      damping: δ ≥ 0 (TRAK's formula is ``δ = 0``; then ``ΦᵀΦ`` must be invertible, which needs
        ``n ≥ k``).

    Returns:
      ``(m, n)`` scores.

    Raises:
      ValueError: a bad ``k`` or damping, mismatched gradients, or (outside ``jit``) a singular
        ``ΦᵀΦ + δI``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> g = {"w": jax.random.normal(jax.random.key(0), (10, 4))}
      >>> s = trak_scores(g, g, jax.random.key(1), k=4)            # k = p, δ = 0: exact
      >>> G = g["w"]
      >>> bool(jnp.allclose(s, G @ jnp.linalg.solve(G.T @ G, G.T), atol=1e-4))
      True
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int (the projected dimension), got {k!r}")
    d = _concrete(damping)
    if d is not None and (d.ndim != 0 or not np.isfinite(d) or d < 0):
        raise ValueError(f"damping must be a finite number ≥ 0, got {damping!r}")
    q, t = _pair(query_grads, train_grads)
    dtype = jnp.result_type(*q, *t)

    def project(rows: list[jax.Array]) -> jax.Array:
        phi = jnp.zeros((rows[0].shape[0], k), dtype)
        for j, r in enumerate(rows):
            p = jax.random.normal(jax.random.fold_in(key, j), (r.shape[1], k), dtype)
            phi = phi + jnp.matmul(r, p, precision=_HIGHEST) / jnp.sqrt(jnp.asarray(k, dtype))
        return phi

    phi_q, phi_t = project(q), project(t)
    gram = jnp.matmul(phi_t.T, phi_t, precision=_HIGHEST)
    lam, v = jnp.linalg.eigh(0.5 * (gram + gram.T))
    delta = jnp.asarray(damping, dtype)
    low, high = lam[0] + delta, lam[-1] + delta
    lo, hi = _concrete(low), _concrete(high)
    if (
        lo is not None
        and hi is not None
        and not lo > max(k, 100) * np.finfo(lam.dtype).eps * max(hi, 0)
    ):
        raise ValueError(
            f"ΦᵀΦ + δI is singular (eigenvalues from {float(lo):g} to {float(hi):g}; n = "
            f"{phi_t.shape[0]} training examples, k = {k}): pass damping > 0 or a k ≤ n"
        )
    a = jnp.matmul(phi_q, v, precision=_HIGHEST) / (lam + delta)
    return jnp.matmul(a, jnp.matmul(phi_t, v, precision=_HIGHEST).T, precision=_HIGHEST)


def representation_similarity(
    features: Callable[[PyTree], jax.Array], query_batch: PyTree, train_batch: PyTree
) -> jax.Array:
    r"""Cosine similarity of learned representations: ``S_{qi} = ⟨h_q, h_i⟩ / (‖h_q‖ ‖h_i‖)``.

    ``h = features(batch)`` row by row (e.g. a model's last hidden layer; outputs with more than
    two axes are flattened after the first). Hanawa et al., "Evaluation of Similarity-based
    Explanations" (ICLR 2021). A zero feature vector has no direction: its scores are 0.

    Args:
      features: ``features(batch) -> (b, ...)``, one feature vector per example of the batch.
      query_batch, train_batch: the queries and the training examples (examples along axis 0).

    Returns:
      ``(m, n)`` cosines in ``[-1, 1]``.

    Raises:
      ValueError: features of different sizes, or without an example axis.

    Example:
      >>> import jax.numpy as jnp
      >>> feats = lambda x: jnp.tanh(x)                # a stand-in for a hidden layer
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
      >>> representation_similarity(feats, x[:1], x).round(3).tolist()
      [[1.0, 0.0, 1.0]]
    """
    hq, ht = jnp.asarray(features(query_batch)), jnp.asarray(features(train_batch))
    for name, h in (("query", hq), ("train", ht)):
        if h.ndim < 2:
            raise ValueError(
                f"features of the {name} batch have shape {h.shape}; expected (examples, "
                f"features) — features must map a batch to one vector per example"
            )
    hq, ht = hq.reshape(hq.shape[0], -1), ht.reshape(ht.shape[0], -1)
    if hq.shape[1] != ht.shape[1]:
        raise ValueError(
            f"query features have {hq.shape[1]} entries per example, training features "
            f"{ht.shape[1]}; they must come from the same feature function"
        )

    def unit(h: jax.Array) -> jax.Array:
        norm = jnp.linalg.norm(h, axis=1, keepdims=True)
        return jnp.where(norm > 0, h / jnp.where(norm > 0, norm, 1), 0)

    return jnp.matmul(unit(hq), unit(ht).T, precision=_HIGHEST)
