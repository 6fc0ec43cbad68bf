r"""Biased regression: SAMA against the closed-form meta-gradient (Choe et al. 2023, appendix E).

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
``optax.chain(bj.meta_grad(L_b, L_m, sgd, method), optax.adam(meta_lr))`` for SAMA
(``bj.sama()``) and SAMA-NA (``bj.sama_na()``). Each run is one jitted ``lax.scan`` over meta steps
with an inner ``lax.scan`` over base steps.

Defaults (:class:`Config`): n = 500, d = 50, σ = 0.5, β = 0.1, seed 0; SGD lr 0.4 (the base Hessian
2A/n has eigenvalues ≈ 0.94…3.5, so SGD contracts by ≈ 0.6 per step), K = 20 base steps (w stays
within ~1e-5 relative of w*(λ_t)); 100 meta steps of Adam(lr = 10) from λ_0 = 0, w_0 = 0; α = 1.
The meta objective is badly scaled: λ only moves w through βA⁻¹ (≈ 2e-4·I), so the meta-gradient
is ~1e-4 while λ* has norm ~1e3. Adam's scale invariance absorbs this; its lr is in λ's units.

Recorded at every meta step t (λ_t is the meta parameter *before* update t):

* ``cos[t]``  — cosine between the method's hypergradient at (w_t, λ_t) (``bj.sama_hypergrad`` with
  the transform's arguments) and the closed-form meta-gradient at w*(λ_t);
* ``dist[t]`` — ‖λ_t − λ*‖ for t = 0..T (T+1 entries; ``dist_ratio = dist[T]/dist[0]``).

The run also checks that the gradient Adam actually consumed (recovered from its first moment,
``g = (μ_t − b1 μ_{t−1})/(1 − b1)``) equals that hypergradient (``chain_grad_relerr``).

What to expect: L_b is quadratic in w, so SAMA's central difference is exact and its estimate is
``(2β/n) v`` with ``v = J_u(g)ᵀ ∇_w L_m``. For SGD the adaptation is ``J_u = base_lr · I``, so SAMA
returns ``(2β·base_lr/n) ∇_w L_m(w)``: implicit differentiation with A⁻¹ replaced by a multiple of
I. SAMA-NA (``v = ∇_w L_m``) is the same vector divided by base_lr, so under SGD both have the *same
cosine* (up to rounding) and, because Adam is nearly scale invariant, nearly the same trajectory.
The cosine is therefore a measure of how isotropic A is along ∇_w L_m.

Run::

    python -m experiments.biased_regression --json experiments/results/biased_regression.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import bilevel_jax as bj

__all__ = [
    "Config",
    "make_data",
    "make_losses",
    "closed_form_w",
    "closed_form_meta_grad",
    "meta_objective",
    "solve_lambda_star",
    "run_method",
    "run_experiment",
    "main",
]


@dataclasses.dataclass(frozen=True)
class Config:
    """All hyper-parameters of the study (written to the JSON ``config``)."""

    seed: int = 0
    n: int = 500  # rows of X and of X'
    d: int = 50  # features
    noise_std: float = 0.5
    beta: float = 0.1
    base_lr: float = 0.4  # optax.sgd; stable below 2/λ_max(2A/n) ≈ 0.58 for n=500, d=50
    base_steps: int = 20  # K: SGD steps between meta steps (warm start, w never reset)
    meta_steps: int = 100
    # optax.adam on λ. λ* has norm ~1.1e3 (~160 per coordinate) and Adam moves each coordinate by
    # at most ~meta_lr per step, so the step is in λ's units; swept {1,2,3,5,8,10,20} on seed 0.
    meta_lr: float = 10.0
    meta_b1: float = 0.9
    meta_b2: float = 0.999
    meta_eps: float = 1e-8
    alpha: float = 1.0  # SAMA's ε = α/‖v‖ (the paper's default)


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


# ----------------------------------------------------------------------------- training


def _cos(a, b):
    return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))


@partial(jax.jit, static_argnames=("cfg", "method"))
def _run_scan(cfg: Config, method: bj.SAMA, x, y, xm, ym, lam_star):
    base_loss, meta_loss = make_losses(cfg.beta)
    base_tx = optax.sgd(cfg.base_lr)
    meta_tx = optax.chain(
        bj.meta_grad(base_loss, meta_loss, base_tx, method),
        optax.adam(cfg.meta_lr, b1=cfg.meta_b1, b2=cfg.meta_b2, eps=cfg.meta_eps),
    )
    base_batch, meta_batch = (x, y), (xm, ym)
    a_chol = jax.scipy.linalg.cho_factor(_a_matrix(x, cfg.beta), lower=True)
    xty = x.T @ y

    def w_star(lam):
        return jax.scipy.linalg.cho_solve(a_chol, xty + cfg.beta * lam)

    def true_grad(lam):
        w = w_star(lam)
        return cfg.beta * jax.scipy.linalg.cho_solve(a_chol, 2.0 * xm.T @ (xm @ w - ym) / xm.shape[0])

    def base_step(carry, _):
        w, s, lam = carry
        g = jax.grad(base_loss)(w, lam, base_batch)
        upd, s = base_tx.update(g, s, w)
        return (optax.apply_updates(w, upd), s, lam), None

    def meta_step(carry, _):
        w, s, lam, ms = carry
        (w, s, _), _ = lax.scan(base_step, (w, s, lam), None, length=cfg.base_steps)
        # The hypergradient the transform computes (same arguments, same method settings).
        hg = bj.sama_hypergrad(
            base_loss,
            meta_loss,
            base_params=w,
            meta_params=lam,
            base_tx=base_tx,
            base_opt_state=s,
            base_batch=base_batch,
            meta_batch=meta_batch,
            alpha=method.alpha,
            adapt=method.adapt,
            adapt_from=method.adapt_from,
            difference=method.difference,
        ).meta_grad
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

    w0 = jnp.zeros(x.shape[1], x.dtype)
    lam0 = jnp.zeros(x.shape[1], x.dtype)
    carry = (w0, base_tx.init(w0), lam0, meta_tx.init(lam0))
    (w, _, lam, ms), rec = lax.scan(meta_step, carry, None, length=cfg.meta_steps)
    rec["dist"] = jnp.concatenate([rec["dist"], jnp.linalg.norm(lam - lam_star)[None]])
    rec["nonfinite_count"] = ms[0].nonfinite_count
    return lam, rec


def run_method(cfg: Config, method: bj.SAMA, data: dict, lam_star: np.ndarray) -> dict[str, Any]:
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


def run_experiment(cfg: Config = Config()) -> dict[str, Any]:
    """Both methods on one data set; returns the JSON-ready result. Enables x64 only inside."""
    with jax.enable_x64(True):
        data = make_data(cfg)
        lam_star = solve_lambda_star(data["x"], data["y"], data["xm"], data["ym"], cfg.beta)
        xs = [jnp.asarray(data[k], jnp.float64) for k in ("x", "y", "xm", "ym")]
        g_star = np.asarray(closed_form_meta_grad(jnp.asarray(lam_star), *xs, cfg.beta))
        g_zero = np.asarray(closed_form_meta_grad(jnp.zeros(cfg.d, jnp.float64), *xs, cfg.beta))
        opt_loss = float(meta_objective(jnp.asarray(lam_star), *xs, cfg.beta))
        out: dict[str, Any] = {}
        for name, method in (("sama", bj.sama(cfg.alpha)), ("sama_na", bj.sama_na(cfg.alpha))):
            out[name] = run_method(cfg, method, data, lam_star)
            out[name]["meta_loss_optimal"] = opt_loss
    out["config"] = {
        **dataclasses.asdict(cfg),
        "base_optimizer": f"optax.sgd({cfg.base_lr})",
        "meta_optimizer": (
            f"optax.chain(bj.meta_grad(..., method), optax.adam({cfg.meta_lr}, b1={cfg.meta_b1}, "
            f"b2={cfg.meta_b2}, eps={cfg.meta_eps}))"
        ),
        "methods": {"sama": "bj.sama(alpha)", "sama_na": "bj.sama_na(alpha)"},
        "sama_options": "adapt_from='fresh', difference='vmap', base_step=False (library defaults)",
        "losses": "L_b = (||Xw-y||^2 + beta||w-lam||^2)/n, L_m = ||X'w-y'||^2/n' (both scaled by 1/n)",
        "init": "w_0 = 0, lam_0 = 0; full batch; w warm-started across meta steps",
        "dtype": "float64",
        "lambda_star_norm": float(np.linalg.norm(lam_star)),
        "closed_form_grad_norm_at_lambda_star": float(np.linalg.norm(g_star)),
        "closed_form_grad_norm_at_lambda_0": float(np.linalg.norm(g_zero)),
        "versions": {"jax": jax.__version__, "optax": optax.__version__, "python": sys.version.split()[0]},
    }
    return out


# ----------------------------------------------------------------------------- output


def write_png(result: dict[str, Any], path: str) -> None:
    """Two panels: cosine to the closed-form meta-gradient, and ‖λ_t − λ*‖/‖λ_0 − λ*‖."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"sama": ("SAMA", "-"), "sama_na": ("SAMA-NA", "--")}
    for key, (label, ls) in styles.items():
        r = result[key]
        ax1.plot(np.arange(len(r["cos"])), r["cos"], ls, label=f"{label} (mean {r['cos_mean']:.3f})")
        dist = np.asarray(r["dist"])
        ax2.plot(np.arange(len(dist)), dist / dist[0], ls, label=f"{label} (final {r['dist_ratio']:.3g})")
    ax1.set_xlabel("meta step")
    ax1.set_ylabel("cosine(hypergradient, closed form)")
    ax1.set_title("Meta-gradient direction")
    ax1.set_ylim(min(0.0, ax1.get_ylim()[0]), 1.02)
    ax1.axhline(0.9, color="gray", lw=0.8, ls=":")
    ax2.set_xlabel("meta step")
    ax2.set_ylabel(r"$\|\lambda_t-\lambda^*\| / \|\lambda_0-\lambda^*\|$")
    ax2.set_yscale("log")
    ax2.set_title("Distance to the closed-form optimum")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    c = result["config"]
    fig.suptitle(
        f"Biased regression (n={c['n']}, d={c['d']}, beta={c['beta']}): SGD lr={c['base_lr']}, "
        f"K={c['base_steps']}, Adam lr={c['meta_lr']}, seed={c['seed']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _summary(result: dict[str, Any]) -> str:
    lines = [f"{'method':<9} {'cos_mean':>9} {'cos_min':>9} {'dist_ratio':>11} {'seconds':>8}"]
    for key in ("sama", "sama_na"):
        r = result[key]
        lines.append(
            f"{key:<9} {r['cos_mean']:>9.4f} {r['cos_min']:>9.4f} {r['dist_ratio']:>11.4g} "
            f"{r['seconds_incl_compile']:>8.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", required=True, help="where to write the results")
    p.add_argument("--png", default=None, help="figure path (default: the JSON path with .png)")
    p.add_argument("--steps", type=int, default=Config.meta_steps, help="meta steps per method")
    p.add_argument("--seed", type=int, default=Config.seed)
    p.add_argument("--base-steps", type=int, default=Config.base_steps, help="K")
    p.add_argument("--base-lr", type=float, default=Config.base_lr)
    p.add_argument("--meta-lr", type=float, default=Config.meta_lr)
    args = p.parse_args(argv)
    cfg = Config(
        seed=args.seed,
        meta_steps=args.steps,
        base_steps=args.base_steps,
        base_lr=args.base_lr,
        meta_lr=args.meta_lr,
    )
    t0 = time.perf_counter()
    result = run_experiment(cfg)
    result["config"]["total_seconds"] = time.perf_counter() - t0
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    png = args.png or os.path.splitext(args.json)[0] + ".png"
    write_png(result, png)
    print(_summary(result))
    print(f"wrote {args.json} and {png}")
    return result


if __name__ == "__main__":
    main()
