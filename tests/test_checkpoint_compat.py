"""Checkpoints written by bilevel_jax 0.1.0 (BilevelState counters ``step``/``meta_step``) restore."""

import collections

import chex
import jax.numpy as jnp
import optax
import pytest

import bilevel_jax as bj


def _step():
    return bj.bilevel_step(
        lambda t, l, b: jnp.sum((t - l * b) ** 2),
        lambda t, l, b: jnp.sum((t - b) ** 2),
        optax.adam(0.1),
        optax.adam(0.1),
        bj.sama(),
    )


def test_a_0_1_0_checkpoint_restores_into_the_renamed_state(tmp_path):
    step = _step()
    state, _ = step(step.init(jnp.zeros(3), jnp.ones(3)), jnp.ones((2, 3)), jnp.ones(3))
    # bilevel_jax 0.1.0 saved a NamedTuple "BilevelState" whose counters were step/meta_step,
    # in the same field order; orbax keys the saved tree by field name
    old_fields = [
        {"base_steps": "step", "meta_steps": "meta_step"}.get(f, f) for f in state._fields
    ]
    old = collections.namedtuple("BilevelState", old_fields)(*state)
    with bj.checkpoint.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, old, {"data_position": 1})
    template = step.init(jnp.zeros(3), jnp.ones(3))
    with (
        bj.checkpoint.Checkpointer(tmp_path / "run") as ckpt,
        pytest.warns(DeprecationWarning, match="read as base_steps/meta_steps"),
    ):
        got, restored, extra = ckpt.restore(template)
    assert got == 1 and extra == {"data_position": 1}
    assert type(restored) is bj.BilevelState
    chex.assert_trees_all_equal(restored, state)  # bit-identical, checksum verified
    assert int(restored.base_steps) == 2 and int(restored.meta_steps) == 1


def test_other_mismatches_are_still_structure_errors(tmp_path):
    step = _step()
    state = step.init(jnp.zeros(3), jnp.ones(3))
    fields = [{"base_steps": "steps_done"}.get(f, f) for f in state._fields]
    other = collections.namedtuple("BilevelState", fields)(*state)
    with bj.checkpoint.Checkpointer(tmp_path / "run") as ckpt:
        ckpt.save(1, other)
    with (
        bj.checkpoint.Checkpointer(tmp_path / "run") as ckpt,
        pytest.raises(bj.checkpoint.CheckpointStructureError, match="steps_done"),
    ):
        ckpt.restore(state)
