r"""Multilevel optimisation: Betty's generalised meta learning as one pure, jit-compiled step.

A *multilevel problem* is a graph of optimisation problems (Choe et al., "Betty: An
Automatic Differentiation Library for Multilevel Optimization", ICLR 2023). Each
:class:`Problem` has parameters θ_p, a pure loss ``f_p(θ_p, reads, batch)``, an optax
transform, the names it reads, an unroll count and a best-response method. The list is
ordered **lowest level first**, and the order alone decides the edge types:

- ``p`` reads an earlier problem ``q``: ``reads[q]`` is q's *best response*
  ``θ_q* = argmin f_q``; p's hypergradient flows through it (Betty's ``l2u``: q → p);
- ``p`` reads a later problem ``u``: ``reads[u]`` is u's *current parameters*, a constant for
  p's own steps (Betty's ``u2l``: u → p).

**Schedule.** ``level(p) = 0`` if p reads no best response, else 1 + the highest level it
reads; the top level's problems step once per call, and level k below runs its ``unroll``
steps per step of level k + 1 — a static nested ``lax.scan`` (Betty's schedule: a problem
steps after the problems it reads have taken their unroll steps). Problems of one level
step together from the same state. Every step is :func:`bilevel_jax.base_step`, skipped
(parameters and optimizer state bit-identical, counted in ``state.skipped[name]``) when its
loss or gradient is not finite.

**Gradients.** A problem that no lower problem reads trains on its own loss (the other
problems' parameters constant). A problem u with dependency paths (:meth:`MultilevelStep.paths`)
descends the total derivative of ``F_u(θ_u) = f_u(θ_u, reads)`` with the best responses on
its paths substituted,

    dF_u/dθ_u = ∂f_u/∂θ_u + Σ_{paths (u, y_k, …, y_1, L, u)}
                ∂f_u/∂θ_{y_k} · dθ_{y_k}*/dθ_{y_{k−1}} ··· dθ_{y_1}*/dθ_L · dθ_L*/dθ_u,

computed by **one reverse sweep** that visits each node on the paths once (cost linear in
the edges, not in the paths; Betty walks each path): at node p the method of p gives the
VJP of p's best response with respect to all of p's varying reads in one call, as the
hypergradient of the linear meta loss ``⟨θ_p, c_p⟩`` (c_p: the cotangent accumulated from
above) with f_p as the base loss. Any method of the library serves (``exact``, ``cg``,
``neumann``, ``sama``, ``sama_na``, ``darts``…). :meth:`MultilevelStep.oracle_grad` gives the
exact gradient from the nested-``custom_root`` objective, for tests and small problems.

**Nested middle levels.** A problem with its own paths whose best response another sweep
differentiates is a genuinely nested level (its optimality condition contains its
hypergradient); ``nested="refuse"`` (default) raises, ``nested="betty"`` uses Betty's
direct-cost semantics with a warning (see :func:`multilevel_step`).

Example (a trilevel chain: ``low`` reads ``top``; ``mid`` reads low's best response; ``top``
reads both):

  >>> import jax, jax.numpy as jnp, optax, bilevel_jax as bj
  >>> from bilevel_jax.multilevel import Problem, multilevel_step
  >>> low = Problem("low", lambda t, r, b: jnp.sum((t - r["top"]) ** 2), optax.sgd(0.4),
  ...               reads=("top",), unroll=4, method=bj.exact())
  >>> mid = Problem("mid", lambda t, r, b: jnp.sum((t - 2 * r["low"]) ** 2), optax.sgd(0.4),
  ...               reads=("low",), unroll=2, method=bj.cg(5))
  >>> top = Problem("top", lambda t, r, b: jnp.sum((r["mid"] - 1.0) ** 2 + r["low"] ** 2),
  ...               optax.sgd(0.05), reads=("mid", "low"))
  >>> step = multilevel_step([low, mid, top])
  >>> step.levels, step.paths("top")
  ({'low': 0, 'mid': 1, 'top': 2}, [('top', 'mid', 'low', 'top'), ('top', 'low', 'top')])
  >>> step.batch_axes("low"), step.batch_axes("mid")
  ((2, 4), (2,))
  >>> state = step.init({"low": jnp.zeros(2), "mid": jnp.zeros(2), "top": jnp.ones(2)})
  >>> batches = {"low": jnp.zeros((2, 4)), "mid": jnp.zeros(2), "top": jnp.zeros(())}
  >>> state, metrics = jax.jit(step, donate_argnums=0)(state, batches)
  >>> int(state.steps["low"]), int(state.steps["mid"]), int(state.steps["top"])
  (8, 2, 1)
"""

from bilevel_jax.multilevel._graph import Problem
from bilevel_jax.multilevel._step import MultilevelState, MultilevelStep, multilevel_step

__all__ = ["MultilevelState", "MultilevelStep", "Problem", "multilevel_step"]
