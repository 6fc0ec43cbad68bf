"""The method contract: every factory's object satisfies ``HypergradMethod``.

Methods are frozen keyword-only dataclasses; their ``repr`` reads like the constructor call,
is deterministic (no memory addresses, so results can record it) and round-trips the settings.
"""

import dataclasses
import functools
import re
import subprocess
import sys

import jax.numpy as jnp
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax import linalg
from bilevel_jax.hypergrad import SAMA, SOBA, DartsSecondOrder, Implicit, Unrolled

FACTORIES = {
    "sama": lambda: bj.sama(),
    "sama_last_step": lambda: bj.sama(0.1, adapt_from="last", step_along_v=True),
    "sama_na": lambda: bj.sama_na(0.5, difference="vmap"),
    "darts": lambda: bj.darts(),
    "darts_second_order": lambda: bj.darts_second_order(0.1),
    "neumann": lambda: bj.neumann(7, 0.2, damping=0.01),
    "cg": lambda: bj.cg(20, warm_start=True),
    "exact": lambda: bj.exact(damping=0.1),
    "itd": lambda: bj.itd(3, truncate=2, remat=True),
    "dds": lambda: bj.dds(0.1),
    "soba": lambda: bj.soba(0.05),
    "soba_schedule": lambda: bj.soba(optax.exponential_decay(0.1, 10, 0.5)),
}

# what repr(method) prints in a namespace where it evaluates back to the same settings
NAMESPACE = {
    "SAMA": SAMA,
    "SOBA": SOBA,
    "DartsSecondOrder": DartsSecondOrder,
    "Implicit": Implicit,
    "Unrolled": Unrolled,
    "partial": functools.partial,
    **{name: getattr(linalg, name) for name in linalg.__all__ if name.startswith("solve_")},
}


def _settings(method):
    """Field values, with partials compared by function and keywords."""
    out = {}
    for f in dataclasses.fields(method):
        v = getattr(method, f.name)
        if isinstance(v, functools.partial):
            v = (v.func, v.args, v.keywords)
        out[f.name] = v
    return out


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
def test_factory_objects_satisfy_the_protocol(make):
    m = make()
    assert isinstance(m, bj.HypergradMethod)
    assert isinstance(m.name, str) and m.name
    assert isinstance(m.info_keys, tuple) and all(isinstance(k, str) for k in m.info_keys)
    assert isinstance(m.step_along_v, bool)
    assert isinstance(m.supports_exact_sync, bool)
    assert callable(m.synced) and callable(m.init) and callable(m.hypergrad)
    assert m.step_along_v is False or isinstance(m, SAMA)  # only SAMA-type methods step along v


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
def test_methods_are_frozen_keyword_only_dataclasses(make):
    m = make()
    params = dataclasses.fields(m)
    assert params and all(f.kw_only for f in params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.name = "other"  # type: ignore[misc]
    first = params[0]
    with pytest.raises(TypeError):
        type(m)(getattr(m, first.name))  # positional construction is refused
    assert type(m)(**{f.name: getattr(m, f.name) for f in params}) == m


@pytest.mark.parametrize("make", FACTORIES.values(), ids=FACTORIES.keys())
def test_repr_is_deterministic_and_round_trips(make):
    m = make()
    text = repr(m)
    assert text == repr(make())  # a fresh object prints the same
    assert not re.search(r"0x[0-9a-f]+|<function|object at", text), text
    assert text.startswith(f"{type(m).__name__}(")
    plain = [getattr(m, f.name) for f in dataclasses.fields(m)]
    if not any(callable(v) and not isinstance(v, functools.partial) for v in plain):
        # (a user function such as a ρ schedule prints by name and does not evaluate back)
        again = eval(text, dict(NAMESPACE))  # noqa: S307 - our own repr
        assert type(again) is type(m)
        assert _settings(again) == _settings(m)


def test_repr_examples():
    assert repr(bj.cg(5)) == (
        "Implicit(solver=partial(solve_cg, maxiter=5, damping=0.0), warm_start=False, name='cg')"
    )
    assert repr(bj.itd(2)) == (
        "Unrolled(unroll=2, truncate=None, stacked=False, remat=False, lr=None, name='itd')"
    )
    assert repr(bj.soba(optax.exponential_decay(0.1, 10, 0.5))) == "SOBA(rho=schedule, name='soba')"


def test_repr_is_the_same_in_a_fresh_interpreter():
    code = "import bilevel_jax as bj; print(repr(bj.neumann(3)), repr(bj.sama()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"{bj.neumann(3)!r} {bj.sama()!r}"


def test_factories_build_what_they_say():
    assert bj.sama().adapt and not bj.sama_na().adapt and not bj.darts().adapt
    assert bj.darts().alpha == 0.01 and bj.darts().name == "darts"
    assert bj.neumann(7, 0.2).solver.keywords == {"maxiter": 7, "eta": 0.2, "damping": 0.0}
    assert bj.neumann(maxiter=7, eta=0.2) == bj.neumann(7, 0.2)  # value equality
    assert hash(bj.cg(5)) == hash(bj.cg(5)) and bj.cg(5) != bj.cg(6) and bj.cg() != bj.exact()
    assert bj.cg(maxiter=4).solver.func is linalg.solve_cg
    assert bj.exact().solver.func is linalg.solve_dense
    assert bj.dds().unroll == 1 and bj.itd(4).unroll == 4
    assert bj.sama(step_along_v=True).step_along_v and bj.darts(step_along_v=True).step_along_v


def test_info_keys_match_the_hypergrad_info():
    loss = lambda th, lam, batch: jnp.sum((th - lam) ** 2)  # noqa: E731
    tx = optax.sgd(0.1)
    problem = bj.BilevelProblem(loss, loss, tx)
    th, lam = jnp.zeros(3), jnp.ones(3)
    inputs = bj.BilevelInputs(th, lam, tx.init(th), None, None)
    for name, make in FACTORIES.items():
        m = make()
        if name == "sama_last_step":
            inputs_m = inputs._replace(last_grad=jnp.zeros(3), last_opt_state=tx.init(th))
        else:
            inputs_m = inputs
        hg, _ = m.hypergrad(problem, inputs_m, m.init(th, lam))
        assert set(hg.info) == set(m.info_keys), name
        assert (hg.base_update is not None) == m.step_along_v, name


def test_synced():
    for make in FACTORIES.values():
        m = make()
        if m.supports_exact_sync:
            synced = m.synced("data")
            assert synced.axis_name == "data" and m.axis_name is None
            assert dataclasses.replace(synced, axis_name=None) == m
        else:
            with pytest.raises(ValueError, match=re.escape(m.name)):
                m.synced("data")
    assert bj.sama().supports_exact_sync and bj.darts().supports_exact_sync
    assert not bj.cg().supports_exact_sync and not bj.soba().supports_exact_sync


def test_implicit_takes_any_solver_callable():
    calls = []

    def my_solver(matvec, b, *, x0=None):
        calls.append(x0)
        return linalg.solve_dense(matvec, b)

    loss = lambda th, lam, batch: jnp.sum((th - lam) ** 2) + jnp.sum(th**4)  # noqa: E731
    tx = optax.sgd(0.1)
    problem = bj.BilevelProblem(loss, loss, tx)
    th, lam = jnp.full(2, 0.5), jnp.ones(2)
    inputs = bj.BilevelInputs(th, lam, tx.init(th), None, None)
    mine = Implicit(solver=my_solver, name="mine")
    got, _ = mine.hypergrad(problem, inputs, mine.init(th, lam))
    want, _ = bj.exact().hypergrad(problem, inputs, None)
    assert calls == [None]
    assert jnp.array_equal(got.meta_grad, want.meta_grad)
    assert repr(mine) == "Implicit(solver=my_solver, warm_start=False, name='mine')"


@pytest.mark.parametrize(
    "tx, text",
    [
        (optax.sgd(0.1), "chain(identity, scale(step_size=-0.1))"),
        (
            optax.sgd(0.1, momentum=0.9),
            "chain(trace(accumulator_dtype=None, decay=0.9, nesterov=False), scale(step_size=-0.1))",
        ),  # noqa: E501
        (optax.clip_by_global_norm(2.0), "clip_by_global_norm(max_norm=2.0)"),
        (
            optax.masked(optax.scale(3.0), {"a": True}),
            "masked(inner=scale(step_size=3.0), mask={'a': True})",
        ),
        (
            optax.MultiSteps(optax.scale(2.0), 4).gradient_transformation(),
            "MultiSteps(scale(step_size=2.0), every_k_schedule=4)",
        ),
    ],
)
def test_transform_repr_reads_the_settings(tx, text):
    assert bj._checks.transform_repr(tx) == text


def test_bilevel_step_repr_has_no_addresses_and_tells_settings_apart():
    def base(t, lam, b):
        return jnp.sum((t - lam * b) ** 2)

    def make(lr):
        sel = bj.Selection(score_fn=lambda lam, b: b, keep=1, rule="sample")
        return bj.bilevel_step(
            base, base, optax.adam(lr), optax.sgd(0.1), bj.soba(z_tx=optax.sgd(lr)),
            selection=sel, train_loss=lambda t, b: jnp.sum(t * b),
        )  # fmt: skip

    text = repr(make(1e-3))
    assert not re.search(r"0x[0-9a-f]+|<function|object at", text), text
    assert text == repr(make(1e-3)) and text != repr(make(2e-3))
    assert text.startswith(
        "BilevelStep(base_loss=base, meta_loss=base, base_tx=chain(scale_by_adam("
    )
    assert "z_tx=chain(identity, scale(step_size=-0.001))" in text
    assert "selection=Selection(score_fn=<lambda>, keep=1, rule='sample'" in text
