"""Shared fixtures: float64 on demand (scoped, so other tests keep float32)."""

import jax
import pytest


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


# Helper modules (subprocess workers, shared problems) are not test modules; keep
# --doctest-modules from importing them (a worker configures devices at import).
collect_ignore_glob = ["_*.py"]
