"""Online data selection (bj.selection; Grangier et al. 2023): the selection rules against
argsort / exact sampling probabilities, no gradient through the choice, the bilevel step with a
selection against a hand-written optax + method reference, the unchanged step without one
(bit-identical to the committed code), input errors, and data parallelism on fake devices.

Run as ``python tests/test_selection.py --dp-worker`` it is the data-parallel worker (a
subprocess with 8 fake CPU devices, float64) and prints one JSON line.
"""

import json
import os
import pathlib
import subprocess
import sys
import types

if __name__ == "__main__" and "--dp-worker" in sys.argv:
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import selection as bs
from tests import _xla

K, N, F, NM, KEEP = 3, 8, 3, 6, 3


# -- the problem: a weighting "network" w(x; λ) = x·v scores examples of a regression task ----
def score(lam, b):
    return b["x"] @ lam["v"]


def per_example(th, b):
    return (jnp.tanh(b["x"] @ th["w"]) - b["y"]) ** 2


def weighted_loss(th, lam, b):  # the meta step's base loss: Σ softmax(s)_i ℓ_i
    return jnp.sum(bs.softmax_weights(score(lam, b)) * per_example(th, b)) + jnp.sum(
        lam["c"] * th["w"] ** 2
    )


def train_loss(th, b):  # the θ step on the kept examples: uniform weights, no λ
    return jnp.mean(per_example(th, b))


def meta_loss(th, lam, b):
    return jnp.mean(per_example(th, b))


def _data(seed=0, steps=2, n=N, dtype=jnp.float64):
    r = np.random.RandomState(seed)
    big = {"x": r.randn(steps, K, n, F), "y": r.randn(steps, K, n)}
    meta = {"x": r.randn(NM, F), "y": r.randn(NM)}
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype), t)  # noqa: E731
    return cast(big), cast(meta)


def _init(dtype=jnp.float64):
    th = {"w": jnp.asarray([0.3, -0.2, 0.1], dtype)}
    lam = {"v": jnp.asarray([1.0, -0.5, 0.25], dtype), "c": jnp.full(F, 0.01, dtype)}
    return th, lam


def _bytes_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb)
    )


def _close(a, b, rtol=1e-11, atol=1e-13):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# -- the selection functions ------------------------------------------------------------------
def test_top_k_equals_stable_argsort_with_ties():
    r = np.random.RandomState(0)
    for _ in range(20):
        n = r.randint(1, 40)
        s = np.round(r.randn(n), 1).astype(np.float32)  # rounding makes ties frequent
        for k in {1, n, r.randint(1, n + 1)}:
            got = np.asarray(bs.top_k(jnp.asarray(s), k))
            assert got.dtype == np.int32
            np.testing.assert_array_equal(got, np.argsort(-s, kind="stable")[:k])


def _chi2(counts, probs):
    expected = probs * counts.sum()
    return float(np.sum((counts - expected) ** 2 / expected))


# Chi-square statistics of deterministic draws (fixed keys, so no flakiness) against the exact
# probabilities; each threshold is the 99.99 % quantile of χ² with (cells − 1) degrees of
# freedom (scipy.stats.chi2.ppf(0.9999, df)): a correct sampler fails with probability 1e-4
# over seeds, while a wrong one (e.g. no Gumbel noise, or logits scaled by 2) gives statistics
# in the thousands at these sample sizes.
CHI2_9999 = {4: 23.51, 11: 37.37}
DRAWS = 20000


def test_sample_without_replacement_follows_softmax_sequentially():
    logits = jnp.array([1.0, 0.0, -0.5, 0.5, 2.0])
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    keys = jax.random.split(jax.random.PRNGKey(1), DRAWS)
    idx = np.asarray(jax.vmap(lambda k: bs.sample_without_replacement(k, logits, 5))(keys))
    # never repeats: k = n draws are a permutation
    assert all(sorted(row) == list(range(5)) for row in idx)
    first = np.bincount(idx[:, 0], minlength=5)
    assert _chi2(first, p) < CHI2_9999[4]
    # the first two draws, sequentially without replacement: P(i, j) = p_i p_j / (1 − p_i)
    sub = jnp.array([0.7, -0.3, 0.2, 1.1])
    q = np.asarray(jax.nn.softmax(sub), np.float64)
    pairs = np.asarray(jax.vmap(lambda k: bs.sample_without_replacement(k, sub, 2))(keys))
    cells = [(i, j) for i in range(4) for j in range(4) if i != j]
    counts = np.array([np.sum((pairs[:, 0] == i) & (pairs[:, 1] == j)) for i, j in cells])
    probs = np.array([q[i] * q[j] / (1 - q[i]) for i, j in cells])
    assert counts.sum() == DRAWS  # every draw is one of the 12 ordered pairs (no i == j)
    assert _chi2(counts, probs) < CHI2_9999[11]
    # the oracle can fail: the same draws against softmax(2 · logits)
    assert _chi2(first, np.asarray(jax.nn.softmax(2 * logits), np.float64)) > 100


def test_uniform_has_no_repeats_and_uniform_frequencies():
    keys = jax.random.split(jax.random.PRNGKey(2), DRAWS)
    idx = np.asarray(jax.vmap(lambda k: bs.uniform(k, 5, 3))(keys))
    assert idx.dtype == np.int32
    assert all(len(set(row)) == 3 for row in idx)
    assert _chi2(np.bincount(idx[:, 0], minlength=5), np.full(5, 0.2)) < CHI2_9999[4]
    # inclusion: each index is kept with probability k / n = 3/5 (3 · 20000 inclusions)
    inc = np.bincount(idx.ravel(), minlength=5)
    assert _chi2(inc, np.full(5, 0.2)) < CHI2_9999[4]


def test_lookup_weights_and_weighted_mean():
    table = jnp.array([0.5, -1.0, 2.0, 3.0])
    np.testing.assert_array_equal(bs.lookup(table, jnp.array([3, 0, 3])), [3.0, 0.5, 3.0])
    with pytest.raises(IndexError, match=r"\[0, 4\)"):
        bs.lookup(table, jnp.array([4]))
    out = np.asarray(jax.jit(bs.lookup)(table, jnp.array([-1, 1, 4])))
    assert np.isnan(out[0]) and out[1] == -1.0 and np.isnan(out[2])  # no wrap-around, no clip
    rows = bs.lookup(jnp.arange(6.0).reshape(3, 2), jnp.array([2, 0]))  # rows of a 2-d table
    np.testing.assert_array_equal(rows, [[4.0, 5.0], [0.0, 1.0]])
    s = jnp.array([0.3, -1.2, 2.0])
    w = bs.softmax_weights(s)
    np.testing.assert_allclose(w, np.exp(s) / np.exp(s).sum(), rtol=1e-6)
    np.testing.assert_allclose(bs.sigmoid_weights(s), 1 / (1 + np.exp(-np.asarray(s))), rtol=1e-6)
    ell = jnp.array([1.0, 4.0, -2.0])
    np.testing.assert_allclose(bs.weighted_mean(ell, w), float(np.sum(w * ell)), rtol=1e-6)
    v = jnp.array([1.0, 2.0, 5.0])
    np.testing.assert_allclose(bs.weighted_mean(ell, v), (1 + 8 - 10) / 8.0, rtol=1e-6)


def test_no_gradient_flows_through_the_choice():
    big = {"x": jax.random.normal(jax.random.PRNGKey(0), (N, F)), "y": jnp.ones(N)}
    th, lam = _init(jnp.float32)
    ell = per_example(th, big)
    for rule in ("top_k", "sample", "uniform"):
        sel = bs.Selection(score_fn=score, keep=KEEP, rule=rule)

        def picked(lam, sel=sel):
            idx = sel.choose(jax.random.PRNGKey(3), sel.scores(lam, big))
            return jnp.sum(ell[idx] * jnp.arange(1.0, KEEP + 1))

        g = jax.grad(picked)(lam)
        assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g)), (rule, g)
    # the scores themselves are stop_gradient-ed
    g = jax.grad(lambda lam: jnp.sum(sel.scores(lam, big) ** 2))(lam)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(g))
    # ... while the score function alone does depend on λ (the check above can fail)
    g = jax.grad(lambda lam: jnp.sum(score(lam, big) ** 2))(lam)
    assert np.any(np.asarray(g["v"]) != 0)


def _step(method=None, *, rule="top_k", meta_batch="selected", meta_size=None, **kw):
    sel = bs.Selection(
        score_fn=score, keep=KEEP, rule=rule, meta_batch=meta_batch, meta_size=meta_size
    )
    return bj.bilevel_step(
        weighted_loss,
        meta_loss,
        optax.adam(1e-2),
        optax.adam(1e-1),
        bj.sama(adapt_from="last") if method is None else method,
        selection=sel,
        train_loss=train_loss,
        **kw,
    )


@pytest.mark.parametrize("rule", ["top_k", "uniform"])
def test_theta_depends_on_lambda_only_through_the_choice(x64, rule):
    big, _ = _data(steps=1)
    big = jax.tree.map(lambda a: a[0], big)
    step = _step(rule=rule)
    th, lam = _init()
    base = jax.jit(lambda lam: step.base_phase(step.init(th, lam), big)[0].base_params)
    # 3λ (and another c) ranks every big batch the same: θ is bit-identical
    same = {"v": 3.0 * lam["v"], "c": 5.0 * lam["c"]}
    assert _bytes_equal(base(lam), base(same))
    if rule == "top_k":  # a λ with another ranking changes θ (the check can fail)
        assert not _bytes_equal(base(lam), base({"v": -lam["v"], "c": lam["c"]}))
    else:  # uniform ignores the scores altogether
        assert _bytes_equal(base(lam), base({"v": -lam["v"], "c": lam["c"]}))


def _reference(btx, mtx, method, th, lam, big, meta, idx_fn, meta_idx_fn, steps):
    """The hand-written step: select with ``idx_fn``, step θ on the kept examples with optax,
    then the method's hypergradient on the meta base batch, the λ update with optax (each
    piece jitted on its own: the eager reference dominated the test's time)."""
    problem = bj.BilevelProblem(weighted_loss, meta_loss, btx)

    @jax.jit
    def base_update(th, bst, kept):
        g = jax.grad(train_loss)(th, kept)
        upd, new_bst = btx.update(g, bst, th)
        return optax.apply_updates(th, upd), new_bst, g

    @jax.jit
    def meta_update(th, lam, bst, mst, mstate, meta_base, last_g, last_s):
        inputs = bj.BilevelInputs(th, lam, bst, meta_base, meta, last_g, last_s)
        hg, mstate = method.hypergrad(problem, inputs, mstate)
        upd, mst = mtx.update(hg.meta_grad, mst, lam)
        if method.step_along_v:
            th = optax.apply_updates(th, hg.base_update)
        return th, optax.apply_updates(lam, upd), mst, mstate

    bst, mst, mstate = btx.init(th), mtx.init(lam), method.init(th, lam)
    for t in range(steps):
        for i in range(K):
            b = {k: v[t, i] for k, v in big.items()}
            kept = {k: v[idx_fn(t, i, lam, b)] for k, v in b.items()}
            last_s = bst
            th, bst, last_g = base_update(th, bst, kept)
        m_idx = meta_idx_fn(t, lam, b)
        meta_base = b if m_idx is None else {k: v[m_idx] for k, v in b.items()}
        th, lam, mst, mstate = meta_update(th, lam, bst, mst, mstate, meta_base, last_g, last_s)
    return th, lam


def _argsort_top_k(t, i, lam, b):
    return np.argsort(-np.asarray(score(lam, b)), kind="stable")[:KEEP]


@pytest.mark.parametrize(
    "method, meta_batch",
    [
        (bj.exact(), "selected"),
        (bj.sama(adapt_from="last"), "selected"),
        (bj.sama(0.1, step_along_v=True), "big"),
    ],
    ids=["exact_selected", "sama_last_selected", "sama_along_v_big"],
)
def test_top_k_step_equals_a_hand_written_reference(x64, method, meta_batch):
    big, meta = _data()
    step = _step(method, meta_batch=meta_batch)
    th0, lam0 = _init()
    state = step.init(th0, lam0)
    jstep = jax.jit(step)
    state, metrics = jstep(state, {k: v[0] for k, v in big.items()}, meta)
    state, _ = jstep(state, {k: v[1] for k, v in big.items()}, meta)
    meta_idx = (
        (lambda t, lam, b: _argsort_top_k(t, 0, lam, b))
        if meta_batch == "selected"
        else (lambda t, lam, b: None)
    )
    th, lam = _reference(
        optax.adam(1e-2), optax.adam(1e-1), method, th0, lam0, big, meta,
        _argsort_top_k, meta_idx, steps=2,
    )  # fmt: skip
    _close((state.base_params, state.meta_params), (th, lam))
    assert not _bytes_equal(state.meta_params, lam0)  # λ moved: the meta step did something
    assert int(state.base_steps) == 2 * K and int(state.skipped_base) == 0
    # the first call's metrics: the mean score of the kept examples over its K big batches, and
    # the mean score of all their examples (scored with λ0)
    s = np.stack([np.asarray(score(lam0, {"x": big["x"][0, i]})) for i in range(K)])
    kept = np.stack([np.sort(r)[::-1][:KEEP] for r in s])
    np.testing.assert_allclose(metrics["selected_score"], kept.mean(), rtol=1e-6)
    np.testing.assert_allclose(metrics["score"], s.mean(), rtol=1e-6)


@pytest.mark.parametrize(
    "rule, meta_batch, meta_size",
    [("sample", "selected", None), ("uniform", "random", 5)],
)
def test_random_rules_train_on_the_drawn_examples(x64, rule, meta_batch, meta_size):
    big, meta = _data(steps=1)
    big1 = {k: v[0] for k, v in big.items()}
    method = bj.exact()
    step = _step(method, rule=rule, meta_batch=meta_batch, meta_size=meta_size)
    th0, lam0 = _init()
    state = step.init(th0, lam0, rng=jax.random.PRNGKey(7))
    new, _ = jax.jit(step)(state, big1, meta)
    # __call__ hands base_phase the second of three keys split from state.rng
    phase = jax.jit(step.base_phase)
    _, base = phase(state._replace(rng=jax.random.split(state.rng, 3)[1]), big1)
    sel = np.asarray(base.selected)
    assert sel.shape == (K, KEEP) and all(len(set(r)) == KEEP for r in sel)
    assert ((sel >= 0) & (sel < N)).all()
    # the meta step's base batch: distinct rows of the last big batch; recover their indices
    last = {k: np.asarray(v[-1]) for k, v in big1.items()}
    rows = np.asarray(base.last_batch["x"])
    m_idx = np.array([int(np.flatnonzero((last["x"] == r).all(1))[0]) for r in rows])
    assert len(set(m_idx)) == len(m_idx) == (meta_size or KEEP)
    if meta_batch == "selected":
        np.testing.assert_array_equal(m_idx, sel[-1])
    th, lam = _reference(
        optax.adam(1e-2), optax.adam(1e-1), method, th0, lam0, big, meta,
        lambda t, i, lam, b: sel[i], lambda t, lam, b: m_idx, steps=1,
    )  # fmt: skip
    _close((new.base_params, new.meta_params), (th, lam))


def test_random_rules_draw_from_state_rng_deterministically():
    big, meta = _data(steps=1, dtype=jnp.float32)
    big1 = {k: v[0] for k, v in big.items()}
    step = _step(rule="sample")
    jstep = jax.jit(step)
    th, lam = _init(jnp.float32)
    a, _ = jstep(step.init(th, lam, rng=jax.random.PRNGKey(0)), big1, meta)
    b, _ = jstep(step.init(th, lam, rng=jax.random.PRNGKey(0)), big1, meta)
    c, _ = jstep(step.init(th, lam, rng=jax.random.PRNGKey(1)), big1, meta)
    assert _bytes_equal(a, b)  # same key, same draws (a resumed run repeats itself)
    assert not _bytes_equal(a.base_params, c.base_params)  # another key, other draws
    assert bj.BilevelState._fields == type(a)._fields  # no new state field


def test_non_finite_scores_skip_the_base_step():
    big, meta = _data(steps=1, dtype=jnp.float32)
    big1 = {k: v[0] for k, v in big.items()}
    table = jnp.arange(N, dtype=jnp.float32).at[2].set(jnp.nan)
    sel = bs.Selection(score_fn=lambda lam, b: bs.lookup(table, b["id"]) * lam["v"][0], keep=2)
    step = bj.bilevel_step(
        lambda th, lam, b: weighted_loss(th, lam, {"x": b["x"], "y": b["y"]}),
        meta_loss,
        optax.sgd(0.1),
        optax.sgd(0.1),
        bj.sama(),
        selection=sel,
        train_loss=train_loss,
    )
    ids = jnp.tile(jnp.arange(N), (K, 1))  # every step sees id 2 (score NaN) ...
    ids = ids.at[0, 2].set(0)  # ... but the first
    state = step.init(*_init(jnp.float32))
    new, m = jax.jit(step)(state, big1 | {"id": ids}, meta)
    assert int(new.skipped_base) == K - 1 and int(m["base_skipped"]) == K - 1
    # only the first step moved θ: equal to one base step on the first big batch alone
    first = {k: v[:1] for k, v in (big1 | {"id": ids}).items()}
    one, _ = jax.jit(step.base_phase)(state._replace(rng=jax.random.split(state.rng, 3)[1]), first)
    assert _bytes_equal(new.base_opt_state, one.base_opt_state)


def test_stateful_and_rng_train_loss(x64):
    big, meta = _data(steps=1)
    big1 = {k: v[0] for k, v in big.items()}
    seen = []

    def train_s(th, b, ms, rng):  # counts its calls in the model state; gets a key
        seen.append(rng.shape)
        return train_loss(th, b) + 0.0 * jax.random.normal(rng, ()), ms + 1.0

    def base_s(th, lam, b, ms, rng):
        return weighted_loss(th, lam, b), ms

    def meta_s(th, lam, b, ms, rng):
        return meta_loss(th, lam, b)

    sel = bs.Selection(score_fn=score, keep=KEEP)
    kw = {"selection": sel, "stateful": True, "use_rng": True, "train_loss": train_s}
    step = bj.bilevel_step(base_s, meta_s, optax.adam(1e-2), optax.adam(1e-1), bj.exact(), **kw)
    plain = _step(bj.exact())
    th, lam = _init()
    out, _ = jax.jit(step)(step.init(th, lam, model_state=jnp.zeros(())), big1, meta)
    ref, _ = jax.jit(plain)(plain.init(th, lam), big1, meta)
    assert float(out.model_state) == K and seen  # K base steps threaded the state
    _close((out.base_params, out.meta_params), (ref.base_params, ref.meta_params), 1e-13, 0)


def test_errors():
    with pytest.raises(ValueError, match="at least 1"):
        bs.Selection(score_fn=score, keep=0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        bs.Selection(score_fn=score, keep=1.5)
    with pytest.raises(TypeError, match="int count or a float"):
        bs.Selection(score_fn=score, keep=True)
    with pytest.raises(ValueError, match="rule must be one of"):
        bs.Selection(score_fn=score, keep=2, rule="topk")
    with pytest.raises(ValueError, match="meta_batch must be one of"):
        bs.Selection(score_fn=score, keep=2, meta_batch="all")
    with pytest.raises(ValueError, match="drop meta_size"):
        bs.Selection(score_fn=score, keep=2, meta_size=3)
    with pytest.raises(ValueError, match="at least 1"):
        bs.Selection(score_fn=score, keep=2, meta_batch="random", meta_size=0)
    with pytest.raises(TypeError, match="callable"):
        bs.Selection(score_fn=None, keep=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="between 1 and the batch size 4"):
        bs.top_k(jnp.zeros(4), 5)
    with pytest.raises(ValueError, match="shape \\(n,\\)"):
        bs.top_k(jnp.zeros((2, 2)), 1)
    with pytest.raises(ValueError, match="same shape"):
        bs.weighted_mean(jnp.zeros(3), jnp.zeros(2))
    sel = bs.Selection(score_fn=score, keep=2)
    args = (weighted_loss, meta_loss, optax.sgd(0.1), optax.sgd(0.1))
    with pytest.raises(ValueError, match="pass train_loss"):
        bj.bilevel_step(*args, selection=sel)
    with pytest.raises(ValueError, match="needs selection"):
        bj.bilevel_step(*args, train_loss=train_loss)
    with pytest.raises(TypeError, match="bj.selection.Selection"):
        bj.bilevel_step(*args, selection=score, train_loss=train_loss)  # type: ignore[arg-type]
    big, meta = _data(steps=1, dtype=jnp.float32)
    big1 = {k: v[0] for k, v in big.items()}
    state = bj.bilevel_step(*args).init(*_init(jnp.float32))
    for bad, match in [
        (bs.Selection(score_fn=score, keep=N + 1), "more examples than the big batch"),
        (bs.Selection(score_fn=score, keep=2, meta_batch="random", meta_size=N + 1), "meta_size"),
        (bs.Selection(score_fn=lambda lam, b: b["x"], keep=2), r"shape \(8,\)"),
    ]:
        step = bj.bilevel_step(*args, selection=bad, train_loss=train_loss)
        with pytest.raises(bj.BilevelInputError, match=match):
            jax.jit(step)(state, big1, meta)
    step = bj.bilevel_step(*args, selection=sel, train_loss=lambda th, b: per_example(th, b))
    with pytest.raises(bj.BilevelInputError, match="train_loss must return a scalar"):
        jax.jit(step)(state, big1, meta)


def test_selection_repr_is_the_constructor_call():
    sel = bj.Selection(score_fn=score, keep=0.125, rule="uniform", meta_batch="random")
    assert repr(sel) == (
        "Selection(score_fn=score, keep=0.125, rule='uniform', meta_batch='random', meta_size=None)"
    )
    assert sel.keep_count(64) == 8 and sel.meta_count(64) == 8
    assert bs.Selection(score_fn=score, keep=0.5).keep_count(5) == 2  # round(2.5), at least 1
    assert bs.Selection(score_fn=score, keep=0.01).keep_count(5) == 1


# -- without a selection the step computes what the committed one did ---------------------------
REFERENCE_COMMIT = "dc611ab"  # loop.py before selection was added


def _committed_loop():
    root = pathlib.Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(
            ["git", "show", f"{REFERENCE_COMMIT}:bilevel_jax/loop.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the reference commit's loop.py is not available from git: {e}")
    mod = types.ModuleType("_committed_loop")
    sys.modules[mod.__name__] = mod  # dataclasses resolve annotations through sys.modules
    exec(compile(src, "_committed_loop.py", "exec"), mod.__dict__)
    return mod


def _stateful_base(th, lam, b, ms, rng):
    noise = 1e-3 * jax.random.normal(rng, ())
    return weighted_loss(th, lam, b) + noise + 0.0 * ms, ms + 1.0


def _stateful_meta(th, lam, b, ms, rng):
    return meta_loss(th, lam, b) + 0.0 * ms


@pytest.mark.parametrize(
    "kw",
    [
        {"method": bj.sama(adapt_from="last")},
        {"method": bj.neumann(3, 0.1), "stateful": True, "use_rng": True},
        {"method": bj.sama(0.1, step_along_v=True), "compute_dtype": jnp.bfloat16},
    ],
    ids=["sama_last", "neumann_stateful_rng", "sama_along_v_bf16"],
)
def test_without_selection_the_step_is_bit_identical_to_the_committed_code(kw):
    """Since then the base phase runs all K steps in one scan (it ran K − 1 and the last one
    after it), so the programs differ; the numbers do not: bit for bit, except that SAMA's
    ``"last"`` now recovers the last pre-update Adam state from the updated one
    (``adaptation.rewind``) instead of keeping it, which changes the meta step by float32
    rounding of that subtraction (``tests/test_rewind.py``)."""
    old = _committed_loop()
    big, meta = _data(steps=2, dtype=jnp.float32)
    stateful = kw.get("stateful", False)
    losses = (_stateful_base, _stateful_meta) if stateful else (weighted_loss, meta_loss)
    txs = (optax.adam(1e-2), optax.adam(1e-1))
    new_step = bj.bilevel_step(losses[0], losses[1], *txs, **kw)
    old_step = old.bilevel_step(losses[0], losses[1], *txs, **kw)
    ms = jnp.zeros(()) if stateful else None
    state = new_step.init(*_init(jnp.float32), model_state=ms, rng=jax.random.PRNGKey(4))
    b0 = {k: v[0] for k, v in big.items()}
    with jax.disable_jit():  # op by op: the same operations give the same bits, whatever XLA's
        # code generator does with two differently fused programs (tests/_xla.py)
        s_new, m_new = new_step(state, b0, meta)
        s_old, m_old = old_step(state, b0, meta)
    assert sorted(m_new) == sorted(m_old)
    if kw["method"].uses_last_step:
        rest = ("meta_params", "meta_opt_state")  # moved by the meta step: float32 rounding
        assert _bytes_equal(
            s_new._replace(**{f: None for f in rest}), s_old._replace(**{f: None for f in rest})
        )
        for f in rest:
            for a, b in zip(jax.tree.leaves(getattr(s_new, f)), jax.tree.leaves(getattr(s_old, f))):
                np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
        for k in m_new:
            np.testing.assert_allclose(m_new[k], m_old[k], rtol=1e-5, err_msg=k)
    else:
        assert _bytes_equal(s_new, s_old) and _bytes_equal(m_new, m_old)
    assert not _bytes_equal(s_new.meta_params, state.meta_params)  # the step did something


# -- data parallelism: each device selects from its own shard ----------------------------------
N_DEV, DP_N, DP_KEEP, DP_NM = 8, 32, 0.5, 16  # 4 examples and 2 kept per device


def _dp_worker():
    from jax.sharding import Mesh

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == N_DEV, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    r = np.random.RandomState(0)
    big = {"x": jnp.asarray(r.randn(K, DP_N, F)), "y": jnp.asarray(r.randn(K, DP_N))}
    meta = {"x": jnp.asarray(r.randn(DP_NM, F)), "y": jnp.asarray(r.randn(DP_NM))}
    th0, lam0 = _init()
    btx, mtx, method = optax.adam(1e-2), optax.sgd(1.0), bj.sama(0.1, adapt_from="last")
    per = DP_N // N_DEV
    k = round(DP_KEEP * per)
    out = {}
    for rule in ("top_k", "sample"):
        sel = bs.Selection(score_fn=score, keep=DP_KEEP, rule=rule)
        step = bj.bilevel_step(
            weighted_loss, meta_loss, btx, mtx, method, selection=sel, train_loss=train_loss
        )
        state = step.init(th0, lam0, rng=jax.random.PRNGKey(5))
        dp = jax.jit(bj.parallel.data_parallel(step, mesh))
        new, metrics = dp(state, big, meta)

        # reference: per shard d, select from the shard (top-k by argsort; "sample" with the
        # documented keys: the base key of __call__, one per base step, folded with d), the
        # base step on the mean of the per-shard gradients, then the mean of per-shard SAMA
        base_key = jax.random.split(state.rng, 3)[1]
        step_keys = jax.random.split(base_key, K + 1)
        th, s = th0, btx.init(th0)
        kept_scores, all_scores = [], []
        for i in range(K):
            sel_key = jax.random.split(step_keys[i])[1]
            grads, kept = [], []
            for d in range(N_DEV):
                shard = {n: v[i, d * per : (d + 1) * per] for n, v in big.items()}
                sc = np.asarray(score(lam0, shard))
                if rule == "top_k":
                    idx = np.argsort(-sc, kind="stable")[:k]
                else:
                    idx = np.asarray(
                        bs.sample_without_replacement(
                            jax.random.fold_in(sel_key, d), jnp.asarray(sc), k
                        )
                    )
                kept.append({n: v[idx] for n, v in shard.items()})
                grads.append(jax.grad(train_loss)(th, kept[-1]))
                kept_scores.append(sc[idx].mean())
                all_scores.append(sc.mean())
            g = jax.tree.map(lambda *gs: sum(gs) / N_DEV, *grads)
            last_g, last_s = g, s
            upd, s = btx.update(g, s, th)
            th = optax.apply_updates(th, upd)
        problem = bj.BilevelProblem(weighted_loss, meta_loss, btx)
        hgs = []
        for d in range(N_DEV):
            mb = {n: v[d * 2 : (d + 1) * 2] for n, v in meta.items()}
            inputs = bj.BilevelInputs(th, lam0, s, kept[d], mb, last_g, last_s)
            hgs.append(method.hypergrad(problem, inputs, optax.EmptyState())[0].meta_grad)
        lam = jax.tree.map(lambda l, *h: l - sum(h) / N_DEV, lam0, *hgs)

        def err(a, b):
            return max(
                float(jnp.max(jnp.abs(x - y)))
                for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
            )

        hlo = dp.lower(state, big, meta).compile().as_text()
        assert hlo is not None
        report = bj.parallel.collective_report(hlo)
        out[rule] = {
            "base_err": err(new.base_params, th),
            "meta_err": err(new.meta_params, lam),
            "meta_moved": err(new.meta_params, lam0),
            "score_err": abs(float(metrics["selected_score"]) - float(np.mean(kept_scores)))
            + abs(float(metrics["score"]) - float(np.mean(all_scores))),
            "base_step_allreduces": report["base_step_allreduces"],
            "other_collectives": report["other_collectives"],
        }
    print(json.dumps(out))


@pytest.fixture(scope="module")
def dp_report():
    env = dict(os.environ, XLA_FLAGS=_xla.flags(f"--xla_force_host_platform_device_count={N_DEV}"))
    root = pathlib.Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, __file__, "--dp-worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("rule", ["top_k", "sample"])
def test_data_parallel_selects_per_shard(dp_report, rule):
    r = dp_report[rule]
    assert r["base_err"] <= 1e-12, r
    assert r["meta_err"] <= 1e-10, r
    assert r["meta_moved"] > 1e-4, r  # the meta step did something
    assert r["score_err"] <= 1e-6, r  # the metrics are float32
    # selection adds no collective to the base steps: one all-reduce each, no all-gather
    assert r["base_step_allreduces"] == 1 and r["other_collectives"] == 0, r


def test_phases_is_step_call_with_the_kept_indices():
    def score(lam, b):
        return b["x"] @ lam

    def per_example(th, b):
        return (b["x"] @ th - 1.0) ** 2

    def weighted(th, lam, b):
        return jnp.sum(bj.selection.softmax_weights(score(lam, b)) * per_example(th, b))

    sel = bj.Selection(score_fn=score, keep=3, rule="sample", meta_batch="random")
    step = bj.bilevel_step(
        weighted,
        lambda th, lam, m: jnp.mean((m @ th - 1.0) ** 2),
        optax.adam(0.1),
        optax.adam(0.1),
        bj.dds(lr=0.1),
        selection=sel,
        train_loss=lambda th, b: jnp.mean(per_example(th, b)),
    )
    x = jax.random.normal(jax.random.key(0), (4, 8, 3))
    state = step.init(jnp.zeros(3), jnp.ones(3), rng=jax.random.PRNGKey(5))
    ref, _ = jax.jit(step)(state, {"x": x}, x[0, :4])
    got, base, hg = jax.jit(lambda s: step.phases(s, {"x": x}, x[0, :4]))(state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    assert base.selected.shape == (4, 3) and bool(hg.finite)
    for j in range(4):  # kept indices are distinct members of the big batch
        assert len(set(np.asarray(base.selected[j]).tolist())) == 3


def test_fit_checkpoint_and_resume_with_a_random_selection(tmp_path):
    """fit with a checkpoint every 2 meta steps, interrupted after 3, resumed to 6: bit-identical
    to 6 uninterrupted calls of the jitted step (the sampling keys come from the saved rng)."""
    import itertools

    sel = bs.Selection(score_fn=score, keep=0.5, rule="sample", meta_batch="random")
    step = bj.bilevel_step(
        weighted_loss,
        meta_loss,
        optax.adam(1e-2),
        optax.adam(1e-2),
        bj.soba(z_tx=optax.adam(1e-2)),
        selection=sel,
        train_loss=train_loss,
    )
    big, meta = _data(steps=6, dtype=jnp.float32)
    th0, lam0 = _init(jnp.float32)

    def fresh():
        return step.init(th0, lam0, rng=jax.random.PRNGKey(3))

    def batches(start):  # the factory form: positioned after `start` meta steps
        return (jax.tree.map(lambda a, t=t: a[t], big) for t in range(start, 6))

    ref = fresh()
    jstep = jax.jit(step)
    for t in range(6):
        ref, _ = jstep(ref, jax.tree.map(lambda a, t=t: a[t], big), meta)
    ckpt = bj.checkpoint.Checkpointer(tmp_path / "ckpt")
    kw = dict(checkpointer=ckpt, checkpoint_every=2, progress=False)
    half, _ = bj.fit(step, fresh(), batches, itertools.repeat(meta), num_meta_steps=3, **kw)
    assert ckpt.latest_step() == 3 and int(half.meta_steps) == 3
    done, hist = bj.fit(
        step, fresh(), batches, itertools.repeat(meta), num_meta_steps=6, resume=True, **kw
    )
    assert [r["meta_steps"] for r in hist] == [4, 5, 6]
    assert _bytes_equal(done, ref)
    ckpt.close()


if __name__ == "__main__" and "--dp-worker" in sys.argv:
    _dp_worker()
