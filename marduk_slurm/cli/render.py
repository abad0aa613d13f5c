"""Readable tables and times for the CLI; `--json` bypasses all of this."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO


def fmt_time(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def fmt_ago(ts: float | None, now: float | None = None) -> str:
    if not ts:
        return "-"
    age = (now or time.time()) - ts
    if age < 1:
        return "now"
    if age < 120:
        return f"{age:.0f}s ago"
    if age < 7200:
        return f"{age / 60:.0f}m ago"
    return f"{age / 3600:.1f}h ago"


def short_uuid(uuid: str) -> str:
    return uuid if len(uuid) <= 16 else uuid[:13] + "..."


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO = sys.stdout
          ) -> None:
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r]
                                           for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        print(line, file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    if not rows:
        print("(none)", file=out)


def as_json(data: Any, out: TextIO = sys.stdout) -> None:
    json.dump(data, out, indent=2, sort_keys=True, default=str)
    out.write("\n")
