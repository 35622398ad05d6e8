"""How every benchmark leaves its result: JSON (the numbers), Markdown (the table that
goes into docs/BENCHMARKS.md) and PNG (the plot), side by side in the --out folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(out: Path, stem: str, result: dict[str, Any], table: str, plot: Any) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{stem}.md").write_text(table + "\n")
    plot(result, out / f"{stem}.png")
    print(table)
    print(f"\nwrote {out / (stem + '.json')}, {out / (stem + '.md')}, {out / (stem + '.png')}")
