r"""Communication report: all-reduces per base step and per meta step for every method.

    python -m experiments.comm_report [--quick] [--json PATH]

Compiles the data-parallel bilevel step (:func:`bilevel_jax.parallel.data_parallel`) of each
method on 8 fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set
before JAX starts) for the data-reweighting problem: an MLP 784-256-10 base model, a
Meta-Weight-Net 1-100-1, Adam, batch 256, K = 10 base steps per meta step. It reads the
number of all-reduce ops and the bytes they reduce from the compiled HLO (docs/parallel.md).
Nothing is run, only compiled (``--seeds``, ``--base-steps`` and ``--meta-steps`` are rejected;
``--quick`` compiles SAMA and CG only).

"naive" is what synchronising every backward pass (every gradient, HVP or λ-gradient the
method evaluates, as a DDP-style wrapper would) costs per meta step: SAMA (fresh) d, g and two
λ-gradients; SAMA-NA/DARTS d and two λ-gradients; Neumann/CG(k) d, k HVPs and one mixed
product; ITD(K) K gradients forward, K vector-Jacobian products backward and one λ-gradient;
DDS = ITD(1); SOBA d, one HVP and one mixed product. ``exact`` (a dense 203k×203k Hessian)
is left out at this size.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import bilevel_jax as bj  # noqa: E402
from bilevel_jax.parallel import collective_report, data_parallel  # noqa: E402
from experiments import harness  # noqa: E402

K, BATCH, META_BATCH, SIZES, MWN = 10, 256, 128, (784, 256, 10), 100

METHODS = {
    "sama": (bj.sama(), lambda nt, nl: [nt, nt, nl, nl]),
    "sama_na": (bj.sama_na(), lambda nt, nl: [nt, nl, nl]),
    "darts": (bj.darts(), lambda nt, nl: [nt, nl, nl]),
    "neumann": (bj.neumann(maxiter=5, eta=1e-3), lambda nt, nl: [nt] * 6 + [nl]),
    "cg": (bj.cg(maxiter=5), lambda nt, nl: [nt] * 6 + [nl]),
    "itd": (bj.itd(unroll=10), lambda nt, nl: [nt] * 20 + [nl]),
    "dds": (bj.dds(), lambda nt, nl: [nt, nt, nl]),
    "soba": (bj.soba(rho=1e-3), lambda nt, nl: [nt, nt, nl]),
}
"""name -> (method, the sizes of the all-reduces a naive per-backward-pass sync would take,
given n_θ and n_λ)."""
QUICK_METHODS = ("sama", "cg")
OPTIMIZER = harness.Recipe(optax.adam, 1e-3)
"""The base and the meta optimizer."""


def _mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
        for k, a, b in zip(keys, sizes[:-1], sizes[1:])
    ]


def _apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def base_loss(theta, lam, batch):
    x, y = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(_apply(theta, x), y)
    w = jax.nn.sigmoid(_apply(lam, jax.lax.stop_gradient(ce)[:, None]))[:, 0]
    return jnp.sum(w * ce) / jnp.sum(w)


def meta_loss(theta, lam, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(_apply(theta, x), y).mean()


def report(devices: int = 8, methods: Sequence[str] = tuple(METHODS)) -> dict:
    """Compile every method's data-parallel step and read its collectives."""
    assert jax.device_count() >= devices, f"need {devices} devices, have {jax.device_count()}"
    mesh = Mesh(np.array(jax.devices()[:devices]), ("data",))
    theta, lam = _mlp(jax.random.PRNGKey(0), SIZES), _mlp(jax.random.PRNGKey(1), (1, MWN, 1))
    n_theta = sum(x.size for x in jax.tree.leaves(theta))
    n_lam = sum(x.size for x in jax.tree.leaves(lam))
    base = (jnp.zeros((K, BATCH, SIZES[0])), jnp.zeros((K, BATCH), jnp.int32))
    meta = (jnp.zeros((META_BATCH, SIZES[0])), jnp.zeros((META_BATCH,), jnp.int32))
    out = {
        "config": {
            "devices": devices,
            "K": K,
            "batch": BATCH,
            "meta_batch": META_BATCH,
            "model": "MLP 784-256-10",
            "meta_model": "MWN 1-100-1",
            "n_theta": n_theta,
            "n_lambda": n_lam,
            "dtype": "float32",
            "optimizers": {"base": repr(OPTIMIZER), "meta": repr(OPTIMIZER)},
            "hypergrad": {name: repr(METHODS[name][0]) for name in methods},
        }
    }
    for name in methods:
        method, naive = METHODS[name]
        t0 = time.perf_counter()
        step = bj.bilevel_step(base_loss, meta_loss, OPTIMIZER(), OPTIMIZER(), method)
        state = jax.eval_shape(step.init, theta, lam)
        text = jax.jit(data_parallel(step, mesh)).lower(state, base, meta).compile().as_text()
        if text is None:
            raise RuntimeError(f"{name}: XLA returned no text for the compiled step")
        r = collective_report(text)
        sizes = naive(n_theta, n_lam)
        out[name] = {
            "base_step_allreduces": r["base_step_allreduces"],
            "meta_step_allreduces": r["meta_step_allreduces"],
            "base_step_bytes": r["base_step_bytes"],
            "meta_step_bytes": r["meta_step_bytes"],
            "other_collectives": r["other_collectives"],
            "naive_meta_step_allreduces": len(sizes),
            "naive_meta_step_bytes": 4 * sum(sizes),
            "compile_s": round(time.perf_counter() - t0, 2),
        }
        print(
            f"{name:8s} base {r['base_step_allreduces']} ({r['base_step_bytes']:,} B)  meta "
            f"{r['meta_step_allreduces']} ({r['meta_step_bytes']:,} B)  naive {len(sizes)} "
            f"({4 * sum(sizes):,} B)",
            flush=True,
        )
    return out


CLI = harness.StudyCLI(
    "comm_report",
    __doc__,
    quick=f"compile {' and '.join(QUICK_METHODS)} only",
    seeds=harness.Unused("nothing is run, only compiled"),
    base_steps=harness.Unused(f"nothing is run; the compiled step takes K = {K} base steps"),
    meta_steps=harness.Unused("nothing is run; the compiled step takes one meta step"),
)


def main(argv: Sequence[str] | None = None) -> dict:
    """Command line (module docstring): compile, count and write the report."""
    args = CLI.parse(argv)
    run_ = harness.Run(args)
    result = report(methods=QUICK_METHODS if args.quick else tuple(METHODS))
    return run_.finish(result, None, records=())


if __name__ == "__main__":
    main()
