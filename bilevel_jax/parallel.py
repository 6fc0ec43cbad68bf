r"""Data parallelism for the bilevel step with ``jax.shard_map``.

Each device holds a shard of the base and meta batches and a replica of θ, λ and all
optimizer and method states (DESIGN §2.4). Per bilevel step:

- each base step averages the local gradient (and loss) across devices in **one**
  all-reduce;
- the meta step is computed locally — for SAMA: d, v, ε and the central difference on the
  local shards, **without any communication** — and the local meta-gradient, the local
  base step along v, the meta loss and the method's state are flattened into one buffer
  and averaged in **one** all-reduce. The result is the mean of per-device estimates, the
  semantics of the SAMA paper and of Betty.

Gradients are taken with respect to ``jax.lax.pcast(params, axis, to="varying")``: inside
``shard_map`` a gradient with respect to a *replicated* value already contains the
cross-device sum, and a ``psum`` on top would count it n_devices times (DESIGN §4).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bilevel_jax.loop import BilevelStep

__all__ = ["data_parallel"]


def data_parallel(step: BilevelStep, mesh: Mesh, *, axis_name: str = "data") -> Callable:
    """Run ``step`` data-parallel over ``mesh[axis_name]``.

    Args:
      step: a :class:`~bilevel_jax.BilevelStep` (``stateful=True`` is not supported yet).
      mesh: a mesh with an ``axis_name`` axis, e.g. ``Mesh(np.array(jax.devices()), ("data",))``
        (with ``jax.make_mesh`` pass ``axis_types=(jax.sharding.AxisType.Auto,)``).
      axis_name: the mesh axis the batches are split over.

    Returns:
      ``f(state, base_batches, meta_batch) -> (state, metrics)``: ``base_batches`` leaves are
      ``(K, batch, ...)`` and are split along the batch axis; ``meta_batch`` leaves are split
      along their first axis; the state is replicated. Wrap it in ``jax.jit``.
    """
    local = dataclasses.replace(step, axis_name=axis_name)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(None, axis_name), P(axis_name)),
        out_specs=(P(), P()),
    )
