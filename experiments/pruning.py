r"""Meta-learned data pruning on real MNIST digits vs heuristic scores (SAMA paper §4.3).

    python -m experiments.pruning [--quick] [--seeds 0 1 2] [--base-steps N] [--json PATH]

Data: the 5,000 MNIST digits of :func:`experiments.data.load_mnist5k` (path and sha256 in the JSON),
split per seed into a clean *test* set (100 per class) and a clean *train* set (4,000). Labels are
not corrupted. Only the train set is scored, pruned and trained on; there is no validation set.

Search (scores; higher = more important = kept; the lowest ``ratio`` fraction is pruned):

* ``sama`` — a Meta-Weight-Net :class:`LossUncertaintyWeightNet` maps each example's
  (stop-gradient) loss and *uncertainty* ``u_i = ‖softmax f_θ(x_i) − softmax f_θ̄(x_i)‖₁`` (θ̄ an
  EMA of θ with decay 0.99 per base step, carried as the model state of
  ``bj.bilevel_step(..., stateful=True)``) to a weight in (0, 1). Base loss ``Σ w_i ℓ_i / Σ w_i`` on
  a train batch; meta loss: the plain cross entropy on *another* train batch (meta level on the
  training data). :data:`SEARCH_METHOD` ``= bj.sama(alpha=0.1, adapt_from="last")``, meta Adam 1e-2, one meta step per 10 base
  steps, ``search_epochs`` epochs; the score is the MWN weight of every train example averaged over
  the ends of the last ``score_epochs`` epochs.
* ``random`` — uniform random scores. ``el2n`` — ``‖softmax f_θ(x_i) − onehot(y_i)‖₂`` and
  ``grand`` — ``‖∇_θ ℓ_i(θ)‖₂`` (Paul et al. 2021), both at a model trained for
  ``proxy_epochs`` epochs (one initialisation, not an average over several). ``margin`` —
  ``−(f_y − max_{c≠y} f_c)`` at the same early model (small margin = hard = kept).
  ``forgetting`` — Toneva et al. 2019, counted at the end of every epoch of a ``search_epochs``
  run (correct → incorrect transitions; never-learned examples get the largest score).

Evaluation: for every ratio in 0.1, 0.3, 0.5, 0.7 and every method, an MLP 784-256-10 is
retrained *from scratch* (same initialisation as the full run of that seed) on the kept examples
for the same number of base steps as the full run (``train_steps``, ``--base-steps``; Adam 1e-3,
batch 100), and
its clean test accuracy reported (mean ± std over seeds). ``full`` is the unpruned run.
``search_time_ratio``: the wall time of a method's search (training + scoring, compiled; the
median over seeds of runs made after a warm-up run) divided by the median time of one full
training run, in the same process.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import harness
from experiments.harness import Recipe
from experiments.models import MLP, ReweightLosses, split, weighted_cross_entropy

__all__ = [
    "RATIOS",
    "METHODS",
    "Config",
    "LossUncertaintyWeightNet",
    "PruneLosses",
    "el2n_scores",
    "grand_scores",
    "margin_scores",
    "forgetting_scores",
    "keep_indices",
    "run",
    "main",
]

PyTree = Any

RATIOS = (0.1, 0.3, 0.5, 0.7)
METHODS = ("sama", "random", "el2n", "grand", "forgetting", "margin")

SEARCH_METHOD = bj.sama(alpha=0.1, adapt_from="last")
"""The hypergradient method of the SAMA search (that of the noisy-label study)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters (recorded in the JSON); optimizers as in the noisy-label study."""

    batch_size: int = 100
    hidden: tuple[int, ...] = (256,)
    lr: float = 1e-3  # Adam on θ (every training run)
    meta_lr: float = 1e-2  # Adam on the weight net
    meta_interval: int = 10
    mwn_hidden: int = 100
    test_per_class: int = 100
    train_steps: int = 2000  # full training and every retraining (50 epochs of the full set)
    search_epochs: int = 15  # SAMA search and forgetting run
    score_epochs: int = 5  # SAMA: average the weights over the ends of the last epochs
    proxy_epochs: int = 5  # EL2N, GraNd, margin: early-training model
    ema_decay: float = 0.99


# ----------------------------------------------------------------------------------------------
# Meta-Weight-Net on (loss, uncertainty) and the bilevel losses


class LossUncertaintyWeightNet(nnx.Module):
    """``(ℓ, u) ↦ σ(W₂ relu(W₁[ℓ, u] + b₁) + b₂)``; the output layer starts at 0 (every w = 0.5)."""

    def __init__(self, hidden: int = 100, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(2, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, 1, rngs=rngs)
        self.fc2.kernel[...] = jnp.zeros_like(self.fc2.kernel[...])

    def __call__(self, feats: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(feats))))[:, 0]


class PruneLosses(ReweightLosses):
    """Stateful losses for ``bj.bilevel_step(..., stateful=True)``; the model state is the EMA θ̄."""

    def __init__(self, model_def, wnet_def, ema_decay: float):
        super().__init__(model_def, wnet_def, "sum")
        self.ema_decay = ema_decay

    def features(self, logits: jax.Array, ema_logits: jax.Array, y: jax.Array) -> jax.Array:
        """Stop-gradient ``[ℓ_i, u_i]`` of a batch (``u_i``: L1 distance of the predictions)."""
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        u = jnp.sum(jnp.abs(jax.nn.softmax(logits) - jax.nn.softmax(ema_logits)), -1)
        return jax.lax.stop_gradient(jnp.stack([ce, u], -1))

    def example_weights(self, theta, lam, ema, x, y) -> jax.Array:
        feats = self.features(self.logits(theta, x), self.logits(ema, x), y)
        return nnx.merge(self.mwn_def, lam)(feats)

    def base(self, theta, lam, batch, ema):
        x, y = batch
        logits = self.logits(theta, x)
        w = nnx.merge(self.mwn_def, lam)(self.features(logits, self.logits(ema, x), y))
        loss = weighted_cross_entropy(logits, y, w, "sum")
        d = self.ema_decay
        new_ema = jax.tree.map(lambda e, t: d * e + (1 - d) * jax.lax.stop_gradient(t), ema, theta)
        return loss, new_ema

    def meta(self, theta, lam, batch, ema):
        del ema
        return super().meta(theta, lam, batch)


# ----------------------------------------------------------------------------------------------
# Heuristic scores (pure functions, tested against direct per-example computations)


def el2n_scores(logits: jax.Array, y: jax.Array) -> jax.Array:
    """EL2N: ``‖softmax(logits_i) − onehot(y_i)‖₂``."""
    return jnp.linalg.norm(jax.nn.softmax(logits) - jax.nn.one_hot(y, logits.shape[-1]), axis=-1)


def margin_scores(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Negative margin ``−(logits_{i,y} − max_{c≠y} logits_{i,c})`` (high = hard)."""
    true = jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
    other = jnp.max(
        jnp.where(jax.nn.one_hot(y, logits.shape[-1], dtype=bool), -jnp.inf, logits), -1
    )
    return -(true - other)


def grand_scores(loss_i, theta: PyTree, x: jax.Array, y: jax.Array, chunk: int = 200) -> jax.Array:
    """GraNd: ``‖∇_θ loss_i(θ, x_i, y_i)‖₂`` per example (vmapped per-example gradients, chunked)."""

    def one(xy):
        g = jax.grad(loss_i)(theta, xy[0], xy[1])
        return jnp.sqrt(sum(jnp.sum(jnp.square(v)) for v in jax.tree.leaves(g)))

    return jax.lax.map(one, (x, y), batch_size=chunk)


def forgetting_scores(correct: np.ndarray) -> np.ndarray:
    """Forgetting events per example from a (checkpoints, n) bool history of correctness.

    An event is a correct → incorrect transition between consecutive checkpoints. Examples never
    classified correctly get ``checkpoints`` (more than any possible count), as in Toneva et al.
    """
    correct = np.asarray(correct, bool)
    events = np.sum(correct[:-1] & ~correct[1:], axis=0).astype(np.float64)
    events[~correct.any(axis=0)] = correct.shape[0]
    return events


def keep_indices(scores: np.ndarray, ratio: float) -> np.ndarray:
    """Indices of the ``n − round(ratio·n)`` highest scores (the pruned ones have the lowest)."""
    scores = np.asarray(scores)
    n_keep = scores.size - int(round(ratio * scores.size))
    return np.sort(np.argsort(-scores, kind="stable")[:n_keep])


# ----------------------------------------------------------------------------------------------
# The study


class Study:
    """Compiled-once training, search and retraining functions for the MLP on MNIST-5k."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.losses = PruneLosses(
            split(self.model(0))[0],
            nnx.split(LossUncertaintyWeightNet(cfg.mwn_hidden, rngs=nnx.Rngs(0)))[0],
            cfg.ema_decay,
        )
        self.tx = self.optimizers()["base"]()
        self.train_seg = harness.plain_segment(self.losses.plain, self.tx)
        self.step = bj.bilevel_step(
            self.losses.base,
            self.losses.meta,
            self.tx,
            self.optimizers()["meta"](),
            SEARCH_METHOD,
            stateful=True,
        )
        self.search_seg = harness.bilevel_segment(self.step)
        self.logits = jax.jit(self.losses.logits)
        self.weights = jax.jit(self.losses.example_weights)
        self.accuracy = jax.jit(self.losses.accuracy)

        def loss_i(theta, x, y):
            return optax.softmax_cross_entropy_with_integer_labels(
                self.losses.logits(theta, x[None]), y[None]
            )[0]

        self.grand = jax.jit(lambda th, x, y: grand_scores(loss_i, th, x, y))

    def model(self, seed: int) -> MLP:
        """The MLP 784-256-10 initialised from ``seed``."""
        return MLP((784, *self.cfg.hidden, 10), rngs=nnx.Rngs(seed))

    def optimizers(self) -> dict[str, Recipe]:
        """Base (every training run and the search) and meta optimizer (recipes)."""
        return {
            "base": Recipe(optax.adam, self.cfg.lr),
            "meta": Recipe(optax.adam, self.cfg.meta_lr),
        }

    def epoch_steps(self, n: int) -> int:
        return n // self.cfg.batch_size

    def train(self, theta0, idx, x, y, chunks: int = 1, on_chunk=None):
        """Train from θ₀ over the (steps, B) indices ``idx`` in ``chunks`` jitted calls."""
        theta, s = theta0, self.tx.init(theta0)
        per = len(idx) // chunks
        for c in range(chunks):
            theta, s, _ = self.train_seg(theta, s, idx[c * per : (c + 1) * per], x, y)
            if on_chunk is not None:
                on_chunk(theta)
        return jax.block_until_ready(theta)

    def retrain(self, kept: np.ndarray, *, theta0, data: tuple, seed: int) -> float:
        """Test accuracy after training from θ₀ on the ``kept`` examples for ``train_steps``."""
        x, y, x_te, y_te = data
        idx = harness.batch_indices(len(kept), self.cfg.train_steps, self.cfg.batch_size, seed + 1)
        return float(self.accuracy(self.train(theta0, kept[idx], x, y), x_te, y_te))

    # -- searches: each returns scores over the train set --------------------------------------
    def search(self, method: str, theta0, wnet0, x, y, seed: int) -> np.ndarray:
        cfg, n = self.cfg, len(y)
        ep = self.epoch_steps(n)
        if method == "random":
            return np.random.default_rng(seed + 777).random(n)
        if method in ("el2n", "grand", "margin"):
            idx = harness.batch_indices(n, cfg.proxy_epochs * ep, cfg.batch_size, seed + 2)
            theta = self.train(theta0, idx, x, y)
            if method == "grand":
                return np.asarray(self.grand(theta, x, y))
            fn = el2n_scores if method == "el2n" else margin_scores
            return np.asarray(fn(self.logits(theta, x), y))
        if method == "forgetting":
            idx = harness.batch_indices(n, cfg.search_epochs * ep, cfg.batch_size, seed + 2)
            hist = []
            self.train(
                theta0,
                idx,
                x,
                y,
                chunks=cfg.search_epochs,
                on_chunk=lambda th: hist.append(
                    np.asarray(jnp.argmax(self.logits(th, x), -1) == y)
                ),
            )
            return forgetting_scores(np.stack(hist))
        if method == "sama":
            k = cfg.meta_interval
            ep_meta = ep // k
            steps = cfg.search_epochs * ep_meta * k
            idx = harness.batch_indices(n, steps, cfg.batch_size, seed + 2).reshape(
                -1, k, cfg.batch_size
            )
            meta_idx = harness.batch_indices(n, len(idx), cfg.batch_size, seed + 3)
            state = self.step.init(theta0, wnet0, model_state=theta0)
            acc = np.zeros(n)
            for e in range(cfg.search_epochs):
                sl = slice(e * ep_meta, (e + 1) * ep_meta)
                state, _ = self.search_seg(state, idx[sl], x, y, x, y, meta_idx[sl])
                if e >= cfg.search_epochs - cfg.score_epochs:
                    acc += np.asarray(
                        self.weights(state.base_params, state.meta_params, state.model_state, x, y)
                    )
            self.last_state = state
            return acc / cfg.score_epochs
        raise ValueError(f"unknown method {method!r}")


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run(
    seeds: list[int],
    config: Config | None = None,
    ratios=RATIOS,
    methods=METHODS,
    progress: bool = True,
    dataset: data_lib.Dataset | None = None,
) -> dict:
    """Search, prune and retrain for every seed; return the result dict (module docstring)."""
    from tqdm.auto import tqdm

    cfg = config or Config()
    ds = dataset if dataset is not None else data_lib.load_mnist5k()
    study = Study(cfg)
    acc = {r: {m: [] for m in methods} for r in ratios}
    full_acc, full_t, search_t = [], [], {m: [] for m in methods}
    diag: dict[str, Any] = {
        "sama_weight_range": [],
        "score_spearman_vs_el2n": {m: [] for m in methods},
    }
    curve_records = []
    t_start = time.perf_counter()
    bar = tqdm(
        total=len(seeds) * (1 + len(methods) * (1 + len(ratios))),
        disable=not progress,
        file=sys.stdout,
        mininterval=1.0,
    )
    for si, seed in enumerate(seeds):
        tr = data_lib.stratified_split(ds.y, {"test": cfg.test_per_class}, seed)
        x, y = jnp.asarray(ds.x[tr["train"]]), jnp.asarray(ds.y[tr["train"]])
        x_te, y_te = jnp.asarray(ds.x[tr["test"]]), jnp.asarray(ds.y[tr["test"]])
        n = len(y)
        theta0 = split(study.model(seed))[1]
        wnet0 = nnx.to_pure_dict(
            nnx.split(LossUncertaintyWeightNet(cfg.mwn_hidden, rngs=nnx.Rngs(seed + 10_000)))[1]
        )

        retrain = functools.partial(
            study.retrain, theta0=theta0, data=(x, y, x_te, y_te), seed=seed
        )

        bar.set_description(f"s{seed} full")
        if si == 0:
            retrain(np.arange(n))  # warm-up (compile) before timing
        a, t = _timed(retrain, np.arange(n))
        full_acc.append(a)
        full_t.append(t)
        bar.update(1)
        scores = {}
        for m in methods:
            bar.set_description(f"s{seed} search {m}")
            if si == 0:
                study.search(m, theta0, wnet0, x, y, seed)  # warm-up (compile)
            scores[m], t = _timed(study.search, m, theta0, wnet0, x, y, seed)
            search_t[m].append(t)
            bar.update(1)
            if not np.all(np.isfinite(scores[m])):
                raise FloatingPointError(f"{m} produced non-finite scores (seed {seed})")
        diag["sama_weight_range"].append(
            [float(scores["sama"].min()), float(scores["sama"].max())] if "sama" in scores else None
        )
        if "el2n" in scores:
            r_el2n = np.argsort(np.argsort(scores["el2n"]))
            for m in methods:
                r_m = np.argsort(np.argsort(scores[m]))
                diag["score_spearman_vs_el2n"][m].append(float(np.corrcoef(r_el2n, r_m)[0, 1]))
        for r in ratios:
            for m in methods:
                bar.set_description(f"s{seed} ratio {r} {m}")
                acc[r][m].append(retrain(keep_indices(scores[m], r)))
                bar.update(1)
            bar.set_postfix({m: f"{acc[r][m][-1]:.3f}" for m in methods}, refresh=False)
        if si == 0 and "sama" in scores:
            # weight vs loss of the final search state, for the plot
            st = study.last_state
            feats = np.asarray(
                study.losses.features(
                    study.logits(st.base_params, x), study.logits(st.model_state, x), y
                )
            )
            sub = np.random.default_rng(0).choice(n, size=min(600, n), replace=False)
            diag["sama_final_weight_vs_features"] = {
                "loss": [round(float(v), 4) for v in feats[sub, 0]],
                "uncertainty": [round(float(v), 4) for v in feats[sub, 1]],
                "score": [round(float(v), 4) for v in scores["sama"][sub]],
            }
        curve_records.append(
            {
                "seed": seed,
                "full": full_acc[-1],
                **{f"ratio_{r}/{m}": acc[r][m][-1] for r in ratios for m in methods},
            }
        )
    bar.close()
    t_full = float(np.median(full_t))
    result: dict[str, Any] = {}
    for r in ratios:
        result[f"ratio_{r}"] = {
            m: {
                **harness.summarize(acc[r][m], seeds),
                "search_time_ratio": float(np.median(search_t[m])) / t_full,
                "kept": n - int(round(r * n)),
            }
            for m in methods
        }
    result["full"] = {**harness.summarize(full_acc, seeds), "train_s_median": t_full, "kept": n}
    result["search_time_ratio"] = {m: float(np.median(search_t[m])) / t_full for m in methods}
    result["diagnostics"] = diag
    result["config"] = {
        **harness.to_json(cfg),
        "seeds": list(seeds),
        "ratios": list(ratios),
        "methods": list(methods),
        "search_method": repr(SEARCH_METHOD),
        "optimizers": {k: repr(v) for k, v in study.optimizers().items()},
    }
    result["data"] = dict(ds.source)
    result["per_seed_records"] = curve_records
    result["wall_s"] = time.perf_counter() - t_start
    return result


def plot(result: dict, path: str) -> None:
    """PNG: test accuracy vs prune ratio per method; SAMA score vs (loss, uncertainty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios, methods = result["config"]["ratios"], result["config"]["methods"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for m in methods:
        ax1.errorbar(
            ratios,
            [result[f"ratio_{r}"][m]["mean"] for r in ratios],
            yerr=[result[f"ratio_{r}"][m]["std"] for r in ratios],
            marker="o",
            capsize=3,
            label=f"{m} (search {result['search_time_ratio'][m]:.2f}× train)",
        )
    ax1.axhline(result["full"]["mean"], color="k", ls=":", label="no pruning")
    ax1.set(
        xlabel="prune ratio (fraction removed)",
        ylabel="clean test accuracy",
        title="MNIST-5k train (4,000): retrain from scratch on kept data",
    )
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    wf = result["diagnostics"].get("sama_final_weight_vs_features")
    if wf:
        sc = ax2.scatter(wf["loss"], wf["score"], c=wf["uncertainty"], s=6, cmap="viridis")
        fig.colorbar(sc, ax=ax2, label="uncertainty |p − p_EMA|₁ (final)")
        ax2.set_xscale("log")
        ax2.set(
            xlabel="per-example loss (final search model)",
            ylabel="SAMA score (avg MWN weight)",
            title=f"SAMA pruning scores, seed {result['config']['seeds'][0]}",
        )
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    ratios, methods = result["config"]["ratios"], result["config"]["methods"]
    print(
        f"\ntest accuracy, mean ± std over seeds {result['config']['seeds']} "
        f"(no pruning {result['full']['mean']:.3f} ± {result['full']['std']:.3f})"
    )
    print(
        f"{'method':<12}" + "".join(f"{'ratio ' + str(r):>16}" for r in ratios) + "  search/train"
    )
    for m in methods:
        cells = "".join(
            f"{result[f'ratio_{r}'][m]['mean']:>9.3f}±{result[f'ratio_{r}'][m]['std']:.3f}"
            for r in ratios
        )
        print(f"{m:<12}{cells}  {result['search_time_ratio'][m]:.2f}")


QUICK = {"train_steps": 200, "search_epochs": 2, "score_epochs": 1, "proxy_epochs": 1}
"""``--quick``: the Config fields it changes."""

CLI = harness.StudyCLI(
    "pruning",
    __doc__,
    quick="200-step retraining, 2-epoch searches, 1-epoch proxies, seed 0 (smoke test)",
    seeds="seeds of the split, initialisations and batch order (default 0 1 2; quick: 0)",
    base_steps=f"base steps of the full training run and of every retraining (default "
    f"{Config.train_steps}; quick {QUICK['train_steps']}); the searches are set in epochs "
    "(Config.search_epochs, proxy_epochs)",
    meta_steps=harness.Unused(
        "the SAMA search runs Config.search_epochs epochs (4 meta steps each), the same length "
        "as the forgetting baseline's run"
    ),
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring): run the study and write its results."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    seeds = CLI.seeds(args)
    cfg = dataclasses.replace(Config(), **QUICK) if args.quick else Config()
    if args.base_steps is not None:
        cfg = dataclasses.replace(cfg, train_steps=args.base_steps)
    ds = data_lib.load_mnist5k()
    run_.data(ds.source)
    result = run(seeds, cfg, progress=run_.progress, dataset=ds)
    print_table(result)
    return run_.finish(result, plot, result["per_seed_records"])


if __name__ == "__main__":
    main()
