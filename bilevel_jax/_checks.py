"""Input validation that names the offending leaf. All checks run at trace time."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

PyTree = Any


class BilevelInputError(ValueError):
    """Bad input to a bilevel_jax function: mismatched pytrees, wrong shapes or dtypes.

    A ``ValueError``, so ``except ValueError`` catches it too.

    Example:
      >>> import optax
      >>> import bilevel_jax as bj
      >>> loss = lambda th, lam, batch: th * lam  # not a scalar
      >>> problem = bj.BilevelProblem(loss, loss, optax.sgd(0.1))
      >>> th = jnp.ones(2)
      >>> inputs = bj.BilevelInputs(th, jnp.ones(2), optax.sgd(0.1).init(th), None, None)
      >>> try:
      ...     bj.sama().hypergrad(problem, inputs, None)
      ... except bj.BilevelInputError as e:
      ...     print(str(e)[:31])
      base_loss must return a scalar
    """


def callable_repr(x: Any) -> str:
    """``repr`` without memory addresses: functions by name, partials as ``partial(f, k=v)``.

    Example:
      >>> from bilevel_jax import linalg
      >>> callable_repr(functools.partial(linalg.solve_cg, maxiter=10))
      'partial(solve_cg, maxiter=10)'
      >>> callable_repr(0.5), callable_repr(jnp.tanh)
      ('0.5', 'tanh')
      >>> import optax
      >>> callable_repr(optax.sgd(0.1))
      'chain(identity, scale(step_size=-0.1))'
    """
    if _is_transform(x):
        return transform_repr(x)
    if isinstance(x, functools.partial):
        parts = [callable_repr(x.func), *map(callable_repr, x.args)]
        parts += [f"{k}={callable_repr(v)}" for k, v in x.keywords.items()]
        return f"partial({', '.join(parts)})"
    if callable(x) and not isinstance(x, type) and hasattr(x, "__name__"):
        return x.__name__
    return repr(x)


def _is_transform(x: Any) -> bool:
    """An optax ``GradientTransformation`` (a NamedTuple of ``init`` and ``update``)."""
    return isinstance(x, tuple) and tuple(getattr(x, "_fields", ()))[:2] == ("init", "update")


def _cells(fn: Any) -> dict:
    closure = getattr(fn, "__closure__", None) or ()
    code = getattr(fn, "__code__", None)
    return dict(zip(code.co_freevars, (c.cell_contents for c in closure))) if code else {}


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _update_repr(fn: Any) -> str:
    """An optax update function as its constructor call, read from its closure."""
    qualname = getattr(fn, "__qualname__", "")
    module = getattr(fn, "__module__", "") or ""
    name = qualname.split(".<locals>")[0] if ".<locals>" in qualname else qualname
    owner = getattr(fn, "__self__", None)
    inner = getattr(owner, "inner_opt", None)
    if type(owner).__name__ == "MultiSteps" and _is_transform(inner):
        every_fn = getattr(owner, "_every_k_schedule", None)
        constant = _cells(every_fn).get("every_k_schedule")  # an int is wrapped in a lambda
        every = repr(constant) if isinstance(constant, int) else callable_repr(every_fn)
        return f"MultiSteps({transform_repr(inner)}, every_k_schedule={every})"
    if not module.startswith("optax") or ".<locals>" not in qualname:
        return callable_repr(fn)
    cells = _cells(fn)
    if name == "with_extra_args_support" and _is_transform(cells.get("tx")):
        return transform_repr(cells["tx"])
    if name == "chain" and isinstance(cells.get("update_fns"), tuple):
        return f"chain({', '.join(map(_update_repr, cells['update_fns']))})"
    parts = []
    for key, value in cells.items():
        if _is_transform(value):
            text = transform_repr(value)
        elif isinstance(value, dict) and value and all(map(_is_transform, value.values())):
            text = "{" + ", ".join(f"{k!r}: {transform_repr(v)}" for k, v in value.items()) + "}"
        elif _plain(value) or (isinstance(value, dict) and all(map(_plain, value.values()))):
            text = repr(value)
        elif callable(value) and hasattr(value, "__name__"):
            if getattr(value, "__qualname__", "").startswith(f"{name}.<locals>."):
                continue  # the transform's own helper (partition's make_mask, …)
            text = value.__name__
        else:
            continue  # arrays, masks, internal helpers: not settings a reader retypes
        parts.append(f"{key}={text}")
    return f"{name}({', '.join(parts)})" if parts else name


def transform_repr(tx: Any) -> str:
    """An optax transform's settings without memory addresses, e.g. for ``repr`` of a step.

    Read from the closure of ``tx.update`` (optax keeps a transform's hyperparameters there):
    ``optax.adam(1e-3)`` prints as ``chain(scale_by_adam(b1=0.9, …), scale(step_size=-0.001))``.
    A transform that is not optax's prints as its update function's name.

    Example:
      >>> import optax
      >>> transform_repr(optax.chain(optax.clip(1.0), optax.scale(-0.5)))
      'chain(clip(max_delta=1.0), scale(step_size=-0.5))'
    """
    return _update_repr(tx.update)


def _path(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def same_structure(**trees: PyTree) -> None:
    """Check that all named pytrees share one structure and leaf shapes."""
    names = list(trees)
    ref_name, ref = names[0], trees[names[0]]
    ref_leaves, ref_def = jax.tree_util.tree_flatten_with_path(ref)
    for name in names[1:]:
        leaves, tdef = jax.tree_util.tree_flatten_with_path(trees[name])
        if tdef != ref_def:
            raise BilevelInputError(
                f"{name!r} and {ref_name!r} must be pytrees of the same structure; got\n"
                f"  {name}: {tdef}\n  {ref_name}: {ref_def}"
            )
        for (p, a), (_, b) in zip(leaves, ref_leaves):
            if np.shape(a) != np.shape(b):
                raise BilevelInputError(
                    f"leaf {_path(p)} has shape {np.shape(a)} in {name!r} but "
                    f"{np.shape(b)} in {ref_name!r}"
                )


def opt_state_matches(tx, state: PyTree, params: PyTree) -> None:
    """Check that ``state`` has the structure and shapes of ``tx.init(params)``."""
    try:
        expected = jax.eval_shape(tx.init, params)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise BilevelInputError(
            f"could not build the optimizer state for these params to check it: {e}"
        ) from e
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    got_leaves, got_def = jax.tree_util.tree_flatten_with_path(state)
    if exp_def != got_def:
        raise BilevelInputError(
            "the optimizer state does not match the params: its structure differs from "
            f"tx.init(params).\n  state:          {got_def}\n  tx.init(params): {exp_def}\n"
            "Was the state initialised from other parameters or another optimizer?"
        )
    for (p, a), (_, b) in zip(got_leaves, exp_leaves):
        if np.shape(a) != np.shape(b):
            raise BilevelInputError(
                f"optimizer state leaf {_path(p)} has shape {np.shape(a)}, but "
                f"tx.init(params) gives {np.shape(b)}: the state does not match the params."
            )
        got_dtype = getattr(a, "dtype", None)
        if got_dtype is not None and jnp.dtype(got_dtype) != jnp.dtype(b.dtype):
            raise BilevelInputError(
                f"optimizer state leaf {_path(p)} has dtype {jnp.dtype(got_dtype)}, but "
                f"tx.init(params) gives {jnp.dtype(b.dtype)}: the state was made for params of "
                "another dtype."
            )


def scalar_loss(fn, name: str, *args, tuple_hint: str | None = None) -> jax.ShapeDtypeStruct:
    """Check that ``fn(*args)`` returns a real scalar; return its shape/dtype.

    ``tuple_hint`` is appended when ``fn`` returns a tuple (e.g. a forgotten ``stateful=True``).
    """
    try:
        out = jax.eval_shape(fn, *args)
    except BilevelInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BilevelInputError(
            f"calling {name}(base_params, meta_params, batch) failed: {e}"
        ) from e
    if isinstance(out, tuple):
        hint = tuple_hint or "return the scalar loss only"
        raise BilevelInputError(f"{name} returned a tuple of {len(out)}, not a scalar loss: {hint}")
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != ():
        raise BilevelInputError(
            f"{name} must return a scalar loss; got {jax.tree.map(lambda x: x.shape, out)}"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise BilevelInputError(f"{name} must return a floating-point scalar; got {out.dtype}")
    return out


def nonfinite_leaves(tree: PyTree) -> list[str]:
    """Paths of leaves that contain NaN or inf (host-side, for error messages)."""
    bad = []
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not np.all(np.isfinite(np.asarray(x, dtype=np.float64))):
            bad.append(_path(p))
    return bad


def float_leaves(tree: PyTree, name: str) -> None:
    """Check that every leaf of ``tree`` (differentiated: θ or λ) is floating point.

    >>> float_leaves({"w": jnp.ones(2), "n": jnp.int32(0)}, "base_params")
    Traceback (most recent call last):
    ...
    bilevel_jax._checks.BilevelInputError: base_params leaf ['n'] has dtype int32: ...
    """
    for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = jnp.result_type(x)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise BilevelInputError(
                f"{name} leaf {_path(p)} has dtype {dtype}: {name} are differentiated, so every "
                "leaf must be floating point. Keep integer or boolean values (step counters, "
                "indices, masks) out of it: close over them in the loss, or pass them as "
                "model_state (bilevel_step(..., stateful=True))."
            )


def _reached(fn: Callable, tree: PyTree) -> list[bool]:
    """Which leaves of ``tree`` the output of ``fn(tree)`` depends on through a gradient
    path (``stop_gradient`` cuts one). Structural, from the jaxpr: an equation whose output is
    needed needs all its inputs (so calls and control flow count as depending on everything
    they take), hence True may over-report a dependence but never misses one."""
    leaves, treedef = jax.tree.flatten(tree)
    closed = jax.make_jaxpr(lambda *ls: fn(jax.tree.unflatten(treedef, ls)))(*leaves)
    jaxpr = closed.jaxpr
    needed = {v for v in jaxpr.outvars if isinstance(v, jex_core.Var)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name == "stop_gradient":
            continue
        if any(v in needed for v in eqn.outvars):
            needed.update(v for v in eqn.invars if isinstance(v, jex_core.Var))
    return [v in needed for v in jaxpr.invars]


def warn_unreached(
    losses: Sequence[Callable], meta_params: PyTree, where: str, stacklevel: int = 4
) -> None:
    """Warn when a leaf of λ reaches none of ``losses`` (functions of λ alone): its
    hypergradient is 0 whatever θ and the data are. Checked at trace time; a loss that cannot
    be analysed is taken to use every leaf (no warning).

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn_unreached([lambda lam: jnp.sum(lam["w"] ** 2)],
    ...                    {"w": jnp.ones(2), "lr": jnp.ones(())}, "here")
    >>> print(str(w[0].message)[:60])
    here: meta parameter leaf ['lr'] reaches neither base_loss n
    """
    paths = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(meta_params)[0]]
    if not paths:
        return
    used = [False] * len(paths)
    try:
        for fn in losses:
            used = [u or r for u, r in zip(used, _reached(fn, meta_params))]
    except Exception:  # noqa: BLE001 - an analysis failure must never break the step
        return
    unused = [p for p, u in zip(paths, used) if not u]
    if unused:
        warnings.warn(
            f"{where}: meta parameter leaf {', '.join(unused)} reaches neither base_loss nor "
            "meta_loss (it is unused, or only behind stop_gradient), so its hypergradient is "
            "always 0 and the meta optimizer never moves it. An optimizer hyperparameter "
            "(e.g. a learning rate) must be wired into the optimizer: "
            "optax.inject_hyperparams with bj.itd/bj.dds(hyperparams={...}); otherwise use it "
            "in a loss or drop it from the meta parameters.",
            UserWarning,
            stacklevel=stacklevel,
        )


def warn_missing_k_axis(
    first_base_batch: PyTree, meta_batch: PyTree, k: int, where: str, stacklevel: int = 4
) -> None:
    """Warn when ``base_batches`` looks like one batch without the K axis.

    The rule: the meta batch has the structure of one base batch and *every* leaf of the
    meta batch has one axis more than the base steps' slice ``base_batches[k]``, i.e. every
    leaf of ``base_batches`` has the meta batch's rank. That is what a forgotten K axis gives
    (``base_batches`` of shape ``(B, D)`` with a ``(B', D)`` meta batch: K = B steps on single
    examples). It is only a warning, because K one-example steps with a meta batch of B
    examples have the same shapes; filter it with
    ``warnings.filterwarnings("ignore", message=".*no K axis")`` if that is what you mean.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     warn_missing_k_axis(jnp.ones(4), jnp.ones((8, 4)), 8, "bilevel_step")
    >>> "no K axis" in str(w[0].message)
    True
    """
    base_leaves, base_def = jax.tree.flatten(first_base_batch)
    meta_leaves, meta_def = jax.tree.flatten(meta_batch)
    if not base_leaves or base_def != meta_def:
        return
    if all(jnp.ndim(m) == jnp.ndim(b) + 1 for b, m in zip(base_leaves, meta_leaves)):
        shapes = [tuple(jnp.shape(m)) for m in meta_leaves]
        warnings.warn(
            f"{where}: base_batches looks like one batch with no K axis: each of its leaves has "
            f"the rank of the matching meta batch leaf (meta batch shapes {shapes}), so it is "
            f"taken as K = {k} single-example base steps. Stack the K base batches on a new leading axis, "
            "e.g. jax.tree.map(lambda x: x[None], batch) (x[None]) for K = 1. If you do mean "
            "one example per base step, ignore this warning.",
            UserWarning,
            stacklevel=stacklevel,
        )


def concrete(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array, or None inside a trace (value checks are skipped under ``jit``)."""
    try:
        return np.asarray(x)
    except jax.errors.TracerArrayConversionError:
        return None
