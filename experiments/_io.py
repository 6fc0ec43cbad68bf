"""Writing an experiment's results: JSON next to its PNG."""

from __future__ import annotations

import json
import os
from typing import Callable


def save_results(
    result: dict, json_path: str, png_path: str | None, plot: Callable[[dict, str], None]
) -> str:
    """Write ``result`` as JSON to ``json_path`` and its plot to ``png_path``
    (default: the JSON path with ``.png``); returns the PNG path."""
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    with open(json_path, "w") as f:
        json.dump(result, f, indent=1)
    png = png_path or os.path.splitext(json_path)[0] + ".png"
    plot(result, png)
    return png
