"""The XLA flags of the test suite: compile fusions with XLA's classic emitter and LLVM's cheap
pipeline.

Most of the suite's time is XLA compiling small programs, and most of that is generating the CPU
machine code of the fused kernels. ``--xla_backend_optimization_level=0`` and
``--xla_llvm_disable_expensive_passes=true`` skip LLVM's expensive optimisations, and
``--xla_cpu_use_fusion_emitters=false`` emits each fusion with XLA's classic (elemental) IR
emitter instead of the MLIR fusion emitters, which take longer to compile small kernels. Only
code generation changes: the HLO passes (fusion decisions, buffer assignment, the all-reduce
combiner) run as usual, so compiled memory, FLOPs and the collectives in the HLO are what users
get, and only the machine code differs. Measured (one process, 2 cores):

* ``tests/test_forward_mode.py tests/test_logra.py``: 66 s with XLA's defaults, 48 s with the two
  LLVM flags (45.8 s with ``jax_disable_most_optimizations``, which also drops HLO passes);
* ``tests/test_adaptation.py tests/test_family.py tests/test_rewind.py
  tests/test_implicit_diff.py`` (250 tests): 127 s with the two LLVM flags, 85 s (twice) with
  the classic fusion emitter added.

``BILEVEL_JAX_TEST_FULL_OPT=1`` runs the suite with XLA's defaults.
"""

import os

FAST = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false",
)


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
