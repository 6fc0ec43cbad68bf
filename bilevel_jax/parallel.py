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
import re
from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bilevel_jax.loop import BilevelStep

__all__ = ["data_parallel", "collective_report"]


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
    """
    local = dataclasses.replace(step, axis_name=axis_name)
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P(None, axis_name), P(axis_name)),
        out_specs=(P(), P()),
    )


_ALL_REDUCE = re.compile(r"(?<![%\w.-])all-reduce(?:-start)?\(")  # DESIGN §4: no substring count
_OTHER = re.compile(
    r"(?<![%\w.-])(?:all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)
_SHAPE = re.compile(r"= \(?((?:[a-z]+\d*\[[\d,]*\][^ ,)]*(?:, )?)+)\)? all-reduce(?:-start)?\(")
_ELEM = re.compile(r"([a-z]+)(\d*)\[([\d,]*)\]")


def _nbytes(shape_text: str) -> int:
    total = 0
    for kind, bits, dims in _ELEM.findall(shape_text):
        n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        width = 1 if kind == "pred" else int(bits) // 8
        total += n * width
    return total


def collective_report(compiled_text: str) -> dict:
    """Count all-reduces in compiled HLO text and split them by where they run.

    Returns ``{"all_reduces", "in_loop_body", "outside_loops", "bytes_in_loop_body",
    "bytes_outside_loops", "other_collectives"}``. In a :func:`data_parallel` bilevel step,
    the scan over base steps is a while loop: its body holds the base step's reduction (run K
    times), and the meta step's reduction is outside any loop.
    """
    blocks = dict(re.findall(r"^(?:ENTRY )?(%[\w.-]+) .*?\{\n(.*?)^\}", compiled_text, re.S | re.M))
    bodies = set(re.findall(r"body=(%[\w.-]+)", compiled_text))
    in_body = [line for b in bodies if b in blocks for line in blocks[b].splitlines()
               if _ALL_REDUCE.search(line)]
    everywhere = [line for line in compiled_text.splitlines() if _ALL_REDUCE.search(line)]

    def size(lines):
        return sum(_nbytes(m.group(1)) for line in lines if (m := _SHAPE.search(line)))

    return {
        "all_reduces": len(everywhere),
        "in_loop_body": len(in_body),
        "outside_loops": len(everywhere) - len(in_body),
        "bytes_in_loop_body": size(in_body),
        "bytes_outside_loops": size(everywhere) - size(in_body),
        "other_collectives": len(_OTHER.findall(compiled_text)),
    }
