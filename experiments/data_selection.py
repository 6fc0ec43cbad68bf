r"""Learning the training distribution of a byte LM under domain shift: online data selection.

::

    python -m experiments.data_selection [--quick] [--seeds N ...] [--target NAME] [--english-only]
                                         [--rule top_k|sample] [--methods M ...]
                                         [--base-steps N | --meta-steps N] [--json PATH]
                                         [--no-progress]

The study of Grangier, Ablin & Hannun, "Bilevel Optimization to Learn Training Distributions for
Language Modeling under Domain Shift" (arXiv:2311.11973), scaled to two CPU cores. A byte-level
LM θ (:class:`experiments.lm.ByteLM`) is trained on a *generic* pool of real text from several
sources (:func:`experiments.text_data.load_text_domains`; the *specific* domain, ``--target``,
default ``news``, is held out of the pool). The goal is a low loss on the specific domain, of which
only a small train split is available. A weighting network α (:class:`experiments.lm.WeightingCNN`,
``zero_init=True``, so every method starts from uniform weights) scores generic windows.

Every base step draws a *big* batch of ``n`` generic windows and (for the selection methods) keeps
``k = n/8`` of them; θ takes one Adam step on the mean NLL of the kept windows. Methods (all share
the seed's LM initialisation, the big batches, the specific batches and the step counts):

``uniform``
    ``k`` windows of each big batch uniformly at random (``Selection(rule="uniform")``; no meta
    step).
``mixing``
    no selection: θ on ``(1−β)·L_generic + β·L_specific_train`` (β = 0.1), both on ``k`` windows.
``cds``
    contrastive data selection (Moore & Lewis 2010; Wang et al. 2018): a generic LM (uniform
    generic data, ``cds_steps`` steps from the seed's init) and a copy fine-tuned on
    specific_train (``finetune_steps``) give the fixed score ``ℓ_generic(x) − ℓ_finetuned(x)``
    (:func:`cds_scores`) of every generic window, computed once and looked up by example id
    (:func:`bilevel_jax.selection.lookup`); keep the top ``k``. No meta learning: a plain
    selection loop.
``classifier``
    a :class:`~experiments.lm.DomainClassifier` (the CNN read as a logistic classifier generic 0
    vs specific 1) is trained online on the sparse methods' machinery with the method swapped:
    ``bj.domain_classifier`` in place of the hypergradient, one ``classifier_tx`` step per meta
    interval on a random ``k`` of the last big batch (0) and ``k`` specific_train windows (1);
    keep the top ``k`` logits.
``mwn``
    Meta-Weight-Net-style dense weighting: θ on ``Σ_i softmax(s(x_i; α))_i ℓ_i(θ)`` over ``k``
    windows of each big batch (no example dropped), α by one-step look-ahead (``bj.dds(lr=ρ)``).
``ltr``
    learning to reweight (Ren et al. 2018): per-step weights ``w_i ∝ max(0, ⟨∇_θℓ_i, ∇_θL_spec⟩)``,
    normalised to sum 1 (all 0 when none is positive), computed fresh each step on ``k`` windows
    (:func:`ltr_weights`: the inner products by one ``jax.jvp`` of the per-example losses along
    ``∇_θL_spec``); no α.
``dds`` / ``soba`` / ``sama``
    *sparse* DDS / SOBA (the paper's methods) and SAMA (this library's, not in the paper): each
    base step keeps the top ``k`` CNN scores of its big batch (``Selection(rule="top_k",
    meta_batch="random")``: top-k like ``cds`` and ``classifier``, so the comparison is between
    scorers) and trains θ on them with uniform weights; every ``meta_interval`` base steps α takes
    one Adam step on the hypergradient of the specific_train NLL (a batch of ``k``), the base loss
    of the meta step being the softmax-weighted NLL on a random ``k``-subset of the last big
    batch. ``bj.dds(lr=0.1)`` (ρ = 0.1), ``bj.soba(z_tx=optax.adam(...), hvp_loss=...)`` (z stepped by
    Adam, H from the unweighted loss of the batch: the reference code's variant) and ``bj.sama(adapt_from="last")``.
``transfer``
    the final CNN of ``soba`` (same seed), frozen, selecting top-``k`` for a fresh LM from the same
    initialisation (does the learned distribution transfer to a new model?).

Two regimes: **pre-train** (θ sees only generic data, ``mixing`` excepted), then **fine-tune**
(``finetune_steps`` more Adam steps on specific_train, the same for every method). Reported per
method and regime: specific-domain held-out bits per byte (``specific_valid``; also
``specific_test``), generic held-out bpb (windows of generic documents never trained on: the price
paid), each as value and Δ vs uniform, mean ± std over seeds; the source mix of the data θ trained
on (counts of the kept windows per source over the pre-training, softmax/LTR weight mass for the
dense methods); the entropy, effective sample size and top-``k`` mass of the final softmax weights
on a fixed held-out big batch; and the wall time per base step relative to ``uniform`` (compile
time excluded: every program is compiled once, ahead of time, and reused for every seed).

Seeds select the LM and CNN initialisations and the batch order; the data split is fixed
(``load_text_domains(seed=0)``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel_jax as bj
from experiments import harness, text_data
from experiments import lm as lm_lib
from experiments.models import split

__all__ = [
    "METHODS",
    "Config",
    "QUICK",
    "Data",
    "prepare_data",
    "ltr_weights",
    "cds_scores",
    "weight_stats",
    "run_seed",
    "cost_report",
    "host_transfer_ops",
    "main",
]

PyTree = Any

METHODS = ("uniform", "mixing", "cds", "classifier", "mwn", "ltr", "dds", "soba", "sama")
"""The methods of the comparison (``transfer`` runs too when ``soba`` does)."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Every setting of one invocation (recorded in the JSON as it is).

    Attributes:
      context: LM context in bytes (windows of ``context + 1``).
      dim, heads, layers: the :class:`~experiments.lm.ByteLM`.
      cnn_embed, cnn_channels, cnn_kernel: the weighting CNN and the domain classifier.
      big_batch: ``n``, generic windows scored per base step.
      keep: ``k``, windows trained on per base step (every method; ``n/8``).
      meta_interval: base steps per meta step (``K``).
      meta_steps: meta steps of pre-training (pre-training is ``K · meta_steps`` base steps).
      segment: meta steps per compiled segment; the curves are evaluated between segments.
      finetune_steps: Adam steps on specific_train after pre-training (a multiple of
        ``K · segment``); also the CDS fine-tuning length.
      cds_steps: generic pre-training steps of the CDS reference LM (a multiple of ``K · segment``).
      mix_specific: β of ``mixing``.
      generic_per_source: windows drawn from each generic source into the pool
        (``load_text_domains(generic_per_source=)``; a source with fewer gives all it has). The
        pool should be several times ``keep/big_batch`` × the windows trained on, or the top-k
        methods keep revisiting one small subset (a first run with 1,000 per source did: see
        ``experiments/README.md``).
      generic_valid_per_source: held-out generic windows per source (whole documents held out).
      eval_chunk: windows per evaluation call (one compiled shape for every evaluation).
      lm_tx, finetune_tx, meta_tx, classifier_tx, z_tx: the optimizers (θ in pre-training, θ in
        fine-tuning, α, the domain classifier, SOBA's z).
      rule: the selection rule of ``dds`` / ``soba`` / ``sama`` (``"top_k"``, or ``"sample"``:
        ``k`` drawn ∝ softmax of the scores without replacement).
      dds_lr: ρ of ``bj.dds(lr=ρ)`` (``dds`` and ``mwn``).
      sama_alpha: α of ``bj.sama``.
      data_seed: the seed of the specific/generic split (fixed across seeds).
    """

    context: int = 64
    dim: int = 64
    heads: int = 4
    layers: int = 2
    cnn_embed: int = 16
    cnn_channels: int = 32
    cnn_kernel: int = 7
    big_batch: int = 128
    keep: int = 16
    meta_interval: int = 4
    meta_steps: int = 192
    segment: int = 32
    finetune_steps: int = 128
    cds_steps: int = 256
    mix_specific: float = 0.1
    generic_per_source: int = 5000
    generic_valid_per_source: int = 100
    eval_chunk: int = 256
    lm_tx: harness.Recipe = harness.Recipe(optax.adam, 3e-3)
    finetune_tx: harness.Recipe = harness.Recipe(optax.adam, 1e-3)
    meta_tx: harness.Recipe = harness.Recipe(optax.adam, 3e-3)
    classifier_tx: harness.Recipe = harness.Recipe(optax.adam, 3e-3)
    z_tx: harness.Recipe = harness.Recipe(optax.adam, 1e-3)
    rule: str = "top_k"
    dds_lr: float = 0.1
    sama_alpha: float = 0.1
    data_seed: int = 0

    @property
    def base_steps(self) -> int:
        """Pre-training base steps, ``K · meta_steps``."""
        return self.meta_interval * self.meta_steps

    @property
    def segment_steps(self) -> int:
        """Base steps per compiled segment, ``K · segment``."""
        return self.meta_interval * self.segment


QUICK: dict[str, Any] = dict(
    meta_steps=8,
    segment=4,
    finetune_steps=16,
    cds_steps=16,
    generic_per_source=1000,
    generic_valid_per_source=40,
    dim=32,
    heads=2,
    layers=1,
)
"""``--quick``: the overrides of :class:`Config` (32 pre-training base steps, one seed, a
one-layer dim-32 LM so that compilation, which dominates, fits a smoke test)."""


# ----------------------------------------------------------------------------------------------
# Data


@dataclasses.dataclass(frozen=True)
class Data:
    """The arrays of one study (numpy, int32 windows ``(n, context + 1)``).

    ``gen_train`` / ``gen_valid``: the generic pool split by document (``gen_valid`` holds
    ``generic_valid_per_source`` windows of each source, all from documents absent from
    ``gen_train``); ``*_src``: the source id (into ``source_names``) of each window, ``*_doc``
    its document within the source.
    """

    gen_train: np.ndarray
    gen_train_src: np.ndarray
    gen_train_doc: np.ndarray
    gen_valid: np.ndarray
    gen_valid_src: np.ndarray
    gen_valid_doc: np.ndarray
    spec_train: np.ndarray
    spec_valid: np.ndarray
    spec_test: np.ndarray
    source_names: tuple[str, ...]
    generic_names: tuple[str, ...]
    target: str


def prepare_data(ds: text_data.TextDomains, per_source: int, seed: int = 0) -> Data:
    """Split the generic pool by document into train and a balanced held-out set.

    For each generic source, whole documents (in a seeded random order) go to the held-out side
    until it has at least ``per_source`` windows; ``per_source`` of them are kept there and every
    window of those documents is removed from the training pool.
    """
    rng = np.random.default_rng(seed)
    held = np.zeros(len(ds.generic), bool)
    valid_idx = []
    for name in ds.generic_names:
        sid = ds.source_names.index(name)
        mine = np.flatnonzero(ds.generic_source == sid)
        docs = rng.permutation(np.unique(ds.generic_doc[mine]))
        chosen: list[int] = []
        for doc in docs:
            if len(chosen) >= per_source:
                break
            chosen.extend(mine[ds.generic_doc[mine] == doc].tolist())
        if len(chosen) < per_source or len(chosen) >= len(mine):
            raise ValueError(
                f"generic source {name!r} has too few windows ({len(mine)}) for "
                f"{per_source} held-out windows; lower generic_valid_per_source"
            )
        held[chosen] = True
        valid_idx.extend(sorted(chosen)[:per_source])
    valid_idx = rng.permutation(np.asarray(valid_idx))  # any prefix is a mixed batch
    return Data(
        gen_train=np.asarray(ds.generic[~held]),
        gen_train_src=np.asarray(ds.generic_source[~held]),
        gen_train_doc=np.asarray(ds.generic_doc[~held]),
        gen_valid=np.asarray(ds.generic[valid_idx]),
        gen_valid_src=np.asarray(ds.generic_source[valid_idx]),
        gen_valid_doc=np.asarray(ds.generic_doc[valid_idx]),
        spec_train=np.asarray(ds.specific_train),
        spec_valid=np.asarray(ds.specific_valid),
        spec_test=np.asarray(ds.specific_test),
        source_names=ds.source_names,
        generic_names=ds.generic_names,
        target=ds.target,
    )


# ----------------------------------------------------------------------------------------------
# Study-specific pure functions


def ltr_weights(
    graphdef: nnx.GraphDef, theta: PyTree, windows: jax.Array, meta_windows: jax.Array
) -> jax.Array:
    r"""Learning-to-reweight weights (Ren et al., ICML 2018) of ``windows``, shape ``(n,)``.

    .. math:: \tilde w_i = \max(0, \langle \nabla_θ ℓ_i(θ), \nabla_θ L_{\rm spec}(θ)\rangle),
              \qquad w_i = \tilde w_i / \textstyle\sum_j \tilde w_j

    (every ``w_i = 0`` when no ``\tilde w_i`` is positive), where ``ℓ_i`` is the NLL of window
    ``i`` and ``L_spec`` the mean NLL of ``meta_windows``. The ``n`` inner products are the
    directional derivative of the per-example losses along ``∇_θL_spec``: one ``jax.jvp``.
    """
    v = jax.grad(lambda t: lm_lib.lm_loss(graphdef, t, meta_windows))(theta)
    _, dots = jax.jvp(lambda t: lm_lib.per_example_nll(graphdef, t, windows), (theta,), (v,))
    pos = jnp.maximum(jax.lax.stop_gradient(dots), 0.0)
    total = pos.sum()
    return jnp.where(total > 0, pos / jnp.where(total > 0, total, 1.0), 0.0)


def cds_scores(
    graphdef: nnx.GraphDef, theta_generic: PyTree, theta_specific: PyTree, windows: jax.Array
) -> jax.Array:
    r"""Contrastive data selection scores ``ℓ_generic(x) − ℓ_specific(x)`` (nats per byte).

    Moore & Lewis (2010), Wang et al. (2018): high when the model fine-tuned on the specific
    domain explains ``x`` better than the generic model it started from
    (:func:`bilevel_jax.selection.contrastive_scores` of the per-window NLL).
    """

    def nll(theta, w):
        return lm_lib.per_example_nll(graphdef, theta, w)

    return bj.selection.contrastive_scores(nll, theta_generic, theta_specific, windows)


def weight_stats(weights: np.ndarray, top: int) -> dict[str, float]:
    """Concentration of normalised weights over a batch of ``n``: ``entropy`` (``H(w)/ln n``, 1 =
    uniform), ``ess`` (effective sample size ``1/(n Σw²)``, 1 = uniform) and ``top_mass`` (the
    weight of the ``top`` largest)."""
    w = np.asarray(weights, np.float64)
    n = w.size
    if n < 2 or not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
        raise ValueError(f"weights must be >= 0, finite, not all 0, n >= 2; got {w}")
    w = w / w.sum()
    nz = w[w > 0]
    return {
        "entropy": float(-(nz * np.log(nz)).sum() / math.log(n)),
        "ess": float(1.0 / (n * (w**2).sum())),
        "top_mass": float(np.sort(w)[::-1][:top].sum()),
    }


# ----------------------------------------------------------------------------------------------
# The compiled programs (built once per method, reused for every seed)


class Program:
    """A jitted function compiled ahead of time at its first call (compile time kept apart)."""

    def __init__(self, fn: Callable, name: str):
        self.jit, self.name = jax.jit(fn), name
        self.compiled: Any = None
        self.compile_s = 0.0

    def ensure(self, *args) -> Program:
        """Compile for ``args`` (once); returns self."""
        if self.compiled is None:
            t0 = time.perf_counter()
            self.compiled = self.jit.lower(*args).compile()
            self.compile_s = time.perf_counter() - t0
        return self

    def __call__(self, *args):
        return self.ensure(*args).compiled(*args)


def _counts(src_ids: jax.Array, weights: jax.Array | None, n_sources: int) -> jax.Array:
    """Per-source totals of ``weights`` (default 1) over ``src_ids`` (any shape)."""
    w = jnp.ones(src_ids.shape) if weights is None else weights
    return jnp.zeros(n_sources).at[src_ids.reshape(-1)].add(w.reshape(-1))


class Study:
    """The models, losses and per-method programs of one configuration."""

    def __init__(self, cfg: Config, data: Data):
        self.cfg, self.data = cfg, data
        self.n_sources = len(data.source_names)
        self.lm_def, _ = split(self._lm(0))
        self.cnn_def, _ = split(self._cnn(0))
        self.clf_def, _ = split(self._clf(0))
        self.k = cfg.keep
        lm_def, cnn_def = self.lm_def, self.cnn_def

        def nll(theta, windows):
            return lm_lib.per_example_nll(lm_def, theta, windows)

        def train_loss(theta, batch):  # the λ-free loss of the kept windows
            return nll(theta, batch["x"]).mean()

        def cnn_score(alpha, batch):
            return lm_lib.scores(cnn_def, alpha, batch["x"])

        def weighted_loss(theta, alpha, batch):  # Σ softmax(s)_i ℓ_i
            w = bj.selection.softmax_weights(cnn_score(alpha, batch))
            return jnp.sum(w * nll(theta, batch["x"]))

        def meta_loss(theta, alpha, windows):
            del alpha
            return nll(theta, windows).mean()

        self.nll, self.train_loss, self.cnn_score = nll, train_loss, cnn_score
        self.weighted_loss, self.meta_loss = weighted_loss, meta_loss
        k = cfg.keep
        clf_def = self.clf_def

        def clf_score(phi, batch):
            return lm_lib.scores(clf_def, phi, batch["x"])

        def clf_meta_score(phi, windows):  # the meta batch is the specific windows themselves
            return lm_lib.scores(clf_def, phi, windows)

        self.selections = {
            "uniform": bj.Selection(score_fn=_constant_score, keep=k, rule="uniform"),
            "cds": bj.Selection(score_fn=_lookup_score, keep=k, rule="top_k"),
            "classifier": bj.Selection(
                score_fn=clf_score, keep=k, rule="top_k", meta_batch="random"
            ),
            "transfer": bj.Selection(score_fn=cnn_score, keep=k, rule="top_k"),
            "sparse": bj.Selection(score_fn=cnn_score, keep=k, rule=cfg.rule, meta_batch="random"),
        }
        # the reference code's SOBA: z stepped by Adam, H from the uniform loss of the batch
        soba = bj.soba(z_tx=cfg.z_tx(), hvp_loss=_uniform_loss(train_loss))
        self.methods = {
            "mwn": bj.dds(lr=cfg.dds_lr),
            "dds": bj.dds(lr=cfg.dds_lr),
            "soba": soba,
            "sama": bj.sama(cfg.sama_alpha, adapt_from="last"),
            # not a hypergradient: φ is trained as a logistic classifier, specific (1) vs a
            # random k of the big batch (0), one classifier_tx step per meta interval
            "classifier": bj.domain_classifier(clf_score, meta_score_fn=clf_meta_score),
        }
        self.steps = {
            "mwn": bj.bilevel_step(
                weighted_loss, meta_loss, cfg.lm_tx(), cfg.meta_tx(), self.methods["mwn"]
            ),
            **{
                name: bj.bilevel_step(
                    weighted_loss,
                    meta_loss,
                    cfg.lm_tx(),
                    cfg.meta_tx(),
                    self.methods[name],
                    selection=self.selections["sparse"],
                    train_loss=train_loss,
                )
                for name in ("dds", "soba", "sama")
            },
            "classifier": bj.bilevel_step(
                _uniform_loss(train_loss),  # (the classifier's meta step does not use it)
                meta_loss,
                cfg.lm_tx(),
                cfg.classifier_tx(),
                self.methods["classifier"],
                selection=self.selections["classifier"],
                train_loss=train_loss,
            ),
        }
        self.programs: dict[str, Program] = {}
        # plain LM training: fine-tuning (finetune_tx), and the CDS generic model (lm_tx)
        self.finetune = Program(self._plain_segment(cfg.finetune_tx), "finetune")
        self.pretrain = Program(self._plain_segment(cfg.lm_tx), "plain_pretrain")
        # every evaluation in chunks of one shape: one compiled program
        self.eval_chunk = cfg.eval_chunk
        self.eval = Program(nll, "eval")

        def table(tg, ts, windows):  # in chunks: the logits of the whole pool do not fit
            one = lambda w: cds_scores(lm_def, tg, ts, w[None])[0]  # noqa: E731
            return jax.lax.map(one, windows, batch_size=256)

        self.cds_table = Program(table, "cds_table")
        self.cds_scores = jax.jit(lambda tg, ts, w: cds_scores(lm_def, tg, ts, w))
        self.ltr_weights = jax.jit(lambda th, w, m: ltr_weights(lm_def, th, w, m))
        self.cnn_scores = jax.jit(lambda a, w: lm_lib.scores(cnn_def, a, w))
        self.clf_scores = jax.jit(clf_meta_score)

    # -- models
    def _lm(self, seed: int) -> lm_lib.ByteLM:
        c = self.cfg
        return lm_lib.ByteLM(
            dim=c.dim, heads=c.heads, layers=c.layers, context=c.context, rngs=nnx.Rngs(seed)
        )

    def _cnn(self, seed: int) -> lm_lib.WeightingCNN:
        c = self.cfg
        return lm_lib.WeightingCNN(
            embed=c.cnn_embed,
            channels=c.cnn_channels,
            kernel=c.cnn_kernel,
            zero_init=True,
            rngs=nnx.Rngs(seed),
        )

    def _clf(self, seed: int) -> lm_lib.DomainClassifier:
        c = self.cfg
        return lm_lib.DomainClassifier(
            embed=c.cnn_embed, channels=c.cnn_channels, kernel=c.cnn_kernel, rngs=nnx.Rngs(seed)
        )

    def init_params(self, seed: int) -> tuple[PyTree, PyTree, PyTree]:
        """θ₀, α₀ (zero-init CNN) and φ₀ (classifier) of a seed."""
        return (
            split(self._lm(seed))[1],
            split(self._cnn(seed + 10_000))[1],
            split(self._clf(seed + 20_000))[1],
        )

    # -- programs
    def _plain_segment(self, recipe: harness.Recipe) -> Callable:
        """``seg(θ, s, batches)``: one step of ``recipe()`` on the mean NLL of each of
        ``batches`` (S, k, T+1)."""
        tx = recipe()

        def seg(theta, s, batches):
            def body(c, b):
                r = bj.base_step(lambda t, w: self.nll(t, w).mean(), tx, *c, b)
                return (r.params, r.opt_state), r.loss

            (theta, s), losses = jax.lax.scan(body, (theta, s), batches)
            return theta, s, losses.mean()

        return seg

    def program(self, name: str) -> Program:
        """The compiled pre-training segment of ``name``:
        ``seg(state, big_idx (E, K, n), spec_idx (E, K, k), arrays) -> (state, counts, loss)``."""
        if name not in self.programs:
            make = {
                "uniform": self._selection_seg,
                "cds": self._selection_seg,
                "transfer": self._selection_seg,
                "classifier": self._sparse_seg,
                "mixing": lambda n: self._mixing_seg,
                "ltr": lambda n: self._ltr_seg,
                "mwn": lambda n: self._mwn_seg,
                "dds": self._sparse_seg,
                "soba": self._sparse_seg,
                "sama": self._sparse_seg,
            }[name]
            self.programs[name] = Program(make(name), name)
        return self.programs[name]

    def _scan(self, body, state, big_idx, spec_idx):
        (state, out) = jax.lax.scan(body, state, (big_idx, spec_idx))
        return state, out[0], out[1]

    def _selection_seg(self, name: str):
        """A plain selection loop (no meta step): score with a fixed scorer, keep, step θ."""
        sel = self.selections[name]
        tx = self.cfg.lm_tx()
        ns = self.n_sources

        def seg(state, big_idx, spec_idx, arrays):
            gen, src = arrays["gen"], arrays["gen_src"]

            def interval(st, idx):
                bi, si = idx  # (K, n), (K, k)

                def one(c, j):
                    theta, s, key = c
                    key, sub = jax.random.split(key)
                    big = {"x": gen[bi[j]], "id": bi[j]}
                    keep = sel.choose(sub, sel.scores(st["lam"], big))
                    kept = bj.selection.gather(big, keep)
                    r = bj.base_step(lambda t, b: self.train_loss(t, b), tx, theta, s, kept)
                    return (r.params, r.opt_state, key), (r.loss, src[kept["id"]])

                (theta, s, key), (loss, ids) = jax.lax.scan(
                    one, (st["theta"], st["opt"], st["key"]), jnp.arange(bi.shape[0])
                )
                st = {**st, "theta": theta, "opt": s, "key": key}
                return st, (_counts(ids, None, ns), loss.mean())

            return self._scan(interval, state, big_idx, spec_idx)

        return seg

    def init_selection(self, theta, lam, seed: int) -> dict:
        return {
            "theta": theta,
            "opt": self.cfg.lm_tx().init(theta),
            "lam": lam,
            "key": jax.random.PRNGKey(seed),
        }

    def _mixing_seg(self, state, big_idx, spec_idx, arrays):
        gen, src, spec = arrays["gen"], arrays["gen_src"], arrays["spec"]
        tx, beta, k = self.cfg.lm_tx(), self.cfg.mix_specific, self.k

        def loss(theta, g, sp):
            return (1 - beta) * self.nll(theta, g).mean() + beta * self.nll(theta, sp).mean()

        def interval(st, idx):
            bi, si = idx

            def one(c, j):
                r = bj.base_step(loss, tx, *c, gen[bi[j, :k]], spec[si[j]])
                return (r.params, r.opt_state), (r.loss, src[bi[j, :k]])

            (theta, s), (losses, ids) = jax.lax.scan(
                one, (st["theta"], st["opt"]), jnp.arange(bi.shape[0])
            )
            return {**st, "theta": theta, "opt": s}, (
                _counts(ids, None, self.n_sources),
                losses.mean(),
            )

        return self._scan(interval, state, big_idx, spec_idx)

    def _ltr_seg(self, state, big_idx, spec_idx, arrays):
        gen, src, spec = arrays["gen"], arrays["gen_src"], arrays["spec"]
        tx, k, lm_def = self.cfg.lm_tx(), self.k, self.lm_def

        def interval(st, idx):
            bi, si = idx

            def one(c, j):
                theta, s = c
                x = gen[bi[j, :k]]
                w = ltr_weights(lm_def, theta, x, spec[si[j]])
                r = bj.base_step(lambda t: jnp.sum(w * self.nll(t, x)), tx, theta, s)
                return (r.params, r.opt_state), (r.loss, src[bi[j, :k]], w)

            (theta, s), (losses, ids, w) = jax.lax.scan(
                one, (st["theta"], st["opt"]), jnp.arange(bi.shape[0])
            )
            st = {
                **st,
                "theta": theta,
                "opt": s,
                "zero_steps": st["zero_steps"] + jnp.sum(jnp.all(w == 0, axis=1)),
            }
            return st, (_counts(ids, w, self.n_sources), losses.mean())

        return self._scan(interval, state, big_idx, spec_idx)

    def _mwn_seg(self, state, big_idx, spec_idx, arrays):
        gen, src, spec = arrays["gen"], arrays["gen_src"], arrays["spec"]
        step, k = self.steps["mwn"], self.k

        def interval(st, idx):
            bi, si = idx
            batches = {"x": gen[bi[:, :k]], "id": bi[:, :k]}
            w = jax.vmap(lambda b: bj.selection.softmax_weights(self.cnn_score(st.meta_params, b)))(
                batches
            )  # the weights the K base steps use (α is fixed during them)
            st, metrics = step(st, batches, spec[si[-1]])
            return st, (_counts(src[batches["id"]], w, self.n_sources), metrics["base_loss"])

        return self._scan(interval, state, big_idx, spec_idx)

    def _sparse_seg(self, name: str):
        step = self.steps[name]

        def seg(state, big_idx, spec_idx, arrays):
            gen, src, spec = arrays["gen"], arrays["gen_src"], arrays["spec"]

            def interval(st, idx):
                bi, si = idx
                st, base, _ = step.phases(st, {"x": gen[bi], "id": bi}, spec[si[-1]])
                assert base.selected is not None  # a step with a selection records them
                ids = jnp.take_along_axis(bi, base.selected, axis=1)
                good = jnp.maximum(jnp.sum(base.finite), 1)
                loss = jnp.sum(jnp.where(base.finite, base.losses, 0.0)) / good
                return st, (_counts(src[ids], None, self.n_sources), loss)

            return self._scan(interval, state, big_idx, spec_idx)

        return seg

    def final_weights(self, name: str, state: Any, extra: dict, big: np.ndarray) -> np.ndarray:
        """Normalised weights the final state gives the windows ``big`` (a held-out big batch)."""
        n = big.shape[0]
        if name in ("uniform", "mixing"):
            return np.full(n, 1.0 / n)
        if name in ("mwn", "dds", "soba", "sama"):
            s = self.cnn_scores(state.meta_params, big)
        elif name == "transfer":
            s = self.cnn_scores(state["lam"], big)
        elif name == "classifier":
            s = self.clf_scores(state.meta_params, big)
        elif name == "cds":
            s = self.cds_scores(extra["theta_generic"], extra["theta_specific"], big)
        elif name == "ltr":
            return np.asarray(self.ltr_weights(state["theta"], big, extra["meta_windows"]))
        else:
            raise ValueError(f"unknown method {name!r}")
        return np.asarray(jax.nn.softmax(s))


def _constant_score(lam, batch):
    """``uniform``'s score: the same for every window (its rule ignores it)."""
    del lam
    return jnp.zeros(batch["id"].shape, jnp.float32)


def _lookup_score(table, batch):
    """``cds``'s score: the precomputed table looked up by example id."""
    return bj.selection.lookup(table, batch["id"])


def _uniform_loss(train_loss):
    """``train_loss`` in the ``(θ, λ, batch)`` form of a base loss (SOBA's ``hvp_loss``)."""

    def uniform_loss(theta, lam, batch):
        del lam
        return train_loss(theta, batch)

    return uniform_loss


# ----------------------------------------------------------------------------------------------
# Cost of one step, compiled


_HOST_OPS = ("outfeed", "infeed", "send", "recv")


def host_transfer_ops(hlo: str) -> dict[str, int]:
    """Instructions of an HLO module that move data to or from the host mid-program: in/outfeed,
    send/recv and Python callbacks. ``unconditional``: run on every call; ``conditional``: inside
    a ``cond`` branch (e.g. the library's warning on an exactly-zero hypergradient, whose branch
    runs only when every entry is 0). ``unconditional == 0``: no host round-trip per call."""
    import re

    out = {"unconditional": 0, "conditional": 0}
    pattern = (
        r"\b(" + "|".join(_HOST_OPS) + r")(-done|-start)?\(|custom_call_target=\"[^\"]*callback"
    )
    for line in hlo.splitlines():
        if re.search(pattern, line):
            where = re.search(r'op_name="([^"]*)"', line)
            conditional = where is not None and "/cond/" in where.group(1)
            out["conditional" if conditional else "unconditional"] += 1
    return out


def cost_report(study: Study, *, reps: int = 20) -> dict:
    """Compiled FLOPs (XLA ``cost_analysis``) and wall time of one meta step of each method, and
    of one selection base step, as ratios to one LM step (an Adam step on the mean NLL of ``k``
    windows). Every function is compiled on its own (not inside a scan, whose body XLA counts
    once); times are medians of ``reps`` calls, interleaved, in this process."""
    cfg, data, k, n = study.cfg, study.data, study.cfg.keep, study.cfg.big_batch
    theta, alpha, phi = study.init_params(0)
    big = {"x": jnp.asarray(data.gen_train[:n]), "id": jnp.arange(n, dtype=jnp.int32)}
    kept = jax.tree.map(lambda x: x[:k], big)
    meta = jnp.asarray(data.spec_train[:k])
    tx = cfg.lm_tx()
    s0 = tx.init(theta)
    grad0 = jax.tree.map(jnp.zeros_like, theta)
    sel = study.selections["sparse"]
    train_loss = study.train_loss

    def lm_step(th, s, b):
        r = bj.base_step(train_loss, tx, th, s, b)
        return r.params, r.opt_state

    def selection_step(th, s, lam, b, key):  # score n, keep k, step on the kept
        return lm_step(th, s, bj.selection.gather(b, sel.choose(key, sel.scores(lam, b))))

    jobs: dict[str, tuple[Callable, tuple]] = {
        "lm_step": (lm_step, (theta, s0, kept)),
        "selection_step": (selection_step, (theta, s0, alpha, big, jax.random.PRNGKey(0))),
    }
    for name, step in study.steps.items():
        state = step.init(theta, phi if name == "classifier" else alpha, rng=jax.random.PRNGKey(0))

        def meta_step(st, b, m, g, ls, step=step):
            return step.meta_phase(st, b, m, last_grad=g, last_opt_state=ls)

        jobs[f"meta_step:{name}"] = (meta_step, (state, kept, meta, grad0, s0))
    compiled, stats = {}, {}
    for key, (fn, args) in jobs.items():
        compiled[key], stats[key] = harness.compile_stats(fn, args)
    times: dict[str, list[float]] = {key: [] for key in jobs}
    for _ in range(reps):
        for key, (_, args) in jobs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled[key](*args))
            times[key].append(time.perf_counter() - t0)
    ref_flops, ref_s = stats["lm_step"]["flops"], float(np.median(times["lm_step"]))
    out = {}
    for key in jobs:
        med = float(np.median(times[key]))
        out[key] = {
            "flops": stats[key]["flops"],
            "flops_ratio": stats[key]["flops"] / ref_flops,
            "median_s": med,
            "time_ratio": med / ref_s,
            "temp_bytes": stats[key]["temp_bytes"],
        }
    return out


# ----------------------------------------------------------------------------------------------
# One seed


def _bpb(study: Study, theta, windows: np.ndarray) -> float:
    """Bits per byte of ``theta`` on ``windows`` (every window weighs the same)."""
    c = study.eval_chunk
    n = len(windows)
    padded = np.zeros((-(-n // c) * c, windows.shape[1]), np.int32)
    padded[:n] = windows
    nll = np.concatenate(
        [np.asarray(study.eval(theta, padded[i : i + c])) for i in range(0, len(padded), c)]
    )
    return float(lm_lib.bits_per_byte(nll[:n].mean()))


def run_seed(
    study: Study, seed: int, methods: Sequence[str], *, progress: bool = False
) -> dict[str, dict]:
    """Every method of ``methods`` on one seed; returns ``{method: record}``."""
    cfg, data = study.cfg, study.data
    E, K, n, k = cfg.segment, cfg.meta_interval, cfg.big_batch, cfg.keep
    seg_steps = cfg.segment_steps
    n_seg = cfg.meta_steps // E
    big_idx = harness.batch_indices(len(data.gen_train), cfg.base_steps, n, seed)
    spec_idx = harness.batch_indices(len(data.spec_train), cfg.base_steps, k, seed + 1)
    big_idx = jnp.asarray(big_idx.reshape(n_seg, E, K, n), jnp.int32)
    spec_idx = jnp.asarray(spec_idx.reshape(n_seg, E, K, k), jnp.int32)
    ft_idx = harness.batch_indices(len(data.spec_train), cfg.finetune_steps, k, seed + 2)
    arrays = {
        "gen": jnp.asarray(data.gen_train),
        "gen_src": jnp.asarray(data.gen_train_src),
        "spec": jnp.asarray(data.spec_train),
    }
    spec = arrays["spec"]
    ft_batches = spec[jnp.asarray(ft_idx)].reshape(-1, seg_steps, k, cfg.context + 1)
    spec_valid, spec_test, gen_valid = data.spec_valid, data.spec_test, data.gen_valid
    fixed_big = gen_valid[:n]
    meta_fixed = spec[:k]
    theta0, alpha0, phi0 = study.init_params(seed)

    def plain_train(prog, recipe, theta, batches):
        s = recipe().init(theta)
        curve = []
        for b in batches:
            theta, s, _ = prog(theta, s, b)
            curve.append(_bpb(study, theta, spec_valid))
        return theta, curve

    out: dict[str, dict] = {}
    extra_cds: dict = {}
    for name in methods:
        t_method = time.perf_counter()
        t_extra = 0.0
        lam: Any = None
        if name == "cds":
            t0 = time.perf_counter()
            gen_batches = arrays["gen"][big_idx.reshape(-1, n)[: cfg.cds_steps, :k]]
            theta_g, _ = plain_train(
                study.pretrain,
                cfg.lm_tx,
                theta0,
                gen_batches.reshape(-1, seg_steps, k, cfg.context + 1),
            )
            theta_s, _ = plain_train(study.finetune, cfg.finetune_tx, theta_g, ft_batches)
            lam = study.cds_table(theta_g, theta_s, arrays["gen"])
            extra_cds = {"theta_generic": theta_g, "theta_specific": theta_s}
            t_extra = time.perf_counter() - t0
        elif name == "transfer":
            lam = out["soba"]["_state"].meta_params
        if name in ("uniform", "cds", "transfer"):
            state: Any = study.init_selection(theta0, lam, seed)
        elif name in ("mixing", "ltr"):
            state = {"theta": theta0, "opt": cfg.lm_tx().init(theta0)}
            if name == "ltr":
                state["zero_steps"] = jnp.zeros([], jnp.int32)
        else:
            lam0 = phi0 if name == "classifier" else alpha0
            state = study.steps[name].init(theta0, lam0, rng=jax.random.PRNGKey(seed))
        prog = study.program(name).ensure(state, big_idx[0], spec_idx[0], arrays)

        def theta_of(st):
            return st.base_params if isinstance(st, bj.BilevelState) else st["theta"]

        curve = [_bpb(study, theta0, spec_valid)]
        counts = np.zeros(study.n_sources)
        seg_counts = []
        seg_times: list[float] = []
        for i in range(n_seg):
            t0 = time.perf_counter()
            state, c, _ = prog(state, big_idx[i], spec_idx[i], arrays)
            c = np.asarray(c).sum(0)
            seg_times.append(time.perf_counter() - t0)
            counts += c
            seg_counts.append(c)
            curve.append(_bpb(study, theta_of(state), spec_valid))
        theta_pre = theta_of(state)
        pre = {
            "specific_bpb": curve[-1],
            "specific_test_bpb": _bpb(study, theta_pre, spec_test),
            "generic_bpb": _bpb(study, theta_pre, gen_valid),
        }
        theta_ft, ft_curve = plain_train(study.finetune, cfg.finetune_tx, theta_pre, ft_batches)
        ft = {
            "specific_bpb": ft_curve[-1],
            "specific_test_bpb": _bpb(study, theta_ft, spec_test),
            "generic_bpb": _bpb(study, theta_ft, gen_valid),
        }
        names = data.generic_names
        mix = {s: float(counts[data.source_names.index(s)] / counts.sum()) for s in names}
        last = seg_counts[-1]
        mix_last = {s: float(last[data.source_names.index(s)] / last.sum()) for s in names}
        w = study.final_weights(name, state, {**extra_cds, "meta_windows": meta_fixed}, fixed_big)
        rec = {
            "pretrain": pre,
            "finetune": ft,
            "curve": curve,
            "finetune_curve": ft_curve,
            "source_mix": mix,
            "source_mix_last_segment": mix_last,
            "weights": weight_stats(w, k) if w.sum() > 0 else None,
            "per_step_s": float(np.sum(seg_times) / cfg.base_steps),
            "extra_s": t_extra,
            "_state": state,
        }
        if isinstance(state, bj.BilevelState):
            rec["skipped_base"] = int(state.skipped_base)
            rec["skipped_meta"] = int(state.skipped_meta)
        if name == "ltr":
            rec["all_zero_weight_steps"] = int(cast(dict, state)["zero_steps"])
        out[name] = rec
        if progress:
            print(
                f"  seed {seed} {name:>10}: specific bpb pre {pre['specific_bpb']:.3f} "
                f"ft {ft['specific_bpb']:.3f}, generic {pre['generic_bpb']:.3f}; "
                f"{rec['per_step_s'] * 1e3:.1f} ms/step "
                f"({time.perf_counter() - t_method:.1f} s with compilation)",
                flush=True,
            )
    for rec in out.values():
        del rec["_state"]
    return out


# ----------------------------------------------------------------------------------------------
# Tables, plot, command line


def _tables(runs: dict[int, dict], seeds: list[int], methods: list[str]) -> dict:
    table: dict[str, dict] = {}
    for regime in ("pretrain", "finetune"):
        rows = {}
        for m in methods:
            row = {}
            for key in ("specific_bpb", "specific_test_bpb", "generic_bpb"):
                vals = [runs[s][m][regime][key] for s in seeds]
                base = [runs[s]["uniform"][regime][key] for s in seeds]
                row[key] = harness.summarize(vals, seeds)
                row["delta_" + key] = harness.summarize(list(np.subtract(vals, base)), seeds)
            rows[m] = row
        table[regime] = rows
    return table


def _print_tables(table: dict, timing: dict) -> None:
    for regime, rows in table.items():
        print(f"\n{regime}: bits per byte (mean ± std over seeds), Δ vs uniform")
        print(
            f"  {'method':>10}  {'specific':>15}  {'Δ specific':>15}  {'generic':>15}  "
            f"{'Δ generic':>15}  {'time/uniform':>12}"
        )
        for m, row in rows.items():
            cells = [
                f"{row[key]['mean']:.3f} ± {row[key]['std']:.3f}"
                for key in (
                    "specific_bpb",
                    "delta_specific_bpb",
                    "generic_bpb",
                    "delta_generic_bpb",
                )
            ]
            print(
                f"  {m:>10}  "
                + "  ".join(f"{c:>15}" for c in cells)
                + f"  {timing[m]['ratio_to_uniform']:>12.2f}"
            )


def plot(result: dict, path: str) -> None:
    """PNG: specific-domain bpb over pre-training + fine-tuning per method (seed mean), and the
    source mix of the data each method trained on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    methods = result["methods_run"]
    seeds = [str(s) for s in result["seeds"]]
    runs = result["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    seg = cfg["meta_interval"] * cfg["segment"]
    for m in methods:
        pre = np.mean([runs[s][m]["curve"] for s in seeds], axis=0)
        ft = np.mean([runs[s][m]["finetune_curve"] for s in seeds], axis=0)
        y = np.concatenate([pre, ft])
        x = np.arange(len(y)) * seg
        ax1.plot(x, y, "-o", ms=2.5, label=m)
    ax1.axvline(cfg["meta_interval"] * cfg["meta_steps"], color="k", ls=":", lw=1)
    ax1.set(
        xlabel="base step (pre-training, then fine-tuning after the dotted line)",
        ylabel=f"{result['data']['target']} held-out bits per byte",
    )
    first = [runs[s][m]["curve"][1] for s in seeds for m in methods]
    ax1.set_ylim(top=max(first) + 0.1)  # the untrained 8 bpb would squash the rest
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    names = result["data"]["generic_names"]
    left = np.zeros(len(methods))
    for s in names:
        vals = np.array([result["source_mix"][m][s] for m in methods])
        ax2.barh(methods, vals, left=left, label=s)
        left += vals
    ax2.axvline(0, color="k", lw=0.5)
    ax2.set(xlabel="share of the training data (pre-training)", xlim=(0, 1))
    ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax2.set_title(f"target {result['data']['target']!r} held out of the pool", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLI = harness.StudyCLI(
    "data_selection",
    __doc__,
    quick=f"every method, seed 0, {Config.meta_interval * QUICK['meta_steps']} pre-training base "
    f"steps, {QUICK['finetune_steps']} fine-tuning steps (smoke test)",
    seeds="seeds of the LM/CNN initialisations and the batch order (default 0 1 2; quick: 0)",
    base_steps=f"pre-training base steps per method (default {Config().base_steps}); "
    f"{Config.meta_interval} per meta step, a multiple of {Config().segment_steps}",
    meta_steps=f"pre-training meta steps (default {Config.meta_steps}), a multiple of "
    f"{Config.segment}",
)
CLI.add_argument(
    "--target",
    default="news",
    choices=text_data.SOURCES,
    help="the specific domain, held out of the generic pool (default news)",
)
CLI.add_argument(
    "--english-only", action="store_true", help="drop code (python) from the generic pool"
)
CLI.add_argument(
    "--rule",
    default=Config.rule,
    choices=("top_k", "sample"),
    help="the selection rule of dds/soba/sama (default top_k; sample: k drawn ∝ softmax of the "
    "scores without replacement, the reference code's default)",
)
CLI.add_argument(
    "--methods",
    nargs="+",
    default=None,
    choices=METHODS,
    metavar="M",
    help=f"the methods to run (default all: {' '.join(METHODS)}); uniform always runs",
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line: every method × seed × regime (module docstring)."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    seeds = CLI.seeds(args)
    cfg = Config(**(QUICK if args.quick else {}))
    _, meta_steps = CLI.steps(
        args, per_meta=cfg.meta_interval, default=cfg.meta_steps, quick=cfg.meta_steps
    )
    if meta_steps % cfg.segment:
        CLI.error(
            f"{meta_steps} meta steps: must be a multiple of the segment of {cfg.segment} meta "
            f"steps ({cfg.segment_steps} base steps)"
        )
    cfg = dataclasses.replace(cfg, meta_steps=meta_steps, rule=args.rule)
    methods = list(METHODS if args.methods is None else dict.fromkeys(["uniform", *args.methods]))
    if "soba" in methods:
        methods.append("transfer")
    t_load = time.perf_counter()
    ds = text_data.load_text_domains(
        args.target,
        context=cfg.context,
        english_only=args.english_only,
        seed=cfg.data_seed,
        generic_per_source=cfg.generic_per_source,
    )
    for source in ds.sources:
        run_.data(source)
    data = prepare_data(ds, cfg.generic_valid_per_source, seed=cfg.data_seed)
    print(
        f"target {data.target!r}: specific train/valid/test {len(data.spec_train)}/"
        f"{len(data.spec_valid)}/{len(data.spec_test)} windows; generic train "
        f"{len(data.gen_train)}, held-out {len(data.gen_valid)} ({', '.join(data.generic_names)})"
        f"; loaded in {time.perf_counter() - t_load:.1f} s",
        flush=True,
    )
    study = Study(cfg, data)
    params0 = study.init_params(0)
    runs: dict[int, dict] = {}
    for seed in seeds:
        t0 = time.perf_counter()
        runs[seed] = run_seed(study, seed, methods, progress=run_.progress)
        print(f"seed {seed}: {time.perf_counter() - t0:.1f} s", flush=True)
    table = _tables(runs, seeds, methods)
    uni = np.mean([runs[s]["uniform"]["per_step_s"] for s in seeds])
    timing = {}
    for m in methods:
        per = float(np.mean([runs[s][m]["per_step_s"] for s in seeds]))
        prog = study.programs[m]
        timing[m] = {
            "per_step_s": per,
            "ratio_to_uniform": per / uni,
            "compile_s": prog.compile_s,
            "extra_s": float(np.mean([runs[s][m]["extra_s"] for s in seeds])),
        }
    _print_tables(table, timing)
    cost = cost_report(study)
    programs = {
        m: {
            "base_steps_per_call": cfg.segment_steps,
            "calls_per_run": cfg.meta_steps // cfg.segment,
            "host_transfer_ops": host_transfer_ops(study.programs[m].compiled.as_text()),
        }
        for m in methods
    }
    for m, step in study.steps.items():  # did the zero-hypergradient branch ever run?
        if m in programs:
            programs[m]["zero_hypergradient_warned"] = step.zero_hypergradient_warned
    print(
        f"\ncost of one step, compiled (ratios to one LM step on {cfg.keep} windows; XLA FLOPs, "
        "median wall time):"
    )
    for key, c in cost.items():
        print(f"  {key:>22}: FLOPs {c['flops_ratio']:6.3f}×  time {c['time_ratio']:6.3f}×")
    print(
        f"every method runs {cfg.segment_steps} base steps per call of one compiled program; "
        "host transfer ops in those programs (unconditional/in a cond branch): "
        + ", ".join(
            f"{m} {p['host_transfer_ops']['unconditional']}/{p['host_transfer_ops']['conditional']}"
            for m, p in programs.items()
        )
    )
    pool = {
        s: float(np.mean(data.gen_train_src == data.source_names.index(s)))
        for s in data.generic_names
    }
    mix = {
        m: {s: float(np.mean([runs[sd][m]["source_mix"][s] for sd in seeds])) for s in pool}
        for m in methods
    }
    print("\nsource mix of the pre-training data (mean over seeds):")
    print(f"  {'':>10}  " + "  ".join(f"{s:>11}" for s in pool))
    print(f"  {'pool':>10}  " + "  ".join(f"{v:>11.3f}" for v in pool.values()))
    for m in methods:
        print(f"  {m:>10}  " + "  ".join(f"{mix[m][s]:>11.3f}" for s in pool))
    result = {
        "config": cfg,
        "seeds": seeds,
        "methods_run": methods,
        "methods": {m: repr(v) for m, v in study.methods.items()},
        "selections": {m: repr(v) for m, v in study.selections.items()},
        "steps": {m: repr(v) for m, v in study.steps.items()},
        "data": {
            "target": data.target,
            "english_only": args.english_only,
            "generic_names": list(data.generic_names),
            "sizes": {
                "specific_train": len(data.spec_train),
                "specific_valid": len(data.spec_valid),
                "specific_test": len(data.spec_test),
                "generic_train": len(data.gen_train),
                "generic_valid": len(data.gen_valid),
            },
            "pool_mix": pool,
            "load_config": ds.config,
        },
        "params": dict(zip(("lm", "cnn", "classifier"), map(lm_lib.num_params, params0))),
        "table": table,
        "source_mix": mix,
        "timing": timing,
        "cost": cost,
        "programs": programs,
        "compile_s": {
            p.name: p.compile_s
            for p in [
                *study.programs.values(),
                study.finetune,
                study.pretrain,
                study.cds_table,
                study.eval,
            ]
        },
        "runs": {str(s): r for s, r in runs.items()},
    }
    return run_.finish(result, plot, records=())


if __name__ == "__main__":
    main()
