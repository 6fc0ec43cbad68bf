r"""Per-parameter weight-decay tuning for logistic regression on real digits (thesis §2.5.5 style).

Every hypergradient method of the library tunes the same 64 weight-decay coefficients of a logistic
regression on the same data, with the same base optimizer, meta optimizer, seed, batches and number
of meta steps; only the hypergradient differs.

Data (real, shipped with scikit-learn): scikit-learn's 8x8 digits (1,797 × 64, pixels scaled to [0, 1]), binary
task **even vs odd digit** (y = digit mod 2; a linear model reaches only ≈ 0.90 accuracy and the
cross-validated logistic loss has an interior optimum in the regularisation strength, so weight
decay matters). ``stratified_split`` over the ten digit classes gives validation (30 per digit =
300, the meta objective), test (60 per digit = 600) and train (the remaining 897).

Problem. θ = (w ∈ R⁶⁴, b), λ ∈ R⁶⁴ (one log-decay per weight, the bias is not decayed)::

    L_b(θ, λ) = mean BCE(train; θ) + Σ_j exp(λ_j) w_j²        ∇_λ L_b = exp(λ) ⊙ w²
    L_m(θ)    = mean BCE(validation; θ)

Training (:class:`Config`). θ₀ = 0, λ₀ = log(1e-3) for every weight. Base optimizer, identical for
all methods: full-batch ``optax.adam(0.05, eps_root=1e-8)`` (``eps_root > 0`` so that ITD and DDS
can differentiate through Adam: the derivative of Adam's ``sqrt(ν)`` is infinite where the second
moment ν is 0; docs/precision.md). ``warmup_steps`` base steps at λ₀ first (shared), then every
meta step is: one update of λ by ``optax.chain(bj.meta_grad(L_b, L_m, base_tx, method,
base_params=θ₀), optax.adam(meta_lr))`` at the current (θ, Adam state), followed by
``K = meta_interval`` base steps (:func:`bilevel_jax.base_step`) with the new λ (θ and its Adam
state are warm-started, never reset). The validation loss is recorded after each meta step's base
steps; ``val_loss[0]`` is the loss after the warm-up. Base steps per run (``--base-steps``):
``warmup_steps + K · meta_steps``; meta steps (``--meta-steps``): ``meta_steps``.

Methods (:func:`make_methods`; the ``repr`` of each is recorded in the JSON): ``sama()`` (α = 1,
adapted to Adam), ``sama_na()``, ``darts()`` (α = 0.01), ``neumann(20, η=0.5)``, ``cg(20)``,
``exact()`` (dense 65×65 Hessian), ``itd(K)`` (reverse mode through the same K Adam steps the base
loop takes next), ``soba(ρ=0.5)``, ``dds()`` (one Adam step). ``∇_λ L_b`` is quadratic in w, so the central differences of SAMA / SAMA-NA / DARTS are
exact: they differ from the implicit methods only by the matrix that replaces H⁻¹ (the Adam
adaptation matrix, I, I).

Timing (CPU): each method's jitted meta step (meta update + K base steps + validation
loss) is compiled and run once on a copy of the start state, then the whole run is timed step by
step with ``block_until_ready``: ``wall_s`` is the cumulative wall time, ``step_ms_median`` the
median step. Ratios against SAMA (same process) are the meaningful numbers; absolute CPU times are
noise.

Baselines (same warm-up + T·K base steps from θ₀, λ fixed): *no tuning* (λ = λ₀) and the best
*single shared* decay from a 9-point log grid, chosen on the validation loss. Each method's learned λ
is also *refit* the same way (θ retrained from θ₀ at the final λ, fixed), which compares λ's on equal
terms with the grid.

Run::

    python -m experiments.weight_decay [--quick] [--meta-steps T] [--json PATH]
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import harness
from experiments.harness import Recipe

__all__ = [
    "Config",
    "METHODS",
    "load_task",
    "base_loss",
    "meta_loss",
    "make_methods",
    "run_method",
    "run_experiment",
    "main",
]

PyTree = Any

METHODS = ("sama", "sama_na", "darts", "neumann", "cg", "exact", "itd", "soba", "dds")


@dataclasses.dataclass(frozen=True)
class Config:
    """All hyper-parameters of the study (written to the JSON ``config``)."""

    seed: int = 0
    val_per_digit: int = 30  # validation = meta objective: 300 images
    test_per_digit: int = 60  # test: 600 images; train = the remaining 897
    base_lr: float = 0.05  # optax.adam(base_lr, eps_root=base_eps_root), full batch
    base_eps_root: float = 1e-8
    warmup_steps: int = 200  # base steps at λ₀ before the first meta step (shared by all)
    meta_interval: int = 10  # K: base steps per meta step
    meta_steps: int = 200  # T
    meta_lr: float = 0.05  # optax.adam on λ (log-decay units per step)
    decay0: float = 1e-3  # λ₀ = log(decay0) for every weight
    grid_lo: float = 1e-5  # shared-decay grid: 9 log-spaced values in [grid_lo, grid_hi]
    grid_hi: float = 1e-1
    grid_n: int = 9


def quick_config() -> Config:
    """The ``--quick`` variant (a few seconds of training; compile time dominates)."""
    return dataclasses.replace(Config(), warmup_steps=100, meta_steps=40)


def make_methods(cfg: Config) -> dict[str, Any]:
    """name -> method object (ITD unrolls the K base steps the loop takes after a meta step)."""
    return {
        "sama": bj.sama(alpha=1.0),
        "sama_na": bj.sama_na(alpha=1.0),
        "darts": bj.darts(alpha=0.01),
        "neumann": bj.neumann(maxiter=20, eta=0.5),
        "cg": bj.cg(maxiter=20),
        "exact": bj.exact(),
        "itd": bj.itd(unroll=cfg.meta_interval),
        "soba": bj.soba(rho=0.5),
        "dds": bj.dds(),
    }


def optimizers(cfg: Config) -> dict[str, Recipe]:
    """The base optimizer (every method, full batch) and the meta optimizer chained after
    ``bj.meta_grad`` (recipes, recorded by ``repr``)."""
    return {
        "base": Recipe(optax.adam, cfg.base_lr, eps_root=cfg.base_eps_root),
        "meta": Recipe(optax.adam, cfg.meta_lr),
    }


# ----------------------------------------------------------------------------- data and losses


def load_task(cfg: Config) -> dict[str, Any]:
    """Digits even-vs-odd, stratified (per digit) into train / val / test; float32 jnp arrays."""
    ds = data_lib.load_digits()
    x = np.asarray(ds.x, np.float32)
    y = (np.asarray(ds.y) % 2).astype(np.float32)  # 1 = odd digit
    idx = data_lib.stratified_split(
        ds.y, {"val": cfg.val_per_digit, "test": cfg.test_per_digit}, seed=cfg.seed
    )
    out = {k: (jnp.asarray(x[i]), jnp.asarray(y[i])) for k, i in idx.items()}
    info = {
        "source": dict(ds.source),
        "task": "even vs odd digit (label 1 = odd)",
        "features": int(x.shape[1]),
        "split": "experiments.data.stratified_split over the 10 digit classes, "
        f"seed={cfg.seed}: val {cfg.val_per_digit}/digit, test {cfg.test_per_digit}/digit, "
        "train = rest",
        "sizes": {k: int(i.size) for k, i in idx.items()},
        "positive_fraction": {k: float(y[i].mean()) for k, i in idx.items()},
        "constant_features": int(np.sum(x.std(0) == 0)),
    }
    return {"batches": out, "info": info}


def logits(theta: PyTree, x: jax.Array) -> jax.Array:
    return x @ theta["w"] + theta["b"]


def bce(theta: PyTree, batch) -> jax.Array:
    x, y = batch
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(theta, x), y))


def base_loss(theta: PyTree, lam: jax.Array, batch) -> jax.Array:
    """``mean BCE(train) + Σ_j exp(λ_j) w_j²`` (the bias is not decayed)."""
    return bce(theta, batch) + jnp.sum(jnp.exp(lam) * theta["w"] ** 2)


def meta_loss(theta: PyTree, lam: jax.Array, batch) -> jax.Array:
    """``mean BCE(validation)``; independent of λ."""
    del lam
    return bce(theta, batch)


def accuracy(theta: PyTree, batch) -> jax.Array:
    x, y = batch
    return jnp.mean((logits(theta, x) > 0).astype(jnp.float32) == y)


def init_theta(d: int) -> PyTree:
    return {"w": jnp.zeros((d,), jnp.float32), "b": jnp.zeros((), jnp.float32)}


def make_base_tx(cfg: Config) -> optax.GradientTransformation:
    return optimizers(cfg)["base"]()


# ----------------------------------------------------------------------------- training


def _base_steps(cfg: Config, theta, s, lam, train, n: int):
    tx = make_base_tx(cfg)

    def step(carry, _):
        r = bj.base_step(base_loss, tx, *carry, lam, train)
        return (r.params, r.opt_state), None

    (theta, s), _ = lax.scan(step, (theta, s), None, length=n)
    return theta, s


def make_fixed_trainer(cfg: Config):
    """Jitted ``λ -> θ`` after warm-up + T·K base steps from θ₀ at fixed λ (baselines, refits)."""
    n = cfg.warmup_steps + cfg.meta_steps * cfg.meta_interval
    tx = make_base_tx(cfg)

    @jax.jit
    def train_fixed(lam, train):
        theta = init_theta(lam.shape[0])
        theta, _ = _base_steps(cfg, theta, tx.init(theta), lam, train, n)
        return theta

    return train_fixed


def _evaluate(theta, lam, b) -> dict[str, float]:
    return {
        "val_loss": float(bce(theta, b["val"])),
        "test_loss": float(bce(theta, b["test"])),
        "test_acc": float(accuracy(theta, b["test"])),
        "train_loss": float(bce(theta, b["train"])),
        "train_acc": float(accuracy(theta, b["train"])),
    }


def run_method(cfg: Config, method, batches: dict, train_fixed) -> dict[str, Any]:
    """Tune λ with one method; returns the JSON entry (timings after a warm-up compile)."""
    train, val = batches["train"], batches["val"]
    d = train[0].shape[1]
    base_tx = make_base_tx(cfg)
    theta0 = init_theta(d)
    meta_tx = optax.chain(
        bj.meta_grad(base_loss, meta_loss, base_tx, method, base_params=theta0),
        optimizers(cfg)["meta"](),
    )

    @jax.jit
    def warmup(lam, train):
        theta, s = _base_steps(cfg, theta0, base_tx.init(theta0), lam, train, cfg.warmup_steps)
        return theta, s

    @jax.jit
    def meta_step(carry, train, val):
        theta, s, lam, ms = carry
        upd, ms = meta_tx.update(
            jnp.zeros_like(lam),
            ms,
            lam,
            base_params=theta,
            base_opt_state=s,
            base_batch=train,
            meta_batch=val,
        )
        lam = cast(jax.Array, optax.apply_updates(lam, upd))  # λ is one array
        theta, s = _base_steps(cfg, theta, s, lam, train, cfg.meta_interval)
        return (theta, s, lam, ms), meta_loss(theta, lam, val)

    lam0 = jnp.full((d,), math.log(cfg.decay0), jnp.float32)
    theta, s = warmup(lam0, train)
    start = (theta, s, lam0, meta_tx.init(lam0))
    val0 = float(meta_loss(theta, lam0, val))

    t0 = time.perf_counter()
    jax.block_until_ready(meta_step(start, train, val))  # compile + one step, discarded
    compile_s = time.perf_counter() - t0

    carry = start
    val_loss, wall = [val0], [0.0]
    step_s = []
    t_start = time.perf_counter()
    for _ in range(cfg.meta_steps):
        t = time.perf_counter()
        carry, v = meta_step(carry, train, val)
        v = jax.block_until_ready(v)
        now = time.perf_counter()
        step_s.append(now - t)
        wall.append(now - t_start)
        val_loss.append(float(v))
    theta, _, lam, ms = carry
    meta_grad_state: bj.MetaGradState = cast(tuple, ms)[0]  # ms: the chain's state

    lam_np = np.asarray(lam)
    decay = np.exp(lam_np)
    out: dict[str, Any] = {
        "val_loss": val_loss,
        "wall_s": wall,
        "final_val_loss": val_loss[-1],
        **{k: v for k, v in _evaluate(theta, lam, batches).items() if k != "val_loss"},
        "step_ms_median": 1e3 * float(np.median(step_s)),
        "compile_and_first_step_s": compile_s,
        "total_s": wall[-1],
        "nonfinite_count": int(meta_grad_state.nonfinite_count),
        "decay_final": {
            "min": float(decay.min()),
            "median": float(np.median(decay)),
            "max": float(decay.max()),
            "geomean": float(np.exp(lam_np.mean())),
        },
        "lambda_final": lam_np.tolist(),
    }
    refit = train_fixed(lam, train)
    out["refit"] = _evaluate(refit, lam, batches)
    return out


def _hypergrad_cosines(cfg: Config, methods: dict, batches: dict) -> dict[str, float]:
    """Cosine of each method's first hypergradient with ``exact``'s, at the shared start point."""
    train, val = batches["train"], batches["val"]
    d = train[0].shape[1]
    base_tx = make_base_tx(cfg)
    theta0 = init_theta(d)
    lam0 = jnp.full((d,), math.log(cfg.decay0), jnp.float32)
    theta, s = jax.jit(
        lambda: _base_steps(cfg, theta0, base_tx.init(theta0), lam0, train, cfg.warmup_steps)
    )()
    problem = bj.BilevelProblem(base_loss, meta_loss, base_tx)
    inputs = bj.BilevelInputs(theta, lam0, s, train, val)
    grads = {}
    for name, method in methods.items():
        state = method.init(theta0, lam0)
        hg, _ = jax.jit(lambda st, m=method: m.hypergrad(problem, inputs, st))(state)
        grads[name] = np.asarray(hg.meta_grad, np.float64)
    ref = grads["exact"]
    return {
        k: float(g @ ref / (np.linalg.norm(g) * np.linalg.norm(ref) + 1e-30))
        for k, g in grads.items()
    }


def run_experiment(
    cfg: Config = Config(), methods: tuple[str, ...] = METHODS, run: harness.Run | None = None
) -> dict[str, Any]:
    """All methods and both baselines; returns the JSON-ready result (``run``: records the
    data file read)."""
    task = load_task(cfg)
    if run is not None:
        run.data(task["info"]["source"])
    batches = task["batches"]
    train = batches["train"]
    d = train[0].shape[1]
    train_fixed = make_fixed_trainer(cfg)
    all_methods = make_methods(cfg)

    # Baselines: λ fixed, same number of base steps from θ₀.
    grid = np.exp(np.linspace(math.log(cfg.grid_lo), math.log(cfg.grid_hi), cfg.grid_n))
    rows = []
    for c in grid:
        theta = train_fixed(jnp.full((d,), math.log(c), jnp.float32), train)
        rows.append({"decay": float(c), **_evaluate(theta, None, batches)})
    best = min(rows, key=lambda r: r["val_loss"])
    theta = train_fixed(jnp.full((d,), math.log(cfg.decay0), jnp.float32), train)
    baselines = {
        "no_tuning": {"decay": cfg.decay0, **_evaluate(theta, None, batches)},
        "best_shared": best,
        "shared_grid": rows,
        "base_steps": cfg.warmup_steps + cfg.meta_steps * cfg.meta_interval,
    }

    out: dict[str, Any] = {}
    for name in methods:
        method = all_methods[name]
        r = run_method(cfg, method, batches, train_fixed)
        r["settings"] = repr(method)
        out[name] = r
        print(
            f"  {name:<8} val {r['final_val_loss']:.4f}  test acc {r['test_acc']:.4f}  "
            f"{r['step_ms_median']:.3f} ms/step  (compile {r['compile_and_first_step_s']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    if "sama" in out:
        for name in methods:
            out[name]["step_ms_ratio_vs_sama"] = (
                out[name]["step_ms_median"] / out["sama"]["step_ms_median"]
            )
    if "exact" in methods:
        cos = _hypergrad_cosines(cfg, {k: all_methods[k] for k in methods}, batches)
        for name in methods:
            out[name]["cos_to_exact_at_start"] = cos[name]

    out["baselines"] = baselines
    out["config"] = {
        **harness.to_json(cfg),
        "base_steps": cfg.warmup_steps + cfg.meta_steps * cfg.meta_interval,
        "optimizers": {k: repr(v) for k, v in optimizers(cfg).items()},
        "methods": list(methods),
    }
    out["data"] = task["info"]
    return out


# ----------------------------------------------------------------------------- output

LABELS = {
    "sama": "SAMA",
    "sama_na": "SAMA-NA",
    "darts": "DARTS",
    "neumann": "Neumann",
    "cg": "CG",
    "exact": "Exact",
    "itd": "ITD",
    "soba": "SOBA",
    "dds": "DDS",
}


def write_png(result: dict[str, Any], path: str) -> None:
    """Two panels: validation loss vs meta step and vs wall time, all methods and baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    methods = [m for m in METHODS if m in result]
    cmap = plt.get_cmap("tab10")
    for i, m in enumerate(methods):
        r = result[m]
        ls = "-" if i < 5 else "--"
        kw = {
            "color": cmap(i),
            "ls": ls,
            "lw": 1.4,
            "label": f"{LABELS[m]} ({r['final_val_loss']:.4f})",
        }
        ax1.plot(np.arange(len(r["val_loss"])), r["val_loss"], **kw)
        ax2.plot(r["wall_s"], r["val_loss"], **kw)
    b = result["baselines"]
    for ax in (ax1, ax2):
        ax.axhline(
            b["no_tuning"]["val_loss"],
            color="k",
            ls=":",
            lw=1,
            label=f"no tuning, decay {b['no_tuning']['decay']:.0e} ({b['no_tuning']['val_loss']:.4f})",
        )
        ax.axhline(
            b["best_shared"]["val_loss"],
            color="gray",
            ls="-.",
            lw=1,
            label=f"best shared decay {b['best_shared']['decay']:.1e} ({b['best_shared']['val_loss']:.4f})",
        )
        ax.grid(alpha=0.3)
        ax.set_ylabel("validation BCE")
    ax1.set_xlabel("meta step")
    ax1.set_title("Validation loss vs meta step")
    ax2.set_xlabel("cumulative wall time after compile (s)")
    ax2.set_title("Validation loss vs wall time (CPU; dispatch-dominated)")
    lo = min(min(result[m]["val_loss"]) for m in methods)
    hi = max(result[m]["val_loss"][0] for m in methods)
    pad = 0.1 * (hi - lo)
    ax1.set_ylim(lo - pad, hi + pad)
    ax1.legend(fontsize=7, ncol=2)
    c = result["config"]
    fig.suptitle(
        f"Per-weight decay, logistic regression, digits even vs odd: base Adam({c['base_lr']}), "
        f"K={c['meta_interval']}, T={c['meta_steps']}, meta Adam({c['meta_lr']}), seed {c['seed']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(result: dict[str, Any]) -> str:
    """A text table of the results."""
    lines = [
        f"{'method':<9} {'val_loss':>9} {'test_acc':>9} {'test_loss':>9} {'refit_val':>9} "
        f"{'ms/step':>8} {'xSAMA':>6}"
    ]
    for m in METHODS:
        if m not in result:
            continue
        r = result[m]
        lines.append(
            f"{m:<9} {r['final_val_loss']:>9.4f} {r['test_acc']:>9.4f} {r['test_loss']:>9.4f} "
            f"{r['refit']['val_loss']:>9.4f} {r['step_ms_median']:>8.3f} "
            f"{r.get('step_ms_ratio_vs_sama', float('nan')):>6.2f}"
        )
    b = result["baselines"]
    for k in ("no_tuning", "best_shared"):
        lines.append(
            f"{k:<12} decay {b[k]['decay']:.2e}: val {b[k]['val_loss']:.4f} "
            f"test acc {b[k]['test_acc']:.4f} test loss {b[k]['test_loss']:.4f}"
        )
    return "\n".join(lines)


CLI = harness.StudyCLI(
    "weight_decay",
    __doc__,
    quick="100 warm-up steps and 40 meta steps (a few seconds of training; compile time dominates)",
    seeds="the seed of the data split (one value; default 0)",
    base_steps=f"base steps per run: warm-up + {Config.meta_interval} per meta step (default "
    f"{Config.warmup_steps} + {Config.meta_interval}·{Config.meta_steps}); fixes --meta-steps",
    meta_steps=f"meta steps (λ updates) per method (default {Config.meta_steps}; quick 40)",
)
CLI.add_argument("--val-per-digit", type=int, default=None, help="validation images per digit")
CLI.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (module docstring): run the study and write its results."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    cfg = quick_config() if args.quick else Config()
    seeds = CLI.seeds(args, default=(cfg.seed,), quick=(cfg.seed,))
    if len(seeds) != 1:
        CLI.error("--seeds: this study runs one seed (the data split); give one value")
    _, meta_steps = CLI.steps(
        args,
        per_meta=cfg.meta_interval,
        default=cfg.meta_steps,
        quick=cfg.meta_steps,
        warmup=cfg.warmup_steps,
    )
    cfg = dataclasses.replace(cfg, meta_steps=meta_steps, seed=seeds[0])
    if args.val_per_digit is not None:
        cfg = dataclasses.replace(cfg, val_per_digit=args.val_per_digit)
    result = run_experiment(cfg, tuple(args.methods), run=run_)
    print(summary(result))
    return run_.finish(result, write_png)


if __name__ == "__main__":
    main()
