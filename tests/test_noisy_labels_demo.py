"""Tests for experiments/noisy_labels_demo.py: the weighted loss and a short end-to-end run."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bilevel_jax as bj
from experiments import noisy_labels_demo as nl
from experiments.models import weighted_cross_entropy
from tests import _xla
from tests._quick import check_provenance

ROOT = Path(__file__).resolve().parents[1]


def _batch(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.random((n, 784), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, n), jnp.int32)
    return x, y


def _mwn_constant(lam, value_logit):
    """MWN parameters whose output is σ(value_logit) for every input (zero output kernel)."""
    lam = jax.tree.map(lambda a: a, lam)
    lam["fc2"]["kernel"] = jnp.zeros_like(lam["fc2"]["kernel"])
    lam["fc2"]["bias"] = jnp.full_like(lam["fc2"]["bias"], value_logit)
    return lam


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_weighted_ce_with_unit_weights_is_plain_ce(normalize):
    logits = jax.random.normal(jax.random.key(0), (16, 10)) * 3
    labels = jnp.arange(16) % 10
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    got = weighted_cross_entropy(logits, labels, jnp.ones(16), normalize)
    np.testing.assert_allclose(got, ce, rtol=1e-6)


def test_weighted_ce_normalisations():
    logits = jax.random.normal(jax.random.key(1), (4, 10))
    labels = jnp.array([0, 1, 2, 3])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = jnp.array([1.0, 0.0, 3.0, 0.0])
    np.testing.assert_allclose(
        weighted_cross_entropy(logits, labels, w, "sum"), (ce[0] + 3 * ce[2]) / 4, rtol=1e-6
    )
    np.testing.assert_allclose(
        weighted_cross_entropy(logits, labels, w, "mean"), (ce[0] + 3 * ce[2]) / 4, rtol=1e-6
    )
    # "sum" is invariant to a common scale of the weights; "mean" is not
    np.testing.assert_allclose(
        weighted_cross_entropy(logits, labels, 0.3 * jnp.ones(4), "sum"), ce.mean(), rtol=1e-6
    )
    with pytest.raises(ValueError):
        weighted_cross_entropy(logits, labels, w, "max")  # pyright: ignore[reportArgumentType]  (deliberately wrong: tests the error)


@pytest.mark.parametrize("normalize", ["sum", "mean"])
def test_base_loss_with_all_weights_one_equals_plain_ce(normalize):
    cfg = dataclasses.replace(nl.Config(), normalize=normalize)
    losses, theta, lam = nl.make_losses(cfg, seed=3)
    lam1 = _mwn_constant(lam, 50.0)  # σ(50) == 1.0 exactly in float32
    x, y = _batch()
    w = losses.weights(theta, lam1, x, y)
    assert np.all(np.asarray(w) == 1.0)
    plain = losses.plain(theta, (x, y))
    ce = optax.softmax_cross_entropy_with_integer_labels(nnx.merge(losses.model_def, theta)(x), y)
    np.testing.assert_allclose(plain, ce.mean(), rtol=1e-6)
    np.testing.assert_allclose(losses.base(theta, lam1, (x, y)), plain, rtol=1e-6)
    np.testing.assert_allclose(losses.meta(theta, lam1, (x, y)), plain, rtol=1e-6)


def test_flat_mwn_init_and_sum_normalisation_start_as_plain_training():
    losses, theta, lam = nl.make_losses(nl.Config(), seed=0)  # default: MWN starts flat
    x, y = _batch(seed=1)
    np.testing.assert_allclose(losses.weights(theta, lam, x, y), 0.5, rtol=1e-6)
    g_base = jax.grad(losses.base)(theta, lam, (x, y))
    g_plain = jax.grad(losses.plain)(theta, (x, y))
    for a, b in zip(jax.tree.leaves(g_base), jax.tree.leaves(g_plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_base_loss_weights_see_no_gradient_through_the_loss_input():
    # w_i = MWN(stop_gradient(ℓ_i)): ∇_θ L_b = Σ w_i ∇ℓ_i / Σ w_i with w held fixed
    losses, theta, lam = nl.make_losses(dataclasses.replace(nl.Config(), mwn_out_scale=1.0), seed=2)
    x, y = _batch(seed=2)
    w = losses.weights(theta, lam, x, y)

    def fixed(th):
        logits = nnx.merge(losses.model_def, th)(x)
        return weighted_cross_entropy(logits, y, w, "sum")

    for a, b in zip(
        jax.tree.leaves(jax.grad(losses.base)(theta, lam, (x, y))),
        jax.tree.leaves(jax.grad(fixed)(theta)),
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = _xla.flags()  # the suite's compile flags, no fake devices
    return subprocess.run(
        [sys.executable, "-m", "experiments.noisy_labels_demo", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_short_run_cli(tmp_path):
    """The main job end to end, very short: both accuracies valid, learned weights finite."""
    out = tmp_path / "nl.json"
    proc = _cli("--quick", "--seeds", "1", "--json", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sha256=" in proc.stdout and "difference (SAMA - plain)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["seeds"] == [1]
    check_provenance(result, "experiments.noisy_labels_demo")
    assert (tmp_path / "nl.png").stat().st_size > 0
    (rec,) = result["runs"]
    for k in ("plain", "sama", "seed", "config", "data", "wall_s"):
        assert k in rec
    for k in ("plain", "sama"):
        assert math.isfinite(rec[k]) and 0.0 <= rec[k] <= 1.0
    assert rec["plain"] > 0.2 and rec["sama"] > 0.2  # 60 Adam steps learn something
    assert rec["seed"] == 1 and rec["config"]["base_steps"] == 60
    assert rec["config"]["method"] == repr(nl.Config.method)
    assert rec["data"]["sha256"] and rec["data"]["path"].endswith("mnist_5k.csv.gz")
    assert rec["mwn_weights_finite"] and rec["nonfinite_meta_steps"] == 0
    assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for _, ws in rec["mwn_curve"] for v in ws)
    assert math.isfinite(rec["mwn_weight_clean"]) and math.isfinite(rec["mwn_weight_flipped"])
    # bj.fit's JSON lines of the SAMA run: one per meta step (60 steps / meta_interval 10)
    lines = [
        json.loads(ln) for ln in (tmp_path / "nl.seed1.metrics.jsonl").read_text().splitlines()
    ]
    assert [r["meta_steps"] for r in lines] == list(range(1, 7))
    assert [r["base_steps"] for r in lines] == list(range(10, 70, 10))
    for r in lines:
        for k in ("base_loss", "meta_loss", "hypergrad_norm", "eps", "v_norm"):
            assert math.isfinite(r[k]), (k, r)
        assert r["base_skipped"] == 0 and r["meta_skipped"] == 0
    assert lines[-1]["eval"]["test_acc"] == rec["sama"]  # evaluated after the last step
    assert rec["metrics_jsonl"].endswith("nl.seed1.metrics.jsonl")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "60"], "--steps is gone: use --base-steps N"),
        (["--seed", "1"], "--seed is gone: use --seeds N"),
        (["--base-steps", "65"], "must be 0 + 10·m"),
        (["--base-steps", "60", "--meta-steps", "5"], "disagree"),
    ],
)
def test_cli_rejects_retired_and_inconsistent_flags(args, message, capsys):
    # in this process (argparse exits before any data is read; test_short_run_cli runs the CLI)
    with pytest.raises(SystemExit) as exit_:
        nl.main([*args, "--json", "/nonexistent/x.json"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err[-2000:]


def test_short_run_in_process(tmp_path):
    res = nl.run(seed=0, base_steps=40, progress=False, log=None, log_path=tmp_path / "m.jsonl")
    assert 0.0 <= res["plain"] <= 1.0 and 0.0 <= res["sama"] <= 1.0
    assert res["mwn_weights_finite"] and res["nonfinite_meta_steps"] == 0
    assert res["nonfinite_base_steps"] == 0
    assert res["config"]["base_steps"] == 40
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4
    assert [s for s, _ in res["curve_sama"]] == [10, 20, 30, 40]  # eval_every = 1 chunk here


def test_sama_run_with_base_step_along_v():
    method = bj.sama(alpha=0.1, adapt_from="last", step_along_v=True)
    cfg = dataclasses.replace(nl.Config(), method=method)
    res = nl.run(seed=0, base_steps=30, config=cfg, progress=False, log=None)
    assert res["config"]["method"] == repr(method)
    assert 0.0 <= res["sama"] <= 1.0 and res["nonfinite_meta_steps"] == 0
