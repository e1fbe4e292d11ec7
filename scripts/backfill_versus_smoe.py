"""Add "versus_smoe" (tables.md's "Every model against SMoE", entry for entry) and "profile" to a results.json
written before `mhmoe reproduce` stored them, computed from the record's own "records" only.

    python scripts/backfill_versus_smoe.py docs/reproduction/cpu-2026-12-04 [DIR ...]

Models outside the record's tables (its `--models` extras) are compared with SMoE as the report does. "profile" is
"mhmoe" (our MoE settings): every record written before `--profile` existed was trained under them. Keys already
present are left as they are; the file is rewritten atomically.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mhmoe.fileio import atomic_write_text
from mhmoe.reproduction.paper_tables import TABLES, Row
from mhmoe.reproduction.report import _model_rows, versus_smoe_all


def backfill(path: Path) -> list[str]:
    source = path / "results.json" if path.is_dir() else path
    data = json.loads(source.read_text(encoding="utf-8"))
    added = []
    if "versus_smoe" not in data:
        tables = data["tables"]
        in_tables = {(r.variant, r.bitnet) for t in tables for r in TABLES[t][1]}
        extra = []
        for x in data["records"]:
            key = (x["variant"], x["bitnet"])
            if key not in in_tables and all((r.variant, r.bitnet) != key for r in extra):
                extra.append(Row(x["variant"], x["variant"], x["bitnet"]))
        vs = versus_smoe_all(data["records"], _model_rows(tables, extra))
        data["versus_smoe"] = {col: [{"variant": r.variant, "bitnet": r.bitnet, **c.as_dict()} for r, c in comps]
                               for col, comps in vs.items()}
        added.append("versus_smoe")
    if "profile" not in data:
        data["profile"] = "mhmoe"
        added.append("profile")
    if added:
        atomic_write_text(source, json.dumps(data, indent=2))
    return added


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python scripts/backfill_versus_smoe.py DIR [DIR ...]")
    for arg in sys.argv[1:]:
        print(f"{arg}: added {', '.join(backfill(Path(arg))) or 'nothing'}")
