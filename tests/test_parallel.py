"""Data parallelism with shard_map on 8 fake CPU devices (run in a subprocess: the device
count must be set before JAX starts and it slows every other test)."""

import json
import os
import pathlib
import subprocess
import sys
import warnings

import optax
import pytest

import bilevel_jax as bj
from tests import _xla

WORKER = pathlib.Path(__file__).resolve().parent / "_dp_worker.py"


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, XLA_FLAGS=_xla.flags("--xla_force_host_platform_device_count=8"))
    env["PYTHONPATH"] = str(WORKER.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_meta_gradient_is_the_mean_of_per_shard_sama(report):
    assert report["finite"]
    assert report["meta_err"] <= 1e-10 * report["meta_scale"], report


def test_base_steps_equal_full_batch_steps_and_the_base_step_along_v_is_averaged(report):
    assert report["base_err"] <= 1e-10, report


def test_one_all_reduce_per_base_step_and_one_per_meta_step(report):
    assert report["all_reduces_in_base_step"] == 1, report
    assert report["all_reduces_in_meta_step"] == 1, report
    assert report["all_reduces"] == 2, report  # the loop body (all K base steps) + the meta step
    assert report["other_collectives"] == 0, report


def test_replicas_stay_bit_identical(report):
    assert report["n_replicas"] == 8 and report["replicas_identical"], report


def test_the_step_runs_under_pmap_with_the_same_result(report):
    """``bilevel_step(axis_name=)`` inside ``jax.pmap`` equals the shard_map version."""
    assert report["pmap_err"] <= 1e-12 and report["pmap_replicas_err"] == 0.0, report


def test_stateful_models_average_their_state_and_exact_sync_equals_full_batch(report):
    assert report["stateful_exact_err"] <= 1e-10, report


def test_each_device_draws_its_own_randomness(report):
    assert report["rng_err"] <= 1e-10, report


def test_comm_report_every_method_needs_one_all_reduce_per_step(tmp_path):
    """`python -m experiments.comm_report`: 1 all-reduce per base step and per meta step."""
    path = tmp_path / "comm.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(WORKER.parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = _xla.flags("--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.comm_report", "--json", str(path)],
        cwd=WORKER.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(path.read_text())
    n_theta, n_lam = result["config"]["n_theta"], result["config"]["n_lambda"]
    for name in ("sama", "sama_na", "darts", "neumann", "cg", "itd", "dds", "soba"):
        r = result[name]
        assert r["base_step_allreduces"] == 1 and r["meta_step_allreduces"] == 1, (name, r)
        assert r["other_collectives"] == 0, (name, r)
        assert r["base_step_bytes"] == 4 * (n_theta + 1), (name, r)  # gradient + loss, float32
        assert r["meta_step_allreduces"] < r["naive_meta_step_allreduces"], (name, r)
    assert result["sama"]["meta_step_bytes"] < 4 * (n_lam + 8)  # λ-sized: no θ-sized buffer


def test_exact_sync_equals_single_device_full_batch(report):
    assert report["exact_meta_err"] <= 1e-10 * report["meta_scale"], report
    assert report["exact_base_err"] <= 1e-10, report
    # d, ∇_λL_m and the fresh gradient are averaged first (XLA may combine those reductions)
    assert 2 <= report["exact_meta_step_allreduces"] <= 3, report


def test_exact_sync_is_refused_for_methods_without_it_and_bad_sync_values():
    loss = lambda th, lam, b: 0.0  # noqa: E731
    with pytest.raises(ValueError, match="sync='full_batch' is implemented for SAMA-type"):
        bj.bilevel_step(
            loss,
            loss,
            optax.sgd(0.1),
            optax.sgd(0.1),
            bj.cg(3),
            sync="full_batch",
            loss_reduction="mean",
        )
    with pytest.raises(ValueError, match="sync must be"):
        bj.bilevel_step(loss, loss, optax.sgd(0.1), optax.sgd(0.1), sync="sometimes")


def test_sync_exact_is_the_deprecated_name_of_full_batch():
    loss = lambda th, lam, b: 0.0  # noqa: E731
    with pytest.warns(DeprecationWarning, match='use sync="full_batch"'):
        step = bj.bilevel_step(
            loss, loss, optax.sgd(0.1), optax.sgd(0.1), sync="exact", loss_reduction="mean"
        )
    assert step.sync == "full_batch"
    with pytest.warns(DeprecationWarning, match='use sync="full_batch"'):
        direct = bj.BilevelStep(
            base_loss=loss,
            meta_loss=loss,
            base_tx=optax.sgd(0.1),
            meta_tx=optax.sgd(0.1),
            sync="exact",
            loss_reduction="mean",
        )
    assert direct.sync == "full_batch"


def test_collective_report_splits_base_and_meta_step_reductions():
    from bilevel_jax.parallel import collective_report

    hlo = (
        "%body.1 (p: f32[4]) -> f32[4] {\n"
        "  %ar = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}\n"
        "}\n"
        "ENTRY %main (a: f32[4]) -> f32[4] {\n"
        "  %w = f32[4]{0} while(f32[4]{0} %a), condition=%cond.1, body=%body.1\n"
        "  %ar.2 = f32[4]{0} all-reduce(f32[4]{0} %w), replica_groups={}\n"
        "  %ar.3 = (f32[2]{0}, f32[]) all-reduce(f32[2]{0} %x, f32[] %y), replica_groups={}\n"
        "  %all-reduce-done.9 = f32[4]{0} copy(f32[4]{0} %ar.2)\n"
        "}\n"
    )
    r = collective_report(hlo)  # all K base steps in the loop: the rest is the meta step
    assert r["base_step_allreduces"] == 1 and r["base_step_bytes"] == 16
    assert r["meta_step_allreduces"] == 2 and r["meta_step_bytes"] == 28  # 4 + 2 + 1 floats
    assert r["all_reduces"] == 3  # "all-reduce-done" names are not counted
    r = collective_report(hlo, last_base_step_outside=True)  # %ar.2 is the last base step
    assert r["base_step_allreduces"] == 1 and r["base_step_bytes"] == 16
    assert r["meta_step_allreduces"] == 1 and r["meta_step_bytes"] == 12  # 2 floats + 1 float
    with pytest.raises(ValueError, match="K >= 2"):
        collective_report("ENTRY %main () -> f32[] {\n}\n")
    # a tuple of 6 or more operands: XLA numbers the elements from the sixth on
    six = ", ".join(["f32[3]{0}"] * 5) + ", /*index=5*/f32[10]{0}"
    wide = hlo.replace("%ar.3 = (f32[2]{0}, f32[]) all-reduce", f"%ar.3 = ({six}) all-reduce")
    r = collective_report(wide)
    assert r["meta_step_allreduces"] == 2 and r["meta_step_bytes"] == 4 * (4 + 5 * 3 + 10)


@pytest.fixture(scope="module")
def closure_report():
    worker = WORKER.parent / "_dp_closure_worker.py"
    env = dict(os.environ, XLA_FLAGS=_xla.flags("--xla_force_host_platform_device_count=2"))
    env["PYTHONPATH"] = str(WORKER.parent) + os.pathsep + str(WORKER.parents[1])
    proc = subprocess.run(
        [sys.executable, str(worker)], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


METHODS = (
    "cg",
    "cg_warm",
    "gmres",
    "gmres_restart2",
    "bicgstab",
    "exact",
    "neumann",
    "sama",
    "soba",
)


@pytest.mark.parametrize("name", METHODS)
def test_closed_over_data_every_method_equals_the_mean_of_per_shard_results(closure_report, name):
    """Issue 12 item 4: batches of indices into closed-over arrays (the README's digits
    pattern) under data_parallel; bj.cg crashed with `pvary is a invariant->variant collective`
    inside custom_linear_solve, GMRES/BiCGStab with while-loop carry types, exact with a
    tangent typed unlike θ."""
    r = closure_report["step"][name]
    assert "error" not in r, r
    assert r["err"] <= 1e-10 * r["scale"], r


@pytest.mark.parametrize("name", ("cg", "gmres", "bicgstab", "dense"))
def test_custom_root_is_differentiable_inside_shard_map_with_closed_over_data(closure_report, name):
    r = closure_report["custom_root"][name]
    assert "error" not in r, r
    assert r["err"] <= 1e-10 * r["scale"], r


@pytest.mark.parametrize("solver", ("solve_cg", "solve_gmres", "solve_bicgstab", "solve_dense"))
def test_krylov_iterations_inside_shard_map_equal_jax_scipy(solver):
    """Inside shard_map the solvers run their own loops; they compute jax.scipy's iterations
    (unconverged: maxiter 3, GMRES restart 2 on n = 5)."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from bilevel_jax import linalg

    rng = np.random.default_rng(1)
    m = rng.normal(size=(5, 5))
    a = jnp.asarray(m @ m.T + 5 * np.eye(5) if solver == "solve_cg" else m + 4 * np.eye(5))
    kw = {"solve_gmres": {"maxiter": 1, "restart": 2}, "solve_dense": {}}.get(
        solver, {"maxiter": 3}
    )
    solve = functools.partial(getattr(linalg, solver), **kw)
    b = {"u": jnp.asarray(rng.normal(size=3)), "v": jnp.asarray(rng.normal(size=2))}

    def matvec(t):
        y = a @ jnp.concatenate([t["u"], t["v"]])
        return {"u": y[:3], "v": y[3:]}

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    inside = jax.jit(
        jax.shard_map(lambda b: solve(matvec, b), mesh=mesh, in_specs=P(), out_specs=P())
    )
    outside = jax.jit(lambda b: solve(matvec, b))
    got, ref = inside(b), outside(b)
    for k in b:
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6)
    full = jnp.linalg.solve(a, jnp.concatenate([b["u"], b["v"]]))
    if solver != "solve_dense":  # the iterations are truncated: not yet the solution
        assert float(jnp.max(jnp.abs(jnp.concatenate([ref["u"], ref["v"]]) - full))) > 1e-4


def test_full_batch_sync_needs_the_losses_declared_as_batch_means():
    """Issue 12 item 4: sync="full_batch" was silently off by 0.14 for a Σwℓ/Σw loss (the
    mean of per-shard ratios is not the full-batch ratio); it now needs loss_reduction="mean"."""
    loss = lambda th, lam, b: 0.0  # noqa: E731
    for spelling in ("full_batch", "exact"):
        with (
            pytest.raises(ValueError, match="declare it with loss_reduction='mean'"),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", DeprecationWarning)
            bj.bilevel_step(loss, loss, optax.sgd(0.1), optax.sgd(0.1), sync=spelling)
    with pytest.raises(ValueError, match="loss_reduction must be None or 'mean'"):
        bj.bilevel_step(loss, loss, optax.sgd(0.1), optax.sgd(0.1), loss_reduction="sum")
    step = bj.bilevel_step(
        loss, loss, optax.sgd(0.1), optax.sgd(0.1), sync="full_batch", loss_reduction="mean"
    )
    assert step.sync == "full_batch" and step.loss_reduction == "mean"


def test_full_batch_sync_is_exact_for_mean_losses_and_not_for_a_ratio(closure_report):
    """Why the declaration: with a mean loss the data-parallel step equals the single-device
    full-batch one; with Σwℓ/Σw (declared as a mean, wrongly) it does not."""
    r = closure_report["full_batch"]
    assert r["mean_err"] <= 1e-10 * r["scale"], r
    assert r["ratio_err"] > 1e-3 * r["scale"], r
