"""Tests for experiments/pruning.py: pruning scores against direct computations, the stateful
(loss, uncertainty) Meta-Weight-Net losses, and the --quick run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from experiments import pruning as pr
from experiments.models import MLP, split
from tests._quick import run_quick


def _small_problem(n=7, seed=0):
    model = MLP((784, 16, 10), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    params = nnx.to_pure_dict(params)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((n, 784), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)

    def loss_i(theta, xi, yi):
        logits = nnx.merge(graphdef, theta)(xi[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

    return graphdef, params, x, y, loss_i


def test_el2n_against_a_direct_formula():
    logits = jax.random.normal(jax.random.key(0), (9, 10)) * 3
    y = jnp.arange(9) % 10
    got = np.asarray(pr.el2n_scores(logits, y))
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    for i in range(9):
        e = p[i].copy()
        e[int(y[i])] -= 1.0
        assert math.isclose(got[i], math.sqrt((e**2).sum()), rel_tol=1e-5)


def test_margin_against_a_loop():
    logits = np.asarray(jax.random.normal(jax.random.key(1), (11, 10)))
    y = np.arange(11) % 10
    got = np.asarray(pr.margin_scores(jnp.asarray(logits), jnp.asarray(y)))
    for i in range(11):
        other = max(logits[i, c] for c in range(10) if c != y[i])
        assert math.isclose(got[i], -(logits[i, y[i]] - other), rel_tol=1e-6, abs_tol=1e-6)


@pytest.mark.parametrize("chunk", [3, 7, 200])  # 3: a remainder chunk
def test_grand_against_per_example_grad_loop(chunk):
    _, params, x, y, loss_i = _small_problem()
    got = np.asarray(pr.grand_scores(loss_i, params, x, y, chunk=chunk))
    for i in range(len(y)):
        g = jax.grad(loss_i)(params, x[i], y[i])
        ref = math.sqrt(
            sum(float(np.sum(np.asarray(v, np.float64) ** 2)) for v in jax.tree.leaves(g))
        )
        assert math.isclose(got[i], ref, rel_tol=1e-4), (i, got[i], ref)


def test_grand_of_the_study_uses_the_mlp_loss():
    study = pr.Study(pr.Config())
    theta = split(study.model(0))[1]
    _, _, x, y, _ = _small_problem(n=4, seed=1)
    got = np.asarray(study.grand(theta, x, y))
    for i in range(4):
        g = jax.grad(study.losses.plain)(theta, (x[i : i + 1], y[i : i + 1]))
        ref = math.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g)))
        assert math.isclose(got[i], ref, rel_tol=1e-4)


def test_forgetting_counts():
    # rows: checkpoints, columns: examples
    correct = np.array(
        [
            [1, 0, 1, 0, 1],
            [0, 0, 1, 1, 1],
            [1, 0, 0, 0, 1],
            [0, 0, 1, 1, 1],
        ],
        bool,
    )
    # ex0: 1→0, 1→0 = 2; ex1: never learned = 4 (number of checkpoints); ex2: one; ex3: one; ex4: none
    np.testing.assert_array_equal(pr.forgetting_scores(correct), [2, 4, 1, 1, 0])


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5, 0.7])
def test_keep_indices_keeps_the_highest_scores(ratio):
    rng = np.random.default_rng(0)
    scores = rng.random(40)
    keep = pr.keep_indices(scores, ratio)
    assert len(keep) == 40 - round(ratio * 40) and len(set(keep)) == len(keep)
    dropped = np.setdiff1d(np.arange(40), keep)
    if len(dropped):
        assert scores[dropped].max() < scores[keep].min()


def _prune_losses():
    cfg = pr.Config()
    study = pr.Study(cfg)
    theta = split(study.model(0))[1]
    wnet = nnx.to_pure_dict(
        nnx.split(pr.LossUncertaintyWeightNet(cfg.mwn_hidden, rngs=nnx.Rngs(3)))[1]
    )
    _, _, x, y, _ = _small_problem(n=12, seed=2)
    return study.losses, theta, wnet, x, y


def test_uncertainty_is_the_l1_gap_to_the_ema_model():
    losses, theta, wnet, x, y = _prune_losses()
    ema = jax.tree.map(lambda a: a * 0.5, theta)
    f = np.asarray(losses.features(losses.logits(theta, x), losses.logits(ema, x), y))
    p = np.asarray(jax.nn.softmax(losses.logits(theta, x)))
    q = np.asarray(jax.nn.softmax(losses.logits(ema, x)))
    np.testing.assert_allclose(f[:, 1], np.abs(p - q).sum(1), rtol=1e-5)
    np.testing.assert_allclose(f[:, 0], losses.per_example(theta, x, y), rtol=1e-5)
    f_same = losses.features(losses.logits(theta, x), losses.logits(theta, x), y)
    np.testing.assert_allclose(f_same[:, 1], 0.0, atol=1e-7)


def test_stateful_base_loss_updates_the_ema_and_starts_as_plain_training():
    losses, theta, wnet, x, y = _prune_losses()
    ema = jax.tree.map(jnp.zeros_like, theta)
    w = losses.example_weights(theta, wnet, ema, x, y)
    np.testing.assert_allclose(w, 0.5, rtol=1e-6)  # zero output layer: flat start
    loss, new_ema = losses.base(theta, wnet, (x, y), ema)
    np.testing.assert_allclose(loss, losses.plain(theta, (x, y)), rtol=1e-6)
    d = losses.ema_decay
    for e, t in zip(jax.tree.leaves(new_ema), jax.tree.leaves(theta)):
        np.testing.assert_allclose(e, (1 - d) * t, rtol=1e-6, atol=1e-8)
    # the weights see no gradient through their inputs: ∇_θ L_b = Σ w ∇ℓ / Σ w with w fixed
    wnet2 = jax.tree.map(lambda a: a, wnet)
    wnet2["fc2"]["kernel"] = jax.random.normal(jax.random.key(4), wnet2["fc2"]["kernel"].shape)
    w2 = losses.example_weights(theta, wnet2, ema, x, y)
    g = jax.grad(lambda th: losses.base(th, wnet2, (x, y), ema)[0])(theta)
    g_ref = jax.grad(lambda th: jnp.sum(w2 * losses.per_example(th, x, y)) / jnp.sum(w2))(theta)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)


def test_quick_mode(tmp_path):
    r, lines = run_quick("experiments.pruning", tmp_path, "pr", timeout=600)  # ~42 s loaded
    assert r["config"]["train_steps"] == pr.QUICK["train_steps"]
    assert r["config"]["search_method"] == repr(pr.SEARCH_METHOD)
    n = 4000
    for ratio in pr.RATIOS:
        cell = r[f"ratio_{ratio}"]
        assert set(cell) == set(pr.METHODS)
        for m in pr.METHODS:
            c = cell[m]
            assert c["seeds"] == [0] and len(c["acc"]) == 1 and c["std"] == 0.0
            assert 0.1 < c["mean"] <= 1.0
            assert math.isfinite(c["search_time_ratio"]) and c["search_time_ratio"] >= 0
            assert c["kept"] == n - round(ratio * n)
    assert 0.5 < r["full"]["mean"] <= 1.0 and r["full"]["kept"] == n
    assert set(r["search_time_ratio"]) == set(pr.METHODS)
    lo, hi = r["diagnostics"]["sama_weight_range"][0]
    assert 0.0 <= lo <= hi <= 1.0
    assert math.isclose(r["diagnostics"]["score_spearman_vs_el2n"]["el2n"][0], 1.0)
    assert len(lines) == 1 and json.loads(lines[0])["seed"] == 0
