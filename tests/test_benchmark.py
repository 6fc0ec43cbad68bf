"""experiments/benchmark.py: the JSON it writes, and that its compiled figures are deterministic and
mean what they say (not timed: CPU timings are noise, and speed claims live in the benchmark)."""

import json
import math

import pytest

from experiments import benchmark as bm

# The methods the comparisons below need; the others compile programs of the same kinds (each
# method costs the suite about 15 s of compilation on 2 cores).
METHODS = ("sama", "sama_na", "darts", "neumann", "cg", "itd", "sama_fresh")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    bm.main(
        [
            "--models",
            "mlp_256",
            "--methods",
            *METHODS,
            "--timed",
            "2",
            "--timed-e2e",
            "1",
            "--no-progress",
            "--json",
            str(path),
        ]
    )
    assert path.with_suffix(".png").stat().st_size > 0
    return json.loads(path.read_text())


def test_provenance_and_settings_are_recorded(result):
    prov = result["provenance"]
    assert prov["git_commit"] and prov["command"].startswith("python -m experiments.benchmark")
    assert prov["packages"]["jax"] and prov["device"]["count"] >= 1
    assert [f["name"] for f in prov["data_files"]] == ["mnist_5k"]
    assert result["_config"]["hypergrad"]["neumann"] == repr(bm.METHODS["neumann"][0])


@pytest.mark.parametrize("flag", [["--seeds", "1"], ["--base-steps", "10"], ["--meta-steps", "3"]])
def test_flags_that_mean_nothing_here_are_rejected(flag, capsys):
    with pytest.raises(SystemExit) as e:
        bm.main([*flag, "--json", "/nonexistent/x.json"])
    assert e.value.code == 2
    assert "not used by this study" in capsys.readouterr().err


def test_json_has_every_model_method_and_key_with_finite_values(result):
    r = result["mlp_256"]
    assert set(r) == {"plain", "_model", *METHODS}
    for method in ["plain", *METHODS]:
        for key in bm.RESULT_KEYS:
            value = r[method][key]
            assert isinstance(value, (int, float)) and math.isfinite(value), (method, key, value)
            assert value > 0, (method, key, value)
    for key in (
        "mem_ratio_vs_plain",
        "time_ratio_vs_plain",
        "flop_ratio_vs_plain",
        "train_throughput_ratio",
    ):
        assert r["plain"][key] == 1.0
    assert r["_model"]["n_params"] == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert set(result["_goals"]["mlp_256"]) >= {
        "mem_vs_plain",
        "time_vs_flop_scaled_plain",
        "throughput_vs_plain",
        "mem_vs_neumann",
        "mem_vs_cg",
    }


def test_plain_step_flops_match_the_matmul_count(result):
    """A plain MLP step: forward 2·B·Σ in·out, backward twice that, except the input layer's
    gradient with respect to the data, which is not needed."""
    b, dims = bm.BATCH, (784, 256, 256, 10)
    layers = list(zip(dims[:-1], dims[1:]))
    expected = sum(
        (4 if i == 0 else 6) * b * n_in * n_out for i, (n_in, n_out) in enumerate(layers)
    )
    assert result["mlp_256"]["plain"]["flops"] == pytest.approx(expected, rel=0.03)


def test_first_order_methods_cost_fewer_flops_than_second_order_ones(result):
    r = result["mlp_256"]
    for cheap in ("sama", "sama_na", "darts"):
        for costly in ("neumann", "cg", "itd"):
            assert r[cheap]["flops"] < r[costly]["flops"], (cheap, costly)
    # "fresh" adaptation pays for one more backward pass than "last"
    assert r["sama_fresh"]["flops"] > r["sama"]["flops"] + 0.5 * r["plain"]["flops"]


def test_compiled_memory_and_flops_are_deterministic_across_compilations():
    datasets = {"mnist": bm.data_lib.load_mnist5k()}
    p = bm.make_problem(bm.MODELS["mlp_256"], datasets)
    for name in ("sama", "cg"):
        fn, args = bm.meta_step(p, bm.METHODS[name][0])
        _, first = bm.compile_stats(fn, args, donate=bm.META_DONATE)
        _, second = bm.compile_stats(fn, args, donate=bm.META_DONATE)
        assert first == second, (name, first, second)


def test_memory_slope_is_a_least_squares_fit():
    fake = {
        f"mlp_{i}": {
            "_model": {"n_params": n, "batch": bm.BATCH},
            "plain": {"temp_bytes": 4 * n + 100},
            "sama": {"temp_bytes": 8 * n + 50},
        }
        for i, n in enumerate((1000, 5000, 20000))
    }
    s = bm.memory_slopes(fake, tuple(fake))
    assert s["bytes_per_param"]["plain"] == pytest.approx(4.0)
    assert s["slope_ratio_vs_plain"]["sama"] == pytest.approx(2.0)
