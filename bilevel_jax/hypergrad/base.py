"""The interface shared by every hypergradient method.

A *problem* is the pair of losses and the base optimizer:

    base_loss(base_params, meta_params, batch) -> scalar      L_b(θ, λ; B)
    meta_loss(base_params, meta_params, batch) -> scalar      L_m(θ, λ; B')

A *method* (SAMA, SAMA-NA, …) is a frozen dataclass with optax-style
``init(base_params, meta_params) -> state`` and
``hypergrad(problem, inputs, state) -> (Hypergrad, state)``; both are pure and
jit-able, and any state a method keeps across meta steps is explicit.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Loss = Callable[[PyTree, PyTree, PyTree], jax.Array]


@dataclasses.dataclass(frozen=True)
class BilevelProblem:
    """The static part of a bilevel problem: both losses and the base optimizer.

    Attributes:
      base_loss: ``L_b(θ, λ, batch) -> scalar``, the training loss shaped by λ.
      meta_loss: ``L_m(θ, λ, batch) -> scalar``, the clean/target objective.
      base_tx: the optax transform that trains θ on ``base_loss``.
    """

    base_loss: Loss
    meta_loss: Loss
    base_tx: optax.GradientTransformation


class BilevelInputs(NamedTuple):
    """The dynamic inputs of one meta step.

    Attributes:
      base_params: θ, the current base parameters.
      meta_params: λ, the meta parameters.
      base_opt_state: the base optimizer state at θ.
      base_batch: the base batch B of the last base step (used by finite differences).
      meta_batch: the meta batch B'.
      last_grad: optional gradient of the last base step (SAMA ``adapt_from="last"``).
      last_opt_state: optional base optimizer state before the last base step.
    """

    base_params: PyTree
    meta_params: PyTree
    base_opt_state: optax.OptState
    base_batch: PyTree
    meta_batch: PyTree
    last_grad: PyTree | None = None
    last_opt_state: optax.OptState | None = None


class Hypergrad(NamedTuple):
    """What a method returns for one meta step.

    Attributes:
      meta_grad: the estimate of dL_m(θ*(λ), λ)/dλ, a pytree like λ.
      base_update: an update for θ (SAMA's base step along v, ``-εv``), or None.
      meta_loss: L_m at the current θ on the meta batch.
      finite: True when ``meta_grad`` (and ``base_update``) hold no NaN/inf.
      info: method diagnostics (for SAMA: ``eps`` and ``v_norm``).
    """

    meta_grad: PyTree
    base_update: PyTree | None
    meta_loss: jax.Array
    finite: jax.Array
    info: dict


class HypergradMethod(Protocol):
    """A hypergradient method; see the module docstring."""

    name: str

    def init(self, base_params: PyTree, meta_params: PyTree) -> PyTree: ...

    def hypergrad(
        self, problem: BilevelProblem, inputs: BilevelInputs, state: PyTree
    ) -> tuple[Hypergrad, PyTree]: ...


def all_finite(*trees: PyTree) -> jax.Array:
    """True when every floating leaf of every tree is finite (None trees are skipped)."""
    leaves = [x for t in trees if t is not None for x in jax.tree.leaves(t)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
