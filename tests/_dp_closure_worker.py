"""Subprocess worker for tests/test_parallel.py: data parallelism with the data *closed over*.

The batches are indices into arrays the losses close over (the README's digits pattern). Every
hypergradient method, and ``custom_root`` inside ``shard_map``, must run and equal the mean over
the shards of its single-device result. Needs 2 fake CPU devices and float64; prints one JSON line
``{method: error, ...}`` (plus the errors of the runs that failed, as text).
"""

import functools
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import Mesh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import bilevel_jax as bj  # noqa: E402
from bilevel_jax import linalg  # noqa: E402

N_DEV, K, B, NM = 2, 2, 8, 8
rng = np.random.default_rng(0)
X = jnp.asarray(rng.normal(size=(64, 4)))  # closed over by the losses
Y = jnp.asarray(rng.integers(0, 3, size=64))  # integer labels, closed over too


def base_loss(th, lam, idx):
    w = jax.nn.sigmoid(lam[idx])
    return jnp.mean(w * (X[idx] @ th - 0.5 * Y[idx]) ** 2) + 0.1 * jnp.sum(th**2)


def meta_loss(th, lam, idx):
    return jnp.mean((X[idx] @ th - 1.0) ** 2)


def methods():
    implicit = bj.hypergrad.Implicit
    return {
        "cg": bj.cg(3),
        "cg_warm": bj.cg(3, warm_start=True),
        "gmres": implicit(solver=functools.partial(linalg.solve_gmres, maxiter=3), name="gmres"),
        # restart 2 < n = 4: a partial Krylov space, so the iterations themselves are compared
        "gmres_restart2": implicit(
            solver=functools.partial(linalg.solve_gmres, maxiter=1, restart=2), name="gmres"
        ),
        "bicgstab": implicit(
            solver=functools.partial(linalg.solve_bicgstab, maxiter=3), name="bicgstab"
        ),
        "exact": bj.exact(),
        "neumann": bj.neumann(3, eta=0.1),
        "sama": bj.sama(0.1),
        "soba": bj.soba(),
    }


def err(a, b):
    return max(
        float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def step_errors(mesh):
    base_idx = jnp.asarray(rng.permutation(64)[: K * B].reshape(K, B))
    meta_idx = jnp.asarray(rng.permutation(64)[:NM])
    th0, lam0 = jnp.full(4, 0.3), jnp.asarray(rng.normal(size=64)) * 0.1
    btx, mtx = optax.sgd(0.1), optax.sgd(1.0)  # sgd(1): λ_new = λ − meta-gradient
    out = {}
    for name, method in methods().items():
        try:
            step = bj.bilevel_step(base_loss, meta_loss, btx, mtx, method)
            state = step.init(th0, lam0)
            new, _ = jax.jit(bj.parallel.data_parallel(step, mesh))(state, base_idx, meta_idx)
            # reference: the full-batch base steps (a mean loss: the mean of equal shards'
            # gradients), then the mean over shards of the single-device hypergradient
            th, s = th0, btx.init(th0)
            for i in range(K):
                upd, s = btx.update(jax.grad(base_loss)(th, lam0, base_idx[i]), s, th)
                th = optax.apply_updates(th, upd)
            problem = bj.BilevelProblem(base_loss, meta_loss, btx)
            grads, b, m = [], B // N_DEV, NM // N_DEV
            for d in range(N_DEV):
                shard = bj.BilevelInputs(
                    th, lam0, s, base_idx[-1, d * b : (d + 1) * b], meta_idx[d * m : (d + 1) * m]
                )
                hg, _ = method.hypergrad(problem, shard, method.init(th0, lam0))
                grads.append(hg.meta_grad)
            lam_ref = lam0 - sum(grads) / N_DEV
            out[name] = {"err": err(new.meta_params, lam_ref), "scale": float(jnp.max(lam_ref))}
        except (ValueError, TypeError) as e:  # reported to the test, which names the method
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def custom_root_errors(mesh):
    """``custom_root`` (ridge regression on each device's rows) differentiated inside
    ``shard_map``, against the single-device gradient of each shard."""
    idx = jnp.arange(16)
    lam0 = jnp.asarray(0.7)
    out = {}
    for name, solve in {
        "cg": linalg.solve_cg,
        "gmres": linalg.solve_gmres,
        "bicgstab": linalg.solve_bicgstab,
        "dense": linalg.solve_dense,
    }.items():

        def inner(th, lam, rows):
            return jnp.sum((X[rows] @ th - Y[rows]) ** 2) + lam * th @ th

        @bj.custom_root(jax.grad(inner), solve=functools.partial(solve, maxiter=50, tol=1e-14))
        def ridge(init, lam, rows):
            a = X[rows].T @ X[rows] + lam * jnp.eye(4)
            return jnp.linalg.solve(a, X[rows].T @ Y[rows]) + 0.0 * init

        def outer(lam, rows):
            return jnp.sum(ridge(jnp.zeros(4), lam, rows) ** 2)

        def per_device(lam, rows):
            g = jax.grad(outer)(jax.lax.pcast(lam, "data", to="varying"), rows)
            return jax.lax.pmean(g, "data")

        try:
            f = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
            got = jax.jit(f)(lam0, idx)
            ref = sum(jax.grad(outer)(lam0, idx[d * 8 : (d + 1) * 8]) for d in range(2)) / 2
            out[name] = {"err": abs(float(got - ref)), "scale": abs(float(ref))}
        except (ValueError, TypeError) as e:
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def full_batch_errors(mesh):
    """sync="full_batch" against one device on the full batches: exact for the mean loss;
    for the ratio loss Σwℓ/Σw (declared a mean, wrongly) the mean of per-shard ratios is not
    the full-batch ratio."""

    def ratio_loss(th, lam, idx):
        w = jax.nn.sigmoid(lam[idx])
        return jnp.sum(w * (X[idx] @ th - 0.5 * Y[idx]) ** 2) / jnp.sum(w) + 0.1 * jnp.sum(th**2)

    base_idx = jnp.asarray(rng.permutation(64)[: K * B].reshape(K, B))
    meta_idx = jnp.asarray(rng.permutation(64)[:NM])
    th0, lam0 = jnp.full(4, 0.3), jnp.asarray(rng.normal(size=64))
    out = {}
    for name, bl in (("mean", base_loss), ("ratio", ratio_loss)):
        step = bj.bilevel_step(
            bl, meta_loss, optax.sgd(0.1), optax.sgd(1.0), bj.sama(0.1),
            sync="full_batch", loss_reduction="mean",
        )  # fmt: skip
        state = step.init(th0, lam0)
        got, _ = jax.jit(bj.parallel.data_parallel(step, mesh))(state, base_idx, meta_idx)
        ref, _ = jax.jit(step)(state, base_idx, meta_idx)
        out[f"{name}_err"] = err(got.meta_params - lam0, ref.meta_params - lam0)
        out["scale"] = float(jnp.max(jnp.abs(ref.meta_params - lam0)))
    return out


def main():
    assert jax.device_count() == N_DEV, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    report = {"step": step_errors(mesh), "custom_root": custom_root_errors(mesh)}
    report["full_batch"] = full_batch_errors(mesh)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
