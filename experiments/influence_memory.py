r"""Compiled memory of per-example projected gradients: LoGra's Kronecker path against the rest.

::

    python -m experiments.influence_memory [--quick] [--json PATH]

LoGra (Choe et al. 2024; the thesis, ch. 4, Table 4.1) projects each linear layer's per-example
gradient ``G_i`` (``d_in × d_out``) to ``P_inᵀ G_i P_out`` (``k × k``). Three ways to get the
projected gradients of ``n`` examples, compiled (``jax.jit(...).lower(...).compile()`` on abstract
shapes: nothing is allocated or trained) for an MLP of ``layers`` square ``nnx.Linear`` layers of growing
``width``:

``kronecker``
    :func:`bilevel_jax.influence.with_logra` + :func:`~bilevel_jax.influence.logra_gradients`:
    a zero bottleneck between the projections, whose gradient is the projected gradient; no
    full per-example gradient is formed.
``generic``
    :func:`~bilevel_jax.influence.per_example_grads` (``vmap(grad)``: the full per-example
    gradients, ``n × params``) then :func:`~bilevel_jax.influence.project_gradients`.
``naive``
    the full per-example gradients flattened (``n × params``) times one dense Gaussian
    projection to the same total dimension (``params × Σ k²``), as a non-Kronecker projection
    would.

Reported per width: parameters, XLA's ``temp_size_in_bytes`` (the working memory) and
``argument_size_in_bytes`` (the inputs, which hold the naive projection matrix) of each path,
the slope of temp memory against the parameter count (least squares over the widths), and the
logging throughput (examples/s, the median of five timed calls after a warm-up, real arrays) of
the Kronecker and generic paths with their ratio, measured in the same process (the naive path
is not timed: its dense projection matrix alone is 6 GB at width 1024).
The claim checked: the Kronecker path's per-example memory grows like ``k`` and the activations
(linearly in the width), not like the parameter count (quadratically).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax import influence as inf
from experiments import harness

__all__ = ["WIDTHS", "QUICK_WIDTHS", "measure", "main"]

WIDTHS = (128, 256, 512, 1024, 2048)
QUICK_WIDTHS = (64, 128, 256)
N, K, OUT = 64, 16, 16
REPEATS = 5
LAYERS = 3  # two width × width hidden layers and a width × 16 output layer (k ≤ 16)


def _model(width: int):
    from flax import nnx

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.hidden0 = nnx.Linear(width, width, rngs=rngs)
            self.hidden1 = nnx.Linear(width, width, rngs=rngs)
            self.out = nnx.Linear(width, OUT, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden1(jnp.tanh(self.hidden0(x)))))

    return MLP(nnx.Rngs(0))


def _loss(model, example):
    x, y = example
    return -jax.nn.log_softmax(model(x))[y]


def measure(width: int, *, n: int = N, k: int = K, repeats: int = REPEATS) -> dict:
    """Compile the three paths for one width; their memory figures (bytes), and the logging
    throughput (examples/s: the median of ``repeats`` timed calls after a warm-up call) of the
    Kronecker and generic paths on real arrays (``repeats=0``: no timing)."""
    from flax import nnx

    model = _model(width)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    graphdef, state = nnx.split(model)
    proj = inf.random_projections(jax.random.key(1), params, k, k)
    r = np.random.default_rng(0)
    batch = (
        jnp.asarray(r.normal(size=(n, width)), jnp.float32),
        jnp.asarray(r.integers(0, OUT, n), jnp.int32),
    )
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    dim = int(
        sum(
            p.p_in.shape[1] * p.p_out.shape[1]
            for p in jax.tree.leaves(proj, is_leaf=lambda x: isinstance(x, inf.Projection))
        )
    )

    def kronecker(state, batch):
        return inf.flatten_projected(
            inf.logra_gradients(inf.with_logra(nnx.merge(graphdef, state), proj), _loss, batch)
        )

    def loss_of_params(p, example):
        return _loss(nnx.merge(graphdef, p), example)

    def generic(p, batch):
        return inf.flatten_projected(
            inf.project_gradients(inf.per_example_grads(loss_of_params, p, batch), proj)
        )

    # abstract: at width 2048 the dense projection alone would be 25 GB (nothing is allocated)
    matrix = jax.ShapeDtypeStruct((n_params, dim), jnp.float32)

    def naive(p, batch, matrix):
        g = inf.per_example_grads(loss_of_params, p, batch)
        flat = jnp.concatenate([x.reshape(n, -1) for x in jax.tree.leaves(g)], axis=1)
        return flat @ matrix

    out: dict = {"width": width, "params": n_params, "projected_dim": dim, "n": n}
    for name, fn, args in (
        ("kronecker", kronecker, (state, batch)),
        ("generic", generic, (params, batch)),
        ("naive", naive, (params, batch, matrix)),
    ):
        shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
        mem = jax.jit(fn).lower(*shapes).compile().memory_analysis()
        if mem is None:
            raise RuntimeError("XLA gave no memory analysis")
        out[name] = {
            "temp_bytes": int(mem.temp_size_in_bytes),
            "argument_bytes": int(mem.argument_size_in_bytes),
        }
    if repeats:
        # the naive path is left out: its dense projection alone is 6 GB at width 1024
        for name, fn, args in (
            ("kronecker", kronecker, (state, batch)),
            ("generic", generic, (params, batch)),
        ):
            jitted = jax.jit(fn)
            jax.block_until_ready(jitted(*args))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(jitted(*args))
                times.append(time.perf_counter() - t0)
            out[name]["examples_per_s"] = n / float(np.median(times))
        out["kronecker_speedup"] = (
            out["kronecker"]["examples_per_s"] / out["generic"]["examples_per_s"]
        )
    return out


def _slopes(rows: list[dict]) -> dict:
    """Least-squares slope of temp bytes against parameters, and against the width, per path."""
    params = np.array([r["params"] for r in rows], float)
    widths = np.array([r["width"] for r in rows], float)
    out = {}
    for name in ("kronecker", "generic", "naive"):
        temp = np.array([r[name]["temp_bytes"] for r in rows], float)
        out[name] = {
            "bytes_per_param": float(np.polyfit(params, temp, 1)[0]),
            "bytes_per_width": float(np.polyfit(widths, temp, 1)[0]),
            "temp_growth": float(temp[-1] / temp[0]),
        }
    out["param_growth"] = float(params[-1] / params[0])
    out["width_growth"] = float(widths[-1] / widths[0])
    return out


def plot(result: dict, path: str) -> None:
    """PNG: temp memory of each path against the parameter count (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    params = [r["params"] for r in rows]
    for name in ("kronecker", "generic", "naive"):
        ax.loglog(params, [r[name]["temp_bytes"] / 2**20 for r in rows], "-o", label=name)
    ax.set(
        xlabel="parameters",
        ylabel=f"compiled temp memory (MiB), n = {rows[0]['n']}",
        title=f"per-example projected gradients, k = {result['k']} per side",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


CLI = harness.StudyCLI(
    "influence_memory",
    __doc__,
    quick=f"widths {', '.join(map(str, QUICK_WIDTHS))} only",
    seeds=harness.Unused("nothing is trained, only compiled"),
    base_steps=harness.Unused("nothing is trained, only compiled"),
    meta_steps=harness.Unused("nothing is trained, only compiled"),
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring): compile every path at every width, write the figures."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    rows = []
    for width in QUICK_WIDTHS if args.quick else WIDTHS:
        row = measure(width)
        rows.append(row)
        cells = "  ".join(
            f"{name} {row[name]['temp_bytes'] / 2**20:8.2f} MiB"
            for name in ("kronecker", "generic", "naive")
        )
        print(
            f"width {width:5d} ({row['params']:>9,d} params): temp {cells}; examples/s "
            f"kronecker {row['kronecker']['examples_per_s']:,.0f}, generic "
            f"{row['generic']['examples_per_s']:,.0f} (×{row['kronecker_speedup']:.1f})",
            flush=True,
        )
    slopes = _slopes(rows)
    for name in ("kronecker", "generic", "naive"):
        s = slopes[name]
        print(
            f"{name:>9}: temp grows {s['temp_growth']:.1f}x while the parameters grow "
            f"{slopes['param_growth']:.1f}x and the width {slopes['width_growth']:.1f}x"
        )
    result = {"n": N, "k": K, "layers": LAYERS, "rows": rows, "slopes": slopes}
    return run_.finish(result, plot, records=())


if __name__ == "__main__":
    main()
