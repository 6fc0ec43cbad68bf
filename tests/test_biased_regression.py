"""Tests for experiments/biased_regression.py (Choe et al. 2023, appendix E).

The full study runs in a subprocess so that its float64 mode cannot leak into other tests; the
closed-form checks run in-process inside ``jax.enable_x64`` (a context manager that restores the
previous setting).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from experiments import biased_regression as br
from tests._quick import run_study


@pytest.fixture
def x64():
    before = jax.config.read("jax_enable_x64")
    with jax.enable_x64(True):
        yield
    assert jax.config.read("jax_enable_x64") == before


@pytest.fixture(scope="module")
def problem():
    cfg = br.Config()
    data = br.make_data(cfg)
    lam_star = br.solve_lambda_star(data["x"], data["y"], data["xm"], data["ym"], cfg.beta)
    return cfg, data, lam_star


def _arrays(data) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    x, y, xm, ym = (jnp.asarray(data[k], jnp.float64) for k in ("x", "y", "xm", "ym"))
    return x, y, xm, ym


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("br")
    return run_study("experiments.biased_regression", out, "br", data=False)  # synthetic data


def test_acceptance_sama(result):
    r = result["sama"]
    assert r["cos_mean"] >= 0.9, r["cos_mean"]
    assert r["dist_ratio"] < 0.5, r["dist_ratio"]


def test_acceptance_exact_and_cg(result):
    assert result["exact"]["cos_min"] >= 0.9999, result["exact"]["cos_min"]
    cg = br.make_methods(br.Config(), 1.0)["cg"]
    assert cg.solver.keywords["maxiter"] >= result["config"]["d"]
    assert result["cg"]["settings"] == result["config"]["methods"]["cg"] == repr(cg)
    assert result["cg"]["cos_mean"] >= 0.999, result["cg"]["cos_mean"]


def test_result_structure(result):
    cfg = result["config"]
    steps = cfg["meta_steps"]
    assert steps == 100 and cfg["seed"] == 0 and result["quick"] is True
    assert cfg["base_steps"] == cfg["meta_interval"] * steps
    assert result["provenance"]["packages"]["jax"] and result["provenance"]["git_commit"]
    # the settings are the objects' own reprs: the library defaults as they are
    assert "difference='sequential'" in cfg["methods"]["sama"]
    assert set(br.METHODS) == {
        "sama",
        "sama_na",
        "darts",
        "neumann",
        "cg",
        "exact",
        "itd",
        "soba",
        "dds",
    }
    assert set(cfg["methods"]) == set(br.METHODS)
    for key in br.METHODS:
        r = result[key]
        for field in ("cos_mean", "cos_min", "dist_ratio", "time_ratio_vs_sama", "temp_bytes"):
            assert np.isfinite(r[field]), (key, field, r[field])
        assert (
            r["time_ratio_vs_sama"] > 0
            and r["temp_bytes"] >= 0
            and isinstance(r["temp_bytes"], int)
        )
        assert len(r["cos"]) == steps and len(r["dist"]) == steps + 1
        assert r["cos_min"] == pytest.approx(min(r["cos"]))
        assert r["cos_mean"] == pytest.approx(np.mean(r["cos"]))
        assert r["dist_ratio"] == pytest.approx(r["dist"][-1] / r["dist"][0])
        assert np.all(np.isfinite(r["cos"])) and np.all(np.isfinite(r["dist"]))
        assert r["nonfinite_count"] == 0, key
        # Adam consumed exactly the hypergradient whose cosine is reported.
        assert r["chain_grad_relerr_max"] < 1e-10, (key, r["chain_grad_relerr_max"])
        # K SGD steps keep w close to w*(λ).
        assert r["base_track_relerr_max"] < 1e-3
    assert result["sama"]["time_ratio_vs_sama"] == 1.0


def test_step_sizes_are_stable(result):
    # Neumann's η and SOBA's ρ must be below 2/λ_max of the base Hessian 2A/n.
    cfg = result["config"]
    assert 0 < cfg["base_hessian_eig_min"] <= cfg["base_hessian_eig_max"]
    for key in ("neumann_eta", "soba_rho"):
        assert 0 < cfg[key] < 2.0 / cfg["base_hessian_eig_max"], (key, cfg[key])


def test_sama_na_same_direction_under_sgd(result):
    # With SGD the adaptation is lr·I: SAMA and SAMA-NA differ only by the scale of v; DARTS is
    # SAMA-NA with a smaller α, and the central difference is exact for a quadratic L_b.
    a, b = np.asarray(result["sama"]["cos"]), np.asarray(result["sama_na"]["cos"])
    assert np.max(np.abs(a - b)) < 1e-2
    c = np.asarray(result["darts"]["cos"])
    np.testing.assert_allclose(c, b, rtol=0, atol=1e-8)


def test_implicit_methods_match_closed_form_at_w_star(x64, problem):
    # At w = w*(λ) exact, the dense solve and CG are the closed-form meta-gradient.
    cfg, data, _ = problem
    x, y, xm, ym = _arrays(data)
    base_loss, meta_loss = br.make_losses(cfg.beta)
    tx = optax.sgd(cfg.base_lr)
    prob = bj.hypergrad.BilevelProblem(base_loss, meta_loss, tx)
    lam = jnp.asarray(np.random.default_rng(3).standard_normal(cfg.d) * 50.0)
    w = br.closed_form_w(lam, x, y, cfg.beta)
    inputs = bj.hypergrad.BilevelInputs(w, lam, tx.init(w), (x, y), (xm, ym))
    closed = br.closed_form_meta_grad(lam, x, y, xm, ym, cfg.beta)
    for method in (bj.exact(), br.make_methods(cfg, 1.0)["cg"]):
        hg, _ = method.hypergrad(prob, inputs, method.init(w, lam))
        np.testing.assert_allclose(hg.meta_grad, closed, rtol=1e-7, atol=0)


def test_closed_form_meta_grad_matches_autodiff(x64, problem):
    cfg, data, lam_star = problem
    xs = _arrays(data)
    rng = np.random.default_rng(1)
    for lam in (np.zeros(cfg.d), 100.0 * rng.standard_normal(cfg.d), lam_star + 10.0):
        lam = jnp.asarray(lam, jnp.float64)
        auto = jax.grad(br.meta_objective)(lam, *xs, cfg.beta)
        closed = br.closed_form_meta_grad(lam, *xs, cfg.beta)
        assert closed.dtype == jnp.float64
        np.testing.assert_allclose(closed, auto, rtol=1e-8, atol=0)


def test_lambda_star_is_stationary(x64, problem):
    cfg, data, lam_star = problem
    xs = _arrays(data)
    g_star = np.linalg.norm(br.closed_form_meta_grad(jnp.asarray(lam_star), *xs, cfg.beta))
    g_zero = np.linalg.norm(br.closed_form_meta_grad(jnp.zeros(cfg.d, jnp.float64), *xs, cfg.beta))
    assert g_star < 1e-8
    assert g_star < 1e-8 * g_zero
    # w*(λ*) is the least-squares fit of the meta data (λ ↦ w*(λ) is onto).
    w_meta, *_ = np.linalg.lstsq(data["xm"], data["ym"], rcond=None)
    w = br.closed_form_w(jnp.asarray(lam_star), xs[0], xs[1], cfg.beta)
    np.testing.assert_allclose(w, w_meta, rtol=1e-8, atol=1e-10)


def test_sama_is_lr_scaled_meta_gradient_for_sgd(x64, problem):
    # L_b is quadratic in w, so the central difference is exact: SAMA returns
    # (2β·lr/n)·∇_w L_m(w), SAMA-NA (2β/n)·∇_w L_m(w).
    cfg, data, _ = problem
    x, y, xm, ym = _arrays(data)
    base_loss, meta_loss = br.make_losses(cfg.beta)
    tx = optax.sgd(cfg.base_lr)
    lam = jnp.asarray(np.random.default_rng(2).standard_normal(cfg.d) * 50.0)
    w = br.closed_form_w(lam, x, y, cfg.beta)
    d = jax.grad(meta_loss)(w, lam, (xm, ym))
    for adapt, scale in ((True, cfg.base_lr), (False, 1.0)):
        hg = bj.sama_hypergrad(
            base_loss,
            meta_loss,
            base_params=w,
            meta_params=lam,
            base_tx=tx,
            base_opt_state=tx.init(w),
            base_batch=(x, y),
            meta_batch=(xm, ym),
            adapt=adapt,
        ).meta_grad
        np.testing.assert_allclose(hg, 2 * cfg.beta * scale / cfg.n * d, rtol=1e-8, atol=0)
