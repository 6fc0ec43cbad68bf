r"""Gradients of a problem in the graph: the reverse sweep and the exact nested oracle.

For a problem ``u`` with parameters ``θ_u``, every problem ``p`` on one of its dependency
paths has a best response ``θ_p*`` that depends on ``θ_u``. The total derivative of
``F_u(θ_u) = f_u(θ_u, reads)`` (best responses substituted) is

    dF_u/dθ_u = ∂f_u/∂θ_u + Σ_{paths}  ∂f_u/∂θ_{y_k} · dθ_{y_k}*/dθ_{y_{k−1}} ··· dθ_L*/dθ_u.

The **sweep** computes it in one reverse pass: cotangents ``c_p`` start as ``∂f_u/∂θ_p`` for
the best responses ``u`` reads; the nodes are visited in decreasing list order (a reverse
topological order), each once; at ``p`` its method computes, in one call, the VJP
``c_pᵀ dθ_p*/dr`` with respect to all of ``p``'s reads ``r`` that depend on ``θ_u`` (as the
hypergradient of the linear meta loss ``⟨θ_p, c_p⟩`` with ``p``'s loss as the base loss), and
adds it to the cotangents of the lower reads and, for ``r = u``, to the gradient. The cost is
one edge VJP per node on the paths, however many paths pass through it (Betty walks each
path separately).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax import linalg
from bilevel_jax.hypergrad.base import BilevelInputs, BilevelProblem, all_finite
from bilevel_jax.implicit_diff import custom_root
from bilevel_jax.multilevel._graph import Graph

PyTree = Any


def _add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def _linear_loss(c: PyTree):
    """``⟨θ, c⟩``: the meta loss whose hypergradient is the VJP ``cᵀ dθ*/dλ``."""

    def loss(theta, lam, batch):
        del lam, batch
        terms = [jnp.vdot(t, ci) for t, ci in zip(jax.tree.leaves(theta), jax.tree.leaves(c))]
        return functools.reduce(jnp.add, terms)

    return loss


def _edge_loss(loss, const: dict):
    """The edge's base loss ``L(θ, λ, batch)``: the problem's loss with λ its varying reads."""
    return lambda theta, lam, batch: loss(theta, {**const, **lam}, batch)


def edge_vjp(graph: Graph, u: str, p: str, c: PyTree, params, opt_states, state, batch):
    """One edge: ``(c_pᵀ dθ_p*/dr for r in diff_reads, new method state, finite)``."""
    prob = graph.problems[p]
    diff = graph.diff_reads[u][p]
    const = {q: params[q] for q in prob.reads if q not in diff}
    problem = BilevelProblem(_edge_loss(prob.loss, const), _linear_loss(c), prob.tx)
    inputs = BilevelInputs(params[p], {q: params[q] for q in diff}, opt_states[p], batch, None)
    hg, new_state = prob.method.hypergrad(problem, inputs, state)
    vjp = hg.meta_grad
    if prob.vjp_scale != 1.0:
        vjp = jax.tree.map(lambda x: (prob.vjp_scale * x).astype(x.dtype), vjp)
    return vjp, new_state, hg.finite


def sweep(graph: Graph, u: str, params, opt_states, method_states, batches, batch_u):
    """``(dF_u/dθ_u, f_u, finite, new method states)`` by one reverse sweep.

    ``batches`` holds the batch of every problem on u's paths (their last inner batch),
    ``method_states`` the state of each visited node's method for target u.
    """
    prob = graph.problems[u]
    reads = {q: params[q] for q in prob.reads}
    value, (grad, g_reads) = jax.value_and_grad(prob.loss, argnums=(0, 1))(
        params[u], reads, batch_u
    )
    visit = graph.visit[u]
    cot = {q: g_reads[q] for q in graph.lower[u] if q in visit}
    finite = jnp.asarray(True)
    new_states = {}
    for p in visit:  # decreasing list order: every contribution to cot[p] is already in
        vjp, new_states[p], ok = edge_vjp(
            graph, u, p, cot.pop(p), params, opt_states, method_states[p], batches[p]
        )
        finite = finite & ok
        for q, v in vjp.items():
            if q == u:
                grad = _add(grad, v)
            else:
                cot[q] = _add(cot[q], v) if q in cot else v
    return grad, value, finite & all_finite(grad), new_states


def _newton(loss, steps: int):
    """``θ ← θ − H⁻¹∇L`` ``steps`` times with the dense Hessian (small problems)."""

    def solve(init, reads, batch):
        flat, unravel = ravel_pytree(init)
        f = lambda x: loss(unravel(x), reads, batch)  # noqa: E731
        for _ in range(steps):
            flat = flat - jnp.linalg.solve(jax.hessian(f)(flat), jax.grad(f)(flat))
        return unravel(flat)

    return solve


def oracle(graph: Graph, u: str, params, batches, newton_steps: int = 3):
    """``dF_u/dθ_u`` from the nested ``custom_root`` objective (see ``MultilevelStep.oracle_grad``)."""

    def objective(theta_u):
        cur = dict(params)
        cur[u] = theta_u
        for p in sorted(graph.visit[u], key=graph.index.__getitem__):  # lowest first
            loss = graph.problems[p].loss
            best = custom_root(jax.grad(loss), solve=linalg.solve_dense)(
                _newton(loss, newton_steps)
            )
            reads = {q: cur[q] for q in graph.problems[p].reads}
            cur[p] = best(jax.lax.stop_gradient(params[p]), reads, batches[p])
        reads = {q: cur[q] for q in graph.problems[u].reads}
        return graph.problems[u].loss(theta_u, reads, batches[u])

    return jax.grad(objective)(params[u])
