"""Each job's recent step samples, kept in memory, and the fault timeline built from them.

`StepSamples.on_flush` runs inside the heartbeat write-behind (one batch of newest beats per
period, like the straggler detector): it keeps at most one sample per replica every
`every_s`, as (flush time, replica, step, participants), in a ring per job. Nothing is
written to the database, so the history does not grow with it. Each ring is three fixed
arrays (24 bytes a sample, no object per sample), and there are at most `max_jobs` of them:
the memory has a ceiling (about 30 MB) whatever the heartbeats say. A job larger than its
ring can hold at 4 samples a second per replica is sampled less often, so that its ring
still spans at least MIN_HISTORY_S. When every ring is taken, a new job gets one only from
a job silent for SILENT_S (an ended job); otherwise its beats are not sampled (counted), so
that many jobs cannot make the rings change hands on every flush. Samples carry the
controller's own clock, the one its history events carry: a replica's clock could be off,
or lie.

`TimelineService.timeline` answers the `timeline` verb and ``GET /api/timeline``: the ring's
samples of a job over a window, each replica mapped to its group by the replica table, and
the job's fault events of the same window from the history (`domain.timeline`).
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Iterator
from typing import Any

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller import queries
from marduk_slurm.controller.context import Context
from marduk_slurm.domain import input_bounds as bounds
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import timeline as tl

KEEP_S = 900.0  # how far back a timeline can look
EVERY_S = 0.25  # at most one sample per replica this often
JOB_SAMPLES = 20_000  # per job: 2 groups at 4 samples/s fill it in 40 min
MIN_HISTORY_S = 120.0  # a large job's ring spans at least this (sampled less often)
MAX_JOBS = 64  # rings: 64 x 20,000 x 24 bytes, about 30 MB at most
SILENT_S = 30.0  # a ring whose job was not heard from for this long may be given away
MAX_REPLICAS_PER_JOB = 4096  # replicas a ring knows (their ids and last sample time)
DEFAULT_WINDOW_S = 300.0
MAX_POINTS = 6000  # rate points in one answer (thinned beyond)
MAX_EVENTS = 2000  # history events of each kind of query one answer reads

Sample = tuple[float, str, int, int]  # flush time, replica id, step, participants


class _JobRing:
    """One job's samples in fixed arrays, the oldest overwritten first."""

    def __init__(self, size: int = JOB_SAMPLES) -> None:
        self.t = array("d", bytes(8 * size))
        self.step = array("q", bytes(8 * size))
        self.who = array("l", bytes(array("l").itemsize * size))  # replica << 24 | quorum
        self.size, self.next, self.count = size, 0, 0
        self.replicas: list[str] = []
        self.index: dict[str, int] = {}
        self.last: dict[int, float] = {}  # replica index -> when it was last sampled
        self.heard = 0.0

    def every_s(self, every_s: float) -> float:
        return max(every_s, len(self.index) * MIN_HISTORY_S / self.size)

    def add(self, t: float, replica: int, step: int, quorum: int) -> None:
        i = self.next
        self.t[i], self.step[i] = t, min(step, 2**62)
        self.who[i] = replica << 24 | min(quorum, 2**24 - 1)
        self.next = (i + 1) % self.size
        self.count = min(self.count + 1, self.size)

    def since(self, t0: float) -> Iterator[Sample]:
        first = (self.next - self.count) % self.size
        for k in range(self.count):
            i = (first + k) % self.size
            if self.t[i] >= t0:
                who = self.who[i]
                yield self.t[i], self.replicas[who >> 24], self.step[i], who & (2**24 - 1)


class StepSamples:
    """The rings of the jobs heard from lately."""

    def __init__(self, ctx: Context | None = None, *, every_s: float = EVERY_S,
                 max_jobs: int = MAX_JOBS, job_samples: int = JOB_SAMPLES) -> None:
        self.ctx = ctx
        self.every_s = every_s
        self.max_jobs = max_jobs
        self.job_samples = job_samples
        self.jobs: dict[int, _JobRing] = {}
        self._full_until = 0.0  # no ring is given away before this (all were busy)

    def on_flush(self, batch: list[m.Heartbeat], now: float) -> None:
        for hb in batch:
            ring = self.jobs.get(hb.job_id) or self._admit(hb.job_id, now)
            if ring is None:
                continue
            ring.heard = now
            replica = ring.index.get(hb.replica_id)
            if replica is None:
                replica = self._known(ring, hb.replica_id)
                if replica is None:
                    continue
            if now - ring.last.get(replica, -1e18) < ring.every_s(self.every_s):
                continue
            ring.last[replica] = now
            ring.add(now, replica, hb.step, hb.participants)

    def _admit(self, job: int, now: float) -> _JobRing | None:
        if len(self.jobs) >= self.max_jobs:
            # Looked for once a second at most: a fleet of jobs beyond the rings must not
            # cost a search per beat.
            quiet = None if now < self._full_until else min(
                self.jobs, key=lambda j: self.jobs[j].heard)
            if quiet is None or now - self.jobs[quiet].heard < SILENT_S:
                self._full_until = max(self._full_until, now + 1.0)
                self._count("timeline_jobs_refused")
                return None
            del self.jobs[quiet]
        ring = self.jobs[job] = _JobRing(self.job_samples)
        return ring

    def _known(self, ring: _JobRing, replica_id: str) -> int | None:
        if len(ring.replicas) >= MAX_REPLICAS_PER_JOB:
            self._count("timeline_samples_dropped")
            return None
        ring.index[replica_id] = len(ring.replicas)
        ring.replicas.append(replica_id)
        return ring.index[replica_id]

    def _count(self, what: str) -> None:
        if self.ctx is not None:
            self.ctx.stats[what] += 1

    def samples(self, job: int, since: float) -> list[Sample]:
        ring = self.jobs.get(job)
        if ring is None:
            return []
        return list(ring.since(since))


def step_samples(raw: list[Sample], groups: dict[str, int]) -> tuple[list[tl.StepSample], int]:
    """The ring's samples as the domain's, each replica in its group; (samples, how many had
    no group: a standby before it assumed one, or a replica the table no longer has)."""
    out, unmapped = [], 0
    for t, replica, step, quorum in raw:
        group = groups.get(replica)
        if group is None:
            unmapped += 1
            continue
        out.append(tl.StepSample(t, group, step, quorum, replica))
    return out, unmapped


def job_events(store: StoreApi, job: int, since: float) -> tuple[dict[str, int], list[Any]]:
    """(replica id -> group, the job's timeline events since `since`): events of the job,
    and node events (verdicts, drains) of the nodes its replicas ran on."""
    rows = store.replicas(job_id=job, include_left=True)
    groups = {r["replica_id"]: int(r["replica_group"]) for r in rows
              if r.get("role", "replica") == "replica" and r["replica_group"] is not None}
    nodes = {r["node"] for r in rows}
    own = store.events(job_id=job, since=since, kinds=tl.EVENT_KINDS, limit=MAX_EVENTS)
    node_events = [e for e in store.events(since=since, kinds=tl.NODE_EVENT_KINDS,
                                           limit=MAX_EVENTS)
                   if e["job_id"] is None and e["node"] in nodes]
    return groups, own + node_events


def _answer(job: int, window: float, since: float, now: float, raw: list[Sample],
            groups: dict[str, int], events: list[Any]) -> dict[str, Any]:
    samples, unmapped = step_samples(raw, groups)
    built = tl.build_timeline(samples, tl.marks_from_history(events, groups),
                              start=since, end=now)
    answer = tl.to_json(tl.thin(built, MAX_POINTS))
    answer.update(job=job, window_s=window, samples=len(samples), unmapped=unmapped)
    return answer


class TimelineService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.samples = StepSamples(ctx)

    async def timeline(self, job: int, window_s: float | None = None) -> dict[str, Any]:
        """The job's timeline over the last `window_s` seconds, as JSON (domain.timeline's
        form) with `job`, `window_s`, `samples` and `unmapped` counts."""
        window = DEFAULT_WINDOW_S if window_s is None else window_s
        now = time.time()
        since = now - window
        raw = self.samples.samples(job, since)  # copied here: the flush writes on this loop
        groups, events = await self.ctx.db.read(lambda store: job_events(store, job, since))
        # Tens of milliseconds for a full ring: off the event loop, which ingests faults.
        return await asyncio.to_thread(_answer, job, window, since, now, raw, groups, events)

    async def rpc_timeline(self, args: dict[str, Any], actor: str) -> dict[str, Any]:
        job = queries.opt_int(args, "job", 0, bounds.JOB_ID_MAX)
        if job is None:
            raise ValueError("job: required (a job id)")
        return await self.timeline(job, queries.opt_float(args, "window_s", 1.0, KEEP_S))
