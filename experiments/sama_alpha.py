r"""SAMA's radius α on the main job: which ``ε = α/‖v‖`` to default to.

::

    python -m experiments.sama_alpha [--alphas A ...] [--seeds N ...] [--base-steps N | --meta-steps N]
                                     [--quick] [--json PATH] [--no-progress]

SAMA's hypergradient is the central difference
``h = −[∇_λL_b(θ+εv) − ∇_λL_b(θ−εv)]/(2ε)`` with ``ε = α/‖v‖``, so α is the length of the
perturbation of θ. Too large and the difference leaves the region where ``∇_λL_b`` is linear in θ;
too small and float32 cancellation takes over. This study runs the main job
(:mod:`experiments.noisy_labels_demo`: MNIST-5k, 40 % symmetric label noise, MLP 784-256-10 with
Adam, a Meta-Weight-Net trained by SAMA with ``adapt_from="last"``, 3,000 base steps, 300 meta
steps) for each α and seed, with everything else at the main job's :class:`Config`, and records the
clean test accuracy of the final model. The plain baseline does not depend on α (it is the same run
for every α of a seed; it is recorded once per seed).

The library's default (``bj.sama()``) is chosen from this table: ``experiments/README.md``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import harness
from experiments import noisy_labels_demo as demo

__all__ = ["ALPHAS", "main", "plot"]

ALPHAS = (0.03, 0.1, 0.3, 1.0)
"""The α values of the default sweep."""

QUICK_META_STEPS = 3


def plot(result: dict, path: str) -> None:
    """PNG: final clean test accuracy per seed against α (log axis), and the plain baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    alphas = [row["alpha"] for row in result["alphas"]]
    for j in range(len(result["seeds"])):
        acc = [row["sama"]["acc"][j] for row in result["alphas"]]
        ax.plot(
            alphas,
            acc,
            "o-",
            color="tab:blue",
            alpha=0.35,
            label="SAMA, one seed" if j == 0 else None,
        )
    ax.plot(
        alphas,
        [row["sama"]["mean"] for row in result["alphas"]],
        "o-",
        color="tab:blue",
        lw=2.5,
        label="SAMA, mean",
    )
    ax.axhline(result["plain"]["mean"], color="tab:red", ls="--", label="plain (mean)")
    ax.set(xscale="log", xlabel="α  (ε = α/‖v‖)", ylabel="clean test accuracy (final model)")
    ax.set_title("main job: MNIST-5k, 40% label noise", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLI = harness.StudyCLI(
    "sama_alpha",
    __doc__,
    quick=f"α 0.1 and 1.0, {QUICK_META_STEPS} meta steps, seed 0 (smoke test)",
    seeds="seeds of the main job (default 0 1 ... 9; quick: 0)",
    base_steps=f"base steps of each run (default {demo.Config.base_steps}); a multiple of "
    f"{demo.Config.meta_interval}",
    meta_steps=f"meta steps of each SAMA run (default "
    f"{demo.Config.base_steps // demo.Config.meta_interval})",
)
CLI.add_argument(
    "--alphas",
    type=float,
    nargs="+",
    default=None,
    metavar="A",
    help=f"the α values (default {' '.join(map(str, ALPHAS))}; quick: 0.1 1.0)",
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: every α × seed of the main job (module docstring)."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    seeds = CLI.seeds(args, default=tuple(range(10)))
    alphas = list(args.alphas or ((0.1, 1.0) if args.quick else ALPHAS))
    if any(not a > 0 for a in alphas):
        CLI.error(f"--alphas must be positive, got {alphas}")
    base_steps, _ = CLI.steps(
        args,
        per_meta=demo.Config.meta_interval,
        default=demo.Config.base_steps // demo.Config.meta_interval,
        quick=QUICK_META_STEPS,
    )
    ds = data_lib.load_mnist5k()
    run_.data(ds.source)
    plain: dict[int, float] = {}
    rows = []
    for alpha in alphas:
        cfg = dataclasses.replace(demo.Config(), method=bj.sama(alpha=alpha, adapt_from="last"))
        accs, skipped = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            res = demo.run(
                seed, base_steps, config=cfg, progress=run_.progress, dataset=ds, log=None
            )
            plain.setdefault(seed, res["plain"])
            accs.append(res["sama"])
            skipped.append(res["nonfinite_meta_steps"])
            print(
                f"alpha {alpha:g} seed {seed}: plain {res['plain']:.4f}  SAMA {res['sama']:.4f}  "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
        rows.append(
            {
                "alpha": alpha,
                "method": repr(cfg.method),
                "sama": harness.summarize(accs, seeds),
                "worst": float(min(accs)),
                "skipped_meta_steps": skipped,
            }
        )
    plain_acc = [plain[s] for s in seeds]
    print(f"\nclean test accuracy over seeds {seeds} (plain mean {np.mean(plain_acc):.4f}):")
    print("  alpha    mean    worst   per seed")
    for row in rows:
        per = " ".join(f"{a:.3f}" for a in row["sama"]["acc"])
        print(f"  {row['alpha']:>5g}   {row['sama']['mean']:.4f}  {row['worst']:.4f}   {per}")
    out = {
        "seeds": seeds,
        "base_steps": base_steps,
        # the main job's settings; each row's method replaces Config.method
        "config": {
            k: v
            for k, v in harness.to_json(
                dataclasses.replace(demo.Config(), base_steps=base_steps)
            ).items()
            if k != "method"
        },
        "plain": harness.summarize(plain_acc, seeds),
        "alphas": rows,
    }
    return run_.finish(out, plot, records=())


if __name__ == "__main__":
    main()
