r"""KFAC and EKFAC influence of linear layers (``bj.influence``).

References: T. George, C. Laurent, X. Bouthillier, N. Ballas, P. Vincent, "Fast Approximate
Natural Gradient Descent in a Kronecker-factored Eigenbasis" (NeurIPS 2018) — EKFAC; R. Grosse,
J. Bae, C. Anil et al., "Studying Large Language Model Generalization with Influence Functions"
(2023) — (E)KFAC influence and its damping ``δ = 0.1 × mean eigenvalue``.

**Convention** (the one of :mod:`bilevel_jax.influence`): with
``L(θ; w) = (1/n) Σ_i w_i ℓ_i(θ) + R(θ)`` the influence of training example ``i`` on a query
loss ``f`` is ``g_fᵀ (C + δI)⁻¹ g_i = −n · d f(θ*(w))/d w_i`` at ``w = 1``; positive means
up-weighting example ``i`` lowers the query loss (a helpful example). Here ``C`` is block
diagonal over the chosen linear layers and each block is the KFAC or EKFAC approximation of the
layer's (empirical) Fisher ``(1/n) Σ_i vec(G̃_i) vec(G̃_i)ᵀ``, so

.. math::

    \mathrm{influence}(i, q) = \sum_{\text{layers}}
        \langle \tilde G_q, (C_l + \delta I)^{-1} \tilde G_i \rangle .

**One layer** (Flax layout, the bias convention of :mod:`~bilevel_jax.influence.logra`): the
per-example gradient of the augmented kernel ``[K; b]`` is ``G̃_i = Σ_t x̃_{i,t} δy_{i,t}ᵀ``,
shape ``(a, b) = (d_in + 1, d_out)`` (``(d_in, d_out)`` when the bias is left out), and ``vec``
is the row-major flattening, which pairs with ``kron(A, S)``:

- KFAC: ``C ≈ A ⊗ S`` with ``A = (1/n) Σ_i Σ_t x̃x̃ᵀ`` and ``S = (1/n) Σ_i Σ_t δy δyᵀ``
  (:func:`~bilevel_jax.influence.logra.kfac_covariances`). With ``A = Q_A diag(λ_A) Q_Aᵀ`` and
  ``S = Q_S diag(λ_S) Q_Sᵀ``,

  .. math::

      (A \otimes S + \delta I)^{-1} \mathrm{vec}(G)
        = \mathrm{vec}\Big(Q_A \big[(Q_A^\top G Q_S) \oslash (\lambda_A \lambda_S^\top + \delta)\big]
          Q_S^\top\Big).

- EKFAC: the same eigenbasis ``Q = Q_A ⊗ Q_S``, the eigenvalues ``λ_A λ_Sᵀ`` replaced by the
  second moments of the gradients in that basis (the best diagonal in it, George et al. §3):

  .. math::

      \Lambda^*_{jk} = \frac1n \sum_i \big((Q_A^\top \tilde G_i Q_S)_{jk}\big)^2 .

Both are computed in the eigenbasis: a score is
``Σ_jk (Q_Aᵀ G̃_q Q_S)_{jk} (Q_Aᵀ G̃_i Q_S)_{jk} / (Λ_{jk} + δ)``; no ``(ab) × (ab)`` matrix
is formed. Sequences (``T > 1`` positions per example): ``G̃_i`` is the sum over positions, as
in LoGra; then ``A ⊗ S`` of :func:`~bilevel_jax.influence.logra.kfac_covariances` (both sums over
positions) is about ``T`` times the Fisher of independent positions, a scale that EKFAC's
eigenvalues, fitted to the gradients, do not have.

Functions: :func:`kfac_eigenbasis` (the factors' eigendecompositions), :func:`layer_gradients`
(the augmented ``G̃_i`` of the chosen layers), :func:`kfac_precondition` (``(C + δI)⁻¹ G̃``),
:func:`ekfac_eigenvalues`, :func:`kfac_influence` and :func:`ekfac_influence`.

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import bilevel_jax as bj
>>> from bilevel_jax.influence import kfac, logra
>>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
>>> x, y = jax.random.normal(jax.random.key(1), (8, 3)), jnp.zeros((8, 2))
>>> loss_m = lambda m, z: 0.5 * jnp.sum((m(z[0]) - z[1]) ** 2)
>>> basis = kfac.kfac_eigenbasis(logra.kfac_covariances(model, loss_m, (x, y)))
>>> graphdef, params, rest = bj.nnx.split_params(model)
>>> loss_p = lambda p, z: loss_m(bj.nnx.merge(graphdef, p, rest), z)
>>> g = logra.per_example_grads(loss_p, params, (x, y))
>>> lam = kfac.ekfac_eigenvalues(basis, g)
>>> kfac.ekfac_influence(basis, lam, g, g).shape        # (queries, train)
(8, 8)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._checks import concrete as _concrete
from bilevel_jax.influence.logra import (
    Covariances,
    Projection,
    _fmt,
    _key,
    _nest,
    project_gradients,
)

__all__ = [
    "KronEigen",
    "kfac_eigenbasis",
    "layer_gradients",
    "ekfac_eigenvalues",
    "kfac_precondition",
    "kfac_influence",
    "ekfac_influence",
]

PyTree = Any
Path = tuple[Any, ...]
_HIGHEST = jax.lax.Precision.HIGHEST


class KronEigen(NamedTuple):
    r"""One layer's KFAC eigenbasis: ``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ``.

    ``q_in``: ``(a, a)`` eigenvectors (columns) of the forward factor ``A`` (``a = d_in + 1``
    when the bias row is included, else ``d_in``); ``lam_in``: ``(a,)``; ``q_out``: ``(b, b)``
    eigenvectors of the backward factor ``S`` (``b = d_out``); ``lam_out``: ``(b,)``. The KFAC
    eigenvalues of ``A ⊗ S`` are ``λ_A λ_Sᵀ`` (``a × b``). A pytree (a named tuple).

    Example:
      >>> import jax.numpy as jnp
      >>> e = KronEigen(jnp.eye(3), jnp.ones(3), jnp.eye(2), jnp.ones(2))
      >>> e.q_in.shape, e.q_out.shape
      ((3, 3), (2, 2))
    """

    q_in: jax.Array
    lam_in: jax.Array
    q_out: jax.Array
    lam_out: jax.Array


# ----------------------------------------------------------------------------- helpers


def _items(tree: PyTree, cls: type, what: str) -> list[tuple[Path, Any]]:
    """``[(layer path, leaf)]`` of a pytree whose leaves are ``cls`` instances."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, cls))
    items = []
    for path, leaf in flat:
        p = tuple(_key(k) for k in path)
        if not isinstance(leaf, cls):
            raise TypeError(
                f"{what} must be a pytree of {cls.__name__} keyed like the layers; found "
                f"{type(leaf).__name__} at {_fmt(p)}"
            )
        items.append((p, leaf))
    if not items:
        raise ValueError(f"{what} is empty: name at least one layer")
    return items


def _basis_items(basis: PyTree) -> list[tuple[Path, KronEigen]]:
    items = _items(basis, KronEigen, "basis")
    for path, e in items:
        where = f"layer {_fmt(path)}"
        for q, lam, name in ((e.q_in, e.lam_in, "in"), (e.q_out, e.lam_out, "out")):
            if jnp.ndim(q) != 2 or q.shape[0] != q.shape[1]:
                raise ValueError(f"{where}: q_{name} must be a square matrix, got {jnp.shape(q)}")
            if jnp.shape(lam) != (q.shape[0],):
                raise ValueError(
                    f"{where}: lam_{name} has shape {jnp.shape(lam)}, expected ({q.shape[0]},) "
                    f"(one eigenvalue per column of q_{name})"
                )
    return items


def _damping(lam: jax.Array, damping: float | None, where: str) -> jax.Array:
    """δ: the given one, or Grosse et al.'s ``0.1 × mean(Λ)``; checked so ``Λ + δ > 0``."""
    if damping is None:
        delta = 0.1 * jnp.mean(lam)
    else:
        d = _concrete(damping)
        if d is not None and (d.ndim != 0 or not np.isfinite(d) or d < 0):
            raise ValueError(f"damping must be a finite number ≥ 0 (or None), got {damping!r}")
        delta = jnp.asarray(damping, lam.dtype)
    low = _concrete(jnp.min(lam + delta))
    if low is not None and not low > 0:
        raise ValueError(
            f"{where}: the damped curvature is singular (min eigenvalue + δ = {float(low):g}); "
            f"pass damping > 0"
            + (" (this layer's gradients are all zero)" if damping is None else "")
        )
    return delta


def _rotate(per_example: PyTree, items: list[tuple[Path, KronEigen]]) -> list[jax.Array]:
    """``Q_Aᵀ G̃_i Q_S`` of each layer, ``(n, a, b)`` (LoGra's bias rule: ``a`` rows of ``Q_A``)."""
    out = []
    for path, e in items:
        try:
            rotated = project_gradients(per_example, _nest([(path, Projection(e.q_in, e.q_out))]))
        except ValueError as err:
            raise ValueError(
                f"the basis (q_in {tuple(e.q_in.shape)}, q_out {tuple(e.q_out.shape)}) does not "
                f"fit these gradients — {err}; fit the basis from the covariances of the same "
                f"layers (kfac_covariances' bias= decides whether q_in has the bias row)"
            ) from None
        out.append(_leaf(rotated, path))
    return out


def _leaf(tree: PyTree, path: Path) -> Any:
    node = tree
    for k in path:
        node = node[k]
    return node


def _eigenvalue_items(eigenvalues: PyTree, items: list[tuple[Path, KronEigen]]) -> list[jax.Array]:
    out = []
    for path, e in items:
        try:
            lam = jnp.asarray(_leaf(eigenvalues, path))
        except (KeyError, IndexError, TypeError):
            raise KeyError(
                f"eigenvalues have no entry for the layer {_fmt(path)}; pass "
                f"ekfac_eigenvalues(basis, …) of the same basis"
            ) from None
        shape = (e.q_in.shape[0], e.q_out.shape[0])
        if lam.shape != shape:
            raise ValueError(
                f"layer {_fmt(path)}: eigenvalues of shape {lam.shape}, expected {shape} "
                f"(len(lam_in), len(lam_out))"
            )
        out.append(lam)
    return out


def _kfac_lams(items: list[tuple[Path, KronEigen]]) -> list[jax.Array]:
    return [jnp.outer(e.lam_in, e.lam_out) for _, e in items]


def _scores(
    items: list[tuple[Path, KronEigen]],
    lams: list[jax.Array],
    query_grads: PyTree,
    train_grads: PyTree,
    damping: float | None,
) -> jax.Array:
    rq, rt = _rotate(query_grads, items), _rotate(train_grads, items)
    total = None
    for (path, _), lam, q, t in zip(items, lams, rq, rt):
        delta = _damping(lam, damping, f"layer {_fmt(path)}")
        s = jnp.einsum("mab,nab->mn", q / (lam + delta), t, precision=_HIGHEST)
        total = s if total is None else total + s
    assert total is not None
    return total


# ----------------------------------------------------------------------------- public


def kfac_eigenbasis(covariances: PyTree) -> PyTree:
    r"""Eigendecompose each layer's KFAC factors: ``A = Q_A diag(λ_A) Q_Aᵀ``, ``S = Q_S diag(λ_S) Q_Sᵀ``.

    ``A`` and ``S`` are the forward and backward factors of
    :class:`~bilevel_jax.influence.logra.Covariances` (from
    :func:`~bilevel_jax.influence.logra.kfac_covariances`; George et al. 2018, Grosse et al.
    2023). They are positive semidefinite, so the eigenvalues are clipped at 0 (round-off).

    Args:
      covariances: a pytree of ``Covariances(forward, backward)`` keyed like the layers.

    Returns:
      a pytree of :class:`KronEigen` keyed like ``covariances``.

    Example:
      >>> import jax.numpy as jnp
      >>> from bilevel_jax.influence.logra import Covariances
      >>> e = kfac_eigenbasis({"fc": Covariances(jnp.diag(jnp.array([2.0, 1.0])), jnp.eye(3))})
      >>> e["fc"].lam_in.tolist(), e["fc"].q_out.shape
      ([1.0, 2.0], (3, 3))
    """
    out = []
    for path, cov in _items(covariances, Covariances, "covariances"):
        factors = []
        for name, c in zip(cov._fields, cov):
            c = jnp.asarray(c)
            if c.ndim != 2 or c.shape[0] != c.shape[1]:
                raise ValueError(
                    f"layer {_fmt(path)}: the {name} covariance must be square, got {c.shape}"
                )
            lam, q = jnp.linalg.eigh(0.5 * (c + c.T))
            factors += [q, jnp.maximum(lam, 0)]
        q_in, lam_in, q_out, lam_out = factors
        out.append((path, KronEigen(q_in, lam_in, q_out, lam_out)))
    return _nest(out)


def layer_gradients(per_example: PyTree, basis: PyTree) -> PyTree:
    r"""The augmented per-example gradients ``G̃_i = [∂ℓ_i/∂K; ∂ℓ_i/∂b]`` of the basis' layers.

    ``(n, a, b)`` per layer, keyed like ``basis``; the bias row is included exactly when the
    layer's ``q_in`` has ``d_in + 1`` rows (LoGra's rule,
    :func:`~bilevel_jax.influence.logra.project_gradients` with identity projections).

    Args:
      per_example: per-example gradients keyed like the parameters (leading axis ``n``), e.g.
        from :func:`~bilevel_jax.influence.logra.per_example_grads`.
      basis: a pytree of :class:`KronEigen` (from :func:`kfac_eigenbasis`).

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"fc": {"kernel": jnp.ones((5, 3, 2)), "bias": 2 * jnp.ones((5, 2))}}
      >>> basis = {"fc": KronEigen(jnp.eye(4), jnp.ones(4), jnp.eye(2), jnp.ones(2))}
      >>> layer_gradients(g, basis)["fc"][0].tolist()
      [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]
    """
    items = _basis_items(basis)
    eye = [
        (
            p,
            Projection(
                jnp.eye(e.q_in.shape[0], dtype=e.q_in.dtype),
                jnp.eye(e.q_out.shape[0], dtype=e.q_out.dtype),
            ),
        )
        for p, e in items
    ]
    return project_gradients(per_example, _nest(eye))


def ekfac_eigenvalues(basis: PyTree, per_example: PyTree) -> PyTree:
    r"""EKFAC's corrected eigenvalues ``Λ*_{jk} = (1/n) Σ_i ((Q_Aᵀ G̃_i Q_S)_{jk})²``.

    The second moments of the per-example gradients in the KFAC eigenbasis (George et al.
    2018, eq. 11; Grosse et al. 2023, §2.2.3): the diagonal ``diag(Qᵀ F Q)`` of the layer's
    empirical Fisher ``F = (1/n) Σ_i vec(G̃_i) vec(G̃_i)ᵀ`` in ``Q = Q_A ⊗ Q_S``.

    Args:
      basis: a pytree of :class:`KronEigen` (from :func:`kfac_eigenbasis`).
      per_example: the training examples' per-example gradients keyed like the parameters
        (e.g. :func:`~bilevel_jax.influence.logra.per_example_grads`; for sequences the sum over
        positions, as in LoGra).

    Returns:
      a pytree keyed like ``basis`` with ``(a, b)`` leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"fc": {"kernel": jnp.array([[[1.0], [0.0]], [[0.0], [3.0]]])}}   # n=2, 2×1
      >>> basis = {"fc": KronEigen(jnp.eye(2), jnp.ones(2), jnp.eye(1), jnp.ones(1))}
      >>> ekfac_eigenvalues(basis, g)["fc"].tolist()
      [[0.5], [4.5]]
    """
    items = _basis_items(basis)
    return _nest(
        [(p, jnp.mean(r**2, axis=0)) for (p, _), r in zip(items, _rotate(per_example, items))]
    )


def kfac_precondition(
    basis: PyTree,
    gradients: PyTree,
    damping: float | None = None,
    *,
    eigenvalues: PyTree | None = None,
) -> PyTree:
    r"""``(C + δI)⁻¹ G`` per layer, with ``C = A ⊗ S`` (KFAC) or ``Q diag(Λ*) Qᵀ`` (EKFAC).

    .. math::

        (C + \delta I)^{-1} \mathrm{vec}(G)
            = \mathrm{vec}\big(Q_A [(Q_A^\top G Q_S) \oslash (\Lambda + \delta)] Q_S^\top\big),

    with ``Λ = λ_A λ_Sᵀ`` (KFAC) or the given ``eigenvalues`` (EKFAC, from
    :func:`ekfac_eigenvalues`), ``vec`` row-major (it pairs with ``kron(A, S)``; George et al.
    2018).

    Args:
      basis: a pytree of :class:`KronEigen`.
      gradients: a pytree keyed like ``basis`` of ``(..., a, b)`` matrices in the augmented
        layout (e.g. :func:`layer_gradients`).
      damping: δ ≥ 0; None: ``0.1 × mean(Λ)`` per layer (Grosse et al. 2023).
      eigenvalues: EKFAC's ``Λ*`` keyed like ``basis``; None: KFAC.

    Raises:
      ValueError: shapes that do not fit the basis, a negative damping, or a singular
        ``Λ + δ``.

    Example:
      >>> import jax.numpy as jnp
      >>> basis = {"fc": KronEigen(jnp.eye(2), jnp.array([1.0, 3.0]), jnp.eye(1), jnp.ones(1))}
      >>> kfac_precondition(basis, {"fc": jnp.ones((2, 1))}, 1.0)["fc"].tolist()
      [[0.5], [0.25]]
    """
    items = _basis_items(basis)
    lams = _kfac_lams(items) if eigenvalues is None else _eigenvalue_items(eigenvalues, items)
    out = []
    for (path, e), lam in zip(items, lams):
        where = f"layer {_fmt(path)}"
        try:
            g = jnp.asarray(_leaf(gradients, path))
        except (KeyError, IndexError, TypeError):
            raise KeyError(f"gradients have no entry for the layer {_fmt(path)}") from None
        if g.ndim < 2 or g.shape[-2:] != lam.shape:
            raise ValueError(
                f"{where}: gradient of shape {g.shape}, expected (..., {lam.shape[0]}, "
                f"{lam.shape[1]}) (the augmented kernel; see layer_gradients)"
            )
        delta = _damping(lam, damping, where)
        mm = lambda a, b: jnp.matmul(a, b, precision=_HIGHEST)  # noqa: E731
        r = mm(mm(e.q_in.T, g), e.q_out) / (lam + delta)
        out.append((path, mm(mm(e.q_in, r), e.q_out.T)))
    return _nest(out)


def kfac_influence(
    basis: PyTree, query_grads: PyTree, train_grads: PyTree, damping: float | None = None
) -> jax.Array:
    r"""KFAC influence ``Σ_layers ⟨G̃_q, (A ⊗ S + δI)⁻¹ G̃_i⟩`` of every training example on every query.

    .. math::

        \mathrm{influence}(i, q) = \sum_l \sum_{jk}
            \frac{(Q_A^\top \tilde G_q Q_S)_{jk} (Q_A^\top \tilde G_i Q_S)_{jk}}
                 {\lambda_{A,j} \lambda_{S,k} + \delta}

    (the package's sign: positive = helpful; George et al. 2018, Grosse et al. 2023).

    Args:
      basis: a pytree of :class:`KronEigen` (:func:`kfac_eigenbasis`); its paths choose the
        layers.
      query_grads: the queries' per-example gradients keyed like the parameters (``m`` in
        front), e.g. :func:`~bilevel_jax.influence.logra.per_example_grads` of the query loss.
      train_grads: the training examples' per-example gradients (``n`` in front).
      damping: δ ≥ 0; None: ``0.1 × mean(λ_A λ_Sᵀ)`` per layer.

    Returns:
      ``(m, n)`` scores.

    Example:
      >>> import jax.numpy as jnp
      >>> basis = {"fc": KronEigen(jnp.eye(2), jnp.array([1.0, 3.0]), jnp.eye(1), jnp.ones(1))}
      >>> g = {"fc": jnp.array([[[1.0], [1.0]], [[0.0], [2.0]]])}   # two examples, 2×1 kernel
      >>> kfac_influence(basis, g, g, damping=1.0).tolist()
      [[0.75, 0.5], [0.5, 1.0]]
    """
    items = _basis_items(basis)
    return _scores(items, _kfac_lams(items), query_grads, train_grads, damping)


def ekfac_influence(
    basis: PyTree,
    eigenvalues: PyTree,
    query_grads: PyTree,
    train_grads: PyTree,
    damping: float | None = None,
) -> jax.Array:
    r"""EKFAC influence ``Σ_layers ⟨G̃_q, (Q diag(Λ*) Qᵀ + δI)⁻¹ G̃_i⟩``, ``Q = Q_A ⊗ Q_S``.

    .. math::

        \mathrm{influence}(i, q) = \sum_l \sum_{jk}
            \frac{(Q_A^\top \tilde G_q Q_S)_{jk} (Q_A^\top \tilde G_i Q_S)_{jk}}{\Lambda^*_{jk} + \delta}

    with ``Λ*`` from :func:`ekfac_eigenvalues` (George et al. 2018; Grosse et al. 2023). Sign:
    positive = helpful.

    Args:
      basis: a pytree of :class:`KronEigen`; eigenvalues: ``Λ*`` keyed like it.
      query_grads, train_grads: per-example gradients keyed like the parameters (``m`` and
        ``n`` in front).
      damping: δ ≥ 0; None: ``0.1 × mean(Λ*)`` per layer.

    Returns:
      ``(m, n)`` scores.

    Example:
      >>> import jax.numpy as jnp
      >>> basis = {"fc": KronEigen(jnp.eye(2), jnp.ones(2), jnp.eye(1), jnp.ones(1))}
      >>> g = {"fc": jnp.array([[[1.0], [0.0]], [[0.0], [3.0]]])}
      >>> lam = ekfac_eigenvalues(basis, g)                       # [[0.5], [4.5]]
      >>> ekfac_influence(basis, lam, g, g, damping=0.5).tolist()
      [[1.0, 0.0], [0.0, 1.8]]
    """
    items = _basis_items(basis)
    return _scores(items, _eigenvalue_items(eigenvalues, items), query_grads, train_grads, damping)
