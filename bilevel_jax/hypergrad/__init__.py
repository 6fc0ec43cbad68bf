"""Hypergradient methods behind one interface (see :mod:`bilevel_jax.hypergrad.base`).

=======================  ===================================================  ======================
method                   hypergradient                                         state across steps
=======================  ===================================================  ======================
``sama()``               first-order, adapted to the optimizer (Choe 2023)    none
``sama_na()``            SAMA without adaptation                              none
``darts()``              SAMA-NA with α = 0.01 (T1–T2, Betty's ``darts``)      none
``darts_second_order``   DARTS virtual step (Liu et al. 2019)                  none
``neumann(maxiter,η)``   implicit, Neumann series (Lorraine et al. 2020)      none
``cg(maxiter)``          implicit, conjugate gradient                          optional warm start
``exact()``              implicit, dense Hessian + direct solve                none
``itd(unroll)``          reverse mode through K optax steps                    none
``dds()``                reverse mode through one optax step                   none
``dds(0.0)``             gradient alignment, −∇_λ⟨∇_θL_m, ∇_θL_b⟩ (+ ∇_λL_m)   none
``soba(rho)``            single-loop z ≈ −H⁻¹d (Dagréou et al. 2022)            z, count
``soba(z_tx=...)``       SOBA with an optax step on z (Adam: Grangier 2023)    z, count, z_tx state
``domain_classifier``    baseline, not a hypergradient: ∇_λ of a logistic      none
                         generic-vs-target scorer loss (Grangier 2023)
=======================  ===================================================  ======================

SOBA's options ``hvp_loss`` (the Hessian of another loss, e.g. the unweighted one) and
``fused=True`` (Hz and the cross term from one vjp) are described in
:mod:`bilevel_jax.hypergrad.soba`; ``dds(0.0)``'s scale in :mod:`bilevel_jax.hypergrad.unrolled`.
"""

from bilevel_jax.hypergrad.base import (
    BilevelInputs,
    BilevelProblem,
    Hypergrad,
    HypergradMethod,
)
from bilevel_jax.hypergrad.classifier import DomainClassifier, domain_classifier
from bilevel_jax.hypergrad.darts import DartsSecondOrder, darts, darts_second_order
from bilevel_jax.hypergrad.implicit import Implicit, ImplicitState, cg, exact, neumann
from bilevel_jax.hypergrad.sama import SAMA, sama, sama_hypergrad, sama_na
from bilevel_jax.hypergrad.soba import SOBA, SobaState, soba
from bilevel_jax.hypergrad.unrolled import Unrolled, dds, itd, set_hyperparams

__all__ = [
    "BilevelInputs",
    "BilevelProblem",
    "DartsSecondOrder",
    "DomainClassifier",
    "Hypergrad",
    "HypergradMethod",
    "Implicit",
    "ImplicitState",
    "SAMA",
    "SOBA",
    "SobaState",
    "Unrolled",
    "cg",
    "darts",
    "darts_second_order",
    "dds",
    "domain_classifier",
    "exact",
    "itd",
    "neumann",
    "sama",
    "sama_hypergrad",
    "sama_na",
    "set_hyperparams",
    "soba",
]
