r"""Block scoring of query gradients against a :class:`~bilevel_jax.influence.store.GradientStore`.

The package's sign and scale convention, with the projected, damped empirical Fisher as the
curvature:

.. math::

    \mathrm{influence}(i, f) = g_f^\top (F + \delta I)^{-1} g_i, \qquad
    F = \frac{1}{n} \sum_{i=1}^n g_i g_i^\top = \frac{1}{n} G^\top G ,

where ``g_i`` (row ``i`` of the store ``G``, ``n × d``) is example ``i``'s projected loss gradient
at the trained model and ``g_f`` (row of the queries ``Q``, ``m × d``) a query loss's projected
gradient, computed with the same projection. ``F`` is the "fisher" curvature of the package
(without ``∇²R``) in the projected space, i.e. LoGra's (Choe et al., "What is Your Data Worth to
GPT?", 2024; Choe, PhD thesis, ch. 4). Positive scores: up-weighting example ``i`` lowers the
query loss (a helpful example, a *proponent*); Koh & Liang's ``I_up,loss`` is ``−influence``.

Modes (``S`` is the ``m × n`` score matrix, ``H = F + δI``):

- ``"dot"``: ``S = Q Gᵀ`` (``H = I``: gradient dot products, as TracIn / TRAK-style scores);
- ``"influence"``: ``S = Q H⁻¹ Gᵀ``;
- ``"relatif"``: ``S_fi = g_fᵀ H⁻¹ g_i / sqrt(g_iᵀ H⁻¹ g_i)``, the ℓ-relative influence of
  Barshan, Brunet and Dziugaite (RelatIF, AISTATS 2020): each example's influence divided by the
  square root of its self-influence, which down-weights high-loss outliers;
- ``"cosine"``: ``S_fi = g_fᵀ H⁻¹ g_i / (sqrt(g_fᵀ H⁻¹ g_f) · sqrt(g_iᵀ H⁻¹ g_i))``, the cosine of
  the angle between ``g_f`` and ``g_i`` in the ``H⁻¹`` inner product (in ``[-1, 1]``).

An all-zero gradient has no direction: its RelatIF / cosine scores are 0.
:func:`self_influence` gives ``g_iᵀ H⁻¹ g_i`` (or ``‖g_i‖²`` for ``"dot"``).

**Damping after the fact.** :func:`projected_fisher` accumulates ``GᵀG`` block by block from the
store (float32, or ``dtype``); :func:`fisher_eigh` keeps ``F = V diag(λ) Vᵀ``, so that
``(F + δI)⁻¹ = V diag(1/(λ + δ)) Vᵀ`` costs no new factorisation for any ``δ``;
:func:`default_damping` is the thesis' ``δ = 0.1 · mean(λ)``.

**Streaming.** The store is read in blocks of ``block_size`` rows by a background thread (the next
block is read from the memmap and copied to the device while the current one is scored). The last
block is padded with zero rows to ``block_size`` and masked, so one compiled function scores every
block: scoring compiles once per (``m``, ``d``, ``block_size``, mode), not once per block. Top-k
keeps a running ``(m, k)`` best list on the device, merged with each block.

>>> import numpy as np
>>> from bilevel_jax.influence import scoring
>>> rng = np.random.default_rng(0)
>>> G, Q = rng.normal(size=(50, 4)), rng.normal(size=(2, 4))
>>> fisher = scoring.fisher_eigh(scoring.projected_fisher(G))
>>> S = scoring.score_store(G, Q, mode="influence", fisher=fisher, block_size=16)
>>> F = G.T @ G / 50
>>> H = F + 0.1 * np.trace(F) / 4 * np.eye(4)
>>> bool(np.allclose(S, Q @ np.linalg.solve(H, G.T), rtol=1e-4, atol=1e-5))
True
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._checks import concrete as _concrete
from bilevel_jax.influence.store import GradientStore

__all__ = [
    "FisherEigen",
    "TopK",
    "default_damping",
    "fisher_eigh",
    "precondition",
    "projected_fisher",
    "score_store",
    "self_influence",
    "top_k_influence",
]

MODES = ("dot", "influence", "relatif", "cosine")
_HIGHEST = jax.lax.Precision.HIGHEST

# Python-side trace counts of the jitted block functions (a test checks "compiles once").
_TRACES: collections.Counter[str] = collections.Counter()


class FisherEigen(NamedTuple):
    """Eigendecomposition ``F = V diag(λ) Vᵀ`` of the projected Fisher (from :func:`fisher_eigh`).

    Attributes:
      eigenvalues: ``λ``, shape ``(d,)``, ascending, clipped at 0 (``F`` is positive
        semi-definite; round-off can make the smallest slightly negative).
      eigenvectors: ``V``, shape ``(d, d)``, orthonormal columns.

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import fisher_eigh
    >>> eig = fisher_eigh(np.diag([3.0, 1.0]))
    >>> eig.eigenvalues.tolist()
    [1.0, 3.0]
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array


class TopK(NamedTuple):
    """The ``k`` best-scoring training examples per query (from :func:`top_k_influence`).

    Attributes:
      values: ``(m, k)`` float32 scores, best first (largest, or smallest with
        ``largest=False``).
      ids: ``(m, k)`` int64 example ids (the ids written to the store).
      rows: ``(m, k)`` int64 row positions in the store.

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import top_k_influence
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    >>> top = top_k_influence(G, np.array([[1.0, 0.0]]), k=2, mode="dot")
    >>> top.values.tolist(), top.rows.tolist()
    ([[3.0, 1.0]], [[2, 0]])
    """

    values: np.ndarray
    ids: np.ndarray
    rows: np.ndarray


# ----------------------------------------------------------------------------- sources
class _Source:
    """Rows of a complete GradientStore, or of an in-memory (n, d) array, read as float32."""

    def __init__(self, store: Any, caller: str):
        if isinstance(store, GradientStore):
            if not store.complete:
                raise ValueError(
                    f"{caller}: the store in {store.path} has {store.rows_written} of its "
                    f"{store.n} rows; finish writing it (GradientStore.open(path, resume=True, "
                    "metadata=...)) before scoring."
                )
            self.n, self.d = store.n, store.d
            self._read = store.read
            self._ids = lambda: store.ids
        else:
            arr = np.asarray(store, dtype=np.float32)
            if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
                raise ValueError(
                    f"{caller}: the training gradients must be a GradientStore or an (n, d) "
                    f"array, got shape {arr.shape}"
                )
            if not np.isfinite(arr).all():
                raise ValueError(f"{caller}: the training gradients are not all finite")
            self.n, self.d = arr.shape
            self._read = lambda start, stop: arr[start:stop]
            self._ids = lambda: np.arange(arr.shape[0], dtype=np.int64)

    def ids(self) -> np.ndarray:
        return self._ids()

    def blocks(self, block_size: int, caller: str) -> Iterator[tuple[int, jax.Array]]:
        """``(start, (B, d) float32 device block)``, zero-padded; the next one read in a thread."""
        if int(block_size) < 1:
            raise ValueError(f"{caller}: block_size must be positive, got {block_size}")
        size = min(int(block_size), self.n)

        def load(start: int) -> tuple[int, jax.Array]:
            rows = self._read(start, min(start + size, self.n))
            if rows.shape[0] < size:
                rows = np.concatenate([rows, np.zeros((size - rows.shape[0], self.d), np.float32)])
            return start, jnp.asarray(rows, dtype=jnp.float32)  # host to device, in the thread

        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, 0)
            for start in range(0, self.n, size):
                block = pending.result()
                if start + size < self.n:
                    pending = pool.submit(load, start + size)
                yield block


# ----------------------------------------------------------------------------- Fisher
@jax.jit
def _fisher_block(acc: jax.Array, block: jax.Array) -> jax.Array:
    _TRACES["fisher_block"] += 1
    b = block.astype(acc.dtype)
    return acc + jnp.dot(b.T, b, precision=_HIGHEST)


def projected_fisher(store: Any, *, block_size: int = 2048, dtype: Any = jnp.float32) -> jax.Array:
    """The projected empirical Fisher ``F = (1/n) GᵀG`` (``d × d``), accumulated block by block.

    Args:
      store: a complete :class:`~bilevel_jax.influence.store.GradientStore`, or an ``(n, d)``
        array of training gradients.
      block_size: rows read and accumulated at a time.
      dtype: the accumulation dtype (float32; float64 needs ``jax.enable_x64``).

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import projected_fisher
    >>> G = np.array([[1.0, 2.0], [3.0, 0.0], [0.0, 1.0]])
    >>> np.round(projected_fisher(G, block_size=2), 5).tolist()  # (GᵀG) / 3
    [[3.33333, 0.66667], [0.66667, 1.66667]]
    """
    return _fisher_of(_Source(store, "projected_fisher"), block_size, dtype)


def _fisher_of(src: _Source, block_size: int, dtype: Any = jnp.float32) -> jax.Array:
    acc = jnp.zeros((src.d, src.d), dtype)
    for _, block in src.blocks(block_size, "projected_fisher"):
        acc = _fisher_block(acc, block)
    return acc / src.n


def fisher_eigh(fisher: Any) -> FisherEigen:
    """Eigendecomposition of a (projected) Fisher, kept to damp it with any ``δ`` afterwards.

    ``F`` is symmetrised (``(F + Fᵀ)/2``) and decomposed with ``jnp.linalg.eigh``; eigenvalues
    are clipped at 0. Then ``(F + δI)⁻¹ = V diag(1/(λ + δ)) Vᵀ`` (:func:`precondition`).

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import fisher_eigh
    >>> eig = fisher_eigh(np.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> np.round(eig.eigenvalues, 5).tolist()
    [1.0, 3.0]
    """
    F = jnp.asarray(fisher)
    if not jnp.issubdtype(F.dtype, jnp.floating):
        F = F.astype(jnp.float32)
    if F.ndim != 2 or F.shape[0] != F.shape[1] or F.shape[0] < 1:
        raise ValueError(f"fisher_eigh: the Fisher must be a square (d, d) matrix, got {F.shape}")
    finite = _concrete(jnp.isfinite(F).all())
    if finite is not None and not finite:
        raise ValueError("fisher_eigh: the Fisher has non-finite entries")
    lam, vec = jnp.linalg.eigh((F + F.T) / 2)
    return FisherEigen(jnp.maximum(lam, 0), vec)


def default_damping(fisher: FisherEigen) -> float | jax.Array:
    """The LoGra thesis' default damping ``δ = 0.1 · mean(λ) = 0.1 · tr(F) / d``.

    A Python float, or a traced scalar under ``jax.jit``.

    (Choe, PhD thesis ch. 4; LoGra, Choe et al. 2024.) Scale-aware: it grows with the gradients'
    magnitude, so ``(F + δI)⁻¹`` stays well conditioned (condition number at most
    ``1 + 10 · λ_max / mean(λ)``).

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import default_damping, fisher_eigh
    >>> round(default_damping(fisher_eigh(np.diag([1.0, 2.0, 3.0]))), 6)
    0.2
    """
    _check_eigen(fisher, "default_damping")
    delta = 0.1 * jnp.mean(fisher.eigenvalues)
    value = _concrete(delta)
    return delta if value is None else float(value)


def _check_eigen(fisher: Any, caller: str) -> None:
    if not isinstance(fisher, FisherEigen):
        raise TypeError(
            f"{caller}: fisher must be a FisherEigen (fisher_eigh(projected_fisher(store))), "
            f"got {type(fisher).__name__}"
        )


def _resolve_damping(fisher: FisherEigen, damping: float | None, caller: str) -> float | jax.Array:
    """δ (given, or :func:`default_damping`), checked outside ``jit`` so that ``F + δI`` is
    invertible; under ``jit`` (traced eigenvalues or δ) the checks are skipped."""
    _check_eigen(fisher, caller)
    delta = default_damping(fisher) if damping is None else damping
    d = _concrete(delta)
    if d is None:
        return delta
    if d.ndim != 0 or not np.isfinite(d) or d < 0:
        raise ValueError(f"{caller}: damping must be a finite δ >= 0, got {damping}")
    delta = float(d)
    lam = _concrete(jnp.min(fisher.eigenvalues))
    if lam is None:
        return delta
    lam_min = float(lam)
    if lam_min + delta <= 0:
        raise ValueError(
            f"{caller}: F + δI is singular (smallest eigenvalue {lam_min:.3g}, δ = {delta:.3g})"
            + (
                ": the Fisher is zero (are all stored gradients zero?)"
                if damping is None
                else "; pass damping > 0 (or None for 0.1 × the mean eigenvalue)"
            )
        )
    return delta


def precondition(fisher: FisherEigen, vectors: Any, damping: float | None = None) -> jax.Array:
    """Rows of ``vectors`` times ``(F + δI)⁻¹ = V diag(1/(λ + δ)) Vᵀ`` (float32).

    Works under ``jax.jit`` with :func:`fisher_eigh` (then the value checks on δ are skipped).

    Args:
      fisher: from :func:`fisher_eigh`.
      vectors: ``(m, d)`` or ``(d,)``.
      damping: ``δ``; ``None`` for :func:`default_damping`.

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import fisher_eigh, precondition
    >>> eig = fisher_eigh(np.diag([1.0, 3.0]))
    >>> precondition(eig, np.array([2.0, 2.0]), damping=1.0).tolist()  # 2/(1+1), 2/(3+1)
    [1.0, 0.5]
    """
    delta = _resolve_damping(fisher, damping, "precondition")
    lam, vec = fisher.eigenvalues, fisher.eigenvectors
    x = jnp.asarray(vectors, dtype=vec.dtype)
    return jnp.dot(jnp.dot(x, vec, precision=_HIGHEST) / (lam + delta), vec.T, precision=_HIGHEST)


# ----------------------------------------------------------------------------- scoring
def _check_mode(mode: str, caller: str, allowed: tuple[str, ...] = MODES) -> None:
    if mode not in allowed:
        raise ValueError(f"{caller}: mode must be one of {allowed}, got {mode!r}")


def _prepare(
    src: _Source,
    queries: Any,
    mode: str,
    fisher: FisherEigen | None,
    damping: float | None,
    block_size: int,
    caller: str,
) -> tuple[jax.Array, jax.Array | None]:
    """``(left, w)``: block scores are ``left @ (block @ w)ᵀ`` (``w`` None: ``left @ blockᵀ``)."""
    _check_mode(mode, caller)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] != src.d:
        raise ValueError(
            f"{caller}: queries must be an (m, {src.d}) array of projected query gradients "
            f"(the store's d), got shape {q.shape}"
        )
    if not np.isfinite(q).all():
        raise ValueError(f"{caller}: the query gradients are not all finite")
    left = jnp.asarray(q)
    if mode == "dot":
        return left, None
    if fisher is None:
        fisher = fisher_eigh(_fisher_of(src, block_size))
    delta = _resolve_damping(fisher, damping, caller)
    lam = fisher.eigenvalues.astype(jnp.float32)
    vec = fisher.eigenvectors.astype(jnp.float32)
    if mode == "influence":
        scaled = jnp.dot(left, vec, precision=_HIGHEST) / (lam + delta)
        return jnp.dot(scaled, vec.T, precision=_HIGHEST), None
    w = vec / jnp.sqrt(lam + delta)  # H⁻¹ = W Wᵀ
    left = jnp.dot(left, w, precision=_HIGHEST)
    if mode == "cosine":
        norm = jnp.sqrt(jnp.sum(left * left, axis=1, keepdims=True))
        left = jnp.where(norm > 0, left / jnp.where(norm > 0, norm, 1), 0)
    return left, w


def _block_scores(left: jax.Array, w: jax.Array | None, block: jax.Array) -> jax.Array:
    if w is None:
        return jnp.dot(left, block.T, precision=_HIGHEST)
    g = jnp.dot(block, w, precision=_HIGHEST)
    s = jnp.dot(left, g.T, precision=_HIGHEST)
    norm2 = jnp.sum(g * g, axis=1)
    return jnp.where(norm2 > 0, s / jnp.sqrt(jnp.where(norm2 > 0, norm2, 1)), 0)


@jax.jit
def _score_block(left: jax.Array, w: jax.Array | None, block: jax.Array) -> jax.Array:
    _TRACES["score_block"] += 1
    return _block_scores(left, w, block)


@functools.partial(jax.jit, static_argnames=("k", "largest"))
def _top_k_block(
    values: jax.Array,
    rows: jax.Array,
    left: jax.Array,
    w: jax.Array | None,
    block: jax.Array,
    start: jax.Array,
    n: jax.Array,
    *,
    k: int,
    largest: bool,
) -> tuple[jax.Array, jax.Array]:
    _TRACES["top_k_block"] += 1
    s = _block_scores(left, w, block)
    if not largest:
        s = -s
    col = start + jnp.arange(block.shape[0], dtype=jnp.int32)
    s = jnp.where(col[None, :] < n, s, -jnp.inf)  # the padded rows of the last block
    all_values = jnp.concatenate([values, s], axis=1)
    all_rows = jnp.concatenate([rows, jnp.broadcast_to(col, s.shape)], axis=1)
    best, where = jax.lax.top_k(all_values, k)
    return best, jnp.take_along_axis(all_rows, where, axis=1)


@jax.jit
def _self_block(w: jax.Array | None, block: jax.Array) -> jax.Array:
    _TRACES["self_block"] += 1
    g = block if w is None else jnp.dot(block, w, precision=_HIGHEST)
    return jnp.sum(g * g, axis=1)


def score_store(
    store: Any,
    queries: Any,
    *,
    mode: str = "influence",
    fisher: FisherEigen | None = None,
    damping: float | None = None,
    block_size: int = 2048,
) -> np.ndarray:
    """All scores ``S`` (``m × n``, float32) of ``queries`` against the store, block by block.

    ``S = Q (F + δI)⁻¹ Gᵀ`` for ``mode="influence"`` (see the module docstring for ``"dot"``,
    ``"relatif"``, ``"cosine"``); positive = helpful (up-weighting the example lowers the query
    loss). For large ``n`` prefer :func:`top_k_influence`, which keeps only ``m × k`` scores.

    Args:
      store: a complete :class:`~bilevel_jax.influence.store.GradientStore`, or an ``(n, d)``
        array of projected training gradients.
      queries: ``(m, d)`` projected query gradients (same projection as the store).
      mode: ``"dot"``, ``"influence"``, ``"relatif"`` or ``"cosine"``.
      fisher: :func:`fisher_eigh` of :func:`projected_fisher` (ignored by ``"dot"``); ``None``
        computes it from the store (one extra pass).
      damping: ``δ``; ``None`` for :func:`default_damping` (``0.1 · mean(λ)``).
      block_size: rows scored at a time (the last block is padded: one compilation).

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import score_store
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    >>> score_store(G, np.array([[1.0, 1.0]]), mode="dot", block_size=2).tolist()
    [[1.0, 2.0, 7.0]]
    """
    src = _Source(store, "score_store")
    left, w = _prepare(src, queries, mode, fisher, damping, block_size, "score_store")
    out = np.empty((left.shape[0], src.n), np.float32)
    pending = None
    for start, block in src.blocks(block_size, "score_store"):
        result = _score_block(left, w, block)  # dispatched asynchronously
        if pending is not None:  # copy the previous block's scores while this one runs
            p_start, p_result = pending
            width = min(p_result.shape[1], src.n - p_start)
            out[:, p_start : p_start + width] = np.asarray(p_result)[:, :width]
        pending = (start, result)
    assert pending is not None
    p_start, p_result = pending
    out[:, p_start:] = np.asarray(p_result)[:, : src.n - p_start]
    return out


def top_k_influence(
    store: Any,
    queries: Any,
    k: int,
    *,
    mode: str = "influence",
    fisher: FisherEigen | None = None,
    damping: float | None = None,
    block_size: int = 2048,
    largest: bool = True,
) -> TopK:
    """The ``k`` highest-scoring training examples per query, merged across blocks on the device.

    Scores as :func:`score_store` (same ``mode``, ``fisher``, ``damping``); ``largest=True``
    gives the most helpful examples (proponents), ``largest=False`` the most harmful ones
    (opponents: the most negative scores, returned as they are, most negative first). Ties keep
    the lower row first.

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import top_k_influence
    >>> rng = np.random.default_rng(0)
    >>> G, Q = rng.normal(size=(100, 8)), rng.normal(size=(3, 8))
    >>> top = top_k_influence(G, Q, k=5, mode="relatif", block_size=32)
    >>> top.values.shape, top.ids.shape, bool((np.diff(top.values, axis=1) <= 0).all())
    ((3, 5), (3, 5), True)
    """
    src = _Source(store, "top_k_influence")
    k = int(k)
    if not 1 <= k <= src.n:
        raise ValueError(f"top_k_influence: k must be in [1, n={src.n}], got {k}")
    left, w = _prepare(src, queries, mode, fisher, damping, block_size, "top_k_influence")
    m = left.shape[0]
    values = jnp.full((m, k), -jnp.inf, jnp.float32)
    rows = jnp.full((m, k), -1, jnp.int32)
    n = jnp.asarray(src.n, jnp.int32)
    for start, block in src.blocks(block_size, "top_k_influence"):
        values, rows = _top_k_block(
            values,
            rows,
            left,
            w,
            block,
            jnp.asarray(start, jnp.int32),
            n,
            k=k,
            largest=bool(largest),
        )
    vals = np.asarray(values, np.float32)
    r = np.asarray(rows, np.int64)
    return TopK(vals if largest else -vals, src.ids()[r], r)


def self_influence(
    store: Any,
    *,
    mode: str = "influence",
    fisher: FisherEigen | None = None,
    damping: float | None = None,
    block_size: int = 2048,
) -> np.ndarray:
    """Each training example's self-influence ``g_iᵀ (F + δI)⁻¹ g_i`` (``(n,)`` float32).

    With ``mode="dot"`` it is ``‖g_i‖²``. Large values flag examples the model finds surprising
    (mislabelled or atypical: Koh & Liang 2017, TracIn); RelatIF divides by its square root.

    >>> import numpy as np
    >>> from bilevel_jax.influence.scoring import fisher_eigh, self_influence
    >>> G = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    >>> self_influence(G, mode="dot").tolist()
    [1.0, 4.0, 25.0]
    >>> eig = fisher_eigh(np.eye(2))
    >>> self_influence(G, fisher=eig, damping=1.0).tolist()  # ‖g‖² / (1 + 1)
    [0.5, 2.0, 12.5]
    """
    _check_mode(mode, "self_influence", ("dot", "influence"))
    src = _Source(store, "self_influence")
    w = None
    if mode == "influence":
        if fisher is None:
            fisher = fisher_eigh(_fisher_of(src, block_size))
        delta = _resolve_damping(fisher, damping, "self_influence")
        lam = fisher.eigenvalues.astype(jnp.float32)
        w = fisher.eigenvectors.astype(jnp.float32) / jnp.sqrt(lam + delta)
    out = np.empty(src.n, np.float32)
    for start, block in src.blocks(block_size, "self_influence"):
        res = np.asarray(_self_block(w, block))
        out[start : start + res.shape[0]] = res[: src.n - start]
    return out
