"""Tests for experiments/sama_alpha.py (the α sweep behind ``bj.sama``'s default)."""

import math

import pytest

from experiments import sama_alpha
from tests._quick import check_provenance


def test_quick_sweep_records_every_alpha_and_seed(tmp_path, capsys):
    out = tmp_path / "a.json"
    r = sama_alpha.main(["--quick", "--no-progress", "--alphas", "0.1", "1.0", "--json", str(out)])
    assert "alpha 0.1 seed 0" in capsys.readouterr().out
    assert out.exists() and (tmp_path / "a.png").stat().st_size > 0
    check_provenance(r, "experiments.sama_alpha")
    assert r["seeds"] == [0] and r["base_steps"] == 10 * sama_alpha.QUICK_META_STEPS
    assert "method" not in r["config"]  # each row records its own method
    assert [row["alpha"] for row in r["alphas"]] == [0.1, 1.0]
    for row in r["alphas"]:
        assert row["method"] == f"SAMA(alpha={row['alpha']}, adapt=True, adapt_from='last', " + (
            "difference='sequential', step_along_v=False, axis_name=None, name='sama')"
        )
        (acc,) = row["sama"]["acc"]
        assert math.isfinite(acc) and 0.0 <= acc <= 1.0 and row["worst"] == acc
        assert row["skipped_meta_steps"] == [0]
    assert 0.0 < r["plain"]["mean"] <= 1.0


def test_rejects_a_non_positive_alpha(tmp_path):
    with pytest.raises(SystemExit):
        sama_alpha.main(["--quick", "--alphas", "0", "--json", str(tmp_path / "a.json")])
