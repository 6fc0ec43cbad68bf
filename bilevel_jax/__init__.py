"""bilevel_jax: gradient-based bilevel optimization (meta learning) for JAX and optax.

The headline method is SAMA (Choe et al., "Making Scalable Meta Learning
Practical", NeurIPS 2023): first-order meta-gradients adapted to the base
optax optimizer through an analytic adaptation matrix.

The namespace, one name per thing:

- method factories, lower case (``sama``, ``sama_na``, ``darts``, ``darts_second_order``,
  ``neumann``, ``cg``, ``exact``, ``itd``, ``dds``, ``soba``, and the data-selection baseline
  ``domain_classifier``), each returning a method object (a frozen dataclass whose ``repr``
  reads like its constructor call); the method classes live in :mod:`bilevel_jax.hypergrad`
  (``SAMA``, the headline method's type, and ``DomainClassifier`` are also here);
- the functional form of one SAMA meta step, ``sama_hypergrad`` (losses and arrays in, a
  :class:`Hypergrad` out; what ``sama().hypergrad`` calls), for use without a method object;
- the training loop (``bilevel_step``, ``BilevelStep``, ``BilevelState``, ``fit``,
  ``base_step``), the optax-style ``meta_grad`` transform, implicit differentiation of any
  solver (``custom_root``, ``custom_fixed_point``) and the adaptation rules (``adapt``,
  ``describe``);
- submodules: ``hypergrad``, ``adaptation``, ``implicit_diff``, ``linalg``, ``parallel``,
  ``distributed``, ``selection`` (online data selection), ``influence`` (data influence as
  hypergradients), ``multilevel`` (graphs of more than two problems, Betty's generalised meta
  learning), ``nnx`` (Flax NNX helpers) and
  ``checkpoint`` (orbax; imported on first use, so ``import bilevel_jax`` does not import orbax).

Example:
  >>> import bilevel_jax as bj
  >>> bj.sama(0.1)
  SAMA(alpha=0.1, adapt=True, adapt_from='fresh', difference='sequential', step_along_v=False, axis_name=None, name='sama')
  >>> bj.cg(5).name, bj.neumann(5).name
  ('cg', 'neumann')
"""

import importlib as _importlib
import warnings as _warnings

from bilevel_jax import (
    adaptation,
    distributed,
    hypergrad,
    implicit_diff,
    influence,
    linalg,
    multilevel,
    nnx,
    parallel,
    selection,
)
from bilevel_jax._checks import BilevelInputError
from bilevel_jax._nonfinite import nonfinite_errors
from bilevel_jax.adaptation import AdaptationError, UnsupportedTransformError, adapt, describe
from bilevel_jax.base_step import BaseStepResult, base_step
from bilevel_jax.fit import fit
from bilevel_jax.hypergrad import (
    SAMA,
    BilevelInputs,
    BilevelProblem,
    DomainClassifier,
    Hypergrad,
    HypergradMethod,
    cg,
    darts,
    darts_second_order,
    dds,
    domain_classifier,
    exact,
    itd,
    neumann,
    sama,
    sama_hypergrad,
    sama_na,
    set_hyperparams,
    soba,
)
from bilevel_jax.implicit_diff import custom_fixed_point, custom_root
from bilevel_jax.loop import (
    BilevelState,
    BilevelStep,
    TooManySkipsError,
    bilevel_step,
    check_skips,
    init_bilevel_state,
)
from bilevel_jax.selection import Selection
from bilevel_jax.transform import MetaGradState, meta_grad

__version__ = "0.1.0"

_LAZY = ("checkpoint",)  # imported on first attribute access (orbax is slow to import)


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"bilevel_jax.{name}")
    if name == "nnx_utils":
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore", DeprecationWarning)  # warned once, here
            module = _importlib.import_module("bilevel_jax.nnx_utils")
        globals().pop("nnx_utils", None)  # set by the import; keep warning on every access
        _warnings.warn(
            "bilevel_jax.nnx_utils is deprecated; use bilevel_jax.nnx (bj.nnx)",
            DeprecationWarning,
            stacklevel=2,
        )
        return module
    raise AttributeError(f"module 'bilevel_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AdaptationError",
    "BaseStepResult",
    "BilevelInputError",
    "BilevelInputs",
    "BilevelProblem",
    "BilevelState",
    "BilevelStep",
    "DomainClassifier",
    "Hypergrad",
    "HypergradMethod",
    "MetaGradState",
    "SAMA",
    "Selection",
    "TooManySkipsError",
    "UnsupportedTransformError",
    "adapt",
    "adaptation",
    "base_step",
    "bilevel_step",
    "check_skips",
    "cg",
    "custom_fixed_point",
    "custom_root",
    "darts",
    "darts_second_order",
    "dds",
    "describe",
    "distributed",
    "domain_classifier",
    "exact",
    "fit",
    "hypergrad",
    "implicit_diff",
    "init_bilevel_state",
    "itd",
    "influence",
    "linalg",
    "meta_grad",
    "multilevel",
    "neumann",
    "nonfinite_errors",
    "parallel",
    "nnx",
    "sama",
    "sama_hypergrad",
    "sama_na",
    "selection",
    "set_hyperparams",
    "soba",
]
