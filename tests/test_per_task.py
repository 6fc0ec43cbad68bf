"""Per-task hypergradients by ``jax.vmap`` over tasks (docs/per_task.md).

Oracles: a Python loop over the tasks (every method), and the closed-form iMAML gradient
``μ (A_t + μI)⁻¹ (θ_t* − c_t)`` of a proximal quadratic inner problem (float64).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

T, N, MU = 5, 3, 0.5


def _tasks(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(T, N, N))
    a = jnp.asarray(q @ q.transpose(0, 2, 1) / N + 0.1 * np.eye(N))
    b, c = jnp.asarray(rng.normal(size=(T, N))), jnp.asarray(rng.normal(size=(T, N)))
    return a, b, c, jnp.asarray(rng.normal(size=N))


def base_loss(th, lam, task):  # ℓ_t(θ) + (μ/2)‖θ − λ‖²
    a, b = task
    return 0.5 * th @ a @ th - b @ th + 0.5 * MU * jnp.sum((th - lam) ** 2)


def meta_loss(th, lam, c):
    return 0.5 * jnp.sum((th - c) ** 2)


def _solve(a, r):
    return jax.vmap(lambda at, rt: jnp.linalg.solve(at + MU * jnp.eye(N), rt))(a, r)


def _per_task(method, tx, lam, thetas, a, b, c):
    problem = bj.BilevelProblem(base_loss, meta_loss, tx)

    def one(th, task, ct):
        inputs = bj.BilevelInputs(th, lam, tx.init(th), task, ct)
        return method.hypergrad(problem, inputs, method.init(th, lam))[0].meta_grad

    vmapped = jax.jit(jax.vmap(one))(thetas, (a, b), c)
    looped = jnp.stack([jax.jit(one)(thetas[t], (a[t], b[t]), c[t]) for t in range(T)])
    return vmapped, looped


@pytest.mark.parametrize("method", [bj.exact(), bj.cg(20), bj.neumann(400, 0.5)])
def test_vmapped_imaml_gradient_matches_closed_form(x64, method):
    a, b, c, lam = _tasks()
    star = _solve(a, b + MU * lam)  # θ_t* = (A_t + μI)⁻¹ (b_t + μλ)
    want = MU * _solve(a, star - c)
    got, looped = _per_task(method, optax.sgd(0.1), lam, star, a, b, c)
    assert got.shape == (T, N) and got.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(np.asarray(got), np.asarray(looped), rtol=1e-12, atol=1e-14)
    # the total derivative of the mean test loss through the closed-form inner solution
    mean_loss = lambda lam: jnp.mean(  # noqa: E731
        jax.vmap(meta_loss, in_axes=(0, None, 0))(_solve(a, b + MU * lam), lam, c)
    )
    np.testing.assert_allclose(
        np.asarray(got.mean(0)), np.asarray(jax.grad(mean_loss)(lam)), rtol=1e-12
    )


@pytest.mark.parametrize(
    "method",
    [bj.sama(0.1), bj.sama_na(0.1), bj.darts(), bj.itd(3), bj.dds(), bj.soba(0.1)],
    ids=lambda m: m.name,
)
def test_vmapped_per_task_hypergradients_equal_a_loop(x64, method):
    a, b, c, lam = _tasks(1)
    thetas = jnp.asarray(np.random.default_rng(2).normal(size=(T, N)))  # off the optimum
    got, looped = _per_task(method, optax.adam(0.1, eps_root=1e-8), lam, thetas, a, b, c)
    assert bool(jnp.all(jnp.isfinite(got))) and float(jnp.max(jnp.abs(got))) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(looped), rtol=1e-12, atol=1e-14)


def test_vmapped_meta_grad_update_matches_closed_form(x64):
    """The optax form, vmapped with the default on_nonfinite='raise' (docs/per_task.md)."""
    a, b, c, lam = _tasks(3)
    star = _solve(a, b + MU * lam)
    tx = optax.sgd(0.1)
    mg = bj.meta_grad(base_loss, meta_loss, tx, bj.cg(20))

    def update(th, task, ct):
        return mg.update(
            jnp.zeros_like(lam),
            mg.init(lam),
            lam,
            base_params=th,
            base_opt_state=tx.init(th),
            base_batch=task,
            meta_batch=ct,
        )

    got, states = jax.jit(jax.vmap(update))(star, (a, b), c)
    np.testing.assert_allclose(
        np.asarray(got), np.asarray(MU * _solve(a, star - c)), rtol=1e-12, atol=1e-13
    )
    assert states.count.shape == (T,) and int(jnp.sum(states.nonfinite_count)) == 0


def test_per_task_method_state_is_mapped_too(x64):
    """soba keeps a θ-shaped state: one per task, initialised under vmap, equals the loop."""
    a, b, c, lam = _tasks(4)
    thetas = _solve(a, b + MU * lam)
    tx, method = optax.sgd(0.1), bj.soba(0.2)
    problem = bj.BilevelProblem(base_loss, meta_loss, tx)
    states = jax.vmap(lambda th: method.init(th, lam))(thetas)

    def one(th, st, task, ct):
        return method.hypergrad(problem, bj.BilevelInputs(th, lam, tx.init(th), task, ct), st)

    (hg, new), looped = jax.vmap(one)(thetas, states, (a, b), c), []
    for t in range(T):
        st = jax.tree.map(lambda x, t=t: x[t], states)
        looped.append(one(thetas[t], st, (a[t], b[t]), c[t]))
    np.testing.assert_allclose(
        np.asarray(hg.meta_grad),
        np.stack([np.asarray(h.meta_grad) for h, _ in looped]),
        rtol=1e-12,
        atol=1e-14,
    )
    assert jax.tree.leaves(new)[0].shape[0] == T
