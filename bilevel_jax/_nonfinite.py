"""One convention for non-finite values: ``on_nonfinite="raise" | "warn" | "skip"``.

Used by :func:`bilevel_jax.meta_grad` (default ``"raise"``), :func:`bilevel_jax.bilevel_step`
(default ``"skip"``) and :func:`bilevel_jax.custom_root` (default ``"warn"``). In every mode
the caller drops the non-finite value (a skipped step leaves its state unchanged and is
counted); the mode only says what the user is told:

- ``"raise"``: ``FloatingPointError`` naming the non-finite leaves. Eagerly it is raised as
  such. Under ``jit`` it is raised by a host callback (``io_callback``) inside the compiled
  computation, and JAX hands Python exceptions out of compiled code only as XLA's
  ``jax.errors.JaxRuntimeError`` (a ``RuntimeError`` whose message ends with
  ``FloatingPointError: <our message>``); :func:`nonfinite_errors` turns it back into the
  ``FloatingPointError`` (``bj.fit`` does this for you).
- ``"warn"``: a ``RuntimeWarning`` (under ``jit`` through ``jax.debug.callback``);
- ``"skip"``: nothing.

The host callback is placed on the non-finite branch of a ``lax.cond``, so a finite step
costs no host round trip. Under ``vmap`` the check is batched by hand
(``jax.custom_batching.custom_vmap``): one ``cond`` on "every batch member is finite", so the
check works under ``vmap`` in every mode (a vmapped ``cond`` cannot hold an ``io_callback``)
and a finite batch still makes no host call. The checked values pass through
``stop_gradient``: a report inside a differentiated function does not break autodiff.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import custom_batching
from jax.experimental import io_callback

from bilevel_jax import _checks

__all__ = [
    "ON_NONFINITE",
    "OnNonfinite",
    "all_finite",
    "check_mode",
    "nonfinite_errors",
    "norm_finite",
    "report",
    "warn_if_zero",
]

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


def norm_finite(tree: PyTree) -> jax.Array:
    """True when the tree's global 2-norm, as float32, is finite.

    Stricter than :func:`all_finite`: a diverging method (``neumann`` with ``eta`` beyond
    2/λ_max) can return entries that are each finite but whose norm overflows; applying
    such a step is as harmful as applying an inf, so callers treat it as non-finite.

    >>> bool(norm_finite(jnp.full(4, 1e20))), bool(norm_finite(jnp.ones(4)))
    (False, True)
    """
    if not jax.tree.leaves(tree):
        return jnp.asarray(True)
    return jnp.isfinite(optax.tree.norm(tree).astype(jnp.float32))


def _message(where: str, tree: PyTree, hint: str | None, mode: str) -> str:
    bad = _checks.nonfinite_leaves(tree) if tree is not None else []
    leaves = f"; non-finite leaves: {', '.join(bad)}" if bad else ""
    if tree is not None and not bad:
        leaves = (
            "; every entry is finite but the norm overflows float32, as from a diverging "
            "solver, e.g. neumann with eta above 2/λ_max of the base Hessian"
        )
    if hint is None:
        hint = "Check the losses and data for NaN/inf or lower the learning rates."
        if mode == "raise":
            hint += " on_nonfinite='skip' drops such steps and only counts them."
    return f"{where} is not finite (non-finite values: NaN or inf{leaves}). {hint}"


# messages of the FloatingPointErrors raised by host callbacks, newest last: how
# ``nonfinite_errors`` recognises them inside XLA's runtime error
_RAISED: collections.deque[str] = collections.deque(maxlen=64)


def _host(finite, tree, *, mode: str, where: str, hint: str | None) -> None:
    if np.all(np.asarray(finite)):  # re-checked here: the callback may see a whole batch
        return
    message = _message(where, tree, hint, mode)
    if mode == "raise":
        _RAISED.append(message)
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class _DropOwnCallbackErrors(logging.Filter):
    """JAX logs every exception a host callback raises, before the same error reaches the
    caller; for our own FloatingPointError that log is a second copy of the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, FloatingPointError) and str(exc) in _RAISED)


for _name in ("jax._src.callback", "jax._src.debugging"):
    logging.getLogger(_name).addFilter(_DropOwnCallbackErrors())


def _original(error: BaseException) -> FloatingPointError | None:
    """Our FloatingPointError carried by XLA's runtime error, or None."""
    if not isinstance(error, jax.errors.JaxRuntimeError):
        return None
    text = str(error)
    for message in reversed(_RAISED):
        if f"FloatingPointError: {message}" in text:
            return FloatingPointError(message)
    return None


class nonfinite_errors(contextlib.ContextDecorator):  # noqa: N801 - used like contextlib.suppress
    """Re-raise ``on_nonfinite="raise"`` errors from compiled code as ``FloatingPointError``.

    Under ``jit`` the ``FloatingPointError`` of ``on_nonfinite="raise"`` is raised inside
    the compiled computation, and JAX can only hand it out as XLA's
    ``jax.errors.JaxRuntimeError`` (its message ends with ``FloatingPointError: ...``), which
    ``except FloatingPointError`` does not catch. Inside this context (or a function
    decorated with it) such an error is raised again as the ``FloatingPointError`` with
    bilevel_jax's message, chained to the runtime error (``__cause__``); every other
    exception passes unchanged. Eagerly (no ``jit``) nothing needs converting.

    Keep the first read of the result inside the block: on accelerators a compiled
    computation runs asynchronously and its error can surface when the result is read
    (``jax.block_until_ready``, ``float(...)``) rather than at the call.
    :func:`bilevel_jax.fit` runs its steps inside it.

    >>> import jax, jax.numpy as jnp
    >>> def check(x):
    ...     report(jnp.all(jnp.isfinite(x)), "raise", where="x")
    ...     return x
    >>> try:
    ...     with nonfinite_errors():
    ...         jax.block_until_ready(jax.jit(check)(jnp.nan))
    ... except FloatingPointError as e:
    ...     print(str(e)[:16])
    x is not finite
    """

    def __enter__(self) -> nonfinite_errors:
        return self

    def __exit__(self, typ, value, traceback) -> bool:
        original = None if value is None else _original(value)
        if original is not None:
            raise original from value
        return False


def _checked(host, mode: str):
    """``check(finite, tree)``: the host callback on the non-finite branch of a ``cond``,
    batched by hand under ``vmap`` (one ``cond`` on "all finite"; see the module docstring)."""

    def callback(f, t):
        if mode == "raise":
            io_callback(host, None, f, t)  # its exception propagates to the caller
        else:
            jax.debug.callback(host, f, t)

    def unbatched(finite, tree):
        jax.lax.cond(finite, lambda f, t: None, callback, finite, tree)
        return finite

    check = custom_batching.custom_vmap(unbatched)

    @check.def_vmap
    def _batched(axis_size, in_batched, finite, tree):
        del axis_size
        finite_batched = in_batched[0]
        check(jnp.all(finite) if finite_batched else finite, tree)  # nested vmap: its own rule
        return finite, finite_batched

    return check


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
    _checked(host, mode)(jnp.asarray(finite, bool), jax.lax.stop_gradient(tree))


ZERO_HINT = (
    "Usual causes: the meta parameters reach the losses only where ∇_θ L_m is zero, or "
    "behind stop_gradient, or a wrapped base optimizer whose adapted step ignores them "
    "(check bilevel_jax.describe(base_tx))."
)


class _Once:
    """A flag shared by the traces of one step or transform: warn only the first time."""

    def __init__(self) -> None:
        self.done = False


def _host_zero(nonzero, tree, *, where: str, hint: str, once: _Once) -> None:
    del tree
    if np.all(np.asarray(nonzero)) or once.done:
        return
    once.done = True
    warnings.warn(
        f"{where} is exactly 0 in every leaf, so the meta parameters do not move. {hint} "
        "(Warned once.)",
        RuntimeWarning,
        stacklevel=3,
    )


def warn_if_zero(
    tree: PyTree, *, where: str, once: _Once, active: jax.Array | bool = True, hint: str = ""
) -> None:
    """Warn once (per ``once`` flag) when every leaf of ``tree`` is exactly zero.

    Under ``jit`` the check is a ``cond`` with a ``jax.debug.callback`` on the zero branch
    (batched like :func:`report` under ``vmap``), so a nonzero value costs no host call;
    ``active=False`` (e.g. a skipped step) disables it.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as w:
    ...     warnings.simplefilter("always")
    ...     flag = _Once()
    ...     for _ in range(3):
    ...         jax.jit(lambda g: warn_if_zero(g, where="the hypergradient", once=flag))(
    ...             jnp.zeros(2))
    ...     jax.effects_barrier()
    >>> len(w), str(w[0].message)[:34]
    (1, 'the hypergradient is exactly 0 in ')
    """
    leaves = jax.tree.leaves(tree)
    if not leaves or once.done:
        return
    nonzero = jnp.any(jnp.stack([jnp.any(x != 0) for x in leaves])) | ~jnp.asarray(active)
    host = functools.partial(_host_zero, where=where, hint=hint, once=once)
    try:
        concrete = bool(nonzero)
    except jax.errors.ConcretizationTypeError:
        concrete = None
    if concrete is not None:
        if not concrete:
            host(np.asarray(concrete), None)
        return
    _checked(host, "warn")(nonzero, None)
