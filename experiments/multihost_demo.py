r"""Multi-process data-parallel SAMA on real MNIST digits: the multi-host recipe, runnable on one machine.

    python -m experiments.multihost_demo [--processes 2] [--devices-per-process 4]
                                         [--base-steps 600 | --meta-steps 60] [--quick] [--json PATH]

The parent starts ``--processes`` Python processes on loopback with
:func:`bilevel_jax.distributed.launch_local`; each joins the run with
:func:`bilevel_jax.distributed.initialize` (``--devices-per-process`` fake CPU devices each), builds
the global mesh, and loads **only its own rows** of every batch, which
:func:`bilevel_jax.distributed.global_batch` assembles into global arrays
(``jax.make_array_from_process_local_data``). The bilevel step is the single-host one,
:func:`bilevel_jax.parallel.data_parallel` over the global mesh: one all-reduce per base step and one
per meta step, across processes (gloo on CPU). On a TPU pod the same worker code runs once per host
under the pod's launcher.

The task is the main job's (``experiments/noisy_labels_demo.py``): MNIST-5k, 40 % symmetric label
noise on the train split, an MLP trained with Adam, reweighted by a Meta-Weight-Net learned with SAMA
(α = 0.1, ``adapt_from="last"``) every 10 base steps. The global base batch is 96 examples, the meta
batch 64 of the 100 clean meta examples. Process 0 prints the clean test accuracy and the mean learned
weight of clean and of flipped train examples; every process prints a checksum of its final
parameters, which agree bit for bit. ``--quick``: 20 base steps (2 meta steps).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time
from collections.abc import Sequence

from experiments import harness

ROOT = pathlib.Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    """One process of the run (started by :func:`main`)."""
    from bilevel_jax import distributed as dist

    if os.environ.get(dist.ENV_COORDINATOR):
        dist.initialize(cpu_devices=args.devices_per_process)
    else:  # a single process: plain single-host data parallelism
        import jax

        jax.config.update("jax_num_cpu_devices", args.devices_per_process)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import bilevel_jax as bj
    from bilevel_jax.parallel import data_parallel
    from experiments import data as data_lib
    from experiments.noisy_labels_demo import Config, make_losses

    cfg = Config(base_steps=args.base_steps)
    ds = data_lib.load_mnist5k()
    splits = data_lib.stratified_split(
        ds.y, {"meta": cfg.meta_per_class, "test": cfg.test_per_class}, 0
    )
    tr, me, te = splits["train"], splits["meta"], splits["test"]
    y_noisy, flipped = data_lib.symmetric_noise(ds.y[tr], cfg.noise_rate, ds.num_classes, 0)
    losses, theta0, lam0 = make_losses(cfg, ds.x.shape[1], ds.num_classes, 0)

    mesh = dist.global_mesh("data")
    batch, meta_size, k = 96, 64, cfg.meta_interval
    rows, meta_rows = dist.process_rows(batch), dist.process_rows(meta_size)
    n_meta_steps = args.base_steps // k
    idx = harness.batch_indices(len(tr), n_meta_steps * k, batch, 1)
    idx = idx.reshape(n_meta_steps, k, batch)
    meta_idx = np.random.default_rng(2).random((n_meta_steps, len(me))).argsort(1)[:, :meta_size]

    step = bj.bilevel_step(
        losses.base,
        losses.meta,
        optax.adam(cfg.lr),
        optax.adam(cfg.meta_lr),
        cfg.method,
    )
    dp_step = jax.jit(data_parallel(step, mesh), donate_argnums=0)
    state = dist.replicate(step.init(theta0, lam0), mesh)
    t0 = time.perf_counter()
    for t in range(n_meta_steps):
        local = idx[t][:, rows]  # this process's rows of the K base batches
        base = dist.global_batch((ds.x[tr][local], y_noisy[local]), mesh, batch_axis=1)
        m = me[meta_idx[t][meta_rows]]
        meta = dist.global_batch((ds.x[m], ds.y[m]), mesh)
        state, metrics = dp_step(state, base, meta)
    theta, lam = dist.to_host((state.base_params, state.meta_params))
    wall = time.perf_counter() - t0

    acc = float(jnp.mean(jnp.argmax(losses.logits(theta, ds.x[te]), -1) == ds.y[te]))
    w = np.asarray(losses.weights(theta, lam, ds.x[tr], y_noisy))
    checksum = float(sum(np.sum(np.abs(x), dtype=np.float64) for x in jax.tree.leaves(theta)))
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "platform": jax.devices()[0].platform,
                "base_steps": n_meta_steps * k,
                "meta_steps": n_meta_steps,
                "test_acc": acc,
                "weight_clean": float(w[~flipped].mean()),
                "weight_flipped": float(w[flipped].mean()),
                "meta_loss": float(dist.to_host(metrics["meta_loss"])),
                "skipped": int(state.skipped_base) + int(state.skipped_meta),
                "theta_checksum": checksum,
                "wall_s": wall,
                "data": dict(ds.source),
            }
        ),
        flush=True,
    )


CLI = harness.StudyCLI(
    "multihost_demo",
    __doc__,
    quick="20 base steps (2 meta steps)",
    seeds=harness.Unused("the task is seed 0 of the main job (split, noise, initialisation)"),
    base_steps="base steps of the run (default 600; quick 20); a multiple of the meta interval 10",
    meta_steps="meta steps of the run, one per 10 base steps (default 60)",
)
CLI.add_argument("--processes", type=int, default=2)
CLI.add_argument("--devices-per-process", type=int, default=4)
CLI.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
CLI.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


def main(argv: Sequence[str] | None = None) -> dict:
    """Launch the run, print every process's report and write them (with the provenance)."""
    args = CLI.parse(argv)
    if args.worker:
        worker(args)
        return {}
    run_ = harness.Run(args, device=False)
    base_steps, _ = CLI.steps(args, per_meta=10, default=60, quick=2)

    from bilevel_jax import distributed as dist

    child = [
        "-m",
        "experiments.multihost_demo",
        "--worker",
        "--base-steps",
        str(base_steps),
        "--devices-per-process",
        str(args.devices_per_process),
    ]
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outs = dist.launch_local(child, args.processes, timeout_s=args.timeout, env=env, cwd=str(ROOT))
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    r = reports[0]
    run_.data(r["data"])
    run_.provenance["device"] = {
        "platform": r["platform"],
        "count": r["devices"],
        "process_count": r["processes"],
    }
    print(
        f"{r['processes']} process(es) × {args.devices_per_process} devices, {r['base_steps']} "
        f"base steps in {r['wall_s']:.1f} s: clean test accuracy {r['test_acc']:.3f}; mean "
        f"learned weight clean {r['weight_clean']:.3f}, flipped {r['weight_flipped']:.3f}"
    )
    identical = len({x["theta_checksum"] for x in reports}) == 1
    print(f"parameters identical on every process: {identical}")
    result = {
        "processes": args.processes,
        "devices_per_process": args.devices_per_process,
        "base_steps": base_steps,
        "parameters_identical": identical,
        "reports": reports,
    }
    return run_.finish(result, None, records=())


if __name__ == "__main__":
    main()
