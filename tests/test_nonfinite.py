"""on_nonfinite="raise" under vmap and jit (issue 12, item 3), and the silent-case warnings
(identically zero hypergradient, unused λ, repeated skips)."""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import _nonfinite
from bilevel_jax._nonfinite import OnNonfinite


def _base_loss(th, lam, x):
    return jnp.sum((th - lam * x) ** 2)


def _meta_loss(th, lam, x):
    return jnp.sum((th - x) ** 2)


def _upd(on_nonfinite: OnNonfinite = "raise"):
    tx = optax.sgd(0.1)
    mg = bj.meta_grad(_base_loss, _meta_loss, tx, bj.sama(), on_nonfinite=on_nonfinite)

    def upd(lam, th, x) -> jax.Array:
        return mg.update(  # type: ignore[return-value] - updates shaped like lam
            jnp.zeros_like(lam),
            mg.init(lam),
            lam,
            base_params=th,
            base_opt_state=tx.init(th),
            base_batch=x,
            meta_batch=x,
        )[0]

    return upd


# ----------------------------------------------------------------------------- vmap


@pytest.mark.parametrize("mode", ["raise", "warn", "skip"])
def test_meta_grad_vmaps_in_every_mode(mode: OnNonfinite):
    """The repro: vmap over tasks of meta_grad with the default on_nonfinite="raise"."""
    upd = _upd(mode)
    lam, th = jnp.linspace(0.5, 2.0, 12).reshape(4, 3), jnp.zeros((4, 3))
    x = jnp.arange(12.0).reshape(4, 3) / 6
    got = jax.vmap(upd)(lam, th, x)  # was: NotImplementedError: IO effect ... vmap-of-cond
    want = jnp.stack([upd(lam[i], th[i], x[i]) for i in range(4)])  # one task at a time
    # rtol 1e-5, not 1e-6: the batched and the per-task programs round differently, and SAMA's
    # central difference divides that float32 rounding by 2ε (measured: 1.2e-6 with the suite's
    # classic fusion emitter, tests/_xla.py)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        jax.jit(jax.vmap(jax.vmap(upd)))(lam[None], th[None], x[None])[0], want, rtol=1e-5
    )


def test_vmap_raise_names_the_failing_call():
    upd = _upd("raise")
    x = jnp.ones((4, 3)).at[2, 1].set(jnp.nan)
    with (
        pytest.raises(FloatingPointError, match="meta_grad: the hypergradient is not finite"),
        bj.nonfinite_errors(),
    ):
        jax.block_until_ready(jax.jit(jax.vmap(upd))(jnp.ones((4, 3)), jnp.zeros((4, 3)), x))


def test_finite_vmapped_steps_make_no_host_call(monkeypatch):
    """Under vmap the check still calls the host only when a value is not finite (before: the
    vmapped cond became a select that ran the callback on every step)."""
    calls = []
    host = _nonfinite._host
    monkeypatch.setattr(_nonfinite, "_host", lambda *a, **k: (calls.append(1), host(*a, **k)))
    upd = jax.jit(jax.vmap(_upd("warn")))
    jax.block_until_ready(upd(jnp.ones((4, 3)), jnp.zeros((4, 3)), jnp.ones((4, 3))))
    jax.effects_barrier()
    assert calls == []
    with pytest.warns(RuntimeWarning, match="hypergradient is not finite"):
        jax.block_until_ready(upd(jnp.ones((4, 3)), jnp.zeros((4, 3)), jnp.full((4, 3), jnp.nan)))
        jax.effects_barrier()
    assert calls == [1]  # one call for the whole batch


# ----------------------------------------------------------------------------- the error type


def test_raise_eagerly_is_a_floating_point_error():
    with pytest.raises(FloatingPointError, match="meta_grad: the hypergradient is not finite"):
        _upd("raise")(jnp.ones(3), jnp.zeros(3), jnp.full(3, jnp.nan))


def test_raise_under_jit_is_a_floating_point_error_inside_nonfinite_errors(capfd, caplog):
    """The repro: `except FloatingPointError:` around a jitted call catches the error."""
    upd = jax.jit(_upd("raise"))
    caught = None
    with caplog.at_level(logging.ERROR):
        try:
            with bj.nonfinite_errors():
                jax.block_until_ready(upd(jnp.ones(3), jnp.zeros(3), jnp.full(3, jnp.nan)))
        except FloatingPointError as e:
            caught = e
    assert caught is not None and "hypergradient is not finite" in str(caught)
    assert not str(caught).startswith("INTERNAL")  # our message, not XLA's wrapper
    assert isinstance(caught.__cause__, jax.errors.JaxRuntimeError)  # chained to XLA's error
    # no second traceback: JAX's "io_callback failed" log of our own error is dropped
    assert "io_callback failed" not in capfd.readouterr().err
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]


def test_raise_under_jit_without_the_context_carries_the_message():
    """Outside ``nonfinite_errors`` XLA's runtime error type is all JAX can raise from compiled
    code; it still says what failed."""
    upd = jax.jit(_upd("raise"))
    with pytest.raises(
        jax.errors.JaxRuntimeError, match="FloatingPointError: bilevel_jax.meta_grad"
    ):
        jax.block_until_ready(upd(jnp.ones(3), jnp.zeros(3), jnp.full(3, jnp.nan)))


def test_nonfinite_errors_leaves_other_errors_alone():
    with pytest.raises(ValueError, match="other"), bj.nonfinite_errors():
        raise ValueError("other")

    @bj.nonfinite_errors()
    def fine(x):
        return x + 1

    assert fine(1) == 2


def test_bilevel_step_raise_under_jit_and_vmap():
    def base(th, lam, x):
        return jnp.mean((th - x) ** 2) + jnp.sum(lam * th**2)

    def meta(th, lam, x):
        return jnp.mean((th - x) ** 2)

    step = bj.bilevel_step(
        base, meta, optax.sgd(0.1), optax.sgd(0.1), bj.sama(0.1), on_nonfinite="raise"
    )
    states = jax.vmap(lambda lam: step.init(jnp.zeros(2), lam))(jnp.full((3, 2), 0.5))
    run = jax.jit(jax.vmap(step))
    new, _ = run(states, jnp.ones((3, 2, 2)), jnp.ones((3, 2)))
    for i in range(3):
        one, _ = step(jax.tree.map(lambda s, i=i: s[i], states), jnp.ones((2, 2)), jnp.ones(2))
        np.testing.assert_allclose(new.meta_params[i], one.meta_params, rtol=1e-6)
    bad = jnp.ones((3, 2, 2)).at[1, 0, 0].set(jnp.inf)
    with (
        pytest.raises(FloatingPointError, match="bilevel_step: a base step"),
        bj.nonfinite_errors(),
    ):
        jax.block_until_ready(run(states, bad, jnp.ones((3, 2))))


def test_fit_raise_is_a_floating_point_error():
    import itertools

    step = bj.bilevel_step(
        _base_loss, _meta_loss, optax.sgd(0.1), optax.sgd(0.1), on_nonfinite="raise"
    )
    with pytest.raises(FloatingPointError, match="is not finite"):
        bj.fit(
            step,
            step.init(jnp.zeros(3), jnp.ones(3)),
            itertools.repeat(jnp.full((2, 3), jnp.nan)),
            itertools.repeat(jnp.ones(3)),
            num_meta_steps=2,
            progress=False,
        )


def test_report_is_transparent_to_grad():
    """A report inside a differentiated function (meta-meta gradients) does not break AD."""

    def f(x):
        _nonfinite.report(_nonfinite.all_finite(x), "raise", where="x", tree=x)
        return jnp.sum(x**2)

    np.testing.assert_allclose(jax.jit(jax.grad(f))(jnp.arange(3.0)), 2 * jnp.arange(3.0))
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(jnp.ones((2, 3))), 2 * jnp.ones((2, 3)))


def test_no_warning_for_finite_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.block_until_ready(
            jax.vmap(_upd("warn"))(jnp.ones((2, 3)), jnp.zeros((2, 3)), jnp.ones((2, 3)))
        )
        jax.effects_barrier()
