"""Run an experiment's ``--quick`` mode in a subprocess and check what every study must record."""

import json

from tests._run_module import run_module


def check_provenance(r: dict, module: str, data: bool = True) -> None:
    """What every study records: code, packages, device, data files and the command line."""
    prov = r["provenance"]
    assert prov["git_commit"] and isinstance(prov["git_dirty"], bool)
    assert set(prov["packages"]) >= {"jax", "jaxlib", "optax", "flax", "chex", "numpy"}
    assert prov["packages"]["jax"] and prov["python"]
    assert prov["command"].startswith(f"python -m {module} ") and "--quick" in prov["argv"]
    assert prov["device"]["platform"] and prov["device"]["count"] >= 1
    assert all(f["sha256"] for f in prov["data_files"]) and bool(prov["data_files"]) == data


def run_study(
    module: str, tmp_path, stem: str, *args: str, timeout: float = 300, data: bool = True
) -> dict:
    """``python -m module --quick ... --json tmp_path/stem.json``: its JSON (the PNG is checked).

    ``data``: the study reads a data file (False: its data are synthetic). The run skips XLA's
    expensive optimisations (``fast_compile``): these runs are compile-bound smoke tests, and
    none of their checks is about speed or memory (measured on the data-selection quick run:
    122 s → 92 s)."""
    out = tmp_path / f"{stem}.json"
    proc = run_module(
        module, "--quick", *args, "--json", str(out), timeout=timeout, fast_compile=True
    )
    assert ("sha256=" in proc.stdout) == data  # the data file read is reported
    assert (tmp_path / f"{stem}.png").stat().st_size > 0
    r = json.loads(out.read_text())
    assert r["quick"] is True
    check_provenance(r, module, data)
    return r


def run_quick(
    module: str, tmp_path, stem: str, *args: str, timeout: float
) -> tuple[dict, list[str]]:
    """``python -m module --quick [args] --json tmp_path/stem.json``; returns (JSON, metrics JSON
    lines)."""
    r = run_study(module, tmp_path, stem, "--no-progress", *args, timeout=timeout)
    assert r["config"]["seeds"] == [0]
    assert r["data"]["sha256"] and r["data"]["path"].endswith("mnist_5k.csv.gz")
    return r, (tmp_path / f"{stem}.metrics.jsonl").read_text().splitlines()
