r"""Exact influence functions, and the forward-only estimator, over the library's hypergradients.

The convention of :mod:`bilevel_jax.influence`: a training objective with per-example weights
``w`` (``w = 1`` is the trained model),

.. math::

    L(\theta; w) = \frac{1}{n} \sum_i w_i \ell_i(\theta) + R(\theta), \qquad
    \theta^*(w) = \arg\min_\theta L(\theta; w),

and, for a query loss ``f`` (one test example's loss, or any scalar such as the mean test loss),

.. math::

    \mathrm{influence}(i, f) = g_f^\top (C + \delta I)^{-1} g_i
        = -n \, \frac{d f(\theta^*(w))}{d w_i}\Big|_{w = 1},
    \qquad g_i = \nabla \ell_i(\theta^*), \; g_f = \nabla f(\theta^*),

where ``C`` is the curvature of ``L(θ; 1)`` at ``θ*`` and ``δ ≥ 0`` a damping. With
``C = ∇²_θ L`` and ``δ = 0`` the right-hand equality is the implicit function theorem: the
influence is ``−n`` times the library's hypergradient with ``λ = w``,
``base_loss(θ, w, B) = mean(w · ℓ(θ, B)) + R(θ)`` and ``meta_loss(θ, w, Q) = f(θ, Q)`` (what
:func:`bilevel_jax.exact` computes; the example below checks it). Positive influence: up-weighting
example ``i`` lowers ``f`` (a helpful example); removing example ``i`` (``w_i = 0``, the sum still
divided by ``n``) changes ``f`` by about ``+influence(i, f)/n``, with an error of order ``1/n²``.

Mapping to the literature: Koh & Liang (ICML 2017), ``I_up,loss(z_i, z_test) = −influence``;
the LoGra thesis' INFLUENCE (Choe, "Understanding Training Data in Large-Scale Machine Learning",
ch. 4) ``= influence``; TRAK / gradient dot products ``g_fᵀ g_i`` are ``curvature="identity"``.

Curvatures ``C`` (``curvature=``):

- ``"hessian"``: ``∇²_θ L(θ; 1)`` by Hessian-vector products (forward-over-reverse).
- ``"gauss_newton"``: ``(1/n) Σ_i J_iᵀ Λ_i J_i + ∇²R`` for losses written as
  ``ℓ_i(θ) = output_loss(outputs_fn(θ, B), B)_i``, with ``J_i`` the Jacobian of example ``i``'s
  outputs and ``Λ_i`` the Hessian of its loss in the outputs (Martens, JMLR 2020, §8;
  Schraudolph 2002). It equals the Hessian for linear models and is positive semidefinite for
  convex ``output_loss``.
- ``"fisher"``: the empirical Fisher ``(1/n) Σ_i g_i g_iᵀ + ∇²R`` (Kunstner, Balles & Hennig,
  NeurIPS 2019, on when it approximates the Hessian), applied as ``Jᵀ(J v)/n`` with ``J`` the
  Jacobian of the per-example loss vector: ``n × p`` is never formed.
- ``"identity"``: ``C = I`` (``R`` is ignored), so ``influence = g_fᵀ g_i / (1 + δ)``: gradient
  dot products.

Functions: :func:`influence` (all pairs of queries and training examples, one linear solve per
query or per training example, whichever are fewer) and :func:`forward_influence` (one aggregate
query, the whole influence vector from one solve and two gradient passes over the training set:
SAMA's central difference, :func:`bilevel_jax.hypergrad.base.central_difference`).

Example: exact influence is ``−n`` times the hypergradient of ``bj.exact()``.

>>> import jax.numpy as jnp
>>> import optax
>>> import bilevel_jax as bj
>>> from bilevel_jax.influence.exact import influence
>>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
>>> train = {"x": x, "y": jnp.array([1.0, 2.0, 2.0, 0.5])}
>>> test = {"x": jnp.array([[1.0, 2.0]]), "y": jnp.array([3.0])}
>>> loss = lambda th, b: 0.5 * (b["x"] @ th - b["y"]) ** 2  # per example, shape (n,)
>>> reg = lambda th: 0.05 * jnp.sum(th**2)
>>> theta = jnp.linalg.solve(x.T @ x / 4 + 0.1 * jnp.eye(2), x.T @ train["y"] / 4)  # θ*
>>> inf = influence(loss, theta, train, test, regularizer=reg)
>>> problem = bj.BilevelProblem(
...     lambda th, w, b: jnp.mean(w * loss(th, b)) + reg(th),  # L(θ; w)
...     lambda th, w, q: jnp.sum(loss(th, q)),  # f(θ): the test example's loss
...     optax.sgd(0.1),
... )
>>> inputs = bj.BilevelInputs(theta, jnp.ones(4), optax.sgd(0.1).init(theta), train, test)
>>> hg, _ = bj.exact().hypergrad(problem, inputs, optax.EmptyState())
>>> inf.shape, bool(jnp.allclose(inf[0], -4 * hg.meta_grad, atol=1e-6))
((1, 4), True)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax import linalg
from bilevel_jax._checks import BilevelInputError, float_leaves
from bilevel_jax.hypergrad.base import central_difference, forward_mixed_product

__all__ = ["influence", "forward_influence", "CURVATURES"]

PyTree = Any
PerExampleLoss = Callable[[PyTree, PyTree], jax.Array]
Curvature = Literal["hessian", "gauss_newton", "fisher", "identity"]

CURVATURES: tuple[str, ...] = ("hessian", "gauss_newton", "fisher", "identity")
"""The curvature choices of :func:`influence` and :func:`forward_influence`."""

_SOLVERS = ("dense", "cg")
_DIFFERENCES = ("sequential", "vmap", "jvp")


# --------------------------------------------------------------------------- input checks


def _batch_size(batch: PyTree, name: str) -> int:
    """The common leading axis of every leaf of ``batch`` (examples along axis 0)."""
    leaves = jax.tree_util.tree_flatten_with_path(batch)[0]
    if not leaves:
        raise BilevelInputError(
            f"{name} has no array leaves; pass the examples as arrays (or a pytree of arrays) "
            "with the examples along axis 0"
        )
    sizes = {}
    for path, leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise BilevelInputError(
                f"{name} leaf {jax.tree_util.keystr(path) or '(root)'} is a scalar; every leaf "
                "of a batch needs the examples along axis 0"
            )
        sizes[jax.tree_util.keystr(path) or "(root)"] = shape[0]
    if len(set(sizes.values())) != 1:
        raise BilevelInputError(
            f"the leaves of {name} disagree on the number of examples (axis 0): {sizes}; every "
            "leaf needs the examples along axis 0"
        )
    n = next(iter(sizes.values()))
    if n == 0:
        raise BilevelInputError(f"{name} has no examples (axis 0 has length 0)")
    return int(n)


def _out_shape(fn: Callable, name: str, call: str, *args) -> jax.ShapeDtypeStruct:
    """``jax.eval_shape(fn, *args)``, required to be one floating-point array."""
    try:
        out = jax.eval_shape(fn, *args)
    except BilevelInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BilevelInputError(f"calling {call} failed: {e}") from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise BilevelInputError(
            f"{name} must return one array; got {jax.tree.map(lambda x: x.shape, out)}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise BilevelInputError(f"{name} must return floating-point losses; got {out.dtype}")
    return out


def _check_per_example(fn: Callable, name: str, params: PyTree, batch: PyTree, n: int, what: str):
    out = _out_shape(fn, name, f"{name}(params, {what})", params, batch)
    if out.shape != (n,):
        raise BilevelInputError(
            f"{name}(params, {what}) must return one loss per example, shape ({n},) (the "
            f"length of axis 0 of {what}); got shape {out.shape}"
        )


def _check_number(value: Any, name: str, *, positive: bool) -> None:
    """A Python/numpy number must be finite and ≥ 0 (> 0 if ``positive``); traced values pass."""
    if value is None:
        return
    try:
        x = float(value)
    except jax.errors.ConcretizationTypeError:  # traced (under jit): not checked
        return
    except (TypeError, ValueError):
        raise BilevelInputError(f"{name} must be a number; got {value!r}") from None
    if not math.isfinite(x) or x < 0 or (positive and x == 0):
        bound = "> 0" if positive else ">= 0"
        raise BilevelInputError(f"{name} must be a finite number {bound}; got {value!r}")


def _check_common(
    per_example_loss: Callable,
    params: PyTree,
    train_batch: PyTree,
    *,
    regularizer: Callable | None,
    curvature: str,
    damping: Any,
    solver: Any,
    maxiter: int,
    tol: float,
    outputs_fn: Callable | None,
    output_loss: Callable | None,
    fn: str,
) -> int:
    """Checks shared by both functions; returns n, the number of training examples."""
    if not callable(per_example_loss):
        raise BilevelInputError(
            f"{fn}: per_example_loss must be a function (params, batch) -> losses of shape (n,)"
        )
    if curvature not in CURVATURES:
        raise BilevelInputError(
            f"{fn}: unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}"
        )
    if not (callable(solver) or solver in _SOLVERS):
        raise BilevelInputError(
            f"{fn}: unknown solver {solver!r}; choose 'dense' (materialise C + δI and solve "
            "directly: small models), 'cg' (conjugate gradient with Hessian-vector products) or "
            "pass a function solver(matvec, b) -> x, e.g. functools.partial("
            "bilevel_jax.linalg.solve_gmres, maxiter=50)"
        )
    _check_number(damping, f"{fn}: damping (δ in C + δI)", positive=False)
    if not (isinstance(maxiter, int) and maxiter >= 1):
        raise BilevelInputError(f"{fn}: maxiter must be an integer >= 1; got {maxiter!r}")
    _check_number(tol, f"{fn}: tol", positive=False)
    if jax.tree.leaves(params) == []:
        raise BilevelInputError(f"{fn}: params has no array leaves")
    float_leaves(params, "params")
    n = _batch_size(train_batch, "train_batch")
    _check_per_example(per_example_loss, "per_example_loss", params, train_batch, n, "train_batch")
    if regularizer is not None:
        out = _out_shape(regularizer, "regularizer", "regularizer(params)", params)
        if out.shape != ():
            raise BilevelInputError(
                f"regularizer(params) must return a scalar R(θ); got shape {out.shape}"
            )
    if curvature == "gauss_newton":
        if outputs_fn is None or output_loss is None:
            raise BilevelInputError(
                f"{fn}: curvature='gauss_newton' needs the loss split as outputs and a loss of "
                "the outputs: pass outputs_fn(params, batch) -> model outputs and "
                "output_loss(outputs, batch) -> losses of shape (n,), with "
                "output_loss(outputs_fn(params, batch), batch) == per_example_loss(params, batch)"
            )
        composed = lambda p, b: output_loss(outputs_fn(p, b), b)  # noqa: E731
        _check_per_example(
            composed, "output_loss(outputs_fn(...))", params, train_batch, n, "train_batch"
        )
    elif outputs_fn is not None or output_loss is not None:
        raise BilevelInputError(
            f"{fn}: outputs_fn and output_loss are used by curvature='gauss_newton' only; "
            f"got curvature={curvature!r}"
        )
    return n


# --------------------------------------------------------------------------- linear algebra


def _curvature_matvec(
    curvature: str,
    per_example_loss: PerExampleLoss,
    regularizer: Callable[[PyTree], jax.Array] | None,
    outputs_fn: Callable[[PyTree, PyTree], PyTree] | None,
    output_loss: Callable[[PyTree, PyTree], jax.Array] | None,
    unravel: Callable[[jax.Array], PyTree],
    x: jax.Array,
    train_batch: PyTree,
    damping: Any,
) -> Callable[[jax.Array], jax.Array]:
    """``v ↦ (C + δI) v`` on flat vectors at the flat parameters ``x`` (``params = unravel(x)``)."""
    train = lambda y: per_example_loss(unravel(y), train_batch)  # noqa: E731
    reg = None if regularizer is None else (lambda y: regularizer(unravel(y)))
    n = _batch_size(train_batch, "train_batch")

    def reg_hvp(v):
        if reg is None:
            return jnp.zeros_like(v)
        return jax.jvp(jax.grad(reg), (x,), (v,))[1]

    if curvature == "hessian":

        def objective(y):
            value = jnp.mean(train(y))
            return value if reg is None else value + reg(y)

        grad_objective = jax.grad(objective)
        base = lambda v: jax.jvp(grad_objective, (x,), (v,))[1]  # noqa: E731
    elif curvature == "fisher":
        _, jvp_train = jax.linearize(train, x)
        _, vjp_train = jax.vjp(train, x)
        base = lambda v: vjp_train(jvp_train(v))[0] / n + reg_hvp(v)  # noqa: E731
    elif curvature == "gauss_newton":
        assert outputs_fn is not None and output_loss is not None
        outputs = lambda y: outputs_fn(unravel(y), train_batch)  # noqa: E731
        loss_of_outputs = lambda z: output_loss(z, train_batch)  # noqa: E731
        z, jvp_out = jax.linearize(outputs, x)
        _, vjp_out = jax.vjp(outputs, x)
        grad_z = jax.grad(lambda z: jnp.sum(loss_of_outputs(z)))

        def base(v):
            jv = jvp_out(v)
            return vjp_out(jax.jvp(grad_z, (z,), (jv,))[1])[0] / n + reg_hvp(v)
    else:  # identity
        base = lambda v: v  # noqa: E731

    return lambda v: base(v) + damping * v


def _solve(
    matvec: Callable[[jax.Array], jax.Array],
    rhs: jax.Array,
    *,
    curvature: str,
    damping: Any,
    solver: Any,
    maxiter: int,
    tol: float,
) -> jax.Array:
    """``(C + δI)⁻¹ b`` for each row ``b`` of ``rhs`` (k, p)."""
    if curvature == "identity":
        return rhs / (1.0 + damping)
    if solver == "dense":
        p = rhs.shape[1]
        # row j of the vmapped products is (C + δI) e_j, column j of the matrix
        matrix = jax.vmap(matvec)(jnp.eye(p, dtype=rhs.dtype)).T
        return jnp.linalg.solve(matrix, rhs.T).T
    if solver == "cg":
        solve = lambda b: linalg.solve_cg(matvec, b, maxiter=maxiter, tol=tol)  # noqa: E731
    else:
        assert callable(solver)
        solve = lambda b: solver(matvec, b)  # noqa: E731
    return jnp.asarray(jax.vmap(solve)(rhs))


def _per_example_grads(fn: Callable, x: jax.Array, batch: PyTree) -> jax.Array:
    """``(n, p)``: the gradient of each example's loss, one example at a time (vmapped)."""

    def one(example):
        single = jax.tree.map(lambda a: a[None], example)
        return jax.grad(lambda y: fn(y, single)[0])(x)

    return jax.vmap(one)(batch)


def _raise_if_nonfinite(out: jax.Array, fn: str, damping: Any) -> None:
    """Outside ``jit``: a NaN/inf result is an error (a singular C + δI), never returned."""
    try:
        if bool(jnp.all(jnp.isfinite(out))):
            return
    except jax.errors.ConcretizationTypeError:  # traced (under jit): not checked
        return
    raise FloatingPointError(
        f"{fn}: the result holds NaN or inf (damping={damping!r}). Either the losses or "
        "gradients are not finite at params, or C + δI is singular (e.g. more parameters than "
        "training examples with curvature='fisher', or a flat direction of the Hessian): add "
        "damping > 0 or a regularizer."
    )


@functools.lru_cache(maxsize=64)
def _jit_of(factory: Callable, key: tuple) -> Callable:
    return jax.jit(factory(*key))


def _cached_jit(factory: Callable, *key: Any) -> Callable:
    """``jax.jit(factory(*key))``, the same jitted function for equal keys (so repeated calls
    with the same losses and settings compile once); built afresh when a key is unhashable."""
    try:
        hash(key)
    except TypeError:
        return jax.jit(factory(*key))
    return _jit_of(factory, key)


def _influence_core(
    per_example_loss,
    query_loss,
    regularizer,
    curvature,
    solver,
    maxiter,
    tol,
    outputs_fn,
    output_loss,
    m,
    n,
    scalar_query,
):
    """:func:`influence`'s computation for one static configuration (jitted and cached)."""

    def core(params, train_batch, query_batch, damping):
        x, unravel = ravel_pytree(params)
        train = lambda y: per_example_loss(unravel(y), train_batch)  # noqa: E731
        if query_loss is None:
            query_vec = lambda y: per_example_loss(unravel(y), query_batch)  # noqa: E731
        else:
            ql = query_loss
            query_vec = lambda y: jnp.reshape(ql(unravel(y), query_batch), (m,))  # noqa: E731
        matvec = _curvature_matvec(
            curvature,
            per_example_loss,
            regularizer,
            outputs_fn,
            output_loss,
            unravel,
            x,
            train_batch,
            damping,
        )
        solve = lambda rhs: _solve(  # noqa: E731
            matvec,
            rhs,
            curvature=curvature,
            damping=damping,
            solver=solver,
            maxiter=maxiter,
            tol=tol,
        )

        if m <= n:  # solve for the queries, then JVPs of the training losses: (m, n)
            if query_loss is None:
                g_query = _per_example_grads(
                    lambda y, b: per_example_loss(unravel(y), b), x, query_batch
                )
            else:
                g_query = jax.jacrev(query_vec)(x)
            v = solve(g_query)
            out = jax.vmap(lambda vq: jax.jvp(train, (x,), (vq,))[1])(v)
        else:  # fewer training examples: solve for them, then JVPs of the query losses
            g_train = _per_example_grads(
                lambda y, b: per_example_loss(unravel(y), b), x, train_batch
            )
            u = solve(g_train)
            out = jax.vmap(lambda ui: jax.jvp(query_vec, (x,), (ui,))[1])(u).T
        if scalar_query:
            out = out[0]
        return out

    return core


def _forward_core(
    per_example_loss,
    query_loss,
    regularizer,
    curvature,
    solver,
    maxiter,
    tol,
    alpha,
    difference,
    outputs_fn,
    output_loss,
    n,
):
    """:func:`forward_influence`'s computation for one static configuration (jitted, cached)."""
    if query_loss is None:
        f = lambda p, q: jnp.mean(per_example_loss(p, q))  # noqa: E731
    else:
        f = query_loss

    def core(params, train_batch, query_batch, damping):
        x, unravel = ravel_pytree(params)
        g_f = ravel_pytree(jax.grad(f)(params, query_batch))[0]
        matvec = _curvature_matvec(
            curvature,
            per_example_loss,
            regularizer,
            outputs_fn,
            output_loss,
            unravel,
            x,
            train_batch,
            damping,
        )
        v = _solve(
            matvec,
            g_f[None],
            curvature=curvature,
            damping=damping,
            solver=solver,
            maxiter=maxiter,
            tol=tol,
        )[0]

        # the bilevel problem's base loss L(θ; w); λ = w = 1
        def base_loss(theta, w, batch):
            value = jnp.mean(w * per_example_loss(theta, batch))
            return value if regularizer is None else value + regularizer(theta)

        w = jnp.ones((n,), jnp.promote_types(x.dtype, jnp.float32))
        if difference == "jvp":
            h, _, _ = forward_mixed_product(base_loss, params, w, train_batch, unravel(v), 1.0)
        else:
            h, _, _ = central_difference(
                base_loss, params, w, train_batch, unravel(v), alpha, difference=difference
            )
        out = -n * h  # h = −(∂²L/∂w∂θ) v, so influence = −n·h (the hypergradient is h)
        return out

    return core


# --------------------------------------------------------------------------- public functions


def influence(
    per_example_loss: PerExampleLoss,
    params: PyTree,
    train_batch: PyTree,
    query_batch: PyTree = None,
    *,
    query_loss: Callable[[PyTree, PyTree], jax.Array] | None = None,
    regularizer: Callable[[PyTree], jax.Array] | None = None,
    curvature: Curvature = "hessian",
    damping: float = 0.0,
    solver: Literal["dense", "cg"] | Callable = "dense",
    maxiter: int = 100,
    tol: float = 1e-10,
    outputs_fn: Callable[[PyTree, PyTree], PyTree] | None = None,
    output_loss: Callable[[PyTree, PyTree], jax.Array] | None = None,
) -> jax.Array:
    r"""Exact influence of every training example on every query: ``g_qᵀ (C + δI)⁻¹ g_i``.

    .. math::

        \mathrm{influence}(i, q) = \nabla f_q(\theta)^\top (C + \delta I)^{-1} \nabla\ell_i(\theta)
            = -n \, \frac{d f_q(\theta^*(w))}{d w_i}\Big|_{w=1}

    for ``L(θ; w) = (1/n) Σ_i w_i ℓ_i(θ) + R(θ)`` (the sign and scale convention of
    :mod:`bilevel_jax.influence`; Koh & Liang, ICML 2017, ``I_up,loss = −influence``). Positive:
    up-weighting example ``i`` lowers ``f_q``; removing it changes ``f_q`` by about
    ``+influence/n``. ``params`` should be the trained ``θ*`` (a minimiser of ``L(θ; 1)``); at
    another θ this is the same formula, without the interpretation.

    Cost: with ``m`` queries and ``n`` training examples it solves ``k = min(m, n)`` systems
    (``C`` is symmetric, so ``g_qᵀ(C+δI)⁻¹g_i`` can be solved from either side): the ``k``
    gradients of the smaller side (one backward pass per example, vmapped), ``k`` solves, and
    ``k`` forward-mode products (JVPs) of the other side's loss vector along the solutions. No
    ``n × p`` gradient matrix of the larger side is formed. ``solver="dense"`` materialises
    ``C + δI`` (``p`` matrix-vector products, vmapped) and solves once with ``k`` right-hand
    sides: small models (``p`` up to a few thousand) and exact oracles. ``solver="cg"`` runs up
    to ``maxiter`` conjugate-gradient iterations per system (vmapped over the ``k`` systems),
    for ``C + δI`` positive definite.

    Pure and jit-able (``jax.jit(lambda th: influence(loss, th, train, test))``). Outside
    ``jit``, a NaN or inf result (a singular ``C + δI``) raises ``FloatingPointError``.

    Args:
      per_example_loss: ``ℓ(params, batch) -> (n,)``, the loss of each example of ``batch``
        (examples along axis 0 of every leaf). It must treat examples independently: it is also
        called on one-example batches.
      params: θ*, a pytree of floating-point arrays.
      train_batch: the ``n`` training examples.
      query_batch: the query examples (passed to ``query_loss`` when given; may then be None if
        ``query_loss`` ignores it).
      query_loss: ``f(params, query_batch) -> ()`` or ``(m,)``, the query losses. Default:
        ``per_example_loss(params, query_batch)``, one query per query example.
      regularizer: ``R(params) -> ()``, the part of the training objective that is not a sum over
        examples (weight decay); it enters the curvature, not the ``g_i``.
      curvature: ``C``: ``"hessian"`` (default), ``"gauss_newton"``, ``"fisher"`` (empirical) or
        ``"identity"`` (gradient dot products; ``R`` ignored). See the module docstring.
      damping: δ ≥ 0, added to the curvature.
      solver: ``"dense"`` (default), ``"cg"``, or a function ``solver(matvec, b) -> x`` solving
        ``(C + δI) x = b`` on flat vectors (e.g. ``functools.partial(
        bilevel_jax.linalg.solve_gmres, maxiter=50)``; δ is already in ``matvec``).
      maxiter: the CG iteration budget per system (``solver="cg"``).
      tol: the CG relative residual tolerance.
      outputs_fn: ``curvature="gauss_newton"`` only: ``outputs_fn(params, batch)``, the model
        outputs (any pytree with the examples along axis 0).
      output_loss: ``curvature="gauss_newton"`` only: ``output_loss(outputs, batch) -> (n,)``,
        with ``output_loss(outputs_fn(params, batch), batch) == per_example_loss(params, batch)``.

    Returns:
      The influence, shape ``(m, n)`` (queries × training examples), or ``(n,)`` when
      ``query_loss`` returns a scalar.

    Raises:
      BilevelInputError (a ValueError): mismatched batch leaves, a loss of the wrong shape, a
        negative damping, an unknown curvature or solver, a missing ``outputs_fn``.
      FloatingPointError: (outside ``jit``) the result is not finite.

    Example (ridge regression: ``C`` is ``XᵀX/n + λI`` and ``g_i = (x_iᵀθ − y_i) x_i``):
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
      >>> y = jnp.array([1.0, 2.0, 2.0, 0.5])
      >>> loss = lambda th, b: 0.5 * (b[0] @ th - b[1]) ** 2
      >>> reg = lambda th: 0.05 * jnp.sum(th**2)  # λ = 0.1
      >>> hess = x.T @ x / 4 + 0.1 * jnp.eye(2)
      >>> theta = jnp.linalg.solve(hess, x.T @ y / 4)
      >>> inf = influence(loss, theta, (x, y), (x[:2], y[:2]), regularizer=reg)
      >>> g = (x @ theta - y)[:, None] * x  # closed form of the per-example gradients
      >>> inf.shape, bool(jnp.allclose(inf, g[:2] @ jnp.linalg.solve(hess, g.T), atol=1e-6))
      ((2, 4), True)
      >>> dots = influence(loss, theta, (x, y), (x[:2], y[:2]), curvature="identity")
      >>> bool(jnp.allclose(dots, g[:2] @ g.T, atol=1e-6))  # gradient dot products
      True
    """
    fn = "influence"
    n = _check_common(
        per_example_loss,
        params,
        train_batch,
        regularizer=regularizer,
        curvature=curvature,
        damping=damping,
        solver=solver,
        maxiter=maxiter,
        tol=tol,
        outputs_fn=outputs_fn,
        output_loss=output_loss,
        fn=fn,
    )
    if query_loss is None:
        if query_batch is None:
            raise BilevelInputError(
                "influence: pass query_batch (the query examples; by default each one's own "
                "per_example_loss is a query), or a query_loss"
            )
        m = _batch_size(query_batch, "query_batch")
        _check_per_example(
            per_example_loss, "per_example_loss", params, query_batch, m, "query_batch"
        )
        scalar_query = False
    else:
        out = _out_shape(
            query_loss, "query_loss", "query_loss(params, query_batch)", params, query_batch
        )
        if out.ndim > 1:
            raise BilevelInputError(
                "query_loss(params, query_batch) must return a scalar query loss or a vector of "
                f"m query losses, shape () or (m,); got shape {out.shape}"
            )
        scalar_query = out.ndim == 0
        m = 1 if scalar_query else out.shape[0]

    core = _cached_jit(
        _influence_core,
        per_example_loss,
        query_loss,
        regularizer,
        curvature,
        solver,
        maxiter,
        tol,
        outputs_fn,
        output_loss,
        m,
        n,
        scalar_query,
    )
    out = core(params, train_batch, query_batch, damping)
    _raise_if_nonfinite(out, fn, damping)
    return out


def forward_influence(
    per_example_loss: PerExampleLoss,
    params: PyTree,
    train_batch: PyTree,
    query_batch: PyTree = None,
    *,
    query_loss: Callable[[PyTree, PyTree], jax.Array] | None = None,
    regularizer: Callable[[PyTree], jax.Array] | None = None,
    curvature: Curvature = "hessian",
    damping: float = 0.0,
    solver: Literal["dense", "cg"] | Callable = "cg",
    maxiter: int = 100,
    tol: float = 1e-10,
    alpha: float | None = None,
    difference: Literal["sequential", "vmap", "jvp"] = "sequential",
    outputs_fn: Callable[[PyTree, PyTree], PyTree] | None = None,
    output_loss: Callable[[PyTree, PyTree], jax.Array] | None = None,
) -> jax.Array:
    r"""The influence of every training example on ONE aggregate query, forward-only (SAMA's way).

    With ``v = (C + δI)⁻¹ g_f`` from one linear solve, the influence vector is a mixed second
    derivative of the weighted training loss,

    .. math::

        \mathrm{influence}(i, f) = g_i^\top v
            = n \, \frac{\partial}{\partial w_i} \big[\nabla_\theta L(\theta; w)^\top v\big]
            = n \, \frac{\partial}{\partial t} \frac{\partial L(\theta + t v; w)}{\partial w_i}
              \Big|_{t = 0},

    which is taken, as SAMA does (Choe et al., "Making Scalable Meta Learning Practical",
    NeurIPS 2023, §3), by a central difference of the weight gradient ``∇_w L = ℓ(θ)/n``
    (:func:`bilevel_jax.hypergrad.base.central_difference`, ``λ = w = 1``):

    .. math::

        \mathrm{influence}(i, f) \approx
            \frac{\ell_i(\theta + \varepsilon v) - \ell_i(\theta - \varepsilon v)}{2 \varepsilon},
        \qquad \varepsilon = \alpha / \lVert v \rVert.

    Two passes over the training set give all ``n`` influences (no per-example gradients, no
    ``n × p`` matrix); the error is ``(α²/6) ∂³ℓ_i[v̂, v̂, v̂] ‖v‖`` (``v̂ = v/‖v‖``), i.e.
    ``O(ε²)``, plus rounding of order ``eps_machine · |ℓ_i| ‖v‖ / α``. The default α is the cube
    root of the machine epsilon of θ's dtype (float32 or wider): 4.9e-3 in float32, 6.1e-6 in
    float64, which balances the two. ``difference="jvp"`` takes the same derivative exactly by
    forward mode (one JVP of the per-example losses; no ε, α unused), which is also what
    :func:`influence` does per query. ``curvature="identity"`` skips the solve (``v = g_f/(1+δ)``:
    SAMA-NA's first-order direction, i.e. gradient dot products with the aggregate query).

    Args:
      per_example_loss: as in :func:`influence`, and so are ``params``, ``train_batch``,
        ``query_batch``, ``regularizer``, ``curvature``, ``damping``, ``maxiter``, ``tol``,
        ``outputs_fn`` and ``output_loss``.
      query_loss: ``f(params, query_batch) -> ()``, the aggregate query loss. Default: the mean
        of ``per_example_loss(params, query_batch)`` (the mean test loss).
      solver: ``"cg"`` (default; Hessian-vector products only), ``"dense"`` or a function
        ``solver(matvec, b) -> x``, for the one system ``(C + δI) v = g_f``.
      alpha: α, the length of the perturbation ``εv`` of θ (ε = α/‖v‖); default as above.
      difference: ``"sequential"`` (default) or ``"vmap"`` (how the two passes are evaluated, as
        in :func:`bilevel_jax.sama`), or ``"jvp"`` (exact forward mode).

    Returns:
      ``(n,)``: ``influence(i, f)`` for every training example, in float32 or wider.

    Example (ridge regression: the exact influence on the mean test loss):
      >>> import jax
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]])
      >>> y = jnp.array([1.0, 2.0, 2.0, 0.5])
      >>> loss = lambda th, b: 0.5 * (b[0] @ th - b[1]) ** 2
      >>> reg = lambda th: 0.05 * jnp.sum(th**2)
      >>> theta = jnp.linalg.solve(x.T @ x / 4 + 0.1 * jnp.eye(2), x.T @ y / 4)
      >>> test = (jnp.array([[1.0, 2.0], [0.5, 0.0]]), jnp.array([3.0, 0.0]))
      >>> fwd = forward_influence(loss, theta, (x, y), test, regularizer=reg)
      >>> mean_query = lambda th, q: jnp.mean(loss(th, q))
      >>> exact = influence(loss, theta, (x, y), test, query_loss=mean_query, regularizer=reg)
      >>> fwd.shape, bool(jnp.allclose(fwd, exact, rtol=1e-3, atol=1e-4))
      ((4,), True)
    """
    fn = "forward_influence"
    n = _check_common(
        per_example_loss,
        params,
        train_batch,
        regularizer=regularizer,
        curvature=curvature,
        damping=damping,
        solver=solver,
        maxiter=maxiter,
        tol=tol,
        outputs_fn=outputs_fn,
        output_loss=output_loss,
        fn=fn,
    )
    if difference not in _DIFFERENCES:
        raise BilevelInputError(
            f"{fn}: unknown difference {difference!r}; choose one of {', '.join(_DIFFERENCES)}"
        )
    _check_number(alpha, f"{fn}: alpha (the length of the perturbation εv)", positive=True)
    if query_loss is None:
        if query_batch is None:
            raise BilevelInputError(
                f"{fn}: pass query_batch (the query loss is the mean of per_example_loss over "
                "it), or a scalar query_loss"
            )
        m = _batch_size(query_batch, "query_batch")
        _check_per_example(
            per_example_loss, "per_example_loss", params, query_batch, m, "query_batch"
        )
    else:
        out = _out_shape(
            query_loss, "query_loss", "query_loss(params, query_batch)", params, query_batch
        )
        if out.shape != ():
            raise BilevelInputError(
                f"{fn}: query_loss(params, query_batch) must return one scalar (an aggregate "
                f"query such as the mean test loss); got shape {out.shape}. For many queries "
                "use influence()"
            )

    if alpha is None:
        dtype = jnp.result_type(*jax.tree.leaves(params))
        alpha = float(jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps) ** (1 / 3)

    core = _cached_jit(
        _forward_core,
        per_example_loss,
        query_loss,
        regularizer,
        curvature,
        solver,
        maxiter,
        tol,
        alpha,
        difference,
        outputs_fn,
        output_loss,
        n,
    )
    out = core(params, train_batch, query_batch, damping)
    _raise_if_nonfinite(out, fn, damping)
    return out
