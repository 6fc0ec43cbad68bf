"""Hypergradient methods behind one interface (see :mod:`bilevel_jax.hypergrad.base`)."""

from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    HypergradMethod,
)
from bilevel_jax.hypergrad.sama import SAMA, sama, sama_hypergrad, sama_na

__all__ = [
    "BilevelInputs",
    "BilevelProblem",
    "Hypergrad",
    "HypergradMethod",
    "SAMA",
    "sama",
    "sama_hypergrad",
    "sama_na",
]
