"""Each job's recent step samples, kept in memory, and the fault timeline built from them.

`StepSamples.on_flush` runs inside the heartbeat write-behind (one batch of newest beats per
period, like the straggler detector): it keeps at most one sample per replica every
`every_s`, as (flush time, replica id, step, participants), in a ring per job. Nothing is
written to the database, so the history does not grow with it; the ring is bounded in time
(`keep_s`), in samples per job and in jobs (the job heard from least recently goes first),
so its memory has a ceiling whatever the heartbeats say. Samples carry the controller's own
clock, the one its history events carry: a replica's clock could be off, or lie.

`TimelineService.timeline` answers the `timeline` verb and ``GET /api/timeline``: the ring's
samples of a job over a window, each replica mapped to its group by the replica table, and
the job's fault events of the same window from the history (`domain.timeline`).
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from typing import Any

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller import queries
from marduk_slurm.controller.context import Context
from marduk_slurm.domain import input_bounds as bounds
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import timeline as tl

KEEP_S = 900.0  # how far back a timeline can look
EVERY_S = 0.25  # at most one sample per replica this often
JOB_SAMPLES = 20_000  # per job: 2 groups at 4 samples/s fill it in 40 min, 32 in 2.6 min
MAX_JOBS = 16  # jobs with a ring; about 20 MB at most in all
MAX_REPLICAS_PER_JOB = 4096  # replicas whose last sample time a job keeps
DEFAULT_WINDOW_S = 300.0
MAX_POINTS = 6000  # rate points in one answer (thinned beyond)
MAX_EVENTS = 2000  # history events one answer reads

Sample = tuple[float, str, int, int]  # flush time, replica id, step, participants


class _JobRing:
    def __init__(self) -> None:
        self.samples: deque[Sample] = deque(maxlen=JOB_SAMPLES)
        self.last: dict[str, float] = {}  # replica -> when it was last sampled


class StepSamples:
    """The rings of the jobs heard from lately."""

    def __init__(self, ctx: Context | None = None, *, keep_s: float = KEEP_S,
                 every_s: float = EVERY_S, max_jobs: int = MAX_JOBS) -> None:
        self.ctx = ctx
        self.keep_s = keep_s
        self.every_s = every_s
        self.max_jobs = max_jobs
        self.jobs: OrderedDict[int, _JobRing] = OrderedDict()  # least recently heard first

    def on_flush(self, batch: list[m.Heartbeat], now: float) -> None:
        for hb in batch:
            ring = self._ring(hb.job_id)
            if now - ring.last.get(hb.replica_id, -1e18) < self.every_s:
                continue
            if len(ring.last) >= MAX_REPLICAS_PER_JOB and hb.replica_id not in ring.last:
                self._forget_quiet(ring, now)
                if len(ring.last) >= MAX_REPLICAS_PER_JOB:
                    self._count("timeline_samples_dropped")
                    continue
            ring.last[hb.replica_id] = now
            ring.samples.append((now, hb.replica_id, hb.step, hb.participants))
        self._prune(now)

    def _ring(self, job: int) -> _JobRing:
        ring = self.jobs.get(job)
        if ring is None:
            ring = self.jobs[job] = _JobRing()
            while len(self.jobs) > self.max_jobs:
                self.jobs.popitem(last=False)
                self._count("timeline_jobs_evicted")
        else:
            self.jobs.move_to_end(job)
        return ring

    def _forget_quiet(self, ring: _JobRing, now: float) -> None:
        ring.last = {r: t for r, t in ring.last.items() if now - t < self.keep_s}

    def _prune(self, now: float) -> None:
        for job in list(self.jobs):
            samples = self.jobs[job].samples
            while samples and now - samples[0][0] > self.keep_s:
                samples.popleft()
            if not samples:
                del self.jobs[job]

    def _count(self, what: str) -> None:
        if self.ctx is not None:
            self.ctx.stats[what] += 1

    def samples(self, job: int, since: float) -> list[Sample]:
        ring = self.jobs.get(job)
        return [] if ring is None else [s for s in ring.samples if s[0] >= since]


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
        groups, events = await self.ctx.db.read(lambda store: job_events(store, job, since))
        samples, unmapped = step_samples(self.samples.samples(job, since), groups)
        built = tl.build_timeline(samples, tl.marks_from_history(events, groups),
                                  start=since, end=now)
        answer = tl.to_json(tl.thin(built, MAX_POINTS))
        answer.update(job=job, window_s=window, samples=len(samples), unmapped=unmapped)
        return answer

    async def rpc_timeline(self, args: dict[str, Any], actor: str) -> dict[str, Any]:
        job = queries.opt_int(args, "job", 0, bounds.JOB_ID_MAX)
        if job is None:
            raise ValueError("job: required (a job id)")
        return await self.timeline(job, queries.opt_float(args, "window_s", 1.0, KEEP_S))
