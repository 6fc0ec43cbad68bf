r"""The graph of problems: declaration, trace-time validation, levels, Betty's paths.

A problem reads other problems' parameters. The **order** of the list decides what a read
means (lowest level first):

- reading an *earlier* (lower) problem ``q`` reads its **best response** ``θ_q*``: the
  gradient of the reader flows through ``q``'s inner optimisation (Betty's ``l2u`` edge
  ``q → reader``);
- reading a *later* (upper) problem ``u`` reads its **current parameters** ``θ_u``, a
  constant for the reader's own steps (Betty's ``u2l`` edge ``u → reader``).

Levels: ``level(p) = 0`` when ``p`` reads no best response, else ``1 + max level`` of the
best responses it reads. The problems on the highest level are the *top* problems.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import optax

PyTree = Any
NESTED = ("refuse", "betty")


@dataclasses.dataclass(frozen=True)
class Problem:
    r"""One optimisation problem of a multilevel graph.

    ``loss(params, reads, batch) -> scalar`` where ``reads`` maps each name in ``reads`` to
    that problem's parameters (the best response of a lower problem, the current parameters
    of an upper one; see :mod:`bilevel_jax.multilevel`). Its parameters are trained by ``tx``
    (any optax transform), ``unroll`` steps per step of the level above.

    Attributes:
      name: a unique name.
      loss: ``loss(params, reads, batch) -> scalar``, pure.
      tx: the optax transform that trains this problem's parameters.
      reads: the names of the problems whose parameters ``loss`` reads.
      unroll: the steps this problem takes per step of the level above (all non-top
        problems of one level share it; top problems step once per call and keep 1).
      method: the best-response method used when an upper problem differentiates through
        this problem (any method object of the library, e.g. ``bj.exact()``, ``bj.cg(20)``,
        ``bj.sama()``, ``bj.darts()``); it computes the VJP ``cᵀ dθ*/d(reads)`` of this
        problem's best response as the hypergradient of the linear meta loss ``⟨θ, c⟩``.
        Required only where a sweep passes through this problem.
      vjp_scale: a factor applied to this edge's VJP (the "identity-Hessian" methods DARTS /
        SAMA-NA approximate ``H⁻¹`` by ``I``; scaling every such edge by its base learning
        rate makes a product of several edges consistent with one-step unrolling). 1.0: none.

    Example:
      >>> import jax.numpy as jnp, optax, bilevel_jax as bj
      >>> from bilevel_jax.multilevel import Problem
      >>> p = Problem("inner", lambda th, r, b: jnp.sum((th - r["outer"]) ** 2), optax.sgd(0.1),
      ...             reads=("outer",), unroll=5, method=bj.cg(10))
      >>> p.reads, p.unroll, p.method.name
      (('outer',), 5, 'cg')
    """

    name: str
    loss: Callable[[PyTree, dict, PyTree], jax.Array]
    tx: optax.GradientTransformation
    _: dataclasses.KW_ONLY
    reads: Sequence[str] = ()
    unroll: int = 1
    method: Any = None
    vjp_scale: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name):
            raise TypeError(f"Problem: name must be a non-empty string, got {self.name!r}")
        where = f"Problem {self.name!r}"
        if not callable(self.loss):
            raise TypeError(f"{where}: loss must be callable loss(params, reads, batch)")
        if not (
            callable(getattr(self.tx, "init", None)) and callable(getattr(self.tx, "update", None))
        ):
            raise TypeError(f"{where}: tx must be an optax GradientTransformation, got {self.tx!r}")
        if isinstance(self.reads, str):
            raise TypeError(
                f"{where}: reads must be a sequence of names, got the string {self.reads!r}"
            )
        reads = tuple(self.reads)
        if not all(isinstance(r, str) for r in reads):
            raise TypeError(f"{where}: reads must be names (strings), got {reads!r}")
        if len(set(reads)) != len(reads):
            raise ValueError(f"{where}: reads {reads!r} names a problem twice")
        if self.name in reads:
            raise ValueError(f"{where} reads itself; a problem's own parameters are `params`")
        object.__setattr__(self, "reads", reads)
        if isinstance(self.unroll, bool) or not isinstance(self.unroll, int) or self.unroll < 1:
            raise ValueError(f"{where}: unroll must be an integer >= 1, got {self.unroll!r}")
        scale = self.vjp_scale
        if not (isinstance(scale, int | float) and math.isfinite(scale)):
            raise ValueError(f"{where}: vjp_scale must be a finite number, got {scale!r}")
        if self.method is not None:
            m = self.method
            if not (callable(getattr(m, "init", None)) and callable(getattr(m, "hypergrad", None))):
                raise TypeError(
                    f"{where}: method must be a hypergradient method object (bj.exact(), "
                    f"bj.cg(20), bj.sama(), ...), got {m!r}"
                )
            if getattr(m, "step_along_v", False):
                raise ValueError(
                    f"{where}: {m.name} with step_along_v=True moves the lower problem after "
                    "the meta update, which a multilevel edge does not do; use step_along_v=False"
                )
            if getattr(m, "uses_last_step", False):
                raise ValueError(
                    f"{where}: {m.name} with adapt_from='last' needs the last base gradient, "
                    "which the multilevel engine does not keep; use adapt_from='fresh'"
                )


class Graph:
    """The static analysis of a list of problems (private; see :class:`MultilevelStep`).

    >>> import jax.numpy as jnp, optax, bilevel_jax as bj
    >>> f = lambda th, r, b: jnp.sum(th**2)
    >>> g = Graph([Problem("a", f, optax.sgd(0.1), reads=("b",), method=bj.exact()),
    ...            Problem("b", f, optax.sgd(0.1), reads=("a",))])
    >>> g.level, g.tops, g.paths["b"]
    ({'a': 0, 'b': 1}, ('b',), [('b', 'a', 'b')])
    """

    def __init__(
        self, problems: Sequence[Problem], nested: Literal["refuse", "betty"] = "refuse"
    ) -> None:
        if isinstance(problems, Problem) or not isinstance(problems, Sequence):
            raise TypeError(
                "multilevel_step: problems must be a list of Problem, lowest level first"
            )
        if not problems:
            raise ValueError("multilevel_step: problems is empty")
        for p in problems:
            if not isinstance(p, Problem):
                raise TypeError(f"multilevel_step: every problem must be a Problem, got {p!r}")
        if nested not in NESTED:
            raise ValueError(f"nested must be one of {NESTED}, got {nested!r}")
        names = tuple(p.name for p in problems)
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"multilevel_step: problem names must be unique; repeated: {dup}")
        self.problems = {p.name: p for p in problems}
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        for p in problems:
            unknown = [r for r in p.reads if r not in self.index]
            if unknown:
                raise ValueError(
                    f"problem {p.name!r} reads {unknown}, which are not problems of the graph "
                    f"(problems: {list(names)})"
                )
        idx = self.index
        self.lower = {n: tuple(r for r in self.problems[n].reads if idx[r] < idx[n]) for n in names}
        self.upper = {n: tuple(r for r in self.problems[n].reads if idx[r] > idx[n]) for n in names}
        # Betty's l2u: the problems that read n's best response, in list order
        self.readers = {n: tuple(m for m in names if n in self.lower[m]) for n in names}
        self.level: dict[str, int] = {}
        for n in names:
            self.level[n] = 1 + max((self.level[q] for q in self.lower[n]), default=-1)
        self.top_level = max(self.level.values())
        self.tops = tuple(n for n in names if self.level[n] == self.top_level)
        self.paths = {n: self._betty_paths(n) for n in names}
        self._check_reachable()
        self.unroll = self._level_unrolls()
        # the nodes a sweep for target u visits (those on its paths), highest index first
        self.visit = {
            u: tuple(
                sorted(
                    {m for path in self.paths[u] for m in path[1:-1]},
                    key=idx.__getitem__,
                    reverse=True,
                )
            )
            for u in names
        }
        self.meta = tuple(n for n in names if self.paths[n])
        self.diff_reads = {
            u: {
                p: tuple(
                    q
                    for q in self.problems[p].reads
                    if q == u or (idx[q] < idx[p] and q in self.visit[u])
                )
                for p in self.visit[u]
            }
            for u in names
        }
        for u in self.meta:
            for p in self.visit[u]:
                if self.problems[p].method is None:
                    raise ValueError(
                        f"problem {p!r} lies on a dependency path of {u!r} ({self.paths[u]}), "
                        f"so {u!r} differentiates through its best response; give {p!r} a "
                        "method= (bj.exact(), bj.cg(20), bj.sama(), bj.darts(), ...)"
                    )
        self.nested = tuple(
            n for n in names if self.paths[n] and any(n in self.visit[u] for u in names)
        )
        if self.nested:
            msg = (
                f"problems {list(self.nested)} are genuinely nested middle levels: each has its own "
                "hypergradient (a lower problem reads its current parameters) and an upper "
                "problem differentiates through its best response"
            )
            if nested == "refuse":
                raise ValueError(
                    msg + ". Their exact best-response Jacobian would differentiate their "
                    "hypergradient (third derivatives), which no edge method computes. "
                    "nested='betty' uses Betty's direct-cost semantics instead (each such edge "
                    "differentiates the problem's own loss only, the nested terms dropped)."
                )
            warnings.warn(
                msg + "; nested='betty': their edges differentiate their own loss only (Betty's "
                "direct-cost semantics), so the nested terms are dropped and the upper "
                "gradients are biased.",
                RuntimeWarning,
                stacklevel=4,
            )

    def _betty_paths(self, u: str) -> list[tuple[str, ...]]:
        """Betty's ``Engine.find_paths`` for every problem reading u's current parameters."""
        out: list[tuple[str, ...]] = []

        def dfs(src: str, path: list[str]) -> None:
            if src == u:
                out.append((*reversed(path), u))
                return
            for adj in self.readers[src]:
                if self.index[adj] <= self.index[u]:  # best responses only lead upwards
                    dfs(adj, [*path, adj])

        for low in (n for n in self.names if u in self.upper[n]):
            dfs(low, [low])
        return out

    def _check_reachable(self) -> None:
        for n in self.names:
            for u in self.upper[n]:
                if not any(path[-2] == n for path in self.paths[u]):
                    raise ValueError(
                        f"problem {n!r} reads the current parameters of the higher problem {u!r}, "
                        f"but no chain of best responses leads from {n!r} back up to {u!r}, so "
                        f"{u!r} cannot learn through {n!r} (Betty: 'No path from {n} to {u}'). "
                        f"Let {u!r} (or a problem it reads) read {n!r}, drop {u!r} from "
                        f"{n!r}'s reads, or move {u!r} before {n!r} in the list"
                    )
            if self.level[n] < self.top_level and not self.readers[n]:
                raise ValueError(
                    f"problem {n!r} (level {self.level[n]}) is read by no higher problem, so it is "
                    f"on no path to the top level {self.top_level} (problems {list(self.tops)}); "
                    "every problem below the top level must have its best response read by a "
                    "higher one (problems are listed lowest level first)"
                )

    def _level_unrolls(self) -> tuple[int, ...]:
        """The unroll count of each level below the top (shared by its problems)."""
        out = []
        for k in range(self.top_level):
            counts = {n: self.problems[n].unroll for n in self.names if self.level[n] == k}
            if len(set(counts.values())) != 1:
                raise ValueError(
                    f"the problems of level {k} take different unroll counts {counts}; they "
                    "step together, so give them the same unroll"
                )
            out.append(next(iter(counts.values())))
        for n in self.tops:
            if self.problems[n].unroll != 1:
                raise ValueError(
                    f"top problem {n!r} has unroll={self.problems[n].unroll}; a top problem "
                    "steps once per call of the step, so its unroll must be 1"
                )
        return tuple(out)

    def batch_axes(self, n: str) -> tuple[int, ...]:
        """The leading axes of problem n's batch leaves: the unroll counts of its level and
        of the levels above it (below the top), outermost first."""
        return tuple(self.unroll[k] for k in range(self.top_level - 1, self.level[n] - 1, -1))
