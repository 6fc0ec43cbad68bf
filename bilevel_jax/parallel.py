r"""Data parallelism for the bilevel step with ``jax.shard_map``.

Each device holds a shard of the base and meta batches and a replica of θ, λ and all
optimizer and method states. Per bilevel step:

- each base step averages the local gradient (and loss) across devices in **one**
  all-reduce;
- the meta step is computed locally — for SAMA: d, v, ε and the central difference on the
  local shards, **without any communication** — and the local meta-gradient, the local
  base step along v, the meta loss and the method's state are flattened into one buffer
  and averaged in **one** all-reduce. The result is the mean of per-device estimates, the
  semantics of the SAMA paper and of Betty.

Gradients are taken with respect to ``jax.lax.pcast(params, axis, to="varying")`` (:func:`local`):
inside ``shard_map`` a gradient with respect to a *replicated* value already contains the
cross-device sum, and a ``psum`` on top would count it n_devices times (``docs/parallel.md``).

The three pieces the step uses, each a no-op when ``axis_name`` is None: :func:`local`
(per-device view), :func:`mean` (one flattened all-reduce) and :func:`key` (per-device
randomness).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

if TYPE_CHECKING:  # the loop imports this module; no import of the loop at run time
    from bilevel_jax.loop import BilevelStep

__all__ = ["data_parallel", "collective_report", "local", "mean", "key"]

PyTree = Any


def _inexact(x) -> bool:
    return jnp.issubdtype(x.dtype if hasattr(x, "dtype") else jnp.result_type(x), jnp.inexact)


def local(tree: PyTree, axis_name: str | None) -> PyTree:
    """Mark the replicated floating leaves of ``tree`` as per-device (``pcast`` to varying).

    A gradient with respect to the result stays local to the device (no hidden cross-device
    sum); see ``docs/parallel.md``. Identity when ``axis_name`` is None.

    >>> local({"w": jnp.ones(2)}, None)["w"]
    Array([1., 1.], dtype=float32)
    """
    if axis_name is None:
        return tree
    return jax.tree.map(
        lambda x: jax.lax.pcast(x, axis_name, to="varying") if _inexact(x) else x, tree
    )


def mean(tree: PyTree, axis_name: str | None) -> PyTree:
    """Average the floating leaves of ``tree`` over ``axis_name`` in **one** all-reduce.

    The floating leaves are flattened into one buffer, ``pmean``-ed and unflattened. Other
    leaves (counters, PRNG keys) must already agree across devices (they do when they do not
    depend on the data) and are passed through. Identity when ``axis_name`` is None.

    >>> import numpy as np
    >>> from jax.sharding import Mesh, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> f = jax.shard_map(lambda x: mean((x, jnp.int32(3)), "data"), mesh=mesh,
    ...                   in_specs=P("data"), out_specs=P())
    >>> f(jnp.array([2.0]))
    (Array([2.], dtype=float32), Array(3, dtype=int32))
    """
    if axis_name is None:
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    idx = [i for i, x in enumerate(leaves) if _inexact(x)]
    flat, unravel = ravel_pytree([leaves[i] for i in idx])
    for i, m in zip(idx, unravel(jax.lax.pmean(flat, axis_name))):
        leaves[i] = m
    return jax.tree.unflatten(treedef, leaves)


def key(rng: jax.Array, axis_name: str | None) -> jax.Array:
    """Fold the device index into ``rng``, so each device draws its own randomness.

    Identity when ``axis_name`` is None.

    >>> k = jax.random.PRNGKey(0)
    >>> bool((key(k, None) == k).all())
    True
    """
    if axis_name is None:
        return rng
    return jax.random.fold_in(rng, jax.lax.axis_index(axis_name))


def data_parallel(step: BilevelStep, mesh: Mesh, *, axis_name: str = "data") -> Callable:
    """Run ``step`` data-parallel over ``mesh[axis_name]``.

    Args:
      step: a :class:`~bilevel_jax.BilevelStep`. With ``stateful=True`` the model state is
        averaged across devices inside the base step's all-reduce.
      mesh: a mesh with an ``axis_name`` axis, e.g. ``Mesh(np.array(jax.devices()), ("data",))``
        (with ``jax.make_mesh`` pass ``axis_types=(jax.sharding.AxisType.Auto,)``).
      axis_name: the mesh axis the batches are split over.

    Returns:
      ``f(state, base_batches, meta_batch) -> (state, metrics)``: ``base_batches`` leaves are
      ``(K, batch, ...)`` and are split along the batch axis; ``meta_batch`` leaves are split
      along their first axis; the state is replicated. Wrap it in ``jax.jit``.

    >>> import jax, jax.numpy as jnp, numpy as np, optax, bilevel_jax as bj
    >>> from jax.sharding import Mesh
    >>> base = lambda th, lam, b: jnp.mean((b @ th - 1.0) ** 2) + jnp.sum(lam * th**2)
    >>> meta = lambda th, lam, b: jnp.mean((b @ th - 1.0) ** 2)
    >>> step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1), bj.sama(0.1))
    >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    >>> dp = jax.jit(bj.parallel.data_parallel(step, mesh))
    >>> state, metrics = dp(step.init(jnp.zeros(3), jnp.zeros(3)), jnp.ones((2, 4, 3)),
    ...                     jnp.ones((4, 3)))
    >>> int(state.base_steps), bool(jnp.isfinite(metrics["meta_loss"]))
    (2, True)
    """
    per_device = dataclasses.replace(step, axis_name=axis_name)
    return jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(), P(None, axis_name), P(axis_name)),
        out_specs=(P(), P()),
    )


# a collective is matched as an instruction (`all-reduce(` / `all-reduce-start(` not preceded by a
# name character), not as a substring: `%all-reduce.3` names and `-done` ops are not counted
_ALL_REDUCE = re.compile(r"(?<![%\w.-])all-reduce(?:-start)?\(")
_OTHER = re.compile(
    r"(?<![%\w.-])(?:all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"= \(?((?:[a-z]+\d*\[[\d,]*\][^ ,)]*(?:, )?)+)\)? all-reduce(?:-start)?\(")
_ELEM = re.compile(r"([a-z]+)(\d*)\[([\d,]*)\]")
_COMMENT = re.compile(r"/\*[^*]*\*/")  # XLA writes /*index=5*/ into tuples of 6+ elements


def _nbytes(shape_text: str) -> int:
    total = 0
    for kind, bits, dims in _ELEM.findall(shape_text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        width = 1 if kind == "pred" else int(bits) // 8
        total += n * width
    return total


def collective_report(compiled_text: str, *, last_base_step_outside: bool = False) -> dict:
    """Count the all-reduces of a compiled :func:`data_parallel` bilevel step (K ≥ 2).

    The step runs its K base steps in a ``lax.scan`` (a while loop whose body holds one base
    step's reductions) and then the meta step, so per bilevel step

        total = K · base_step + meta_step,   outside the loop = meta_step.

    ``last_base_step_outside=True`` is for the one layout where the last base step runs after the
    loop (SAMA's ``adapt_from="last"`` with an optimizer whose pre-update state
    :func:`bilevel_jax.adaptation.can_rewind` cannot recover): then outside the loop =
    base_step + meta_step.

    Returns ``{"base_step_allreduces", "base_step_bytes", "meta_step_allreduces",
    "meta_step_bytes", "all_reduces", "in_loop_body", "outside_loops", "other_collectives"}``,
    the first four derived as above from the raw counts that follow. Pass the text of the
    compiled step: ``jax.jit(data_parallel(step, mesh)).lower(*args).compile().as_text()``
    (``docs/parallel.md`` explains the counting).

    >>> hlo = (
    ...     "%body.1 (p: f32[4]) -> f32[4] {\\n"
    ...     "  %ar = f32[4]{0} all-reduce(f32[4]{0} %p), replica_groups={}\\n"
    ...     "}\\n"
    ...     "ENTRY %main (a: f32[4]) -> f32[4] {\\n"
    ...     "  %w = f32[4]{0} while(f32[4]{0} %a), condition=%c, body=%body.1\\n"
    ...     "  %ar.3 = f32[2]{0} all-reduce(f32[2]{0} %x), replica_groups={}\\n"
    ...     "}\\n"
    ... )
    >>> r = collective_report(hlo)
    >>> r["base_step_allreduces"], r["base_step_bytes"], r["meta_step_allreduces"], r["meta_step_bytes"]
    (1, 16, 1, 8)
    """
    blocks = dict(re.findall(r"^(?:ENTRY )?(%[\w.-]+) .*?\{\n(.*?)^\}", compiled_text, re.S | re.M))
    bodies = set(re.findall(r"body=(%[\w.-]+)", compiled_text))
    in_body = [
        line
        for b in bodies
        if b in blocks
        for line in blocks[b].splitlines()
        if _ALL_REDUCE.search(line)
    ]
    everywhere = [line for line in compiled_text.splitlines() if _ALL_REDUCE.search(line)]
    if not bodies:
        raise ValueError(
            "no while loop in the compiled step: collective_report needs K >= 2 base steps"
        )

    def size(lines):
        return sum(
            _nbytes(m.group(1)) for line in lines if (m := _SHAPE.search(_COMMENT.sub("", line)))
        )

    outside, bytes_outside = len(everywhere) - len(in_body), size(everywhere) - size(in_body)
    last = 1 if last_base_step_outside else 0  # one base step's reductions outside the loop
    return {
        "base_step_allreduces": len(in_body),
        "base_step_bytes": size(in_body),
        "meta_step_allreduces": outside - last * len(in_body),
        "meta_step_bytes": bytes_outside - last * size(in_body),
        "all_reduces": len(everywhere),
        "in_loop_body": len(in_body),
        "outside_loops": outside,
        "other_collectives": len(_OTHER.findall(compiled_text)),
    }
