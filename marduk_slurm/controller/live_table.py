"""The replica table the dashboard follows, kept as compact rows and compared tick to tick.

Each tick reads the few columns the page shows for the replicas that may have changed (see
`ReplicaTable`), adds the live numbers of the straggler detector, and compares the result
with the previous tick's rows by replica id: what was added, what changed and what was
removed is the tick's `Delta`, computed once and sent to every open page. A page that
connects gets the rows themselves (a snapshot, in parts) and then only deltas, so an idle
fleet of 100,000 replicas costs a page a few hundred bytes a tick instead of the whole list.

A row is a list in the order of `FIELDS`, not an object: the names are sent once, in the
snapshot, instead of once per row. The table keeps each row as its JSON text, one bytes object
per replica: two rows are compared as bytes, a snapshot or a delta is those bytes joined, and
100,000 rows are 100,000 objects for the allocator to hand back, not 1.3 million.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from marduk_slurm.adapters.store import StoreApi

FIELDS = ("replica_id", "job_id", "replica_group", "group_rank", "node", "state",
          "last_step", "step_time_ms", "last_seen", "config_revision",
          "step_rate", "work_ms", "straggler")
STORED_FIELDS = FIELDS[:10]  # the rest are the straggler detector's live numbers
Row = bytes  # a row's JSON text
Stored = tuple[Any, ...]  # STORED_FIELDS as read
Live = tuple[Any, ...]  # step_rate, work_ms, straggler
LiveView = dict[str, dict[str, Any]]
NO_LIVE: Live = (None, None, False)

# The narrow reads behind every tick: ten columns as plain tuples, about 5x faster at 100,000
# replicas than `StoreApi.replicas()` (every column as a dict, with each replica's GPU list).
# They belong in the store adapter as methods; until they move there they are the only SQL
# here.
SWEEP_TICKS = 10  # every replica is read and compared again at least every this many ticks
SLICE_MIN = 2000
MARGIN_S = 0.5  # a write committed while the previous tick read is still seen by the next
# (one that commits later still is by the sweep)


def live_numbers(view: dict[str, Any] | None) -> Live:
    if view is None:
        return NO_LIVE
    work = view.get("work_ms")
    return (round(view.get("step_rate") or 0.0, 2), None if work is None else round(work, 1),
            bool(view.get("straggler")))


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # made once: json.dumps with
# separators builds a new encoder on every call, a third of a tick's time at 100,000 rows


def encode(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


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

    def encode(self) -> bytes:
        return (b'{"v":%d,"ts":%s,"add":[%s],"change":[%s],"remove":%s,"summary":%s}' % (
            self.version, encode(self.ts), b",".join(self.add), b",".join(self.change),
            encode(self.remove), encode(self.summary)))


class Summary:
    """The numbers above the table (replicas by state, jobs, stragglers), kept up to date
    row by row so that a tick does not count 100,000 rows again."""

    def __init__(self) -> None:
        self.states: Counter[str] = Counter()
        self.jobs: Counter[int] = Counter()
        self.stragglers = 0

    def count(self, row: Sequence[Any], sign: int) -> None:
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

    def __init__(self, table: ReplicaTable, full: bool) -> None:
        self.old, self.old_digests = table.rows, table.digests
        self.rows: dict[str, Row] = {} if full else dict(table.rows)
        self.digests: dict[str, int] = {} if full else dict(table.digests)
        self.live: dict[str, Live] = {} if full else dict(table.live)
        self.summary = Summary() if full else table.summary.copy()
        self.full = full
        self.delta = Delta(version=table.version + 1, ts=time.time())

    def put(self, stored: Stored, live: Live) -> None:
        replica_id = stored[0]
        row = (*stored, *live)
        if live is NO_LIVE:
            self.live.pop(replica_id, None)
        else:
            self.live[replica_id] = live
        # Most rows read did not change: a hash of the values tells so without encoding them
        # (a 64-bit collision would hide one change until the row's next one).
        digest = hash(row)
        before_digest = (self.old_digests if self.full else self.digests).get(replica_id)
        before = (self.old if self.full else self.rows).get(replica_id)
        self.digests[replica_id] = digest
        if before is None or self.full:
            self.summary.count(row, +1)
        if before is not None and before_digest == digest:
            self.rows[replica_id] = before
            return
        data = encode(row)
        self.rows[replica_id] = data
        if before is None:
            self.delta.add.append(data)
        elif before != data:
            self.delta.change.append(data)
            if not self.full:
                self.summary.count(json.loads(before), -1)
                self.summary.count(row, +1)

    def remove(self, replica_id: str) -> None:
        before = self.rows.pop(replica_id, None)
        self.live.pop(replica_id, None)
        self.digests.pop(replica_id, None)
        if before is not None:
            self.delta.remove.append(replica_id)
            self.summary.count(json.loads(before), -1)

    def finish(self) -> Comparison:
        if self.full:
            self.delta.remove = [r for r in self.old if r not in self.rows]
        self.delta.summary = self.summary.as_json()
        return self


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
        self.digests: dict[str, int] = {}  # hash() of each row's values
        self.live: dict[str, Live] = {}  # the live numbers in each row that has some
        self.version = 0
        self.summary = Summary()
        self.fresh = False  # read since the last `clear`: a snapshot of it is true
        self.since = 0.0  # what the next partial read starts from (last_seen, left_at)
        self.swept_to = ""  # the replica id the last slice ended at

    def refresh(self, store: StoreApi, live: LiveView) -> Comparison:
        """Compute the next version (on a reader thread of the read lane: the current rows
        are not changed, pages may be taking a snapshot of them); `apply` makes it current."""
        started = time.time()
        full = not self.fresh
        tick = Comparison(self, full)
        seen: set[str] = set()
        if full:
            self._read(tick, store.dashboard_rows(), live, seen)
        else:
            self._read(tick, store.dashboard_rows(seen_since=self.since), live, seen)
            for replica_id in store.replicas_left_since(self.since):
                tick.remove(replica_id)
            self._sweep(tick, store, live, seen)
        for replica_id, view in live.items():  # live numbers of rows not read this tick
            data = tick.rows.get(replica_id)
            numbers = live_numbers(view)
            if (data is not None and replica_id not in seen
                    and tick.live.get(replica_id, NO_LIVE) != numbers):
                tick.put(tuple(json.loads(data)[:len(STORED_FIELDS)]), numbers)
        self.since = started - MARGIN_S
        return tick.finish()

    @staticmethod
    def _read(tick: Comparison, rows: Iterable[Stored], live: LiveView, seen: set[str]
              ) -> None:
        for stored in rows:
            tick.put(stored, live_numbers(live.get(stored[0])))
            seen.add(stored[0])

    def _sweep(self, tick: Comparison, store: StoreApi, live: LiveView, seen: set[str]) -> None:
        """Compare the next slice of every replica; a row in its id range that was not read
        is gone."""
        size = max(SLICE_MIN, len(self.rows) // SWEEP_TICKS + 1)
        start = self.swept_to
        sliced: set[str] = set()
        for stored in store.dashboard_rows(after=start, limit=size):
            sliced.add(stored[0])
            if stored[0] not in seen:
                tick.put(stored, live_numbers(live.get(stored[0])))
        end = max(sliced) if len(sliced) == size else None  # None: to the end, then over
        gone = [r for r in self.rows if r > start and (end is None or r <= end)
                and r not in sliced and r not in seen and r in tick.rows]
        for replica_id in gone:
            tick.remove(replica_id)
        seen |= sliced
        self.swept_to = end or ""

    def apply(self, tick: Comparison) -> None:
        self.rows, self.digests = tick.rows, tick.digests
        self.live, self.summary = tick.live, tick.summary
        self.version = tick.delta.version
        self.fresh = True

    def clear(self) -> None:
        """Forget the rows (nobody is watching): the next tick reads them all again."""
        self.rows, self.digests, self.live = {}, {}, {}
        self.summary = Summary()
        self.fresh = False
        self.swept_to = ""
