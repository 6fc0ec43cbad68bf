"""One convention for non-finite values: ``on_nonfinite="raise" | "warn" | "skip"``.

Used by :func:`bilevel_jax.meta_grad` (default ``"raise"``), :func:`bilevel_jax.bilevel_step`
(default ``"skip"``) and :func:`bilevel_jax.custom_root` (default ``"warn"``). In every mode
the caller drops the non-finite value (a skipped step leaves its state unchanged and is
counted); the mode only says what the user is told:

- ``"raise"``: ``FloatingPointError`` naming the non-finite leaves (under ``jit`` through
  ``io_callback``, which propagates the exception to the caller);
- ``"warn"``: a ``RuntimeWarning`` (under ``jit`` through ``jax.debug.callback``);
- ``"skip"``: nothing.

The host callback is placed on the non-finite branch of a ``lax.cond``, so a finite step
costs no host round trip.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from bilevel_jax import _checks

__all__ = ["ON_NONFINITE", "OnNonfinite", "all_finite", "check_mode", "report"]

PyTree = Any
OnNonfinite = Literal["raise", "warn", "skip"]
ON_NONFINITE: tuple[str, ...] = ("raise", "warn", "skip")


def check_mode(mode: str, where: str) -> str:
    """Return ``mode`` if it is one of :data:`ON_NONFINITE`, else raise a clear ValueError.

    >>> check_mode("warn", "meta_grad")
    'warn'
    >>> check_mode("ignore", "meta_grad")
    Traceback (most recent call last):
    ...
    ValueError: meta_grad: on_nonfinite must be one of 'raise', 'warn', 'skip'; got 'ignore'
    """
    if mode not in ON_NONFINITE:
        choices = ", ".join(repr(m) for m in ON_NONFINITE)
        raise ValueError(f"{where}: on_nonfinite must be one of {choices}; got {mode!r}")
    return mode


def all_finite(*trees: PyTree) -> jax.Array:
    """True when every leaf of every tree is finite (None trees are skipped).

    >>> bool(all_finite({"a": jnp.ones(2)}, None, jnp.array([0.0, jnp.inf])))
    False
    """
    leaves = [x for t in trees if t is not None for x in jax.tree.leaves(t)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _message(where: str, tree: PyTree, hint: str | None, mode: str) -> str:
    bad = _checks.nonfinite_leaves(tree) if tree is not None else []
    leaves = f"; non-finite leaves: {', '.join(bad)}" if bad else ""
    if hint is None:
        hint = "Check the losses and data for NaN/inf or lower the learning rates."
        if mode == "raise":
            hint += " on_nonfinite='skip' drops such steps and only counts them."
    return f"{where} is not finite (non-finite values: NaN or inf{leaves}). {hint}"


def _host(finite, tree, *, mode: str, where: str, hint: str | None) -> None:
    if np.all(np.asarray(finite)):  # also re-checked here: under vmap both branches run
        return
    if mode == "raise":
        raise FloatingPointError(_message(where, tree, hint, mode))
    warnings.warn(_message(where, tree, hint, mode), RuntimeWarning, stacklevel=3)


def report(
    finite: jax.Array | bool,
    mode: str,
    *,
    where: str,
    tree: PyTree = None,
    hint: str | None = None,
) -> None:
    """Tell the user about a non-finite value according to ``mode`` (see the module docstring).

    Works eagerly and under ``jit``/``vmap``/``scan``. Does not drop anything itself: the
    caller keeps its old state when ``finite`` is False.

    Args:
      finite: a boolean scalar, True when the value is finite.
      mode: ``"raise"``, ``"warn"`` or ``"skip"``.
      where: what was not finite, e.g. ``"bilevel_jax.meta_grad: the hypergradient"``; the
        message reads ``"<where> is not finite (...)"``.
      tree: the value itself; the message names its non-finite leaves.
      hint: what the user can do (a generic hint by default).

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     jax.jit(lambda x: report(jnp.isfinite(x), "warn", where="x"))(jnp.nan)
    ...     jax.effects_barrier()
    >>> print(str(w[0].message)[:34])
    x is not finite (non-finite values
    >>> report(jnp.asarray(False), "raise", where="the gradient", tree={"w": jnp.nan})
    Traceback (most recent call last):
    ...
    FloatingPointError: the gradient is not finite (non-finite values: NaN or inf; non-finite leaves: ['w']). ...
    """
    if mode == "skip":
        return
    host = functools.partial(_host, mode=mode, where=where, hint=hint)
    try:
        concrete = bool(finite)
    except jax.errors.ConcretizationTypeError:  # traced: call back on the non-finite branch
        concrete = None
    if concrete is not None:
        if not concrete:
            host(np.asarray(concrete), jax.device_get(tree))
        return
    if mode == "raise":
        callback = lambda f, t: io_callback(host, None, f, t)  # noqa: E731 - propagates errors
    else:
        callback = lambda f, t: jax.debug.callback(host, f, t)  # noqa: E731
    jax.lax.cond(finite, lambda f, t: None, callback, finite, tree)
