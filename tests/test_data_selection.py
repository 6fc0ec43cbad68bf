"""Tests for experiments/data_selection.py (online data selection for a byte LM under domain
shift, Grangier et al. 2023): the --quick study end to end, and its pure pieces against oracles —
LTR weights against a loop of per-example gradients in float64, CDS scores against a hand-written
NLL, the two-phase bilevel call against ``step.__call__``, the weight statistics against closed
forms, and the document-level generic hold-out."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel_jax as bj
from experiments import data_selection as dsel
from experiments import lm as lm_lib
from experiments import text_data
from experiments.models import split
from tests._quick import check_provenance


def _tiny_lm(seed=0):
    return split(lm_lib.ByteLM(dim=8, heads=2, layers=1, context=6, rngs=nnx.Rngs(seed)))


def _windows(seed, n, length=7):
    return jax.random.randint(jax.random.key(seed), (n, length), 0, 256, jnp.int32)


def test_quick_records_every_method_and_regime(tmp_path):
    out = tmp_path / "ds.json"
    r = dsel.main(["--quick", "--no-progress", "--json", str(out)])
    assert out.exists() and (tmp_path / "ds.png").stat().st_size > 0
    check_provenance(r, "experiments.data_selection")
    names = {f["name"] for f in r["provenance"]["data_files"]}
    assert names == set(text_data.SOURCES)  # the target and every generic source
    assert r["seeds"] == [0] and r["quick"] is True
    generic = r["data"]["generic_names"]
    assert "news" not in generic and r["data"]["target"] == "news"
    expected = [*dsel.METHODS, "transfer"]
    assert r["methods_run"] == expected
    for regime in ("pretrain", "finetune"):
        rows = r["table"][regime]
        assert list(rows) == expected
        for m, row in rows.items():
            for key in ("specific_bpb", "specific_test_bpb", "generic_bpb"):
                (v,) = row[key]["acc"]
                assert math.isfinite(v) and 0.0 < v < 8.5, (regime, m, key, v)
                (d,) = row["delta_" + key]["acc"]
                assert d == pytest.approx(v - rows["uniform"][key]["acc"][0], abs=1e-12)
    run = r["runs"]["0"]
    for m in expected:
        mix = r["source_mix"][m]
        assert set(mix) == set(generic) and sum(mix.values()) == pytest.approx(1.0)
        assert all(v >= 0 for v in mix.values())
        n_curve = r["config"]["meta_steps"] // r["config"]["segment"] + 1
        assert (
            len(run[m]["curve"]) == n_curve
            and run[m]["curve"][-1] == run[m]["pretrain"]["specific_bpb"]
        )
        assert r["timing"][m]["per_step_s"] > 0
    assert r["timing"]["uniform"]["ratio_to_uniform"] == 1.0
    for m in ("mwn", "dds", "soba", "sama", "classifier"):  # the bilevel runs skipped nothing
        assert run[m]["skipped_base"] == 0 and run[m]["skipped_meta"] == 0
        w = run[m]["weights"]
        assert 0 < w["entropy"] <= 1 + 1e-9 and 0 < w["ess"] <= 1 + 1e-9
    assert run["uniform"]["weights"] == {"entropy": 1.0, "ess": 1.0, "top_mass": 0.125}
    # settings are recorded from the objects
    assert r["methods"]["dds"].startswith("Unrolled(") and "lr=0.1" in r["methods"]["dds"]
    assert r["selections"]["sparse"].startswith(
        "Selection(score_fn=cnn_score, keep=16, rule='top_k'"
    )
    assert r["config"]["lm_tx"] == "optax.adam(0.003)"
    assert "0x" not in json.dumps(r["steps"]) and r["steps"]["soba"].startswith("BilevelStep(")
    # cost: one compiled program per segment, no host round-trip; meta steps cost more FLOPs
    # than an LM step (each needs at least the LM's backward pass on the meta batch)
    for m in expected:
        ops = r["programs"][m]["host_transfer_ops"]
        assert ops["unconditional"] == 0, m
        # the bilevel steps keep one callback, in the branch taken on an exactly-0
        # hypergradient (bilevel_step's warning), which never ran here
        assert ops["conditional"] == (m in ("mwn", "dds", "soba", "sama", "classifier")), m
        assert r["programs"][m].get("zero_hypergradient_warned") in (None, False), m
        assert r["programs"][m]["base_steps_per_call"] == r["config"]["segment"] * 4
    cost = r["cost"]
    assert cost["lm_step"]["flops_ratio"] == 1.0 and cost["lm_step"]["time_ratio"] == 1.0
    assert cost["selection_step"]["flops_ratio"] > 1.0  # + scoring the big batch
    for m in ("mwn", "dds", "soba", "sama"):
        assert cost[f"meta_step:{m}"]["flops_ratio"] > 1.0, m
    assert cost["meta_step:soba"]["flops_ratio"] > cost["meta_step:sama"]["flops_ratio"]


def test_host_transfer_ops_sees_a_callback():
    def plain(x):
        return jnp.sin(x) * 2

    def with_callback(x):
        y = jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)
        return y * 2

    def in_branch(x):
        return jax.lax.cond(x[0] > 0, with_callback, plain, x)

    def ops(fn):
        hlo = jax.jit(fn).lower(jnp.ones(3)).compile().as_text()
        assert hlo is not None
        return dsel.host_transfer_ops(hlo)

    assert ops(plain) == {"unconditional": 0, "conditional": 0}
    assert ops(with_callback)["unconditional"] >= 1
    got = ops(in_branch)
    assert got["conditional"] >= 1 and got["unconditional"] == 0, got


def test_ltr_weights_match_a_per_example_gradient_loop(x64):
    lm_def, theta = _tiny_lm()
    theta = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), theta)
    x, meta = _windows(1, 7), _windows(2, 3)
    ltr = jax.jit(dsel.ltr_weights, static_argnums=0)
    w = ltr(lm_def, theta, x, meta)
    flat = lambda t: jnp.concatenate([a.ravel() for a in jax.tree.leaves(t)])  # noqa: E731
    v = flat(jax.grad(lambda t: lm_lib.lm_loss(lm_def, t, meta))(theta))

    def grad_of(w):  # the gradient of one window's loss
        return flat(jax.grad(lambda t: lm_lib.lm_loss(lm_def, t, w[None]))(theta))

    dots = np.asarray(jax.jit(jax.vmap(grad_of))(x) @ v)
    assert (dots > 0).any() and (dots < 0).any()  # both signs occur: the clipping is tested
    ref = np.maximum(dots, 0) / np.maximum(dots, 0).sum()
    assert w.dtype == jnp.float64
    # float64 (a float32 jvp would agree to ~1e-3 only); the dots cancel, so not to 1e-15
    np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-7, atol=1e-12)
    # copies of the meta window: every inner product is ‖∇ℓ‖² > 0, equal weights
    same = jnp.repeat(x[:1], len(x), axis=0)
    np.testing.assert_allclose(ltr(lm_def, theta, same, same[:3]), np.full(len(x), 1 / len(x)))


def test_cds_scores_are_the_generic_minus_the_fine_tuned_nll():
    lm_def, theta_g = _tiny_lm()
    specific, other = _windows(3, 4), _windows(4, 4)
    tx = optax.adam(1e-2)
    theta_s, s = theta_g, tx.init(theta_g)
    step = jax.jit(
        lambda t, s: bj.base_step(lambda p: lm_lib.lm_loss(lm_def, p, specific), tx, t, s)
    )
    for _ in range(30):
        r = step(theta_s, s)
        theta_s, s = r.params, r.opt_state

    def nll(theta, w):  # by hand: log-softmax of the logits at the next byte
        logp = jax.nn.log_softmax(nnx.merge(lm_def, theta)(w[:, :-1]), axis=-1)
        return -jnp.take_along_axis(logp, w[:, 1:, None], axis=-1)[..., 0].mean(axis=1)

    both = jnp.concatenate([specific, other])
    got = dsel.cds_scores(lm_def, theta_g, theta_s, both)
    np.testing.assert_allclose(got, nll(theta_g, both) - nll(theta_s, both), rtol=1e-5, atol=1e-5)
    assert got[:4].min() > got[4:].max()  # the fine-tuned model prefers its own windows


def test_weight_stats_closed_forms():
    n = 8
    assert dsel.weight_stats(np.full(n, 2.0), 2) == pytest.approx(
        {"entropy": 1.0, "ess": 1.0, "top_mass": 0.25}
    )
    one_hot = np.eye(n)[3]
    assert dsel.weight_stats(one_hot, 2) == pytest.approx(
        {"entropy": 0.0, "ess": 1 / n, "top_mass": 1.0}
    )
    w = np.array([0.5, 0.25, 0.25, 0.0])
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(4)
    assert dsel.weight_stats(w, 1) == pytest.approx(
        {"entropy": h, "ess": 1 / (4 * 0.375), "top_mass": 0.5}
    )
    with pytest.raises(ValueError, match="not all 0"):
        dsel.weight_stats(np.zeros(4), 1)


def test_generic_hold_out_is_by_document():
    ds = text_data.load_text_domains("news", context=64, generic=("pydoc", "usenet"), seed=0)
    data = dsel.prepare_data(ds, 30, seed=0)
    assert len(data.gen_valid) == 60 and len(data.gen_train) + 60 <= len(ds.generic)
    for sid in np.unique(ds.generic_source):
        valid = set(data.gen_valid_doc[data.gen_valid_src == sid].tolist())
        train = set(data.gen_train_doc[data.gen_train_src == sid].tolist())
        assert valid and train and not valid & train
        assert int((data.gen_valid_src == sid).sum()) == 30
    with pytest.raises(ValueError, match="too few windows"):
        dsel.prepare_data(ds, 10_000)
