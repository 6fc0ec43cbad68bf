"""bf16 compute (``bilevel_step(..., compute_dtype=jnp.bfloat16)``) on the MNIST reweighting problem.

Set-up: experiments.noisy_labels_demo's MLP 784-256-10 + Meta-Weight-Net losses on 512 noisy
train and 100 clean meta examples, 50 warm-up Adam steps in float32, then one bilevel step
(K = 1) from the same state on the same batches in float32 and in bf16.

``compute_dtype`` puts the base steps in bf16; the meta step stays in float32 (the default
``meta_compute_dtype``), and then the SAMA meta-gradient has cosine 1.0000 with the float32
run's (asserted ≥ 0.99 below). Why the meta step must not be bf16 — measured (CPU, jax
0.10.2) with the meta step in bf16, cosine of the SAMA meta-gradient with the float32 one:
α = 0.1 (the demo's): −0.475; α = 1: +0.503; α = 10: +0.969.
The cause is the central difference: ``h = −[∇_λL_b(θ+εv) − ∇_λL_b(θ−εv)]/2ε`` subtracts two
λ-gradients that agree to O(ε), and in bf16 each is only resolved to ~2⁻⁸ relative. Rounding
*only* ∇_λ to bf16 (everything else float32) already destroys h (cos ≈ 0); rounding only θ±εv
to bf16 keeps its direction (cos 1.0000) but scales it (|h| 2.2× too large, 99 % of the
perturbed weights round to the same bf16 value).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import noisy_labels_demo as nl

ALPHA = 0.1  # the demo's SAMA α


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def cosine(a, b):
    a, b = _flat(a), _flat(b)
    return float(a @ b / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))


# meta optimizer that stores the incoming hypergradient as its state and leaves λ unchanged
CAPTURE = optax.GradientTransformation(
    lambda params: jax.tree.map(jnp.zeros_like, params),
    lambda updates, state, params=None: (jax.tree.map(jnp.zeros_like, updates), updates),
)


@pytest.fixture(scope="module")
def problem():
    cfg = nl.Config()
    ds = data_lib.load_mnist5k()
    splits = data_lib.stratified_split(ds.y, {"meta": 10, "test": 100}, 0)
    tr, me = splits["train"][:512], splits["meta"]
    y_noisy, _ = data_lib.symmetric_noise(ds.y[tr], cfg.noise_rate, ds.num_classes, 0)
    x_tr, y_tr = jnp.asarray(ds.x[tr]), jnp.asarray(y_noisy)
    meta = (jnp.asarray(ds.x[me]), jnp.asarray(ds.y[me]))
    losses, theta, lam = nl.make_losses(cfg, ds.x.shape[1], ds.num_classes, 0)
    base_tx = optax.adam(cfg.lr)
    idx = np.random.default_rng(0).integers(0, len(tr), (51, cfg.batch_size))

    @jax.jit
    def warm_up(theta, s):
        def body(c, i):
            th, s = c
            g = jax.grad(losses.base)(th, lam, (x_tr[i], y_tr[i]))
            u, s = base_tx.update(g, s, th)
            return (optax.apply_updates(th, u), s), None

        return jax.lax.scan(body, (theta, s), idx[:50])[0]

    theta, s = warm_up(theta, base_tx.init(theta))
    batches = (x_tr[idx[50:]], y_tr[idx[50:]])  # K = 1
    return dict(
        losses=losses,
        theta=theta,
        lam=lam,
        s=s,
        base_tx=base_tx,
        batches=batches,
        meta=meta,
        last=(batches[0][0], batches[1][0]),
    )


def run_step(p, compute_dtype, alpha=ALPHA):
    step = bj.bilevel_step(
        p["losses"].base,
        p["losses"].meta,
        p["base_tx"],
        CAPTURE,
        bj.sama(alpha, adapt_from="last"),
        compute_dtype=compute_dtype,
    )
    state = step.init(p["theta"], p["lam"])._replace(base_opt_state=p["s"])
    return jax.jit(step)(state, p["batches"], p["meta"])


@pytest.fixture(scope="module")
def stepped(problem):
    """(state, metrics) after one float32 and one bf16 bilevel step from the same state."""
    return {"f32": run_step(problem, None), "bf16": run_step(problem, jnp.bfloat16)}


def test_bf16_base_path_matches_f32_and_masters_stay_f32(problem, stepped):
    (s32, m32), (s16, m16) = stepped["f32"], stepped["bf16"]
    for x in jax.tree.leaves((s16.base_params, s16.meta_params, s16.base_opt_state)):
        assert x.dtype in (jnp.float32, jnp.int32), x.dtype
    np.testing.assert_allclose(m16["base_loss"], m32["base_loss"], rtol=1e-2)
    np.testing.assert_allclose(m16["meta_loss"], m32["meta_loss"], rtol=1e-2)
    d32 = jax.tree.map(jnp.subtract, s32.base_params, problem["theta"])
    d16 = jax.tree.map(jnp.subtract, s16.base_params, problem["theta"])
    c = cosine(d32, d16)
    print(f"bf16 vs f32 base (Adam) update cosine: {c:.4f}")
    assert c >= 0.99
    # the meta-gradient direction v = J_uᵀ∇_θL_m is well resolved in bf16 too
    np.testing.assert_allclose(m16["v_norm"], m32["v_norm"], rtol=5e-2)


def test_bf16_sama_meta_gradient_matches_f32(stepped):
    h32, h16 = stepped["f32"][0].meta_opt_state, stepped["bf16"][0].meta_opt_state
    c = cosine(h32, h16)
    print(f"bf16 vs f32 SAMA meta-gradient cosine (alpha={ALPHA}): {c:.4f}")
    assert c >= 0.99, c


def _bf16_round(tree):
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(x.dtype), tree)


def test_diagnosis_the_bf16_lambda_gradient_breaks_the_central_difference(problem):
    """Float32 arithmetic with one bf16 rounding inserted at a time, at the same θ."""
    p = problem

    def hypergrad(wrap):
        base, meta = wrap(p["losses"].base), wrap(p["losses"].meta)
        return jax.jit(
            lambda: bj.sama_hypergrad(
                base,
                meta,
                base_params=p["theta"],
                meta_params=p["lam"],
                base_tx=p["base_tx"],
                base_opt_state=p["s"],
                base_batch=p["last"],
                meta_batch=p["meta"],
                alpha=ALPHA,
            )
        )().meta_grad

    ref = hypergrad(lambda f: f)
    # θ ± εv rounded to bf16 (the loss sees the perturbed f32 params cast): direction kept
    theta_rounded = hypergrad(lambda f: lambda th, lm, b: f(_bf16_round(th), lm, b))
    # λ cast to bf16 inside the loss, so ∇_λ L_b comes back rounded to bf16: h is lost
    grad_rounded = hypergrad(lambda f: lambda th, lm, b: f(th, _bf16_round(lm), b))
    c_theta, c_grad = cosine(ref, theta_rounded), cosine(ref, grad_rounded)
    scale = float(optax.tree.norm(theta_rounded) / optax.tree.norm(ref))
    print(
        f"cos with θ±εv rounded: {c_theta:.4f} (|h| ×{scale:.2f}); "
        f"cos with ∇_λ rounded: {c_grad:.4f}"
    )
    assert c_theta >= 0.99
    assert not c_grad >= 0.9  # NaN (h exactly 0) or a small cosine


def test_bf16_base_steps_with_a_float32_meta_step_match(problem, stepped):
    """What works today: bf16 only in the base losses, the meta step's losses in float32."""
    p = problem
    losses = p["losses"]

    def base_bf16(theta, lam, batch):
        x, y = batch
        return losses.base(
            jax.tree.map(lambda t: t.astype(jnp.bfloat16), theta), lam, (x.astype(jnp.bfloat16), y)
        ).astype(jnp.float32)

    # a hand-written loop: K bf16 base steps, then the f32 SAMA hypergradient
    @jax.jit
    def step(theta, s):
        g = jax.grad(base_bf16)(theta, p["lam"], p["last"])
        u, s_new = p["base_tx"].update(g, s, theta)
        return bj.sama_hypergrad(
            losses.base,
            losses.meta,
            base_params=optax.apply_updates(theta, u),
            meta_params=p["lam"],
            base_tx=p["base_tx"],
            base_opt_state=s_new,
            base_batch=p["last"],
            meta_batch=p["meta"],
            alpha=ALPHA,
            adapt_from="last",
            last_grad=g,
            last_opt_state=s,
        )

    hg = step(p["theta"], p["s"])
    h32 = stepped["f32"][0].meta_opt_state
    c = cosine(h32, hg.meta_grad)
    print(f"bf16 base step + f32 meta step vs f32: cosine {c:.4f}")
    assert c >= 0.99
