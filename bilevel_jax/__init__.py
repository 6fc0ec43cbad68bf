"""bilevel_jax: gradient-based bilevel optimization (meta learning) for JAX and optax.

The headline method is SAMA (Choe et al., "Making Scalable Meta Learning
Practical", NeurIPS 2023): first-order meta-gradients adapted to the base
optax optimizer through an analytic adaptation matrix.
"""

from bilevel_jax import adaptation, distributed, implicit_diff, linalg, nnx_utils, parallel
from bilevel_jax._checks import BilevelInputError
from bilevel_jax.adaptation import AdaptationError, UnsupportedTransformError, adapt, describe
from bilevel_jax.base_step import BaseStepResult, base_step
from bilevel_jax.fit import fit
from bilevel_jax.hypergrad import (
    SAMA,
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    HypergradMethod,
    cg,
    darts,
    darts_second_order,
    dds,
    exact,
    itd,
    neumann,
    sama,
    sama_hypergrad,
    sama_na,
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
from bilevel_jax.transform import MetaGradState, meta_grad

__version__ = "0.1.0"

__all__ = [
    "AdaptationError",
    "BaseStepResult",
    "BilevelInputError",
    "BilevelInputs",
    "BilevelProblem",
    "BilevelState",
    "BilevelStep",
    "Hypergrad",
    "HypergradMethod",
    "MetaGradState",
    "SAMA",
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
    "exact",
    "fit",
    "implicit_diff",
    "init_bilevel_state",
    "itd",
    "linalg",
    "meta_grad",
    "neumann",
    "parallel",
    "nnx_utils",
    "sama",
    "sama_hypergrad",
    "sama_na",
    "soba",
]
