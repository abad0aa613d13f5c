"""Readable tables, lines and times for the CLI; `--json` bypasses all of this.

Everything human-readable that the CLI prints goes through `safe_text`, here: tables cell by
cell, lines through `say`, errors through `error`. A reason, node name or GPU UUID from the
controller (or from Slurm, or an old database row) can carry terminal escapes; they are shown
as `\\x1b`, `\\n`, `\\u202e` instead of acting on the operator's terminal.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, TextIO

from marduk_slurm.domain.input_bounds import UNSAFE_CHARS, escape_char


def safe_text(value: object) -> str:
    """`str(value)` with every control, bidi-override and line-separator character escaped
    visibly (see input_bounds.UNSAFE_CHARS)."""
    text = value if isinstance(value, str) else str(value)
    return UNSAFE_CHARS.sub(lambda match: escape_char(match.group()), text)


def say(*parts: object, out: TextIO | None = None) -> None:
    """`print` for one human-readable line: its parts are made safe first."""
    print(" ".join(safe_text(p) for p in parts), file=out or sys.stdout)


def error(message: object) -> None:
    """`marduk: <message>` on stderr (messages may quote the controller's words)."""
    print(f"marduk: {safe_text(message)}", file=sys.stderr)


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


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None
          ) -> None:
    out = out or sys.stdout  # looked up now: tests and pipes may have replaced it
    cells = [[safe_text(h) for h in headers]] + [["-" if c is None else safe_text(c)
                                                  for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        line = "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        print(line, file=out)
        if n == 0:
            print("  ".join("-" * w for w in widths), file=out)
    if not rows:
        print("(none)", file=out)


def json_text(data: Any) -> str:
    """Exact JSON: ensure_ascii escapes C0, C1 and every non-ASCII character as \\uXXXX;
    DEL, which JSON lets through raw, is escaped too (still the same string when parsed)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str, ensure_ascii=True)
    return text.replace("\x7f", "\\u007f")


def as_json(data: Any, out: TextIO | None = None) -> None:
    (out or sys.stdout).write(json_text(data) + "\n")
