"""The replica table the dashboard follows, kept as compact rows and compared tick to tick.

Each tick reads the few columns the page shows for every replica that has not left, adds the
live numbers of the straggler detector, and compares the result with the previous tick's
rows by replica id: what was added, what changed and what was removed is the tick's `Delta`,
computed once and sent to every open page. A page that connects gets the rows themselves (a
snapshot, in parts) and then only deltas, so an idle fleet of 100,000 replicas costs a page a
few hundred bytes a tick instead of the whole list.

A row is a list in the order of `FIELDS`, not an object: the names are sent once, in the
snapshot, instead of once per row.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from marduk_slurm.adapters.store import Store

FIELDS = ("replica_id", "job_id", "replica_group", "group_rank", "node", "state",
          "last_step", "step_time_ms", "last_seen", "config_revision",
          "step_rate", "work_ms", "straggler")
STORED_FIELDS = FIELDS[:10]  # the rest are the straggler detector's live numbers
Row = tuple[Any, ...]
LiveView = dict[str, dict[str, Any]]

# The narrow reads behind every tick: ten columns as plain tuples, about 5x faster at 100,000
# replicas than `Store.replicas()` (every column as a dict, with each replica's GPU list).
# They belong in the store adapter as methods; until they move there they are the only SQL
# here.
ROWS_SQL = ("SELECT replica_id, job_id, replica_group, group_rank, node, state, last_step, "
            "ROUND(step_time_ms, 1), ROUND(last_seen, 1), config_revision "
            "FROM replicas WHERE state != 'left'")
SEEN_SINCE_SQL = ROWS_SQL + " AND last_seen >= ?"
LEFT_SINCE_SQL = "SELECT replica_id FROM replicas WHERE state = 'left' AND left_at >= ?"
SLICE_SQL = ROWS_SQL + " AND replica_id > ? ORDER BY replica_id LIMIT ?"
SWEEP_TICKS = 10  # every replica is read and compared again at least every this many ticks
SLICE_MIN = 2000
MARGIN_S = 2.0  # a write committed while the previous tick read is still seen by the next


def with_live(stored: tuple[Any, ...], live: dict[str, Any] | None) -> Row:
    if live is None:
        return (*stored, None, None, False)
    work = live.get("work_ms")
    return (*stored, round(live.get("step_rate") or 0.0, 2),
            None if work is None else round(work, 1), bool(live.get("straggler")))


@dataclass
class Delta:
    """What one tick changed. `add` and `change` hold whole rows, `remove` replica ids."""

    version: int
    ts: float
    add: list[Row] = field(default_factory=list)
    change: list[Row] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> int:
        return len(self.add) + len(self.change) + len(self.remove)

    def as_json(self) -> dict[str, Any]:
        return {"v": self.version, "ts": self.ts, "add": self.add, "change": self.change,
                "remove": self.remove, "summary": self.summary}


class Summary:
    """The numbers above the table (replicas by state, jobs, stragglers), kept up to date
    row by row so that a tick does not count 100,000 rows again."""

    def __init__(self) -> None:
        self.states: Counter[str] = Counter()
        self.jobs: Counter[int] = Counter()
        self.stragglers = 0

    @classmethod
    def of(cls, rows: dict[str, Row]) -> Summary:
        summary = cls()
        summary.states = Counter(map(itemgetter(5), rows.values()))
        summary.jobs = Counter(map(itemgetter(1), rows.values()))
        summary.stragglers = sum(map(itemgetter(12), rows.values()))
        return summary

    def count(self, row: Row, sign: int) -> None:
        self.states[row[5]] += sign
        self.jobs[row[1]] += sign
        self.stragglers += sign * bool(row[12])

    def copy(self) -> Summary:
        other = Summary()
        other.states, other.jobs = self.states.copy(), self.jobs.copy()
        other.stragglers = self.stragglers
        return other

    def as_json(self) -> dict[str, Any]:
        states = {k: v for k, v in self.states.items() if v}
        return {"replicas": sum(states.values()), "states": states,
                "jobs": sum(1 for v in self.jobs.values() if v), "stragglers": self.stragglers}


class Comparison:
    """One tick's comparison of what was read with the rows before it."""

    def __init__(self, old: dict[str, Row], summary: Summary, version: int, full: bool
                 ) -> None:
        self.old = old
        self.rows: dict[str, Row] = {} if full else dict(old)
        self.summary = Summary() if full else summary.copy()
        self.full = full
        self.delta = Delta(version=version, ts=time.time())

    def put(self, row: Row) -> None:
        before = self.old.get(row[0]) if self.full else self.rows.get(row[0])
        self.rows[row[0]] = row
        if before is None:
            self.delta.add.append(row)
            if not self.full:
                self.summary.count(row, +1)
        elif before != row:
            self.delta.change.append(row)
            if not self.full:
                self.summary.count(before, -1)
                self.summary.count(row, +1)

    def remove(self, replica_id: str) -> None:
        before = self.rows.pop(replica_id, None)
        if before is not None:
            self.delta.remove.append(replica_id)
            self.summary.count(before, -1)

    def finish(self) -> tuple[dict[str, Row], Delta, Summary]:
        if self.full:
            self.delta.remove = [r for r in self.old if r not in self.rows]
            self.summary = Summary.of(self.rows)
        self.delta.summary = self.summary.as_json()
        return self.rows, self.delta, self.summary


class ReplicaTable:
    """The rows as of the last tick, and their version (one more each tick).

    The first tick reads every replica. After it, a tick reads the replicas whose `last_seen`
    moved (heartbeats, registrations) or that left since the previous one, plus a slice of
    all of them in replica id order, so that every `SWEEP_TICKS` ticks each row is compared
    again: that catches what changes without touching `last_seen` (a replica told to leave,
    a deleted row) while no tick reads the whole table. The live numbers of the straggler
    detector are compared every tick."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.version = 0
        self.summary = Summary()
        self.fresh = False  # read since the last `clear`: a snapshot of it is true
        self.since = 0.0  # what the next partial read starts from (last_seen, left_at)
        self.swept_to = ""  # the replica id the last slice ended at

    def refresh(self, store: Store, live: LiveView) -> tuple[dict[str, Row], Delta, Summary]:
        """Compute the next version (on a reader thread of the read lane: the current rows
        are not changed, pages may be taking a snapshot of them); `apply` makes it current."""
        started = time.time()
        full = not self.fresh
        tick = Comparison(self.rows, self.summary, self.version + 1, full)
        seen: set[str] = set()
        if full:
            self._read(tick, store.conn.execute(ROWS_SQL), live, seen)
        else:
            self._read(tick, store.conn.execute(SEEN_SINCE_SQL, (self.since,)), live, seen)
            for (replica_id,) in store.conn.execute(LEFT_SINCE_SQL, (self.since,)):
                tick.remove(replica_id)
            self._sweep(tick, store, live, seen)
        for replica_id, view in live.items():  # live numbers of rows not read this tick
            row = tick.rows.get(replica_id)
            if row is not None and replica_id not in seen:
                tick.put(with_live(row[:len(STORED_FIELDS)], view))
        self.since = started - MARGIN_S
        return tick.finish()

    @staticmethod
    def _read(tick: Comparison, rows: Iterable[tuple[Any, ...]], live: LiveView,
              seen: set[str]) -> None:
        for stored in rows:
            tick.put(with_live(stored, live.get(stored[0])))
            seen.add(stored[0])

    def _sweep(self, tick: Comparison, store: Store, live: LiveView, seen: set[str]) -> None:
        """Compare the next slice of every replica; a row in its id range that was not read
        is gone."""
        size = max(SLICE_MIN, len(self.rows) // SWEEP_TICKS + 1)
        start = self.swept_to
        sliced: set[str] = set()
        for stored in store.conn.execute(SLICE_SQL, (start, size)):
            sliced.add(stored[0])
            if stored[0] not in seen:
                tick.put(with_live(stored, live.get(stored[0])))
        seen |= sliced
        end = max(sliced) if len(sliced) == size else None  # None: to the end, then over
        gone = [r for r in self.rows if r > start and (end is None or r <= end)
                and r not in sliced and r in tick.rows and r not in seen]
        for replica_id in gone:
            tick.remove(replica_id)
        self.swept_to = end or ""

    def apply(self, rows: dict[str, Row], delta: Delta, summary: Summary) -> None:
        self.rows, self.version, self.summary = rows, delta.version, summary
        self.fresh = True

    def clear(self) -> None:
        """Forget the rows (nobody is watching): the next tick reads them all again."""
        self.rows = {}
        self.summary = Summary()
        self.fresh = False
        self.swept_to = ""
