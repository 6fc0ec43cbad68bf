"""Run ``python -m <module> ...`` from the repository root in a subprocess (fresh JAX state)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(
    module: str, *args: str, timeout: float = 300, fast_compile: bool = False
) -> subprocess.CompletedProcess:
    """Run the module with this interpreter; fail with its stderr tail if it exits non-zero.

    ``fast_compile``: skip XLA's expensive optimisation passes (``jax_disable_most_optimizations``)
    — for smoke runs, which check that a study runs and records what it must, not its speed or
    memory; compilation dominates them (see :func:`tests._quick.run_study`)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if fast_compile:
        env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc
