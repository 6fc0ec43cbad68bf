"""Writing an experiment's results: JSON, per-step JSON lines and a PNG side by side."""

from __future__ import annotations

import json
import os
from collections.abc import Callable


def _per_step_records(result: dict) -> list[dict]:
    """One record per (method, index) from every list in each method's entry (a shorter list
    simply has no value at the indices past its end)."""
    records = []
    for method, entry in result.items():
        if not isinstance(entry, dict):
            continue
        series = {k: v for k, v in entry.items() if isinstance(v, list) and v}
        if not series:
            continue
        length = max(len(v) for v in series.values())
        for i in range(length):
            values = {k: v[i] for k, v in series.items() if i < len(v)}
            records.append({"method": method, "meta_step": i, **values})
    return records


def save_results(
    result: dict, json_path: str, png_path: str | None, plot: Callable[[dict, str], None]
) -> str:
    """Write ``result`` as JSON to ``json_path``, its per-step series as JSON lines to
    ``<stem>.metrics.jsonl`` and its plot to ``png_path`` (default ``<stem>.png``);
    returns the PNG path."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    stem = os.path.splitext(json_path)[0]
    with open(stem + ".metrics.jsonl", "w") as f:
        for record in _per_step_records(result):
            f.write(json.dumps(record) + "\n")
    png = png_path or stem + ".png"
    plot(result, png)
    return png
