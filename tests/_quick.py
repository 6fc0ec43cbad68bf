"""Run an experiment's ``--quick`` mode in a subprocess and check what every study must record."""

import json

from tests._run_module import run_module


def run_quick(module: str, tmp_path, stem: str, timeout: float) -> tuple[dict, list[str]]:
    """``python -m module --quick --json tmp_path/stem.json``; returns (JSON, metrics JSON lines)."""
    out = tmp_path / f"{stem}.json"
    proc = run_module(module, "--quick", "--no-progress", "--json", str(out), timeout=timeout)
    assert "sha256=" in proc.stdout  # the data file read is reported
    r = json.loads(out.read_text())
    assert r["quick"] is True and r["config"]["seeds"] == [0]
    assert r["data"]["sha256"] and r["data"]["path"].endswith("mnist_5k.csv.gz")
    assert r["provenance"]["git_commit"] is not None
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    return r, (tmp_path / f"{stem}.metrics.jsonl").read_text().splitlines()
