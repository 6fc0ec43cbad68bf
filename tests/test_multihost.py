"""Multi-host data parallelism: 2 local processes on loopback (4 fake CPU devices each) against
1 process with 8, a peer that never arrives, and the helpers' argument checks.

The runs happen in subprocesses (tests/_mh_worker.py) under timeouts: a multi-process JAX run
cannot share this test process, and a missing peer aborts its processes."""

import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax import distributed as dist
from tests import _xla

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "_mh_worker.py")
ENV = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _last_json(text):
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs():
    env = dict(os.environ, **ENV)
    env["XLA_FLAGS"] = _xla.flags()  # the suite's compile flags, no fake devices
    multi = [_last_json(o) for o in dist.launch_local([WORKER, "multi"], 2, timeout_s=240, env=ENV)]
    single = subprocess.run(
        [sys.executable, WORKER, "single"], env=env, capture_output=True, text=True, timeout=240
    )
    assert single.returncode == 0, single.stderr[-3000:]
    return multi, _last_json(single.stdout)


def _flat(r):
    return np.concatenate([r["theta"], r["lam"]["a"], r["lam"]["c"]])


def test_two_processes_equal_one_process_with_eight_devices(runs):
    multi, single = runs
    assert [r["process"] for r in multi] == [0, 1] and multi[0]["processes"] == 2
    assert single["processes"] == 1
    # float64; the cross-process (gloo) and in-process all-reduces may sum in other orders
    np.testing.assert_allclose(_flat(multi[0]), _flat(single), rtol=0, atol=1e-12)
    for a, b in zip(multi[0]["metrics"], single["metrics"]):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], rtol=1e-6)
    # the run moved λ (a test that a no-op cannot pass)
    assert np.max(np.abs(single["lam"]["a"])) > 1e-3


def test_both_processes_hold_identical_replicas(runs):
    multi, _ = runs
    assert multi[0]["theta"] == multi[1]["theta"] and multi[0]["lam"] == multi[1]["lam"]


def test_one_all_reduce_per_base_step_and_per_meta_step_across_processes(runs):
    multi, _ = runs
    for r in multi:
        assert r["all_reduces_in_base_step"] == 1 and r["all_reduces_in_meta_step"] == 1, r


def test_a_peer_that_never_arrives_fails_with_a_clear_error_within_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(dist.DistributedLaunchError) as err:
        dist.launch_local([WORKER, "absent"], 2, timeout_s=120, init_timeout_s=5, env=ENV)
    elapsed = time.monotonic() - t0
    message = str(err.value)
    assert "process 0 of 2" in message and "SIGABRT" in message, message
    assert "never registered" in message and "within 5 s" in message, message
    assert elapsed < 60, elapsed  # 5 s registration timeout + start-up, not the 120 s limit


def test_the_launcher_kills_a_run_that_exceeds_its_time_limit():
    t0 = time.monotonic()
    with pytest.raises(
        dist.DistributedLaunchError, match=r"did not finish within 2 s; processes \[0, 1\]"
    ):
        dist.launch_local(["-c", "import time; time.sleep(60)"], 2, timeout_s=2)
    assert time.monotonic() - t0 < 20


def test_the_launcher_names_a_failing_process_and_stops_the_others():
    code = (
        "import os, sys, time\n"
        "if os.environ['BILEVEL_JAX_PROCESS_ID'] == '1':\n"
        "    sys.exit('bad shard')\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    with pytest.raises(
        dist.DistributedLaunchError, match=r"process 1 of 2 exited with status 1(.|\n)*bad shard"
    ):
        dist.launch_local(["-c", code], 2, timeout_s=50)
    assert time.monotonic() - t0 < 20


def test_the_launcher_returns_every_process_output_in_rank_order():
    code = "import os; print('rank', os.environ['BILEVEL_JAX_PROCESS_ID'], os.environ['BILEVEL_JAX_NUM_PROCESSES'])"
    outs = dist.launch_local(["-c", code], 3, timeout_s=60)
    assert [o.strip() for o in outs] == ["rank 0 3", "rank 1 3", "rank 2 3"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coordinator_address="127.0.0.1:1234", num_processes=2), "give all of"),
        (dict(coordinator_address="localhost", num_processes=2, process_id=0), "host:port"),
        (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2), "process_id <"),
        (
            dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=0, timeout_s=0),
            "timeout_s",
        ),
    ],
)
def test_initialize_rejects_bad_arguments_before_touching_jax(kwargs, match, monkeypatch):
    for name in (dist.ENV_COORDINATOR, dist.ENV_NUM_PROCESSES, dist.ENV_PROCESS_ID):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match=match):
        dist.initialize(**kwargs)


def test_initialize_after_a_jax_computation_says_it_must_come_first():
    jnp.ones(1).block_until_ready()
    with pytest.raises(RuntimeError, match="before"):
        dist.initialize("127.0.0.1:1234", 2, 0, cpu_devices=2)


def test_single_process_helpers_place_and_read_back_batches():
    mesh = dist.global_mesh("data")
    n = jax.device_count()
    x = np.arange(3 * 2 * n * 2, dtype=np.float32).reshape(3, 2 * n, 2)
    g = dist.global_batch({"x": x}, mesh, batch_axis=1)["x"]
    assert g.shape == x.shape and g.sharding.spec == jax.sharding.PartitionSpec(None, "data")
    np.testing.assert_array_equal(np.asarray(g), x)
    assert dist.process_rows(4 * n) == slice(0, 4 * n)
    r = dist.replicate({"w": np.ones(3)}, mesh)
    np.testing.assert_array_equal(dist.to_host(r)["w"], np.ones(3))
    with pytest.raises(ValueError, match="positive integer"):
        dist.process_rows(0)
    if n > 1:
        with pytest.raises(ValueError, match="not divisible"):
            dist.process_rows(4 * n + 1)
    with pytest.raises(ValueError, match="no axis 1"):
        dist.global_batch(np.ones(4), mesh, batch_axis=1)


def test_the_multihost_example_runs_on_two_processes(tmp_path):
    out = tmp_path / "mh.json"
    env = dict(os.environ, **ENV)
    env["XLA_FLAGS"] = _xla.flags()  # the suite's compile flags, no fake devices
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.multihost_demo", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "parameters identical on every process: True" in proc.stdout
    result = json.loads(out.read_text())
    reports = result["reports"]
    assert result["parameters_identical"] and result["quick"] is True
    assert result["provenance"]["device"]["count"] == 8 and result["provenance"]["data_files"]
    assert [r["process"] for r in reports] == [0, 1]
    assert all(r["devices"] == 8 and r["base_steps"] == 20 and r["skipped"] == 0 for r in reports)
    assert 0.1 < reports[0]["test_acc"] <= 1.0 and np.isfinite(reports[0]["meta_loss"])
