"""The README's usage example runs and learns something."""

import pathlib
import re

import jax
import jax.numpy as jnp

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has no python example"
    ns: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), ns)  # noqa: S102 - our own README
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(k1, (32, 5))
    y = jax.random.randint(k2, (32,), 0, 3)
    theta, lam = {"w": jnp.zeros((5, 3))}, {"logit": jnp.zeros(32)}
    bs, ms = ns["base_tx"].init(theta), ns["meta_tx"].init(lam)
    for _ in range(3):
        theta, bs, lam, ms = ns["train_step"](
            theta, bs, lam, ms, (x, y, jnp.arange(32)), (x[:8], y[:8])
        )
    assert int(ms[0].count) == 3 and int(ms[0].nonfinite_count) == 0
    assert float(jnp.max(jnp.abs(lam["logit"]))) > 0  # λ moved


def test_readme_implicit_diff_example_matches_closed_form():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "custom_root" in b)
    ns: dict = {}
    exec(compile(block, "README.md", "exec"), ns)  # noqa: S102 - our own README
    x, y = ns["x"], ns["y"]

    def closed(lam):
        theta = jnp.linalg.solve(x.T @ x + lam * jnp.eye(3), x.T @ y)
        return jnp.sum(theta**2)

    got = float(jax.grad(ns["val"])(1.0))
    assert abs(got - float(jax.grad(closed)(1.0))) < 1e-3 * abs(got)
