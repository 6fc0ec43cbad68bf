r"""Cost of every hypergradient method against plain training: compiled memory, FLOPs, time, throughput.

    python -m experiments.benchmark [--quick] [--models NAME ...] [--methods NAME ...]
                                    [--timed N] --json PATH

The problem is data reweighting (the main job's): a base model trained with Adam on a
Meta-Weight-Net-weighted cross entropy, ``L_b = Σ w_i ℓ_i / Σ w_i`` with ``w_i = MWN_λ(sg ℓ_i)``
(MWN 1-100-1), and the clean mean cross entropy as ``L_m``; one meta step every K = 10 base
steps. Batches: 256 base and 256 meta examples (64 for the 10M-parameter MLP and the transformer)
of real data (MNIST-5k for the MLPs; 64-byte windows of the Python standard library, 8 packages as
classes, for the transformer: 2 pre-LN blocks, width 128, 4 heads).

Per model, compiled with ``jax.jit`` (``donate_argnums`` on the carried state, as in a training
loop) and measured in **one process**:

* ``plain``: one plain training step (uniform cross entropy, Adam);
* each method: one meta step — the hypergradient from the state after a base step plus the meta
  optimizer's update of λ (and of the method's state).

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
finite difference; see ``bilevel_jax/loop.py``).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel_jax as bj
from experiments import data as data_lib
from experiments import noisy_labels_demo as nl

K = 10  # base steps per meta step
BATCH = 256

METHODS: dict[str, tuple[Callable[[], Any], Any]] = {
    "sama": (lambda: bj.sama(1.0, adapt_from="last"), None),
    "sama_na": (lambda: bj.sama_na(1.0), None),
    "darts": (lambda: bj.darts(), None),
    "neumann": (lambda: bj.neumann(5), None),
    "cg": (lambda: bj.cg(5), None),
    "itd": (lambda: bj.itd(10), None),
    "soba": (lambda: bj.soba(), None),
    "dds": (lambda: bj.dds(), None),
    "sama_vmap": (lambda: bj.sama(1.0, adapt_from="last", difference="vmap"), None),
    "sama_fresh": (lambda: bj.sama(1.0, adapt_from="fresh"), None),
    "sama_bf16": (lambda: bj.sama(1.0, adapt_from="last"), jnp.bfloat16),
}
"""name -> (method factory, compute dtype of the meta step's losses or None)."""

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
# Models


class ByteTransformer(nnx.Module):
    """A small pre-LayerNorm transformer classifier over byte sequences (mean-pooled)."""

    def __init__(
        self,
        *,
        seq: int,
        classes: int,
        dim: int = 128,
        heads: int = 4,
        layers: int = 2,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(256, dim, rngs=rngs)
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (seq, dim)) * 0.02)
        self.blocks = nnx.List(
            [
                nnx.Dict(
                    ln1=nnx.LayerNorm(dim, rngs=rngs),
                    attn=nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs),
                    ln2=nnx.LayerNorm(dim, rngs=rngs),
                    fc1=nnx.Linear(dim, 4 * dim, rngs=rngs),
                    fc2=nnx.Linear(4 * dim, dim, rngs=rngs),
                )
                for _ in range(layers)
            ]
        )
        self.ln = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.embed(x) + self.pos[...]
        for b in self.blocks:
            h = h + b["attn"](b["ln1"](h))
            h = h + b["fc2"](jax.nn.gelu(b["fc1"](b["ln2"](h))))
        return self.head(self.ln(h).mean(axis=1))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[data_lib.Dataset], nnx.Module]
    data: str  # "mnist" or "bytes"
    batch: int = BATCH  # base and meta batch size


MODELS = {
    "mlp_256": ModelSpec(
        "mlp_256", lambda ds: nl.MLP((784, 256, 256, 10), rngs=nnx.Rngs(0)), "mnist"
    ),
    "mlp_1024": ModelSpec(
        "mlp_1024", lambda ds: nl.MLP((784, 1024, 1024, 10), rngs=nnx.Rngs(0)), "mnist"
    ),
    # batch 64 keeps the full run's ITD/CG/Neumann timings of this model within minutes on 2 cores
    "mlp_10m": ModelSpec(
        "mlp_10m",
        lambda ds: nl.MLP((784, 2048, 2048, 2048, 10), rngs=nnx.Rngs(0)),
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


def _cast(tree, dtype):
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree
    )


def _in_dtype(loss, dtype):
    """``loss`` evaluated on θ, λ and batch cast to ``dtype``, returning float32."""
    if dtype is None:
        return loss
    return lambda th, lam, b: loss(*_cast((th, lam, b), dtype)).astype(jnp.float32)


@dataclasses.dataclass
class Problem:
    """One model's bilevel problem, its initial state and its batches."""

    losses: nl.Losses
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
    mwn = nl.MetaWeightNet(100, rngs=nnx.Rngs(1))
    model_def, theta = nl._split(model)
    mwn_def, lam = nl._split(mwn)
    losses = nl.Losses(model_def, mwn_def)
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
    def step(theta, s, batch):
        g = jax.grad(p.losses.plain)(theta, batch)
        upd, s = p.base_tx.update(g, s, theta)
        return optax.apply_updates(theta, upd), s

    return step, (p.theta, p.base_tx.init(p.theta), p.batch)


def base_step(p: Problem):
    """A weighted base step that also returns what SAMA's ``adapt_from="last"`` keeps."""

    def step(theta, s, lam, batch):
        g = jax.grad(p.losses.base)(theta, lam, batch)
        upd, s_new = p.base_tx.update(g, s, theta)
        return optax.apply_updates(theta, upd), s_new, g, s

    return step, (p.theta, p.base_tx.init(p.theta), p.lam, p.batch)


def after_base_step(p: Problem) -> tuple:
    """(θ, s, last_g, last_s): the state after one weighted base step, the meta step's input."""
    bstep, bargs = base_step(p)
    return jax.jit(bstep)(*bargs)


def meta_step(p: Problem, method, dtype=None, after: tuple | None = None):
    problem = bj.BilevelProblem(
        _in_dtype(p.losses.base, dtype), _in_dtype(p.losses.meta, dtype), p.base_tx
    )

    def step(lam, meta_s, method_state, theta, s, last_g, last_s, batch, meta_batch):
        inputs = bj.BilevelInputs(theta, lam, s, batch, meta_batch, last_g, last_s)
        hg, method_state = method.hypergrad(problem, inputs, method_state)
        upd, meta_s = p.meta_tx.update(hg.meta_grad, meta_s, lam)
        return optax.apply_updates(lam, upd), meta_s, method_state, hg.meta_loss

    theta, s, last_g, last_s = after if after is not None else after_base_step(p)
    args = (
        p.lam,
        p.meta_tx.init(p.lam),
        method.init(p.theta, p.lam),
        theta,
        s,
        last_g,
        last_s,
        p.batch,
        p.meta_batch,
    )
    return step, args


# ----------------------------------------------------------------------------------------------
# Measurement


def compile_stats(fn: Callable, args: tuple, donate: tuple[int, ...] = ()) -> tuple[Any, dict]:
    """Compile ``fn`` for ``args``; return the executable, its temp bytes and FLOPs."""
    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return compiled, {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "flops": float(cost["flops"]),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "peak_bytes": int(peak),
    }


def time_calls(compiled, args: tuple, n: int, donate: tuple[int, ...] = ()) -> list[float]:
    """Wall times (ms) of ``n`` calls after 2 warm-up calls; donated arguments are re-fed."""
    args = list(args)

    def fresh():
        return [jax.tree.map(jnp.copy, a) if i in donate else a for i, a in enumerate(args)]

    times = []
    for i in range(n + 2):
        call_args = fresh()
        jax.block_until_ready(call_args)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*call_args))
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    return times


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
        factory, dtype = METHODS[name]
        method = factory()
        fn, margs = meta_step(p, method, dtype, after)
        jobs[name, "meta"] = (fn, margs, (0, 1, 2))
        # end to end: the library's bilevel step, K base steps + 1 meta step
        step = bj.bilevel_step(
            p.losses.base, p.losses.meta, p.base_tx, p.meta_tx, method, meta_compute_dtype=dtype
        )
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
        stats["bilevel_step_ms_median"] = statistics.median(
            time_calls(e2e_c, e2e_args, timed_e2e, donate=donate)
        )
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
            "train_throughput_ratio": plain["bilevel_step_ms_median"] / r["bilevel_step_ms_median"],
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
        if model.startswith("_"):
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
) -> dict:
    needs = {MODELS[m].data for m in models}
    datasets = {}
    if "mnist" in needs:
        datasets["mnist"] = data_lib.load_mnist5k()
    if "bytes" in needs:
        datasets["bytes"] = data_lib.load_stdlib_bytes(window=64)
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
        "device": str(jax.devices()[0]),
        "platform": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "python": platform.python_version(),
        "wall_s": time.perf_counter() - t0,
    }
    return result


# ----------------------------------------------------------------------------------------------
# Output


def table(result: dict) -> str:
    lines = []
    for model, r in result.items():
        if model.startswith("_"):
            continue
        info = r["_model"]
        lines.append(
            f"\n{model} (n_θ = {info['n_params']:,}, batch {info['batch']}, K = {info['K']})\n"
        )
        lines.append(
            "| method | temp MiB | mem ×plain | GFLOP | FLOP ×plain | ms | time ×plain "
            "| throughput ×plain | training peak ×plain |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for name, x in r.items():
            if name.startswith("_"):
                continue
            lines.append(
                f"| {name} | {x['temp_bytes'] / 2**20:.2f} | {x['mem_ratio_vs_plain']:.2f} | "
                f"{x['flops'] / 1e9:.3f} | {x['flop_ratio_vs_plain']:.2f} | {x['ms_median']:.2f} | "
                f"{x['time_ratio_vs_plain']:.2f} | {x['train_throughput_ratio']:.3f} | "
                f"{x['train_peak_mem_ratio']:.2f} |"
            )
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in result if not m.startswith("_")]
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="the two small MLPs only (< 2 min on 2 cores)"
    )
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=None)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument(
        "--timed", type=int, default=20, help="timed calls per function (after 2 warm-up)"
    )
    p.add_argument(
        "--timed-e2e",
        type=int,
        default=None,
        help="timed calls of the whole bilevel step and of K plain steps (throughput; "
        "default 10, 3 with --quick)",
    )
    p.add_argument("--json", default=None, help="write the results here (and a PNG beside it)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    models = tuple(args.models or (QUICK_MODELS if args.quick else MODELS))
    timed_e2e = args.timed_e2e if args.timed_e2e is not None else (3 if args.quick else 10)
    result = run(models, tuple(args.methods), args.timed, timed_e2e, progress=not args.no_progress)
    print(table(result))
    for model, g in result["_goals"].items():
        print(
            model,
            {k: (round(v["value"], 3), v["met"]) for k, v in g.items()}
            if "value" not in g
            else (round(g["value"], 3), g["met"]),
        )
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
        plot(result, str(path.with_suffix(".png")))
        print(f"wrote {path} and {path.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
