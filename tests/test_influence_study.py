"""Tests for experiments/influence.py: the weighted training against the library's base step,
retraining in padded chunks against one-by-one training, and the --quick run."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import harness
from experiments import influence as study
from tests._quick import run_study


@pytest.fixture(scope="module")
def problem():
    cfg = dataclasses.replace(study.QUICK, sizes=(784, 8, 10), train_limit=96, epochs=3)
    return study.make_problem(cfg, 0, data_lib.load_mnist5k())


def test_unit_weights_train_like_the_library_base_step(problem):
    """w = 1 is plain training: the same θ as ``harness.plain_segment`` (``bj.base_step`` on
    the mean loss of each batch) over the same batch order; and w = c·1 is the same run."""
    train = jax.jit(study.make_train(problem))
    ones = jnp.ones(problem.n)
    got = train(ones)
    tx = problem.cfg.optimizer()()
    seg = harness.plain_segment(lambda p, b: study.per_example_loss(p, b).mean(), tx)
    want, _, _ = seg(problem.init, tx.init(problem.init), problem.idx, problem.x, problem.y)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    scaled = train(3.0 * ones)  # the loss is normalised by mean(w)
    for a, b in zip(jax.tree.leaves(scaled), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # a zero weight removes an example: a different model
    drop = train(ones.at[problem.idx[0, 0]].set(0.0))
    assert not np.allclose(drop["layers"][0]["kernel"], got["layers"][0]["kernel"])


def test_chunked_retraining_equals_one_by_one(problem):
    """``retrain`` pads the last chunk: its rows equal separate trainings of each mask."""
    masks = np.asarray(bj.influence.subset_masks(jax.random.key(1), problem.n, 3, 0.5), np.float32)
    prob = dataclasses.replace(problem, cfg=dataclasses.replace(problem.cfg, retrain_chunk=2))

    def evaluate(th):
        return -study.per_example_loss(th, (prob.qx, prob.qy))

    got = study.retrain(prob, masks, evaluate)
    train = jax.jit(study.make_train(prob))
    want = np.stack([np.asarray(evaluate(train(jnp.asarray(m)))) for m in masks])
    assert got.shape == (3, prob.qx.shape[0])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_quick_run(tmp_path):
    r = run_study("experiments.influence", tmp_path, "influence", "--no-progress")
    cfg = r["config"]
    assert cfg["seeds"] == [0] and cfg["optimizer"] == (
        "optax.chain(optax.add_decayed_weights(0.001), optax.sgd(0.03, momentum=0.9))"
    )
    methods = {"ekfac", "kfac", "grad_dot", "trak", "repsim"} | {
        f"logra_{kind}_{k}" for kind in ("pca", "random") for k in cfg["ks"]
    }
    assert set(r["lds"]) == methods
    assert set(r["lds_cg_queries"]) == methods | {"exact"}
    for table in (r["lds"], r["lds_cg_queries"]):
        for m, s in table.items():
            assert -1.0 <= s["mean"] <= 1.0, m
    for m, c in r["cost"].items():
        assert c["peak_bytes"] > 0 and c["flops"] > 0 and c["run_s"] > 0, m
    seed0 = r["per_seed"][0]
    assert 0.0 <= seed0["test_acc"] <= 1.0 and seed0["n_train"] == 600
    flipped = seed0["brittleness"]["flipped"]
    assert set(flipped) == set(cfg["brittle_methods"]) | {"random"}
    assert all(0.0 <= v <= 1.0 for per_k in flipped.values() for v in per_k.values())
    assert {(c["a"], c["b"]) for c in r["ordering"]} >= {
        ("ekfac", "logra_pca_4"),
        ("exact", "ekfac"),
    }
    assert (tmp_path / "influence.top.png").stat().st_size > 0
