"""Flax NNX models plug into bilevel_step: same meta-gradient as a hand-written pure-pytree MLP;
BatchNorm statistics and dropout RNG state travel in model_state, undifferentiated."""

import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel_jax as bj

D, H, C, B, K = 8, 16, 3, 24, 3


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(D, H, rngs=rngs)
        self.l2 = nnx.Linear(H, C, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


class BNDropoutMLP(nnx.Module):
    def __init__(self, rngs):
        # no bias before BatchNorm: its gradient is zero up to round-off, which Adam would
        # blow up to ±lr steps of noise
        self.l1 = nnx.Linear(D, H, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(H, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(H, C, rngs=rngs)

    def __call__(self, x, train: bool):
        h = self.bn(self.l1(x), use_running_average=not train)
        return self.l2(self.drop(jax.nn.relu(h), deterministic=not train))


class MetaWeightNet(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(1, 10, rngs=rngs)
        self.fc2 = nnx.Linear(10, 1, rngs=rngs)

    def __call__(self, losses):
        return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(losses[:, None]))))[:, 0]


def data(seed=0, k=K):
    r = np.random.default_rng(seed)
    xs = jnp.asarray(r.normal(size=(k, B, D)), jnp.float32)
    ys = jnp.asarray(r.integers(0, C, (k, B)), jnp.int32)
    meta = (
        jnp.asarray(r.normal(size=(B, D)), jnp.float32),
        jnp.asarray(r.integers(0, C, B), jnp.int32),
    )
    return (xs, ys), meta


def weighted_ce(logits, y, w):
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return ce, w


# ---- the NNX implementation ------------------------------------------------------------------
model_def, theta_nnx, rest0 = bj.nnx.split_params(MLP(nnx.Rngs(0)))
mwn_def, lam_nnx, _ = bj.nnx.split_params(MetaWeightNet(nnx.Rngs(1)))


def nnx_base(theta, lam, batch, rest):
    x, y = batch
    logits, rest = bj.nnx.apply(model_def, theta, rest, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    w = bj.nnx.merge(mwn_def, lam)(jax.lax.stop_gradient(ce))
    return jnp.sum(w * ce) / jnp.sum(w), rest


def nnx_meta(theta, lam, batch, rest):
    x, y = batch
    logits, _ = bj.nnx.apply(model_def, theta, rest, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ---- the same model written by hand on plain dicts ----------------------------------------------
def to_pure(theta, lam):
    t = {
        "w1": theta["l1"]["kernel"],
        "b1": theta["l1"]["bias"],
        "w2": theta["l2"]["kernel"],
        "b2": theta["l2"]["bias"],
    }
    m = {
        "w1": lam["fc1"]["kernel"],
        "b1": lam["fc1"]["bias"],
        "w2": lam["fc2"]["kernel"],
        "b2": lam["fc2"]["bias"],
    }
    return jax.tree.map(jnp.array, (t, m))


def mlp(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def pure_base(theta, lam, batch):
    x, y = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(mlp(theta, x), y)
    w = jax.nn.sigmoid(mlp(lam, jax.lax.stop_gradient(ce)[:, None]))[:, 0]
    return jnp.sum(w * ce) / jnp.sum(w)


def pure_meta(theta, lam, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(mlp(theta, x), y).mean()


def close(nnx_tree, pure_tree, rtol=1e-6, atol=1e-9):
    a, b = to_pure(*nnx_tree) if isinstance(nnx_tree, tuple) else nnx_tree, pure_tree
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_helpers_split_merge_round_trip():
    model = BNDropoutMLP(nnx.Rngs(0))
    graphdef, params, rest = bj.nnx.split_params(model)
    assert set(params) == {"l1", "l2", "bn"} and set(params["bn"]) == {"scale", "bias"}
    assert set(rest["bn"]) == {"mean", "var"} and set(rest["drop"]["rngs"]) == {"count", "key"}
    optax.adam(1e-3).init(params)  # θ is a plain pytree optax accepts
    x = jnp.ones((4, D))
    out, new_rest = bj.nnx.apply(graphdef, params, rest, x, train=False)
    np.testing.assert_array_equal(out, model(x, train=False))
    assert jax.tree.structure(new_rest) == jax.tree.structure(rest)
    assert bj.nnx.split_params(MLP(nnx.Rngs(0)))[2] == {}


def test_import_does_not_need_flax_or_orbax():
    code = (
        "import sys, bilevel_jax as bj; assert 'flax' not in sys.modules, 'flax imported'; "
        "assert 'orbax' not in sys.modules, 'orbax imported'; assert bj.nnx.split_params; "
        "assert 'checkpoint' in dir(bj); bj.checkpoint.Checkpointer; "
        "assert 'orbax.checkpoint' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_nnx_meta_gradient_equals_pure_pytree_mlp():
    (xs, ys), meta = data()
    theta_p, lam_p = to_pure(theta_nnx, lam_nnx)
    base_tx = optax.adam(1e-2)

    # 1. one SAMA hypergradient at the same point (state of one Adam step, adapted)
    batch = (xs[0], ys[0])
    s = base_tx.init(theta_nnx)
    g = jax.grad(lambda t: nnx_base(t, lam_nnx, batch, rest0)[0])(theta_nnx)
    _, s = base_tx.update(g, s, theta_nnx)
    s_p = base_tx.init(theta_p)
    _, s_p = base_tx.update(jax.grad(pure_base)(theta_p, lam_p, batch), s_p, theta_p)
    kw: dict[str, Any] = dict(base_tx=base_tx, base_batch=batch, meta_batch=meta, alpha=0.5)
    hg_nnx = jax.jit(
        lambda th, lm, st: bj.sama_hypergrad(
            lambda t, l, b: nnx_base(t, l, b, rest0)[0],
            lambda t, l, b: nnx_meta(t, l, b, rest0),
            base_params=th,
            meta_params=lm,
            base_opt_state=st,
            **kw,
        )
    )(theta_nnx, lam_nnx, s)
    hg_pure = jax.jit(
        lambda th, lm, st: bj.sama_hypergrad(
            pure_base, pure_meta, base_params=th, meta_params=lm, base_opt_state=st, **kw
        )
    )(theta_p, lam_p, s_p)
    assert float(optax.tree.norm(hg_pure.meta_grad)) > 0
    close(to_pure(theta_nnx, hg_nnx.meta_grad)[1], hg_pure.meta_grad)
    np.testing.assert_allclose(hg_nnx.meta_loss, hg_pure.meta_loss, rtol=1e-6)

    # 2. the jitted bilevel step: K base steps then a meta step (SGD(1) on λ exposes the
    #    hypergradient as λ_before − λ_after), NNX stateful path vs stateless pure path
    method = bj.sama(0.5, adapt_from="last")
    meta_tx = optax.sgd(1.0)
    step_nnx = bj.bilevel_step(nnx_base, nnx_meta, base_tx, meta_tx, method, stateful=True)
    step_pure = bj.bilevel_step(pure_base, pure_meta, base_tx, meta_tx, method)
    st_n = step_nnx.init(theta_nnx, lam_nnx, model_state=rest0)
    st_p = step_pure.init(theta_p, lam_p)
    for _ in range(2):
        st_n, m_n = jax.jit(step_nnx)(st_n, (xs, ys), meta)
        st_p, m_p = jax.jit(step_pure)(st_p, (xs, ys), meta)
        for key in ("base_loss", "meta_loss", "hypergrad_norm", "eps", "v_norm"):
            np.testing.assert_allclose(m_n[key], m_p[key], rtol=1e-6, err_msg=key)
    close((st_n.base_params, st_n.meta_params), (st_p.base_params, st_p.meta_params))
    assert int(st_n.skipped_meta) == 0 and float(m_p["hypergrad_norm"]) > 0


def test_batchnorm_stats_and_dropout_rng_are_model_state_not_differentiated():
    graphdef, theta, rest = bj.nnx.split_params(BNDropoutMLP(nnx.Rngs(0)))
    lam = {"a": jnp.zeros(()), "b": jnp.zeros(())}

    def base_loss(theta, lam, batch, rest):
        x, y = batch
        logits, rest = bj.nnx.apply(graphdef, theta, rest, x, train=True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        w = jax.nn.sigmoid(lam["a"] * jax.lax.stop_gradient(ce) + lam["b"])
        return jnp.sum(w * ce) / jnp.sum(w), rest

    def meta_loss(theta, lam, batch, rest):  # eval mode: uses the running statistics
        logits, _ = bj.nnx.apply(graphdef, theta, rest, batch[0], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[1]).mean()

    base_tx = optax.adam(1e-2)
    step = bj.bilevel_step(
        base_loss, meta_loss, base_tx, optax.adam(1e-2), bj.sama(adapt_from="last"), stateful=True
    )
    state = step.init(theta, lam, model_state=rest)
    # θ (what is differentiated and optimized) holds no batch statistics or RNG state
    paths = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(state.base_params)[0]
    ]
    assert not any(w in p for p in paths for w in ("mean", "var", "rngs"))
    assert all(
        not any(w in jax.tree_util.keystr(p) for w in ("mean", "var", "rngs"))
        for p, _ in jax.tree_util.tree_flatten_with_path(state.base_opt_state)[0]
    )

    (xs, ys), meta = data(seed=3, k=1)
    jstep = jax.jit(step)
    new, metrics = jstep(state, (xs, ys), meta)
    assert int(new.skipped_base) == 0 and int(new.skipped_meta) == 0
    assert np.isfinite(float(metrics["hypergrad_norm"])) and float(metrics["hypergrad_norm"]) > 0

    # the running statistics moved by BatchNorm's own rule (EMA of the batch moments at θ0) ...
    h = xs[0] @ theta["l1"]["kernel"]
    mom = 0.99
    np.testing.assert_allclose(
        new.model_state["bn"]["mean"], (1 - mom) * h.mean(0), rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(new.model_state["bn"]["var"], mom + (1 - mom) * h.var(0), rtol=1e-5)
    # ... and the dropout stream advanced once (one training-mode call per base step)
    assert int(new.model_state["drop"]["rngs"]["count"]) == int(rest["drop"]["rngs"]["count"]) + 1

    # θ took exactly one Adam step on ∇_θ L_b with the model state held constant
    g = jax.grad(lambda t: base_loss(t, lam, (xs[0], ys[0]), rest)[0])(theta)
    upd, _ = base_tx.update(g, base_tx.init(theta), theta)
    for a, b in zip(
        jax.tree.leaves(new.base_params), jax.tree.leaves(optax.apply_updates(theta, upd))
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)

    # differentiating through the step w.r.t. the model state gives nothing: it only feeds
    # the stop-gradient EMA and the (non-differentiated) dropout key
    def loss_of_stats(mean):
        st = state._replace(model_state={**state.model_state, "bn": {**rest["bn"], "mean": mean}})
        return optax.tree.norm(jstep(st, (xs, ys), meta)[0].base_params)

    assert float(jnp.max(jnp.abs(jax.grad(loss_of_stats)(rest["bn"]["mean"])))) == 0.0

    # several steps under jit: statistics keep changing, everything stays finite
    for t in range(3):
        (xs, ys), _ = data(seed=10 + t, k=K)
        prev = new.model_state["bn"]["mean"]
        new, metrics = jstep(new, (xs, ys), meta)
        assert not np.allclose(new.model_state["bn"]["mean"], prev)
    assert int(new.model_state["drop"]["rngs"]["count"]) == 1 + 3 * K
    assert all(
        bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((new.base_params, new.meta_params))
    )


def test_dropout_masks_differ_between_base_steps():
    graphdef, theta, rest = bj.nnx.split_params(BNDropoutMLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (4, D))
    out1, rest1 = bj.nnx.apply(graphdef, theta, rest, x, train=True)
    out2, _ = bj.nnx.apply(graphdef, theta, rest1, x, train=True)
    out1b, _ = bj.nnx.apply(graphdef, theta, rest, x, train=True)
    np.testing.assert_array_equal(out1, out1b)  # same state → same mask (SAMA's ±εv pair)
    assert not np.allclose(out1, out2)  # advanced state → new mask
