r"""Byte-level language models for the online data-selection study (Flax NNX at the edges).

The study (Grangier, Ablin & Hannun, "Bilevel Optimization to Learn Training Distributions for
Language Modeling under Domain Shift", arXiv:2311.11973) trains a language model θ on generic
text whose examples are weighted by a cheap network ``w(x; α)``, and learns α so that θ does
well on a small specific domain:

.. math::

    \min_α\; L_{\rm spec}(θ^*(α)), \qquad
    θ^*(α) = \arg\min_θ \sum_i \mathrm{softmax}_i(s(x_i; α))\, ℓ(x_i; θ).

This module holds the models and the LM-specific losses; the generic weighting helpers (softmax
over a batch of scores, ``Σ_i w_i ℓ_i``) live in the library (``bilevel_jax.selection``).

* :class:`ByteLM` — a pre-LayerNorm causal transformer over bytes with tied input/output
  embeddings (``logits = h Eᵀ``);
* :class:`WeightingCNN` — the paper's weighting network: byte embedding → causal Conv1D
  (kernel 7) → ReLU → per-token Dense → mean over positions, one score per sequence;
* :class:`DomainClassifier` — the same CNN read as a logistic classifier generic (0) vs
  specific (1), trained with :func:`bilevel_jax.domain_classifier`;
* pure functions of ``(graphdef, params)`` pytrees, as the library sees them:
  :func:`per_example_nll`, :func:`lm_loss`, :func:`scores`, plus
  :func:`bits_per_byte` and :func:`num_params`.

A *window* is an int32 array ``(n, T + 1)`` of bytes: the LM reads ``windows[:, :-1]`` and
predicts ``windows[:, 1:]`` (``T ≤ context``).

Everything is float32. ``python -m experiments.lm`` prints the default sizes and a measured
forward+backward time of the CNN against the LM.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

__all__ = [
    "VOCAB",
    "ByteLM",
    "WeightingCNN",
    "DomainClassifier",
    "per_example_nll",
    "lm_loss",
    "bits_per_byte",
    "scores",
    "num_params",
]

PyTree = Any

VOCAB = 256  # bytes


def _check_bytes(x: jax.Array, name: str, *, max_len: int | None = None) -> None:
    """Static checks (shape, dtype) that also hold under ``jit``; byte values are not checked."""
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (batch, length) of bytes, got shape {x.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must hold integer byte ids in [0, 256), got dtype {x.dtype}")
    if max_len is not None and x.shape[1] > max_len:
        raise ValueError(
            f"{name} has length {x.shape[1]} > the model's context {max_len}; "
            "cut the sequences or build the model with a larger context"
        )


class _Block(nnx.Module):
    """Pre-LayerNorm decoder block: ``h += Attn(LN₁ h)``, ``h += W₂ gelu(W₁ LN₂ h)``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

    def attend(self, h: jax.Array) -> jax.Array:
        """Causal multi-head self-attention: position t attends to positions ≤ t only."""
        n, t, d = h.shape
        q, k, v = jnp.split(self.qkv(h).reshape(n, t, 3, self.heads, d // self.heads), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]  # (n, t, heads, d_head)
        s = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(d // self.heads)
        causal = jnp.tril(jnp.ones((t, t), bool))
        # exp(-inf) = 0 exactly, so a future key's value enters the sum as an exact 0 · v
        p = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        return self.proj(jnp.einsum("nhqk,nkhd->nqhd", p, v).reshape(n, t, d))

    def __call__(self, h: jax.Array) -> jax.Array:
        h = h + self.attend(self.ln1(h))
        return h + self.fc2(jax.nn.gelu(self.fc1(self.ln2(h))))


class ByteLM(nnx.Module):
    r"""Byte-level causal LM: pre-LayerNorm transformer, learned positions, tied embeddings.

    ``h₀ = E[x] + P[:T]``; ``layers`` blocks ``h += Attn(LN h)`` (causal, ``heads`` heads),
    ``h += W₂ gelu(W₁ LN h)`` (width ``4·dim``); ``logits = LN_f(h) Eᵀ`` — the output projection
    *is* the embedding matrix ``E`` (256 × dim; no output kernel, no output bias). ``E`` and
    ``P`` start as N(0, 0.02²), so the initial logits have standard deviation ≈ 0.02·√dim
    (≈ 0.23 at dim 128) and the initial loss is ≈ ln 256 + σ²/2 ≈ 5.57 nats.

    Measured parameter counts (:func:`num_params`): 445,952 with the defaults (dim 128, heads 4,
    layers 2, context 128); each block has 12·dim² + 13·dim parameters.

    Args:
      dim: model width. heads: attention heads (divides ``dim``). layers: decoder blocks.
      context: the longest input; positions are learned, so longer inputs are an error.
      rngs: parameter initialisation.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> lm = ByteLM(dim=32, heads=4, layers=2, context=32, rngs=nnx.Rngs(0))
      >>> lm(jnp.zeros((3, 32), jnp.int32)).shape
      (3, 32, 256)
    """

    def __init__(
        self,
        *,
        dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        context: int = 128,
        rngs: nnx.Rngs,
    ):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
        self.context = context
        self.embed = nnx.Embed(VOCAB, dim, embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (context, dim)) * 0.02)
        self.blocks = nnx.List([_Block(dim, heads, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(dim, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The final normalised hidden states ``LN_f(h)``, shape ``(n, T, dim)``."""
        _check_bytes(x, "x", max_len=self.context)
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Next-byte logits ``(n, T, 256)``: ``logits[:, t]`` predicts byte ``t + 1`` from ``x[:, :t+1]``."""
        return self.features(x) @ self.embed.embedding[...].T


class WeightingCNN(nnx.Module):
    r"""The weighting network ``s(x; α)``: one scalar score per byte sequence.

    byte embedding (``embed``) → causal Conv1D (``kernel`` taps, ``channels`` filters; the
    sequence is zero-padded on the left, so the features at position t see bytes
    ``t−kernel+1 … t`` only) → ReLU → per-token Dense to one value → mean over positions:

    .. math:: s(x) = \frac1T \sum_{t} \big(v^\top \mathrm{relu}(W [e_{x_{t-k+1}}; …; e_{x_t}] + b) + c\big).

    The conv is one ``nnx.Linear`` over the stacked shifted embeddings (im2col), which XLA runs
    faster on CPU than a convolution. ``zero_init=True`` starts the output Dense at zero
    (kernel and bias), so every sequence gets the same score 0 — a uniform softmax weighting —
    while the gradient with respect to ``v`` (the mean conv features) is nonzero, so learning
    starts from plain training.

    Measured parameter counts (:func:`num_params`): 22,657 with the defaults (embed 32,
    channels 64, kernel 7): 8,192 embedding + 14,400 conv + 65 output.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> cnn = WeightingCNN(zero_init=True, rngs=nnx.Rngs(0))
      >>> cnn(jnp.arange(80, dtype=jnp.int32).reshape(4, 20))
      Array([0., 0., 0., 0.], dtype=float32)
    """

    def __init__(
        self,
        *,
        embed: int = 32,
        channels: int = 64,
        kernel: int = 7,
        zero_init: bool = False,
        rngs: nnx.Rngs,
    ):
        self.kernel = kernel
        self.embed = nnx.Embed(VOCAB, embed, rngs=rngs)
        self.conv = nnx.Linear(kernel * embed, channels, rngs=rngs)
        self.out = nnx.Linear(channels, 1, rngs=rngs)
        if zero_init:
            self.out.kernel[...] = jnp.zeros_like(self.out.kernel[...])

    def features(self, x: jax.Array) -> jax.Array:
        """Causal conv features after the ReLU, ``(n, T, channels)``; position t sees bytes ≤ t."""
        _check_bytes(x, "x")
        e = self.embed(x)  # (n, T, embed)
        t = x.shape[1]
        ep = jnp.pad(e, ((0, 0), (self.kernel - 1, 0), (0, 0)))  # left padding only
        cols = jnp.concatenate([ep[:, j : j + t] for j in range(self.kernel)], axis=-1)
        return jax.nn.relu(self.conv(cols))

    def token_scores(self, x: jax.Array) -> jax.Array:
        """Per-position scores ``(n, T)`` before the mean pooling."""
        return self.out(self.features(x))[..., 0]

    def __call__(self, x: jax.Array) -> jax.Array:
        """One score per sequence, ``(n,)``."""
        return self.token_scores(x).mean(axis=1)


class DomainClassifier(WeightingCNN):
    r"""The :class:`WeightingCNN` read as a logistic classifier: generic (0) vs specific (1).

    Its score is the logit of ``P(specific | x) = σ(s(x))``; train it with
    :func:`bilevel_jax.domain_classifier` and rank generic examples by logit (the paper's
    domain-classifier baseline). Same arguments as :class:`WeightingCNN`, but the output layer
    starts at the usual random init (``zero_init=False``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> clf = DomainClassifier(rngs=nnx.Rngs(0))
      >>> jax.nn.sigmoid(clf(jnp.zeros((4, 20), jnp.int32))).shape
      (4,)
    """


def per_example_nll(graphdef: nnx.GraphDef, params: PyTree, windows: jax.Array) -> jax.Array:
    r"""Mean next-byte negative log-likelihood of each window, in nats, shape ``(n,)``.

    .. math:: ℓ_i = -\frac1T \sum_{t=1}^{T} \log p_θ(w_{i,t} \mid w_{i,0}, …, w_{i,t-1}),

    with inputs ``windows[:, :-1]`` and targets ``windows[:, 1:]`` (``windows``: integer bytes
    ``(n, T + 1)``, ``T ≤ context``).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from experiments.models import split
      >>> lm_def, theta = split(ByteLM(dim=32, heads=4, layers=2, context=32, rngs=nnx.Rngs(0)))
      >>> per_example_nll(lm_def, theta, jnp.zeros((3, 33), jnp.int32)).shape
      (3,)
    """
    windows = jnp.asarray(windows)
    _check_bytes(windows, "windows")
    if windows.shape[1] < 2:
        raise ValueError(
            f"windows need at least 2 bytes (input + target), got shape {windows.shape}"
        )
    logits = nnx.merge(graphdef, params)(windows[:, :-1])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
    return nll.mean(axis=1)


def lm_loss(graphdef: nnx.GraphDef, params: PyTree, windows: jax.Array) -> jax.Array:
    r"""The mean of :func:`per_example_nll` over the batch (nats per predicted byte).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from experiments.models import split
      >>> lm_def, theta = split(ByteLM(dim=32, heads=4, layers=2, context=32, rngs=nnx.Rngs(0)))
      >>> windows = jax.random.randint(jax.random.key(0), (3, 33), 0, 256)
      >>> loss = lm_loss(lm_def, theta, windows)
      >>> bool(abs(loss - math.log(256)) < 0.1)  # untrained: ≈ uniform over 256 bytes
      True
    """
    return per_example_nll(graphdef, params, windows).mean()


def bits_per_byte(nats_per_byte: jax.Array | float) -> jax.Array:
    r"""Convert a loss in nats per byte to bits per byte: ``bpb = nats / ln 2``.

    (``log₂ p = ln p / ln 2``; a byte LM's bits per byte is its loss in nats per byte divided
    by ln 2; uniform guessing gives 8 bits per byte.)

    Example:
      >>> import math
      >>> float(bits_per_byte(math.log(256)))
      8.0
    """
    return jnp.asarray(nats_per_byte) / math.log(2.0)


def scores(graphdef: nnx.GraphDef, params: PyTree, windows: jax.Array) -> jax.Array:
    r"""The weighting network's score of each window, ``(n,)`` (the whole window is read).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from experiments.models import split
      >>> cnn_def, alpha = split(WeightingCNN(zero_init=True, rngs=nnx.Rngs(0)))
      >>> scores(cnn_def, alpha, jnp.ones((4, 20), jnp.int32))
      Array([0., 0., 0., 0.], dtype=float32)
    """
    return nnx.merge(graphdef, params)(jnp.asarray(windows))


def num_params(params: PyTree) -> int:
    """Number of scalar parameters in a pytree.

    Example:
      >>> num_params({"a": jnp.zeros((2, 3)), "b": jnp.zeros(4)})
      10
    """
    return sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))


def _time(fn, *args, repeats: int = 20) -> float:
    """Median wall time of a compiled call (seconds)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _main(batch: int = 64) -> None:
    """Print the default sizes and the CNN's forward+backward time against the LM's."""
    from experiments.models import split

    lm = ByteLM(rngs=nnx.Rngs(0))
    cnn = WeightingCNN(rngs=nnx.Rngs(1))
    lm_def, theta = split(lm)
    cnn_def, alpha = split(cnn)
    windows = jax.random.randint(jax.random.key(2), (batch, lm.context + 1), 0, VOCAB)
    lm_step = jax.jit(jax.value_and_grad(lambda p, w: lm_loss(lm_def, p, w)))
    cnn_step = jax.jit(jax.value_and_grad(lambda p, w: scores(cnn_def, p, w).mean()))
    t_lm, t_cnn = _time(lm_step, theta, windows), _time(cnn_step, alpha, windows)
    print(f"ByteLM params {num_params(theta):,}; WeightingCNN params {num_params(alpha):,}")
    print(
        f"forward+backward on {windows.shape}: LM {t_lm * 1e3:.2f} ms, CNN {t_cnn * 1e3:.2f} ms, "
        f"ratio CNN/LM {t_cnn / t_lm:.3f} ({jax.default_backend()})"
    )


if __name__ == "__main__":
    _main()
