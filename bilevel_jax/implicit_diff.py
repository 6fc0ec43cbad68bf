r"""Implicit differentiation of any inner solver (custom root / fixed-point VJPs).

Suppose an inner solver returns ``θ* = solver(init, λ)`` and, at its output, an
*optimality condition* holds:

    F(θ*(λ), λ) = 0,            e.g. F = ∇_θ L   for   θ*(λ) = argmin_θ L(θ, λ).

If ``∂_θF`` is invertible at ``(θ*, λ)``, the implicit function theorem
(Krantz & Parks, *The Implicit Function Theorem*, Birkhäuser 2002, Thm 3.3.1)
gives ``θ*`` as a differentiable function of ``λ`` with

    dθ*/dλ = −(∂_θF)⁻¹ ∂_λF.

Reverse mode needs only products with the transpose. For an output cotangent
``w`` (``= ∇_θ* of the outer loss``) solve the *adjoint system*

    (∂_θF)ᵀ u = w                                                       (1)

with a matrix-free linear solver (its matvec is ``jax.vjp`` of F w.r.t. θ), then

    λ̄ = (dθ*/dλ)ᵀ w = −(∂_λF)ᵀ u,                                      (2)

one ``jax.vjp`` of F w.r.t. λ. Nothing is differentiated *through* the solver,
so it may use ``lax.while_loop``, early stopping, host callbacks, a
non-differentiable library…: only ``F`` must be differentiable. Memory and time
of the backward pass are those of ~``maxiter`` matvecs, independent of how many
steps the inner solver took.

:func:`custom_root` decorates a solver given F; :func:`custom_fixed_point`
decorates a solver of ``θ = T(θ, λ)`` (it uses ``F = θ − T(θ, λ)``).
The decorator API follows the idea of JAXopt's ``custom_root`` (Blondel et al.,
"Efficient and Modular Implicit Differentiation", NeurIPS 2022) — prior art for
the interface only; this is an independent implementation on
:mod:`bilevel_jax.linalg`.

Which linear solver for (1)
---------------------------
``solve`` is a name from :data:`bilevel_jax.linalg.SOLVERS` or a callable with
the same signature ``solve(matvec, b, *, x0=None, **solver_kwargs)``:

- ``"cg"`` (default of :func:`custom_root`) needs ``∂_θF`` symmetric positive
  (or negative) definite. This holds for ``F = ∇_θ L`` at a strict local
  minimum (``∂_θF`` is the Hessian). Do not use it for general F.
- ``"gmres"`` (default of :func:`custom_fixed_point`) and ``"bicgstab"`` handle
  non-symmetric ``∂_θF`` (general root problems, fixed points of non-gradient
  maps, saddle points).
- ``"neumann"`` (``x = η Σ_{j≤K} (I − ηA)^j b``) needs ``ρ(I − ηA) < 1``; pass
  ``eta``. For :func:`custom_fixed_point` with a contraction T, ``eta=1`` gives
  the classic series ``Σ_j (∂_θTᵀ)^j w``.
- ``"dense"`` materialises ``∂_θF`` (n matvecs) and solves exactly; small θ only.

``solver_kwargs`` (``maxiter``, ``tol``, ``damping``, ``eta``, ``restart``…) are
passed to it; for the named solvers ``maxiter`` defaults to
:data:`DEFAULT_MAXITER` here (``bilevel_jax.linalg`` defaults to 10, too few for
an accurate adjoint). ``damping=δ`` solves ``(∂_θFᵀ + δI) u = w`` (biased, but
stabilises near-singular systems).

Arguments: what is differentiated
---------------------------------
The decorated function keeps the solver's signature ``(init, *args, **kwargs)``.
``(init, args, kwargs)`` is flattened as one pytree and its leaves split:

- *traced* leaves: JAX arrays (tracers included) and NumPy arrays/scalars of
  numeric dtype. Floating/complex ones are differentiated by (2). Integer and
  bool ones get ``float0`` (symbolic zero) cotangents, as JAX requires.
- *static* leaves: everything else (Python ``int``/``float``/``bool``, strings,
  callables, ``None`` …) are captured as constants. A Python ``float`` is
  therefore **not** differentiated unless you pass it as an array (under
  ``jax.grad``/``jit``/``vmap`` the differentiated values are arrays anyway).

Keyword arguments are differentiated like positional ones (``jax.custom_vjp``
itself does not accept keywords; they are flattened with the rest).

``init`` gets a **zero** cotangent: at an exact solution θ* does not depend on
the starting point. Values that the solver or F *close over* (instead of taking
them as arguments) are not differentiated; JAX raises if you try to
differentiate a closed-over tracer. Pass everything you differentiate as an
argument.

Limitations
-----------
- The VJP is exact only if the solver converged (F(θ*) ≈ 0) and the adjoint
  solve (1) converged; both errors pass linearly into the hypergradient.
- Only reverse mode (``jax.grad``/``jax.vjp``) is defined; forward mode
  (``jax.jvp``/``jacfwd``) raises, as for any ``jax.custom_vjp``.
- A singular or indefinite ``∂_θF`` (CG on a saddle point, a flat direction)
  can make ``u`` non-finite. Trace-time checks cannot see values; when the
  backward pass runs eagerly the adjoint is checked and a ``RuntimeWarning``
  with a hint is issued, and with ``check_finite=True`` the same check runs
  inside ``jit``/``vmap`` through ``jax.debug.callback`` (one host callback per
  backward pass). Otherwise NaNs propagate silently.
- The auxiliary output of ``has_aux=True`` is passed through unchanged but is
  not differentiable (its float leaves are wrapped in ``lax.stop_gradient``).
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax import linalg
from bilevel_jax._checks import BilevelInputError

__all__ = [
    "DEFAULT_MAXITER",
    "custom_root",
    "custom_fixed_point",
]

PyTree = Any

DEFAULT_MAXITER = 100
"""``maxiter`` given to a *named* linear solver when ``solver_kwargs`` sets none."""


# --------------------------------------------------------------------------- helpers


def _is_traced(leaf: Any) -> bool:
    """Leaves passed through ``jax.custom_vjp`` (arrays); all others are static."""
    if isinstance(leaf, jax.Array):  # includes tracers
        return True
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np.dtype(leaf.dtype).kind in "biufc"
    return False


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_cotangent(x: Any) -> Any:
    """Zero cotangent of the right type: ``float0`` for integer/bool primals."""
    if _is_float(x):
        return jnp.zeros(jnp.shape(x), jnp.result_type(x))
    return np.zeros(np.shape(x), dtype=jax.dtypes.float0)


def _path(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _prepare_linear_solve(
    solve: str | Callable, solver_kwargs: dict | None
) -> tuple[Callable, dict]:
    """Resolve ``solve`` and check ``solver_kwargs`` against its signature (eagerly)."""
    linear_solve = linalg.get_solver(solve)  # ValueError listing the choices
    kwargs = dict(solver_kwargs or {})
    try:
        params = inspect.signature(linear_solve).parameters
    except (TypeError, ValueError):  # builtins / C callables: cannot check
        return linear_solve, kwargs
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not has_var_kw:
        accepted = {
            n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        } - {"matvec", "b"}
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            name = solve if isinstance(solve, str) else getattr(solve, "__name__", repr(solve))
            raise TypeError(
                f"linear solver {name!r} does not accept solver_kwargs {unknown}; "
                f"it accepts {sorted(accepted)}"
            )
    if isinstance(solve, str) and "maxiter" in params and "maxiter" not in kwargs:
        kwargs["maxiter"] = DEFAULT_MAXITER
    return linear_solve, kwargs


def _check_solution(sol: PyTree) -> None:
    """θ* must be a non-empty pytree of floating arrays (the system (1) is over them)."""
    leaves = jax.tree_util.tree_leaves_with_path(sol)
    if not leaves:
        raise BilevelInputError("the solver returned an empty pytree; nothing to differentiate")
    for p, leaf in leaves:
        if not (_is_traced(leaf) or isinstance(leaf, (float, complex))) or not _is_float(leaf):
            raise BilevelInputError(
                f"solver output leaf {_path(p)} is {type(leaf).__name__} "
                f"{getattr(leaf, 'dtype', '')}; every leaf of θ* must be a floating array"
            )


def _check_optimality_output(fn_name: str, sol: PyTree, out: PyTree) -> None:
    """F(θ, …) must be shaped like θ (the linear system (1) is square)."""
    sol_leaves, sol_def = jax.tree_util.tree_flatten_with_path(sol)
    out_leaves, out_def = jax.tree_util.tree_flatten_with_path(out)
    if sol_def != out_def:
        raise BilevelInputError(
            f"{fn_name} must return a pytree shaped like the solver's output θ*; got\n"
            f"  solver output θ*: {sol_def}\n  {fn_name}(θ*, …): {out_def}\n"
            "(with has_aux=True the solver must return (θ*, aux); check the solver returns "
            "the variable that the optimality function takes first)"
        )
    for (p, s), (_, o) in zip(sol_leaves, out_leaves):
        if s.shape != o.shape or s.dtype != o.dtype:
            raise BilevelInputError(
                f"leaf {_path(p)}: solver output θ* has shape {s.shape} dtype {s.dtype} but "
                f"{fn_name}(θ*, …) has shape {o.shape} dtype {o.dtype}; they must match"
            )


def _nonfinite_message(solve_name: str) -> str:
    return (
        "implicit differentiation: the adjoint solve (∂_θF)ᵀ u = w returned non-finite values "
        f"(linear solver {solve_name!r}), so the hypergradient is NaN/inf. ∂_θF may be singular "
        "or, for 'cg', not definite (F = ∇L at a saddle point or a non-symmetric F). Try "
        "solve='gmres' or 'dense', a small solver_kwargs['damping'], a larger 'maxiter', a "
        "smaller Neumann 'eta', and check that the inner solver converged (F(θ*) ≈ 0)."
    )


def _warn_if_nonfinite(finite: Any, solve_name: str) -> None:
    if not np.all(np.asarray(finite)):
        warnings.warn(_nonfinite_message(solve_name), RuntimeWarning, stacklevel=2)


# --------------------------------------------------------------------------- core


def _implicit_call(
    solver: Callable,
    optimality_fn: Callable,
    fn_name: str,
    linear_solve: Callable,
    solve_kw: dict,
    solve_name: str,
    has_aux: bool,
    check_finite: bool,
    init: PyTree,
    args: tuple,
    kwargs: dict,
):
    leaves, treedef = jax.tree.flatten((init, args, kwargs))
    n_init = len(jax.tree.leaves(init))
    traced = [i for i, x in enumerate(leaves) if _is_traced(x)]
    init_pos = [i for i in traced if i < n_init]
    rest_pos = [i for i in traced if i >= n_init]

    def rebuild(init_vals, rest_vals):
        full = list(leaves)
        for i, v in zip(init_pos, init_vals):
            full[i] = v
        for i, v in zip(rest_pos, rest_vals):
            full[i] = v
        return treedef.unflatten(full)

    def optimality(theta, rest_vals):
        _, a, kw = rebuild([None] * len(init_pos), rest_vals)
        return optimality_fn(theta, *a, **kw)

    aux_box: dict[str, Any] = {}

    def run_solver(init_vals, rest_vals):
        i0, a, kw = rebuild(init_vals, rest_vals)
        out = solver(i0, *a, **kw)
        if has_aux:
            if not (isinstance(out, (tuple, list)) and len(out) == 2):
                raise BilevelInputError(
                    f"with has_aux=True the solver must return a pair (θ*, aux); got "
                    f"{type(out).__name__}"
                    + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else "")
                )
            sol, aux = out
        else:
            sol, aux = out, None
        _check_solution(sol)
        sol = jax.tree.map(jnp.asarray, sol)
        _check_optimality_output(fn_name, sol, jax.eval_shape(optimality, sol, list(rest_vals)))
        aux_leaves, aux_def = jax.tree.flatten(aux)
        aux_dyn = [i for i, x in enumerate(aux_leaves) if _is_traced(x)]
        aux_box.update(leaves=aux_leaves, treedef=aux_def, dyn=aux_dyn)
        return sol, [jnp.asarray(aux_leaves[i]) for i in aux_dyn]

    @jax.custom_vjp
    def implicit(init_vals, rest_vals):
        return run_solver(init_vals, rest_vals)

    def fwd(init_vals, rest_vals):
        sol, aux = run_solver(init_vals, rest_vals)
        return (sol, aux), (sol, rest_vals)

    def bwd(res, cot):
        sol, rest_vals = res
        w = cot[0]
        _, vjp_theta = jax.vjp(lambda th: optimality(th, rest_vals), sol)
        u = linear_solve(lambda v: vjp_theta(v)[0], w, **solve_kw)

        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(u)]))
        if check_finite:
            jax.debug.callback(functools.partial(_warn_if_nonfinite, solve_name=solve_name), finite)
        else:
            try:
                ok = bool(finite)
            except jax.errors.ConcretizationTypeError:  # traced: cannot look at values
                ok = True
            if not ok:
                warnings.warn(_nonfinite_message(solve_name), RuntimeWarning, stacklevel=2)

        diff = [j for j, x in enumerate(rest_vals) if _is_float(x)]

        def f_diff(diff_vals):
            vals = list(rest_vals)
            for j, v in zip(diff, diff_vals):
                vals[j] = v
            return optimality(sol, vals)

        _, vjp_args = jax.vjp(f_diff, [rest_vals[j] for j in diff])
        (grads,) = vjp_args(u)
        rest_cot = [_zero_cotangent(x) for x in rest_vals]
        for j, g in zip(diff, grads):
            rest_cot[j] = -g
        init_cot = [_zero_cotangent(leaves[i]) for i in init_pos]
        return init_cot, rest_cot

    implicit.defvjp(fwd, bwd)
    sol, aux_vals = implicit([leaves[i] for i in init_pos], [leaves[i] for i in rest_pos])
    if not has_aux:
        return sol
    aux_leaves = list(aux_box["leaves"])
    for i, v in zip(aux_box["dyn"], aux_vals):
        aux_leaves[i] = jax.lax.stop_gradient(v) if _is_float(v) else v
    return sol, aux_box["treedef"].unflatten(aux_leaves)


# --------------------------------------------------------------------------- API


def custom_root(
    optimality_fn: Callable,
    *,
    solve: str | Callable = "cg",
    solver_kwargs: dict | None = None,
    has_aux: bool = False,
    check_finite: bool = False,
) -> Callable[[Callable], Callable]:
    r"""Decorate ``solver(init, *args, **kwargs) -> θ*`` with an implicit-function VJP.

    At the solver's output ``F(θ*, *args, **kwargs) = 0`` with ``F = optimality_fn``
    (for ``θ* = argmin_θ L(θ, λ)`` use ``optimality_fn = jax.grad(L)``). Reverse-mode
    derivatives of the decorated solver follow the implicit function theorem
    (Krantz & Parks 2002):

        dθ*/dλ = −(∂_θF)⁻¹ ∂_λF;   for a cotangent w:  (∂_θF)ᵀ u = w,  λ̄ = −(∂_λF)ᵀ u,

    with the adjoint system solved matrix-free by ``solve``. The solver itself is
    never differentiated (it may use ``while_loop``, early exits, …). API idea from
    Blondel et al. 2022 (JAXopt); see the module docstring for argument handling
    (non-array leaves are static, ``init`` gets a zero cotangent), the choice of
    linear solver and the limitations.

    Args:
      optimality_fn: ``F(θ, *args, **kwargs)`` returning a pytree shaped like θ,
        zero at the solution. Must be differentiable in θ and the args.
      solve: a name in :data:`bilevel_jax.linalg.SOLVERS` (``"cg"``, ``"gmres"``,
        ``"bicgstab"``, ``"neumann"``, ``"dense"``) or a callable
        ``solve(matvec, b, *, x0=None, **solver_kwargs)``. ``"cg"`` requires a
        symmetric definite ``∂_θF`` (true for ``F = ∇_θ L`` at a strict minimum);
        use ``"gmres"``/``"bicgstab"``/``"dense"`` for non-symmetric F.
      solver_kwargs: keywords for ``solve`` (``maxiter`` — default
        :data:`DEFAULT_MAXITER` for named solvers —, ``tol``, ``damping``,
        ``eta`` for Neumann, ``restart`` for GMRES). Checked now against the
        solver's signature.
      has_aux: the solver returns ``(θ*, aux)``; ``aux`` is passed through
        unchanged (not differentiable).
      check_finite: also check the adjoint solution for NaN/inf inside
        ``jit``/``vmap`` (via ``jax.debug.callback``) and warn. Eager backward
        passes are always checked.

    Returns:
      A decorator. The decorated solver has the signature of ``solver``.

    Raises:
      ValueError: unknown solver name (the message lists the choices).
      TypeError: ``solver_kwargs`` not accepted by the linear solver.
      BilevelInputError: (at trace time) the solver's output is not a pytree of
        floating arrays, or ``optimality_fn(θ*, …)`` is not shaped like θ*.

    Example::

        inner = lambda th, lam, X, y: jnp.sum((X @ th - y) ** 2) + lam * th @ th

        @custom_root(jax.grad(inner), solve="cg")
        def ridge(init, lam, X, y):
            ...  # any solver, e.g. 500 gradient steps in lax.fori_loop
            return theta

        jax.grad(lambda lam: outer(ridge(th0, lam, X, y)))(0.1)
    """
    return _make_decorator(
        optimality_fn, "optimality_fn", solve, solver_kwargs, has_aux, check_finite
    )


def custom_fixed_point(
    fixed_point_fn: Callable,
    *,
    solve: str | Callable = "gmres",
    solver_kwargs: dict | None = None,
    has_aux: bool = False,
    check_finite: bool = False,
) -> Callable[[Callable], Callable]:
    r"""Decorate a solver of ``θ* = T(θ*, *args, **kwargs)`` with an implicit VJP.

    This is :func:`custom_root` with ``F(θ, λ) = θ − T(θ, λ)`` (the sign of F does
    not change ``dθ*/dλ``; this one makes ``∂_θF = I − ∂_θT``, so Neumann with
    ``eta=1`` is the series ``Σ_j (∂_θTᵀ)^j w``, convergent for a contraction T):

        dθ*/dλ = (I − ∂_θT)⁻¹ ∂_λT.

    The default ``solve="gmres"`` because ``∂_θT`` is non-symmetric in general;
    ``"cg"`` is valid only if ``I − ∂_θT`` is symmetric definite (e.g. the
    gradient-step map ``T = θ − η∇_θL``). Other arguments as in :func:`custom_root`.
    """
    if not callable(fixed_point_fn):
        raise TypeError(f"fixed_point_fn must be callable, got {type(fixed_point_fn).__name__}")

    def optimality_fn(theta, *args, **kwargs):
        t = fixed_point_fn(theta, *args, **kwargs)
        if jax.tree.structure(t) != jax.tree.structure(theta):
            raise BilevelInputError(
                "fixed_point_fn must return a pytree shaped like θ; got\n"
                f"  θ: {jax.tree.structure(theta)}\n  fixed_point_fn(θ, …): {jax.tree.structure(t)}"
            )
        return jax.tree.map(jnp.subtract, theta, t)

    return _make_decorator(
        optimality_fn, "θ − fixed_point_fn(θ)", solve, solver_kwargs, has_aux, check_finite
    )


def _make_decorator(optimality_fn, fn_name, solve, solver_kwargs, has_aux, check_finite):
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    linear_solve, solve_kw = _prepare_linear_solve(solve, solver_kwargs)
    solve_name = solve if isinstance(solve, str) else getattr(solve, "__name__", repr(solve))

    def decorator(solver: Callable) -> Callable:
        if not callable(solver):
            raise TypeError(f"the decorated solver must be callable, got {type(solver).__name__}")

        @functools.wraps(solver)
        def wrapped(init, *args, **kwargs):
            return _implicit_call(
                solver,
                optimality_fn,
                fn_name,
                linear_solve,
                solve_kw,
                solve_name,
                has_aux,
                check_finite,
                init,
                args,
                kwargs,
            )

        wrapped.optimality_fn = optimality_fn  # type: ignore[attr-defined]
        return wrapped

    return decorator
