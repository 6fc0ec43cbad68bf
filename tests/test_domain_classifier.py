"""The data-selection baselines of Grangier, Ablin & Hannun (arXiv:2311.11973, Table 2).

``bj.domain_classifier``: its meta gradient and loss against ``jax.grad`` of a hand-written
balanced logistic loss; inside ``bj.bilevel_step`` with a selection, λ after one step against
a hand-computed SGD step and θ against hand-written top-k base steps and a SAMA run with the
same selection; a behaviour test (the classifier separates two Gaussian domains); input errors.
``bj.selection.contrastive_scores``: against per-example losses computed directly, and top-k
of it against a case whose answer is known.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import selection as bs


def linear_score(lam, x):
    return x @ lam


def balanced_logistic(lam, generic, target):
    """Written out independently of the module: −log(1 − σ(s)) and −log σ(t), each averaged."""
    s, t = generic @ lam, target @ lam
    return jnp.mean(jnp.logaddexp(0.0, s)) + jnp.mean(jnp.logaddexp(0.0, -t))


def _boom(*args):
    raise AssertionError("domain_classifier must not call the problem's losses")


PROBLEM = bj.BilevelProblem(_boom, _boom, optax.sgd(0.1))  # never called


def _inputs(lam, generic, target):
    return bj.BilevelInputs(jnp.zeros(3), lam, optax.EmptyState(), generic, target)


# -- the method against jax.grad of the hand-written loss ----------------------------------------
def test_meta_grad_and_loss_equal_the_balanced_logistic_loss(x64):
    r = np.random.RandomState(0)
    lam = jnp.asarray(r.randn(3), jnp.float64)
    generic = jnp.asarray(r.randn(7, 3), jnp.float64)
    target = jnp.asarray(r.randn(5, 3) + 0.5, jnp.float64)  # other batch size: the means matter
    m = bj.domain_classifier(linear_score)
    problem = bj.BilevelProblem(_boom, _boom, optax.sgd(0.1))
    hg, state = m.hypergrad(problem, _inputs(lam, generic, target), m.init(None, lam))
    want = jax.grad(balanced_logistic)(lam, generic, target)
    assert hg.meta_grad.dtype == jnp.float64
    np.testing.assert_allclose(hg.meta_grad, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(hg.meta_loss, balanced_logistic(lam, generic, target), rtol=1e-12)
    s, t = np.asarray(generic @ lam), np.asarray(target @ lam)
    np.testing.assert_allclose(hg.info["accuracy"], 0.5 * ((s < 0).mean() + (t > 0).mean()))
    assert hg.base_update is None and bool(hg.finite) and state == optax.EmptyState()
    assert set(hg.info) == set(m.info_keys) == {"accuracy"}
    # jit gives the same, and a NaN score makes the result non-finite
    jitted, _ = jax.jit(lambda i: m.hypergrad(problem, i, state))(_inputs(lam, generic, target))
    np.testing.assert_allclose(jitted.meta_grad, want, rtol=1e-12, atol=1e-14)
    bad, _ = m.hypergrad(problem, _inputs(lam, generic.at[0, 0].set(jnp.nan), target), state)
    assert not bool(bad.finite)


def test_meta_score_fn_scores_the_target_batch(x64):
    r = np.random.RandomState(1)
    lam = jnp.asarray(r.randn(2), jnp.float64)
    generic = {"x": jnp.asarray(r.randn(6, 2), jnp.float64)}
    target = {"z": jnp.asarray(r.randn(4, 2), jnp.float64)}  # another layout
    m = bj.domain_classifier(lambda l, b: b["x"] @ l, meta_score_fn=lambda l, b: b["z"] @ l)
    hg, _ = m.hypergrad(PROBLEM, _inputs(lam, generic, target), m.init(None, lam))
    want = jax.grad(balanced_logistic)(lam, generic["x"], target["z"])
    np.testing.assert_allclose(hg.meta_grad, want, rtol=1e-12, atol=1e-14)


def test_method_contract_and_repr():
    m = bj.domain_classifier(linear_score)
    assert isinstance(m, bj.HypergradMethod) and isinstance(m, bj.hypergrad.DomainClassifier)
    assert bj.DomainClassifier is bj.hypergrad.DomainClassifier
    assert (m.name, m.info_keys, m.step_along_v, m.supports_exact_sync) == (
        "domain_classifier",
        ("accuracy",),
        False,
        False,
    )
    assert repr(m) == (
        "DomainClassifier(score_fn=linear_score, meta_score_fn=None, name='domain_classifier')"
    )
    assert m == bj.domain_classifier(linear_score) and hash(m) == hash(
        bj.domain_classifier(linear_score)
    )
    assert m != bj.domain_classifier(linear_score, meta_score_fn=linear_score)
    with pytest.raises(ValueError, match="domain_classifier"):
        m.synced("data")


# -- inside bj.bilevel_step with a selection -----------------------------------------------------
K, N, F, KEEP, NM = 2, 6, 3, 2, 4
LR_BASE, LR_META = 0.3, 0.7


def per_example(th, x):
    return (jnp.tanh(x @ th) - 1.0) ** 2


def train_loss(th, x):
    return jnp.mean(per_example(th, x))


def weighted_loss(th, lam, x):  # what SAMA differentiates; the classifier ignores it
    return jnp.sum(bs.softmax_weights(linear_score(lam, x)) * per_example(th, x))


def _step(method):
    return bj.bilevel_step(
        weighted_loss,
        lambda th, lam, x: jnp.mean(per_example(th, x)),
        optax.sgd(LR_BASE),
        optax.sgd(LR_META),
        method,
        selection=bj.Selection(score_fn=linear_score, keep=KEEP, rule="top_k", meta_batch="big"),
        train_loss=train_loss,
    )


def test_one_bilevel_step_against_a_hand_computed_step(x64):
    r = np.random.RandomState(2)
    big = jnp.asarray(r.randn(K, N, F), jnp.float64)
    target = jnp.asarray(r.randn(NM, F) + 1.0, jnp.float64)
    th0 = jnp.asarray(0.1 * r.randn(F), jnp.float64)
    lam0 = jnp.asarray(r.randn(F), jnp.float64)

    step = _step(bj.domain_classifier(linear_score))
    state, metrics = jax.jit(step)(step.init(th0, lam0), big, target)

    # θ: K SGD steps on the top-k examples of each big batch, scored with λ₀
    th = np.asarray(th0)
    for k in range(K):
        keep = np.argsort(-np.asarray(big[k] @ lam0), kind="stable")[:KEEP]
        th = th - LR_BASE * np.asarray(jax.grad(train_loss)(jnp.asarray(th), big[k][keep]))
    np.testing.assert_allclose(state.base_params, th, rtol=1e-12, atol=1e-14)
    assert not np.allclose(th, th0)  # θ did train

    # λ: one SGD step along ∇λ of the logistic loss of the last big batch (0) vs the target (1)
    want_lam = lam0 - LR_META * jax.grad(balanced_logistic)(lam0, big[-1], target)
    np.testing.assert_allclose(state.meta_params, want_lam, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        metrics["meta_loss"], balanced_logistic(lam0, big[-1], target), rtol=1e-6
    )
    assert "accuracy" in metrics and int(state.skipped_meta) == 0

    # the same selection with SAMA: the same θ (its meta phase leaves θ alone), another λ
    ref_step = _step(bj.sama())
    assert not ref_step.method.step_along_v
    ref, _ = jax.jit(ref_step)(ref_step.init(th0, lam0), big, target)
    ref_base, _ = ref_step.base_phase(ref_step.init(th0, lam0), big)
    np.testing.assert_allclose(ref.base_params, ref_base.base_params, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(state.base_params, ref.base_params, rtol=1e-12, atol=1e-14)
    assert not np.allclose(state.meta_params, ref.meta_params)


def test_the_classifier_separates_two_gaussian_domains():
    """Generic examples around (−2, 0), target ones around (2, 0), spread 0.7: a linear
    scorer with a bias, trained online from λ = 0 (chance level), separates them."""
    steps, key = 40, jax.random.PRNGKey(3)
    kg, kt, ke1, ke2 = jax.random.split(key, 4)
    shift = jnp.array([2.0, 0.0])
    generic = 0.7 * jax.random.normal(kg, (steps, K, 16, 2)) - shift
    target = 0.7 * jax.random.normal(kt, (steps, 8, 2)) + shift

    def score(lam, x):
        return x @ lam["w"] + lam["b"]

    def weighted(th, lam, x):
        return jnp.sum(bs.softmax_weights(score(lam, x)) * per_example(th, x))

    step = bj.bilevel_step(
        weighted,
        lambda th, lam, x: jnp.mean(per_example(th, x)),
        optax.sgd(0.1),
        optax.sgd(0.5),
        bj.domain_classifier(score),
        selection=bj.Selection(score_fn=score, keep=4, meta_batch="random", meta_size=8),
        train_loss=lambda th, x: jnp.mean(per_example(th, x)),
    )
    state = step.init(jnp.zeros(2), {"w": jnp.zeros(2), "b": jnp.zeros(())})
    jstep = jax.jit(step)
    accuracy = []
    for i in range(steps):
        state, metrics = jstep(state, generic[i], target[i])
        accuracy.append(float(metrics["accuracy"]))

    held_generic = 0.7 * jax.random.normal(ke1, (500, 2)) - shift
    held_target = 0.7 * jax.random.normal(ke2, (500, 2)) + shift
    lam = state.meta_params
    acc = 0.5 * (
        float(jnp.mean(score(lam, held_generic) < 0)) + float(jnp.mean(score(lam, held_target) > 0))
    )
    assert accuracy[0] <= 0.5 < 0.95 < acc  # from chance (all scores 0) to separated
    assert np.mean(accuracy[-10:]) > 0.95
    assert float(lam["w"][0]) > 0  # points from the generic to the target domain


# -- input errors --------------------------------------------------------------------------------
def test_errors():
    with pytest.raises(TypeError, match="score_fn must be a callable"):
        bj.domain_classifier(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="meta_score_fn must be a callable"):
        bj.domain_classifier(linear_score, meta_score_fn="x")  # type: ignore[arg-type]
    lam, x = jnp.zeros(1), jnp.ones((4, 1))
    two_d = bj.domain_classifier(lambda l, b: b @ l[:, None])  # (4, 1) scores
    with pytest.raises(ValueError, match=r"score_fn must return one score.*\(4, 1\)"):
        two_d.hypergrad(PROBLEM, _inputs(lam, x, x), None)
    with pytest.raises(ValueError, match=r"meta_score_fn must return one score.*\(4, 1\)"):
        bj.domain_classifier(linear_score, meta_score_fn=lambda l, b: b @ l[:, None]).hypergrad(
            PROBLEM, _inputs(lam, x, x), None
        )
    ints = bj.domain_classifier(lambda l, b: jnp.zeros(b.shape[0], jnp.int32))
    with pytest.raises(ValueError, match="floating scores.*int32"):
        ints.hypergrad(PROBLEM, _inputs(lam, x, x), None)
    with pytest.raises(ValueError, match=r"shape \(n,\)"):  # traced too (shapes are static)
        jax.jit(lambda i: two_d.hypergrad(PROBLEM, i, None))(_inputs(lam, x, x))


# -- contrastive data selection ------------------------------------------------------------------
def sq_loss(th, b):
    return (b["x"] @ th - b["y"]) ** 2


def test_contrastive_scores_equal_the_loss_difference(x64):
    r = np.random.RandomState(4)
    th_g, th_s = r.randn(3), r.randn(3)
    x, y = r.randn(9, 3), r.randn(9)
    got = bs.contrastive_scores(sq_loss, jnp.asarray(th_g), jnp.asarray(th_s), {"x": x, "y": y})
    want = (x @ th_g - y) ** 2 - (x @ th_s - y) ** 2
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_top_k_of_contrastive_scores_keeps_what_the_specific_model_explains():
    """Half the examples are generated exactly by θ_s (target), half by θ_g (generic): the
    specific model has zero loss on the first half, so they score > 0 and the rest < 0."""
    r = np.random.RandomState(5)
    th_g, th_s = jnp.array([1.0, -1.0, 0.5]), jnp.array([-1.0, 2.0, 0.0])
    n = 12
    x = jnp.asarray(r.randn(n, 3), jnp.float32)
    is_target = jnp.asarray(r.permutation(n) < n // 2)
    y = jnp.where(is_target, x @ th_s, x @ th_g)
    table = bs.contrastive_scores(sq_loss, th_g, th_s, {"x": x, "y": y})  # one row per id
    assert bool(jnp.all((table > 0) == is_target))
    ids = jnp.asarray(r.permutation(n))  # a big batch of example ids, in another order
    sel = bj.Selection(score_fn=lambda lam, b: bs.lookup(table, b["id"]), keep=n // 2)
    idx = sel.choose(jax.random.PRNGKey(0), sel.scores(None, {"id": ids}))
    assert set(np.asarray(ids[idx]).tolist()) == set(np.flatnonzero(is_target).tolist())


def test_contrastive_scores_errors():
    b = {"x": jnp.ones((4, 3)), "y": jnp.ones(4)}
    th = jnp.ones(3)
    with pytest.raises(ValueError, match=r"theta_generic.*shape \(n,\); got shape \(4, 1\)"):
        bs.contrastive_scores(lambda t, b: sq_loss(t, b)[:, None], th, th, b)
    with pytest.raises(ValueError, match=r"shape \(n,\); got shape \(\)"):
        bs.contrastive_scores(lambda t, b: jnp.mean(sq_loss(t, b)), th, th, b)
    with pytest.raises(ValueError, match="must match"):
        bs.contrastive_scores(lambda t, b: sq_loss(t, b)[: int(t.sum())], th, 0.5 * th, b)
    with pytest.raises(TypeError, match="floating"):
        bs.contrastive_scores(lambda t, b: jnp.ones(4, jnp.int32), th, th, b)
    with pytest.raises(TypeError, match="callable"):
        bs.contrastive_scores("loss", th, th, b)  # type: ignore[arg-type]


def test_no_unreached_warning_when_the_losses_do_not_read_lambda():
    def score(lam, b):
        return b @ lam

    step = bj.bilevel_step(
        lambda th, lam, b: jnp.mean((b @ th) ** 2),  # λ only reaches the step via the method
        lambda th, lam, b: jnp.mean((b @ th) ** 2),
        optax.sgd(0.1),
        optax.sgd(0.1),
        bj.domain_classifier(score),
        selection=bj.Selection(score_fn=score, keep=2, meta_batch="big"),
        train_loss=lambda th, b: jnp.mean((b @ th) ** 2),
    )
    state = step.init(jnp.ones(2), jnp.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state, _ = step(state, jnp.ones((1, 4, 2)), -jnp.ones((3, 2)))
    assert int(state.meta_steps) == 1
