"""Every deprecated spelling still works, gives the new spelling's result, and names the new one."""

import functools
import importlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import linalg
from bilevel_jax.adaptation import adapt, exact_adapt
from bilevel_jax.hypergrad import Implicit
from bilevel_jax.implicit_diff import custom_fixed_point, custom_root


def _problem():
    loss = lambda th, lam, batch: jnp.sum((th - lam) ** 2) + jnp.sum(th**4)  # noqa: E731
    tx = optax.adam(0.1)
    th, lam = jnp.full(3, 0.5), jnp.ones(3)
    g = jax.grad(loss)(th, lam, None)
    return bj.BilevelProblem(loss, loss, tx), bj.BilevelInputs(th, lam, tx.init(th), None, None), g


def _hg(method):
    problem, inputs, _ = _problem()
    return method.hypergrad(problem, inputs, method.init(inputs.base_params, inputs.meta_params))[0]


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("factory", [bj.sama, bj.sama_na])
def test_base_step_keyword(factory):
    with pytest.warns(DeprecationWarning, match="use step_along_v"):
        old = factory(0.5, base_step=True)
    new = factory(0.5, step_along_v=True)
    assert old == new and old.step_along_v
    a, b = _hg(old), _hg(new)
    assert jnp.array_equal(a.meta_grad, b.meta_grad) and jnp.array_equal(
        a.base_update, b.base_update
    )


def test_base_step_attribute():
    with pytest.warns(DeprecationWarning, match="use step_along_v"):
        assert bj.sama(step_along_v=True).base_step is True


@pytest.mark.parametrize(
    "old, new, kw",
    [
        (bj.neumann, bj.neumann, {"eta": 0.05}),
        (bj.cg, bj.cg, {"warm_start": True}),
    ],
)
def test_k_keyword(old, new, kw):
    name = new.__name__
    with pytest.warns(DeprecationWarning, match=rf"use {name}\(maxiter=\.\.\.\)"):
        m_old = old(k=7, **kw)
    m_new = new(maxiter=7, **kw)
    assert m_old == m_new and repr(m_old) == repr(m_new)
    assert jnp.array_equal(_hg(m_old).meta_grad, _hg(m_new).meta_grad)
    with pytest.raises(TypeError, match="both maxiter and the deprecated k"):
        old(3, k=7)


@pytest.mark.parametrize(
    "old_kw, new_solver",
    [
        ({"solve": "cg", "maxiter": 4}, functools.partial(linalg.solve_cg, damping=0.0, maxiter=4)),
        (
            {"solve": "neumann", "maxiter": 6, "eta": 0.05, "damping": 0.1},
            functools.partial(linalg.solve_neumann, damping=0.1, maxiter=6, eta=0.05),
        ),
        ({"solve": "dense"}, functools.partial(linalg.solve_dense, damping=0.0)),
        (
            {"solve": "gmres", "maxiter": 3},
            functools.partial(linalg.solve_gmres, damping=0.0, maxiter=3),
        ),
    ],
)
def test_implicit_solver_by_name(old_kw, new_solver):
    with pytest.warns(DeprecationWarning, match=r"Implicit\(solver=functools.partial"):
        old = Implicit(**old_kw, name="m")
    new = Implicit(solver=new_solver, name="m")
    assert old == new
    assert jnp.array_equal(_hg(old).meta_grad, _hg(new).meta_grad)
    with pytest.raises(TypeError, match="either solver"):
        Implicit(solver=new_solver, solve="cg")


# --------------------------------------------------------------------------- adaptation


def test_adapt_exact_keyword_and_exact_adapt():
    problem, inputs, g = _problem()
    kw = {"grads": g, "state": inputs.base_opt_state, "params": inputs.base_params}
    d = jnp.array([1.0, -2.0, 0.5])
    vjp = adapt(problem.base_tx, d, **kw, rule="vjp")
    closed = adapt(problem.base_tx, d, **kw)
    with pytest.warns(DeprecationWarning, match="use adapt\\(rule='vjp'\\)"):
        assert jnp.array_equal(adapt(problem.base_tx, d, **kw, exact=True), vjp)
    with pytest.warns(DeprecationWarning, match="rule='closed_form'"):
        assert jnp.array_equal(adapt(problem.base_tx, d, **kw, exact=False), closed)
    with pytest.warns(DeprecationWarning, match="exact_adapt is deprecated; use adapt"):
        assert jnp.array_equal(exact_adapt(problem.base_tx, d, **kw), vjp)


# --------------------------------------------------------------------------- implicit_diff


def _ridge_grad(**decorator_kw):
    X = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    y = jnp.array([1.0, 2.0, 0.5])
    inner = lambda th, lam: jnp.sum((X @ th - y) ** 2) + lam * th @ th  # noqa: E731

    @custom_root(jax.grad(inner), **decorator_kw)
    def ridge(init, lam):
        return jax.lax.fori_loop(0, 300, lambda _, th: th - 0.05 * jax.grad(inner)(th, lam), init)

    return jax.grad(lambda lam: jnp.sum(ridge(jnp.zeros(2), lam) ** 2))(jnp.asarray(0.5))


@pytest.mark.parametrize(
    "old_kw, new_kw",
    [
        ({"solve": "cg"}, {"solve": linalg.solve_cg}),
        ({"solve": "gmres"}, {"solve": linalg.solve_gmres}),
        ({"solve": "dense"}, {"solve": linalg.solve_dense}),
        (
            {"solve": "neumann", "solver_kwargs": {"eta": 0.05, "maxiter": 300}},
            {"solve": functools.partial(linalg.solve_neumann, eta=0.05, maxiter=300)},
        ),
        (
            {"solver_kwargs": {"tol": 1e-7}},
            {"solve": functools.partial(linalg.solve_cg, tol=1e-7)},
        ),
    ],
)
def test_custom_root_solver_name_and_solver_kwargs(old_kw, new_kw):
    match = "is deprecated; pass the solver itself|solver_kwargs is deprecated; bind"
    with pytest.warns(DeprecationWarning, match=match):
        old = _ridge_grad(**old_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        new = _ridge_grad(**new_kw)
    assert jnp.array_equal(old, new)


def test_custom_root_old_solver_kwargs_check_names_the_keyword():
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match=r"\['eta'\]"):
        custom_root(lambda th: th, solve="cg", solver_kwargs={"eta": 0.1})


def test_custom_fixed_point_solver_name():
    T = lambda th, lam: lam * jnp.tanh(th) + 1.0  # noqa: E731

    def grad(**kw):
        solver = custom_fixed_point(T, **kw)(
            lambda init, lam: jax.lax.fori_loop(0, 100, lambda _, th: T(th, lam), init)
        )
        return jax.grad(solver, argnums=1)(jnp.zeros(()), jnp.asarray(0.5))

    with pytest.warns(DeprecationWarning, match="solve=bilevel_jax.linalg.solve_bicgstab"):
        old = grad(solve="bicgstab")
    assert jnp.array_equal(old, grad(solve=linalg.solve_bicgstab))


def _singular(**kw):
    f = custom_root(lambda th, lam: (th - lam) ** 3, solve=linalg.solve_dense, **kw)(
        lambda init, lam: lam
    )
    return jax.jit(jax.grad(lambda l: jnp.sum(f(jnp.zeros(3), l))))


def test_check_finite_keyword():
    with pytest.warns(DeprecationWarning, match="use on_nonfinite='warn'"):
        old_true = _singular(check_finite=True)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        g_old = old_true(jnp.ones(3))
        jax.effects_barrier()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        g_new = _singular(on_nonfinite="warn")(jnp.ones(3))
        jax.effects_barrier()
    np.testing.assert_array_equal(g_old, g_new)

    with pytest.warns(DeprecationWarning, match="use on_nonfinite='skip'"):
        old_false = _singular(check_finite=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        np.testing.assert_array_equal(old_false(jnp.ones(3)), g_new)
        jax.effects_barrier()


# --------------------------------------------------------------------------- names


def test_nnx_utils_alias_module():
    sys.modules.pop("bilevel_jax.nnx_utils", None)
    with pytest.warns(DeprecationWarning, match="use bilevel_jax.nnx"):
        mod = importlib.import_module("bilevel_jax.nnx_utils")
    assert mod.split_params is bj.nnx.split_params
    assert mod.merge is bj.nnx.merge and mod.apply is bj.nnx.apply
    if "nnx_utils" in bj.__dict__:  # the import set the package attribute
        delattr(bj, "nnx_utils")
    with pytest.warns(DeprecationWarning, match=r"use bilevel_jax.nnx \(bj.nnx\)"):
        assert bj.nnx_utils.apply is bj.nnx.apply  # the attribute spelling warns too
