r"""LoGra's logging pass: projected gradients streamed to a store, the Fisher accumulated on the way.

One pass over the training data, block by block, through one compiled function: each block's
per-example projected gradients ``G̃_i = P_inᵀ G_i P_out`` (the Kronecker path of
:func:`~bilevel_jax.influence.logra.logra_gradients`: no full per-example gradient is formed)
are written to a :class:`~bilevel_jax.influence.store.GradientStore` while the projected
empirical Fisher

.. math::

    F_l = \frac1n \sum_i \mathrm{vec}(\tilde G_{i,l}) \mathrm{vec}(\tilde G_{i,l})^\top

of each layer ``l`` (or of all layers at once, ``fisher="full"``) is accumulated in float32 on
the device. The next block is computed while the previous one is copied to the host and written
(JAX's asynchronous dispatch). The rows are stored in the store's dtype (float16 by default);
the Fisher is accumulated from the float32 gradients.

Resuming: if the store already holds rows (a pass that was killed), the blocks that lie
entirely before ``store.rows_written`` are skipped and the Fisher of those rows is rebuilt from
the stored values (so it then carries the storage dtype's rounding for them); the blocks must
be the same as the first time (the store's ids are checked against them).

Reference: Choe et al., "What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence
Functions" (2024); Choe, PhD thesis, ch. 4.

>>> import tempfile, jax, jax.numpy as jnp, numpy as np
>>> from flax import nnx
>>> from bilevel_jax import influence as inf
>>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
>>> proj = inf.Projection(jnp.eye(4, 2), jnp.eye(2, 2))       # k_in = 2 of 3 + bias, k_out = 2
>>> loss = lambda m, z: jnp.sum((m(z[0]) - z[1]) ** 2)
>>> x, y = jax.random.normal(jax.random.key(0), (5, 3)), jnp.zeros((5, 2))
>>> blocks = [(np.arange(0, 2), (x[:2], y[:2])), (np.arange(2, 4), (x[2:4], y[2:4])),
...           (np.arange(4, 5), (x[4:], y[4:]))]
>>> with tempfile.TemporaryDirectory() as d:
...     store = inf.GradientStore.create(d, n=5, d=4, dtype="float32")
...     fisher = inf.log_gradients(inf.with_logra(model, proj), loss, blocks, store)
...     G = store.read(0, 5)
>>> fisher.shape, bool(np.allclose(fisher, G.T @ G / 5, atol=1e-5))
((4, 4), True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax.influence.logra import _bottleneck_grad_fn, _key, _nest
from bilevel_jax.influence.store import GradientStore

__all__ = ["log_gradients"]

PyTree = Any


def _flat(grads: PyTree) -> jax.Array:
    """``(n, d)`` rows: each layer's gradients row-major, the layers in pytree order (the
    order of :func:`~bilevel_jax.influence.logra.flatten_projected`)."""
    return jnp.concatenate([v.reshape(v.shape[0], -1) for v in jax.tree.leaves(grads)], axis=1)


def log_gradients(
    model,
    loss: Callable[..., jax.Array],
    blocks: Iterable[tuple[Any, PyTree]],
    store: GradientStore,
    *,
    fisher: Literal["layer", "full"] = "layer",
) -> Any:
    r"""Write the projected gradients of ``blocks`` to ``store``; return the projected Fisher.

    Args:
      model: an NNX model with LoGra adapters (:func:`~bilevel_jax.influence.logra.with_logra`),
        in evaluation mode.
      loss: ``loss(model, example) -> scalar``, one example's loss ``ℓ_i``.
      blocks: ``(ids, batch)`` pairs in row order: ``ids`` the ``(b,)`` integer example ids,
        ``batch`` a pytree with the ``b`` examples along axis 0. Every block but the last must
        have the first block's size (the last one is padded, so one compilation serves all).
      store: a writable :class:`~bilevel_jax.influence.store.GradientStore` of
        ``d = Σ_l k_in,l · k_out,l`` columns (:func:`~bilevel_jax.influence.logra.flatten_projected`'s
        order); rows already written (a resumed pass) are skipped, see the module docstring.
      fisher: ``"layer"``: one ``(d_l, d_l)`` Fisher per layer, keyed like the projections
        (block diagonal, as in LoGra); ``"full"``: one ``(d, d)`` matrix.

    Returns:
      the projected empirical Fisher ``(1/n) Σ_i g̃_i g̃_iᵀ`` over all ``n`` rows of the store
      (float32): a pytree of per-layer matrices, or one matrix. Damp it after the fact with
      :func:`~bilevel_jax.influence.scoring.fisher_eigh` and
      :func:`~bilevel_jax.influence.scoring.default_damping`.

    Raises:
      ValueError: a model without adapters, blocks of the wrong size, a width other than the
        store's ``d``, ids that disagree with a resumed store's, or fewer rows than ``n``.

    Example (two blocks of a 4 → 2 linear model, projected to 2 × 1 per example):
      >>> import tempfile, jax, jax.numpy as jnp, numpy as np
      >>> from flax import nnx
      >>> from bilevel_jax.influence import GradientStore, Projection, with_logra
      >>> model = with_logra(nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
      ...                    Projection(jnp.eye(5, 2), jnp.eye(2, 1)))
      >>> loss = lambda m, x: jnp.sum(m(x) ** 2)
      >>> x = jax.random.normal(jax.random.key(0), (6, 4))
      >>> blocks = [(np.arange(3), x[:3]), (np.arange(3, 6), x[3:])]
      >>> with tempfile.TemporaryDirectory() as d:
      ...     with GradientStore.create(d, n=6, d=2, dtype="float32") as store:
      ...         fisher = log_gradients(model, loss, blocks, store, fisher="full")
      ...     rows = GradientStore.open(d).read(0, 6)
      >>> rows.shape, bool(np.allclose(fisher, rows.T @ rows / 6, atol=1e-6))
      ((6, 2), True)
    """
    if fisher not in ("layer", "full"):
        raise ValueError(f"log_gradients: fisher must be 'layer' or 'full', got {fisher!r}")
    if not store.writable:
        raise ValueError(
            f"log_gradients: the store in {store.path} is read-only; open it with "
            "GradientStore.open(path, resume=True, metadata=...)"
        )
    grad_fn, b, rest = _bottleneck_grad_fn(model, loss)
    hi = jax.lax.Precision.HIGHEST
    spans: list[tuple[int, int]] = []  # the Fisher's diagonal blocks: (first column, width)
    layers: list[tuple[Any, int]] = []

    def accumulate(acc: list[jax.Array], rows: jax.Array) -> list[jax.Array]:
        return [
            a + jnp.dot(rows[:, c : c + w].T, rows[:, c : c + w], precision=hi)
            for a, (c, w) in zip(acc, spans)
        ]

    @jax.jit
    def step(acc, batch, valid):
        rows = _flat(grad_fn(b, rest, batch))
        rows = jnp.where(valid[:, None], rows.astype(jnp.float32), 0.0)
        return accumulate(acc, rows), rows

    acc: list[jax.Array] = []
    start, size, pending, last_n = 0, None, None, None
    resume_at = store.rows_written
    for ids, batch in blocks:
        ids = np.asarray(ids)
        n_b = int(ids.shape[0])
        if size is None:
            size = n_b
            shapes = jax.eval_shape(lambda bt: grad_fn(b, rest, bt), batch)
            layers = [
                (tuple(_key(k) for k in path)[:-1], int(np.prod(sd.shape[1:])))
                for path, sd in jax.tree_util.tree_flatten_with_path(shapes)[0]
            ]
            d = sum(w for _, w in layers)
            if d != store.d:
                raise ValueError(
                    f"log_gradients: the projections give {d} columns per example, the store "
                    f"has d = {store.d}"
                )
            c = 0
            for _, w in layers if fisher == "layer" else [(None, d)]:
                spans.append((c, w))
                c += w
            acc = [jnp.zeros((w, w), jnp.float32) for _, w in spans]
        elif n_b > size or last_n != size:
            raise ValueError(
                f"log_gradients: every block but the last must have the first block's {size} "
                f"examples; got a block of {n_b} after one of {last_n}"
            )
        last_n = n_b
        if start + n_b <= resume_at:  # written before: check the ids, skip the work
            if not np.array_equal(store.ids[start : start + n_b], ids):
                raise ValueError(
                    f"log_gradients: the resumed store's ids at rows {start}:{start + n_b} are "
                    "not this block's; pass the same blocks as the first time"
                )
            start += n_b
            continue
        if start < resume_at:
            raise ValueError(
                f"log_gradients: the store holds {resume_at} rows, which ends inside the block "
                f"at rows {start}:{start + n_b}; pass the same blocks as the first time"
            )
        pad = size - n_b
        if pad:
            batch = jax.tree.map(
                lambda a, p=pad: jnp.concatenate([a, jnp.zeros((p, *a.shape[1:]), a.dtype)]),
                batch,
            )
        acc, rows = step(acc, batch, jnp.arange(size) < n_b)  # runs while the last is written
        if pending is not None:
            store.write(np.asarray(pending[0])[: pending[2]], pending[1])
        pending = (rows, ids, n_b)
        start += n_b
    if pending is not None:
        store.write(np.asarray(pending[0])[: pending[2]], pending[1])
    if size is None:
        raise ValueError("log_gradients: no blocks")
    if store.rows_written != store.n:
        raise ValueError(
            f"log_gradients: the blocks gave {store.rows_written} rows, the store has n = {store.n}"
        )
    for s0 in range(0, resume_at, 4096):  # rows written before this call: from the store
        rows = jnp.asarray(store.read(s0, min(s0 + 4096, resume_at)), jnp.float32)
        acc = accumulate(acc, rows)
    mats = [a / store.n for a in acc]
    if fisher == "full":
        return mats[0]
    return _nest([(path, m) for (path, _), m in zip(layers, mats)])
