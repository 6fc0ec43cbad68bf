r"""Models and losses that several studies share (Flax NNX; the library sees pure-dict pytrees).

* :class:`MLP` — the ReLU classifier of the MNIST studies and of the benchmark;
* :class:`CNN` — a small MNIST CNN written as matmuls over image patches;
* :class:`MetaWeightNet` — Shu et al. 2019, per-example loss ↦ weight in (0, 1);
* :class:`ByteTransformer` — a small transformer classifier over byte sequences (benchmark);
* :func:`weighted_cross_entropy` and :class:`ReweightLosses` — the data-reweighting bilevel
  problem: ``L_b = Σ w_i ℓ_i / Σ w_i`` with ``w_i = MWN_λ(sg ℓ_i)`` on the (noisy) train batch,
  ``L_m`` = the plain mean cross entropy on a clean batch.
* :func:`split` — a module's graph definition and its parameters as a pure dict.

Reference: J. Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting",
NeurIPS 2019.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.typing import ArrayLike

__all__ = [
    "MLP",
    "CNN",
    "MetaWeightNet",
    "ByteTransformer",
    "split",
    "weighted_cross_entropy",
    "ReweightLosses",
]

PyTree = Any


class MLP(nnx.Module):
    """ReLU MLP classifier ``sizes[0] → sizes[1] → … → sizes[-1]``."""

    def __init__(self, sizes: tuple[int, ...], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


class CNN(nnx.Module):
    r"""Small CNN for 28×28 digits, written as matmuls over image patches (im2col).

    conv 4×4 stride 4 (16 channels, 28×28 → 7×7) → ReLU → conv 3×3 stride 1 padding 1 (32
    channels) → ReLU → max-pool 2×2 (7×7 → 3×3) → dense 288 → 10. Each conv is one
    ``nnx.Linear`` shared over all positions. (XLA's CPU convolutions made an ``nnx.Conv``
    version of similar size 30× slower per step than the MLP; this one is ≈ 3×.)
    """

    def __init__(self, num_classes: int = 10, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Linear(16, 16, rngs=rngs)
        self.conv2 = nnx.Linear(9 * 16, 32, rngs=rngs)
        self.fc = nnx.Linear(3 * 3 * 32, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        n = x.shape[0]
        h = x.reshape(n, 7, 4, 7, 4).transpose(0, 1, 3, 2, 4).reshape(n, 7, 7, 16)  # 4×4 patches
        h = jax.nn.relu(self.conv1(h))
        hp = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))
        cols = jnp.concatenate(
            [hp[:, i : i + 7, j : j + 7] for i in range(3) for j in range(3)], -1
        )
        h = jax.nn.relu(self.conv2(cols))  # (n, 7, 7, 32)
        h = h[:, :6, :6].reshape(n, 3, 2, 3, 2, -1).max(axis=(2, 4))
        return self.fc(h.reshape(n, -1))


class MetaWeightNet(nnx.Module):
    """Meta-Weight-Net: per-example loss ``ℓ`` ↦ weight ``σ(W₂ relu(W₁ℓ + b₁) + b₂)``.

    ``out_scale`` multiplies the output layer's initial kernel: 0 starts the net flat, ``w = 0.5``
    for every example (i.e. plain training), so the shape of the weighting is learned from the
    meta-gradient alone.
    """

    def __init__(self, hidden: int = 100, *, out_scale: float = 1.0, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(1, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 1, rngs=rngs)
        self.fc2.kernel[...] = self.fc2.kernel[...] * out_scale  # 0: start flat, w = 0.5

    def __call__(self, losses: jax.Array) -> jax.Array:
        h = jax.nn.relu(self.fc1(losses[:, None]))
        return jax.nn.sigmoid(self.fc2(h))[:, 0]


class ByteTransformer(nnx.Module):
    """A small pre-LayerNorm transformer classifier over byte sequences (mean-pooled)."""

    def __init__(
        self,
        *,
        seq: int,
        classes: int,
        dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(256, dim, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq, dim)) * 0.02)
        self.blocks = nnx.List(
            [
                nnx.Dict(
                    ln1=nnx.LayerNorm(dim, rngs=rngs),
                    attn=nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs),
                    ln2=nnx.LayerNorm(dim, rngs=rngs),
                    fc1=nnx.Linear(dim, 4 * dim, rngs=rngs),
                    fc2=nnx.Linear(4 * dim, dim, rngs=rngs),
                )
                for _ in range(layers)
            ]
        )
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.embed(x) + self.pos[...]
        for b in self.blocks:
            h = h + b["attn"](b["ln1"](h))
            h = h + b["fc2"](jax.nn.gelu(b["fc1"](b["ln2"](h))))
        return self.head(self.ln(h).mean(axis=1))


def split(module: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """``(graphdef, params)``: the module's structure and its state as a pure dict pytree."""
    graphdef, state = nnx.split(module)
    return graphdef, nnx.to_pure_dict(state)


def weighted_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array,
    normalize: Literal["sum", "mean"] = "sum",
) -> jax.Array:
    r"""Weighted cross entropy ``Σ_i w_i ℓ_i / Σ_i w_i`` (``"sum"``) or ``Σ_i w_i ℓ_i / n`` (``"mean"``).

    ``ℓ_i = −log softmax(logits_i)[labels_i]``. With every ``w_i = 1`` both equal the mean cross
    entropy; with ``"sum"`` any constant weight does, and only relative weights matter.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if normalize == "sum":
        return jnp.sum(weights * ce) / jnp.sum(weights)
    if normalize == "mean":
        return jnp.mean(weights * ce)
    raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}")


class ReweightLosses:
    """The reweighting problem's losses for a classifier ``graphdef`` and a Meta-Weight-Net one.

    ``base(θ, λ, (x, ỹ))`` is the Meta-Weight-Net weighted cross entropy, ``meta(θ, λ, (x, y))``
    the plain mean cross entropy (λ unused), ``plain(θ, (x, y))`` the uniform-weight cross
    entropy, ``weights(θ, λ, x, y)`` the MWN weights of examples.
    """

    def __init__(self, model_def: nnx.GraphDef, mwn_def: nnx.GraphDef, normalize: str = "sum"):
        self.model_def, self.mwn_def, self.normalize = model_def, mwn_def, normalize

    def logits(self, theta: PyTree, x: ArrayLike) -> jax.Array:
        return nnx.merge(self.model_def, theta)(x)

    def per_example(self, theta: PyTree, x: ArrayLike, y: ArrayLike) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(self.logits(theta, x), y)

    def weights(self, theta: PyTree, lam: PyTree, x: ArrayLike, y: ArrayLike) -> jax.Array:
        ce = jax.lax.stop_gradient(self.per_example(theta, x, y))
        return nnx.merge(self.mwn_def, lam)(ce)

    def base(self, theta: PyTree, lam: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = self.logits(theta, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        w = nnx.merge(self.mwn_def, lam)(jax.lax.stop_gradient(ce))
        return weighted_cross_entropy(logits, y, w, self.normalize)  # type: ignore[arg-type]

    def meta(self, theta: PyTree, lam: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        del lam
        x, y = batch
        return jnp.mean(self.per_example(theta, x, y))

    def plain(self, theta: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        return jnp.mean(self.per_example(theta, x, y))

    def accuracy(self, theta: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        """Fraction of ``x`` whose argmax logit is ``y``."""
        return jnp.mean(jnp.argmax(self.logits(theta, x), -1) == y)
