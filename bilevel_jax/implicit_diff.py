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
``solve`` is a function of :mod:`bilevel_jax.linalg`, optionally with its settings
bound by :func:`functools.partial`, or any callable with the same signature
``solve(matvec, b, *, x0=None, ...) -> x``:

- :func:`~bilevel_jax.linalg.solve_cg` (default of :func:`custom_root`) needs
  ``∂_θF`` symmetric positive (or negative) definite. This holds for ``F = ∇_θ L``
  at a strict local minimum (``∂_θF`` is the Hessian). Do not use it for general F.
- :func:`~bilevel_jax.linalg.solve_gmres` (default of :func:`custom_fixed_point`)
  and :func:`~bilevel_jax.linalg.solve_bicgstab` handle non-symmetric ``∂_θF``
  (general root problems, fixed points of non-gradient maps, saddle points).
- :func:`~bilevel_jax.linalg.solve_neumann` (``x = η Σ_{j≤K} (I − ηA)^j b``) needs
  ``ρ(I − ηA) < 1``; bind ``eta``. For :func:`custom_fixed_point` with a
  contraction T, ``eta=1`` gives the classic series ``Σ_j (∂_θTᵀ)^j w``.
- :func:`~bilevel_jax.linalg.solve_dense` materialises ``∂_θF`` (n matvecs) and
  solves exactly; small θ only.

A :mod:`bilevel_jax.linalg` solver that does not bind ``maxiter`` gets
:data:`DEFAULT_MAXITER` iterations here (``bilevel_jax.linalg`` defaults to 10, too
few for an accurate adjoint); ``custom_root(..., maxiter=n)`` sets it explicitly.
Bound keywords are checked against the solver's signature when the decorator is
built. ``damping=δ`` solves ``(∂_θFᵀ + δI) u = w`` (biased, but stabilises
near-singular systems). The backward pass itself is the pure function
:func:`root_vjp`, usable on its own.

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
  can make ``u`` non-finite. The adjoint is checked in every backward pass, also
  under ``jit``/``vmap``, and handled by ``on_nonfinite`` (the library-wide
  convention of :mod:`bilevel_jax._nonfinite`): ``"warn"`` (default) issues a
  ``RuntimeWarning`` with a hint, ``"raise"`` a ``FloatingPointError``, ``"skip"``
  lets the NaNs propagate silently. The host callback sits on the non-finite
  branch of a ``lax.cond``, so a finite backward pass costs no host round trip.
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
from bilevel_jax._checks import BilevelInputError, callable_repr
from bilevel_jax._nonfinite import OnNonfinite, all_finite, check_mode, report

__all__ = [
    "DEFAULT_MAXITER",
    "custom_root",
    "custom_fixed_point",
    "root_vjp",
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


def _unwrap(solve: Callable) -> tuple[Callable, dict]:
    """The function under (nested) partials and the keywords they bind."""
    kw: dict = {}
    while isinstance(solve, functools.partial):
        kw = {**solve.keywords, **kw}
        solve = solve.func
    return solve, kw


def _parameters(func: Callable) -> dict | None:
    try:
        return dict(inspect.signature(func).parameters)
    except (TypeError, ValueError):  # builtins / C callables: cannot check
        return None


def _linear_solver(
    solve: str | Callable = linalg.solve_cg,
    *,
    maxiter: int | None = None,
    solver_kwargs: dict | None = None,
) -> Callable:
    """The adjoint solver ``solve(matvec, b)`` that :func:`custom_root` will call.

    Binds ``maxiter`` (when given), else :data:`DEFAULT_MAXITER` for a
    :mod:`bilevel_jax.linalg` solver that does not bind one already, and checks the
    bound keywords against the solver's signature now (not at the first backward pass).
    A string ``solve`` and ``solver_kwargs`` are the deprecated spellings.

    Raises:
      ValueError: unknown solver name (the message lists the choices).
      TypeError: ``solve`` is not callable, or a keyword the solver does not accept.

    Example:
      >>> _linear_solver(linalg.solve_cg).keywords
      {'maxiter': 100}
      >>> _linear_solver(functools.partial(linalg.solve_gmres, maxiter=30)).keywords
      {'maxiter': 30}
    """
    if isinstance(solve, str):
        warnings.warn(
            f"custom_root/custom_fixed_point(solve={solve!r}) is deprecated; pass the solver "
            f"itself, e.g. solve=bilevel_jax.linalg.{linalg.get_solver(solve).__name__} "
            "(with settings bound by functools.partial)",
            DeprecationWarning,
            stacklevel=4,
        )
        solve = linalg.get_solver(solve)  # ValueError listing the choices
    if not callable(solve):
        raise TypeError(f"solve must be a callable linear solver, got {type(solve).__name__}")
    kwargs = dict(solver_kwargs or {})
    if solver_kwargs is not None:
        warnings.warn(
            "solver_kwargs is deprecated; bind the settings to the solver instead, e.g. "
            "solve=functools.partial(bilevel_jax.linalg.solve_cg, maxiter=100, tol=1e-8)",
            DeprecationWarning,
            stacklevel=4,
        )
    func, bound = _unwrap(solve)
    params = _parameters(func)
    if maxiter is not None:
        kwargs["maxiter"] = maxiter
    elif (
        any(func is f for f in linalg.SOLVERS.values())
        and "maxiter" in (params or {})
        and "maxiter" not in {**bound, **kwargs}
    ):
        kwargs["maxiter"] = DEFAULT_MAXITER
    if params is not None and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = {
            n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        } - {"matvec", "b"}
        unknown = sorted((set(bound) | set(kwargs)) - accepted)
        if unknown:
            raise TypeError(
                f"linear solver {callable_repr(func)!r} does not accept the keywords "
                f"{unknown}; it accepts {sorted(accepted)}"
            )
    return functools.partial(solve, **kwargs) if kwargs else solve


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


_NONFINITE_HINT = (
    "The hypergradient is NaN/inf. ∂_θF may be singular or, for CG, not definite (F = ∇L at "
    "a saddle point or a non-symmetric F). Try solve=linalg.solve_gmres or linalg.solve_dense, "
    "a small damping, a larger maxiter, a smaller Neumann eta, and check that the inner solver "
    "converged (F(θ*) ≈ 0)."
)


# --------------------------------------------------------------------------- core

_DEFAULT_ADJOINT_SOLVE = functools.partial(linalg.solve_cg, maxiter=DEFAULT_MAXITER)


def root_vjp(
    optimality_fn: Callable,
    solution: PyTree,
    args: tuple,
    cotangent: PyTree,
    *,
    solve: Callable = _DEFAULT_ADJOINT_SOLVE,
    on_nonfinite: OnNonfinite = "warn",
) -> tuple:
    r"""The VJP ``(dθ*/d args)ᵀ w`` of a root ``θ*`` of ``F(θ, *args) = 0`` (pure, jit-able).

    Solves the adjoint system ``(∂_θF)ᵀ u = w`` with ``solve`` (matrix-free: the matvec is
    ``jax.vjp`` of F in θ at ``solution``) and returns ``−(∂_argsF)ᵀ u``, one ``jax.vjp`` of F
    in the args. This is the backward pass of :func:`custom_root`.

    Args:
      optimality_fn: ``F(θ, *args)``, a pytree shaped like θ, zero at the solution.
      solution: ``θ*``, a pytree of floating arrays (``F(θ*, *args) ≈ 0``).
      args: the tuple of F's other arguments (pytrees).
      cotangent: w, the cotangent of ``θ*`` (shaped like it).
      solve: the linear solver ``solve(matvec, b) -> x`` (see the module docstring; default
        ``partial(linalg.solve_cg, maxiter=DEFAULT_MAXITER)``).
      on_nonfinite: what to do when u holds NaN/inf: ``"warn"`` (default),
        ``"raise"`` or ``"skip"`` (works under ``jit``; see :mod:`bilevel_jax._nonfinite`).

    Returns:
      A tuple like ``args``: ``−(∂_argsF)ᵀ u`` for floating leaves; integer and bool leaves
      get ``float0`` zeros (symbolic zero cotangents, as ``jax.custom_vjp`` requires).

    Example (``F(θ, a) = θ − a²`` has the root ``θ* = a²``, so ``dθ*/da = 2a``):
      >>> import jax.numpy as jnp
      >>> F = lambda th, a: th - a**2
      >>> a = jnp.array([1.0, 3.0])
      >>> (ga,) = root_vjp(F, a**2, (a,), jnp.ones(2), solve=linalg.solve_dense)
      >>> print(ga)
      [2. 6.]
    """
    args = tuple(args)
    _, vjp_theta = jax.vjp(lambda th: optimality_fn(th, *args), solution)
    u = solve(lambda v: vjp_theta(v)[0], cotangent)
    report(
        all_finite(u),
        check_mode(on_nonfinite, "root_vjp"),
        where=f"implicit differentiation ({callable_repr(solve)}): the adjoint solution u of "
        "(∂_θF)ᵀ u = w",
        tree=u,
        hint=_NONFINITE_HINT,
    )
    leaves, treedef = jax.tree.flatten(args)
    diff = [i for i, x in enumerate(leaves) if _is_float(x)]

    def f_diff(diff_vals):
        vals = list(leaves)
        for i, v in zip(diff, diff_vals):
            vals[i] = v
        return optimality_fn(solution, *treedef.unflatten(vals))

    _, vjp_args = jax.vjp(f_diff, [leaves[i] for i in diff])
    (grads,) = vjp_args(u)
    cot = [_zero_cotangent(x) for x in leaves]
    for i, g in zip(diff, grads):
        cot[i] = jax.tree.map(jnp.negative, g)
    return treedef.unflatten(cot)


def _split_aux(out: Any, has_aux: bool) -> tuple[PyTree, Any]:
    if not has_aux:
        return out, None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        length = f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""
        raise BilevelInputError(
            f"with has_aux=True the solver must return a pair (θ*, aux); got "
            f"{type(out).__name__}{length}"
        )
    return out[0], out[1]


def _implicit_call(
    solver: Callable,
    optimality_fn: Callable,
    fn_name: str,
    vjp_options: dict,
    has_aux: bool,
    init: PyTree,
    args: tuple,
    kwargs: dict,
):
    """``solver(init, *args, **kwargs)`` under a ``jax.custom_vjp`` whose backward is :func:`root_vjp`.

    The traced leaves of ``(init, args, kwargs)`` are the custom_vjp's inputs, the static
    ones are closed over; ``init`` gets zero cotangents.
    """
    leaves, treedef = jax.tree.flatten((init, args, kwargs))
    n_init = len(jax.tree.leaves(init))
    traced = [i for i, x in enumerate(leaves) if _is_traced(x)]
    init_pos = [i for i in traced if i < n_init]
    rest_pos = [i for i in traced if i >= n_init]

    def rebuild(init_vals, rest_vals):
        full = list(leaves)
        for i, v in zip(init_pos + rest_pos, [*init_vals, *rest_vals]):
            full[i] = v
        return treedef.unflatten(full)

    def optimality(theta, rest_vals):
        _, a, kw = rebuild([None] * len(init_pos), rest_vals)
        return optimality_fn(theta, *a, **kw)

    aux_box: dict[str, Any] = {}

    def run_solver(init_vals, rest_vals):
        i0, a, kw = rebuild(init_vals, rest_vals)
        sol, aux = _split_aux(solver(i0, *a, **kw), has_aux)
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
        (rest_cot,) = root_vjp(optimality, sol, (list(rest_vals),), cot[0], **vjp_options)
        return [_zero_cotangent(leaves[i]) for i in init_pos], rest_cot

    implicit.defvjp(fwd, bwd)
    sol, aux_vals = implicit([leaves[i] for i in init_pos], [leaves[i] for i in rest_pos])
    if not has_aux:
        return sol
    aux_leaves = list(aux_box["leaves"])
    for i, v in zip(aux_box["dyn"], aux_vals):
        aux_leaves[i] = jax.lax.stop_gradient(v) if _is_float(v) else v
    return sol, aux_box["treedef"].unflatten(aux_leaves)


# --------------------------------------------------------------------------- API


_SOLVE_DOC = """
      solve: the linear solver for the adjoint system (1), a callable
        ``solve(matvec, b, *, x0=None, ...)`` such as :func:`bilevel_jax.linalg.solve_cg` or
        ``functools.partial(linalg.solve_gmres, maxiter=50, tol=1e-8)`` (see the module
        docstring for which one fits). A bare :mod:`bilevel_jax.linalg` solver gets
        ``maxiter=`` :data:`DEFAULT_MAXITER`. A name (``"cg"``…) is the deprecated spelling.
      maxiter: iterations of the adjoint solve; overrides the one bound to ``solve``.
      has_aux: the solver returns ``(θ*, aux)``; ``aux`` is passed through unchanged (not
        differentiable).
      on_nonfinite: what happens when the adjoint solution is NaN/inf: ``"warn"`` (default;
        a ``RuntimeWarning``, also under ``jit``/``vmap``), ``"raise"`` (``FloatingPointError``)
        or ``"skip"`` (NaNs propagate silently). The hypergradient is returned either way.
      solver_kwargs: deprecated; bind the keywords to ``solve`` with ``functools.partial``.
      check_finite: deprecated; ``True`` is ``on_nonfinite="warn"``, ``False`` is ``"skip"``.
"""


def custom_root(
    optimality_fn: Callable,
    *,
    solve: Callable | str = linalg.solve_cg,
    maxiter: int | None = None,
    has_aux: bool = False,
    on_nonfinite: OnNonfinite = "warn",
    solver_kwargs: dict | None = None,
    check_finite: bool | None = None,
) -> Callable[[Callable], Callable]:
    r"""Decorate ``solver(init, *args, **kwargs) -> θ*`` with an implicit-function VJP.

    At the solver's output ``F(θ*, *args, **kwargs) = 0`` with ``F = optimality_fn``
    (for ``θ* = argmin_θ L(θ, λ)`` use ``optimality_fn = jax.grad(L)``). Reverse-mode
    derivatives of the decorated solver follow the implicit function theorem
    (Krantz & Parks 2002):

        dθ*/dλ = −(∂_θF)⁻¹ ∂_λF;   for a cotangent w:  (∂_θF)ᵀ u = w,  λ̄ = −(∂_λF)ᵀ u,

    computed by :func:`root_vjp` with the adjoint system solved matrix-free by ``solve``.
    The solver itself is never differentiated (it may use ``while_loop``, early exits, …).
    API idea from Blondel et al. 2022 (JAXopt); see the module docstring for argument
    handling (non-array leaves are static, ``init`` gets a zero cotangent), the choice of
    linear solver and the limitations.

    Args:
      optimality_fn: ``F(θ, *args, **kwargs)`` returning a pytree shaped like θ,
        zero at the solution. Must be differentiable in θ and the args.{solve_doc}
    Returns:
      A decorator. The decorated solver has the signature of ``solver``.

    Raises:
      TypeError: ``solve`` is not callable or is given keywords it does not accept.
      ValueError: unknown (deprecated) solver name or ``on_nonfinite`` value.
      BilevelInputError: (at trace time) the solver's output is not a pytree of
        floating arrays, or ``optimality_fn(θ*, …)`` is not shaped like θ*.

    Example (ridge regression ``θ*(λ) = argmin ‖Xθ − y‖² + λ‖θ‖²`` by gradient descent;
    the implicit gradient matches the closed form ``−2 θ*ᵀ (XᵀX + λI)⁻¹ θ*`` of ``‖θ*‖²``):

      >>> import jax.numpy as jnp
      >>> X, y = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]), jnp.array([1.0, 2.0, 0.5])
      >>> inner = lambda th, lam: jnp.sum((X @ th - y) ** 2) + lam * th @ th
      >>> @custom_root(jax.grad(inner), solve=linalg.solve_cg)
      ... def ridge(init, lam):
      ...     step = lambda _, th: th - 0.05 * jax.grad(inner)(th, lam)
      ...     return jax.lax.fori_loop(0, 500, step, init)
      >>> g = jax.grad(lambda lam: jnp.sum(ridge(jnp.zeros(2), lam) ** 2))(0.5)
      >>> A = X.T @ X + 0.5 * jnp.eye(2)
      >>> th = jnp.linalg.solve(A, X.T @ y)
      >>> print(round(float(g), 4), round(float(-2 * th @ jnp.linalg.solve(A, th)), 4))
      -0.8988 -0.8988
    """
    mode = _nonfinite_mode(on_nonfinite, check_finite, "custom_root")
    return _make_decorator(
        optimality_fn, "optimality_fn", solve, maxiter, solver_kwargs, has_aux, mode
    )


def custom_fixed_point(
    fixed_point_fn: Callable,
    *,
    solve: Callable | str = linalg.solve_gmres,
    maxiter: int | None = None,
    has_aux: bool = False,
    on_nonfinite: OnNonfinite = "warn",
    solver_kwargs: dict | None = None,
    check_finite: bool | None = None,
) -> Callable[[Callable], Callable]:
    r"""Decorate a solver of ``θ* = T(θ*, *args, **kwargs)`` with an implicit VJP.

    This is :func:`custom_root` with ``F(θ, λ) = θ − T(θ, λ)`` (the sign of F does
    not change ``dθ*/dλ``; this one makes ``∂_θF = I − ∂_θT``, so Neumann with
    ``eta=1`` is the series ``Σ_j (∂_θTᵀ)^j w``, convergent for a contraction T):

        dθ*/dλ = (I − ∂_θT)⁻¹ ∂_λT.

    The default ``solve=linalg.solve_gmres`` because ``∂_θT`` is non-symmetric in general;
    CG is valid only if ``I − ∂_θT`` is symmetric definite (e.g. the gradient-step map
    ``T = θ − η∇_θL``).

    Args:
      fixed_point_fn: ``T(θ, *args, **kwargs)``, a pytree shaped like θ.{solve_doc}
    Example (``θ = λ tanh θ + 1`` has ``dθ*/dλ = tanh θ* / (1 − λ sech²θ*)``):
      >>> import jax.numpy as jnp
      >>> T = lambda th, lam: lam * jnp.tanh(th) + 1.0
      >>> @custom_fixed_point(T)
      ... def fixed_point(init, lam):
      ...     return jax.lax.fori_loop(0, 100, lambda _, th: T(th, lam), init)
      >>> lam = jnp.asarray(0.5)
      >>> th = fixed_point(jnp.zeros(()), lam)
      >>> g = jax.grad(fixed_point, argnums=1)(jnp.zeros(()), lam)
      >>> print(round(float(g), 4), round(float(jnp.tanh(th) / (1 - lam / jnp.cosh(th) ** 2)), 4))
      0.9939 0.9939
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

    mode = _nonfinite_mode(on_nonfinite, check_finite, "custom_fixed_point")
    return _make_decorator(
        optimality_fn, "θ − fixed_point_fn(θ)", solve, maxiter, solver_kwargs, has_aux, mode
    )


custom_root.__doc__ = (custom_root.__doc__ or "").replace("{solve_doc}", _SOLVE_DOC)
custom_fixed_point.__doc__ = (custom_fixed_point.__doc__ or "").replace("{solve_doc}", _SOLVE_DOC)


def _nonfinite_mode(on_nonfinite: str, check_finite: bool | None, where: str) -> str:
    if check_finite is None:
        return check_mode(on_nonfinite, where)
    mode = "warn" if check_finite else "skip"
    warnings.warn(
        f"{where}(check_finite=...) is deprecated; use on_nonfinite={mode!r} "
        "(on_nonfinite='warn' | 'raise' | 'skip')",
        DeprecationWarning,
        stacklevel=3,
    )
    return mode


def _make_decorator(optimality_fn, fn_name, solve, maxiter, solver_kwargs, has_aux, mode):
    if not callable(optimality_fn):
        raise TypeError(f"optimality_fn must be callable, got {type(optimality_fn).__name__}")
    vjp_options = {
        "solve": _linear_solver(solve, maxiter=maxiter, solver_kwargs=solver_kwargs),
        "on_nonfinite": mode,
    }

    def decorator(solver: Callable) -> Callable:
        if not callable(solver):
            raise TypeError(f"the decorated solver must be callable, got {type(solver).__name__}")

        @functools.wraps(solver)
        def wrapped(init, *args, **kwargs):
            return _implicit_call(
                solver, optimality_fn, fn_name, vjp_options, has_aux, init, args, kwargs
            )

        wrapped.optimality_fn = optimality_fn  # type: ignore[attr-defined]
        return wrapped

    return decorator
