"""experiments.scaling --quick: compiled training peaks of two tiny transformers (nothing is
allocated), against what the programs must hold at least."""

import json

import jax
import numpy as np
from flax import nnx

import bilevel_jax as bj
from experiments import harness
from experiments import scaling as sc
from tests._quick import check_provenance


def test_gpt_forward_is_causal_and_counts_its_parameters():
    cfg = sc.GPTConfig(2, 16, 2, vocab=11, context=6)
    model = sc.GPT(cfg, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, 11)
    logits = model(tokens)
    assert logits.shape == (2, 6, 11)
    changed = tokens.at[:, 4].set(
        (tokens[:, 4] + 1) % 11
    )  # a later token cannot move earlier logits
    np.testing.assert_allclose(model(changed)[:, :4], logits[:, :4], rtol=1e-6, atol=1e-6)
    assert not np.allclose(model(changed)[:, 4], logits[:, 4])
    D, L, V = 16, 2, 11
    per_block = 4 * D + D * 3 * D + 3 * D + D * D + D + D * 4 * D + 4 * D + 4 * D * D + D
    n = sum(a.size for a in jax.tree.leaves(bj.nnx.split_params(model)[1]))
    assert n == V * D + 6 * D + L * per_block + 2 * D


def test_matmul_flops_of_plain_training_equal_the_transformer_count():
    """Oracle: a GPT forward pass multiplies 2·B·T·D·(3D + D + 4D + 4D) per block in its dense
    layers, 2·2·B·H·T²·(D/H) in attention and 2·B·T·D·V in the tied output layer; the
    backward pass needs both operands' gradients of every product (twice the forward)."""
    cfg = sc.GPTConfig(3, 32, 4, vocab=50, context=12)
    fn, args, _ = sc.programs(cfg, ())["plain"]
    B, T, D, H, V, L = sc.BATCH, cfg.context, cfg.width, cfg.heads, cfg.vocab, cfg.layers
    forward = L * (2 * B * T * D * 12 * D + 2 * 2 * B * H * T * T * (D // H)) + 2 * B * T * D * V
    assert harness.matmul_flops(fn, args) == sc.K * 3 * forward


def test_quick_compiles_every_program_and_holds_at_least_the_state(tmp_path):
    out = tmp_path / "scaling.json"
    r = sc.main(["--quick", "--no-progress", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == r["rows"]
    assert (tmp_path / "scaling.png").stat().st_size > 0
    check_provenance(r, "experiments.scaling", data=False)
    assert [row["model"] for row in r["rows"]] == list(sc.QUICK_SIZES)
    for row in r["rows"]:
        p = 4 * row["params"]  # float32 bytes of θ
        # plain Adam holds θ, m, ν (3θ) at least; a bilevel step also λ's and its own buffers
        assert row["plain"]["peak_bytes"] >= 3 * p
        # float32 masters and moments (bf16 compute need not lower the peak: the bf16 copy of θ
        # can outweigh the halved activations, as at every size of the full run)
        assert row["plain"]["bf16"]["peak_bytes"] >= 3 * p
        for m in sc.QUICK_METHODS:
            assert row[m]["peak_bytes"] > row["plain"]["peak_bytes"], (m, row)
            assert row[m]["bf16"]["peak_bytes"] > row["plain"]["bf16"]["peak_bytes"], (m, row)
            assert row[m]["compile_s"] > 0
            # K base steps + one meta step: more than plain's K steps, and CG(5)'s ten
            # Hessian-vector products cost more than SAMA's first-order passes
            assert row[m]["flop_ratio_vs_plain"] > 1.0
        assert 1.0 < row["sama_last"]["flop_ratio_vs_plain"] < row["cg"]["flop_ratio_vs_plain"]
    assert r["slopes"]["plain"]["ratio_vs_plain"] == 1.0
