"""Tests for experiments/weight_decay.py (per-parameter weight decay on real digits).

The study itself runs in a subprocess with ``--quick``; the loss and hypergradient checks run
in-process (float64 ones inside the ``x64`` fixture, which restores the previous setting).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax.hypergrad.base import mixed_product
from experiments import weight_decay as wd
from tests._quick import run_study


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_study("experiments.weight_decay", tmp_path_factory.mktemp("wd"), "wd")


def test_every_method_present_and_finite(result):
    cfg = result["config"]
    assert result["quick"] is True
    for m in wd.METHODS:
        r = result[m]
        assert len(r["val_loss"]) == len(r["wall_s"]) == cfg["meta_steps"] + 1
        assert np.all(np.isfinite(r["val_loss"])) and np.all(np.isfinite(r["wall_s"]))
        assert np.all(np.diff(r["wall_s"]) > 0)
        for k in ("final_val_loss", "test_acc", "test_loss", "step_ms_median"):
            assert math.isfinite(r[k]), (m, k)
        assert r["final_val_loss"] == r["val_loss"][-1]
        assert 0.5 < r["test_acc"] <= 1.0
        assert r["step_ms_median"] > 0
        assert r["nonfinite_count"] == 0
        assert isinstance(r["settings"], str) and r["settings"]
        # every method starts from the same warm-up point
        assert r["val_loss"][0] == result["sama"]["val_loss"][0]
    assert set(result["baselines"]) >= {"no_tuning", "best_shared", "shared_grid"}
    assert len(result["baselines"]["shared_grid"]) == cfg["grid_n"]
    assert result["data"]["source"]["name"] == "sklearn_digits"
    assert result["data"]["source"]["sha256"]
    assert [f["name"] for f in result["provenance"]["data_files"]] == ["sklearn_digits"]
    methods = wd.make_methods(wd.Config())
    assert all(result[m]["settings"] == repr(methods[m]) for m in wd.METHODS)
    assert cfg["optimizers"]["base"] == "optax.adam(0.05, eps_root=1e-08)"
    assert cfg["base_steps"] == cfg["warmup_steps"] + cfg["meta_interval"] * cfg["meta_steps"]


def test_implicit_methods_beat_no_tuning(result):
    base = result["baselines"]["no_tuning"]["val_loss"]
    for m in ("exact", "cg"):
        assert result[m]["final_val_loss"] < base - 0.01, (m, result[m]["final_val_loss"], base)
    # the best shared decay is the best grid point, and the grid contains λ₀
    grid = result["baselines"]["shared_grid"]
    assert result["baselines"]["best_shared"]["val_loss"] == min(r["val_loss"] for r in grid)
    assert result["baselines"]["best_shared"]["val_loss"] <= base


def test_first_hypergradients_agree_where_theory_says(result):
    # CG (20 iterations on a 65x65 system) ≈ the dense solve; SOBA's first z is −ρd, so its first
    # hypergradient is parallel to SAMA-NA's.
    assert result["cg"]["cos_to_exact_at_start"] > 0.999
    assert result["soba"]["cos_to_exact_at_start"] == pytest.approx(
        result["sama_na"]["cos_to_exact_at_start"], abs=1e-4
    )


def _point(seed=0, d=64):
    rng = np.random.default_rng(seed)
    theta = {"w": jnp.asarray(rng.standard_normal(d)), "b": jnp.asarray(0.3)}
    lam = jnp.asarray(rng.normal(-3.0, 1.0, d))
    x = jnp.asarray(rng.uniform(0, 1, (50, d)))
    y = jnp.asarray((rng.uniform(size=50) < 0.5).astype(np.float64))
    return theta, lam, (x, y)


def test_base_loss_gradients_match_hand_formulas(x64):
    theta, lam, (x, y) = _point()
    g_lam = jax.grad(wd.base_loss, argnums=1)(theta, lam, (x, y))
    np.testing.assert_allclose(g_lam, np.exp(lam) * theta["w"] ** 2, rtol=1e-12)
    g_th = jax.grad(wd.base_loss)(theta, lam, (x, y))
    r = jax.nn.sigmoid(x @ theta["w"] + theta["b"]) - y
    np.testing.assert_allclose(g_th["w"], x.T @ r / 50 + 2 * np.exp(lam) * theta["w"], rtol=1e-10)
    np.testing.assert_allclose(g_th["b"], np.mean(r), rtol=1e-10)
    # the mixed second derivative used by every hypergradient: (∂²L_b/∂λ∂θ) p = 2 exp(λ) w p
    p = {"w": jnp.asarray(np.random.default_rng(1).standard_normal(64)), "b": jnp.asarray(1.0)}
    # None where mixed_product reads nothing: the optimizer state, the meta batch, the base tx
    inputs = bj.BilevelInputs(theta, lam, None, (x, y), None)  # pyright: ignore[reportArgumentType]
    mp = mixed_product(bj.BilevelProblem(wd.base_loss, wd.meta_loss, None), inputs, p)  # pyright: ignore[reportArgumentType]
    np.testing.assert_allclose(mp, 2 * np.exp(lam) * theta["w"] * p["w"], rtol=1e-12)
    # the meta loss ignores λ
    assert float(jnp.abs(jax.grad(wd.meta_loss, argnums=1)(theta, lam, (x, y))).max()) == 0.0


def test_exact_hypergradient_matches_finite_differences_on_digits(x64):
    """bj.exact at θ*(λ) vs a central difference of λ ↦ L_m(θ*(λ)), θ* by Newton, float64."""
    cfg = wd.Config()
    b = wd.load_task(cfg)["batches"]
    train, val = (
        jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), b[k]) for k in ("train", "val")
    )
    flat0 = jnp.zeros(65)

    def unflat(v):
        return {"w": v[:64], "b": v[64]}

    @jax.jit
    def solve(lam):
        f = lambda v: wd.base_loss(unflat(v), lam, train)  # noqa: E731

        def newton(v, _):
            return v - jnp.linalg.solve(jax.hessian(f)(v), jax.grad(f)(v)), None

        return unflat(jax.lax.scan(newton, flat0, None, length=30)[0])

    lam = jnp.asarray(np.random.default_rng(0).normal(math.log(1e-3), 1.0, 64))
    theta = solve(lam)
    assert float(jnp.linalg.norm(jax.grad(wd.base_loss)(theta, lam, train)["w"])) < 1e-10
    tx = wd.make_base_tx(cfg)
    problem = bj.BilevelProblem(wd.base_loss, wd.meta_loss, tx)
    inputs = bj.BilevelInputs(theta, lam, tx.init(theta), train, val)
    hg, _ = bj.exact().hypergrad(problem, inputs, bj.exact().init(theta, lam))
    u = jnp.asarray(np.random.default_rng(1).standard_normal(64))
    h = 1e-4
    fd = (
        wd.meta_loss(solve(lam + h * u), None, val)  # pyright: ignore[reportArgumentType]  (meta_loss ignores λ)
        - wd.meta_loss(solve(lam - h * u), None, val)  # pyright: ignore[reportArgumentType]
    ) / (2 * h)
    assert float(hg.meta_grad @ u) == pytest.approx(float(fd), rel=1e-5)
