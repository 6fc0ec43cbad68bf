"""Tests for experiments/noisy_labels.py: the CNN, the label corrector, the data split, and --quick."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import harness
from experiments import noisy_labels as nl
from experiments.models import CNN, ReweightLosses
from tests._quick import run_quick


def _corrector_params(seed=0, scale=1.0):
    """Corrector parameters with a random (non-zero) output layer."""
    corr = jax.tree.map(lambda a: a, nl.init_params("mlp", nl.Config(), seed)[2])
    corr["fc2"]["kernel"] = scale * jax.random.normal(
        jax.random.key(seed), corr["fc2"]["kernel"].shape
    )
    corr["fc2"]["bias"] = scale * jax.random.normal(
        jax.random.key(seed + 1), corr["fc2"]["bias"].shape
    )
    return corr


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.random((n, 784), dtype=np.float32)),
        jnp.asarray(rng.integers(0, 10, n), jnp.int32),
    )


@pytest.mark.parametrize("scale", [0.0, 1.0, 30.0])
def test_corrector_output_is_a_distribution(scale):
    losses = nl.make_losses("mlp", nl.Config())
    theta = nl.init_params("mlp", nl.Config(), 1)[0]
    corr = _corrector_params(1, scale)
    x, y = _batch()
    soft = np.asarray(losses.soft_labels(theta, corr, x, y), np.float64)
    assert soft.shape == (16, 10)
    assert np.all(soft >= 0) and np.all(np.isfinite(soft))
    np.testing.assert_allclose(soft.sum(1), 1.0, rtol=1e-5)


def test_corrector_starts_near_the_noisy_label():
    cfg = nl.Config()
    losses = nl.make_losses("mlp", cfg)
    theta, _, corr = nl.init_params("mlp", cfg, 0)
    x, y = _batch()
    soft = losses.soft_labels(theta, corr, x, y)
    expected = jax.nn.softmax(cfg.corrector_prior * jax.nn.one_hot(y, 10), -1)  # zero output layer
    np.testing.assert_allclose(soft, expected, rtol=1e-5, atol=1e-7)
    assert float(jnp.min(jnp.take_along_axis(soft, y[:, None], 1))) > 0.97


def test_correct_loss_with_hard_labels_equals_the_reweighting_loss():
    cfg = nl.Config()
    losses = nl.make_losses("mlp", cfg)
    theta, mwn, corr = nl.init_params("mlp", cfg, 2)
    mwn = jax.tree.map(lambda a: a, mwn)
    mwn["fc2"]["kernel"] = jax.random.normal(
        jax.random.key(3), mwn["fc2"]["kernel"].shape
    )  # non-flat weights
    corr = jax.tree.map(lambda a: a, corr)
    corr["prior"] = jnp.float32(200.0)  # softmax(200·onehot) == onehot in float32
    x, y = _batch(seed=3)
    reweight = ReweightLosses(losses.model_def, losses.mwn_def, "sum")
    lam = {"mwn": mwn, "corr": corr}
    np.testing.assert_allclose(
        losses.base(theta, lam, (x, y)), reweight.base(theta, mwn, (x, y)), rtol=1e-6
    )
    g1 = jax.grad(losses.base)(theta, lam, (x, y))
    g2 = jax.grad(reweight.base)(theta, mwn, (x, y))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # the corrector is trainable through the loss (its hypergradient is not identically zero)
    corr_soft = dict(corr, prior=jnp.float32(2.0))
    g_corr = jax.grad(lambda c: losses.base(theta, {"mwn": mwn, "corr": c}, (x, y)))(corr_soft)
    assert float(jnp.abs(g_corr["prior"])) > 0


def _reference_cnn(params, x):
    """The CNN written with lax convolutions and reduce_window pooling (the oracle)."""
    n = x.shape[0]
    h = x.reshape(n, 28, 28, 1)
    k1 = params["conv1"]["kernel"].reshape(4, 4, 1, 16)  # patch features were (row, col)
    h = jax.lax.conv_general_dilated(
        h, k1, (4, 4), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h + params["conv1"]["bias"])
    k2 = params["conv2"]["kernel"].reshape(3, 3, 16, 32)
    h = jax.lax.conv_general_dilated(
        h, k2, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(h + params["conv2"]["bias"])
    h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return h.reshape(n, -1) @ params["fc"]["kernel"] + params["fc"]["bias"]


def test_cnn_equals_lax_convolutions():
    model = CNN(rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.split(model)[1])
    x, _ = _batch(5, seed=4)
    np.testing.assert_allclose(model(x), _reference_cnn(params, x), rtol=1e-4, atol=1e-5)
    assert model(x).shape == (5, 10)


@pytest.mark.parametrize("setting", list(nl.SETTINGS))
def test_noisy_split(setting):
    kind, rate, _ = nl.SETTINGS[setting]
    ds = data_lib.load_mnist5k()
    cfg = nl.Config()
    d = nl.noisy_split(ds, kind, rate, cfg, seed=5)
    splits = data_lib.stratified_split(ds.y, {"meta": 10, "test": 100}, 5)
    y_clean = ds.y[splits["train"]]
    assert len(d["y_tr"]) == 3900 and len(d["y_me"]) == 100 and len(d["y_te"]) == 1000
    np.testing.assert_array_equal(
        d["y_me"], ds.y[splits["meta"]]
    )  # the meta and test sets are clean
    np.testing.assert_array_equal(d["y_te"], ds.y[splits["test"]])
    changed = np.asarray(d["y_tr"]) != y_clean
    np.testing.assert_array_equal(changed, d["flipped"])
    assert changed.sum() == round(rate * 3900)
    if kind == "pairflip":
        np.testing.assert_array_equal(np.asarray(d["y_tr"])[changed], (y_clean[changed] + 1) % 10)


def test_summarize():
    s = harness.summarize([0.5, 0.7, 0.9], [0, 1, 2])
    assert s["seeds"] == [0, 1, 2] and s["acc"] == [0.5, 0.7, 0.9]
    assert math.isclose(s["mean"], 0.7) and math.isclose(s["std"], np.std([0.5, 0.7, 0.9]))


def test_methods_are_the_documented_ones():
    m = nl.HYPERGRAD
    sama, sama_na, darts = m["sama"], m["sama_na"], m["darts"]
    assert isinstance(sama, bj.SAMA) and isinstance(sama_na, bj.SAMA) and isinstance(darts, bj.SAMA)
    assert sama.adapt and sama.adapt_from == "last" and not sama_na.adapt
    assert darts.alpha == 0.01 and sama.alpha == sama_na.alpha == 0.1
    assert m["sama_correct"] == m["sama"]
    assert {m[name].name for name in nl.REWEIGHT_METHODS} == set(nl.REWEIGHT_METHODS)
    assert set(m) == set(nl.METHODS) - set(nl.BASELINES)


# The command line runs one MLP setting with every method and the SGD ablation; the other MLP
# settings run the same programs on other labels (each setting compiles its own programs). The
# CNN setting runs in the test process with a first-order, a second-order and the correcting
# method (the CNN's other methods are the MLP's programs on another model; all eleven doubled the
# test's time: 142 s of the suite's 2-worker run).
QUICK_SETTING = "sym_0.4"
CNN_METHODS = ("plain", "sama", "cg", "sama_correct")


def _check_cells(entry: dict, methods) -> None:
    """One seed's cells of a setting: accuracies, timings, no skipped steps."""
    assert set(entry) == set(methods)
    for m in methods:
        cell = entry[m]
        assert cell["seeds"] == [0] and len(cell["acc"]) == 1, m
        assert 0.0 <= cell["mean"] <= 1.0 and cell["std"] == 0.0 and cell["acc"][0] == cell["mean"]
        assert math.isfinite(cell["time_ratio_vs_plain"]) and cell["time_ratio_vs_plain"] > 0, m
        for rec in cell["per_seed"]:
            assert rec.get("nonfinite_meta_steps", 0) == 0, m
            assert rec.get("nonfinite_base_steps", 0) == 0, m
    assert entry["plain"]["time_ratio_vs_plain"] == 1.0
    assert entry["plain"]["mean"] > 0.3  # 100 Adam steps learn something
    sc = entry["sama_correct"]["per_seed"][0]
    assert 0.0 < sc["soft_label_mass_on_noisy_label"] <= 1.0


def test_quick_mode(tmp_path):
    # timeout: a hang guard; ~27 s alone, ~90 s on 2 cores beside the docs build (scripts/test.sh)
    r, lines = run_quick(
        "experiments.noisy_labels", tmp_path, "nl", "--settings", QUICK_SETTING, timeout=600
    )
    assert [s for s in nl.SETTINGS if s in r] == [QUICK_SETTING]
    assert r["config"]["base_steps"] == 100 and r["config"]["meta_steps"] == 10
    assert r["config"]["hypergrad"]["cg"] == repr(nl.HYPERGRAD["cg"])
    assert r["config"]["optimizers"]["base_itd"] == "optax.adam(0.001, eps_root=1e-08)"
    _check_cells(r[QUICK_SETTING], nl.METHODS)
    abl = r["ablation_sgd"]
    for m in ("plain", "sama", "sama_na"):
        assert 0.0 <= abl[m]["mean"] <= 1.0 and math.isfinite(abl[m]["time_ratio_vs_plain"])
    # SGD: SAMA's hypergradient is 0.1 × SAMA-NA's and the meta optimizer is Adam, so the learned
    # MWN parameters nearly coincide (Adam's eps breaks exact scale invariance)
    assert max(abl["final_mwn_relative_difference"]) < 1e-2
    sc = r["weights_vs_loss"][QUICK_SETTING]
    assert len(sc["clean"]["loss"]) == len(sc["clean"]["weight"]) > 0
    assert all(0.0 <= w <= 1.0 for w in sc["noisy"]["weight"])
    assert len(lines) == len(nl.METHODS) * nl.Config.segments
    rec = json.loads(lines[0])
    assert set(rec) >= {"setting", "method", "seed", "base_steps", "test_acc"}


def test_cnn_setting_trains_with_first_and_second_order_methods():
    curves: list[dict] = []
    r = nl.run(
        [0], 100, ["sym_0.4_cnn"], CNN_METHODS, ablation=False, progress=False, curves=curves
    )
    assert "ablation_sgd" not in r
    _check_cells(r["sym_0.4_cnn"], CNN_METHODS)
    assert len(curves) == len(CNN_METHODS) * nl.Config.segments
    assert {c["setting"] for c in curves} == {"sym_0.4_cnn"}
