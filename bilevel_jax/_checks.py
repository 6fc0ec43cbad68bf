"""Input validation that names the offending leaf. All checks run at trace time."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

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
    """
    if isinstance(x, functools.partial):
        parts = [callable_repr(x.func), *map(callable_repr, x.args)]
        parts += [f"{k}={callable_repr(v)}" for k, v in x.keywords.items()]
        return f"partial({', '.join(parts)})"
    if callable(x) and not isinstance(x, type) and hasattr(x, "__name__"):
        return x.__name__
    return repr(x)


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


def scalar_loss(fn, name: str, *args) -> jax.ShapeDtypeStruct:
    """Check that ``fn(*args)`` returns a real scalar; return its shape/dtype."""
    try:
        out = jax.eval_shape(fn, *args)
    except BilevelInputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise BilevelInputError(
            f"calling {name}(base_params, meta_params, batch) failed: {e}"
        ) from e
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
