"""Turning measurements into reports: percentiles and JSON files (shared by commands, benches and the demo)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float, digits: int = 1) -> float | None:
    """Nearest-rank percentile (the value at rank ceil(q/100 * n)); None for no data."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return round(ordered[rank - 1], digits)


def write_json(path: Path | None, report: dict[str, Any]) -> None:
    """Write ``report`` as indented, key-sorted JSON (nothing when ``path`` is None)."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
