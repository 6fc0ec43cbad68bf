"""Silent cases that are now errors or warnings naming the problem and the fix (issue 12,
item 6, and the warnings for an identically zero hypergradient, unused λ, repeated skips)."""

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj


def _bl(th, lam, x):
    return jnp.mean(jax.nn.sigmoid(lam) * (x @ th - 1.0) ** 2)


def _ml(th, lam, x):
    return jnp.mean((x @ th - 1.0) ** 2)


_X = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 4))


def _quiet_run(step, state, *args):
    """One jitted step with every warning an error (the legitimate inputs must not warn)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = jax.jit(step)(state, *args)
        jax.effects_barrier()
    return out


# ----------------------------------------------------------------------------- the K axis


def test_base_batch_without_the_k_axis_warns():
    step = bj.bilevel_step(_bl, _ml, optax.sgd(1e-2), optax.adam(1e-2))
    state = step.init(jnp.zeros(4), jnp.zeros(8))
    x = _X[0]  # (8, 4): one batch, no K axis; the meta batch is (8, 4) too
    with pytest.warns(UserWarning, match=r"base_batches.*no K axis.*x\[None\]"):
        state, _ = jax.jit(step)(state, x, x)
    assert int(state.base_steps) == 8  # what it did: 8 one-example steps
    # the right call, (K, B, D) with a (B, D) meta batch, does not warn
    _quiet_run(step, step.init(jnp.zeros(4), jnp.zeros(8)), _X, _X[0])
    _quiet_run(step, step.init(jnp.zeros(4), jnp.zeros(8)), x[None], x)


# ----------------------------------------------------------------------------- unused λ


def test_meta_param_reaching_neither_loss_warns_with_its_path():
    base = lambda th, lam, x: jnp.sum((th - lam["w"] * x) ** 2)  # noqa: E731
    meta = lambda th, lam, x: jnp.sum((th - x) ** 2)  # noqa: E731
    step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1))
    lam = {"w": jnp.ones(2), "lr": jnp.array(0.1)}  # a learning rate meant for the optimizer
    with pytest.warns(UserWarning, match=r"\['lr'\] reaches neither base_loss nor meta_loss"):
        state, m = jax.jit(step)(step.init(jnp.zeros(2), lam), jnp.ones((2, 2)), jnp.ones(2))
    assert float(optax.tree.norm(m["hypergrad_norm"])) > 0
    # behind stop_gradient is no gradient path either
    sg = lambda th, lam, x: jnp.sum((th - jax.lax.stop_gradient(lam["w"]) * x) ** 2)  # noqa: E731
    step = bj.bilevel_step(sg, meta, optax.sgd(0.1), optax.sgd(0.1))
    with pytest.warns(UserWarning, match=r"\['w'\] reaches neither"):
        jax.jit(step)(step.init(jnp.zeros(2), {"w": jnp.ones(2)}), jnp.ones((2, 2)), jnp.ones(2))
    # a λ used only by the meta loss (a regularizer) is fine
    reg = lambda th, lam, x: jnp.sum((th - x) ** 2) + jnp.sum(lam**2)  # noqa: E731
    step = bj.bilevel_step(_bl, reg, optax.sgd(1e-2), optax.sgd(1e-2))
    _quiet_run(step, step.init(jnp.zeros(4), jnp.zeros(8)), _X, _X[0])


def test_unused_meta_params_warn_in_meta_grad():
    base = lambda th, lam, x: jnp.sum((th - x) ** 2)  # noqa: E731
    tx = optax.sgd(0.1)
    mg = bj.meta_grad(base, base, tx)
    with pytest.warns(UserWarning, match=r"<root> reaches neither base_loss nor meta_loss"):
        mg.update(
            jnp.zeros(2),
            mg.init(jnp.ones(2)),
            jnp.ones(2),
            base_params=jnp.zeros(2),
            base_opt_state=tx.init(jnp.zeros(2)),
            base_batch=jnp.ones(2),
            meta_batch=jnp.ones(2),
        )


# ----------------------------------------------------------------------------- zero hypergradient


def test_identically_zero_hypergradient_warns_once():
    # λ reaches the base loss, but only where θ's meta gradient is zero: exactly 0 every step
    base = lambda th, lam, x: jnp.sum((th["a"] - x) ** 2) + jnp.sum((th["b"] - lam) ** 2)  # noqa: E731
    meta = lambda th, lam, x: jnp.sum((th["a"] - 2 * x) ** 2)  # noqa: E731
    step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1), bj.cg(5))
    state = step.init({"a": jnp.zeros(2), "b": jnp.zeros(2)}, jnp.ones(2))
    run = jax.jit(step)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(4):
            state, m = run(state, jnp.ones((2, 2)), jnp.ones(2))
        jax.effects_barrier()
    zero = [x for x in w if "hypergradient is exactly 0" in str(x.message)]
    assert float(m["hypergrad_norm"]) == 0.0
    assert len(zero) == 1, [str(x.message) for x in w]  # once, not per step
    assert step.zero_hypergradient_warned
    fresh = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1), bj.cg(5))
    assert not fresh.zero_hypergradient_warned  # the flag is per step object


# ----------------------------------------------------------------------------- float16 λ


def test_float16_meta_params_with_adam_warn_at_init():
    step = bj.bilevel_step(_bl, _ml, optax.sgd(1e-2), optax.adam(1e-2))
    with pytest.warns(RuntimeWarning, match=r"float16.*meta_tx.*not finite.*float32"):
        state = step.init(jnp.zeros(4), jnp.zeros(8, jnp.float16))
    for _ in range(3):
        state, _ = jax.jit(step)(state, _X, _X[0])
    assert int(state.skipped_meta) == 3  # what the warning predicted
    # float16 λ with SGD is fine: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bj.bilevel_step(_bl, _ml, optax.sgd(1e-2), optax.sgd(1e-2)).init(
            jnp.zeros(4), jnp.zeros(8, jnp.float16)
        )


# ----------------------------------------------------------------------------- integer losses


def test_integer_base_loss_is_rejected_by_bilevel_step_as_by_meta_grad():
    ibl = lambda th, lam, x: jnp.sum(jnp.round(th * lam)).astype(jnp.int32)  # noqa: E731
    ml = lambda th, lam, x: jnp.sum(th**2)  # noqa: E731
    tx = optax.sgd(0.1)
    mg = bj.meta_grad(ibl, ml, tx)
    with pytest.raises(bj.BilevelInputError, match="base_loss must return a floating-point"):
        mg.update(
            jnp.zeros(2),
            mg.init(jnp.ones(2)),
            jnp.ones(2),
            base_params=jnp.ones(2),
            base_opt_state=tx.init(jnp.ones(2)),
            base_batch=jnp.ones(1),
            meta_batch=jnp.ones(1),
        )
    step = bj.bilevel_step(ibl, ml, tx, optax.sgd(0.1))
    with pytest.raises(bj.BilevelInputError, match="base_loss must return a floating-point"):
        jax.jit(step)(step.init(jnp.ones(2), jnp.ones(2)), jnp.ones((2, 2)), jnp.ones(2))
    step = bj.bilevel_step(ml, lambda th, lam, x: jnp.int32(1), tx, optax.sgd(0.1))
    with pytest.raises(bj.BilevelInputError, match="meta_loss must return a floating-point"):
        jax.jit(step)(step.init(jnp.ones(2), jnp.ones(2)), jnp.ones((2, 2)), jnp.ones(2))


# ----------------------------------------------------------------------------- neumann


def test_diverging_neumann_hypergradient_is_skipped_not_applied():
    a = jnp.diag(jnp.array([1.0, 100.0]))
    base = lambda th, lam, x: 0.5 * th @ a @ th - lam @ th  # noqa: E731
    meta = lambda th, lam, x: jnp.sum((th - 1.0) ** 2)  # noqa: E731
    # eta = 0.03 > 2/λ_max = 0.02: the series grows like 2^j; after 100 terms every entry is
    # finite (< 1e38) but the norm overflows float32
    step = bj.bilevel_step(base, meta, optax.sgd(1e-3), optax.sgd(0.1), bj.neumann(100, eta=0.03))
    state = step.init(jnp.ones(2), jnp.ones(2))
    new, m = jax.jit(step)(state, jnp.ones((1, 1)), jnp.ones(1))
    assert not np.isfinite(float(m["hypergrad_norm"]))
    assert int(new.skipped_meta) == 1 and int(m["meta_skipped"]) == 1
    np.testing.assert_array_equal(new.meta_params, state.meta_params)  # not applied
    # meta_grad drops it the same way
    tx = optax.sgd(1e-3)
    mg = bj.meta_grad(base, meta, tx, bj.neumann(100, eta=0.03), on_nonfinite="skip")
    upd, s = mg.update(
        jnp.zeros(2),
        mg.init(jnp.ones(2)),
        jnp.ones(2),
        base_params=jnp.zeros(2),  # θ ≠ 1: a nonzero meta gradient d
        base_opt_state=tx.init(jnp.zeros(2)),
        base_batch=jnp.ones(1),
        meta_batch=jnp.ones(1),
    )
    np.testing.assert_array_equal(upd, jnp.zeros(2))
    assert isinstance(s, bj.MetaGradState) and int(s.nonfinite_count) == 1
    # a convergent eta (< 2/λ_max) is applied as before
    ok = bj.bilevel_step(base, meta, optax.sgd(1e-3), optax.sgd(0.1), bj.neumann(100, eta=0.015))
    new, m = jax.jit(ok)(ok.init(jnp.ones(2), jnp.ones(2)), jnp.ones((1, 1)), jnp.ones(1))
    assert int(new.skipped_meta) == 0 and np.isfinite(float(m["hypergrad_norm"]))


# ----------------------------------------------------------------------------- factories


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_sama_alpha_is_validated_eagerly(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        bj.sama(alpha=alpha)
    with pytest.raises(ValueError, match="alpha must be a positive finite number"):
        bj.sama_na(alpha)


@pytest.mark.parametrize("kwargs", [{"eta": 0.0}, {"eta": -0.1}, {"maxiter": -1}])
def test_neumann_arguments_are_validated_eagerly(kwargs):
    with pytest.raises(ValueError, match="neumann"):
        bj.neumann(**kwargs)


# ----------------------------------------------------------------------------- θ leaves


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_leaf_in_theta_is_named(dtype):
    base = lambda th, lam, x: jnp.sum((th["w"] - lam * x) ** 2)  # noqa: E731
    meta = lambda th, lam, x: jnp.sum(th["w"] ** 2)  # noqa: E731
    theta = {"w": jnp.ones(2), "count": jnp.zeros((), dtype)}
    step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1))
    with pytest.raises(bj.BilevelInputError, match=r"base_params leaf \['count'\] has dtype"):
        jax.jit(step)(step.init(theta, jnp.ones(2)), jnp.ones((2, 2)), jnp.ones(2))
    tx = optax.sgd(0.1)
    mg = bj.meta_grad(base, meta, tx)
    with pytest.raises(bj.BilevelInputError, match=r"base_params leaf \['count'\]"):
        mg.update(
            jnp.zeros(2),
            mg.init(jnp.ones(2)),
            jnp.ones(2),
            base_params=theta,
            base_opt_state=tx.init(theta),
            base_batch=jnp.ones(2),
            meta_batch=jnp.ones(2),
        )


# ----------------------------------------------------------------------------- stateful


def test_forgotten_stateful_names_the_fix():
    base = lambda th, lam, x: (jnp.sum((th - lam * x) ** 2), {"n": 0})  # noqa: E731
    meta = lambda th, lam, x: jnp.sum(th**2)  # noqa: E731
    step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1))
    with pytest.raises(bj.BilevelInputError, match="base_loss returned a tuple.*stateful=True"):
        jax.jit(step)(step.init(jnp.ones(2), jnp.ones(2)), jnp.ones((2, 2)), jnp.ones(2))
    # with stateful=True base_loss must return (loss, new_model_state)
    step = bj.bilevel_step(
        lambda th, lam, x, ms: jnp.sum(th**2), lambda th, lam, x, ms: jnp.sum(th**2),
        optax.sgd(0.1), optax.sgd(0.1), stateful=True,
    )  # fmt: skip
    with pytest.raises(bj.BilevelInputError, match=r"stateful=True.*\(loss, new_model_state\)"):
        jax.jit(step)(step.init(jnp.ones(2), jnp.ones(2)), jnp.ones((2, 2)), jnp.ones(2))


# ----------------------------------------------------------------------------- repeated skips


def test_fit_without_max_skips_warns_on_repeated_skips():
    step = bj.bilevel_step(_bl, _ml, optax.sgd(1e-2), optax.adam(1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the float16 warning at init
        state = step.init(jnp.zeros(4), jnp.zeros(8, jnp.float16))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        state, _ = bj.fit(
            step,
            state,
            itertools.repeat(_X),
            itertools.repeat(_X[0]),
            num_meta_steps=25,
            progress=False,
            max_skips=None,
        )
    assert int(state.skipped_meta) == 25
    msgs = [str(x.message) for x in w if "consecutive meta steps" in str(x.message)]
    assert len(msgs) == 1 and "the last 10 consecutive meta steps" in msgs[0], msgs
    assert "max_skips" in msgs[0]
