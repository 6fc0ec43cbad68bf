r"""Trilevel domain adaptation on real MNIST digits: reweight → pretrain → finetune (Betty's example).

    python -m experiments.multilevel [--quick] [--seeds 0 1 2 3 4] [--meta-steps N]
                                     [--set FIELD=VALUE ...] [--json PATH]

Data: the 5,000 MNIST digits of :func:`experiments.data.load_mnist5k` (path and sha256 in the
JSON), split per seed by :func:`experiments.data.stratified_split` into a labelled *target train*
set (10 per class), a *target validation* set (10 per class, the reweighting level's judge), a
*target test* set (100 per class, only for the reported accuracy) and the *pretraining* set (the
remaining 3,800 digits, 380 per class).

**The conflicting sub-domain** (:func:`conflicting_domain`): in every class an exact fraction
``conflict_fraction`` (0.4: 152 of 380 digits per class, chosen at random per seed) of the
pretraining digits is labelled by a different, fixed rule, the derangement ``π(y) = (y + 1) mod
10`` ("a 3 is called 4"); the other 60 % and every target digit keep the true label. The images are
untouched, so nothing but the label tells the two sub-domains apart: a model pretrained on all of
it learns the consistent rule only by a 60/40 vote and memorises the rest.

**The three levels** (:mod:`bilevel_jax.multilevel`, problems lowest level first):

* ``pretrain`` (level 0): an MLP 784-64-10, loss ``mean_i w_i ℓ_i`` on a pretraining batch with
  ``w_i = 2σ(λ_i)`` read from ``reweight`` (its current parameters; ``w = 1`` at ``λ = 0``, so the
  trilevel starts as uniform pretraining). Adam, ``pretrain_unroll`` steps per finetune step.
* ``finetune`` (level 1): a second MLP 784-64-10 (same initialisation), loss ``mean ℓ`` on the whole
  target train set ``+ (μ/2)‖θ_ft − θ_pt*‖²`` with ``θ_pt*`` pretrain's best response (the
  proximal term through which the pretrained model transfers and through which the upper level's
  gradient flows). SGD, ``finetune_unroll`` steps per reweight step.
* ``reweight`` (level 2, top): one logit ``λ_i`` per pretraining digit (3,800 parameters, start 0),
  loss: the finetuned model's cross entropy on the target validation set. Adam. (``--set
  weighting=net``: instead a small label-agreement net shared by all digits, ``logit(x, y) =
  (relu(x W + b) U)[y] + c[y]`` with ``U, c`` starting at 0; see :meth:`Study.weight_logits`.)

Its gradient is one reverse sweep over the path ``(reweight, finetune, pretrain, reweight)``, with
the same best-response method on both edges: ``sama`` = ``bj.sama(adapt_from="fresh")``,
``sama_na`` = ``bj.sama_na()``, ``darts`` = ``bj.darts()``, ``cg`` = ``bj.cg(cg_iters)``.

**Baselines** (the same data, initialisation, batches and step counts):

* ``target_only``: the finetune MLP trained on the target train set alone (SGD, no proximal term)
  for as many steps as the finetune level takes;
* ``two_level``: pretrain (uniform weights) → finetune, the two lower problems of the trilevel as a
  two-problem graph with the same schedule (no reweighting level);
* ``oracle``: ``two_level`` with the pretraining batches drawn from the consistent digits only.

Reported per method: target test accuracy of the finetuned model at the end (mean ± std over
seeds), the pretrained model's target test accuracy, and for the trilevel methods the ROC AUC of
the learned weights ``w_i`` for consistent (positive) vs conflicting pretraining digits
(:func:`weight_auc`). ``time_ratio``: the median over seeds of a method's compiled run time (the
whole run is one jitted ``lax.scan``; compilation is done first and timed separately) divided by
the median time of the ``two_level`` run, in the same process.
"""

from __future__ import annotations

import dataclasses
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
from bilevel_jax.multilevel import Problem, multilevel_step
from experiments import data as data_lib
from experiments import harness
from experiments.harness import Recipe
from experiments.models import MLP, split

__all__ = [
    "METHODS",
    "TRILEVEL",
    "Config",
    "conflicting_domain",
    "weight_auc",
    "edge_methods",
    "Study",
    "run",
    "main",
]

PyTree = Any

TRILEVEL = ("sama", "sama_na", "darts", "cg")
"""The trilevel runs, named by the best-response method on both of their edges."""

METHODS = ("target_only", "two_level", "oracle", *TRILEVEL)


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters (recorded in the JSON)."""

    hidden: int = 64
    conflict_fraction: float = 0.4
    target_train_per_class: int = 10
    target_val_per_class: int = 10
    test_per_class: int = 100
    pretrain_batch: int = 200
    pretrain_unroll: int = 3  # pretrain steps per finetune step
    finetune_unroll: int = 2  # finetune steps per reweight step
    reweight_steps: int = 400  # steps of the top level (meta steps)
    pretrain_lr: float = 1e-3  # Adam
    finetune_lr: float = 0.1  # SGD
    prox: float = 0.3  # μ of the finetune level's proximal term
    reweight_lr: float = 0.05  # Adam on the per-example logits
    cg_iters: int = 5
    weighting: str = "logits"  # "logits": one λ_i per digit; "net": a label-agreement net
    weight_net_hidden: int = 32

    @property
    def pretrain_steps(self) -> int:
        return self.reweight_steps * self.finetune_unroll * self.pretrain_unroll

    @property
    def finetune_steps(self) -> int:
        return self.reweight_steps * self.finetune_unroll


# ----------------------------------------------------------------------------------------------
# Data: the conflicting sub-domain, and the AUC of the learned weights


def conflicting_domain(
    y: np.ndarray, fraction: float, seed: int, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, conflicting)``: in every class, exactly ``round(fraction · count)`` examples
    (chosen at random) relabelled by the fixed rule ``π(y) = (y + 1) mod num_classes``.

    ``conflicting`` is the bool mask of the relabelled examples; the others keep their label.
    """
    y = np.asarray(y)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    mask = np.zeros(y.shape, bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        mask[rng.choice(idx, size=int(round(fraction * idx.size)), replace=False)] = True
    labels = np.where(mask, (y + 1) % num_classes, y).astype(y.dtype)
    return labels, mask


def weight_auc(weights: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC of ``weights`` as a score for ``positive`` (Mann–Whitney U with average ranks):
    the probability that a positive example's weight exceeds a negative one's, ties counting ½."""
    w = np.asarray(weights, np.float64).ravel()
    pos = np.asarray(positive, bool).ravel()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("weight_auc needs both positive and negative examples")
    _, inverse, counts = np.unique(w, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average_rank = ends - (counts - 1) / 2.0  # 1-based rank of each distinct value, ties averaged
    ranks = average_rank[inverse]
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def edge_methods(cfg: Config) -> dict[str, Any]:
    """The best-response method of both trilevel edges, per trilevel run."""
    return {
        "sama": bj.sama(adapt_from="fresh"),
        "sama_na": bj.sama_na(),
        "darts": bj.darts(),
        "cg": bj.cg(cfg.cg_iters),
    }


# ----------------------------------------------------------------------------------------------
# The study


class Study:
    """The losses, graphs and compiled whole-run functions of every method."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.model_def = split(self.model(0))[0]
        self.opt = self.optimizers()
        self.methods = edge_methods(cfg)
        self.accuracy = jax.jit(self._accuracy)
        self.fns = {
            "target_only": self._target_only(),
            "two_level": self._two_level(),
            "oracle": self._two_level(),
            **{m: self._trilevel(self.methods[m]) for m in TRILEVEL},
        }
        self.compiled: dict[str, Any] = {}
        self.compile_s: dict[str, float] = {}

    def model(self, seed: int) -> MLP:
        """The MLP 784-hidden-10 initialised from ``seed``."""
        return MLP((784, self.cfg.hidden, 10), rngs=nnx.Rngs(seed))

    def optimizers(self) -> dict[str, Recipe]:
        c = self.cfg
        return {
            "pretrain": Recipe(optax.adam, c.pretrain_lr),
            "finetune": Recipe(optax.sgd, c.finetune_lr),
            "reweight": Recipe(optax.adam, c.reweight_lr),
        }

    # -- losses --------------------------------------------------------------------------------
    def _ce(self, theta, x, y):
        logits = nnx.merge(self.model_def, theta)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def _accuracy(self, theta, x, y):
        return jnp.mean(jnp.argmax(nnx.merge(self.model_def, theta)(x), -1) == y)

    def pretrain_weighted(self, theta, reads, batch):
        """``mean_i 2σ(λ_i) ℓ_i`` on a pretraining batch ``(x, y, i)``."""
        x, y, i = batch
        w = 2.0 * jax.nn.sigmoid(self.weight_logits(reads["reweight"], x, y, i))
        return jnp.mean(w * self._ce(theta, x, y))

    def weight_logits(self, lam, x, y, i):
        """The weight logits of pretraining digits ``i`` (images ``x``, labels ``y``).

        ``"logits"``: ``λ[i]``. ``"net"``: ``(relu(x W + b) U)[y] + c[y]``, a label-agreement
        score shared by all digits (``U``, ``c`` start at 0, so every weight starts at 1)."""
        if self.cfg.weighting == "logits":
            return lam[i]
        h = jax.nn.relu(x @ lam["W"] + lam["b"])
        return jnp.take_along_axis(h @ lam["U"] + lam["c"], y[:, None], 1)[:, 0]

    def init_weighting(self, n: int, seed: int) -> PyTree:
        """The reweighting level's starting parameters (every weight 1)."""
        if self.cfg.weighting == "logits":
            return jnp.zeros((n,), jnp.float32)
        if self.cfg.weighting != "net":
            raise ValueError(f"weighting must be 'logits' or 'net', got {self.cfg.weighting!r}")
        k = self.cfg.weight_net_hidden
        w = jax.random.normal(jax.random.key(seed + 20_000), (784, k)) / np.sqrt(784.0)
        return {
            "W": w.astype(jnp.float32),
            "b": jnp.zeros((k,), jnp.float32),
            "U": jnp.zeros((k, 10), jnp.float32),
            "c": jnp.zeros((10,), jnp.float32),
        }

    def pretrain_plain(self, theta, reads, batch):
        del reads
        x, y = batch
        return jnp.mean(self._ce(theta, x, y))

    def finetune(self, theta, reads, batch):
        """Target cross entropy ``+ (μ/2)‖θ − θ_pt*‖²``."""
        x, y = batch
        sq = sum(
            jnp.sum(jnp.square(a - b))
            for a, b in zip(jax.tree.leaves(theta), jax.tree.leaves(reads["pretrain"]))
        )
        return jnp.mean(self._ce(theta, x, y)) + 0.5 * self.cfg.prox * sq

    def reweight(self, lam, reads, batch):
        """The finetuned model's cross entropy on the target validation set."""
        del lam
        x, y = batch
        return jnp.mean(self._ce(reads["finetune"], x, y))

    # -- graphs --------------------------------------------------------------------------------
    def graph(self, method=None) -> Any:
        """The trilevel graph (``method`` on both edges), or the two-level one (``None``)."""
        c = self.cfg
        if method is None:
            return multilevel_step(
                [
                    Problem(
                        "pretrain",
                        self.pretrain_plain,
                        self.opt["pretrain"](),
                        unroll=c.pretrain_unroll,
                    ),
                    Problem("finetune", self.finetune, self.opt["finetune"](), reads=("pretrain",)),
                ]
            )
        return multilevel_step(
            [
                Problem(
                    "pretrain",
                    self.pretrain_weighted,
                    self.opt["pretrain"](),
                    reads=("reweight",),
                    unroll=c.pretrain_unroll,
                    method=method,
                ),
                Problem(
                    "finetune",
                    self.finetune,
                    self.opt["finetune"](),
                    reads=("pretrain",),
                    unroll=c.finetune_unroll,
                    method=method,
                ),
                Problem("reweight", self.reweight, self.opt["reweight"](), reads=("finetune",)),
            ]
        )

    # -- whole runs: fn(theta0, lam0, idx, data) -> (params, losses, skipped) ------------------
    def _trilevel(self, method):
        step = self.graph(method)
        k2 = self.cfg.finetune_unroll

        def fn(theta0, lam0, idx, data):
            xp, yp, xt, yt, xv, yv = data
            state = step.init({"pretrain": theta0, "finetune": theta0, "reweight": lam0})
            ft = (
                jnp.broadcast_to(xt, (k2, *xt.shape)),
                jnp.broadcast_to(yt, (k2, *yt.shape)),
            )

            def body(st, i):  # i: (finetune_unroll, pretrain_unroll, batch)
                batches = {"pretrain": (xp[i], yp[i], i), "finetune": ft, "reweight": (xv, yv)}
                st, m = step(st, batches)
                return st, m["loss/reweight"]

            state, losses = jax.lax.scan(body, state, idx)
            return state.params, losses, state.skipped

        return fn

    def _two_level(self):
        step = self.graph(None)

        def fn(theta0, lam0, idx, data):
            del lam0
            xp, yp, xt, yt, xv, yv = data
            state = step.init({"pretrain": theta0, "finetune": theta0})
            flat = idx.reshape(-1, *idx.shape[2:])  # one call per finetune step

            def body(st, i):  # i: (pretrain_unroll, batch)
                st, _ = step(st, {"pretrain": (xp[i], yp[i]), "finetune": (xt, yt)})
                return st, None

            state, _ = jax.lax.scan(body, state, flat)
            losses = jnp.mean(self._ce(state.params["finetune"], xv, yv))[None]
            return {**state.params, "reweight": None}, losses, state.skipped

        return fn

    def _target_only(self):
        tx = self.opt["finetune"]()
        steps = self.cfg.finetune_steps

        def loss(theta, batch):
            x, y = batch
            return jnp.mean(self._ce(theta, x, y))

        def fn(theta0, lam0, idx, data):
            del lam0, idx
            _, _, xt, yt, xv, yv = data

            def body(carry, _):
                r = bj.base_step(loss, tx, *carry, (xt, yt))
                return (r.params, r.opt_state), None

            (theta, _), _ = jax.lax.scan(body, (theta0, tx.init(theta0)), None, length=steps)
            losses = jnp.mean(self._ce(theta, xv, yv))[None]
            return {"pretrain": None, "finetune": theta, "reweight": None}, losses, {}

        return fn

    def execute(self, method: str, args: tuple) -> tuple[Any, float]:
        """Run ``method``'s compiled whole run (compiled on first use); ``(outputs, seconds)``."""
        if method not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[method] = jax.jit(self.fns[method]).lower(*args).compile()
            self.compile_s[method] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(self.compiled[method](*args))
        return out, time.perf_counter() - t0


def seed_data(ds: data_lib.Dataset, cfg: Config, seed: int) -> dict[str, Any]:
    """The split and the conflicting sub-domain of one seed (numpy)."""
    parts = data_lib.stratified_split(
        ds.y,
        {
            "target_train": cfg.target_train_per_class,
            "target_val": cfg.target_val_per_class,
            "test": cfg.test_per_class,
        },
        seed,
    )
    pre = parts["train"]
    y_pre, conflicting = conflicting_domain(ds.y[pre], cfg.conflict_fraction, seed + 1000)
    return {
        "xp": ds.x[pre],
        "yp": y_pre,
        "conflicting": conflicting,
        "xt": ds.x[parts["target_train"]],
        "yt": ds.y[parts["target_train"]],
        "xv": ds.x[parts["target_val"]],
        "yv": ds.y[parts["target_val"]],
        "xte": ds.x[parts["test"]],
        "yte": ds.y[parts["test"]],
    }


def _indices(pool: np.ndarray, cfg: Config, seed: int) -> np.ndarray:
    """(reweight steps, finetune unroll, pretrain unroll, batch) indices drawn from ``pool``."""
    pool = np.asarray(pool)
    flat = harness.batch_indices(len(pool), cfg.pretrain_steps, cfg.pretrain_batch, seed)
    return pool[flat].reshape(
        cfg.reweight_steps, cfg.finetune_unroll, cfg.pretrain_unroll, cfg.pretrain_batch
    )


def _hist(w: np.ndarray, bins: np.ndarray) -> list[int]:
    return [int(v) for v in np.histogram(w, bins=bins)[0]]


def run(
    seeds: list[int],
    config: Config | None = None,
    methods: Sequence[str] = METHODS,
    progress: bool = True,
    dataset: data_lib.Dataset | None = None,
) -> dict:
    """Every method on every seed; the result dict (module docstring)."""
    from tqdm.auto import tqdm

    cfg = config or Config()
    ds = dataset if dataset is not None else data_lib.load_mnist5k()
    study = Study(cfg)
    acc = {m: [] for m in methods}
    pre_acc: dict[str, list] = {m: [] for m in methods}
    auc: dict[str, list] = {m: [] for m in methods if m in TRILEVEL}
    seconds = {m: [] for m in methods}
    diag: dict[str, Any] = {
        "mean_weight_consistent": {m: [] for m in auc},
        "mean_weight_conflicting": {m: [] for m in auc},
        "skipped": {m: [] for m in methods},
        "val_loss_final": {m: [] for m in methods},
        "weight_hist": {},
    }
    bins = np.linspace(0.0, 2.0, 41)
    diag["weight_hist_bins"] = bins.tolist()
    records = []
    bar = tqdm(
        total=len(seeds) * len(methods), disable=not progress, file=sys.stdout, mininterval=1.0
    )
    for si, seed in enumerate(seeds):
        d = seed_data(ds, cfg, seed)
        n = len(d["yp"])
        data = tuple(jnp.asarray(d[k]) for k in ("xp", "yp", "xt", "yt", "xv", "yv"))
        theta0 = split(study.model(seed))[1]
        lam0 = study.init_weighting(n, seed)
        weights_of = jax.jit(
            lambda lam, x, y: (
                2.0 * jax.nn.sigmoid(study.weight_logits(lam, x, y, jnp.arange(len(y))))
            )
        )
        idx_all = jnp.asarray(_indices(np.arange(n), cfg, seed + 1))
        idx_cons = jnp.asarray(_indices(np.flatnonzero(~d["conflicting"]), cfg, seed + 1))
        record: dict[str, Any] = {"seed": seed}
        for m in methods:
            bar.set_description(f"s{seed} {m}")
            idx = idx_cons if m == "oracle" else idx_all
            (params, losses, skipped), t = study.execute(m, (theta0, lam0, idx, data))
            seconds[m].append(t)
            a = float(study.accuracy(params["finetune"], d["xte"], d["yte"]))
            acc[m].append(a)
            record[f"{m}/acc"] = a
            record[f"{m}/seconds"] = t
            pre_acc[m].append(
                None
                if params["pretrain"] is None
                else float(study.accuracy(params["pretrain"], d["xte"], d["yte"]))
            )
            diag["skipped"][m].append({k: int(v) for k, v in skipped.items()})
            losses = np.asarray(losses)
            if not np.all(np.isfinite(losses)):
                raise FloatingPointError(f"{m}: non-finite validation loss (seed {seed})")
            diag["val_loss_final"][m].append(float(losses[-1]))
            if m in TRILEVEL:
                w = np.asarray(weights_of(params["reweight"], data[0], data[1]), np.float64)
                cons = ~d["conflicting"]
                auc[m].append(weight_auc(w, cons))
                record[f"{m}/auc"] = auc[m][-1]
                diag["mean_weight_consistent"][m].append(float(w[cons].mean()))
                diag["mean_weight_conflicting"][m].append(float(w[~cons].mean()))
                if si == 0:
                    diag["weight_hist"][m] = {
                        "consistent": _hist(w[cons], bins),
                        "conflicting": _hist(w[~cons], bins),
                    }
                    diag.setdefault("val_loss_curve_seed0", {})[m] = [
                        round(float(v), 5) for v in losses[:: max(1, len(losses) // 100)]
                    ]
            bar.update(1)
        bar.set_postfix({m: f"{acc[m][-1]:.3f}" for m in methods}, refresh=False)
        records.append(record)
    bar.close()
    t_two = float(np.median(seconds["two_level"])) if "two_level" in seconds else float("nan")
    result: dict[str, Any] = {}
    for m in methods:
        entry = {
            **harness.summarize(acc[m], seeds),
            "seconds_median": float(np.median(seconds[m])),
            "time_ratio": float(np.median(seconds[m])) / t_two,
            "compile_s": study.compile_s[m],
            "pretrain_acc": pre_acc[m],
        }
        if m in auc:
            entry["auc"] = {
                "mean": float(np.mean(auc[m])),
                "std": float(np.std(auc[m])),
                "values": auc[m],
            }
        result[m] = entry
    if "two_level" in acc:
        base = np.asarray(acc["two_level"])
        result["gain_over_two_level"] = {
            m: {
                "mean": float(np.mean(np.asarray(acc[m]) - base)),
                "std_paired": float(np.std(np.asarray(acc[m]) - base)),
                "per_seed": [float(v) for v in np.asarray(acc[m]) - base],
                "two_std_of_two_level": float(2 * base.std()),
            }
            for m in methods
        }
    result["diagnostics"] = diag
    result["config"] = {
        **harness.to_json(cfg),
        "pretrain_steps": cfg.pretrain_steps,
        "finetune_steps": cfg.finetune_steps,
        "seeds": list(seeds),
        "methods": list(methods),
        "edge_methods": {k: repr(v) for k, v in study.methods.items()},
        "optimizers": {k: repr(v) for k, v in study.optimizers().items()},
        "model": f"MLP (784, {cfg.hidden}, 10)",
        "conflict_rule": "y -> (y + 1) mod 10",
        "sizes": {
            "pretrain": n,
            "conflicting": int(d["conflicting"].sum()),
            "target_train": len(d["yt"]),
            "target_val": len(d["yv"]),
            "test": len(d["yte"]),
        },
    }
    result["data"] = dict(ds.source)
    result["per_seed_records"] = records
    return result


def plot(result: dict, path: str) -> None:
    """PNG: target test accuracy per method; AUC per trilevel method; seed-0 weight histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["config"]["methods"]
    tri = [m for m in methods if m in TRILEVEL]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.6))
    xs = np.arange(len(methods))
    ax1.bar(
        xs,
        [result[m]["mean"] for m in methods],
        yerr=[result[m]["std"] for m in methods],
        capsize=4,
        color=["0.6" if m not in TRILEVEL else "C0" for m in methods],
    )
    ax1.set_xticks(xs, methods, rotation=30, fontsize=8)
    lo = min(result[m]["mean"] - result[m]["std"] for m in methods)
    y0 = max(0.0, lo - 0.05)
    ax1.set_ylim(y0, 1.0)
    for x, m in zip(xs, methods):
        ax1.text(x, y0 + 0.005, f"{result[m]['time_ratio']:.1f}×", ha="center", fontsize=7)
    ax1.set(
        ylabel="target test accuracy",
        title=f"finetuned model, mean ± std over {len(result['config']['seeds'])} seeds",
    )
    ax1.grid(alpha=0.3, axis="y")
    if tri:
        xt = np.arange(len(tri))
        ax2.bar(
            xt,
            [result[m]["auc"]["mean"] for m in tri],
            yerr=[result[m]["auc"]["std"] for m in tri],
            capsize=4,
        )
        ax2.axhline(0.8, color="k", ls=":", label="goal 0.8")
        ax2.axhline(0.5, color="0.5", ls="--", label="chance")
        ax2.set_xticks(xt, tri)
        ax2.set(
            ylim=(0.0, 1.0), ylabel="ROC AUC", title="learned weights: consistent vs conflicting"
        )
        ax2.legend(fontsize=7)
        bins = np.asarray(result["diagnostics"]["weight_hist_bins"])
        centers = (bins[:-1] + bins[1:]) / 2
        for k, m in enumerate(tri):
            h = result["diagnostics"]["weight_hist"].get(m)
            if not h:
                continue
            ax3.step(centers, h["consistent"], where="mid", color=f"C{k}", label=f"{m} consistent")
            ax3.step(
                centers,
                h["conflicting"],
                where="mid",
                color=f"C{k}",
                ls="--",
                label=f"{m} conflicting",
            )
        ax3.set(
            xlabel="learned weight w = 2σ(λ)",
            ylabel="pretraining digits",
            title=f"weights, seed {result['config']['seeds'][0]}",
        )
        ax3.set_yscale("log")
        ax3.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    methods = result["config"]["methods"]
    print(f"\ntarget test accuracy, mean ± std over seeds {result['config']['seeds']}")
    print(f"{'method':<12}{'accuracy':>16}{'weight AUC':>16}{'time / 2-level':>16}")
    for m in methods:
        r = result[m]
        a = f"{r['auc']['mean']:.3f}±{r['auc']['std']:.3f}" if "auc" in r else "—"
        print(f"{m:<12}{r['mean']:>10.3f}±{r['std']:.3f}{a:>16}{r['time_ratio']:>16.2f}")


QUICK = {"reweight_steps": 12, "pretrain_batch": 50, "test_per_class": 20}
"""``--quick``: the Config fields it changes."""

CLI = harness.StudyCLI(
    "multilevel",
    __doc__,
    quick="12 reweight steps, pretraining batch 50, 20 test digits per class, seed 0 (smoke test)",
    seeds="seeds of the split, the conflicting sub-domain, the initialisation and the batch "
    "order (default 0 1 2 3 4; quick: 0)",
    base_steps=f"pretrain steps (= {Config.pretrain_unroll}·{Config.finetune_unroll}·meta steps; "
    f"default {Config().pretrain_steps})",
    meta_steps=f"steps of the reweighting level (default {Config.reweight_steps}; quick "
    f"{QUICK['reweight_steps']})",
)


CLI.add_argument(
    "--set",
    nargs="+",
    default=[],
    metavar="FIELD=VALUE",
    help="override Config fields (e.g. --set pretrain_unroll=1 prox=0.1); the steps of the "
    "reweighting level are --meta-steps",
)


def config_from(overrides: Sequence[str], base: Config) -> Config:
    """``base`` with ``FIELD=VALUE`` overrides (each value parsed as the field's type)."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in fields or key == "reweight_steps":
            CLI.error(
                f"--set {item!r}: expected FIELD=VALUE with FIELD one of "
                f"{sorted(k for k in fields if k != 'reweight_steps')} (reweight steps: --meta-steps)"
            )
        kind = type(getattr(base, key))
        changes[key] = kind(value)
    return dataclasses.replace(base, **changes)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring): run the study and write its results."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    seeds = CLI.seeds(args, default=(0, 1, 2, 3, 4))
    cfg = dataclasses.replace(Config(), **QUICK) if args.quick else Config()
    cfg = config_from(args.set, cfg)
    _, meta = CLI.steps(
        args,
        per_meta=cfg.pretrain_unroll * cfg.finetune_unroll,
        default=cfg.reweight_steps,
        quick=cfg.reweight_steps,
    )
    cfg = dataclasses.replace(cfg, reweight_steps=meta)
    ds = data_lib.load_mnist5k()
    run_.data(ds.source)
    result = run(seeds, cfg, progress=run_.progress, dataset=ds)
    print_table(result)
    return run_.finish(result, plot, result["per_seed_records"])


if __name__ == "__main__":
    main()
