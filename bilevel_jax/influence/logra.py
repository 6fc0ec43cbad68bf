r"""LoGra: Kronecker-projected per-example gradients of linear layers (``bj.influence``).

Reference: S. K. Choe et al., "What is Your Data Worth to GPT? LLM-Scale Data Valuation with
Influence Functions", 2024, and S. K. Choe, "Understanding Training Data in Large-Scale Machine
Learning" (thesis), ch. 4.

**Convention** (the one of :mod:`bilevel_jax.influence`). The training objective with
per-example weights ``w`` is ``L(θ; w) = (1/n) Σ_i w_i ℓ_i(θ) + R(θ)``, and the influence of
example ``i`` on a query loss ``f`` is

.. math::

    \mathrm{influence}(i, f) = g_f^\top (H + \delta I)^{-1} g_i
        = -n \, \frac{d f(\theta^*(w))}{d w_i}\Big|_{w = 1},
    \qquad g_i = \nabla \ell_i(\theta^*),\ g_f = \nabla f(\theta^*);

positive means up-weighting example ``i`` lowers the query loss. The functions here produce
the *projected per-example gradients* ``g̃_i = Pᵀ g_i`` of the unweighted per-example loss
``ℓ_i`` (no ``1/n``, no ``w``). LoGra's influence is the same formula in the projected space,
with ``H`` replaced by the per-layer (block-diagonal) projected empirical Fisher
``F̃_l = (1/n) Σ_i g̃_{i,l} g̃_{i,l}ᵀ``; the thesis' INFLUENCE is this ``influence`` (same sign),
Koh & Liang's ``I_up,loss`` is ``−influence``, and TRAK / grad-dot scores are ``g̃_fᵀ g̃_i``.

**One linear layer.** In Flax's layout a linear layer is ``y = x K + b`` with the kernel ``K``
of shape ``(d_in, d_out)``. One example's gradient of ``K`` is ``G = Σ_t x_t δy_tᵀ``
(``d_in × d_out``; the sum runs over the positions ``t`` of a sequence, ``δy_t = ∂ℓ/∂y_t``).
LoGra projects it with ``P = P_in ⊗ P_out``:

.. math::

    \tilde G = P_{in}^\top G \, P_{out} = \sum_t (P_{in}^\top x_t)(P_{out}^\top \delta y_t)^\top
    \quad (k_{in} \times k_{out}),

so the adapter (:func:`with_logra`) computes it from projected activations and projected
output-gradients without ever forming ``G``: it adds ``((x P_in) B) P_outᵀ`` to the layer's
output with a zero bottleneck ``B`` (``k_in × k_out``); since ``B = 0`` the outputs and the
gradients of the original parameters are unchanged, and ``∂ℓ/∂B = G̃``.

**Biases** (one rule for every function here). A bias is the last row of the augmented kernel
``K̃ = [K; b]`` acting on the augmented input ``x̃ = [x, 1]``; its gradient is
``G̃ = [G; Σ_t δy_tᵀ]`` (``(d_in + 1) × d_out``). The number of rows of ``P_in`` says which
is projected: ``d_in + 1`` rows → the augmented gradient (kernel and bias), ``d_in`` rows → the
kernel's gradient only (the bias is left out). Any other number is an error.

**Which parameters.** Only the layers named in a projections pytree are projected; every other
parameter (layer-norm scales, embeddings, attention's 3-D kernels, 1-D leaves outside a
linear layer) is left out of the projected gradient. A projections pytree is keyed like the
parameters down to the layer: ``{"layers": {0: Projection(p_in, p_out), …}}`` for params
``{"layers": {0: {"kernel": …, "bias": …}, …}}``; a :class:`Projection` may also sit on a bare
2-D leaf (no bias).

Flax is imported when the NNX functions are called, never at ``import bilevel_jax``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, MutableMapping, MutableSequence, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "Projection",
    "Covariances",
    "per_example_grads",
    "project_gradients",
    "flatten_projected",
    "random_projection",
    "random_projections",
    "pca_projections",
    "kfac_covariances",
    "logra_linear",
    "with_logra",
    "logra_gradients",
]

PyTree = Any
Path = tuple[Any, ...]


class Projection(NamedTuple):
    r"""One linear layer's LoGra projection ``P = P_in ⊗ P_out``.

    ``p_in``: ``(d_in, k_in)`` or ``(d_in + 1, k_in)`` (the last row for the bias, see the
    module docstring); ``p_out``: ``(d_out, k_out)``. The layer's projected gradient is
    ``P_inᵀ G̃ P_out`` (``k_in × k_out``). A ``Projection`` is a pytree (a named tuple), so
    projections pass through ``jax.jit`` as arrays.

    Example:
      >>> import jax.numpy as jnp
      >>> p = Projection(jnp.eye(3, 2), jnp.eye(4, 2))
      >>> p.p_in.shape, p.p_out.shape
      ((3, 2), (4, 2))
    """

    p_in: jax.Array
    p_out: jax.Array


class Covariances(NamedTuple):
    r"""One linear layer's KFAC factors (see :func:`kfac_covariances`).

    ``forward``: ``A = (1/n) Σ_i Σ_t x̃_{i,t} x̃_{i,t}ᵀ`` (the activation covariance,
    ``d_in (+1)`` square); ``backward``: ``S = (1/n) Σ_i Σ_t δy_{i,t} δy_{i,t}ᵀ`` (the
    output-gradient covariance, ``d_out`` square).

    Example:
      >>> import jax.numpy as jnp
      >>> c = Covariances(jnp.eye(3), jnp.eye(2))
      >>> c.forward.shape, c.backward.shape
      ((3, 3), (2, 2))
    """

    forward: jax.Array
    backward: jax.Array


# ----------------------------------------------------------------------------- pytree paths


def _key(k) -> Any:
    """A jax path entry as the plain key it stands for (dict key, index or attribute)."""
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return getattr(k, attr)
    raise TypeError(f"unsupported pytree path entry {k!r}")


def _fmt(path: Path) -> str:
    return "/".join(str(p) for p in path) or "<root>"


def _projection_items(projections: PyTree) -> list[tuple[Path, Projection]]:
    """``[(layer path, Projection)]`` in the pytree's flatten order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(
        projections, is_leaf=lambda x: isinstance(x, Projection)
    )
    items = []
    for path, leaf in flat:
        if not isinstance(leaf, Projection):
            raise TypeError(
                f"projections must be a pytree of Projection(p_in, p_out) keyed like the "
                f"parameters; found {type(leaf).__name__} at {_fmt(tuple(map(_key, path)))}"
            )
        items.append((tuple(_key(k) for k in path), leaf))
    if not items:
        raise ValueError("projections is empty: name at least one layer")
    return items


def _get(tree: PyTree, path: Path, what: str) -> Any:
    node = tree
    for i, k in enumerate(path):
        try:
            node = node[k] if isinstance(node, Mapping | Sequence) else getattr(node, k)
        except (KeyError, IndexError, AttributeError, TypeError):
            raise KeyError(
                f"projections name the layer {_fmt(path)} but {what} has no entry "
                f"{_fmt(path[: i + 1])}"
            ) from None
    return node


def _nest(items: Sequence[tuple[Path, Any]]) -> Any:
    """A nested dict holding each value at its path (a single value at the root: itself)."""
    if len(items) == 1 and items[0][0] == ():
        return items[0][1]
    out: dict = {}
    for path, value in items:
        if path == ():
            raise ValueError("a projection at the root cannot be combined with other layers")
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out


def _check_projection(proj: Projection, d_in: int, d_out: int, has_bias: bool, where: str) -> bool:
    """Validate shapes; return whether ``p_in`` includes the bias row."""
    p_in, p_out = proj
    if getattr(p_in, "ndim", None) != 2 or getattr(p_out, "ndim", None) != 2:
        raise ValueError(
            f"{where}: p_in and p_out must be 2-D matrices (d, k); got shapes "
            f"{getattr(p_in, 'shape', None)} and {getattr(p_out, 'shape', None)}"
        )
    rows = (d_in, d_in + 1) if has_bias else (d_in,)
    if p_in.shape[0] not in rows:
        hint = (
            f"{d_in + 1} (kernel and bias) or {d_in} (kernel only)"
            if has_bias
            else f"{d_in} (the layer has no bias, so no bias row)"
        )
        raise ValueError(f"{where}: p_in has {p_in.shape[0]} rows; this layer needs {hint}")
    if p_out.shape[0] != d_out:
        raise ValueError(f"{where}: p_out has {p_out.shape[0]} rows; this layer needs {d_out}")
    for name, p in (("p_in", p_in), ("p_out", p_out)):
        if p.shape[1] > p.shape[0]:
            raise ValueError(
                f"{where}: {name} has k = {p.shape[1]} columns > d = {p.shape[0]} rows; a "
                f"projection must reduce (k ≤ d)"
            )
    return p_in.shape[0] == d_in + 1


# ----------------------------------------------------------------------------- generic path


def per_example_grads(loss: Callable[..., jax.Array], params: PyTree, batch: PyTree) -> PyTree:
    r"""Per-example gradients ``g_i = ∇_θ ℓ(θ, z_i)``, stacked along a leading axis ``n``.

    ``jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)``: every leaf of the result
    has the shape of the parameter with ``n`` in front. This forms the full per-example
    gradients (the reference the LoGra adapter avoids; fine for small models).

    Args:
      loss: ``loss(params, example) -> scalar``, one example's loss ``ℓ_i``.
      params: the parameters θ (a pytree).
      batch: a pytree of arrays with the examples along axis 0.

    Example:
      >>> import jax.numpy as jnp
      >>> loss = lambda p, z: jnp.sum(p["w"] * z) ** 2
      >>> g = per_example_grads(loss, {"w": jnp.ones(2)}, jnp.array([[1.0, 0.0], [1.0, 2.0]]))
      >>> g["w"].tolist()
      [[2.0, 0.0], [6.0, 12.0]]
    """
    return jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)


def project_gradients(per_example: PyTree, projections: PyTree) -> PyTree:
    r"""LoGra-project per-example gradients: ``G̃_i = P_inᵀ G_i P_out`` for each named layer.

    For a layer whose gradient entry is ``{"kernel": (n, d_in, d_out), "bias": (n, d_out)}``
    (an ``nnx.Linear``'s, as in :func:`per_example_grads` of a split module) and a
    ``P_in`` with ``d_in + 1`` rows, the bias gradient is appended as the last row (the
    augmented kernel of the module docstring); with ``d_in`` rows only the kernel is projected.
    A :class:`Projection` on a bare ``(n, d_in, d_out)`` leaf projects that matrix.

    Args:
      per_example: per-example gradients (leading axis ``n``), e.g. from
        :func:`per_example_grads`.
      projections: a pytree of :class:`Projection` keyed like the parameters down to the layer.

    Returns:
      a pytree keyed like ``projections`` with leaves ``(n, k_in, k_out)``.

    Raises:
      KeyError: a named layer is missing from the gradients.
      ValueError / TypeError: a named entry is not a 2-D kernel (with a leading ``n``) or a
        ``{"kernel", "bias"}`` layer, or the projection's shapes do not fit it.

    Example:
      >>> import jax.numpy as jnp
      >>> g = {"fc": {"kernel": jnp.ones((5, 3, 4)), "bias": jnp.ones((5, 4))}}
      >>> proj = {"fc": Projection(jnp.eye(4, 2), jnp.eye(4, 2))}   # d_in + 1 = 4 rows
      >>> project_gradients(g, proj)["fc"].shape
      (5, 2, 2)
    """
    out = []
    for path, proj in _projection_items(projections):
        node = _get(per_example, path, "the per-example gradients")
        where = f"layer {_fmt(path)}"
        if isinstance(node, Mapping):
            if "kernel" not in node:
                raise TypeError(
                    f"{where}: expected a linear layer's gradients {{'kernel', 'bias'}} or a "
                    f"2-D leaf, got a dict with keys {sorted(map(str, node))}; name the layer "
                    f"(the dict holding 'kernel'), not its parent"
                )
            kernel, bias = node["kernel"], node.get("bias")
        else:
            kernel, bias = node, None
        if getattr(kernel, "ndim", None) != 3:
            raise ValueError(
                f"{where}: per-example gradient of shape {getattr(kernel, 'shape', None)}; LoGra "
                f"projects 2-D (d_in, d_out) kernels, expected (n, d_in, d_out) with the "
                f"examples in front (1-D and higher-order leaves are not supported: leave "
                f"them out of the projections)"
            )
        n, d_in, d_out = kernel.shape
        if bias is not None and getattr(bias, "shape", None) != (n, d_out):
            raise ValueError(
                f"{where}: bias gradient of shape {getattr(bias, 'shape', None)}, expected "
                f"{(n, d_out)}"
            )
        with_bias = _check_projection(proj, d_in, d_out, bias is not None, where)
        if with_bias:
            assert bias is not None  # _check_projection allows the bias row only with a bias
            g = jnp.concatenate([kernel, bias[:, None, :]], axis=1)
        else:
            g = kernel
        p_in, p_out = (jnp.asarray(p, g.dtype) for p in proj)
        out.append((path, jnp.einsum("ik,nij,jl->nkl", p_in, g, p_out)))
    return _nest(out)


def flatten_projected(projected: PyTree) -> jax.Array:
    r"""Projected gradients as one ``(n, Σ_l k_in,l · k_out,l)`` matrix.

    Layers in the pytree's flatten order (sorted keys), each ``(n, k_in, k_out)`` block
    row-major, so row ``i`` is example ``i``'s projected gradient ``g̃_i`` and
    ``flatten_projected(a) @ flatten_projected(b).T`` are the grad-dot scores.

    Example:
      >>> import jax.numpy as jnp
      >>> flatten_projected({"a": jnp.ones((3, 2, 2)), "b": jnp.ones((3, 1, 4))}).shape
      (3, 8)
    """
    leaves = jax.tree.leaves(projected)
    if not leaves:
        raise ValueError("no projected gradients to flatten")
    n = leaves[0].shape[0]
    for leaf in leaves:
        if leaf.ndim != 3 or leaf.shape[0] != n:
            raise ValueError(
                f"expected (n, k_in, k_out) leaves with the same n = {n}; got shape {leaf.shape}"
            )
    return jnp.concatenate([leaf.reshape(n, -1) for leaf in leaves], axis=1)


# ----------------------------------------------------------------------------- initialisation


def _basis(key: jax.Array, d: int, k: int, kind: str, dtype) -> jax.Array:
    if kind == "gaussian":
        return jax.random.normal(key, (d, k), dtype) / jnp.sqrt(jnp.asarray(k, dtype))
    if kind == "orthogonal":
        q, r = jnp.linalg.qr(jax.random.normal(key, (d, k), dtype))  # reduced: (d, k)
        return q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(dtype)
    raise ValueError(f"kind must be 'gaussian' or 'orthogonal', got {kind!r}")


def _check_k(k: int | None, d: int, name: str, where: str) -> int:
    if k is None:
        return d
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: {name} must be a positive int or None (= d), got {k!r}")
    if k > d:
        raise ValueError(f"{where}: {name} = {k} exceeds the dimension d = {d}; need k ≤ d")
    return k


def random_projection(
    key: jax.Array,
    d_in: int,
    d_out: int,
    k_in: int | None,
    k_out: int | None,
    *,
    kind: Literal["gaussian", "orthogonal"] = "gaussian",
    dtype=jnp.float32,
) -> Projection:
    r"""A random :class:`Projection` of shapes ``(d_in, k_in)`` and ``(d_out, k_out)``.

    ``"gaussian"``: i.i.d. ``N(0, 1/k)`` entries, so ``E[P Pᵀ] = I`` and projected inner
    products are unbiased estimates of the full ones (Johnson–Lindenstrauss; LoGra's default).
    ``"orthogonal"``: orthonormal columns (``PᵀP = I_k``; Haar-distributed, QR of a Gaussian);
    at ``k = d`` it is an orthogonal matrix and projected inner products are exact. For a layer
    with a bias whose bias gradient is to be projected, pass ``d_in + 1``.

    Args:
      key: a PRNG key; ``k_in``/``k_out``: the projected sizes (``None``: the full ``d``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> p = random_projection(jax.random.key(0), 5, 3, 4, 3, kind="orthogonal")
      >>> p.p_in.shape, bool(jnp.allclose(p.p_in.T @ p.p_in, jnp.eye(4), atol=1e-5))
      ((5, 4), True)
    """
    k_in = _check_k(k_in, d_in, "k_in", "random_projection")
    k_out = _check_k(k_out, d_out, "k_out", "random_projection")
    k1, k2 = jax.random.split(key)
    return Projection(_basis(k1, d_in, k_in, kind, dtype), _basis(k2, d_out, k_out, kind, dtype))


def _find_layers(params: PyTree) -> list[tuple[Path, int, int, bool]]:
    """``[(path, d_in, d_out, has_bias)]`` of every dict holding a 2-D ``"kernel"``."""
    found = []

    def walk(node, path):
        if isinstance(node, Mapping):
            kernel: Any = node.get("kernel")
            if getattr(kernel, "ndim", None) == 2:
                found.append((path, *kernel.shape, node.get("bias") is not None))
                return
            for k in node:
                walk(node[k], (*path, k))
        elif isinstance(node, list | tuple):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(params, ())
    return found


def _layer_shapes(params: PyTree, layers) -> list[tuple[Path, int, int, bool]]:
    if layers is None:
        found = _find_layers(params)
        if not found:
            raise ValueError(
                "no linear layer (a dict holding a 2-D 'kernel') in params; pass layers= "
                "with the paths of the 2-D leaves to project"
            )
        return found
    shapes = []
    for layer in layers:
        path = tuple(layer)
        node = _get(params, path, "params")
        kernel: Any
        if isinstance(node, Mapping):
            kernel, has_bias = node.get("kernel"), node.get("bias") is not None
        else:
            kernel, has_bias = node, False
        if getattr(kernel, "ndim", None) != 2:
            raise ValueError(
                f"layer {_fmt(path)}: LoGra projects 2-D kernels, got shape "
                f"{getattr(kernel, 'shape', None)}"
            )
        shapes.append((path, *kernel.shape, has_bias))
    return shapes


def random_projections(
    key: jax.Array,
    params: PyTree,
    k_in: int | None,
    k_out: int | None,
    *,
    kind: Literal["gaussian", "orthogonal"] = "gaussian",
    bias: bool = True,
    layers: Sequence[Sequence[Any]] | None = None,
) -> PyTree:
    r"""Random :class:`Projection` s for the linear layers of ``params`` (see :func:`random_projection`).

    Args:
      key: a PRNG key (layer ``j`` in the order found uses ``fold_in(key, j)``).
      params: the parameters (a pure dict, e.g. ``bj.nnx.split_params(model)[1]``).
      k_in, k_out: the projected sizes of every layer (``None``: full). ``k_in`` may be up to
        ``d_in + 1`` for a layer whose bias row is included.
      kind: ``"gaussian"`` or ``"orthogonal"``.
      bias: give ``P_in`` a bias row (``d_in + 1`` rows) for layers that have a bias.
      layers: paths of the layers (dicts holding ``"kernel"``) or bare 2-D leaves to project;
        default: every dict holding a 2-D ``"kernel"``.

    Returns:
      projections keyed like ``params`` down to the layer.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"fc": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
      >>> proj = random_projections(jax.random.key(0), params, 2, 2)
      >>> proj["fc"].p_in.shape, proj["fc"].p_out.shape
      ((4, 2), (4, 2))
    """
    out = []
    for j, (path, d_in, d_out, has_bias) in enumerate(_layer_shapes(params, layers)):
        kernel = _get(params, path, "params")
        dtype = (kernel["kernel"] if isinstance(kernel, Mapping) else kernel).dtype
        rows = d_in + 1 if (bias and has_bias) else d_in
        where = f"layer {_fmt(path)}"
        ki, ko = _check_k(k_in, rows, "k_in", where), _check_k(k_out, d_out, "k_out", where)
        proj = random_projection(
            jax.random.fold_in(key, j), rows, d_out, ki, ko, kind=kind, dtype=dtype
        )
        out.append((path, proj))
    return _nest(out)


def _top_eigenvectors(c: jax.Array, k: int) -> jax.Array:
    """The ``k`` leading eigenvectors (columns, descending eigenvalue) of a symmetric ``c``.

    Each column's sign makes its largest-magnitude entry positive (a deterministic choice).
    """
    _, vecs = jnp.linalg.eigh(c)
    top = vecs[:, ::-1][:, :k]
    pivot = top[jnp.argmax(jnp.abs(top), axis=0), jnp.arange(k)]
    return top * jnp.where(pivot < 0, -1.0, 1.0).astype(top.dtype)


def pca_projections(covariances: PyTree, k_in: int | None, k_out: int | None) -> PyTree:
    r"""LoGra's PCA initialisation: the top eigenvectors of each layer's KFAC factors.

    ``P_in`` = the ``k_in`` leading eigenvectors of the forward covariance ``A = E[x̃ x̃ᵀ]``,
    ``P_out`` = the ``k_out`` leading eigenvectors of the backward covariance
    ``S = E[δy δyᵀ]`` (:class:`Covariances`, e.g. from :func:`kfac_covariances`). The bases are
    orthonormal; ``P_in`` has a bias row exactly when ``A`` was computed with one.

    Args:
      covariances: a pytree of :class:`Covariances` keyed like the layers.
      k_in, k_out: the projected sizes (``None``: full).

    Example:
      >>> import jax.numpy as jnp
      >>> cov = {"fc": Covariances(jnp.diag(jnp.array([1.0, 3.0, 2.0])), jnp.eye(2))}
      >>> p = pca_projections(cov, 1, 2)["fc"]
      >>> p.p_in.shape, bool(jnp.allclose(p.p_in[:, 0], jnp.array([0.0, 1.0, 0.0])))
      ((3, 1), True)
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(
        covariances, is_leaf=lambda x: isinstance(x, Covariances)
    )
    out = []
    for path, cov in flat:
        where = f"layer {_fmt(tuple(map(_key, path)))}"
        if not isinstance(cov, Covariances):
            raise TypeError(f"{where}: expected Covariances(forward, backward), got {type(cov)}")
        for name, c in zip(cov._fields, cov):
            if c.ndim != 2 or c.shape[0] != c.shape[1]:
                raise ValueError(f"{where}: {name} covariance must be square, got {c.shape}")
        ki = _check_k(k_in, cov.forward.shape[0], "k_in", where)
        ko = _check_k(k_out, cov.backward.shape[0], "k_out", where)
        out.append(
            (
                tuple(_key(k) for k in path),
                Projection(_top_eigenvectors(cov.forward, ki), _top_eigenvectors(cov.backward, ko)),
            )
        )
    return _nest(out)


# ----------------------------------------------------------------------------- Flax NNX path


@functools.cache
def _nnx_classes() -> Any:
    """The NNX adapter classes, defined on first use (Flax is imported here, not at import)."""
    from flax import nnx

    class LoGraBasis(nnx.Variable):
        """A fixed LoGra projection basis (``P_in`` or ``P_out``): not an ``nnx.Param``."""

    class LoGraBottleneck(nnx.Variable):
        """The zero bottleneck ``B`` whose gradient is the projected gradient."""

    class LoGraSeen(nnx.Variable):
        """An input/output recorded by the covariance pass."""

    class LoGraProbe(nnx.Variable):
        """A zero added to a layer's output; its gradient is ``δy``."""

    def adopt(self, linear) -> None:
        """Initialise ``self`` as ``linear``'s twin that holds ``linear``'s own variables."""
        nnx.Linear.__init__(
            self,
            linear.in_features,
            linear.out_features,
            use_bias=linear.use_bias,
            dtype=linear.dtype,
            param_dtype=linear.param_dtype,
            precision=linear.precision,
            kernel_init=lambda *_: linear.kernel.get_value(),
            bias_init=lambda *_: linear.bias.get_value(),
            dot_general=linear.dot_general,
            promote_dtype=linear.promote_dtype,
            preferred_element_type=getattr(linear, "preferred_element_type", None),
            rngs=nnx.Rngs(0),
        )
        self.kernel = linear.kernel
        if linear.use_bias:
            self.bias = linear.bias

    def check_linear(linear, what: str) -> None:
        if not isinstance(linear, nnx.Linear) or isinstance(linear, LoGraLinear | CaptureLinear):
            raise TypeError(
                f"{what} applies to a plain nnx.Linear, got {type(linear).__name__}"
                + (" (already adapted)" if isinstance(linear, nnx.Linear) else "")
            )

    class LoGraLinear(nnx.Linear):
        """``nnx.Linear`` plus the zero LoGra branch ``((x̃ P_in) B) P_outᵀ``."""

        def __init__(self, linear, projection: Projection):
            check_linear(linear, "the LoGra adapter")
            proj = Projection(*(jnp.asarray(p) for p in projection))
            self_bias = _check_projection(
                proj,
                linear.in_features,
                linear.out_features,
                linear.use_bias,
                f"LoGra adapter of Linear({linear.in_features}, {linear.out_features})",
            )
            adopt(self, linear)
            self.logra_bias_row = self_bias
            dtype = jnp.result_type(proj.p_in, proj.p_out)
            self.logra_p_in = LoGraBasis(proj.p_in)
            self.logra_p_out = LoGraBasis(proj.p_out)
            self.logra_b = LoGraBottleneck(
                jnp.zeros((proj.p_in.shape[1], proj.p_out.shape[1]), dtype)
            )

        def __call__(self, inputs, *args, **kwargs):
            y = super().__call__(inputs, *args, **kwargs)
            p_in, p_out = self.logra_p_in.get_value(), self.logra_p_out.get_value()
            mm = functools.partial(jnp.matmul, precision=self.precision)
            if self.logra_bias_row:
                u = mm(inputs, p_in[:-1]) + p_in[-1]
            else:
                u = mm(inputs, p_in)
            return y + mm(mm(u, self.logra_b.get_value()), p_out.T).astype(y.dtype)

    class CaptureLinear(nnx.Linear):
        """``nnx.Linear`` that records its (augmented) input and output and adds a probe."""

        def __init__(self, linear, bias: bool):
            check_linear(linear, "kfac_covariances")
            adopt(self, linear)
            self.logra_augment = bool(bias and linear.use_bias)
            zero = jnp.zeros((), linear.kernel.get_value().dtype)
            self.logra_seen_in = LoGraSeen(zero)
            self.logra_seen_out = LoGraSeen(zero)
            self.logra_probe = LoGraProbe(zero)

        def __call__(self, inputs, *args, **kwargs):
            if self.logra_seen_in.get_value().ndim != 0:
                raise ValueError(
                    "kfac_covariances: a layer was called more than once in one example's "
                    "loss; each chosen nnx.Linear must be called once per example (pass a "
                    "(T, d_in) sequence in one call instead)"
                )
            y = super().__call__(inputs, *args, **kwargs)
            x = jnp.asarray(inputs)
            if self.logra_augment:
                x = jnp.concatenate([x, jnp.ones((*x.shape[:-1], 1), x.dtype)], axis=-1)
            self.logra_seen_in.set_value(x)
            self.logra_seen_out.set_value(y)
            return y + self.logra_probe.get_value().astype(y.dtype)

    return type(
        "NNXClasses",
        (),
        dict(
            nnx=nnx,
            LoGraLinear=LoGraLinear,
            CaptureLinear=CaptureLinear,
            LoGraBasis=LoGraBasis,
            LoGraBottleneck=LoGraBottleneck,
            LoGraSeen=LoGraSeen,
            LoGraProbe=LoGraProbe,
        ),
    )


def _linear_paths(model) -> list[Path]:
    c = _nnx_classes()
    paths = [
        tuple(p)
        for p, node in c.nnx.iter_graph(model)
        if isinstance(node, c.nnx.Linear) and not isinstance(node, c.LoGraLinear | c.CaptureLinear)
    ]
    if not paths:
        raise ValueError("the model has no nnx.Linear layer; pass layers= explicitly")
    return paths


def _replace(model, makers: Sequence[tuple[Path, Callable[[Any], Any]]]):
    """A copy of ``model`` (sharing its arrays) with the Linear at each path replaced."""
    nnx = _nnx_classes().nnx
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)
    nodes = {tuple(p): node for p, node in nnx.iter_graph(new)}
    for path, make in makers:
        if path not in nodes:
            raise KeyError(f"the model has no submodule at {_fmt(path)}")
        repl = make(nodes[path])
        if path == ():
            if len(makers) != 1:
                raise ValueError("a layer at the root cannot be combined with other layers")
            return repl
        parent, key = nodes[path[:-1]], path[-1]
        if isinstance(parent, MutableMapping | MutableSequence):
            parent[key] = repl
        else:
            setattr(parent, key, repl)
    return new


def logra_linear(linear, projection: Projection):
    r"""The LoGra adapter of one ``nnx.Linear``: ``y = x K + b + ((x̃ P_in) B) P_outᵀ``.

    ``B`` (``k_in × k_out``, a ``LoGraBottleneck`` variable) starts at zero, so outputs and the
    gradients of ``K, b`` are those of ``linear``; ``∂ℓ/∂B = Σ_t (P_inᵀ x̃_t)(P_outᵀ δy_t)ᵀ =
    P_inᵀ G̃ P_out`` is the projected gradient (``x̃ = [x, 1]`` when ``P_in`` has the bias row,
    else ``x``; inputs may have any leading dims, e.g. ``(T, d_in)``). The adapter is an
    ``nnx.Linear`` subclass holding ``linear``'s own ``kernel``/``bias`` variables; the bases and
    ``B`` are not ``nnx.Param`` s, so the module's parameters (``bj.nnx.split_params``) are
    exactly the original ones.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> lin = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
      >>> ad = logra_linear(lin, Projection(jnp.eye(4, 2), jnp.eye(4, 3)))
      >>> x = jnp.ones((5, 3))
      >>> ad.logra_b.shape, bool(jnp.array_equal(ad(x), lin(x)))
      ((2, 3), True)
    """
    return _nnx_classes().LoGraLinear(linear, projection)


def with_logra(model, projections: PyTree):
    r"""A copy of an NNX ``model`` with the LoGra adapter (:func:`logra_linear`) on named layers.

    The copy shares the model's arrays (no weights are duplicated) and has the same
    parameters; each ``nnx.Linear`` at a path of ``projections`` (keyed like the parameters
    down to the layer, e.g. ``{"layers": {0: Projection(…)}}``) is replaced by its adapter.
    A Linear reachable at two paths is adapted at the named one only.

    Raises:
      KeyError: no submodule at a path; TypeError: the submodule is not a plain
      ``nnx.Linear``; ValueError: the projection's shapes do not fit it.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.fc1, self.fc2 = nnx.Linear(3, 5, rngs=rngs), nnx.Linear(5, 2, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.fc2(jnp.tanh(self.fc1(x)))
      >>> model = MLP(nnx.Rngs(0))
      >>> proj = random_projections(jax.random.key(1), nnx.to_pure_dict(nnx.state(model)), 2, 2)
      >>> lm = with_logra(model, proj)
      >>> type(lm.fc1).__name__, bool(jnp.array_equal(lm(jnp.ones(3)), model(jnp.ones(3))))
      ('LoGraLinear', True)
    """
    makers = [
        (path, functools.partial(logra_linear, projection=proj))
        for path, proj in _projection_items(projections)
    ]
    return _replace(model, makers)


@functools.lru_cache(maxsize=32)
def _grad_fn(graphdef, loss, batch_size):
    nnx = _nnx_classes().nnx

    def one(b, rest, example):
        return loss(nnx.merge(graphdef, b, rest), example)

    g = jax.grad(one)

    @jax.jit
    def fn(b, rest, batch):
        if batch_size is None:
            return jax.vmap(g, in_axes=(None, None, 0))(b, rest, batch)
        return jax.lax.map(lambda ex: g(b, rest, ex), batch, batch_size=batch_size)

    return fn


def logra_gradients(
    model, loss: Callable[..., jax.Array], batch: PyTree, *, batch_size: int | None = None
) -> PyTree:
    r"""Per-example projected gradients ``G̃_i = ∂ℓ_i/∂B`` of a :func:`with_logra` model.

    ``vmap(grad wrt B)`` over the examples: only the ``k_in × k_out`` bottleneck gradients are
    formed per example, never the full ``d_in × d_out`` ones. Equal to
    ``project_gradients(per_example_grads(…), projections)`` of the plain model.

    Args:
      model: a model with LoGra adapters (from :func:`with_logra`); everything but the
        bottlenecks is held constant (use the model in evaluation mode: one dropout mask or
        none).
      loss: ``loss(model, example) -> scalar``, one example's loss ``ℓ_i``.
      batch: a pytree with the examples along axis 0.
      batch_size: evaluate ``batch_size`` examples at a time (``jax.lax.map``) to bound memory;
        default: all at once.

    Returns:
      a pytree keyed like the projections with leaves ``(n, k_in, k_out)``
      (:func:`flatten_projected` makes it ``(n, Σ k_in k_out)``). The compiled function is
      cached per (model structure, ``loss``, ``batch_size``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> lm = with_logra(model, Projection(jnp.eye(4, 2), jnp.eye(2, 1)))
      >>> loss = lambda m, z: jnp.sum(m(z) ** 2)
      >>> logra_gradients(lm, loss, jnp.ones((6, 3))).shape
      (6, 2, 1)
    """
    fn, b, rest = _bottleneck_grad_fn(model, loss, batch_size)
    grads = fn(b, rest, batch)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    return _nest([(tuple(_key(k) for k in p)[:-1], v) for p, v in flat])


def _bottleneck_grad_fn(model, loss: Callable[..., jax.Array], batch_size: int | None = None):
    """``(fn, b, rest)``: ``fn(b, rest, batch)`` gives the per-example gradients of the LoGra
    bottlenecks ``b`` of a :func:`with_logra` model (the rest of its state held in ``rest``),
    jitted and cached per (model structure, ``loss``, ``batch_size``); shared by
    :func:`logra_gradients` and :func:`bilevel_jax.influence.pipeline.log_gradients`.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> lm = with_logra(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), Projection(jnp.eye(4, 2), jnp.eye(2, 1)))
    >>> fn, b, rest = _bottleneck_grad_fn(lm, lambda m, z: jnp.sum(m(z) ** 2))
    >>> [g.shape for g in jax.tree.leaves(fn(b, rest, jnp.ones((6, 3))))]
    [(6, 2, 1)]
    """
    c = _nnx_classes()
    nnx = c.nnx
    graphdef, b, rest = nnx.split(model, c.LoGraBottleneck, ...)
    b, rest = nnx.to_pure_dict(b), nnx.to_pure_dict(rest)
    if not jax.tree.leaves(b):
        raise ValueError("the model has no LoGra adapter; build it with with_logra(model, …)")
    try:
        hash((graphdef, loss))
        fn = _grad_fn(graphdef, loss, batch_size)
    except TypeError:  # an unhashable loss: build the function uncached
        fn = _grad_fn.__wrapped__(graphdef, loss, batch_size)
    return fn, b, rest


def kfac_covariances(
    model,
    loss: Callable[..., jax.Array],
    batch: PyTree,
    *,
    layers: Sequence[Sequence[Any]] | None = None,
    bias: bool = True,
) -> PyTree:
    r"""KFAC factors of an NNX model's ``nnx.Linear`` layers (for :func:`pca_projections`).

    .. math::

        A = \frac1n \sum_i \sum_t \tilde x_{i,t} \tilde x_{i,t}^\top, \qquad
        S = \frac1n \sum_i \sum_t \delta y_{i,t} \, \delta y_{i,t}^\top,
        \qquad \delta y_{i,t} = \partial \ell_i / \partial y_{i,t},

    per example ``i`` summed over its positions ``t`` (``x̃ = [x, 1]`` for a layer with a bias
    when ``bias=True``, else ``x``). Each chosen layer must be called once per example (a
    ``(T, d_in)`` sequence in one call is fine); the inputs and output-gradients are captured
    by a temporary copy of the model (the model itself is not modified).

    Args:
      model: an ``nnx.Module``; loss: ``loss(model, example) -> scalar``;
      batch: the examples along axis 0.
      layers: paths of the ``nnx.Linear`` submodules (default: all of them).
      bias: augment the input of layers with a bias by a constant 1 (as the projections do).

    Returns:
      a pytree of :class:`Covariances` keyed like the layers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
      >>> cov = kfac_covariances(model, lambda m, z: jnp.sum(m(z) ** 2), jnp.ones((4, 3)))
      >>> cov.forward.shape, cov.backward.shape, cov.forward[0, 0].item()
      ((4, 4), (2, 2), 1.0)
    """
    c = _nnx_classes()
    nnx = c.nnx
    paths = _linear_paths(model) if layers is None else [tuple(p) for p in layers]
    cap = _replace(model, [(p, functools.partial(c.CaptureLinear, bias=bias)) for p in paths])
    graphdef, state = nnx.split(cap)
    state = nnx.to_pure_dict(state)  # merge makes fresh variables, mutable inside the traces

    def run(probes, state, example):
        m = nnx.merge(graphdef, state)
        nodes = {tuple(p): node for p, node in nnx.iter_graph(m)}
        for path, probe in zip(paths, probes):
            nodes[path].logra_probe.set_value(probe)
        value = loss(m, example)
        seen = [
            (nodes[p].logra_seen_in.get_value(), nodes[p].logra_seen_out.get_value()) for p in paths
        ]
        return value, seen

    example0 = jax.tree.map(lambda a: a[0], batch)
    scalars = [jnp.zeros(()) for _ in paths]
    _, shapes = jax.eval_shape(run, scalars, state, example0)
    for path, (_, y) in zip(paths, shapes):
        if y.ndim == 0:
            raise ValueError(f"kfac_covariances: the layer {_fmt(path)} is not called by loss")
    probes = [jnp.zeros(y.shape, y.dtype) for _, y in shapes]

    @jax.jit
    def stats(probes, state, batch):
        grad = jax.grad(run, has_aux=True)
        dys, seen = jax.vmap(grad, in_axes=(None, None, 0))(probes, state, batch)
        n = jax.tree.leaves(batch)[0].shape[0]
        out = []
        for path, dy, (x, _) in zip(paths, dys, seen):
            x = x.reshape(-1, x.shape[-1])
            d = dy.reshape(-1, dy.shape[-1])
            out.append((path, Covariances(x.T @ x / n, d.T @ d / n)))
        return _nest(out)

    return stats(probes, state, batch)
