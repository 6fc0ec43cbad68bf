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


# The suite runs on two xdist workers, one file at a time each (scripts/test.sh: --dist loadfile
# --no-loadscope-reorder). Files are handed out in collection order, so the longest ones go
# first and the short ones fill in at the end: otherwise a long file handed out last keeps one
# worker busy while the other idles. Measured with `bash scripts/test.sh --durations=0` on 2
# cores (seconds per file, summed over its tests); the order only affects balance, not results.
SLOW_FIRST = (
    "test_data_selection.py",  # 102 s
    "test_noisy_labels.py",  # 117 s before its CNN setting was cut to four methods
    "test_readme.py",  # 73 s
    "test_scaling.py",  # 69 s
    "test_pruning.py",  # 63 s
    "test_parallel.py",  # 57 s
    "test_multihost.py",  # 45 s
    "test_wrappers.py",  # 41 s
    "test_packaging.py",  # 38 s
    "test_selection.py",  # 35 s
    "test_fit.py",  # 29 s
    "test_benchmark.py",  # 27 s
    "test_weight_decay.py",  # 27 s
    "test_checkpoint.py",  # 26 s
    "test_influence_study.py",  # 26 s
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: else as is
