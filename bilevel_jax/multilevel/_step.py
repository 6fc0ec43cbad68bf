r"""The multilevel step: the whole schedule as one pure function (nested ``lax.scan``)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bilevel_jax.base_step import base_step
from bilevel_jax.multilevel import _sweep
from bilevel_jax.multilevel._graph import Graph, Problem

PyTree = Any


class MultilevelState(NamedTuple):
    """Everything a multilevel run carries between steps (a pytree: jit, donate, checkpoint it).

    Attributes:
      params: ``{name: parameters}`` of every problem.
      opt_states: ``{name: optax state}`` of every problem's ``tx``.
      method_states: ``{target: {node: state}}``: the state of each node's method in the
        sweep of each target (e.g. CG's warm start), one per (target, node) pair.
      steps: ``{name: int32}`` steps taken (including skipped ones).
      skipped: ``{name: int32}`` steps skipped because their loss or gradient was not finite.

      meta_steps: calls of the step so far (steps of the top problems).
      base_steps: steps of the problems below the top level, summed.
      skipped_meta: skipped steps of the top problems, summed.
      skipped_base: skipped steps of the problems below the top level, summed.

    The four totals are the counters :func:`bilevel_jax.fit` and
    :func:`bilevel_jax.check_skips` read.

    >>> import jax.numpy as jnp
    >>> z = jnp.int32(0)
    >>> s = MultilevelState({}, {}, {}, {"a": jnp.int32(4)}, {"a": z}, z, jnp.int32(4), z, z)
    >>> int(s.base_steps), s._fields[-4:]
    (4, ('meta_steps', 'base_steps', 'skipped_meta', 'skipped_base'))
    """

    params: dict
    opt_states: dict
    method_states: dict
    steps: dict
    skipped: dict
    meta_steps: jax.Array
    base_steps: jax.Array
    skipped_meta: jax.Array
    skipped_base: jax.Array


@jax.custom_vjp
def _given(theta: PyTree, value: jax.Array, grad: PyTree) -> jax.Array:
    """``value``, with ``grad`` as its gradient in ``theta`` (so that ``base_step`` applies a
    gradient computed elsewhere, with its non-finite skip)."""
    del theta, grad
    return value


def _given_fwd(theta, value, grad):
    del theta
    return value, (value, grad)


def _given_bwd(res, ct):
    value, grad = res
    scaled = jax.tree.map(lambda g: ct.astype(g.dtype) * g, grad)  # ct = 1: exact
    return scaled, jnp.zeros_like(value), jax.tree.map(jnp.zeros_like, grad)


_given.defvjp(_given_fwd, _given_bwd)


def _keep_if(ok, new, old):
    return jax.lax.cond(ok, lambda: new, lambda: old)


def _index_last(tree: PyTree, n: int) -> PyTree:
    """The last entry along the first ``n`` axes of every leaf."""
    return jax.tree.map(lambda x: x[(-1,) * n], tree) if n else tree


@dataclasses.dataclass(frozen=True)
class MultilevelStep:
    r"""One step of a multilevel problem graph as a pure function (see :func:`multilevel_step`).

    ``step(state, batches, top_batch=None) -> (state, metrics)``: one step of the top
    problems; level ``k`` below the top runs ``unroll`` steps per step of level ``k + 1``, as
    a static nested ``lax.scan``. Problems of one level step together from the same state.

    Attributes:
      problems: the problems, lowest level first.
      nested: ``"refuse"`` or ``"betty"`` (see :func:`multilevel_step`).

    Example:
      >>> import jax.numpy as jnp, optax, bilevel_jax as bj
      >>> from bilevel_jax.multilevel import Problem, multilevel_step
      >>> inner = Problem("inner", lambda w, r, x: jnp.sum((w - r["outer"] * x) ** 2),
      ...                 optax.sgd(0.2), reads=("outer",), unroll=3, method=bj.exact())
      >>> outer = Problem("outer", lambda lam, r, y: jnp.sum((r["inner"] - y) ** 2),
      ...                 optax.sgd(0.05), reads=("inner",))
      >>> step = multilevel_step([inner, outer])
      >>> state = step.init({"inner": jnp.zeros(2), "outer": jnp.ones(())})
      >>> batches = {"inner": jnp.ones((3, 2))}            # one batch per unrolled step
      >>> state, metrics = jax.jit(step)(state, batches, jnp.full(2, 2.0))
      >>> int(state.meta_steps), int(state.base_steps), sorted(metrics)[:2]
      (1, 3, ['base_skipped', 'loss/inner'])
    """

    problems: tuple[Problem, ...]
    nested: Literal["refuse", "betty"] = "refuse"
    graph: Graph = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "problems", tuple(self.problems))
        object.__setattr__(self, "graph", Graph(self.problems, self.nested))

    # ------------------------------------------------------------------ the graph
    @property
    def names(self) -> tuple[str, ...]:
        """The problem names, lowest level first.

        >>> _example().names
        ('inner', 'outer')
        """
        return self.graph.names

    @property
    def levels(self) -> dict[str, int]:
        """``{name: level}``: 0 for problems that read no best response.

        >>> _example().levels
        {'inner': 0, 'outer': 1}
        """
        return dict(self.graph.level)

    @property
    def tops(self) -> tuple[str, ...]:
        """The top problems (the highest level): one step of each per call.

        >>> _example().tops
        ('outer',)
        """
        return self.graph.tops

    def paths(self, name: str) -> list[tuple[str, ...]]:
        """The dependency paths of ``name`` as Betty's ``Engine`` builds them.

        For every problem ``L`` that reads ``name``'s current parameters (in list order), the
        chains of best-response reads from ``L`` up to ``name`` found by depth-first search
        (readers in list order), each written as Betty writes it: ``(name, y_k, …, y_1, L,
        name)`` where ``name`` reads ``y_k``'s best response, …, ``y_1`` reads ``L``'s, and
        ``L`` reads ``name``. The gradient of ``name`` is its direct gradient plus the sum
        over these paths of the chained VJPs (computed here by one sweep, not path by path).
        Empty for a problem that no lower problem reads.

        >>> _example().paths("outer"), _example().paths("inner")
        ([('outer', 'inner', 'outer')], [])
        """
        self._known(name)
        return list(self.graph.paths[name])

    def batch_axes(self, name: str) -> tuple[int, ...]:
        """The leading axes of ``name``'s batch leaves: the unroll counts of its level and the
        levels above it (below the top), outermost first; ``()`` for a top problem.

        >>> _example().batch_axes("inner"), _example().batch_axes("outer")
        ((3,), ())
        """
        self._known(name)
        return self.graph.batch_axes(name)

    @property
    def base_steps_per_call(self) -> int:
        """The steps one call takes below the top level, summed over those problems (the
        product of each one's :meth:`batch_axes`); :func:`bilevel_jax.fit` logs
        ``base_steps`` with it.

        >>> _example().base_steps_per_call
        3
        """
        g = self.graph
        return sum(math.prod(g.batch_axes(n)) for n in g.names if n not in g.tops)

    def _known(self, name: str) -> None:
        if name not in self.graph.index:
            raise ValueError(f"no problem named {name!r}; the problems are {list(self.names)}")

    # ------------------------------------------------------------------ state
    def init(self, params: Mapping[str, PyTree]) -> MultilevelState:
        """The starting state: ``params`` (``{name: parameters}``), fresh optimizer and
        method states, zero counters.

        >>> int(_example().init({"inner": jnp.zeros(2), "outer": jnp.ones(())}).meta_steps)
        0
        """
        params = self._complete("params", params)
        g = self.graph
        opt = {n: g.problems[n].tx.init(params[n]) for n in g.names}
        ms = {
            u: {
                p: g.problems[p].method.init(params[p], {q: params[q] for q in g.diff_reads[u][p]})
                for p in g.visit[u]
            }
            for u in g.meta
        }

        def zeros():  # distinct buffers, so that the state can be donated
            return jnp.zeros((), jnp.int32)

        steps = {n: zeros() for n in g.names}
        skipped = {n: zeros() for n in g.names}
        return MultilevelState(
            dict(params), opt, ms, steps, skipped, zeros(), zeros(), zeros(), zeros()
        )

    def _complete(self, what: str, tree: Mapping[str, PyTree]) -> dict:
        if not isinstance(tree, Mapping):
            raise TypeError(
                f"{what} must be a dict {{problem name: ...}}, got {type(tree).__name__}"
            )
        missing = [n for n in self.names if n not in tree]
        extra = [n for n in tree if n not in self.graph.index]
        if missing or extra:
            raise ValueError(
                f"{what} must have one entry per problem {list(self.names)}; missing {missing}, "
                f"unknown {extra}"
            )
        return {n: tree[n] for n in self.names}

    def _batches(self, batches: Mapping[str, PyTree], top_batch: PyTree) -> dict:
        if not isinstance(batches, Mapping):
            raise TypeError(
                f"batches must be a dict {{problem name: batch}}, got {type(batches).__name__}"
            )
        batches = dict(batches)
        if top_batch is not None:
            tops = self.tops
            given = {tops[0]: top_batch} if len(tops) == 1 else dict(top_batch)
            if len(tops) > 1 and set(given) != set(tops):
                raise ValueError(
                    f"with several top problems {list(tops)}, top_batch must be a dict with one "
                    f"batch per top problem; got keys {sorted(given)}"
                )
            clash = [n for n in given if n in batches]
            if clash:
                raise ValueError(f"batches of {clash} given both in batches and in top_batch")
            batches.update(given)
        batches = self._complete("batches", batches)
        for n in self.names:
            axes = self.graph.batch_axes(n)
            for path, leaf in jax.tree_util.tree_leaves_with_path(batches[n]):
                shape = tuple(getattr(leaf, "shape", ()))
                if shape[: len(axes)] != axes:
                    raise ValueError(
                        f"batch of problem {n!r}: leaf {jax.tree_util.keystr(path) or '<root>'} has "
                        f"shape {shape}, but its leading axes must be {axes} (the unroll counts "
                        "of its level and the levels above it, outermost first)"
                    )
        return batches

    # ------------------------------------------------------------------ gradients
    def hypergrad(
        self, state: MultilevelState, batches: Mapping[str, PyTree], name: str
    ) -> tuple[PyTree, jax.Array]:
        r"""``(dF/dθ, finite)`` for problem ``name`` at ``state`` by one reverse sweep.

        ``F(θ) = loss(θ, reads, batch)`` with every problem on ``name``'s paths replaced by
        its best response; each of those problems is visited once and its ``method``
        computes the VJP of its best response with respect to all its reads that depend on
        θ (evaluated at its current parameters, which stand for the best response, as in a
        bilevel step). ``batches`` has one batch per problem, without unroll axes (those of
        problems off the paths are not used). The method states in ``state`` are used and
        not updated.

        >>> step = _example()
        >>> state = step.init({"inner": jnp.ones(2), "outer": jnp.ones(())})
        >>> g, ok = step.hypergrad(state, {"inner": jnp.ones(2), "outer": jnp.full(2, 2.0)}, "outer")
        >>> float(g), bool(ok)   # F(λ) = Σ(λ·1 − 2)², dF/dλ = 2·2·(1 − 2)
        (-4.0, True)
        """
        self._known(name)
        b = self._complete("batches", batches)
        ms = state.method_states.get(name, {})
        grad, _, finite, _ = _sweep.sweep(
            self.graph, name, state.params, state.opt_states, ms, b, b[name]
        )
        return grad, finite

    def oracle_grad(
        self,
        state: MultilevelState,
        batches: Mapping[str, PyTree],
        name: str,
        *,
        newton_steps: int = 3,
    ) -> PyTree:
        r"""The exact ``dF/dθ`` of problem ``name`` from the nested ``custom_root`` objective.

        Every problem on ``name``'s paths is replaced, lowest first, by its best response
        ``argmin_θ loss(θ, reads, batch)`` computed by ``newton_steps`` Newton steps (dense
        Hessian, started from its current parameters) and differentiated by the implicit
        function theorem (:func:`~bilevel_jax.custom_root` with a dense solve, nested through
        the levels by JAX's chain rule); ``jax.grad`` of the top loss of that composition.
        Exact for quadratic losses; for tests and small problems only (dense Hessians). For
        ``nested="betty"`` it follows the same direct-cost semantics as the sweep.

        >>> step = _example()
        >>> state = step.init({"inner": jnp.ones(2), "outer": jnp.ones(())})
        >>> b = {"inner": jnp.ones(2), "outer": jnp.full(2, 2.0)}
        >>> float(step.oracle_grad(state, b, "outer"))
        -4.0
        """
        self._known(name)
        b = self._complete("batches", batches)
        return _sweep.oracle(self.graph, name, state.params, b, newton_steps)

    # ------------------------------------------------------------------ the step
    def __call__(
        self,
        state: MultilevelState,
        batches: Mapping[str, PyTree],
        top_batch: PyTree = None,
    ) -> tuple[MultilevelState, dict[str, jax.Array]]:
        """One step of the top problems (and the unrolled steps of the levels below).

        Args:
          state: the :class:`MultilevelState` (donate it: ``jax.jit(step, donate_argnums=0)``).
          batches: ``{name: batch}``; the leaves of a problem's batch carry the leading axes
            :meth:`batch_axes` (one batch per step it takes in this call).
          top_batch: optionally the batch of the top problem (a dict ``{name: batch}`` with
            several top problems) instead of putting it in ``batches``: then
            ``step(state, lower_batches, top_batch)`` is the ``(state, base_batches,
            meta_batch)`` protocol of :func:`bilevel_jax.fit`.

        Returns:
          ``(state, metrics)``: ``loss/<name>`` (mean over its steps in this call),
          ``skipped/<name>`` (its skipped steps in this call), ``base_skipped`` and
          ``meta_skipped`` (below / on the top level).
        """
        g = self.graph
        b = self._batches(batches, top_batch)
        carry = (dict(state.params), dict(state.opt_states), dict(state.method_states))
        carry, stats = self._block(g.top_level, carry, b)
        params, opt, ms = carry
        steps = {n: state.steps[n] + stats[n][1] for n in g.names}
        skipped = {n: state.skipped[n] + stats[n][2] for n in g.names}
        below = [n for n in g.names if n not in g.tops]
        base_steps = sum((stats[n][1] for n in below), jnp.zeros((), jnp.int32))
        base_skip = sum((stats[n][2] for n in below), jnp.zeros((), jnp.int32))
        meta_skip = sum((stats[n][2] for n in g.tops), jnp.zeros((), jnp.int32))
        new = MultilevelState(
            params,
            opt,
            ms,
            steps,
            skipped,
            state.meta_steps + 1,
            state.base_steps + base_steps,
            state.skipped_meta + meta_skip,
            state.skipped_base + base_skip,
        )
        metrics: dict[str, jax.Array] = {}
        for n in g.names:
            metrics[f"loss/{n}"] = stats[n][0] / stats[n][1]
            metrics[f"skipped/{n}"] = stats[n][2]
        metrics["base_skipped"] = base_skip
        metrics["meta_skipped"] = meta_skip
        return new, metrics

    def _block(self, k: int, carry, batches: dict):
        """Level k's block: ``unroll`` blocks of level k − 1 (a scan), then level k's steps.
        Returns the carry and ``{name: (loss sum, steps, skipped)}`` for levels ≤ k."""
        g = self.graph
        stats: dict = {}
        last: dict = {}
        if k > 0:
            inner = {n: b for n, b in batches.items() if g.level[n] < k}

            def body(c, xs):
                return self._block(k - 1, c, xs)

            carry, st = jax.lax.scan(body, carry, inner, length=g.unroll[k - 1])
            stats = jax.tree.map(lambda x: jnp.sum(x, axis=0), st)
            last = {n: _index_last(b, k - g.level[n]) for n, b in inner.items()}
        params, opt, ms = carry
        params, opt, ms = dict(params), dict(opt), dict(ms)
        results = {}
        for n in (m for m in g.names if g.level[m] == k):
            prob = g.problems[n]
            if n in g.meta:
                grad, value, _, new_ms = _sweep.sweep(
                    g, n, carry[0], carry[1], carry[2][n], last, batches[n]
                )
                r = base_step(_given, prob.tx, carry[0][n], carry[1][n], value, grad)
                ms[n] = _keep_if(r.finite, new_ms, carry[2][n])
            else:
                reads = {q: carry[0][q] for q in prob.reads}
                r = base_step(prob.loss, prob.tx, carry[0][n], carry[1][n], reads, batches[n])
            results[n] = r
        for n, r in results.items():  # the problems of one level step from the same state
            params[n], opt[n] = r.params, r.opt_state
            stats[n] = (
                jnp.asarray(r.loss, jnp.promote_types(jnp.result_type(r.loss), jnp.float32)),
                jnp.ones((), jnp.int32),
                (~r.finite).astype(jnp.int32),
            )
        return (params, opt, ms), stats


def multilevel_step(
    problems: Sequence[Problem], *, nested: Literal["refuse", "betty"] = "refuse"
) -> MultilevelStep:
    r"""A multilevel (generalised meta-learning) step over a graph of problems.

    Args:
      problems: the :class:`Problem` s, **lowest level first**: reading an earlier problem
        reads its best response (the reader's gradient flows through it), reading a later
        one reads its current parameters (a constant for the reader's own steps).
      nested: what to do with a *genuinely nested* middle level, a problem that has its own
        hypergradient (a lower problem reads its current parameters) and whose best response
        an upper problem differentiates through. Its exact best-response Jacobian would
        differentiate its hypergradient, which no edge method computes. ``"refuse"``
        (default): raise ValueError naming it. ``"betty"``: Betty's direct-cost semantics
        (its edge differentiates its own loss only, the nested terms dropped), with a
        RuntimeWarning when the step is built.

    Raises:
      ValueError / TypeError: at construction, naming the problem: repeated names, unknown
        reads, self-reads, a lower problem reading an upper one that cannot learn through it
        (no path back, Betty's check), a problem below the top level that feeds no higher
        one, differing unroll counts on one level, a missing ``method`` on a path, a nested
        level with ``nested="refuse"``.

    Example (Meta-Weight-Net's graph, Betty's ``u2l = {meta: [inner]}, l2u = {inner: [meta]}``):
      >>> import jax.numpy as jnp, optax, bilevel_jax as bj
      >>> from bilevel_jax.multilevel import Problem, multilevel_step
      >>> f = lambda th, r, b: jnp.sum(th**2)
      >>> step = multilevel_step([Problem("inner", f, optax.sgd(0.1), reads=("meta",), method=bj.cg(5)),
      ...                         Problem("meta", f, optax.sgd(0.1), reads=("inner",))])
      >>> step.paths("meta"), step.tops
      ([('meta', 'inner', 'meta')], ('meta',))

    Reference: S. K. Choe, W. Neiswanger, P. Xie, E. Xing, "Betty: An Automatic
    Differentiation Library for Multilevel Optimization", ICLR 2023.
    """
    return MultilevelStep(tuple(problems), nested)


def _example() -> MultilevelStep:
    """The small graph of the doctests: ``inner`` reads ``outer`` (λ), ``outer`` reads inner.

    >>> _example().names
    ('inner', 'outer')
    """
    import bilevel_jax as bj

    inner = Problem(
        "inner",
        lambda w, r, x: jnp.sum((w - r["outer"] * x) ** 2),
        optax.sgd(0.2),
        reads=("outer",),
        unroll=3,
        method=bj.exact(),
    )
    outer = Problem(
        "outer", lambda lam, r, y: jnp.sum((r["inner"] - y) ** 2), optax.sgd(0.05), reads=("inner",)
    )
    return MultilevelStep((inner, outer))
