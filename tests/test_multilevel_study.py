"""Tests for experiments/multilevel.py: the conflicting sub-domain, the weight AUC against
scikit-learn and a pair count, and the --quick run (every method and seed recorded)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from experiments import multilevel as ml
from experiments.models import split
from tests._quick import run_study


def test_conflicting_domain_relabels_an_exact_fraction_per_class_by_the_fixed_rule():
    y = np.repeat(np.arange(10), 37).astype(np.int32)
    labels, mask = ml.conflicting_domain(y, 0.4, seed=3)
    assert labels.dtype == y.dtype and mask.dtype == bool
    for c in range(10):
        assert mask[y == c].sum() == round(0.4 * 37)
    np.testing.assert_array_equal(labels[mask], (y[mask] + 1) % 10)
    np.testing.assert_array_equal(labels[~mask], y[~mask])
    again, mask2 = ml.conflicting_domain(y, 0.4, seed=3)
    np.testing.assert_array_equal(mask, mask2)
    assert not np.array_equal(mask, ml.conflicting_domain(y, 0.4, seed=4)[1])
    with pytest.raises(ValueError):
        ml.conflicting_domain(y, 1.5, seed=0)


@pytest.mark.parametrize("ties", [False, True])
def test_weight_auc_matches_sklearn_and_a_pair_count(ties):
    rng = np.random.default_rng(0)
    pos = rng.random(60) < 0.4
    w = rng.normal(size=60) + pos
    if ties:
        w = np.round(w)  # many ties: they count one half
    got = ml.weight_auc(w, pos)
    assert math.isclose(got, roc_auc_score(pos, w), rel_tol=1e-12)
    pairs = [
        1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(w[pos], w[~pos])
    ]
    assert math.isclose(got, float(np.mean(pairs)), rel_tol=1e-12)
    assert ml.weight_auc(np.where(pos, 2.0, 1.0), pos) == 1.0
    with pytest.raises(ValueError):
        ml.weight_auc(w, np.ones(60, bool))


@pytest.mark.parametrize("weighting", ["logits", "net"])
def test_every_weight_starts_at_one(weighting):
    """At its start the reweighting level leaves pretraining uniform (w = 2σ(0) = 1)."""
    study = ml.Study(ml.Config(weighting=weighting))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((6, 784), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, 6), jnp.int32)
    i = jnp.arange(6)
    lam = study.init_weighting(9, seed=0)
    w = 2.0 * jax.nn.sigmoid(study.weight_logits(lam, x, y, i))
    np.testing.assert_array_equal(w, np.ones(6, np.float32))
    theta = split(study.model(0))[1]
    weighted = study.pretrain_weighted(theta, {"reweight": lam}, (x, y, i))
    assert math.isclose(float(weighted), float(study.pretrain_plain(theta, {}, (x, y))))


def test_quick_mode(tmp_path):
    r = run_study("experiments.multilevel", tmp_path, "multilevel", "--no-progress", timeout=240)
    cfg = r["config"]
    assert cfg["seeds"] == [0] and cfg["methods"] == list(ml.METHODS)
    assert cfg["reweight_steps"] == ml.QUICK["reweight_steps"]
    assert cfg["edge_methods"]["sama"] == repr(ml.edge_methods(ml.Config())["sama"])
    assert r["data"]["sha256"] and r["data"]["path"].endswith("mnist_5k.csv.gz")
    for m in ml.METHODS:
        e = r[m]
        assert e["seeds"] == [0] and len(e["acc"]) == 1 and e["std"] == 0.0
        assert 0.0 <= e["mean"] <= 1.0
        assert math.isfinite(e["time_ratio"]) and e["time_ratio"] > 0
        assert math.isfinite(e["compile_s"]) and e["compile_s"] >= 0
        if m in ml.TRILEVEL:
            assert len(e["auc"]["values"]) == 1 and 0.0 <= e["auc"]["mean"] <= 1.0
            assert all(math.isfinite(v) for v in r["diagnostics"]["val_loss_curve_seed0"][m])
        else:
            assert "auc" not in e
    assert math.isclose(r["two_level"]["time_ratio"], 1.0)
    assert r["gain_over_two_level"]["two_level"]["mean"] == 0.0
    rec = r["per_seed_records"]
    assert [x["seed"] for x in rec] == [0] and set(f"{m}/acc" for m in ml.METHODS) <= set(rec[0])
