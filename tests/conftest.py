"""Shared fixtures: float64 on demand (scoped, so other tests keep float32); the suite's XLA
flags (``tests/_xla.py``: LLVM's cheap pipeline, set before JAX starts its backend)."""

import os

from tests import _xla

os.environ["XLA_FLAGS"] = _xla.flags(*os.environ.get("XLA_FLAGS", "").split())

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield


# Helper modules (subprocess workers, shared problems) are not test modules; keep
# --doctest-modules from importing them (a worker configures devices at import).
collect_ignore_glob = ["_*.py"]
