"""Start-up loads of the controller's in-memory state from its own history.

A supervised task that loads its state at every (re)start must not crash on one row it
cannot read: it would crash again at each restart until the supervisor stops the daemon,
over a row written by an older version or by hand. Such a row is skipped, counted in
``ctx.stats["startup_rows_skipped"]`` and logged; the rest is loaded.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

# What reading a wrongly shaped row raises (a list where a dict was, a string for a number).
BAD_ROW_ERRORS = (TypeError, ValueError, AttributeError, KeyError, IndexError)
LOGGED_PER_LOAD = 3  # one line per bad row up to this many, then the count only


def apply_rows(stats: Counter[str], what: str, rows: Iterable[dict[str, Any]],
               apply: Callable[[dict[str, Any]], None]) -> int:
    """`apply` each row; skip and count the ones it cannot take. Returns the skipped count."""
    skipped = 0
    for row in rows:
        try:
            apply(row)
        except BAD_ROW_ERRORS as exc:
            skipped += 1
            stats["startup_rows_skipped"] += 1
            if skipped <= LOGGED_PER_LOAD:
                log.warning("%s: skipped event %s (%s) at start-up: %s: %s", what,
                            row.get("id"), row.get("kind"), type(exc).__name__, exc)
    if skipped:
        log.warning("%s: %d unreadable row(s) skipped at start-up", what, skipped)
    return skipped
