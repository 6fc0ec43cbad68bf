r"""Data influence on real digits: the linear datamodeling score (LDS) of every attribution method.

::

    python -m experiments.influence [--quick] [--seeds 0 1 2] [--json PATH]

Data: the 5,000 MNIST digits of :func:`experiments.data.load_mnist5k` (path and sha256 in the
JSON), split per seed into a *test* set (``test_per_class`` per class) and a *train* set (the
rest, ``n``). Model and recipe (the LoGra thesis' FMNIST recipe): a ReLU MLP ``sizes``, SGD with
momentum 0.9, learning rate 3e-2, weight decay 1e-3 (``add_decayed_weights`` before the momentum,
as PyTorch's SGD), batch 64, 20 epochs, from the seed's initialisation and batch order.

**Training with per-example weights.** A training run takes weights ``w ∈ [0, 1]ⁿ`` (this
library's λ) and minimises ``L(θ; w) = (1/n) Σ_i w_i ℓ_i(θ) / w̄ + R(θ)``, ``w̄ = mean(w)``, with
the same batch order for every ``w``: the step on batch ``B`` uses the gradient of
``Σ_{i∈B} w_i ℓ_i / (|B| w̄)``. ``w = 1`` is the model that is attributed; a half-subset mask
``w = 1_S`` retrains on ``S`` (the unbiased mean loss of ``S`` at every step, so the subset
model sees ``S`` for 20 epochs at the same learning rate); retrainings are one ``jax.vmap``.

**The LDS** (Park et al. 2023; the thesis, ch. 4): for each seed, ``subsets`` random half-subset
masks are retrained from the seed's initialisation with the seed's batch order, and for each of
the first ``queries`` test examples ``q`` the outcome is minus its loss ``−ℓ_q(θ_S)``. A method's
scores ``τ(q, i)`` (positive = helpful, the sign of :mod:`bilevel_jax.influence`) predict
``Σ_{i∈S} τ(q, i)``; the LDS of ``q`` is the Spearman correlation of the predictions with the
outcomes over the subsets, averaged over the queries (``jnp.nanmean``). A seed is one replicate
(model, scores, subsets, retrainings); the table reports the mean ± std over the seeds.

Methods (all at the trained ``θ*``, query loss = the query example's cross entropy):

* ``exact`` — :func:`bilevel_jax.influence.influence` with the Gauss–Newton curvature plus the
  weight decay's Hessian, damped by ``δ = 0.1 · tr(F)/p`` (``F`` the empirical Fisher, ``p``
  the parameter count: the thesis' "0.1 × mean eigenvalue"), solved by CG (``cg_maxiter``
  iterations), on the first ``cg_queries`` queries only (its LDS and every other method's on
  the same queries are reported as ``lds_cg_queries``);
* ``ekfac`` / ``kfac`` — :func:`~bilevel_jax.influence.ekfac_influence` /
  :func:`~bilevel_jax.influence.kfac_influence` over every linear layer (biases included),
  damping 0.1 × the mean eigenvalue per layer;
* ``logra_pca_k`` / ``logra_random_k`` for ``k`` in ``ks`` — LoGra: the ``nnx.Linear`` LoGra
  adapter (:func:`~bilevel_jax.influence.with_logra`, the Kronecker path; no full per-example
  gradient is formed) with ``k × k`` projections per layer (``k_out = min(k, d_out)``), PCA
  bases from the KFAC covariances or Gaussian ones; the projected Fisher per layer (block
  diagonal, as KFAC), damped by 0.1 × its mean eigenvalue;
* ``grad_dot`` — ``g_qᵀ g_i`` (full gradients); ``trak`` — TRAK's one-model formula with a
  Gaussian projection to ``trak_k`` dimensions and ``δ = 0``;
* ``repsim`` — the cosine similarity of the last hidden layer's activations.

**Brittleness** (seed ``brittle_seed`` only): for the first ``brittle_queries`` test queries
that ``θ*`` classifies correctly, remove each method's ``k`` most helpful training examples
(``k`` in ``brittle_ks``; plus a ``random`` removal), retrain, and count the queries whose
prediction changes.

**Cost per method**: every method is one function of ``(θ*, train, queries)``, compiled once
(XLA's peak bytes = arguments + outputs + temporaries, and FLOPs, which count a loop body once:
the ``lax.map`` chunks of per-example gradients and the CG iterations are not multiplied, so the
FLOPs do not compare methods) and then timed (wall seconds of the compiled call; CPU times are
indicative only).
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

import bilevel_jax as bj
from bilevel_jax import influence as inf
from experiments import data as data_lib
from experiments import harness
from experiments.harness import Recipe
from experiments.models import MLP

__all__ = [
    "Config",
    "QUICK",
    "Problem",
    "make_problem",
    "make_train",
    "method_fns",
    "brittleness",
    "run_seed",
    "run",
    "main",
]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Config:
    """The study's settings (recorded in the JSON)."""

    sizes: tuple[int, ...] = (784, 128, 128, 10)
    test_per_class: int = 100
    train_limit: int | None = None  # use only the first train_limit train examples (quick)
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-2
    momentum: float = 0.9
    weight_decay: float = 1e-3
    queries: int = 100
    subsets: int = 100
    fraction: float = 0.5
    retrain_chunk: int = 25  # retrainings per compiled vmap call
    ks: tuple[int, ...] = (16, 32, 64)
    trak_k: int = 1024
    cg_queries: int = 10
    cg_maxiter: int = 50
    brittle_seed: int = 0
    brittle_queries: int = 12
    brittle_ks: tuple[int, ...] = (50, 100, 200)
    brittle_methods: tuple[str, ...] = ("ekfac", "logra_pca_64", "grad_dot", "trak", "repsim")
    grad_chunk: int = 500  # examples per block of per-example gradients

    def optimizer(self) -> Recipe:
        """SGD with momentum and PyTorch-style weight decay (``wd · θ`` added to the gradient
        before the momentum)."""
        return Recipe(
            optax.chain,
            Recipe(optax.add_decayed_weights, self.weight_decay),
            Recipe(optax.sgd, self.learning_rate, momentum=self.momentum),
        )


QUICK = Config(
    sizes=(784, 32, 10),
    test_per_class=10,
    train_limit=600,
    epochs=2,
    queries=12,
    subsets=12,
    retrain_chunk=12,
    ks=(4, 8),
    trak_k=64,
    cg_queries=3,
    cg_maxiter=10,
    brittle_queries=2,
    brittle_ks=(20,),
    brittle_methods=("ekfac", "logra_pca_8"),
    grad_chunk=300,
)


# ----------------------------------------------------------------------------------------------
# The problem of one seed


@dataclasses.dataclass
class Problem:
    """One seed's data, model and batch order."""

    cfg: Config
    graphdef: Any
    init: PyTree  # θ₀ (pure dict, the nnx.Linear layout)
    x: jax.Array  # train inputs (n, 784)
    y: jax.Array
    qx: jax.Array  # query inputs (queries, 784)
    qy: jax.Array
    idx: jax.Array  # (steps, batch) batch order
    test_x: jax.Array
    test_y: jax.Array

    @property
    def n(self) -> int:
        return int(self.x.shape[0])


def make_problem(cfg: Config, seed: int, ds: data_lib.Dataset) -> Problem:
    """Split, initialise and draw the batch order of ``seed``."""
    split = data_lib.stratified_split(ds.y, {"test": cfg.test_per_class}, seed)
    train = split["train"][: cfg.train_limit]
    test = split["test"]
    if cfg.queries > test.size:
        raise ValueError(f"queries={cfg.queries} > the {test.size} test examples")
    model = MLP(cfg.sizes, rngs=nnx.Rngs(seed))
    graphdef, init, _ = bj.nnx.split_params(model)
    steps = cfg.epochs * (train.size // cfg.batch_size)
    idx = harness.batch_indices(train.size, steps, cfg.batch_size, seed)
    x, y = jnp.asarray(ds.x[train]), jnp.asarray(ds.y[train])
    tx, ty = jnp.asarray(ds.x[test]), jnp.asarray(ds.y[test])
    return Problem(
        cfg, graphdef, init, x, y, tx[: cfg.queries], ty[: cfg.queries], jnp.asarray(idx), tx, ty
    )


def forward(params: PyTree, x: jax.Array, *, hidden: bool = False) -> jax.Array:
    """The MLP on a pure parameter dict (the ``nnx.Linear`` layout of :class:`MLP`)."""
    layers = params["layers"]
    for j in range(len(layers) - 1):
        x = jax.nn.relu(x @ layers[j]["kernel"] + layers[j]["bias"])
    if hidden:
        return x
    last = layers[len(layers) - 1]
    return x @ last["kernel"] + last["bias"]


def per_example_loss(params: PyTree, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``ℓ_i``: the cross entropy of each example, shape ``(b,)``."""
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(forward(params, x), y)


def example_loss(params: PyTree, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    """One example's loss (the per-example-gradient functions' signature)."""
    x, y = example
    return per_example_loss(params, (x[None], y[None]))[0]


def model_loss(model, example) -> jax.Array:
    """One example's loss of the NNX model (LoGra's adapter and the KFAC covariances)."""
    x, y = example
    return optax.softmax_cross_entropy_with_integer_labels(model(x[None]), y[None])[0]


def regularizer(cfg: Config) -> Callable[[PyTree], jax.Array]:
    """``R(θ) = (wd/2)‖θ‖²``: weight decay as part of the training objective."""

    def reg(p: PyTree) -> jax.Array:
        return (
            0.5 * cfg.weight_decay * jnp.sum(jnp.stack([jnp.sum(a**2) for a in jax.tree.leaves(p)]))
        )

    return reg


def make_train(prob: Problem) -> Callable[[jax.Array], PyTree]:
    """``train(w) -> θ``: the recipe with per-example weights ``w`` (module docstring)."""
    cfg, idx, x, y = prob.cfg, prob.idx, prob.x, prob.y
    tx = cfg.optimizer()()

    def train(w: jax.Array) -> PyTree:
        wbar = jnp.mean(w)

        def body(carry, i):
            p, s = carry

            def loss(p):
                return jnp.sum(w[i] * per_example_loss(p, (x[i], y[i]))) / (i.shape[0] * wbar)

            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (prob.init, tx.init(prob.init)), idx)
        return p

    return train


def retrain(prob: Problem, masks: np.ndarray, evaluate: Callable, bar=None) -> np.ndarray:
    """``evaluate(θ_w)`` for every row ``w`` of ``masks``, ``retrain_chunk`` models per call."""
    train = make_train(prob)
    fn = jax.jit(jax.vmap(lambda w: evaluate(train(w))))
    chunk = prob.cfg.retrain_chunk
    outs = []
    for start in range(0, masks.shape[0], chunk):
        part = masks[start : start + chunk]
        pad = chunk - part.shape[0]
        padded = np.concatenate([part, np.ones((pad, part.shape[1]), part.dtype)]) if pad else part
        outs.append(np.asarray(fn(jnp.asarray(padded)))[: part.shape[0]])
        if bar is not None:
            bar.update(part.shape[0])
    return np.concatenate(outs)


# ----------------------------------------------------------------------------------------------
# The attribution methods: each a function of (θ*, train x, y, query x, y) -> (queries, n)


def _chunked_grads(params: PyTree, x: jax.Array, y: jax.Array, chunk: int) -> PyTree:
    """Full per-example gradients, ``chunk`` examples at a time (``lax.map``)."""
    g = jax.grad(example_loss)
    return jax.lax.map(lambda ex: g(params, ex), (x, y), batch_size=chunk)


def method_fns(prob: Problem, seed: int) -> dict[str, Callable]:
    """Every method of the study as ``fn(θ, x, y, qx, qy) -> scores (m, n)`` (jittable)."""
    cfg, graphdef = prob.cfg, prob.graphdef
    chunk = cfg.grad_chunk
    key = jax.random.key(1000 + seed)

    def grads(p, x, y):
        return _chunked_grads(p, x, y, chunk)

    def grad_dot(p, x, y, qx, qy):
        return inf.grad_dot(grads(p, qx, qy), grads(p, x, y))

    def trak(p, x, y, qx, qy):
        return inf.trak_scores(grads(p, qx, qy), grads(p, x, y), key, cfg.trak_k)

    def kfac_basis(p, x, y):
        model = bj.nnx.merge(graphdef, p)
        return inf.kfac_eigenbasis(inf.kfac_covariances(model, model_loss, (x, y)))

    def kfac(p, x, y, qx, qy):
        return inf.kfac_influence(kfac_basis(p, x, y), grads(p, qx, qy), grads(p, x, y))

    def ekfac(p, x, y, qx, qy):
        basis, gt = kfac_basis(p, x, y), grads(p, x, y)
        lam = inf.ekfac_eigenvalues(basis, gt)
        return inf.ekfac_influence(basis, lam, grads(p, qx, qy), gt)

    def repsim(p, x, y, qx, qy):
        return inf.representation_similarity(lambda a: forward(p, a, hidden=True), qx, x)

    def logra(kind: str, k: int) -> Callable:
        def fn(p, x, y, qx, qy):
            model = bj.nnx.merge(graphdef, p)
            proj = {"layers": {}}  # k × min(k, d_out) per layer
            if kind == "pca":
                covs = inf.kfac_covariances(model, model_loss, (x, y))["layers"]
                for j, c in covs.items():
                    one = inf.pca_projections({"c": c}, k, min(k, c.backward.shape[0]))
                    proj["layers"][j] = one["c"]
            else:
                for j, layer in p["layers"].items():
                    k_out = min(k, layer["kernel"].shape[1])
                    one = inf.random_projections(jax.random.fold_in(key, j), {"c": layer}, k, k_out)
                    proj["layers"][j] = one["c"]
            lm = inf.with_logra(model, proj)
            gq = inf.logra_gradients(lm, model_loss, (qx, qy))
            gt = inf.logra_gradients(lm, model_loss, (x, y), batch_size=chunk)
            scores = jnp.zeros((qx.shape[0], x.shape[0]), jnp.float32)
            for q_l, t_l in zip(jax.tree.leaves(gq), jax.tree.leaves(gt)):
                q_l, t_l = q_l.reshape(q_l.shape[0], -1), t_l.reshape(t_l.shape[0], -1)
                fisher = inf.fisher_eigh(t_l.T @ t_l / t_l.shape[0])  # block of one layer
                scores = scores + inf.precondition(fisher, q_l) @ t_l.T
            return scores

        return fn

    fns: dict[str, Callable] = {"ekfac": ekfac, "kfac": kfac}
    for k in cfg.ks:
        fns[f"logra_pca_{k}"] = logra("pca", k)
        fns[f"logra_random_{k}"] = logra("random", k)
    fns.update(grad_dot=grad_dot, trak=trak, repsim=repsim)
    return fns


def exact_fn(prob: Problem) -> Callable:
    """The exact damped Gauss–Newton influence by CG (module docstring), on the queries given."""
    cfg = prob.cfg
    reg = regularizer(cfg)

    def exact(p, x, y, qx, qy):
        g = _chunked_grads(p, x, y, cfg.grad_chunk)
        p_count = sum(a[0].size for a in jax.tree.leaves(g))
        trace_f = sum(jnp.sum(a.astype(jnp.float32) ** 2) for a in jax.tree.leaves(g)) / x.shape[0]
        damping = 0.1 * trace_f / p_count
        return inf.influence(
            per_example_loss,
            p,
            (x, y),
            (qx, qy),
            regularizer=reg,
            curvature="gauss_newton",
            damping=damping,
            solver="cg",
            maxiter=cfg.cg_maxiter,
            outputs_fn=lambda p, b: forward(p, b[0]),
            output_loss=lambda out, b: optax.softmax_cross_entropy_with_integer_labels(out, b[1]),
        )

    return exact


def measure(fn: Callable, args: tuple) -> tuple[np.ndarray, dict]:
    """Compile ``fn`` once (memory, FLOPs, compile seconds), run it (seconds): its output."""
    t0 = time.perf_counter()
    compiled, stats = harness.compile_stats(fn, args)
    stats["compile_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(compiled(*args)))
    stats["run_s"] = time.perf_counter() - t0
    if not np.all(np.isfinite(out)):
        raise FloatingPointError("a method gave non-finite scores")
    return out, stats


# ----------------------------------------------------------------------------------------------
# One seed


def _mean_lds(scores: np.ndarray, masks: np.ndarray, outcomes: np.ndarray) -> float:
    return float(
        jnp.nanmean(inf.lds(jnp.asarray(scores), jnp.asarray(masks), jnp.asarray(outcomes)))
    )


def brittleness(
    prob: Problem, theta: PyTree, scores: dict[str, np.ndarray], seed: int, bar=None
) -> dict:
    """Remove each method's top-k helpful examples for correctly classified queries; retrain."""
    cfg = prob.cfg
    pred = np.asarray(jnp.argmax(forward(theta, prob.qx), -1))
    correct = np.flatnonzero(pred == np.asarray(prob.qy))[: cfg.brittle_queries]
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    methods = [m for m in cfg.brittle_methods if m in scores] + ["random"]
    for m in methods:
        for k in cfg.brittle_ks:
            if m == "random":
                masks = np.ones((correct.size, prob.n), np.float32)
                for r in range(correct.size):
                    masks[r, rng.choice(prob.n, k, replace=False)] = 0.0
            else:
                masks = np.asarray(inf.top_k_removal_masks(jnp.asarray(scores[m][correct]), k))
            rows.append(masks)
            labels += [(m, k, int(q)) for q in correct]
    masks = np.concatenate(rows)
    qx = prob.qx

    def evaluate(th):
        return jnp.argmax(forward(th, qx), -1)

    preds = retrain(prob, masks, evaluate, bar)
    out: dict = {"queries": correct.tolist(), "flipped": {}}
    for m in methods:
        out["flipped"][m] = {}
        for k in cfg.brittle_ks:
            flips = [
                bool(preds[j, q] != pred[q])
                for j, (mm, kk, q) in enumerate(labels)
                if mm == m and kk == k
            ]
            out["flipped"][m][str(k)] = float(np.mean(flips))
    return out


def run_seed(cfg: Config, seed: int, ds: data_lib.Dataset, *, progress: bool = True) -> dict:
    """Train, attribute with every method, retrain on the subsets, score the LDS (one seed)."""
    from tqdm.auto import tqdm

    prob = make_problem(cfg, seed, ds)
    t0 = time.perf_counter()
    train = jax.jit(make_train(prob))
    theta = jax.block_until_ready(train(jnp.ones(prob.n)))
    train_s = time.perf_counter() - t0
    test_acc = float(jnp.mean(jnp.argmax(forward(theta, prob.test_x), -1) == prob.test_y))
    print(f"seed {seed}: trained θ* in {train_s:.1f} s, test accuracy {test_acc:.4f}", flush=True)
    # the pure forward is the NNX model's
    np.testing.assert_allclose(
        forward(theta, prob.qx), bj.nnx.merge(prob.graphdef, theta)(prob.qx), rtol=1e-5, atol=1e-5
    )

    args = (theta, prob.x, prob.y, prob.qx, prob.qy)
    scores: dict[str, np.ndarray] = {}
    cost: dict[str, dict] = {}
    fns = method_fns(prob, seed)
    cg_args = (theta, prob.x, prob.y, prob.qx[: cfg.cg_queries], prob.qy[: cfg.cg_queries])
    todo = [(name, fn, args) for name, fn in fns.items()] + [("exact", exact_fn(prob), cg_args)]
    for name, fn, a in tqdm(
        todo, desc=f"seed {seed} methods", disable=not progress, file=sys.stdout
    ):
        scores[name], cost[name] = measure(fn, a)
        if not progress:
            c = cost[name]
            print(
                f"  {name:>16}: {c['run_s']:7.2f} s (+{c['compile_s']:.1f} s compile), "
                f"peak {c['peak_bytes'] / 2**20:8.1f} MiB",
                flush=True,
            )

    masks = np.asarray(
        inf.subset_masks(jax.random.key(seed), prob.n, cfg.subsets, cfg.fraction), np.float32
    )
    qx, qy = prob.qx, prob.qy

    def evaluate(th):
        return -per_example_loss(th, (qx, qy))

    bar = tqdm(
        total=cfg.subsets, desc=f"seed {seed} retrain", disable=not progress, file=sys.stdout
    )
    t0 = time.perf_counter()
    outcomes = retrain(prob, masks, evaluate, bar)
    bar.close()
    retrain_s = time.perf_counter() - t0
    print(f"seed {seed}: {cfg.subsets} retrainings in {retrain_s:.1f} s", flush=True)

    lds = {m: _mean_lds(s, masks, outcomes) for m, s in scores.items() if m != "exact"}
    nq = cfg.cg_queries
    lds_cg = {m: _mean_lds(s[:nq], masks, outcomes[:, :nq]) for m, s in scores.items()}
    for m in lds:
        print(f"  LDS {m:>16}: {lds[m]:+.4f}  (on the {nq} CG queries {lds_cg[m]:+.4f})")
    print(f"  LDS {'exact':>16}:   —      (on the {nq} CG queries {lds_cg['exact']:+.4f})")

    out = {
        "seed": seed,
        "n_train": prob.n,
        "params": int(sum(a.size for a in jax.tree.leaves(theta))),
        "test_acc": test_acc,
        "train_s": train_s,
        "retrain_s": retrain_s,
        "lds": lds,
        "lds_cg_queries": lds_cg,
        "cost": cost,
    }
    if seed == cfg.brittle_seed:
        n_b = (len(cfg.brittle_methods) + 1) * len(cfg.brittle_ks) * cfg.brittle_queries
        bar = tqdm(total=n_b, desc="brittleness", disable=not progress, file=sys.stdout)
        out["brittleness"] = brittleness(prob, theta, scores, seed, bar)
        bar.close()
        for m, per_k in out["brittleness"]["flipped"].items():
            print(
                f"  brittleness {m:>16}: " + ", ".join(f"k={k}: {v:.2f}" for k, v in per_k.items())
            )
        out["top"] = _top_examples(prob, scores["ekfac"])
    return out


def _top_examples(prob: Problem, scores: np.ndarray, queries: int = 4, top: int = 5) -> dict:
    """The most helpful and most harmful training examples (by EKFAC) of the first queries."""
    rows = []
    for q in range(min(queries, scores.shape[0])):
        order = np.argsort(-scores[q])
        rows.append(
            {
                "query": q,
                "label": int(prob.qy[q]),
                "helpful": order[:top].tolist(),
                "harmful": order[::-1][:top].tolist(),
            }
        )
    return {"method": "ekfac", "rows": rows}


# ----------------------------------------------------------------------------------------------
# Aggregation, ordering and plots


ORDER = (
    ("ekfac", ">=", "logra_pca"),
    ("logra_pca", ">", "logra_random"),
    ("logra_random", ">", "grad_dot"),
    ("logra_random", ">", "trak"),
    ("grad_dot", ">", "repsim"),
    ("trak", ">", "repsim"),
)
"""The thesis' LDS ordering (LoGra at each k compared at the same k)."""


def _ordering(summary: dict, ks: Sequence[int], cg: dict) -> list[dict]:
    """Each pair of the ordering: the gap of the means and whether it exceeds 2 std (the larger
    of the two methods' std over seeds); ``>=`` holds when the gap is ≥ −2 std."""
    checks = []
    for a, rel, b in ORDER:
        pairs = [(a, b)]
        if "logra" in a or "logra" in b:
            pairs = [
                (f"{a}_{k}" if "logra" in a else a, f"{b}_{k}" if "logra" in b else b) for k in ks
            ]
        for ma, mb in pairs:
            sa, sb = summary[ma], summary[mb]
            gap = sa["mean"] - sb["mean"]
            two_sd = 2 * max(sa["std"], sb["std"])
            holds = gap > two_sd if rel == ">" else gap >= -two_sd
            checks.append(
                {"a": ma, "rel": rel, "b": mb, "gap": gap, "two_std": two_sd, "holds": holds}
            )
    gap = cg["exact"]["mean"] - cg["ekfac"]["mean"]
    two_sd = 2 * max(cg["exact"]["std"], cg["ekfac"]["std"])
    checks.append(
        {
            "a": "exact",
            "rel": ">=",
            "b": "ekfac",
            "gap": gap,
            "two_std": two_sd,
            "holds": gap >= -two_sd,
            "on": "cg_queries",
        }
    )
    return checks


def run(seeds: Sequence[int], cfg: Config, *, progress: bool = True, dataset=None) -> dict:
    """The study over ``seeds`` (module docstring); the JSON-ready result."""
    ds = data_lib.load_mnist5k() if dataset is None else dataset
    per_seed = [run_seed(cfg, s, ds, progress=progress) for s in seeds]
    methods = list(per_seed[0]["lds"])
    summary = {m: harness.summarize([r["lds"][m] for r in per_seed], seeds) for m in methods}
    cg = {
        m: harness.summarize([r["lds_cg_queries"][m] for r in per_seed], seeds)
        for m in per_seed[0]["lds_cg_queries"]
    }
    cost = {
        m: {
            key: float(np.median([r["cost"][m][key] for r in per_seed]))
            for key in ("run_s", "compile_s", "peak_bytes", "temp_bytes", "flops")
        }
        for m in per_seed[0]["cost"]
    }
    return {
        "config": {
            **dataclasses.asdict(cfg),
            "optimizer": repr(cfg.optimizer()),
            "seeds": list(seeds),
        },
        "data": ds.source,
        "lds": summary,
        "lds_cg_queries": cg,
        "ordering": _ordering(summary, cfg.ks, cg),
        "cost": cost,
        "per_seed": per_seed,
    }


def plot(result: dict, path: str) -> None:
    """PNG: LDS per method (mean ± std over seeds) and brittleness (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lds, cg = result["lds"], result["lds_cg_queries"]
    names = list(lds)
    brittle = next((r["brittleness"] for r in result["per_seed"] if "brittleness" in r), None)
    fig, axes = plt.subplots(1, 3 if brittle else 2, figsize=(15 if brittle else 10, 4.2))
    ax = axes[0]
    ax.bar(
        range(len(names)),
        [lds[m]["mean"] for m in names],
        yerr=[lds[m]["std"] for m in names],
        color="tab:blue",
        capsize=3,
    )
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set(
        ylabel="LDS (Spearman)",
        title=f"LDS, {len(result['config']['seeds'])} seeds × "
        f"{result['config']['subsets']} half-subsets",
    )
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    names_cg = list(cg)
    ax.bar(
        range(len(names_cg)),
        [cg[m]["mean"] for m in names_cg],
        yerr=[cg[m]["std"] for m in names_cg],
        color=["tab:red" if m == "exact" else "tab:gray" for m in names_cg],
        capsize=3,
    )
    ax.set_xticks(range(len(names_cg)), names_cg, rotation=60, ha="right", fontsize=8)
    ax.set(ylabel="LDS", title=f"on the {result['config']['cg_queries']} queries of the exact (CG)")
    ax.grid(axis="y", alpha=0.3)
    if brittle:
        ax = axes[2]
        for m, per_k in brittle["flipped"].items():
            ks = [int(k) for k in per_k]
            ax.plot(ks, list(per_k.values()), "-o", label=m)
        ax.set(
            xlabel="training examples removed",
            ylabel="fraction of predictions flipped",
            title="brittleness (seed 0)",
        )
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_top(result: dict, cfg: Config, ds: data_lib.Dataset, path: str) -> None:
    """PNG: a few test images with their most helpful and most harmful training images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg_seed = next(r for r in result["per_seed"] if "top" in r)
    prob = make_problem(cfg, cfg_seed["seed"], ds)
    rows = cfg_seed["top"]["rows"]
    top = len(rows[0]["helpful"])
    fig, axes = plt.subplots(len(rows), 2 * top + 1, figsize=(1.3 * (2 * top + 1), 1.5 * len(rows)))
    axes = np.atleast_2d(axes)
    x, y = np.asarray(prob.x), np.asarray(prob.y)
    for r, row in enumerate(rows):
        images = [(np.asarray(prob.qx[row["query"]]), f"test y={row['label']}")]
        images += [(x[i], f"+ y={y[i]}") for i in row["helpful"]]
        images += [(x[i], f"− y={y[i]}") for i in row["harmful"]]
        for c, (img, title) in enumerate(images):
            axes[r, c].imshow(img.reshape(28, 28), cmap="gray_r")
            axes[r, c].set_title(title, fontsize=7, color="tab:red" if c == 0 else "black")
            axes[r, c].axis("off")
    fig.suptitle(
        f"test image, its {top} most helpful (+) and {top} most harmful (−) training "
        f"images by {cfg_seed['top']['method']} (seed {cfg_seed['seed']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLI = harness.StudyCLI(
    "influence",
    __doc__,
    quick="a tiny MLP, 600 training examples, 2 epochs, 12 subsets, seed 0",
    seeds="the seeds: split, initialisation, batch order and subsets (default 0 1 2)",
    base_steps=harness.Unused("the recipe fixes the epochs (20)"),
    meta_steps=harness.Unused("nothing meta-learns here: the influence is computed, not trained"),
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring)."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    cfg = QUICK if args.quick else Config()
    seeds = CLI.seeds(args)
    ds = data_lib.load_mnist5k()
    run_.data(ds.source)
    print(f"config: {cfg!r}", flush=True)
    result = run(seeds, cfg, progress=run_.progress, dataset=ds)
    print("\nLDS (mean ± std over seeds):")
    for m, s in result["lds"].items():
        print(f"  {m:>16}: {s['mean']:+.4f} ± {s['std']:.4f}")
    print("ordering (gap of means vs 2 std):")
    for c in result["ordering"]:
        print(
            f"  {c['a']} {c['rel']} {c['b']}: gap {c['gap']:+.4f}, 2 std {c['two_std']:.4f} -> "
            f"{'holds' if c['holds'] else 'does not hold'}"
        )
    out = run_.finish(result, plot, records=())
    top_png = run_.path(".top.png")
    plot_top(out, cfg, ds, str(top_png))
    print(f"wrote {top_png}")
    return out


if __name__ == "__main__":
    main()
