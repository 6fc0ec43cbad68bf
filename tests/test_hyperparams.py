"""Optimizer hyperparameters as meta parameters (``itd``/``dds(hyperparams=...)``).

Oracles: the closed form of SGD on a quadratic (float64, 1e-10), and ``jax.grad`` through a
hand-written loop of the same optimizer (momentum, weight decay, Adam-W).
"""

from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj

N, K = 4, 5


def _quadratic(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(N, N))
    a = q @ q.T / N + 0.5 * np.eye(N)  # SPD, eigenvalues ~ 0.5 … 3
    return a, rng.normal(size=N), rng.normal(size=N), rng.normal(size=N)  # A, b, θ0, c


def _problem(a, b, c, tx):
    a, b, c = map(jnp.asarray, (a, b, c))

    def base_loss(th, lam, batch):  # ½θᵀAθ − bᵀθ; λ enters through the optimizer only
        del lam, batch
        return 0.5 * th @ a @ th - b @ th

    def meta_loss(th, lam, batch):
        del lam, batch
        return jnp.sum((th - c) ** 2)

    return bj.BilevelProblem(base_loss, meta_loss, tx)


def _hypergrad(method, problem, theta0, lam):
    theta0 = jnp.asarray(theta0)
    inputs = bj.BilevelInputs(theta0, lam, problem.base_tx.init(theta0), None, None)
    hg, _ = jax.jit(lambda i: method.hypergrad(problem, i, method.init(theta0, lam)))(inputs)
    return hg


def _closed_form(a, b, theta0, c, eta, k):
    """θ_K = θ* + (I − ηA)^K (θ0 − θ*); d‖θ_K − c‖²/dη = 2(θ_K − c)ᵀ(−K A (I − ηA)^{K−1} e0)."""
    star = np.linalg.solve(a, b)
    m = np.eye(N) - eta * a
    e0 = theta0 - star
    theta_k = star + np.linalg.matrix_power(m, k) @ e0
    dtheta = -k * a @ np.linalg.matrix_power(m, k - 1) @ e0
    return np.sum((theta_k - c) ** 2), 2 * (theta_k - c) @ dtheta


@pytest.mark.parametrize("k", [1, K])
def test_itd_learning_rate_matches_closed_form(x64, k):
    a, b, theta0, c = _quadratic()
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    eta = 0.3
    hg = _hypergrad(
        bj.itd(k, hyperparams={"learning_rate": "lr"}),
        _problem(a, b, c, tx),
        theta0,
        {"lr": jnp.asarray(eta)},
    )
    value, grad = _closed_form(a, b, theta0, c, eta, k)
    assert hg.meta_grad["lr"].dtype == jnp.float64
    np.testing.assert_allclose(float(hg.meta_loss), value, rtol=1e-12)
    np.testing.assert_allclose(float(hg.meta_grad["lr"]), grad, rtol=1e-10)


def test_dds_learning_rate_matches_closed_form(x64):
    a, b, theta0, c = _quadratic(1)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    eta = 0.2
    hg = _hypergrad(
        bj.dds(hyperparams={"learning_rate": "lr"}),
        _problem(a, b, c, tx),
        theta0,
        {"lr": jnp.asarray(eta)},
    )
    _, grad = _closed_form(a, b, theta0, c, eta, 1)
    np.testing.assert_allclose(float(hg.meta_grad["lr"]), grad, rtol=1e-10)


def test_function_of_lambda_follows_the_chain_rule(x64):
    """``{"learning_rate": lambda lam: exp(lam["log_lr"])}``: d/d log η = η · d/dη."""
    a, b, theta0, c = _quadratic(2)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    eta = 0.25
    method = bj.itd(K, hyperparams={"learning_rate": lambda lam: jnp.exp(lam["log_lr"])})
    hg = _hypergrad(method, _problem(a, b, c, tx), theta0, {"log_lr": jnp.log(eta)})
    _, grad = _closed_form(a, b, theta0, c, eta, K)
    np.testing.assert_allclose(float(hg.meta_grad["log_lr"]), eta * grad, rtol=1e-10)


def _loop_grad(a, b, c, theta0, lam, step, k):
    """jax.grad through ``k`` hand-written optimizer steps ``(θ, m) ← step(θ, m, g, λ)``."""
    a, b, c = map(jnp.asarray, (a, b, c))

    def meta(lam):
        th, m = jnp.asarray(theta0), jnp.zeros(N)
        for _ in range(k):
            th, m = step(th, m, a @ th - b, lam)
        return jnp.sum((th - c) ** 2)

    return jax.grad(meta)(lam)


def test_momentum_and_learning_rate_match_grad_through_the_loop(x64):
    a, b, theta0, c = _quadratic(3)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.5)
    lam = {"lr": jnp.asarray(0.15), "beta": jnp.asarray(0.7)}

    def heavy_ball(th, m, g, lam):  # optax.sgd(momentum=β): m ← g + βm, θ ← θ − ηm
        m = g + lam["beta"] * m
        return th - lam["lr"] * m, m

    method = bj.itd(K, hyperparams={"learning_rate": "lr", "momentum": "beta"})
    hg = _hypergrad(method, _problem(a, b, c, tx), theta0, lam)
    want = _loop_grad(a, b, c, theta0, lam, heavy_ball, K)
    for key in lam:
        np.testing.assert_allclose(float(hg.meta_grad[key]), float(want[key]), rtol=1e-10)


def test_weight_decay_matches_grad_through_the_loop(x64):
    a, b, theta0, c = _quadratic(4)

    def sgd_with_decay(learning_rate, weight_decay):
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(learning_rate))

    tx = optax.inject_hyperparams(sgd_with_decay)(learning_rate=0.1, weight_decay=0.0)
    lam = {"wd": jnp.asarray(0.3)}

    def step(th, m, g, lam):
        return th - 0.1 * (g + lam["wd"] * th), m

    hg = _hypergrad(
        bj.itd(K, hyperparams={"weight_decay": "wd"}), _problem(a, b, c, tx), theta0, lam
    )
    want = _loop_grad(a, b, c, theta0, lam, step, K)
    np.testing.assert_allclose(float(hg.meta_grad["wd"]), float(want["wd"]), rtol=1e-10)


def test_adamw_weight_decay_matches_grad_through_optax(x64):
    """Adam-W's decay learned by DDS and ITD equals jax.grad through optax.adamw itself."""
    a, b, theta0, c = _quadratic(5)
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=0.05, eps_root=1e-8, weight_decay=0.0)
    problem = _problem(a, b, c, tx)
    lam = {"wd": jnp.asarray(0.2)}

    def through_optax(wd, k):
        ref = optax.adamw(learning_rate=0.05, eps_root=1e-8, weight_decay=wd)
        th = jnp.asarray(theta0)
        s = ref.init(th)
        for _ in range(k):
            upd, s = ref.update(jax.grad(problem.base_loss)(th, None, None), s, th)
            th = optax.apply_updates(th, upd)
        return problem.meta_loss(th, None, None)

    for method in (
        bj.dds(hyperparams={"weight_decay": "wd"}),
        bj.itd(3, hyperparams={"weight_decay": "wd"}),
    ):
        hg = _hypergrad(method, problem, theta0, lam)
        want = jax.grad(through_optax)(lam["wd"], method.unroll)
        np.testing.assert_allclose(float(hg.meta_grad["wd"]), float(want), rtol=1e-10)


def test_truncated_itd_differentiates_only_the_last_steps(x64):
    """truncate=T: the first K − T steps use λ's value but are not differentiated."""
    a, b, theta0, c = _quadratic(6)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    eta, t = 0.2, 2
    method = bj.itd(K, truncate=t, hyperparams={"learning_rate": "lr"})
    hg = _hypergrad(method, _problem(a, b, c, tx), theta0, {"lr": jnp.asarray(eta)})
    # θ after K − T undifferentiated steps, then the closed form of the last T from there
    star = np.linalg.solve(a, b)
    mid = star + np.linalg.matrix_power(np.eye(N) - eta * a, K - t) @ (theta0 - star)
    _, grad = _closed_form(a, b, mid, c, eta, t)
    np.testing.assert_allclose(float(hg.meta_grad["lr"]), grad, rtol=1e-10)


def test_bilevel_step_trains_theta_with_the_learned_rate(x64):
    """The base steps of bilevel_step use λ's learning rate, not the one given to optax."""
    a, b, theta0, c = _quadratic(7)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.01)
    problem = _problem(a, b, c, tx)
    eta = 0.3
    step = bj.bilevel_step(
        problem.base_loss,
        problem.meta_loss,
        tx,
        optax.sgd(1.0),
        bj.itd(2, hyperparams={"learning_rate": "lr"}),
    )
    state = step.init(jnp.asarray(theta0), {"lr": jnp.asarray(eta)})
    state, _ = jax.jit(step)(state, jnp.zeros((3, 1)), jnp.zeros(1))
    star = np.linalg.solve(a, b)
    m = np.eye(N) - eta * a
    theta3 = star + np.linalg.matrix_power(m, 3) @ (theta0 - star)
    np.testing.assert_allclose(np.asarray(state.base_params), theta3, rtol=1e-12)
    _, grad = _closed_form(a, b, theta3, c, eta, 2)  # ITD(2) from θ_3, then λ ← λ − 1.0 · h
    np.testing.assert_allclose(float(state.meta_params["lr"]), eta - grad, rtol=1e-10)


def test_meta_grad_transform_takes_hyperparams(x64):
    a, b, theta0, c = _quadratic(8)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    problem = _problem(a, b, c, tx)
    method = bj.itd(K, hyperparams={"learning_rate": "lr"})
    mg = bj.meta_grad(problem.base_loss, problem.meta_loss, tx, method)
    lam = {"lr": jnp.asarray(0.3)}
    theta = jnp.asarray(theta0)
    upd, _ = mg.update(
        {"lr": jnp.zeros(())},
        mg.init(lam),
        lam,
        base_params=theta,
        base_opt_state=tx.init(theta),
        base_batch=jnp.zeros(1),
        meta_batch=jnp.zeros(1),
    )
    _, grad = _closed_form(a, b, theta0, c, 0.3, K)
    np.testing.assert_allclose(float(cast(dict, upd)["lr"]), grad, rtol=1e-10)


def test_set_hyperparams_inside_a_chain():
    tx = optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
    s = bj.set_hyperparams(tx.init(jnp.zeros(2)), {"learning_rate": 0.5})
    upd, _ = tx.update(jnp.ones(2), s)
    np.testing.assert_allclose(np.asarray(upd), [-0.5, -0.5])
    assert (
        cast(tuple, s)[1].hyperparams["learning_rate"].dtype == jnp.float32
    )  # the stored dtype is kept


def test_repr_names_hyperparams_and_keeps_the_old_form():
    assert repr(bj.itd(3)) == (
        "Unrolled(unroll=3, truncate=None, stacked=False, remat=False, lr=None, name='itd')"
    )
    m = bj.dds(hyperparams={"learning_rate": "lr"})
    assert repr(m).endswith("name='dds', hyperparams={'learning_rate': 'lr'})")
    assert m == bj.dds(hyperparams={"learning_rate": "lr"}) and hash(m) == hash(
        bj.dds(hyperparams={"learning_rate": "lr"})
    )
    assert m != bj.dds()


@pytest.mark.parametrize(
    "tx, hyperparams, lam, match",
    [
        (optax.sgd(0.1), {"learning_rate": "lr"}, {"lr": 0.1}, "no optax.inject_hyperparams"),
        (
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            {"momentum": "m"},
            {"m": 0.1},
            "no inject_hyperparams state has a hyperparameter 'momentum'",
        ),
        (
            optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 9)),
            {"learning_rate": "lr"},
            {"lr": 0.1},
            "driven by a schedule",
        ),
        (
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            {"learning_rate": "lr"},
            {"eta": 0.1},
            r"reads 'learning_rate' from meta_params\['lr'\], but λ has the keys \['eta'\]",
        ),
        (
            optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
            {"learning_rate": "lr"},
            {"lr": jnp.ones(2)},
            r"has shape \(\) in the optimizer state, got a value of shape \(2,\)",
        ),
    ],
)
def test_errors_name_the_problem(tx, hyperparams, lam, match):
    problem = _problem(np.eye(N), np.ones(N), np.zeros(N), tx)
    theta = jnp.zeros(N)
    inputs = bj.BilevelInputs(theta, lam, tx.init(theta), None, None)
    method = bj.itd(2, hyperparams=hyperparams)
    with pytest.raises(ValueError, match=match):
        method.hypergrad(problem, inputs, method.init(theta, lam))


def test_lr_and_hyperparams_together_are_refused():
    with pytest.raises(ValueError, match="lr=0.1 replaces the base optimizer by plain SGD"):
        bj.dds(0.1, hyperparams={"learning_rate": "lr"})
    with pytest.raises(TypeError, match="hyperparams must be a mapping"):
        bj.itd(2, hyperparams=["learning_rate"])  # type: ignore[arg-type]
