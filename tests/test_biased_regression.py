"""Tests for experiments/biased_regression.py (Choe et al. 2023, appendix E).

The full study runs in a subprocess so that its float64 mode cannot leak into other tests; the
closed-form checks run in-process inside ``jax.enable_x64`` (a context manager that restores the
previous setting).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from experiments import biased_regression as br

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def x64():
    before = jax.config.jax_enable_x64
    with jax.enable_x64(True):
        yield
    assert jax.config.jax_enable_x64 == before


@pytest.fixture(scope="module")
def problem():
    cfg = br.Config()
    data = br.make_data(cfg)
    lam_star = br.solve_lambda_star(data["x"], data["y"], data["xm"], data["ym"], cfg.beta)
    return cfg, data, lam_star


def _arrays(data):
    return [jnp.asarray(data[k], jnp.float64) for k in ("x", "y", "xm", "ym")]


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("biased_regression")
    path = out / "br.json"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.biased_regression", "--json", str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (out / "br.png").stat().st_size > 0
    with open(path) as f:
        return json.load(f)


def test_acceptance_sama(result):
    r = result["sama"]
    assert r["cos_mean"] >= 0.9, r["cos_mean"]
    assert r["dist_ratio"] < 0.5, r["dist_ratio"]


def test_result_structure(result):
    steps = result["config"]["meta_steps"]
    assert steps == 100 and result["config"]["seed"] == 0
    for key in ("sama", "sama_na"):
        r = result[key]
        assert len(r["cos"]) == steps and len(r["dist"]) == steps + 1
        assert r["cos_min"] == pytest.approx(min(r["cos"]))
        assert r["dist_ratio"] == pytest.approx(r["dist"][-1] / r["dist"][0])
        assert np.all(np.isfinite(r["cos"])) and r["nonfinite_count"] == 0
        # Adam consumed exactly the hypergradient whose cosine is reported.
        assert r["chain_grad_relerr_max"] < 1e-10
        # K SGD steps keep w close to w*(λ).
        assert r["base_track_relerr_max"] < 1e-3


def test_sama_na_same_direction_under_sgd(result):
    # With SGD the adaptation is lr·I: SAMA and SAMA-NA differ only by the scale of v.
    a, b = np.asarray(result["sama"]["cos"]), np.asarray(result["sama_na"]["cos"])
    assert np.max(np.abs(a - b)) < 1e-2


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
