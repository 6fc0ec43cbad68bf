"""The multilevel engine (bilevel_jax.multilevel) against closed forms, the bilevel methods and
Betty's path semantics; float64 where numbers are compared."""

import collections
import dataclasses
import itertools
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bilevel_jax as bj
from bilevel_jax.multilevel import MultilevelState, Problem, multilevel_step


def _spd(key, n, shift):
    q = jax.random.normal(key, (n, n))
    return q @ q.T / n + shift * jnp.eye(n)


def _mats(seed=0, n1=3, n2=2, k=2):
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    return dict(
        A1=_spd(ks[0], n1, 1.0),
        B1=jax.random.normal(ks[1], (n1, k)),
        A2=_spd(ks[2], n2, 1.0),
        B2=jax.random.normal(ks[3], (n2, n1)),
        C=jax.random.normal(ks[4], (2, n2)),
        t=jax.random.normal(ks[5], (2,)),
        D=jax.random.normal(ks[6], (2, n1)),
        s=jax.random.normal(ks[7], (2,)),
        rho=0.3,
    )


def _trilevel(m, low_method, mid_method, *, smooth=False, unroll=(1, 1), lrs=(0.1, 0.1, 0.1)):
    """low reads top (x); mid reads low's best response; top reads mid's and low's.

    Quadratic: θ1* = A1⁻¹(B1 x − b), θ2* = A2⁻¹ B2 θ1*. ``smooth``: sin couplings instead of
    the bilinear ones (the mixed derivatives then vary with θ, so finite differences err).
    """

    def f_low(th, r, b):
        x = r["top"]
        couple = jnp.sin(th) @ (m["B1"] @ x) if smooth else th @ (m["B1"] @ x)
        return 0.5 * th @ m["A1"] @ th - couple + th @ b

    def f_mid(th, r, b):
        low = r["low"]
        couple = jnp.sin(th) @ (m["B2"] @ low) if smooth else th @ (m["B2"] @ low)
        return 0.5 * th @ m["A2"] @ th - couple + th @ b

    def f_top(x, r, b):
        del b
        return (
            0.5 * jnp.sum((m["C"] @ r["mid"] - m["t"]) ** 2)
            + 0.5 * jnp.sum((m["D"] @ r["low"] - m["s"]) ** 2)
            + 0.5 * m["rho"] * x @ x
        )

    return multilevel_step(
        [
            Problem(
                "low", f_low, optax.sgd(lrs[0]), reads=("top",), unroll=unroll[0], method=low_method
            ),
            Problem(
                "mid", f_mid, optax.sgd(lrs[1]), reads=("low",), unroll=unroll[1], method=mid_method
            ),
            Problem("top", f_top, optax.sgd(lrs[2]), reads=("mid", "low")),
        ]
    )


def _closed_form(m):
    M1 = jnp.linalg.solve(m["A1"], m["B1"])
    M2 = jnp.linalg.solve(m["A2"], m["B2"])
    J2, J1 = m["C"] @ M2 @ M1, m["D"] @ M1
    H = J2.T @ J2 + J1.T @ J1 + m["rho"] * jnp.eye(M1.shape[1])
    rhs = J2.T @ m["t"] + J1.T @ m["s"]
    return M1, M2, H, rhs  # grad(x) = H x − rhs


def _at_best_response(step, m, x):
    M1, M2, _, _ = _closed_form(m)
    th1 = M1 @ x
    return step.init({"low": th1, "mid": M2 @ th1, "top": x})


def _single_batches(m):
    return {"low": jnp.zeros(m["A1"].shape[0]), "mid": jnp.zeros(m["A2"].shape[0]), "top": None}


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("method", [bj.exact(), bj.cg(20)], ids=["exact", "cg"])
def test_trilevel_quadratic_matches_closed_form(x64, method):
    m = _mats()
    step = _trilevel(m, method, method)
    x = jnp.array([0.7, -1.3])
    state = _at_best_response(step, m, x)
    _, _, H, rhs = _closed_form(m)
    want = H @ x - rhs
    got, finite = step.hypergrad(state, _single_batches(m), "top")
    assert bool(finite)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(want))))
    oracle = step.oracle_grad(state, _single_batches(m), "top")
    np.testing.assert_allclose(oracle, want, rtol=0, atol=1e-12 * float(jnp.max(jnp.abs(want))))
    # and the check can fail: dropping the path through mid is far off
    direct = jax.grad(step.problems[2].loss)(
        x, {"mid": state.params["mid"], "low": state.params["low"]}, None
    )
    assert float(jnp.max(jnp.abs(direct - want))) > 1e-2


@pytest.mark.parametrize("name", ["darts", "sama", "sama_na"])
def test_finite_difference_edges_are_second_order_in_alpha(x64, name):
    """Central-difference edges vs the same method's exact forward-mode product ("jvp"):
    the error is O(α²), so it shrinks ~4× when α halves (smooth, non-quadratic couplings)."""
    make = {"darts": bj.darts, "sama": bj.sama, "sama_na": bj.sama_na}[name]
    m = _mats(1)
    x = jnp.array([0.4, 0.9])
    params = {"low": jnp.array([0.3, -0.2, 0.5]), "mid": jnp.array([0.1, 0.6]), "top": x}

    def grad(method):
        step = _trilevel(m, method, method, smooth=True)
        return step.hypergrad(step.init(params), _single_batches(m), "top")[0]

    exact = grad(make(0.1, difference="jvp"))
    errs = [float(jnp.linalg.norm(grad(make(a)) - exact)) for a in (0.04, 0.02, 0.01)]
    assert errs[0] > 1e-8  # the finite difference does err here
    for big, small in itertools.pairwise(errs):
        assert 3.6 < big / small < 4.4, errs


_BILEVEL_METHODS = [
    bj.exact(),
    bj.cg(10),
    bj.neumann(10, eta=0.1),
    bj.sama(0.1),
    bj.sama_na(0.1),
    bj.darts(),
]


@pytest.mark.parametrize("method", _BILEVEL_METHODS, ids=lambda m: m.name)
def test_identity_middle_level_reproduces_the_bilevel_method_bit_for_bit(x64, method):
    """base → mid (φ* = θ, an identity best response with an exact edge) → meta gives each
    method's bilevel meta-gradient exactly: the identity edge passes its cotangent unchanged
    (H = I, dense solve), the linear meta loss ⟨θ, c⟩ gives d = c exactly, and the sweep adds
    ∇_λL_m + h as assemble does."""
    m = _mats(2)
    A, B, C, t = m["A1"], m["B1"], m["D"], m["s"]

    def base_loss(th, lam, b):
        return 0.5 * th @ A @ th - th @ (B @ lam) + 0.1 * jnp.sum(jnp.log(jnp.cosh(th))) + th @ b

    def meta_loss(th, lam, b):
        return 0.5 * jnp.sum((C @ th - t) ** 2) + 0.1 * lam @ lam + b * jnp.sum(lam)

    tx = optax.sgd(0.1)
    th, lam = jnp.array([0.3, -0.4, 0.8]), jnp.array([0.5, -1.5])
    bb, mb = jnp.array([0.1, 0.0, -0.2]), jnp.asarray(0.3)
    problem = bj.BilevelProblem(base_loss, meta_loss, tx)
    inputs = bj.BilevelInputs(th, lam, tx.init(th), bb, mb)
    want = method.hypergrad(problem, inputs, method.init(th, lam))[0].meta_grad

    step = multilevel_step(
        [
            Problem(
                "base",
                lambda p, r, b: base_loss(p, r["meta"], b),
                tx,
                reads=("meta",),
                method=method,
            ),
            Problem(
                "mid",
                lambda p, r, b: 0.5 * jnp.sum((p - r["base"]) ** 2),
                optax.sgd(0.1),
                reads=("base",),
                method=bj.exact(),
            ),
            Problem(
                "meta", lambda p, r, b: meta_loss(r["mid"], p, b), optax.sgd(0.1), reads=("mid",)
            ),
        ]
    )
    state = step.init({"base": th, "mid": th + 0.0, "meta": lam})
    got, finite = step.hypergrad(state, {"base": bb, "mid": None, "meta": mb}, "meta")
    assert bool(finite)
    np.testing.assert_array_equal(got, want)
    assert float(jnp.max(jnp.abs(want - jax.grad(meta_loss, 1)(th, lam, mb)))) > 1e-3


class _Counting:
    """A method that counts its (trace-time) hypergrad calls, delegating to ``inner``."""

    def __init__(self, inner, counts, key):
        self.inner, self.counts, self.key = inner, counts, key
        self.name, self.step_along_v, self.uses_last_step = inner.name, False, False

    def init(self, base_params, meta_params):
        return self.inner.init(base_params, meta_params)

    def hypergrad(self, problem, inputs, state):
        self.counts[self.key] += 1
        return self.inner.hypergrad(problem, inputs, state)


def _linear_vjp(loss, theta, lam, tx, batch, c):
    """cᵀ dθ*/dλ of ``loss``'s best response, with the library's exact method, by hand."""
    meta = lambda th, l, b: jnp.vdot(th, c)  # noqa: E731
    problem = bj.BilevelProblem(loss, meta, tx)
    inputs = bj.BilevelInputs(theta, lam, tx.init(theta), batch, None)
    return bj.exact().hypergrad(problem, inputs, None)[0].meta_grad


def test_diamond_sweep_is_the_sum_over_paths_and_visits_each_node_once(x64):
    """A reads D; B and C read A's best response; D reads B's and C's. Two paths share A."""
    ks = jax.random.split(jax.random.PRNGKey(3), 6)
    MA, MB, MC = (jax.random.normal(k, s) for k, s in zip(ks, [(3, 2), (2, 3), (2, 3)]))
    A, Bm, Cm = _spd(ks[3], 3, 1.0), _spd(ks[4], 2, 1.0), _spd(ks[5], 2, 1.5)
    t, s, rho = jnp.array([1.0, -1.0]), jnp.array([0.5, 2.0]), 0.2
    f_a = lambda th, r, b: 0.5 * th @ A @ th - th @ (MA @ r["D"])  # noqa: E731
    f_b = lambda th, r, b: 0.5 * th @ Bm @ th - th @ (MB @ r["A"])  # noqa: E731
    f_c = lambda th, r, b: 0.5 * th @ Cm @ th - th @ (MC @ r["A"])  # noqa: E731

    def f_d(x, r, b):
        return (
            0.5 * jnp.sum((r["B"] - t) ** 2) + 0.5 * jnp.sum((r["C"] - s) ** 2) + 0.5 * rho * x @ x
        )

    counts = collections.Counter()
    tx = optax.sgd(0.1)
    step = multilevel_step(
        [
            Problem("A", f_a, tx, reads=("D",), method=_Counting(bj.exact(), counts, "A")),
            Problem("B", f_b, tx, reads=("A",), method=_Counting(bj.exact(), counts, "B")),
            Problem("C", f_c, tx, reads=("A",), method=_Counting(bj.exact(), counts, "C")),
            Problem("D", f_d, tx, reads=("B", "C")),
        ]
    )
    assert step.paths("D") == [("D", "B", "A", "D"), ("D", "C", "A", "D")]
    x = jnp.array([0.3, -0.8])
    tha = jnp.linalg.solve(A, MA @ x)
    params = {
        "A": tha,
        "B": jnp.linalg.solve(Bm, MB @ tha),
        "C": jnp.linalg.solve(Cm, MC @ tha),
        "D": x,
    }
    state = step.init(params)
    batches = {n: None for n in "ABCD"}
    counts.clear()
    got, _ = step.hypergrad(state, batches, "D")
    assert dict(counts) == {"A": 1, "B": 1, "C": 1}

    # the explicit sum over the enumerated paths, edge by edge (A's VJP twice)
    losses = {"A": f_a, "B": f_b, "C": f_c}
    reads = {"B": "B", "C": "C"}
    direct, g_reads = jax.grad(f_d, argnums=(0, 1))(x, {"B": params["B"], "C": params["C"]}, None)
    total = direct
    for path in step.paths("D"):
        c = g_reads[reads[path[1]]]
        for node, below in zip(path[1:-1], path[2:]):
            lam = {below: params[below]}
            loss = lambda th, l, b, node=node: losses[node](th, l, b)  # noqa: E731
            c = _linear_vjp(loss, params[node], lam, tx, None, c)[below]
        total = total + c
    np.testing.assert_allclose(got, total, rtol=0, atol=1e-13)
    # the closed form: θ_B = Bm⁻¹MB A⁻¹MA x, θ_C likewise
    JB = jnp.linalg.solve(Bm, MB) @ jnp.linalg.solve(A, MA)
    JC = jnp.linalg.solve(Cm, MC) @ jnp.linalg.solve(A, MA)
    want = JB.T @ (JB @ x - t) + JC.T @ (JC @ x - s) + rho * x
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------ Betty's paths
def _graph(spec):
    """Problems with dummy losses from ``[(name, reads), ...]``; every node gets a method."""
    f = lambda th, r, b: jnp.sum(th**2)  # noqa: E731
    return multilevel_step(
        [Problem(n, f, optax.sgd(0.1), reads=r, method=bj.exact()) for n, r in spec]
    )


def test_paths_match_betty_on_its_examples():
    # Meta-Weight-Net: u2l = {meta: [inner]}, l2u = {inner: [meta]}
    mwn = _graph([("inner", ("meta",)), ("meta", ("inner",))])
    assert mwn.paths("meta") == [("meta", "inner", "meta")]
    assert mwn.paths("inner") == []
    assert mwn.levels == {"inner": 0, "meta": 1}
    # reweight + correct: u2l = {reweight: [classifier], correct: [classifier]},
    # l2u = {classifier: [reweight, correct]}
    rc = _graph(
        [
            ("classifier", ("reweight", "correct")),
            ("reweight", ("classifier",)),
            ("correct", ("classifier",)),
        ]
    )
    assert rc.paths("reweight") == [("reweight", "classifier", "reweight")]
    assert rc.paths("correct") == [("correct", "classifier", "correct")]
    assert rc.tops == ("reweight", "correct")
    state = rc.init({n: jnp.ones(2) for n in ("classifier", "reweight", "correct")})
    state, _ = rc(state, {"classifier": None}, {"reweight": None, "correct": None})
    assert {n: int(v) for n, v in state.steps.items()} == {
        "classifier": 1,
        "reweight": 1,
        "correct": 1,
    }
    # the trilevel reweight → pretrain → finetune (Betty's 3-level example):
    # u2l = {reweight: [pretrain]}, l2u = {pretrain: [finetune, reweight], finetune: [reweight]}
    tri = _graph(
        [
            ("pretrain", ("reweight",)),
            ("finetune", ("pretrain",)),
            ("reweight", ("finetune", "pretrain")),
        ]
    )
    assert tri.paths("reweight") == [
        ("reweight", "finetune", "pretrain", "reweight"),
        ("reweight", "pretrain", "reweight"),
    ]
    assert tri.paths("finetune") == [] and tri.paths("pretrain") == []
    assert tri.levels == {"pretrain": 0, "finetune": 1, "reweight": 2}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ([("a", ("b",)), ("a", ())], "unique"),
        ([("a", ("zz",)), ("b", ("a",))], "not problems of the graph"),
        ([("a", ("b",)), ("b", ("b",))], "reads itself"),
        ([("a", ("b",)), ("b", ())], "no chain of best responses"),
        ([("a", ()), ("c", ()), ("b", ("a",))], "'c' .* read by no higher problem"),
    ],
)
def test_graph_validation_names_the_problem(spec, match):
    with pytest.raises(ValueError, match=match):
        _graph(spec)


def test_validation_of_methods_unrolls_and_batches():
    f = lambda th, r, b: jnp.sum(th**2)  # noqa: E731
    with pytest.raises(ValueError, match="give 'a' a method"):
        multilevel_step(
            [
                Problem("a", f, optax.sgd(0.1), reads=("b",)),
                Problem("b", f, optax.sgd(0.1), reads=("a",)),
            ]
        )
    with pytest.raises(ValueError, match="different unroll counts"):
        multilevel_step(
            [
                Problem("a", f, optax.sgd(0.1), reads=("c",), unroll=2, method=bj.exact()),
                Problem("b", f, optax.sgd(0.1), reads=("c",), unroll=3, method=bj.exact()),
                Problem("c", f, optax.sgd(0.1), reads=("a", "b")),
            ]
        )
    with pytest.raises(ValueError, match="step_along_v"):
        Problem("a", f, optax.sgd(0.1), method=bj.sama(step_along_v=True))
    with pytest.raises(TypeError, match="method must be"):
        Problem("a", f, optax.sgd(0.1), method="cg")
    step = _graph([("inner", ("meta",)), ("meta", ("inner",))])
    state = step.init({"inner": jnp.zeros(2), "meta": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"batch of problem 'inner'.*leading axes must be \(1,\)"):
        step(state, {"inner": jnp.zeros(2), "meta": jnp.zeros(2)})
    with pytest.raises(ValueError, match="missing \\['meta'\\]"):
        step.init({"inner": jnp.zeros(2)})


def _nested_chain(nested):
    """L0 reads L1 (current); L1 reads L0's best response and top (current); top reads L1's
    best response: L1 has its own hypergradient and top differentiates through it."""
    f = lambda th, r, b: jnp.sum((th - sum(r.values())) ** 2)  # noqa: E731
    return multilevel_step(
        [
            Problem("L0", f, optax.sgd(0.1), reads=("L1",), method=bj.exact()),
            Problem("L1", f, optax.sgd(0.1), reads=("L0", "top"), method=bj.exact()),
            Problem("top", f, optax.sgd(0.1), reads=("L1",)),
        ],
        nested=nested,
    )


def test_nested_middle_level_is_refused_or_warned(x64):
    with pytest.raises(ValueError, match=r"\['L1'\] are genuinely nested"):
        _nested_chain("refuse")
    with pytest.warns(RuntimeWarning, match="direct-cost"):
        step = _nested_chain("betty")
    assert step.paths("L1") == [("L1", "L0", "L1")] and step.paths("top") == [("top", "L1", "top")]
    state = step.init(
        {"L0": jnp.array([0.5, 1.0]), "L1": jnp.array([0.2, -0.1]), "top": jnp.array([1.0, 2.0])}
    )
    b = {"L0": None, "L1": None, "top": None}
    np.testing.assert_allclose(
        step.hypergrad(state, b, "top")[0], step.oracle_grad(state, b, "top"), atol=1e-12
    )
    with pytest.raises(ValueError, match="nested must be one of"):
        _nested_chain("exact")


# ------------------------------------------------------------------------------------ the step
def test_exact_edges_with_long_unrolls_converge_to_the_minimiser(x64):
    m = _mats(3)  # the top's Hessian has condition number 6.8
    _, _, H, rhs = _closed_form(m)
    x_star = jnp.linalg.solve(H, rhs)
    lr_top = 1.0 / float(jnp.linalg.eigvalsh(H)[-1])
    lr1 = 1.0 / float(jnp.linalg.eigvalsh(m["A1"])[-1])
    lr2 = 1.0 / float(jnp.linalg.eigvalsh(m["A2"])[-1])
    step = _trilevel(m, bj.exact(), bj.exact(), unroll=(25, 25), lrs=(lr1, lr2, lr_top))
    state = step.init({"low": jnp.zeros(3), "mid": jnp.zeros(2), "top": jnp.array([2.0, -2.0])})
    batches = {"low": jnp.zeros((25, 25, 3)), "mid": jnp.zeros((25, 2)), "top": None}
    run = jax.jit(step, donate_argnums=0)
    for _ in range(200):
        state, _ = run(state, batches)
    assert float(jnp.linalg.norm(state.params["top"] - x_star)) < 1e-9 * float(
        jnp.linalg.norm(x_star)
    )
    assert int(state.steps["low"]) == 200 * 625 and int(state.meta_steps) == 200


def _mwn():
    """Meta-Weight-Net shaped: inner fits weighted targets, meta (the weights' scale) is judged
    on a clean target."""

    def inner(w, r, batch):
        return jnp.mean(jax.nn.softplus(r["meta"]) * (w - batch) ** 2)

    def meta(lam, r, y):
        return jnp.mean((r["inner"] - y) ** 2) + 0.01 * jnp.sum(lam**2)

    return multilevel_step(
        [
            Problem("inner", inner, optax.sgd(0.3), reads=("meta",), unroll=3, method=bj.cg(5)),
            Problem("meta", meta, optax.adam(0.05), reads=("inner",)),
        ]
    )


def _mwn_data(i):
    base = jnp.arange(6.0).reshape(3, 2) / (i + 1)
    return {"inner": base}, jnp.array([1.0, -1.0]) * i


def test_step_compiles_once_and_skips_only_the_nonfinite_problem():
    step = _mwn()
    traces = collections.Counter()

    def counted(state, batches, top):
        traces["step"] += 1
        return step(state, batches, top)

    run = jax.jit(counted, donate_argnums=0)
    state = step.init({"inner": jnp.zeros(2), "meta": jnp.zeros(2)})
    for i in range(4):
        state, metrics = run(state, *_mwn_data(i))
    assert traces["step"] == 1 and run._cache_size() == 1  # pyright: ignore[reportAttributeAccessIssue]
    assert set(metrics) >= {
        "loss/inner",
        "loss/meta",
        "skipped/inner",
        "base_skipped",
        "meta_skipped",
    }
    assert int(state.skipped_base) == 0 and int(state.skipped_meta) == 0

    # a NaN in the first inner batch of the unroll: that inner step only is skipped
    lower, top = _mwn_data(5)
    bad = {"inner": lower["inner"].at[0, 0].set(jnp.nan)}
    state, metrics = run(state, bad, top)
    assert int(state.skipped["inner"]) == 1 and int(state.skipped["meta"]) == 0
    assert int(metrics["skipped/inner"]) == 1 and int(state.steps["inner"]) == 15
    assert bool(jnp.all(jnp.isfinite(state.params["meta"])))

    # a NaN in the top batch: the meta step only is skipped, its parameters bit-identical
    before = np.asarray(state.params["meta"])
    inner_before = np.asarray(state.params["inner"])
    state, metrics = run(state, lower, jnp.array([jnp.nan, 0.0]))
    assert int(state.skipped["meta"]) == 1 and int(state.skipped["inner"]) == 1
    assert int(metrics["meta_skipped"]) == 1 and int(metrics["base_skipped"]) == 0
    np.testing.assert_array_equal(state.params["meta"], before)
    assert not np.array_equal(state.params["inner"], inner_before)
    assert traces["step"] == 1


def test_checkpoint_resume_is_bit_identical_and_fit_runs_the_step(tmp_path):
    from bilevel_jax.checkpoint import Checkpointer

    step = _mwn()
    run = jax.jit(step)
    state = step.init({"inner": jnp.zeros(2), "meta": jnp.full(2, 0.5)})
    for i in range(2):
        state, _ = run(state, *_mwn_data(i))
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(2, state)
        template = step.init({"inner": jnp.ones(2), "meta": jnp.ones(2)})
        restored = ckpt.restore(template=template).state
    assert isinstance(restored, MultilevelState)
    a, b = state, restored
    for i in range(2, 4):
        a, _ = run(a, *_mwn_data(i))
        b, _ = run(b, *_mwn_data(i))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

    # bj.fit drives it through the (state, base_batches, meta_batch) protocol
    start = step.init({"inner": jnp.zeros(2), "meta": jnp.full(2, 0.5)})
    out, history = bj.fit(
        step,
        cast(Any, start),  # fit is annotated for BilevelState; it reads only the counters
        lambda pos: (_mwn_data(i)[0] for i in itertools.count(pos)),
        lambda pos: (_mwn_data(i)[1] for i in itertools.count(pos)),
        num_meta_steps=4,
        progress=False,
    )
    assert int(out.meta_steps) == 4 and len(history) == 4
    # the logged base steps are the state's counter (inner's unroll per call), not the
    # batches' leading axis
    assert step.base_steps_per_call == step.batch_axes("inner")[0]
    assert [r["base_steps"] for r in history] == [
        (i + 1) * step.base_steps_per_call for i in range(4)
    ]
    assert history[-1]["base_steps"] == int(out.base_steps)
    for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(a), strict=True):
        np.testing.assert_array_equal(x, y)


def test_fit_logs_the_base_steps_of_three_levels(x64):
    """Three levels: the lowest problem's batch leaves carry two unroll axes (mid's unroll
    outermost), so the batches' leading axis (2) is not the steps below the top per call
    (low 2·3 + mid 2 = 8)."""
    m = _mats()
    step = _trilevel(m, bj.exact(), bj.exact(), unroll=(3, 2))
    assert step.batch_axes("low") == (2, 3) and step.base_steps_per_call == 8
    n1, n2 = jnp.shape(m["A1"])[0], jnp.shape(m["A2"])[0]
    start = step.init({"low": jnp.zeros(n1), "mid": jnp.zeros(n2), "top": jnp.zeros(2)})
    lower = {"low": jnp.zeros((2, 3, n1)), "mid": jnp.zeros((2, n2))}
    out, history = bj.fit(
        step,
        cast(Any, start),
        itertools.repeat(lower),
        itertools.repeat(jnp.zeros(())),  # top's batch (its loss reads none)
        num_meta_steps=3,
        progress=False,
    )
    assert [r["base_steps"] for r in history] == [8, 16, 24] == [8 * (i + 1) for i in range(3)]
    assert int(out.base_steps) == 24 and int(cast(Any, out).steps["low"]) == 18


def test_vjp_scale_scales_that_edge_on_every_path_through_it(x64):
    """Both of top's paths end with low's VJP, so scaling low's edge by s scales the whole
    indirect part; scaling mid's edge scales only the path through mid."""
    m = _mats()
    x = jnp.array([0.7, -1.3])

    def grads(low_scale=1.0, mid_scale=1.0):
        step = _trilevel(m, bj.exact(), bj.exact())
        probs = list(step.problems)
        probs[0] = dataclasses.replace(probs[0], vjp_scale=low_scale)
        probs[1] = dataclasses.replace(probs[1], vjp_scale=mid_scale)
        step = multilevel_step(probs)
        state = _at_best_response(step, m, x)
        g, ok = step.hypergrad(state, _single_batches(m), "top")
        assert bool(ok)
        return g

    direct = m["rho"] * x  # top's own ½ρ‖x‖² term; the rest flows through the reads
    base = grads()
    np.testing.assert_allclose(grads(low_scale=0.25) - direct, 0.25 * (base - direct), atol=1e-12)
    # mid's edge: only the (top, mid, low, top) path; the other is unchanged, so the
    # result is affine in the scale with the two paths as its parts
    via_mid = grads(mid_scale=2.0) - base  # = 1 × (that path)
    np.testing.assert_allclose(grads(mid_scale=0.0), base - via_mid, atol=1e-12)
    assert float(jnp.max(jnp.abs(via_mid))) > 1e-2  # the check can fail
