"""experiments.influence_memory --quick: LoGra's Kronecker path needs working memory that grows
with the activations, not with the parameter count (compiled XLA figures at three widths)."""

import json

from experiments import influence_memory as im
from tests._quick import check_provenance


def test_quick_kronecker_memory_does_not_grow_like_the_parameters(tmp_path):
    out = tmp_path / "mem.json"
    r = im.main(["--quick", "--no-progress", "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == r["rows"]
    assert (tmp_path / "mem.png").stat().st_size > 0
    check_provenance(r, "experiments.influence_memory", data=False)
    rows, s = r["rows"], r["slopes"]
    assert [row["width"] for row in rows] == list(im.QUICK_WIDTHS)
    assert s["param_growth"] > 10  # 64 → 256 wide: parameters ×14.5, width ×4
    # the full per-example gradients are n × params: their memory follows the parameters ...
    for name in ("generic", "naive"):
        assert s[name]["temp_growth"] > 0.8 * s["param_growth"], (name, s)
    # ... the Kronecker path's does not (it follows the width at most)
    assert s["kronecker"]["temp_growth"] < s["width_growth"], s
    for row in rows:
        assert row["kronecker"]["temp_bytes"] < row["generic"]["temp_bytes"] / 5, row
        assert row["projected_dim"] == 3 * im.K * im.K  # three layers of k × k
        # throughput was measured (its value is a benchmark figure, not asserted here)
        assert row["kronecker"]["examples_per_s"] > 0 and row["generic"]["examples_per_s"] > 0
