"""Benchmark bookkeeping: print a table, and write it as JSON with the device, commit, command and date."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path

from nano.provenance import commit, device_name  # noqa: F401  (re-exported for the scripts)

RESULTS = Path(__file__).parent / "results"
# The commit the benchmark starts from: a long run outlives commits made meanwhile.
STARTED_AT = commit()


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def write(name: str, rows: list[dict], columns: list[str], device: str, **extra) -> Path:
    print(table(rows, columns))
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "device": device_name(device),
        "commit": STARTED_AT,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
        "rows": rows,
    }
    out = Path(os.environ.get("NANO_RESULTS", RESULTS)) / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out
