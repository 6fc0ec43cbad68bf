"""``meta_grad`` as an optax transform."""

from typing import cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj


def _setup():
    k = jax.random.split(jax.random.PRNGKey(1), 4)
    x, y = jax.random.normal(k[0], (24, 4)), jax.random.normal(k[1], (24,))
    xm, ym = jax.random.normal(k[2], (8, 4)), jax.random.normal(k[3], (8,))
    theta = {"w": jnp.zeros(4)}
    lam = {"logit": jnp.zeros(24)}

    def base_loss(th, l, b):
        xb, yb = b
        return jnp.mean(jax.nn.sigmoid(l["logit"]) * (jnp.tanh(xb @ th["w"]) - yb) ** 2)

    def meta_loss(th, l, b):
        xb, yb = b
        return jnp.mean((jnp.tanh(xb @ th["w"]) - yb) ** 2)

    tx = optax.adam(1e-2)
    state = tx.init(theta)
    for _ in range(3):
        upd, state = tx.update(jax.grad(base_loss)(theta, lam, (x, y)), state, theta)
        theta = optax.apply_updates(theta, upd)
    return base_loss, meta_loss, tx, theta, state, lam, (x, y), (xm, ym)


def _logit(updates: optax.Updates) -> jax.Array:
    """The ``"logit"`` leaf of an update tree (optax types updates as the ``ArrayTree`` union)."""
    return cast(dict[str, jax.Array], updates)["logit"]


def _kwargs(theta, state, bb, mb):
    return dict(base_params=theta, base_opt_state=state, base_batch=bb, meta_batch=mb)


def test_chain_applies_adam_to_the_sama_hypergradient():
    base_loss, meta_loss, tx, theta, state, lam, bb, mb = _setup()
    meta_tx = optax.chain(bj.meta_grad(base_loss, meta_loss, tx, bj.sama()), optax.adam(0.1))
    ms = meta_tx.init(lam)
    zeros = jax.tree.map(jnp.zeros_like, lam)
    updates, ms = jax.jit(lambda u, s, p: meta_tx.update(u, s, p, **_kwargs(theta, state, bb, mb)))(
        zeros, ms, lam
    )
    h = bj.sama_hypergrad(
        base_loss,
        meta_loss,
        base_params=theta,
        meta_params=lam,
        base_tx=tx,
        base_opt_state=state,
        base_batch=bb,
        meta_batch=mb,
    )
    ref_tx = optax.adam(0.1)
    ref, _ = ref_tx.update(h.meta_grad, ref_tx.init(lam), lam)
    np.testing.assert_allclose(updates["logit"], _logit(ref), rtol=1e-6, atol=1e-9)
    assert int(ms[0].count) == 1 and int(ms[0].nonfinite_count) == 0
    np.testing.assert_allclose(ms[0].meta_loss, h.meta_loss, rtol=1e-6)
    np.testing.assert_allclose(ms[0].info["eps"], h.info["eps"], rtol=1e-6)
    assert float(jnp.max(jnp.abs(updates["logit"]))) > 0


def test_incoming_updates_are_added():
    base_loss, meta_loss, tx, theta, state, lam, bb, mb = _setup()
    mg = bj.meta_grad(base_loss, meta_loss, tx)
    zeros = jax.tree.map(jnp.zeros_like, lam)
    ones = jax.tree.map(jnp.ones_like, lam)
    a, _ = mg.update(zeros, mg.init(lam), lam, **_kwargs(theta, state, bb, mb))
    b, _ = mg.update(ones, mg.init(lam), lam, **_kwargs(theta, state, bb, mb))
    np.testing.assert_allclose(_logit(b) - _logit(a), 1.0, rtol=1e-6)


def test_last_adaptation_through_extra_args():
    base_loss, meta_loss, tx, theta, state, lam, bb, mb = _setup()
    g = jax.grad(base_loss)(theta, lam, bb)
    mg_last = bj.meta_grad(base_loss, meta_loss, tx, bj.sama(adapt_from="last"))
    mg_fresh = bj.meta_grad(base_loss, meta_loss, tx, bj.sama())
    zeros = jax.tree.map(jnp.zeros_like, lam)
    a, _ = mg_last.update(
        zeros,
        mg_last.init(lam),
        lam,
        last_grad=g,
        last_opt_state=state,
        **_kwargs(theta, state, bb, mb),
    )
    b, _ = mg_fresh.update(zeros, mg_fresh.init(lam), lam, **_kwargs(theta, state, bb, mb))
    np.testing.assert_allclose(_logit(a), _logit(b), rtol=1e-6, atol=1e-12)


def _nan_setup():
    base_loss, meta_loss, tx, theta, state, lam, bb, mb = _setup()
    nan_meta = lambda th, l, b: meta_loss(th, l, b) * jnp.where(l["logit"][0] > -1, jnp.nan, 1.0)  # noqa: E731
    return base_loss, nan_meta, tx, theta, state, lam, bb, mb


def test_nonfinite_hypergradient_raises_under_jit_by_default():
    base_loss, nan_meta, tx, theta, state, lam, bb, mb = _nan_setup()
    mg = bj.meta_grad(base_loss, nan_meta, tx)
    step = jax.jit(lambda u, s, p: mg.update(u, s, p, **_kwargs(theta, state, bb, mb)))
    with pytest.raises(Exception, match="hypergradient is not finite.*logit"):
        out = step(jax.tree.map(jnp.zeros_like, lam), mg.init(lam), lam)
        jax.block_until_ready(out)


def test_nonfinite_hypergradient_is_skipped_and_counted():
    base_loss, nan_meta, tx, theta, state, lam, bb, mb = _nan_setup()
    mg = bj.meta_grad(base_loss, nan_meta, tx, on_nonfinite="skip")
    incoming = jax.tree.map(lambda x: jnp.full_like(x, 0.25), lam)
    upd, st = jax.jit(lambda u, s, p: mg.update(u, s, p, **_kwargs(theta, state, bb, mb)))(
        incoming, mg.init(lam), lam
    )
    np.testing.assert_array_equal(upd["logit"], incoming["logit"])
    assert int(st.nonfinite_count) == 1 and int(st.count) == 1


def test_missing_extra_args_are_named():
    base_loss, meta_loss, tx, theta, state, lam, bb, mb = _setup()
    mg = bj.meta_grad(base_loss, meta_loss, tx)
    with pytest.raises(ValueError, match=r"missing: \['base_opt_state', 'meta_batch'\]"):
        mg.update(lam, mg.init(lam), lam, base_params=theta, base_batch=bb)


def test_base_step_along_v_is_refused_in_a_meta_transform():
    base_loss, meta_loss, tx, *_ = _setup()
    with pytest.raises(ValueError, match="step_along_v=True takes a step on the base"):
        bj.meta_grad(base_loss, meta_loss, tx, bj.sama(step_along_v=True))


@pytest.mark.parametrize("jit", [False, True])
def test_nonfinite_hypergradient_warns_with_warn_and_is_still_dropped(jit):
    base_loss, nan_meta, tx, theta, state, lam, bb, mb = _nan_setup()
    mg = bj.meta_grad(base_loss, nan_meta, tx, on_nonfinite="warn")
    incoming = jax.tree.map(lambda x: jnp.full_like(x, 0.25), lam)
    fn = lambda u, s, p: mg.update(u, s, p, **_kwargs(theta, state, bb, mb))  # noqa: E731
    with pytest.warns(RuntimeWarning, match="meta_grad: the hypergradient is not finite.*logit"):
        upd, st = (jax.jit(fn) if jit else fn)(incoming, mg.init(lam), lam)
        jax.effects_barrier()
    st = cast(bj.MetaGradState, st)
    np.testing.assert_array_equal(_logit(upd), incoming["logit"])
    assert int(st.nonfinite_count) == 1 and int(st.count) == 1


def test_bad_on_nonfinite_is_rejected():
    base_loss, meta_loss, tx, *_ = _setup()
    with pytest.raises(ValueError, match="on_nonfinite"):
        bj.meta_grad(base_loss, meta_loss, tx, on_nonfinite="ignore")  # pyright: ignore[reportArgumentType]  (deliberately wrong: tests the error)


def test_sign_based_base_optimizer_is_refused_with_sama_but_fine_with_sama_na():
    base_loss, meta_loss, _, theta, _, lam, bb, mb = _setup()
    tx = optax.lion(1e-3)
    zeros = jax.tree.map(jnp.zeros_like, lam)
    mg = bj.meta_grad(base_loss, meta_loss, tx)
    with pytest.raises(bj.UnsupportedTransformError, match="scale_by_lion"):
        mg.update(zeros, mg.init(lam), lam, **_kwargs(theta, tx.init(theta), bb, mb))
    mg_na = bj.meta_grad(base_loss, meta_loss, tx, bj.sama_na())
    upd, _ = mg_na.update(zeros, mg_na.init(lam), lam, **_kwargs(theta, tx.init(theta), bb, mb))
    assert bool(jnp.all(jnp.isfinite(_logit(upd))))
