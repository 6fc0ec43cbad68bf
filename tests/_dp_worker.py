"""Subprocess worker for tests/test_parallel.py (needs 8 fake CPU devices, float64).

Prints one JSON line with the measured errors and collective counts.
"""

import dataclasses
import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _dp_problem import base_loss, meta_loss  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

import bilevel_jax as bj  # noqa: E402
from bilevel_jax.parallel import collective_report, data_parallel  # noqa: E402

N_DEV, K, B, F, NM = 8, 3, 32, 5, 16  # B and NM split into 8 shards of 4 and 2
ALL_REDUCE = re.compile(r"(?<![%\w.-])all-reduce(?:-start)?\(")  # docs/parallel.md §3


def main():
    assert jax.device_count() == N_DEV, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    rng = np.random.RandomState(0)
    xs, ys = jnp.asarray(rng.randn(K, B, F)), jnp.asarray(rng.randn(K, B))
    meta = (jnp.asarray(rng.randn(NM, F)), jnp.asarray(rng.randn(NM)))
    th0 = {"w": jnp.asarray(rng.randn(F)) * 0.3}
    lam0 = {"a": jnp.zeros(F), "c": jnp.full(F, 0.01)}
    btx, mtx = optax.adam(1e-2), optax.sgd(1.0)  # sgd(1): λ_new = λ − meta-gradient
    method = bj.sama(0.1, adapt_from="last", step_along_v=True)
    step = bj.bilevel_step(base_loss, meta_loss, btx, mtx, method)
    state = step.init(th0, lam0)

    dp = jax.jit(data_parallel(step, mesh))
    out, metrics = dp(state, (xs, ys), meta)

    # Reference: base steps on the full batch (the mean of equal shards' mean losses), then the
    # mean over shards of single-device SAMA on each shard's last base batch and meta batch.
    th, s = th0, btx.init(th0)
    for i in range(K):
        g = jax.grad(base_loss)(th, lam0, (xs[i], ys[i]))
        last_g, last_s = g, s
        upd, s = btx.update(g, s, th)
        th = optax.apply_updates(th, upd)
    problem = bj.BilevelProblem(base_loss, meta_loss, btx)
    per_shard = []
    for d in range(N_DEV):
        bb = (xs[-1, d * 4 : (d + 1) * 4], ys[-1, d * 4 : (d + 1) * 4])
        mb = (meta[0][d * 2 : (d + 1) * 2], meta[1][d * 2 : (d + 1) * 2])
        inputs = bj.BilevelInputs(th, lam0, s, bb, mb, last_g, last_s)
        per_shard.append(method.hypergrad(problem, inputs, optax.EmptyState())[0])
    mean = lambda f: jax.tree.map(lambda *xs: sum(xs) / N_DEV, *[f(h) for h in per_shard])  # noqa: E731
    lam_ref = jax.tree.map(lambda l, h: l - h, lam0, mean(lambda h: h.meta_grad))
    th_ref = jax.tree.map(lambda t, u: t + u, th, mean(lambda h: h.base_update))

    def err(a, b):
        return max(
            float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )

    # collectives: one all-reduce in the scanned base step (all K steps run in the scan) and
    # one in the meta step after it
    hlo = dp.lower(state, (xs, ys), meta).compile().as_text()
    assert hlo is not None
    n_all_reduce = len(ALL_REDUCE.findall(hlo))
    # split the module into computations; the base steps are the scan's while body
    blocks = dict(re.findall(r"^(?:ENTRY )?(%[\w.-]+) .*?\{\n(.*?)^\}", hlo, re.S | re.M))
    bodies = set(re.findall(r"body=(%[\w.-]+)", hlo))
    in_body = sum(len(ALL_REDUCE.findall(blocks[b])) for b in bodies if b in blocks)
    n_other = len(
        re.findall(
            r"(?<![%\w.-])(?:all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(",
            hlo,
        )
    )

    # replicas stay bit-identical: run several steps, then gather every device's copy
    st = out
    for _ in range(5):
        st, _ = dp(st, (xs, ys), meta)
    copies = [np.asarray(shard.data) for shard in st.base_params["w"].addressable_shards]
    lam_copies = [np.asarray(shard.data) for shard in st.meta_params["a"].addressable_shards]
    replicas_identical = all(c.tobytes() == copies[0].tobytes() for c in copies) and all(
        c.tobytes() == lam_copies[0].tobytes() for c in lam_copies
    )

    # sync="full_batch": d and the fresh adaptation gradient are averaged first -> full-batch result
    exact_method = bj.sama(0.1, step_along_v=True)
    step_exact = bj.bilevel_step(
        base_loss, meta_loss, btx, mtx, exact_method, sync="full_batch", loss_reduction="mean"
    )
    dp_exact = jax.jit(data_parallel(step_exact, mesh))
    out_e, _ = dp_exact(state, (xs, ys), meta)
    ref_e, _ = jax.jit(step_exact)(state, (xs, ys), meta)  # one device, full batches
    exact_hlo = dp_exact.lower(state, (xs, ys), meta).compile().as_text()
    assert exact_hlo is not None
    exact_report = collective_report(exact_hlo)

    # pmap: the same step with axis_name inside jax.pmap gives the shard_map result
    pstep = jax.pmap(dataclasses.replace(step, axis_name="data"), axis_name="data")
    stacked = jax.tree.map(lambda x: jnp.broadcast_to(x, (N_DEV,) + x.shape), state)
    pbase = jax.tree.map(
        lambda x: jnp.moveaxis(x.reshape(K, N_DEV, -1, *x.shape[2:]), 1, 0), (xs, ys)
    )
    pmeta = jax.tree.map(lambda x: x.reshape(N_DEV, -1, *x.shape[1:]), meta)
    pout, _ = pstep(stacked, pbase, pmeta)
    pmap_err = err(
        jax.tree.map(lambda x: x[0], (pout.base_params, pout.meta_params)),
        (out.base_params, out.meta_params),
    )
    pmap_replicas_err = max(
        float(jnp.max(jnp.abs(x - x[0]))) for x in jax.tree.leaves(pout.base_params)
    )

    # stateful model: a running mean of the batch's features, averaged across devices in the
    # base step's all-reduce; with sync="full_batch" the whole step equals the full-batch one
    def sbase(th, lam, batch, ms):
        new = {"mu": 0.9 * ms["mu"] + 0.1 * jnp.mean(batch[0], axis=0)}
        return base_loss(th, lam, batch) + 0.1 * jnp.sum(ms["mu"] * th["w"]), new

    def smeta(th, lam, batch, ms):
        return meta_loss(th, lam, batch) + 0.1 * jnp.sum(ms["mu"] * th["w"])

    sstep = bj.bilevel_step(
        sbase,
        smeta,
        btx,
        mtx,
        bj.sama(0.1),
        stateful=True,
        sync="full_batch",
        loss_reduction="mean",
    )
    sstate = sstep.init(th0, lam0, model_state={"mu": jnp.zeros(F)})
    s_dp, _ = jax.jit(data_parallel(sstep, mesh))(sstate, (xs, ys), meta)
    s_ref, _ = jax.jit(sstep)(sstate, (xs, ys), meta)
    stateful_err = err(
        (s_dp.base_params, s_dp.meta_params, s_dp.model_state),
        (s_ref.base_params, s_ref.meta_params, s_ref.model_state),
    )

    # use_rng: device d draws with fold_in(key, d); reference: the mean over d of the
    # shard gradients with those keys (base steps only; the meta step does not move θ here)
    def rbase(th, lam, batch, *, rng):
        return base_loss(th, lam, batch) + 0.1 * jnp.sum(jax.random.normal(rng, (F,)) * th["w"])

    def rmeta(th, lam, batch, *, rng):
        return meta_loss(th, lam, batch)

    rstep = bj.bilevel_step(rbase, rmeta, btx, mtx, bj.sama(0.1), use_rng=True)
    rstate = rstep.init(th0, lam0, rng=jax.random.PRNGKey(3))
    r_dp, _ = jax.jit(data_parallel(rstep, mesh))(rstate, (xs, ys), meta)
    _, base_rng, _ = jax.random.split(rstate.rng, 3)
    keys = jax.random.split(base_rng, K)
    th, s = th0, btx.init(th0)
    for i in range(K):
        shard = lambda x, d, i=i: x[i, d * 4 : (d + 1) * 4]  # noqa: E731
        grads = [
            jax.grad(rbase)(
                th, lam0, (shard(xs, d), shard(ys, d)), rng=jax.random.fold_in(keys[i], d)
            )
            for d in range(N_DEV)
        ]
        g = jax.tree.map(lambda *gs: sum(gs) / N_DEV, *grads)
        upd, s = btx.update(g, s, th)
        th = optax.apply_updates(th, upd)
    rng_err = err(r_dp.base_params, th)

    print(
        json.dumps(
            {
                "pmap_err": pmap_err,
                "pmap_replicas_err": pmap_replicas_err,
                "stateful_exact_err": stateful_err,
                "rng_err": rng_err,
                "exact_meta_err": err(out_e.meta_params, ref_e.meta_params),
                "exact_base_err": err(out_e.base_params, ref_e.base_params),
                "exact_meta_step_allreduces": exact_report["meta_step_allreduces"],
                "meta_err": err(out.meta_params, lam_ref),
                "meta_scale": max(
                    float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(mean(lambda h: h.meta_grad))
                ),
                "base_err": err(out.base_params, th_ref),
                "meta_loss_err": abs(
                    float(metrics["meta_loss"]) - float(mean(lambda h: h.meta_loss))
                ),
                "all_reduces": n_all_reduce,
                "all_reduces_in_base_step": in_body,
                "all_reduces_in_meta_step": n_all_reduce - in_body,
                "other_collectives": n_other,
                "replicas_identical": replicas_identical,
                "n_replicas": len(copies),
                "finite": bool(jnp.isfinite(metrics["hypergrad_norm"])),
            }
        )
    )


if __name__ == "__main__":
    main()
