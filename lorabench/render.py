"""Render rows (list of dicts) as a terminal table, markdown, JSON or CSV (torch-free)."""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Sequence

from tabulate import tabulate


def render(rows: Sequence[dict[str, Any]], fmt: str, title: str = "", extra: dict[str, Any] | None = None) -> str:
    """One table in the requested format; ``extra`` is merged into the JSON document."""
    if fmt == "json":
        doc: dict[str, Any] = {"rows": list(rows)}
        doc.update(extra or {})
        return json.dumps(doc, indent=2, sort_keys=False)
    if fmt == "csv":
        buf = io.StringIO()
        if rows:
            writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        return buf.getvalue().rstrip("\n")
    table = tabulate(rows, headers="keys", tablefmt="github" if fmt == "markdown" else "simple",
                     disable_numparse=True)
    return f"{title}\n{table}" if title else table
