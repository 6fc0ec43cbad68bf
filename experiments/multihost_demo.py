r"""Multi-process data-parallel SAMA on real MNIST digits: the multi-host recipe, runnable on one machine.

    python -m experiments.multihost_demo [--processes 2] [--devices-per-process 4] [--steps 600]
                                         [--json PATH]

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
parameters, which agree bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

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
    from experiments import noisy_labels_demo as nl

    cfg = nl.Config(steps=args.steps)
    ds = data_lib.load_mnist5k()
    splits = data_lib.stratified_split(
        ds.y, {"meta": cfg.meta_per_class, "test": cfg.test_per_class}, 0
    )
    tr, me, te = splits["train"], splits["meta"], splits["test"]
    y_noisy, flipped = data_lib.symmetric_noise(ds.y[tr], cfg.noise_rate, ds.num_classes, 0)
    losses, theta0, lam0 = nl.make_losses(cfg, ds.x.shape[1], ds.num_classes, 0)

    mesh = dist.global_mesh("data")
    batch, meta_size, k = 96, 64, cfg.meta_interval
    rows, meta_rows = dist.process_rows(batch), dist.process_rows(meta_size)
    n_meta_steps = args.steps // k
    idx = nl._batch_indices(len(tr), n_meta_steps * k, batch, 1).reshape(n_meta_steps, k, batch)
    meta_idx = np.random.default_rng(2).random((n_meta_steps, len(me))).argsort(1)[:, :meta_size]

    step = bj.bilevel_step(
        losses.base,
        losses.meta,
        optax.adam(cfg.lr),
        optax.adam(cfg.meta_lr),
        bj.sama(cfg.alpha, adapt_from="last"),
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
                "steps": n_meta_steps * k,
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


def main(argv: list[str] | None = None) -> list[dict]:
    """Launch the run and print (and optionally save) every process's report."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=4)
    p.add_argument("--steps", type=int, default=600, help="base steps (whole meta intervals of 10)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole run")
    p.add_argument("--json", default=None, help="write the reports here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return []
    if args.steps < 10:
        raise SystemExit("--steps must be at least 10 (one meta interval)")

    from bilevel_jax import distributed as dist

    child = [
        "-m",
        "experiments.multihost_demo",
        "--worker",
        "--steps",
        str(args.steps),
        "--devices-per-process",
        str(args.devices_per_process),
    ]
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    outs = dist.launch_local(child, args.processes, timeout_s=args.timeout, env=env, cwd=str(ROOT))
    reports = [json.loads(o.strip().splitlines()[-1]) for o in outs]
    r = reports[0]
    print(
        f"{r['processes']} process(es) × {args.devices_per_process} devices, {r['steps']} steps "
        f"in {r['wall_s']:.1f} s: clean test accuracy {r['test_acc']:.3f}; mean learned weight "
        f"clean {r['weight_clean']:.3f}, flipped {r['weight_flipped']:.3f}"
    )
    sums = {x["theta_checksum"] for x in reports}
    print(f"parameters identical on every process: {len(sums) == 1}")
    if args.json:
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.json).write_text(json.dumps(reports, indent=2) + "\n")
    return reports


if __name__ == "__main__":
    main(sys.argv[1:])
