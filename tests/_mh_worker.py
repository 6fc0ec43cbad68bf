"""Worker for tests/test_multihost.py: one data-parallel bilevel run on 8 CPU devices.

    python tests/_mh_worker.py multi     # one of 2 processes × 4 devices (via launch_local)
    python tests/_mh_worker.py single    # 1 process × 8 devices
    python tests/_mh_worker.py absent    # process 1 never joins: process 0 must fail

Both runs build the same global batches (process i loads rows ``process_rows(...)`` only),
take STEPS bilevel steps of SAMA in float64 and print one JSON line with the final
parameters, the metrics and the all-reduce counts of the compiled step.
"""

import json
import os
import sys
import time

import jax

MODE = sys.argv[1]
if MODE == "absent" and int(os.environ["BILEVEL_JAX_PROCESS_ID"]) == 1:
    time.sleep(600)  # the peer that never arrives
from bilevel_jax import distributed as dist  # noqa: E402

if MODE in ("multi", "absent"):
    dist.initialize(cpu_devices=4)
else:
    jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
import optax  # noqa: E402
from _dp_problem import base_loss, meta_loss  # noqa: E402

import bilevel_jax as bj  # noqa: E402
from bilevel_jax.parallel import collective_report, data_parallel  # noqa: E402

STEPS, K, B, F, NM = 4, 3, 32, 5, 16


def main():
    assert jax.device_count() == 8, jax.devices()
    mesh = dist.global_mesh("data")
    rng = np.random.RandomState(0)  # every process draws the same global data
    xs, ys = rng.randn(STEPS, K, B, F), rng.randn(STEPS, K, B)
    mx, my = rng.randn(STEPS, NM, F), rng.randn(STEPS, NM)
    rows, mrows = dist.process_rows(B), dist.process_rows(NM)

    step = bj.bilevel_step(
        base_loss,
        meta_loss,
        optax.adam(1e-2),
        optax.adam(1e-2),
        bj.sama(0.1, adapt_from="last", step_along_v=True),
    )
    state = dist.replicate(
        step.init({"w": rng.randn(F) * 0.3}, {"a": np.zeros(F), "c": np.full(F, 0.01)}), mesh
    )
    dp = jax.jit(data_parallel(step, mesh))
    metrics = []
    for t in range(STEPS):
        base = dist.global_batch((xs[t][:, rows], ys[t][:, rows]), mesh, batch_axis=1)
        meta = dist.global_batch((mx[t][mrows], my[t][mrows]), mesh)
        if t == 0:
            hlo = dp.lower(state, base, meta).compile().as_text()
            assert hlo is not None
            report = collective_report(hlo)
        state, m = dp(state, base, meta)
        metrics.append({k: float(v) for k, v in dist.to_host(m).items()})
    host = dist.to_host((state.base_params, state.meta_params))
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "processes": jax.process_count(),
                "theta": host[0]["w"].tolist(),
                "lam": {k: v.tolist() for k, v in host[1].items()},
                "metrics": metrics,
                "all_reduces_in_base_step": report["base_step_allreduces"],
                "all_reduces_in_meta_step": report["meta_step_allreduces"],
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
