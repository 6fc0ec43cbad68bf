"""The XLA flags of the test suite: compile with LLVM's cheap pipeline.

Most of the suite's time is XLA compiling small programs, and most of that is LLVM optimising the
CPU machine code. ``--xla_backend_optimization_level=0`` and
``--xla_llvm_disable_expensive_passes=true`` skip that part only: the HLO passes (fusion, buffer
assignment, the all-reduce combiner) run as usual, so compiled memory, FLOPs and the collectives
in the HLO are what users get, and only the machine code is slower. Measured on
``tests/test_forward_mode.py tests/test_logra.py`` (one process, 2 cores): 66 s by default, 48 s
with these flags (45.8 s with ``jax_disable_most_optimizations``, which also drops HLO passes).

``BILEVEL_JAX_TEST_FULL_OPT=1`` runs the suite with XLA's defaults.
"""

import os

FAST = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def enabled() -> bool:
    """Whether the suite compiles with :data:`FAST` (not ``BILEVEL_JAX_TEST_FULL_OPT=1``)."""
    return os.environ.get("BILEVEL_JAX_TEST_FULL_OPT") != "1"


def flags(*extra: str) -> str:
    """``XLA_FLAGS`` for a test process: ``extra`` plus :data:`FAST` (when enabled), once each."""
    out = list(extra)
    for f in FAST if enabled() else ():
        if f not in out:
            out.append(f)
    return " ".join(out)
