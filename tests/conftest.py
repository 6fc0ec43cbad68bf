"""Shared fixtures: float64 on demand (scoped, so other tests keep float32)."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def fast_compile():
    """Skip XLA's expensive optimisation passes for the test body: a study's in-process smoke
    run (compile-bound, checked for what it records, not for its speed or memory), or a
    compile-bound comparison of two computations whose agreement does not depend on XLA's
    optimisations (the LTR weights against a per-example loop: 28 s → 9 s)."""
    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", old)


# Helper modules (subprocess workers, shared problems) are not test modules; keep
# --doctest-modules from importing them (a worker configures devices at import).
collect_ignore_glob = ["_*.py"]
