r"""Cost of every hypergradient method against plain training: compiled memory, FLOPs, time, throughput.

    python -m experiments.benchmark [--quick] [--models NAME ...] [--methods NAME ...]
                                    [--timed N] [--timed-e2e N] [--json PATH]

(Nothing is trained: ``--seeds``, ``--base-steps`` and ``--meta-steps`` are rejected. The batches
and initialisations are fixed, seed 0; a meta step always follows K = 10 base steps.)

The problem is data reweighting (the main job's): a base model trained with Adam on a
Meta-Weight-Net-weighted cross entropy, ``L_b = Σ w_i ℓ_i / Σ w_i`` with ``w_i = MWN_λ(sg ℓ_i)``
(MWN 1-100-1), and the clean mean cross entropy as ``L_m``; one meta step every K = 10 base
steps. Batches: 256 base and 256 meta examples (64 for the 10M-parameter MLP and the transformer)
of real data (MNIST-5k for the MLPs; 64-byte windows of the Python standard library, 8 packages as
classes, for the transformer: 2 pre-LN blocks, width 128, 4 heads).

Per model, compiled with ``jax.jit`` (``donate_argnums`` on the carried state, as in a training
loop) and measured in **one process**:

* ``plain``: one plain training step (uniform cross entropy, Adam; :func:`bilevel_jax.base_step`);
* each method: one meta step — :meth:`bilevel_jax.BilevelStep.meta_phase` from the state after a
  base step: the hypergradient plus the meta optimizer's update of λ (and of the method's state).

Figures per (model, method): ``temp_bytes`` (XLA ``memory_analysis().temp_size_in_bytes``),
``flops`` (``cost_analysis()["flops"]``), ``ms_median`` (median of ``--timed`` ≥ 20 calls after
two warm-up calls, with ``block_until_ready``), the ratios of these to the plain step, and
``train_throughput_ratio``: training samples per second with a meta step every K base steps,
relative to plain training, measured end to end as the median time of K plain steps (one
``lax.scan``) over that of the library's ``bj.bilevel_step`` (K base steps + 1 meta step), each
jitted with the state donated (``--timed-e2e`` calls); and ``train_peak_mem_ratio``, the same
two programs' compiled peak (arguments + outputs − aliased + temp), i.e. everything a training
run holds (parameters, optimizer states, batches, the adaptation's saved gradient and state). The plain references are timed before and
after the methods and their pooled medians are used.

Methods: SAMA (``adapt_from="last"``, the default ``difference="sequential"``), SAMA-NA,
DARTS (T1–T2), Neumann (K = 5), CG (K = 5), ITD (unroll 10), SOBA, DDS; SAMA variants
``sama_vmap`` (the central difference as one batched pass), ``sama_fresh`` (a fresh adaptation
gradient), ``sama_bf16`` (the meta step's losses in bf16 — cheaper, but bf16 cannot resolve the
finite difference; see ``bilevel_jax/loop.py``), ``sama_jvp`` (``difference="jvp"``: the exact
forward-mode mixed product in place of the central difference) and ``sama_jvp_bf16`` (the same
with the meta step's losses in bf16, which the forward product resolves).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import statistics
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
from experiments import data as data_lib
from experiments import harness
from experiments.harness import compile_stats
from experiments.models import MLP, ByteTransformer, MetaWeightNet, ReweightLosses, split

K = 10  # base steps per meta step
BATCH = 256

METHODS: dict[str, tuple[Any, Any]] = {
    "sama": (bj.sama(alpha=1.0, adapt_from="last"), None),
    "sama_na": (bj.sama_na(alpha=1.0), None),
    "darts": (bj.darts(), None),
    "neumann": (bj.neumann(maxiter=5), None),
    "cg": (bj.cg(maxiter=5), None),
    "itd": (bj.itd(unroll=10), None),
    "soba": (bj.soba(), None),
    "dds": (bj.dds(), None),
    "sama_vmap": (bj.sama(alpha=1.0, adapt_from="last", difference="vmap"), None),
    "sama_fresh": (bj.sama(alpha=1.0, adapt_from="fresh"), None),
    "sama_bf16": (bj.sama(alpha=1.0, adapt_from="last"), jnp.bfloat16),
    "sama_jvp": (bj.sama(alpha=1.0, adapt_from="last", difference="jvp"), None),
    "sama_jvp_bf16": (bj.sama(alpha=1.0, adapt_from="last", difference="jvp"), jnp.bfloat16),
}
"""name -> (method, compute dtype of the meta step's losses or None)."""

RESULT_KEYS = (
    "temp_bytes",
    "flops",
    "ms_median",
    "mem_ratio_vs_plain",
    "time_ratio_vs_plain",
    "flop_ratio_vs_plain",
    "train_throughput_ratio",
)


# ----------------------------------------------------------------------------------------------
# Models (experiments.models)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[data_lib.Dataset], nnx.Module]
    data: str  # "mnist" or "bytes"
    batch: int = BATCH  # base and meta batch size


MODELS = {
    "mlp_256": ModelSpec("mlp_256", lambda ds: MLP((784, 256, 256, 10), rngs=nnx.Rngs(0)), "mnist"),
    "mlp_1024": ModelSpec(
        "mlp_1024", lambda ds: MLP((784, 1024, 1024, 10), rngs=nnx.Rngs(0)), "mnist"
    ),
    # batch 64 keeps the full run's ITD/CG/Neumann timings of this model within minutes on 2 cores
    "mlp_10m": ModelSpec(
        "mlp_10m",
        lambda ds: MLP((784, 2048, 2048, 2048, 10), rngs=nnx.Rngs(0)),
        "mnist",
        batch=64,
    ),
    "transformer": ModelSpec(
        "transformer",
        lambda ds: ByteTransformer(seq=ds.x.shape[1], classes=ds.num_classes, rngs=nnx.Rngs(0)),
        "bytes",
        batch=64,  # at 256, ITD's ten unrolled steps need over 40 GB (measured: OOM)
    ),
}
QUICK_MODELS = ("mlp_256", "mlp_1024")


# ----------------------------------------------------------------------------------------------
# The functions measured


@dataclasses.dataclass
class Problem:
    """One model's bilevel problem, its initial state and its batches."""

    losses: ReweightLosses
    theta: Any
    lam: Any
    base_tx: optax.GradientTransformation
    meta_tx: optax.GradientTransformation
    batch: tuple
    meta_batch: tuple
    n_params: int
    data: dict


def make_problem(spec: ModelSpec, datasets: dict) -> Problem:
    ds = datasets[spec.data]
    model = spec.build(ds)
    mwn = MetaWeightNet(100, rngs=nnx.Rngs(1))
    model_def, theta = split(model)
    mwn_def, lam = split(mwn)
    losses = ReweightLosses(model_def, mwn_def)
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(ds.y))
    b = spec.batch
    batch = (jnp.asarray(ds.x[idx[:b]]), jnp.asarray(ds.y[idx[:b]]))
    meta = (jnp.asarray(ds.x[idx[b : 2 * b]]), jnp.asarray(ds.y[idx[b : 2 * b]]))
    n_params = sum(x.size for x in jax.tree.leaves(theta))
    # eps_root > 0: ITD and DDS differentiate through Adam (docs/precision.md)
    return Problem(
        losses,
        theta,
        lam,
        optax.adam(1e-3, eps_root=1e-8),
        optax.adam(1e-3),
        batch,
        meta,
        int(n_params),
        dict(ds.source),
    )


def plain_step(p: Problem):
    """One plain (uniform-weight) training step, :func:`bilevel_jax.base_step`."""

    def step(theta, s, batch):
        r = bj.base_step(p.losses.plain, p.base_tx, theta, s, batch)
        return r.params, r.opt_state

    return step, (p.theta, p.base_tx.init(p.theta), p.batch)


def bilevel(p: Problem, method, dtype=None) -> bj.BilevelStep:
    """The library's bilevel step of ``p`` with ``method`` (meta-step losses in ``dtype``)."""
    return bj.bilevel_step(
        p.losses.base, p.losses.meta, p.base_tx, p.meta_tx, method, meta_compute_dtype=dtype
    )


def after_base_step(p: Problem) -> tuple:
    """(θ, s, last_g, last_s): the state after one weighted base step (the library's
    :meth:`~bilevel_jax.BilevelStep.base_phase`), the meta step's input."""
    step = bilevel(p, bj.sama(adapt_from="last"))  # a method that keeps the last step
    batches = jax.tree.map(lambda x: x[None], p.batch)
    state, base = jax.jit(step.base_phase)(step.init(p.theta, p.lam), batches)
    return state.base_params, state.base_opt_state, base.last_grad, base.last_opt_state


META_DONATE = (0,)
"""The arguments of :func:`meta_step`'s function that are donated (the bilevel state)."""


def meta_step(p: Problem, method, dtype=None, after: tuple | None = None):
    """``(fn, args)``: one meta step, :meth:`bilevel_jax.BilevelStep.meta_phase` (the method's
    hypergradient plus the meta optimizer's update of λ and of the method's state), from the
    state after a base step; ``fn(*args)`` returns the new state and the meta loss."""
    step = bilevel(p, method, dtype)

    def fn(state, last_grad, last_opt_state, batch, meta_batch):
        state, hg = step.meta_phase(
            state, batch, meta_batch, last_grad=last_grad, last_opt_state=last_opt_state
        )
        return state, hg.meta_loss

    theta, s, last_g, last_s = after if after is not None else after_base_step(p)
    state = step.init(p.theta, p.lam)._replace(base_params=theta, base_opt_state=s)
    return fn, (state, last_g, last_s, p.batch, p.meta_batch)


# ----------------------------------------------------------------------------------------------
# Measurement


def time_calls(
    compiled, args: tuple, n: int, donate: tuple[int, ...] = (), warmup: int = 2
) -> list[float]:
    """Wall times (ms) of ``n`` calls after ``warmup`` calls; donated arguments are re-fed."""

    def fresh():
        return [jax.tree.map(jnp.copy, a) if i in donate else a for i, a in enumerate(args)]

    times = []
    for i in range(n + warmup):
        call_args = fresh()
        jax.block_until_ready(call_args)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*call_args))
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_paired(a: tuple, b: tuple, n: int) -> tuple[list[float], list[float]]:
    """Wall times (ms) of ``n`` calls each of two programs ``(compiled, args, donate)``, taken
    alternately (a, b, a, b, …) after two warm-up calls of each, so that both see the same
    machine load: their ratio is what one process measures at one time."""
    (fa, args_a, donate_a), (fb, args_b, donate_b) = a, b
    times_a, times_b = [], []
    for i in range(n + 2):
        ta = time_calls(fa, args_a, 1, donate=donate_a, warmup=0)
        tb = time_calls(fb, args_b, 1, donate=donate_b, warmup=0)
        if i >= 2:
            times_a += ta
            times_b += tb
    return times_a, times_b


def plain_k_steps(p: Problem):
    """K plain steps in one ``lax.scan`` (the plain side of the throughput ratio)."""
    step, _ = plain_step(p)

    def run(theta, s, batches):
        return jax.lax.scan(lambda c, b: (step(*c, b), None), (theta, s), batches)[0]

    return run


def bench_model(
    spec: ModelSpec,
    datasets: dict,
    methods: tuple[str, ...],
    timed: int,
    timed_e2e: int,
    progress: bool = True,
) -> dict:
    from tqdm.auto import tqdm

    p = make_problem(spec, datasets)
    fn, args = plain_step(p)
    plain_c, plain = compile_stats(fn, args, donate=(0, 1))
    plain_times = time_calls(plain_c, args, timed, donate=(0, 1))
    batches = jax.tree.map(lambda x: jnp.stack([x] * K), p.batch)
    pk_args = (p.theta, p.base_tx.init(p.theta), batches)
    pk_c, pk_stats = compile_stats(plain_k_steps(p), pk_args, donate=(0, 1))
    pk_times = time_calls(pk_c, pk_args, timed_e2e, donate=(0, 1))

    # Compile every program first, on as many threads as there are cores (XLA compiles a
    # module on one thread and releases the GIL), then time them one at a time.
    jobs, after = {}, after_base_step(p)
    for name in methods:
        method, dtype = METHODS[name]
        fn, margs = meta_step(p, method, dtype, after)
        jobs[name, "meta"] = (fn, margs, META_DONATE)
        # end to end: the library's bilevel step, K base steps + 1 meta step
        step = bilevel(p, method, dtype)
        jobs[name, "e2e"] = (step, (step.init(p.theta, p.lam), batches, p.meta_batch), (0,))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = {
            key: pool.submit(compile_stats, fn, a, donate=d) for key, (fn, a, d) in jobs.items()
        }
        compiled = {key: f.result() for key, f in futures.items()}

    rows = {}
    for name in tqdm(methods, desc=f"{spec.name:>11}", disable=not progress, file=sys.stdout):
        meta_c, stats = compiled[name, "meta"]
        _, margs, donate = jobs[name, "meta"]
        stats = dict(
            stats, ms_median=statistics.median(time_calls(meta_c, margs, timed, donate=donate))
        )
        e2e_c, e2e = compiled[name, "e2e"]
        _, e2e_args, donate = jobs[name, "e2e"]
        stats["bilevel_step_peak_bytes"] = e2e["peak_bytes"]
        plain_paired, e2e_times = time_paired(
            (pk_c, pk_args, (0, 1)), (e2e_c, e2e_args, donate), timed_e2e
        )
        pk_times += plain_paired
        stats["bilevel_step_ms_median"] = statistics.median(e2e_times)
        stats["paired_plain_ms_median"] = statistics.median(plain_paired)
        rows[name] = stats
    plain_times += time_calls(plain_c, args, timed, donate=(0, 1))  # before and after, pooled
    pk_times += time_calls(pk_c, pk_args, timed_e2e, donate=(0, 1))
    plain["ms_median"] = statistics.median(plain_times)
    plain["bilevel_step_ms_median"] = statistics.median(pk_times)  # K plain steps
    plain["bilevel_step_peak_bytes"] = pk_stats["peak_bytes"]

    def ratios(r):
        return {
            "mem_ratio_vs_plain": r["temp_bytes"] / max(plain["temp_bytes"], 1),
            "time_ratio_vs_plain": r["ms_median"] / plain["ms_median"],
            "flop_ratio_vs_plain": r["flops"] / plain["flops"],
            # K plain steps against K base steps + 1 meta step, timed alternately
            "train_throughput_ratio": r.get(
                "paired_plain_ms_median", plain["bilevel_step_ms_median"]
            )
            / r["bilevel_step_ms_median"],
            "train_peak_mem_ratio": r["bilevel_step_peak_bytes"] / plain["bilevel_step_peak_bytes"],
        }

    out = {"plain": {**plain, **ratios(plain)}}
    for name, r in rows.items():
        out[name] = {**r, **ratios(r)}
    out["_model"] = {
        "n_params": p.n_params,
        "n_meta_params": int(sum(x.size for x in jax.tree.leaves(p.lam))),
        "batch": spec.batch,
        "meta_batch": spec.batch,
        "K": K,
        "data": p.data,
    }
    return out


def memory_slopes(result: dict, models: tuple[str, ...]) -> dict:
    """Least-squares slope of temp bytes against parameter count per method, over the MLPs
    that share the reference batch size (so that only the parameter count changes)."""
    mlps = [
        m
        for m in models
        if m.startswith("mlp") and m in result and result[m]["_model"]["batch"] == BATCH
    ]
    if len(mlps) < 2:
        return {}
    n = np.array([result[m]["_model"]["n_params"] for m in mlps], float)
    out = {}
    for method in result[mlps[0]]:
        if method.startswith("_"):
            continue
        t = np.array([result[m][method]["temp_bytes"] for m in mlps], float)
        out[method] = float(np.polyfit(n, t, 1)[0])
    return {
        "models": mlps,
        "bytes_per_param": out,
        "slope_ratio_vs_plain": {k: v / out["plain"] for k, v in out.items()},
    }


def goals(result: dict) -> dict:
    """The issue's cost goals for SAMA, per model (measured figure and whether it is met)."""
    g = {}
    for model, r in result.items():
        if model not in MODELS:
            continue
        s = r.get("sama")
        if s is None:
            continue
        row = {
            "mem_vs_plain": (s["mem_ratio_vs_plain"], s["mem_ratio_vs_plain"] <= 1.3),
            "time_vs_flop_scaled_plain": (
                s["time_ratio_vs_plain"] / s["flop_ratio_vs_plain"],
                s["time_ratio_vs_plain"] <= 1.1 * s["flop_ratio_vs_plain"],
            ),
            "throughput_vs_plain": (
                s["train_throughput_ratio"],
                s["train_throughput_ratio"] >= 0.85,
            ),
        }
        for other in ("neumann", "cg"):
            if other in r:
                ratio = s["temp_bytes"] / max(r[other]["temp_bytes"], 1)
                row[f"mem_vs_{other}"] = (ratio, ratio <= 0.4)
        g[model] = {k: {"value": v, "met": bool(ok)} for k, (v, ok) in row.items()}
    slopes = result.get("_memory_slope", {}).get("slope_ratio_vs_plain", {})
    if "sama" in slopes:
        g["memory_slope_vs_plain"] = {"value": slopes["sama"], "met": slopes["sama"] <= 1.2}
    return g


def run(
    models: tuple[str, ...],
    methods: tuple[str, ...],
    timed: int,
    timed_e2e: int,
    progress: bool = True,
    run: harness.Run | None = None,
) -> dict:
    """Benchmark every model and method; ``run`` records the data files read."""
    needs = {MODELS[m].data for m in models}
    datasets = {}
    if "mnist" in needs:
        datasets["mnist"] = data_lib.load_mnist5k()
    if "bytes" in needs:
        datasets["bytes"] = data_lib.load_stdlib_bytes(window=64)
    for ds in datasets.values():
        if run is not None:
            run.data(ds.source)
    t0 = time.perf_counter()
    result: dict[str, Any] = {}
    for m in models:
        result[m] = bench_model(MODELS[m], datasets, methods, timed, timed_e2e, progress)
    result["_memory_slope"] = memory_slopes(result, models)
    result["_goals"] = goals(result)
    result["_config"] = {
        "models": list(models),
        "methods": list(methods),
        "timed_calls": timed,
        "timed_calls_end_to_end": timed_e2e,
        "K": K,
        "hypergrad": {name: repr(METHODS[name][0]) for name in methods},
        "meta_compute_dtype": {
            name: None if METHODS[name][1] is None else jnp.dtype(METHODS[name][1]).name
            for name in methods
        },
        "wall_s": time.perf_counter() - t0,
    }
    return result


# ----------------------------------------------------------------------------------------------
# Output


def flop_bound(meta_flop_ratio: float, k: int = K, plain: bool = False) -> float:
    """The throughput ÷ plain that arithmetic allows with one meta step of ``meta_flop_ratio``
    plain steps' FLOPs every ``k`` base steps: ``k / (k + meta_flop_ratio)`` (1 for plain).

    >>> round(flop_bound(1.78), 3)
    0.849
    """
    return 1.0 if plain else k / (k + meta_flop_ratio)


def table(result: dict) -> str:
    lines = []
    for model, r in result.items():
        if model not in MODELS:
            continue
        info = r["_model"]
        lines.append(
            f"\n{model} (n_θ = {info['n_params']:,}, batch {info['batch']}, K = {info['K']})\n"
        )
        lines.append(
            "| method | temp MiB | mem ×plain | GFLOP | FLOP ×plain | ms | time ×plain "
            "| throughput ×plain | FLOP bound | training peak ×plain |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for name, x in r.items():
            if name.startswith("_"):
                continue
            lines.append(
                f"| {name} | {x['temp_bytes'] / 2**20:.2f} | {x['mem_ratio_vs_plain']:.2f} | "
                f"{x['flops'] / 1e9:.3f} | {x['flop_ratio_vs_plain']:.2f} | {x['ms_median']:.2f} | "
                f"{x['time_ratio_vs_plain']:.2f} | {x['train_throughput_ratio']:.3f} | "
                f"{flop_bound(x['flop_ratio_vs_plain'], info['K'], name == 'plain'):.3f} | "
                f"{x['train_peak_mem_ratio']:.2f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in result if m in MODELS]
    methods = [k for k in result[models[0]] if not k.startswith("_") and k != "base"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, 20))
    markers = "os^vDPX*<>ph"
    for i, method in enumerate(methods):
        style = {
            "color": colors[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
            "marker": markers[i % len(markers)],
        }
        pts = sorted(
            (result[m]["_model"]["n_params"], result[m][method]["temp_bytes"] / 2**20)
            for m in models
            if m.startswith("mlp")
        )
        if pts:
            a.plot(*zip(*pts), label=method, lw=2.5 if method in ("plain", "sama") else 1, **style)
        xs = [result[m][method]["mem_ratio_vs_plain"] for m in models]
        ys = [result[m][method]["train_throughput_ratio"] for m in models]
        b.scatter(xs, ys, label=method, s=70 if method in ("plain", "sama") else 30, **style)
    batches = sorted({result[m]["_model"]["batch"] for m in models if m.startswith("mlp")})
    a.set(
        xscale="log",
        yscale="log",
        xlabel="parameters (MLPs)",
        ylabel="compiled temp memory (MiB)",
        title="Memory of one step against model size"
        + (f" (batches {'/'.join(map(str, batches))})" if len(batches) > 1 else ""),
    )
    b.set(
        xscale="log",
        xlabel="temp memory / plain step",
        ylabel="training throughput / plain",
        title="Throughput against memory (every model)",
    )
    b.axhline(0.85, color="grey", ls=":", lw=1)
    a.legend(fontsize=7, ncol=2)
    b.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CLI = harness.StudyCLI(
    "benchmark",
    __doc__,
    quick="the two small MLPs only, 3 end-to-end calls (about 2 min on 2 cores)",
    seeds=harness.Unused("the batches and initialisations are fixed (seed 0); nothing is trained"),
    base_steps=harness.Unused(f"nothing is trained; a bilevel step is always K = {K} base steps"),
    meta_steps=harness.Unused("nothing is trained; each program is timed --timed times"),
)
CLI.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
CLI.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
CLI.add_argument("--timed", type=int, default=20, help="timed calls per function (after 2 warm-up)")
CLI.add_argument(
    "--timed-e2e",
    type=int,
    default=None,
    help="timed calls of the whole bilevel step and of K plain steps (throughput; "
    "default 10, 3 with --quick)",
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring): benchmark and write the results."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    models = tuple(args.models or (QUICK_MODELS if args.quick else MODELS))
    timed_e2e = args.timed_e2e if args.timed_e2e is not None else (3 if args.quick else 10)
    result = run(
        models, tuple(args.methods), args.timed, timed_e2e, progress=run_.progress, run=run_
    )
    print(table(result))
    for model, g in result["_goals"].items():
        print(
            model,
            {k: (round(v["value"], 3), v["met"]) for k, v in g.items()}
            if "value" not in g
            else (round(g["value"], 3), g["met"]),
        )
    return run_.finish(result, plot, records=())


if __name__ == "__main__":
    main()
