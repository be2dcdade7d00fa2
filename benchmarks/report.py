"""Where every benchmark's raw numbers go: one JSON file per script under benchmarks/results/."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(results: dict, path: str | Path) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults: {out}")
