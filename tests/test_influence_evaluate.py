"""bj.influence.lds: Spearman against scipy, LDS on exactly linear and on retrained ridge models
(closed-form influence as the attribution), masks and top-k removal against brute force."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from bilevel_jax.influence import evaluate as L


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_equals_scipy(ties):
    r = np.random.default_rng(0)
    a = r.normal(size=(5, 40))
    b = a + r.normal(size=(5, 40))
    if ties:
        a, b = np.round(a), np.round(b * 2) / 2
    got = np.asarray(L.spearman(jnp.asarray(a), jnp.asarray(b)))
    # Spearman: Pearson's correlation of the average ranks (scipy ranks the ties)
    want = [np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_subset_masks_keep_exactly_the_fraction_and_differ():
    m = np.asarray(L.subset_masks(jax.random.PRNGKey(1), 20, 200, fraction=0.5))
    assert m.shape == (200, 20) and set(np.unique(m)) == {0.0, 1.0}
    assert (m.sum(1) == 10).all()
    assert len({row.tobytes() for row in m}) > 190  # (20 choose 10) = 184,756 subsets
    np.testing.assert_allclose(m.mean(0), 0.5, atol=0.12)  # every example kept about half the time


def test_retrain_on_masks_is_a_loop_over_masks():
    x = jnp.asarray(np.random.default_rng(2).normal(size=6))

    def train(w):
        return jnp.sum(w * x) / jnp.sum(w)

    masks = L.subset_masks(jax.random.PRNGKey(0), 6, 4)
    got = L.retrain_on_masks(train, masks)
    np.testing.assert_allclose(got, [train(m) for m in masks], rtol=1e-6)


def _ridge(n=60, d=5, m=4, reg=0.1, seed=0):
    r = np.random.default_rng(seed)
    x, xq = r.normal(size=(n, d)), r.normal(size=(m, d))
    beta = r.normal(size=d)
    y, yq = x @ beta + 0.5 * r.normal(size=n), xq @ beta

    def fit(w):  # argmin (1/n) Σ w_i (x_i·θ − y_i)²/2 + reg/2 |θ|², in closed form
        a = (x.T * w) @ x / n + reg * np.eye(d)
        return np.linalg.solve(a, (x.T * w) @ y / n)

    theta = fit(np.ones(n))
    h = x.T @ x / n + reg * np.eye(d)
    g = x * (x @ theta - y)[:, None]  # per-example gradients
    gq = xq * (xq @ theta - yq)[:, None]
    influence = gq @ np.linalg.solve(h, g.T)  # g_qᵀ H⁻¹ g_i: positive = helpful
    return x, y, xq, yq, fit, influence


def test_lds_of_exact_influence_on_retrained_ridge_is_high_and_beats_random_scores():
    x, y, xq, yq, fit, influence = _ridge()
    masks = np.asarray(L.subset_masks(jax.random.PRNGKey(3), len(x), 100))
    thetas = np.stack([fit(w) for w in masks])
    outcomes = -0.5 * (thetas @ xq.T - yq) ** 2  # higher is better: minus the query loss
    got = np.asarray(L.lds(jnp.asarray(influence), jnp.asarray(masks), jnp.asarray(outcomes)))
    assert got.shape == (len(xq),)
    assert np.nanmean(got) > 0.8, got  # half-subsets are far from w = 1; measured 0.9+
    random = np.random.default_rng(4).normal(size=influence.shape)
    rand = np.asarray(L.lds(jnp.asarray(random), jnp.asarray(masks), jnp.asarray(outcomes)))
    assert np.nanmean(rand) < np.nanmean(got) - 0.5, (rand, got)
    flipped = np.asarray(L.lds(jnp.asarray(-influence), jnp.asarray(masks), jnp.asarray(outcomes)))
    np.testing.assert_allclose(flipped, -got, atol=1e-6)  # the sign convention matters


def test_lds_shape_errors_and_constant_outcomes():
    tau = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="shapes disagree"):
        L.lds(tau, jnp.ones((4, 5)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match="2-D"):
        L.lds(jnp.ones(3), jnp.ones((4, 3)), jnp.ones((4, 1)))
    masks = jnp.array([[1.0, 0, 1], [0, 1, 1]])
    assert bool(jnp.all(jnp.isnan(L.lds(tau, masks, jnp.ones((2, 2))))))  # nothing to rank


def test_top_k_removal_drops_the_k_largest():
    s = np.random.default_rng(5).normal(size=(3, 9))
    got = np.asarray(L.top_k_removal_masks(jnp.asarray(s), 4))
    for row, scores in zip(got, s):
        dropped = set(np.flatnonzero(row == 0).tolist())
        assert dropped == set(np.argsort(-scores)[:4].tolist())
    with pytest.raises(ValueError, match="k must be"):
        L.top_k_removal_masks(jnp.asarray(s), 9)


def test_mask_errors():
    with pytest.raises(ValueError, match="fraction"):
        L.subset_masks(jax.random.PRNGKey(0), 4, 2, fraction=0.01)
    with pytest.raises(ValueError, match="num_subsets"):
        L.subset_masks(jax.random.PRNGKey(0), 4, 0)
