r"""Compiled memory of every method's training program for GPT-2-sized decoder LMs, without running them.

::

    python -m experiments.scaling [--quick] [--cpu-scheduler default|memory] [--json PATH]

Nothing is allocated or trained: each program is compiled with ``jax.jit(...).lower(...)`` on
``jax.ShapeDtypeStruct`` arguments (the model is built with ``nnx.eval_shape``), and XLA's memory
analysis of the compiled program is read. The problem is data reweighting of a decoder-only
language model (the main job's, on sequences): the base loss is ``Σ_i w_i ℓ_i / Σ_i w_i`` with
``ℓ_i`` the mean next-token cross entropy of sequence ``i`` and ``w_i = MWN_λ(sg ℓ_i)`` (a
Meta-Weight-Net 1-100-1), the meta loss the plain mean cross entropy; the base optimizer is
``optax.adam(1e-3, eps_root=1e-8)`` (``eps_root`` lets ITD differentiate through Adam), the meta
optimizer ``optax.adam(1e-3)``.

Programs (the state is donated, as in a training loop), each in float32 and with bf16 compute
(the losses cast θ to bf16; master parameters, gradients and optimizer states stay float32):

* ``plain`` — ``K`` plain Adam steps of the mean cross entropy in one ``lax.scan``;
* each method — :func:`bilevel_jax.bilevel_step`: ``K`` base steps and one meta step.

Models (:class:`GPT`, Flax NNX with the blocks' parameters stacked and run by ``lax.scan``, so a
program's size does not grow with the depth; GPT-2's vocabulary of 50,257 tokens, a tied output
embedding, learned positions):

===========  ======  =====  =====  ==============
name         layers  width  heads  parameters
===========  ======  =====  =====  ==============
``gpt_10m``  2       192    3      ≈ 10.6 M
``gpt2``     12      768    12     ≈ 124 M (GPT-2 small)
``gpt2_m``   24      1024   16     ≈ 355 M (GPT-2 medium)
``gpt2_l``   36      1280   20     ≈ 774 M (GPT-2 large)
===========  ======  =====  =====  ==============

Reported per (model, method): ``peak_bytes`` (arguments + outputs − aliased + temporaries: what
the step holds at its peak), ``temp_bytes`` (XLA's temporaries alone), ``argument_bytes`` and the
compile time, in float32 and (``"bf16"``) with bf16 compute; the ratio of each method's peak to
plain's; per method, the least-squares slope of the peak against the parameter count over the
transformer sizes and its ratio to plain's slope; whether the peak fits in 80 GiB; and
``matmul_flops``, the program's matrix-multiply FLOPs counted on its jaxpr with every loop
multiplied by its trip count (:func:`experiments.harness.matmul_flops`; XLA's own
``cost_analysis`` counts a loop body once, and the layers, the ``K`` steps and the solvers are all
loops here), with its ratio to plain's.

**The CPU scheduler.** XLA's default CPU scheduler optimises for thread concurrency: it issues
work that depends on nothing as early as it can. In a bilevel step that includes the zero-filled
buffers in which the meta step's layer ``scan`` stacks its activations for the backward pass, so
they are allocated before the ``K`` base steps and held through them (read off the compiled
module's buffer live ranges). ``--cpu-scheduler memory`` compiles with XLA's memory-minimising
scheduler instead (:data:`MEMORY_SCHEDULER_FLAG`); plain training's peak is the same under both.
These are CPU figures: an accelerator's compiler schedules and assigns buffers its own way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bilevel_jax as bj
from experiments import harness
from experiments.models import MetaWeightNet

__all__ = ["GPTConfig", "GPT", "SIZES", "QUICK_SIZES", "METHODS", "programs", "measure", "main"]

K = 10
BATCH, CONTEXT, VOCAB = 4, 256, 50257
GIB = 2**30
BUDGET = 80 * GIB


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer's shape."""

    layers: int
    width: int
    heads: int
    vocab: int = VOCAB
    context: int = CONTEXT


SIZES: dict[str, GPTConfig] = {
    "gpt_10m": GPTConfig(2, 192, 3),
    "gpt2": GPTConfig(12, 768, 12),
    "gpt2_m": GPTConfig(24, 1024, 16),
    "gpt2_l": GPTConfig(36, 1280, 20),
}
QUICK_SIZES: dict[str, GPTConfig] = {
    "gpt_tiny": GPTConfig(2, 64, 2, vocab=512, context=32),
    "gpt_small": GPTConfig(4, 128, 4, vocab=512, context=32),
}

METHODS: dict[str, Any] = {
    "sama_last": bj.sama(alpha=1.0, adapt_from="last"),
    "sama_last_along_v": bj.sama(alpha=1.0, adapt_from="last", step_along_v=True),
    "sama_fresh": bj.sama(alpha=1.0, adapt_from="fresh"),
    "sama_na": bj.sama_na(alpha=1.0),
    "darts": bj.darts(),
    "neumann": bj.neumann(maxiter=5),
    "cg": bj.cg(maxiter=5),
    "itd": bj.itd(unroll=10),
    "soba": bj.soba(),
}
QUICK_METHODS = ("sama_last", "cg")
WHILE_TRIPS = {"cg": 5}
"""Trip count of the ``while_loop`` in a method (CG's solver runs its ``maxiter`` = 5 iterations
with the default tolerance 0) for the FLOP count; the other methods loop by ``scan``."""
DTYPES = {"float32": None, "bf16": jnp.bfloat16}
"""Compute dtypes: float32, and bf16 compute with float32 master parameters and optimizer
state (the losses cast θ to bf16; gradients and updates stay float32)."""
MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


class GPT(nnx.Module):
    """A GPT-2-style decoder (pre-LayerNorm, GELU MLP, tied embedding) with stacked blocks."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        L, D, V = cfg.layers, cfg.width, cfg.vocab
        init = jax.nn.initializers.normal(0.02)

        def p(shape, scale=True):
            return nnx.Param(init(rngs.params(), shape) if scale else jnp.zeros(shape))

        self.cfg = cfg
        self.embed = p((V, D))
        self.pos = p((cfg.context, D))
        self.blocks = nnx.Dict(
            ln1=nnx.Param(jnp.ones((L, D))),
            ln1_b=p((L, D), False),
            qkv=p((L, D, 3 * D)),
            qkv_b=p((L, 3 * D), False),
            proj=p((L, D, D)),
            proj_b=p((L, D), False),
            ln2=nnx.Param(jnp.ones((L, D))),
            ln2_b=p((L, D), False),
            fc1=p((L, D, 4 * D)),
            fc1_b=p((L, 4 * D), False),
            fc2=p((L, 4 * D, D)),
            fc2_b=p((L, D), False),
        )
        self.ln = nnx.Param(jnp.ones((D,)))
        self.ln_b = p((D,), False)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(B, T, V)`` of the next token at each position of ``tokens`` ``(B, T)``."""
        cfg = self.cfg
        T, H = tokens.shape[1], cfg.heads
        x = self.embed[...][tokens] + self.pos[...][:T]
        mask = jnp.tril(jnp.ones((T, T), bool))

        def norm(x, g, b):
            mu = x.mean(-1, keepdims=True)
            var = ((x - mu) ** 2).mean(-1, keepdims=True)
            return (x - mu) * jax.lax.rsqrt(var + 1e-5) * g + b

        def block(x, w):
            B, T, D = x.shape
            q, k, v = jnp.split(norm(x, w["ln1"], w["ln1_b"]) @ w["qkv"] + w["qkv_b"], 3, -1)
            q, k, v = (a.reshape(B, T, H, D // H) for a in (q, k, v))
            att = jnp.einsum("bthd,bshd->bhts", q, k) / jnp.sqrt(D // H)
            att = jax.nn.softmax(jnp.where(mask, att, -1e9), -1)
            y = jnp.einsum("bhts,bshd->bthd", att, v).reshape(B, T, D)
            x = x + y @ w["proj"] + w["proj_b"]
            h = jax.nn.gelu(norm(x, w["ln2"], w["ln2_b"]) @ w["fc1"] + w["fc1_b"])
            return x + h @ w["fc2"] + w["fc2_b"], None

        blocks = {k: v[...] for k, v in self.blocks.items()}
        x, _ = jax.lax.scan(block, x, blocks)
        return norm(x, self.ln[...], self.ln_b[...]) @ self.embed[...].T


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def programs(cfg: GPTConfig, methods: Sequence[str], dtype: Any = None) -> dict[str, tuple]:
    """``name -> (fn, abstract args, donated argnums)`` of every training program of ``cfg``,
    with the losses computed in ``dtype`` (None: float32)."""
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, theta, _ = bj.nnx.split_params(model)
    mwn_def, lam, _ = bj.nnx.split_params(MetaWeightNet(100, rngs=nnx.Rngs(1)))
    theta, lam = _abstract(theta), _abstract(lam)

    def per_sequence(th, tokens):
        logits = bj.nnx.merge(graphdef, th)(tokens[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean(-1)

    def base_loss(th, lam, tokens):
        ell = per_sequence(th, tokens)
        w = bj.nnx.merge(mwn_def, lam)(jax.lax.stop_gradient(ell))
        return jnp.sum(w * ell) / jnp.sum(w)

    def meta_loss(th, lam, tokens):
        return per_sequence(th, tokens).mean()

    def cast(th):
        return th if dtype is None else jax.tree.map(lambda a: a.astype(dtype), th)

    base_tx, meta_tx = optax.adam(1e-3, eps_root=1e-8), optax.adam(1e-3)
    batches = jax.ShapeDtypeStruct((K, BATCH, cfg.context + 1), jnp.int32)
    meta = jax.ShapeDtypeStruct((BATCH, cfg.context + 1), jnp.int32)

    def plain(th, s, batches):
        def body(c, b):
            r = bj.base_step(lambda t, x: per_sequence(cast(t), x).mean(), base_tx, *c, b)
            return (r.params, r.opt_state), r.loss

        return jax.lax.scan(body, (th, s), batches)

    out: dict[str, tuple] = {
        "plain": (plain, (theta, jax.eval_shape(base_tx.init, theta), batches), (0, 1))
    }
    for name in methods:
        step = bj.bilevel_step(
            base_loss,
            meta_loss,
            base_tx,
            meta_tx,
            METHODS[name],
            compute_dtype=dtype,
            meta_compute_dtype=dtype,
        )
        state = jax.eval_shape(step.init, theta, lam)
        out[name] = (step, (state, batches, meta), (0,))
    return out


def measure(name: str, cfg: GPTConfig, methods: Sequence[str]) -> dict:
    """Compile every program of one size in float32 and with bf16 compute; memory figures,
    matmul FLOPs and compile seconds."""
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    n_params = int(sum(np.prod(a.shape) for a in jax.tree.leaves(bj.nnx.split_params(model)[1])))
    row: dict = {"model": name, "config": dataclasses.asdict(cfg), "params": n_params}
    for dname, dtype in DTYPES.items():
        for prog, (fn, args, donate) in programs(cfg, methods, dtype).items():
            t0 = time.perf_counter()
            _, stats = harness.compile_stats(fn, args, donate=donate)
            seconds = time.perf_counter() - t0
            peak = stats["peak_bytes"]
            fig = {
                "peak_bytes": peak,
                "temp_bytes": stats["temp_bytes"],
                "argument_bytes": stats["argument_bytes"],
                "compile_s": seconds,
                "fits_80gib": bool(peak <= BUDGET),
            }
            if dtype is None:
                trips = WHILE_TRIPS.get(prog, 1)
                fig["matmul_flops"] = harness.matmul_flops(fn, args, while_trips=trips)
                row[prog] = fig
            else:
                row[prog][dname] = fig
            print(
                f"  {name:>9} {dname:>7} {prog:>17}: peak {peak / GIB:8.2f} GiB, temp "
                f"{stats['temp_bytes'] / GIB:8.2f} GiB ({seconds:.1f} s to compile)",
                flush=True,
            )
    plain = row["plain"]
    for prog in ["plain", *methods]:
        r = row[prog]
        r["peak_ratio_vs_plain"] = r["peak_bytes"] / plain["peak_bytes"]
        r["flop_ratio_vs_plain"] = r["matmul_flops"] / plain["matmul_flops"]
        r["bf16"]["peak_ratio_vs_plain"] = r["bf16"]["peak_bytes"] / plain["bf16"]["peak_bytes"]
    return row


def _slopes(rows: list[dict], methods: Sequence[str]) -> dict:
    """Least-squares slope (bytes per parameter) of each program's peak over the sizes, and its
    ratio to plain's, in float32 and (``"bf16"``) with bf16 compute."""
    params = np.array([r["params"] for r in rows], float)

    def fit(get):
        out = {}
        for prog in ["plain", *methods]:
            peak = np.array([get(r[prog]) for r in rows], float)
            out[prog] = {"bytes_per_param": float(np.polyfit(params, peak, 1)[0])}
        for prog in out:
            out[prog]["ratio_vs_plain"] = (
                out[prog]["bytes_per_param"] / out["plain"]["bytes_per_param"]
            )
        return out

    f32, bf16 = fit(lambda r: r["peak_bytes"]), fit(lambda r: r["bf16"]["peak_bytes"])
    for prog in f32:
        f32[prog]["bf16"] = bf16[prog]
    return f32


def plot(result: dict, path: str) -> None:
    """PNG in the style of the SAMA paper's Figure 1: peak memory against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    params = [r["params"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for prog in ["plain", *result["methods"]]:
        ax.plot(params, [r[prog]["peak_bytes"] / GIB for r in rows], "-o", label=prog)
    if not result["quick"]:
        ax.axhline(BUDGET / GIB, color="gray", ls="--", lw=1, label="80 GiB")
    ax.set(
        xlabel="parameters (millions)",
        ylabel="compiled training peak (GiB)",
        title=f"K = {K} base steps + 1 meta step, batch {BATCH} × context "
        f"{rows[0]['config']['context']}",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLI = harness.StudyCLI(
    "scaling",
    __doc__,
    quick=f"two tiny transformers and the methods {', '.join(QUICK_METHODS)} (smoke test)",
    seeds=harness.Unused("nothing is trained, only compiled"),
    base_steps=harness.Unused(f"each program is K = {K} base steps (+ 1 meta step)"),
    meta_steps=harness.Unused("each program is one meta step"),
)
CLI.add_argument(
    "--cpu-scheduler",
    choices=("default", "memory"),
    default="default",
    help="XLA CPU's instruction scheduler: its default (concurrency-optimised) one, or "
    f"'memory': the memory-minimising one ({MEMORY_SCHEDULER_FLAG}; set in XLA_FLAGS before "
    "the first compilation, so it must be the process's first JAX work)",
)


def _use_memory_scheduler() -> None:
    """Append :data:`MEMORY_SCHEDULER_FLAG` to ``XLA_FLAGS`` (read when the CPU backend starts)."""
    import os

    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "--cpu-scheduler memory must be set before JAX starts its CPU backend; run the "
            "study in a fresh process"
        )
    flags = os.environ.get("XLA_FLAGS", "")
    if MEMORY_SCHEDULER_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {MEMORY_SCHEDULER_FLAG}".strip()


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring): compile every program at every size."""
    import os

    args = CLI.parse(argv)
    if args.cpu_scheduler == "memory":
        _use_memory_scheduler()
    run_ = harness.Run(args)
    sizes = QUICK_SIZES if args.quick else SIZES
    methods = QUICK_METHODS if args.quick else tuple(METHODS)
    rows = [measure(name, cfg, methods) for name, cfg in sizes.items()]
    slopes = _slopes(rows, methods)
    print("\ntraining peak ÷ plain's (float32 | bf16 compute), the float32 peak's slope over the")
    print("sizes ÷ plain's, and the matmul FLOPs ÷ plain's at the largest size:")
    for prog in ["plain", *methods]:
        f32 = "  ".join(f"{r[prog]['peak_ratio_vs_plain']:5.2f}" for r in rows)
        bf16 = "  ".join(f"{r[prog]['bf16']['peak_ratio_vs_plain']:5.2f}" for r in rows)
        print(
            f"  {prog:>17}: {f32} | {bf16}   slope × {slopes[prog]['ratio_vs_plain']:.2f}   "
            f"FLOPs × {rows[-1][prog]['flop_ratio_vs_plain']:.2f}"
        )
    result = {
        "K": K,
        "batch": BATCH,
        "cpu_scheduler": args.cpu_scheduler,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "methods": list(methods),
        "hypergrad": {m: repr(METHODS[m]) for m in methods},
        "base_tx": repr(harness.Recipe(optax.adam, 1e-3, eps_root=1e-8)),
        "meta_tx": repr(harness.Recipe(optax.adam, 1e-3)),
        "while_trips": WHILE_TRIPS,
        "rows": rows,
        "slopes": slopes,
    }
    return run_.finish(result, plot, records=())


if __name__ == "__main__":
    main()
