"""``dds(lr=0.0)``: gradient alignment, the ρ → 0 limit of the one-step look-ahead (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.hypergrad.base import mixed_product

N, NV, F = 24, 16, 5


def _problem(meta_reads_lambda):
    """Per-example weights σ(λ_i) on a logistic loss of a tanh model; θ away from the optimum."""
    rng = np.random.default_rng(0)
    x, xm = jnp.asarray(rng.normal(size=(N, F))), jnp.asarray(rng.normal(size=(NV, F)))
    y, ym = (jnp.asarray(np.sign(rng.normal(size=n))) for n in (N, NV))

    def per_example(w, batch):
        x, y = batch
        return jnp.log1p(jnp.exp(-y * jnp.tanh(x @ w)))

    def base_loss(w, lam, batch):
        return jnp.sum(jax.nn.sigmoid(lam) * per_example(w, batch)) / N + 0.01 * jnp.sum(w**2)

    def meta_loss(w, lam, batch):
        out = jnp.mean(per_example(w, batch))
        if meta_reads_lambda:  # a direct term and a λ–θ coupling in L_m
            out = out + 0.1 * jnp.sum(jnp.cos(lam)) / N + 0.05 * jnp.mean(lam) * jnp.sum(w**2)
        return out

    theta = jnp.asarray(np.linspace(-0.4, 0.6, F))
    lam = jnp.asarray(np.linspace(-1.0, 1.0, N))
    tx = optax.adam(1e-2)  # lr set: DDS steps plain SGD, not the base optimizer
    problem = bj.BilevelProblem(base_loss, meta_loss, tx)
    inputs = bj.BilevelInputs(theta, lam, tx.init(theta), (x, y), (xm, ym))
    return problem, inputs, per_example


def _hg(method, problem, inputs):
    out, _ = jax.jit(method.hypergrad, static_argnums=0)(problem, inputs, optax.EmptyState())
    return out


def _rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _direct(problem, inputs):
    grad = jax.jit(jax.grad(problem.meta_loss, argnums=1))
    return grad(inputs.base_params, inputs.meta_params, inputs.meta_batch)


@pytest.mark.parametrize("reads", [False, True], ids=["lambda_free_meta", "meta_reads_lambda"])
def test_lr_zero_is_the_small_step_limit_of_dds(x64, reads):
    """dds(0) − ∇_λL_m = lim (dds(ρ) − ∇_λL_m)/ρ: one-sided at ρ = 1e-6 and Richardson."""
    problem, inputs, _ = _problem(reads)
    direct = _direct(problem, inputs)
    slope = _hg(bj.dds(0.0), problem, inputs).meta_grad - direct

    def quotient(rho):
        return (_hg(bj.dds(rho), problem, inputs).meta_grad - direct) / rho

    one_sided = quotient(1e-6)
    assert _rel(one_sided, slope) < 1e-5, _rel(one_sided, slope)
    richardson = 2 * quotient(5e-5) - quotient(1e-4)  # cancels the O(ρ) term
    assert _rel(richardson, slope) < 1e-8, _rel(richardson, slope)
    assert _rel(quotient(1e-1), slope) > 1e-3  # a large step is not the limit: the test can fail
    if reads:
        assert float(jnp.linalg.norm(direct)) > 0.1 * float(jnp.linalg.norm(slope))


def test_lr_zero_equals_minus_the_mixed_product_for_a_lambda_free_meta_loss(x64):
    problem, inputs, _ = _problem(False)
    d = jax.jit(jax.grad(problem.meta_loss))(*inputs[:2], inputs.meta_batch)
    expected = -jax.jit(mixed_product, static_argnums=0)(problem, inputs, d)
    got = _hg(bj.dds(0.0), problem, inputs)
    np.testing.assert_allclose(got.meta_grad, expected, rtol=1e-12, atol=0)
    assert float(jnp.linalg.norm(expected)) > 1e-3  # not trivially zero (lr=0 was zero before)


def test_lr_zero_is_the_gradient_of_the_alignment(x64):
    """∇_λL_m − ∇_λ⟨∇_θL_m, ∇_θL_b⟩ by reverse-over-reverse autodiff, with a λ-reading L_m."""
    problem, inputs, _ = _problem(True)
    theta = inputs.base_params

    def alignment(lam):
        d = jax.grad(problem.meta_loss)(theta, lam, inputs.meta_batch)
        g = jax.grad(problem.base_loss)(theta, lam, inputs.base_batch)
        return jnp.vdot(d, g)

    expected = _direct(problem, inputs) - jax.jit(jax.grad(alignment))(inputs.meta_params)
    got = _hg(bj.dds(0.0), problem, inputs)
    np.testing.assert_allclose(got.meta_grad, expected, rtol=1e-12, atol=1e-15)
    meta_loss = problem.meta_loss(theta, inputs.meta_params, inputs.meta_batch)
    np.testing.assert_allclose(got.meta_loss, meta_loss, rtol=1e-14)  # L_m at θ (no step)
    assert bool(got.finite)


def test_lr_zero_is_the_per_example_alignment_closed_form(x64):
    """L_b = Σ_i σ(λ_i) ℓ_i/N + R(θ): dds(0)_i = −σ'(λ_i) ⟨∇_θℓ_i, d⟩ / N."""
    problem, inputs, per_example = _problem(False)
    theta, lam = inputs.base_params, inputs.meta_params
    per_grads = jax.jit(jax.jacobian(per_example))(theta, inputs.base_batch)  # (N, F)
    d = jax.jit(jax.grad(problem.meta_loss))(theta, lam, inputs.meta_batch)
    sig = jax.nn.sigmoid(lam)
    expected = -sig * (1 - sig) * (per_grads @ d) / N
    got = _hg(bj.dds(0.0), problem, inputs)
    np.testing.assert_allclose(got.meta_grad, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("rho", [0.1, 0.05])
def test_positive_lr_is_unchanged(x64, rho):
    """dds(ρ) is ITD through one plain SGD step, bit for bit, and the autodiff look-ahead."""
    problem, inputs, _ = _problem(True)
    got = _hg(bj.dds(rho), problem, inputs)
    sgd_problem = bj.BilevelProblem(problem.base_loss, problem.meta_loss, optax.sgd(rho))
    sgd_inputs = inputs._replace(base_opt_state=optax.sgd(rho).init(inputs.base_params))
    via_itd = _hg(bj.itd(1), sgd_problem, sgd_inputs)
    np.testing.assert_array_equal(got.meta_grad, via_itd.meta_grad)
    np.testing.assert_array_equal(got.meta_loss, via_itd.meta_loss)

    def lookahead(lam):
        g = jax.grad(problem.base_loss)(inputs.base_params, lam, inputs.base_batch)
        return problem.meta_loss(inputs.base_params - rho * g, lam, inputs.meta_batch)

    np.testing.assert_allclose(got.meta_grad, jax.grad(lookahead)(inputs.meta_params), rtol=1e-12)


def test_lr_zero_in_float32_is_finite_and_close_to_float64():
    problem, inputs, _ = _problem(False)
    got = _hg(bj.dds(0.0), problem, inputs)
    assert got.meta_grad.dtype == jnp.float32 and bool(got.finite)
    with jax.enable_x64(True):
        problem64, inputs64, _ = _problem(False)
        ref = _hg(bj.dds(0.0), problem64, inputs64).meta_grad
        assert ref.dtype == jnp.float64
        assert _rel(got.meta_grad.astype(jnp.float64), ref) < 1e-5


def test_lr_zero_is_only_for_one_step():
    with pytest.raises(ValueError, match="lr=0 means the gradient-alignment limit"):
        bj.hypergrad.Unrolled(unroll=3, lr=0.0)
    with pytest.raises(ValueError, match="lr=0.0 replaces the base optimizer"):
        bj.dds(0.0, hyperparams={"learning_rate": "lr"})
    assert repr(bj.dds(0.0)) == (
        "Unrolled(unroll=1, truncate=None, stacked=False, remat=False, lr=0.0, name='dds')"
    )
