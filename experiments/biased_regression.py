r"""Biased regression: every hypergradient method against the closed form (Choe et al. 2023, app. E).

Reference: S. K. Choe, S. V. Mehta, H. Ahn, W. Neiswanger, P. Xie, E. Strubell, E. Xing,
"Making Scalable Meta Learning Practical", NeurIPS 2023, appendix E (biased regression).

Problem (everything in float64; ``n`` rows, ``d`` features)::

    X, X' ~ N(0, 1)^{n×d}          y = X w_true + ξ,  y' = X' w_true + ξ',  ξ, ξ' ~ N(0, σ²)

    base:  L_b(w, λ) = (‖X w − y‖² + β ‖w − λ‖²) / n         β = 0.1
    meta:  L_m(w)    =  ‖X' w − y'‖² / n'

Both losses are divided by their number of rows (n = n' = 500 here). The scaling changes no
minimiser (w*(λ) and λ* are those of the unscaled problem) and is used *everywhere*: in the losses
handed to the library, in the closed forms below, and in the reported meta-gradients.

Closed forms, with ``A = XᵀX + βI``::

    w*(λ)   = A⁻¹ (Xᵀy + βλ)
    dw*/dλ  = β A⁻¹                                   (implicit function theorem; ∂²L_b/∂w² = 2A/n,
                                                       ∂²L_b/∂w∂λ = −2β I/n)
    dL_m(w*(λ))/dλ = β A⁻¹ ∇_w L_m(w*(λ)),  ∇_w L_m(w) = (2/n') X'ᵀ(X' w − y')
    λ*      = argmin_λ ‖M λ − r‖²,  M = β X' A⁻¹,  r = y' − X' A⁻¹ Xᵀ y

(``λ ↦ L_m(w*(λ))`` is a linear least-squares problem; λ* is solved with float64 ``lstsq``.)

Training: w is trained by plain SGD (``optax.sgd(base_lr)``, full batch), warm-started across meta
steps (never reset), with ``K`` base steps between meta steps. λ is trained by
``optax.chain(bj.meta_grad(L_b, L_m, sgd, method, base_params=w_0), optax.adam(meta_lr))`` for
every method of the library (:data:`METHODS`). Each run is one jitted ``lax.scan`` over meta
steps with an inner ``lax.scan`` over base steps.

Defaults (:class:`Config`): n = 500, d = 50, σ = 0.5, β = 0.1, seed 0; SGD lr 0.4 (the base Hessian
H = 2A/n has eigenvalues 0.97…3.45, so SGD contracts by ≈ 0.61 per step), K = 20 base steps (w stays
within ~1e-5 relative of w*(λ_t)); 100 meta steps of Adam(lr = 10) from λ_0 = 0, w_0 = 0; α = 1.
The meta objective is badly scaled: λ only moves w through βA⁻¹ (≈ 2e-4·I), so the meta-gradient
is ~1e-4 while λ* has norm ~1e3. Adam's scale invariance absorbs this; its lr is in λ's units.

Methods (:func:`make_methods`; the step sizes are computed from the spectrum of H, and the
``repr`` of every method object is written to the JSON):

* ``sama`` / ``sama_na``: ``bj.sama(α)`` / ``bj.sama_na(α)``, α = 1; ``darts``: ``bj.darts()``
  (SAMA-NA with α = 0.01);
* ``neumann``: ``bj.neumann(10, eta=1/λ_max(H))`` (needs η < 2/λ_max; the error factor is
  (1 − λ_min/λ_max)^{k+1} ≈ 0.03 for k = 10 terms);
* ``cg``: ``bj.cg(maxiter=50)`` (50 iterations = d, enough for CG in exact arithmetic; tol 1e-10 stops it
  earlier);
* ``exact``: ``bj.exact()`` (dense H from d vmapped HVPs, direct solve);
* ``itd``: ``bj.itd(unroll=5)`` through 5 SGD steps from the current w (a short unroll: w₀ is
  treated as constant, so this is a 4-term Neumann series with η = base_lr, error ≈ 0.61⁵);
* ``soba``: ``bj.soba(rho=1/λ_max(H))``, z warm-started across meta steps (one HVP per step);
* ``dds``: ``bj.dds()``, one step of the base optimizer (SGD, lr 0.4).

Recorded at every meta step t (λ_t is the meta parameter *before* update t):

* ``cos[t]``  — cosine between the method's hypergradient at (w_t, λ_t) (``method.hypergrad`` with
  the transform's inputs and the transform's own method state) and the closed-form meta-gradient
  at w*(λ_t);
* ``dist[t]`` — ‖λ_t − λ*‖ for t = 0..T (T+1 entries; ``dist_ratio = dist[T]/dist[0]``).

The run also checks that the gradient Adam actually consumed (recovered from its first moment,
``g = (μ_t − b1 μ_{t−1})/(1 − b1)``) equals that hypergradient (``chain_grad_relerr``).

Cost (compiled XLA memory and median wall time), per method, on the same inputs (λ = 0, w = w*(0), fresh SGD state, fresh method
state): ``f = jax.jit(lambda ...: method.hypergrad(problem, inputs, state))`` — one meta step's
hypergradient. ``time_ratio_vs_sama`` is the median wall time of ``timing_calls`` calls (after
``timing_warmup`` warm-up calls, each call ``block_until_ready``; the methods are interleaved call
by call, garbage collector off) over SAMA's median; ``temp_bytes`` is
``f.lower(*args).compile().memory_analysis().temp_size_in_bytes`` (deterministic). (XLA's
``cost_analysis()["flops"]`` is not reported: it counts a while-loop body once, so it hides the
iterations of Neumann, CG and ITD.) The calls take tens to hundreds of µs,
so the time ratios are dominated by dispatch and per-op overhead and vary by tens of percent
between processes on a shared CPU; the order of the methods is stable.

What to expect: L_b is quadratic in w, so SAMA's central difference is exact and its estimate is
``(2β/n) v`` with ``v = J_u(g)ᵀ ∇_w L_m``. For SGD the adaptation is ``J_u = base_lr · I``, so SAMA
returns ``(2β·base_lr/n) ∇_w L_m(w)``: implicit differentiation with A⁻¹ replaced by a multiple of
I. SAMA-NA and DARTS (``v = ∇_w L_m``) are the same vector divided by base_lr, so under SGD they
have the *same cosine* (up to rounding) and, because Adam is nearly scale invariant, nearly the
same trajectory; DDS is the same direction evaluated one SGD step ahead. For all four the cosine
measures how isotropic A is along ∇_w L_m (≈ 0.95 here). Exact and CG solve H p = d (1 − cos ≈
1e-12 after the first step); Neumann and ITD truncate the series (1 − cos ≈ 1e-5 and 2e-4). SOBA's
z takes one contraction step (factor ≤ 1 − λ_min/λ_max ≈ 0.72) per meta step, so it lags when λ
moves fast: with Adam lr 10, λ oscillates around λ* late in the run, d turns quickly and the stale
z can even point the wrong way (cos < 0 at a few steps); with Adam lr 3 its cos_mean is ≈ 0.998.

Run::

    python -m experiments.biased_regression [--quick] [--meta-steps T] [--json PATH]

Base steps per run (``--base-steps``) are ``K · meta_steps`` (K = ``Config.meta_interval``);
``--quick`` takes the same trajectory with 30 instead of 300 timed calls per method.
"""

from __future__ import annotations

import dataclasses
import gc
import time
from collections.abc import Sequence
from functools import partial
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import bilevel_jax as bj
from bilevel_jax.hypergrad import BilevelInputs, BilevelProblem
from experiments import harness
from experiments.harness import Recipe

__all__ = [
    "METHODS",
    "Config",
    "make_data",
    "make_losses",
    "closed_form_w",
    "closed_form_meta_grad",
    "meta_objective",
    "solve_lambda_star",
    "base_hessian_eigs",
    "make_methods",
    "run_method",
    "measure_cost",
    "run_experiment",
    "main",
]

#: Every method of the study, in the order of the table (SAMA first: the time reference).
METHODS = ("sama", "sama_na", "darts", "neumann", "cg", "exact", "itd", "soba", "dds")


@dataclasses.dataclass(frozen=True)
class Config:
    """All hyper-parameters of the study (written to the JSON ``config``)."""

    seed: int = 0
    n: int = 500  # rows of X and of X'
    d: int = 50  # features
    noise_std: float = 0.5
    beta: float = 0.1
    base_lr: float = 0.4  # optax.sgd; stable below 2/λ_max(2A/n) ≈ 0.58 for n=500, d=50
    meta_interval: int = 20  # K: SGD steps between meta steps (warm start, w never reset)
    meta_steps: int = 100
    # optax.adam on λ. λ* has norm ~1.1e3 (~160 per coordinate) and Adam moves each coordinate by
    # at most ~meta_lr per step, so the step is in λ's units; swept {1,2,3,5,8,10,20} on seed 0.
    meta_lr: float = 10.0
    meta_b1: float = 0.9
    meta_b2: float = 0.999
    meta_eps: float = 1e-8
    # Neumann's η and SOBA's ρ are step_frac/λ_max(H), H = 2A/n (needs < 2/λ_max).
    step_frac: float = 1.0
    # Cost measurement: median of timed calls after warm-up, compiled memory.
    timing_calls: int = 300
    timing_warmup: int = 10


# ----------------------------------------------------------------------------- problem


def make_data(cfg: Config) -> dict[str, np.ndarray]:
    """X, y (base) and X', y' (meta) from one linear model; float64 numpy, deterministic in seed."""
    rng = np.random.default_rng(cfg.seed)
    w_true = rng.standard_normal(cfg.d)
    x = rng.standard_normal((cfg.n, cfg.d))
    xm = rng.standard_normal((cfg.n, cfg.d))
    y = x @ w_true + cfg.noise_std * rng.standard_normal(cfg.n)
    ym = xm @ w_true + cfg.noise_std * rng.standard_normal(cfg.n)
    return {"x": x, "y": y, "xm": xm, "ym": ym, "w_true": w_true}


def make_losses(beta: float):
    """``(base_loss, meta_loss)`` with the library's signature ``loss(w, λ, batch)``."""

    def base_loss(w, lam, batch):
        x, y = batch
        r = x @ w - y
        return (jnp.sum(r * r) + beta * jnp.sum((w - lam) ** 2)) / x.shape[0]

    def meta_loss(w, lam, batch):
        del lam
        x, y = batch
        r = x @ w - y
        return jnp.sum(r * r) / x.shape[0]

    return base_loss, meta_loss


def _a_matrix(x, beta):
    return x.T @ x + beta * jnp.eye(x.shape[1], dtype=x.dtype)


def closed_form_w(lam, x, y, beta):
    """w*(λ) = (XᵀX + βI)⁻¹ (Xᵀy + βλ)."""
    return jnp.linalg.solve(_a_matrix(x, beta), x.T @ y + beta * lam)


def closed_form_meta_grad(lam, x, y, xm, ym, beta):
    """dL_m(w*(λ))/dλ = β A⁻¹ ∇_w L_m(w*(λ)) with ∇_w L_m(w) = (2/n') X'ᵀ(X'w − y')."""
    w = closed_form_w(lam, x, y, beta)
    g_w = 2.0 * xm.T @ (xm @ w - ym) / xm.shape[0]
    return beta * jnp.linalg.solve(_a_matrix(x, beta), g_w)


def meta_objective(lam, x, y, xm, ym, beta):
    """λ ↦ L_m(w*(λ)) (differentiable; used as the autodiff oracle in the tests)."""
    w = closed_form_w(lam, x, y, beta)
    r = xm @ w - ym
    return jnp.sum(r * r) / xm.shape[0]


def solve_lambda_star(x, y, xm, ym, beta) -> np.ndarray:
    """λ* = argmin ‖Mλ − r‖², M = βX'A⁻¹, r = y' − X'A⁻¹Xᵀy (float64 numpy lstsq)."""
    x, y, xm, ym = (np.asarray(a, np.float64) for a in (x, y, xm, ym))
    a = x.T @ x + beta * np.eye(x.shape[1])
    a_inv = np.linalg.inv(a)
    m = beta * xm @ a_inv
    r = ym - xm @ (a_inv @ (x.T @ y))
    lam, *_ = np.linalg.lstsq(m, r, rcond=None)
    return lam


def base_hessian_eigs(x, beta) -> tuple[float, float]:
    """(λ_min, λ_max) of the base Hessian ∇²_w L_b = 2A/n (float64 numpy)."""
    x = np.asarray(x, np.float64)
    ev = np.linalg.eigvalsh(2.0 * (x.T @ x + beta * np.eye(x.shape[1])) / x.shape[0])
    return float(ev[0]), float(ev[-1])


def make_methods(cfg: Config, lam_max: float) -> dict[str, Any]:
    """``{name: method}`` for every name in :data:`METHODS` (α = 1 is the paper's default)."""
    step = cfg.step_frac / lam_max
    return {
        "sama": bj.sama(alpha=1.0),
        "sama_na": bj.sama_na(alpha=1.0),
        "darts": bj.darts(alpha=0.01),
        "neumann": bj.neumann(maxiter=10, eta=step),
        "cg": bj.cg(maxiter=50),
        "exact": bj.exact(),
        "itd": bj.itd(unroll=5),
        "soba": bj.soba(rho=step),
        "dds": bj.dds(),
    }


def optimizers(cfg: Config) -> dict[str, Recipe]:
    """The base optimizer and the meta optimizer chained after ``bj.meta_grad`` (recipes)."""
    return {
        "base": Recipe(optax.sgd, cfg.base_lr),
        "meta": Recipe(optax.adam, cfg.meta_lr, b1=cfg.meta_b1, b2=cfg.meta_b2, eps=cfg.meta_eps),
    }


# ----------------------------------------------------------------------------- training


def _cos(a, b):
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


@partial(jax.jit, static_argnames=("cfg", "method"))
def _run_scan(cfg: Config, method, x, y, xm, ym, lam_star):
    base_loss, meta_loss = make_losses(cfg.beta)
    opt = optimizers(cfg)
    base_tx = opt["base"]()
    problem = BilevelProblem(base_loss, meta_loss, base_tx)
    w0 = jnp.zeros(x.shape[1], x.dtype)
    lam0 = jnp.zeros(x.shape[1], x.dtype)
    meta_tx = optax.chain(
        bj.meta_grad(base_loss, meta_loss, base_tx, method, base_params=w0), opt["meta"]()
    )
    base_batch, meta_batch = (x, y), (xm, ym)
    a_chol = jax.scipy.linalg.cho_factor(_a_matrix(x, cfg.beta), lower=True)
    xty = x.T @ y

    def w_star(lam):
        return jax.scipy.linalg.cho_solve(a_chol, xty + cfg.beta * lam)

    def true_grad(lam):
        w = w_star(lam)
        return cfg.beta * jax.scipy.linalg.cho_solve(
            a_chol, 2.0 * xm.T @ (xm @ w - ym) / xm.shape[0]
        )

    def base_step(carry, _):
        w, s, lam = carry
        r = bj.base_step(base_loss, base_tx, w, s, lam, base_batch)
        return (r.params, r.opt_state, lam), None

    def meta_step(carry, _):
        w, s, lam, ms = carry
        (w, s, _), _ = lax.scan(base_step, (w, s, lam), None, length=cfg.meta_interval)
        # The hypergradient the transform computes: same inputs, the transform's method state.
        inputs = BilevelInputs(w, lam, s, base_batch, meta_batch)
        hg = method.hypergrad(problem, inputs, ms[0].method_state)[0].meta_grad
        tg = true_grad(lam)
        mu_old = optax.tree_utils.tree_get(ms, "mu")
        upd, ms = meta_tx.update(
            jnp.zeros_like(lam),
            ms,
            lam,
            base_params=w,
            base_opt_state=s,
            base_batch=base_batch,
            meta_batch=meta_batch,
        )
        # The gradient Adam consumed, recovered from its first moment.
        consumed = (optax.tree_utils.tree_get(ms, "mu") - cfg.meta_b1 * mu_old) / (1 - cfg.meta_b1)
        ws = w_star(lam)
        rec = {
            "cos": _cos(hg, tg),
            "dist": jnp.linalg.norm(lam - lam_star),
            "chain_relerr": jnp.linalg.norm(consumed - hg) / jnp.linalg.norm(hg),
            "track_relerr": jnp.linalg.norm(w - ws) / jnp.linalg.norm(ws),
            "hg_norm_ratio": jnp.linalg.norm(hg) / jnp.linalg.norm(tg),
            "meta_loss": meta_loss(ws, lam, meta_batch),
        }
        lam = optax.apply_updates(lam, upd)
        return (w, s, lam, ms), rec

    carry = (w0, base_tx.init(w0), lam0, meta_tx.init(lam0))
    (w, _, lam, ms), rec = lax.scan(meta_step, carry, None, length=cfg.meta_steps)
    rec["dist"] = jnp.concatenate([rec["dist"], jnp.linalg.norm(lam - lam_star)[None]])
    meta_grad_state: bj.MetaGradState = cast(tuple, ms)[0]  # ms: the chain's state
    rec["nonfinite_count"] = meta_grad_state.nonfinite_count
    return lam, rec


def run_method(cfg: Config, method, data: dict, lam_star: np.ndarray) -> dict[str, Any]:
    """One full run (jitted scan); must be called with x64 enabled. Returns the JSON entry."""
    args = [jnp.asarray(data[k], jnp.float64) for k in ("x", "y", "xm", "ym")]
    t0 = time.perf_counter()
    lam, rec = _run_scan(cfg, method, *args, jnp.asarray(lam_star, jnp.float64))
    lam = jax.block_until_ready(lam)
    seconds = time.perf_counter() - t0
    rec = jax.tree.map(np.asarray, rec)
    cos, dist = rec["cos"], rec["dist"]
    return {
        "cos_mean": float(np.mean(cos)),
        "cos_min": float(np.min(cos)),
        "dist_ratio": float(dist[-1] / dist[0]),
        "cos": cos.tolist(),
        "dist": dist.tolist(),
        "meta_loss": rec["meta_loss"].tolist(),
        "chain_grad_relerr_max": float(np.max(rec["chain_relerr"])),
        "base_track_relerr_max": float(np.max(rec["track_relerr"])),
        "hypergrad_norm_ratio_mean": float(np.mean(rec["hg_norm_ratio"])),
        "nonfinite_count": int(rec["nonfinite_count"]),
        "seconds_incl_compile": seconds,
    }


# ----------------------------------------------------------------------------- cost


def measure_cost(cfg: Config, methods: dict[str, Any], data: dict) -> dict[str, dict[str, float]]:
    """Per method: median seconds of one jitted hypergradient call and its XLA temp bytes.

    Same inputs for every method (λ = 0, w = w*(0), fresh SGD and method state). The methods are
    timed interleaved, one call each per round, so that drift hits all of them alike. Must be
    called with x64 enabled.
    """
    base_loss, meta_loss = make_losses(cfg.beta)
    base_tx = optimizers(cfg)["base"]()
    problem = BilevelProblem(base_loss, meta_loss, base_tx)
    x, y, xm, ym = (jnp.asarray(data[k], jnp.float64) for k in ("x", "y", "xm", "ym"))
    lam = jnp.zeros(cfg.d, jnp.float64)
    w = closed_form_w(lam, x, y, cfg.beta)
    s = base_tx.init(w)

    fns, args, out = {}, {}, {}
    for name, method in methods.items():

        def step(w, lam, s, state, x, y, xm, ym, method=method):
            hg, state = method.hypergrad(problem, BilevelInputs(w, lam, s, (x, y), (xm, ym)), state)
            return hg.meta_grad, state

        args[name] = (w, lam, s, method.init(w, lam), x, y, xm, ym)
        compiled = jax.jit(step).lower(*args[name]).compile()
        mem = compiled.memory_analysis()
        if mem is None:
            raise RuntimeError(f"{name}: XLA gave no memory analysis for the compiled step")
        fns[name] = compiled
        out[name] = {
            "temp_bytes": int(mem.temp_size_in_bytes),
            "times": [],
        }
        for _ in range(cfg.timing_warmup):
            jax.block_until_ready(compiled(*args[name]))
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: no collector pauses inside the timed calls
    try:
        for _ in range(cfg.timing_calls):
            for name, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args[name]))
                out[name]["times"].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    for r in out.values():
        r["step_seconds_median"] = float(np.median(r.pop("times")))
    ref = out["sama"]["step_seconds_median"]
    for r in out.values():
        r["time_ratio_vs_sama"] = r["step_seconds_median"] / ref
    return out


def run_experiment(cfg: Config = Config()) -> dict[str, Any]:
    """Every method on one data set; returns the JSON-ready result. Enables x64 only inside."""
    with jax.enable_x64(True):
        data = make_data(cfg)
        lam_star = solve_lambda_star(data["x"], data["y"], data["xm"], data["ym"], cfg.beta)
        x, y, xm, ym = (jnp.asarray(data[k], jnp.float64) for k in ("x", "y", "xm", "ym"))
        xs = (x, y, xm, ym)
        g_star = np.asarray(closed_form_meta_grad(jnp.asarray(lam_star), *xs, cfg.beta))
        g_zero = np.asarray(closed_form_meta_grad(jnp.zeros(cfg.d, jnp.float64), *xs, cfg.beta))
        opt_loss = float(meta_objective(jnp.asarray(lam_star), *xs, cfg.beta))
        h_min, h_max = base_hessian_eigs(data["x"], cfg.beta)
        methods = make_methods(cfg, h_max)
        out: dict[str, Any] = {}
        for name in METHODS:
            out[name] = run_method(cfg, methods[name], data, lam_star)
            out[name]["meta_loss_optimal"] = opt_loss
            out[name]["settings"] = repr(methods[name])
        cost = measure_cost(cfg, {k: methods[k] for k in METHODS}, data)
        for name in METHODS:
            out[name].update(cost[name])
    out["config"] = {
        **harness.to_json(cfg),
        "base_steps": cfg.meta_interval * cfg.meta_steps,
        "optimizers": {k: repr(v) for k, v in optimizers(cfg).items()},
        "methods": {name: repr(methods[name]) for name in METHODS},
        "base_hessian_eig_min": h_min,
        "base_hessian_eig_max": h_max,
        "neumann_eta": cfg.step_frac / h_max,
        "soba_rho": cfg.step_frac / h_max,
        "dtype": "float64",
        "lambda_star_norm": float(np.linalg.norm(lam_star)),
        "closed_form_grad_norm_at_lambda_star": float(np.linalg.norm(g_star)),
        "closed_form_grad_norm_at_lambda_0": float(np.linalg.norm(g_zero)),
    }
    return out


# ----------------------------------------------------------------------------- output

_STYLE = {  # label, line style (methods with identical curves get different dashes)
    "sama": ("SAMA", "-"),
    "sama_na": ("SAMA-NA", "--"),
    "darts": ("DARTS", ":"),
    "dds": ("DDS", "-."),
    "neumann": ("Neumann", "-"),
    "cg": ("CG", "-"),
    "exact": ("Exact", "--"),
    "itd": ("ITD", "-"),
    "soba": ("SOBA", "-"),
}


def write_png(result: dict[str, Any], path: str) -> None:
    """Three panels: 1 − cosine to the closed form, ‖λ_t − λ*‖/‖λ_0 − λ*‖, time ratio vs SAMA."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 5))
    colors = dict(zip(METHODS, matplotlib.color_sequences["tab10"]))  # = tab10 colormap's colors
    for key in METHODS:
        label, ls = _STYLE[key]
        r, c = result[key], colors[key]
        one_minus = np.maximum(1.0 - np.asarray(r["cos"]), 1e-16)
        ax1.plot(one_minus, ls, color=c, lw=1.6, label=f"{label}: cos mean {r['cos_mean']:.5f}")
        dist = np.asarray(r["dist"])
        ax2.plot(dist / dist[0], ls, color=c, lw=1.6)
    ax1.set_yscale("log")
    ax1.set_xlabel("meta step")
    ax1.set_ylabel("1 − cosine(hypergradient, closed form)  [log]")
    ax1.set_title("Meta-gradient direction (lower is better)")
    ax1.axhline(0.1, color="gray", lw=0.8, ls=":")
    ax2.set_xlabel("meta step")
    ax2.set_ylabel(r"$\|\lambda_t-\lambda^*\| / \|\lambda_0-\lambda^*\|$")
    ax2.set_yscale("log")
    ax2.set_title("Distance to the closed-form optimum")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ratios = [result[k]["time_ratio_vs_sama"] for k in METHODS]
    bars = ax3.bar([_STYLE[k][0] for k in METHODS], ratios, color=[colors[k] for k in METHODS])
    for b, k in zip(bars, METHODS):
        ax3.annotate(
            f"{result[k]['time_ratio_vs_sama']:.2f}×\n{result[k]['temp_bytes'] / 1024:.0f} KiB",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    ax3.set_yscale("log")
    ax3.set_ylim(top=max(ratios) * 2)
    ax3.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax3.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax3.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax3.set_ylabel("time of one jitted hypergradient / SAMA's  [log]")
    ax3.set_title("Cost per meta step (label: time ratio, XLA temp memory)")
    ax3.tick_params(axis="x", rotation=45)
    ax3.grid(alpha=0.3, axis="y")
    c = result["config"]
    fig.suptitle(
        f"Biased regression (n={c['n']}, d={c['d']}, beta={c['beta']}, float64): "
        f"SGD lr={c['base_lr']}, K={c['meta_interval']}, Adam lr={c['meta_lr']}, "
        f"seed={c['seed']}; timings on {result['provenance']['device']['platform'].upper()}",
        fontsize=10,
    )
    fig.legend(loc="lower center", ncol=5, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(result: dict[str, Any]) -> str:
    lines = [
        f"{'method':<8} {'cos_mean':>9} {'cos_min':>9} {'dist_ratio':>11} {'t/sama':>7} "
        f"{'temp_B':>8} {'run_s':>6}  settings"
    ]
    for key in METHODS:
        r = result[key]
        lines.append(
            f"{key:<8} {r['cos_mean']:>9.5f} {r['cos_min']:>9.5f} {r['dist_ratio']:>11.4g} "
            f"{r['time_ratio_vs_sama']:>7.2f} {r['temp_bytes']:>8d} {r['seconds_incl_compile']:>6.2f}"
            f"  {r['settings']}"
        )
    return "\n".join(lines)


CLI = harness.StudyCLI(
    "biased_regression",
    __doc__,
    quick="the same runs with 30 instead of 300 timed calls per method (the cost columns are "
    "rougher)",
    seeds="the seed of the data (one value; default 0)",
    base_steps=f"SGD steps of w per run: {Config.meta_interval} per meta step (default "
    f"{Config.meta_interval * Config.meta_steps}); fixes --meta-steps",
    meta_steps=f"meta steps (λ updates) per method (default {Config.meta_steps})",
)
CLI.add_argument("--base-lr", type=float, default=Config.base_lr, help="SGD learning rate of w")
CLI.add_argument("--meta-lr", type=float, default=Config.meta_lr, help="Adam learning rate of λ")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (module docstring): run the study and write its results."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    seeds = CLI.seeds(args, default=(Config.seed,), quick=(Config.seed,))
    if len(seeds) != 1:
        CLI.error("--seeds: this study runs one seed (the data); give one value")
    _, meta_steps = CLI.steps(
        args,
        per_meta=Config.meta_interval,
        default=Config.meta_steps,
        quick=Config.meta_steps,
    )
    cfg = Config(seed=seeds[0], meta_steps=meta_steps, base_lr=args.base_lr, meta_lr=args.meta_lr)
    if args.quick:
        cfg = dataclasses.replace(cfg, timing_calls=30, timing_warmup=3)
    result = run_experiment(cfg)
    print(_summary(result))
    return run_.finish(result, write_png)


if __name__ == "__main__":
    main()
