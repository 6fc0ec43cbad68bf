"""``bj.meta_grad(..., stateful=True)``: the model-state slot, against bilevel_step's stateful
meta step on the same inputs (float64), for several methods."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj


def _losses():
    def base_loss(th, lam, batch, ms):  # weighted regression around a running shift
        x, y = batch
        r = x @ th["w"] - y - ms["shift"]
        w = jax.nn.sigmoid(lam)
        new_ms = {"shift": 0.9 * ms["shift"] + 0.1 * jnp.mean(y)}
        return jnp.sum(w * r**2) / jnp.sum(w) + 0.1 * jnp.sum(th["w"] ** 2), new_ms

    def meta_loss(th, lam, batch, ms):
        x, y = batch
        return jnp.mean((x @ th["w"] - y - ms["shift"]) ** 2)

    return base_loss, meta_loss


def _data(seed=0):
    k = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(k[0], (8, 3))
    y = jax.random.normal(k[1], (8,))
    theta = {"w": jax.random.normal(k[2], (3,))}
    lam = jax.random.normal(k[3], (8,))
    return theta, lam, (x, y), (x[:5] + 1.0, y[:5])


@pytest.mark.parametrize("method", [bj.sama(0.1), bj.cg(20), bj.itd(3), bj.dds()])
def test_meta_grad_model_state_equals_bilevel_step(x64, method):
    base_loss, meta_loss = _losses()
    theta, lam, base_batch, meta_batch = _data()
    base_tx = optax.adam(1e-2)
    ms = {"shift": jnp.asarray(0.7)}
    step = bj.bilevel_step(
        base_loss, meta_loss, base_tx, optax.sgd(1.0), method, stateful=True, on_nonfinite="raise"
    )
    state = step.init(theta, lam, model_state=ms)
    # a few base steps so that the optimizer state and the model state are not at init
    state, _ = jax.jit(step.base_phase)(
        state, jax.tree.map(lambda a: jnp.stack([a] * 3), base_batch)
    )
    new, hg = jax.jit(step.meta_phase)(state, base_batch, meta_batch)
    want = lam - new.meta_params  # meta_tx = sgd(1.0): λ ← λ − h

    mg = bj.meta_grad(base_loss, meta_loss, base_tx, method, stateful=True)
    update = jax.jit(
        lambda st: mg.update(
            jnp.zeros_like(lam),
            mg.init(lam),
            lam,
            base_params=st.base_params,
            base_opt_state=st.base_opt_state,
            base_batch=base_batch,
            meta_batch=meta_batch,
            model_state=st.model_state,
        )
    )
    got, mstate = update(state)
    assert float(state.model_state["shift"]) != 0.7  # the base phase moved the model state
    assert bool(hg.finite) and int(mstate.nonfinite_count) == 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-14)
    assert float(mstate.meta_loss) == float(np.float32(hg.meta_loss))  # stored in float32

    # the model state matters: a different one gives a different hypergradient
    other, _ = update(state._replace(model_state={"shift": jnp.asarray(-3.0)}))
    assert not np.allclose(np.asarray(other), np.asarray(want))


def test_model_state_errors_name_the_fix():
    base_loss, meta_loss = _losses()
    theta, lam, base_batch, meta_batch = _data()
    tx = optax.sgd(0.1)
    kw = dict(
        base_params=theta,
        base_opt_state=tx.init(theta),
        base_batch=base_batch,
        meta_batch=meta_batch,
    )
    mg = bj.meta_grad(base_loss, meta_loss, tx, stateful=True)
    with pytest.raises(ValueError, match="stateful=True\\).update needs model_state="):
        mg.update(jnp.zeros_like(lam), mg.init(lam), lam, **kw)
    plain = bj.meta_grad(
        lambda t, l, b: base_loss(t, l, b, {"shift": 0.0})[0],
        lambda t, l, b: meta_loss(t, l, b, {"shift": 0.0}),
        tx,
    )
    with pytest.raises(ValueError, match="without stateful=True"):
        plain.update(jnp.zeros_like(lam), plain.init(lam), lam, model_state={"shift": 0.0}, **kw)
