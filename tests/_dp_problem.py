"""The small bilevel problem shared by the data-parallel workers (_dp_worker, _mh_worker).

Importing it does not start JAX's backends, so a worker may still set its device count or join a
multi-process run afterwards."""

import jax
import jax.numpy as jnp


def base_loss(th, lam, batch):
    """Per-example weights softplus(x·a) on a tanh regression, plus a learned L2 penalty c."""
    x, y = batch
    r = jnp.tanh(x @ th["w"]) - y
    return jnp.mean(jax.nn.softplus(x @ lam["a"]) * r**2) + jnp.sum(lam["c"] * th["w"] ** 2)


def meta_loss(th, lam, batch):
    """The unweighted regression error."""
    x, y = batch
    return jnp.mean((jnp.tanh(x @ th["w"]) - y) ** 2)
