"""Live straggler detection: fed by each heartbeat flush, acted on by a supervised task.

`on_flush` runs inside the heartbeat write-behind (one batch of newest beats per period): it
only updates the detector's numbers and queues the flags it raises or clears. The task
`run` records each change as an event (``straggler`` / ``straggler_cleared``) and applies the
job's policy: report (record only), evict (the replica leaves at its next step boundary, so
torchft carries on without it and the supervisor respawns it), or evict_and_drain (its node
is drained too). Per-job policies are events as well (``straggler_policy``), so they survive
a restart.

A job may also have its torchft timeouts follow its step times (``timeout_policy``, set by
`marduk straggler timeouts`): every ADJUST_EVERY_S the task compares the targets of the job's
`TimeoutPolicy` with the values in force and, when they moved enough, makes a config revision
(the same path as `marduk config set`, so every group applies it at one step) and records a
``timeouts_adjusted`` event with the step times behind it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.decisions import Effects, replica_refs, take_decision
from marduk_slurm.controller.startup import apply_rows
from marduk_slurm.domain import config_revision as cr
from marduk_slurm.domain import messages as m
from marduk_slurm.domain.decisions import StragglerEviction
from marduk_slurm.domain.straggler import (
    StragglerChange,
    StragglerConfig,
    StragglerDetector,
    TimeoutPolicy,
    step_times_p99,
    suggest_torchft_timeouts,
)
from marduk_slurm.errors import NotFound
from marduk_slurm.settings import STRAGGLER_POLICIES, ControllerSettings

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 5.0
ADJUST_EVERY_S = 10.0  # how often jobs with a timeout policy are looked at
# Makes a config revision: (job, changes, actor) -> the reply of `config set`.
Revise = Callable[[int, dict[str, Any], str], Awaitable[dict[str, Any]]]
# A job's statistics are recomputed at most this often: flags need seconds of evidence
# (straggler_sustain_s) anyway, and a large job must not cost a median every 50 ms flush.
EVALUATE_EVERY_S = 0.5
# ...and all of the analysis may take at most this share of the event loop: after an
# evaluation that took t seconds, the next one (of any job) waits t / EVALUATE_BUDGET.
EVALUATE_BUDGET = 0.05


def _revisions_of(store: StoreApi, job: int) -> list[dict[str, Any]]:
    return store.config_revisions(job)


def config_from(s: ControllerSettings) -> StragglerConfig:
    return StragglerConfig(factor=s.straggler_factor, mad_k=s.straggler_mad_k,
                           sustain_s=s.straggler_sustain_s)


class StragglerWatch:
    def __init__(self, ctx: Context, settings: Callable[[], ControllerSettings]) -> None:
        self.ctx = ctx
        self.settings = settings  # read at use: a SIGHUP reload takes effect at once
        self.detector = StragglerDetector(config_from(settings()))
        self.policies: dict[int, str] = {}
        self.timeout_policies: dict[int, TimeoutPolicy] = {}
        self.revise: Revise | None = None  # set by the daemon (the config service's)
        self._next_adjust = 0.0
        self.changes: asyncio.Queue[StragglerChange] = asyncio.Queue(maxsize=10000)
        self.counts: Counter[tuple[str, str]] = Counter()  # (kind, policy) -> events
        self._last_prune = 0.0
        self._last_evaluation: dict[int, float] = {}  # job -> when its statistics last ran
        self._pause_until = 0.0  # no evaluation before this: the budget was spent

    # -- fed by the heartbeat flush (keep it cheap) ------------------------------------------

    def on_flush(self, batch: list[m.Heartbeat], now: float) -> None:
        config = config_from(self.settings())
        if config != self.detector.config:
            self.detector.config = config
        touched = {hb.job_id for hb in batch
                   if self.detector.observe(hb.replica_id, hb.job_id, hb.step, hb.step_time_ms,
                                            hb.allreduce_ms, hb.ts or now, now)}
        changes = self._evaluate_due(touched, now)
        if now - self._last_prune > PRUNE_EVERY_S:
            self._last_prune = now
            changes += self.detector.prune(now)
        for change in changes:
            try:
                self.changes.put_nowait(change)
            except asyncio.QueueFull:
                self.ctx.stats["straggler_changes_dropped"] += 1

    def _evaluate_due(self, touched: set[int], now: float) -> list[StragglerChange]:
        """Evaluate the jobs that waited longest, within the time budget."""
        changes: list[StragglerChange] = []
        due = sorted((self._last_evaluation.get(j, 0.0), j) for j in touched
                     if now - self._last_evaluation.get(j, 0.0) >= EVALUATE_EVERY_S)
        for _, job in due:
            if now < self._pause_until:
                break
            t0 = time.perf_counter()
            changes += self.detector.evaluate(job, now)
            self._last_evaluation[job] = now
            self._pause_until = now + (time.perf_counter() - t0) / EVALUATE_BUDGET
        return changes

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        await self.load_policies()
        next_sync = time.monotonic() + PRUNE_EVERY_S
        while True:
            wait_s = max(0.0, next_sync - time.monotonic())
            try:
                change = await asyncio.wait_for(self.changes.get(), timeout=wait_s)
            except TimeoutError:
                next_sync = time.monotonic() + PRUNE_EVERY_S
                for change in await self.sync():
                    await self.record(change)
                if time.monotonic() >= self._next_adjust:
                    self._next_adjust = time.monotonic() + ADJUST_EVERY_S
                    await self.adjust_timeouts()
                continue
            await self.record(change)

    async def sync(self) -> list[StragglerChange]:
        """Drop what ended from the live numbers, heartbeats or not: replicas that left the
        mapping (their step or job ended), and ones silent for `stale_s`. Without this an
        ended job's last step rate stays in `top`, `straggler show` and /metrics, since
        pruning otherwise runs only when heartbeats arrive."""
        checked_at = time.time()
        tracked = list(self.detector.tracks)
        live = await self.ctx.db.read(lambda store: store.live_replica_ids(tracked))
        changes = self.detector.retain(live, checked_at)
        changes += self.detector.prune(time.time())
        self._last_evaluation = {j: t for j, t in self._last_evaluation.items()
                                 if j in self.detector.by_job}
        return changes

    async def load_policies(self) -> None:
        rows = await self.ctx.db(lambda: self.ctx.db.store.events(
            kinds=["straggler_policy"], limit=100000))
        # Oldest first: the newest per job wins. A row that cannot be read is skipped.
        apply_rows(self.ctx.stats, "straggler policies", rows, self._apply_policy)
        rows = await self.ctx.db(lambda: self.ctx.db.store.events(
            kinds=["timeout_policy"], limit=100000))
        apply_rows(self.ctx.stats, "timeout policies", rows, self._apply_timeout_policy)

    def _apply_timeout_policy(self, row: dict[str, Any]) -> None:
        job_id, evidence = row["job_id"], row["evidence"]
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise ValueError(f"job_id {job_id!r} is not a job")
        if row["reason"] == "off":
            self.timeout_policies.pop(job_id, None)
        else:
            self.timeout_policies[job_id] = TimeoutPolicy(**evidence["policy"])

    async def adjust_timeouts(self) -> None:
        """For each job with a timeout policy and enough step times: a revision when the
        targets moved away from the values in force (a failure is logged and counted; the
        next pass tries again)."""
        for job, policy in list(self.timeout_policies.items()):
            tracks = self.detector.job_tracks(job)
            p99, samples = step_times_p99(tracks)
            if samples < TimeoutPolicy.MIN_SAMPLES or self.revise is None:
                continue
            revisions = await self.ctx.db.read(partial(_revisions_of, job=job))
            latest = cr.latest_config(revisions, 0)
            current = {k: v for k, v in ((latest or {}).get("changes") or {}).items()
                       if k in cr.TIMEOUT_KEYS}
            changes = policy.changes(current, p99)
            if not changes:
                continue
            try:
                await self._adjust(job, policy, changes, current, p99, samples, len(tracks))
            except Exception as exc:  # the job ended meanwhile, NATS is away: next pass
                self.ctx.stats["timeout_adjust_failed"] += 1
                log.warning("job %d: timeouts not adjusted: %s", job, exc)

    async def _adjust(self, job: int, policy: TimeoutPolicy, changes: dict[str, float],
                      current: dict[str, float], p99: float, samples: int, replicas: int
                      ) -> None:
        assert self.revise is not None
        reply = await self.revise(job, changes, "stragglers")
        now = time.time()
        evidence = {"p99_step_ms": round(p99, 3), "samples": samples, "replicas": replicas,
                    "policy": policy.as_dict(), "previous": current, "changes": changes,
                    "revision": reply["revision"], "apply_at_step": reply["apply_at_step"]}
        eid = await self.ctx.db.tx(lambda store: store.add_event(
            "timeouts_adjusted", now=now, source="stragglers", job_id=job,
            reason=f"p99 step {p99:.0f} ms over {samples} steps: "
                   + ", ".join(f"{k}={v:g} s" for k, v in changes.items())
                   + f" (revision {reply['revision']})", evidence=evidence))
        self.ctx.stats["timeouts_adjusted"] += 1
        await self.ctx.publish_feed([eid])
        log.info("job %d: torchft timeouts adjusted to %s (p99 step %.0f ms)", job, changes, p99)

    async def rpc_timeouts(self, args: dict[str, Any], actor: str) -> Any:
        """Set (or turn off, `off: true`) a job's timeout policy."""
        job = args.get("job")
        if isinstance(job, bool) or not isinstance(job, int) or job < 0:
            raise ValueError("job must be a Slurm job id")
        off = args.get("off", False)
        if not isinstance(off, bool):
            raise ValueError("off must be true or false")
        policy = None
        if not off:
            given = {k: args[k] for k in ("k", "floor_s", "ceiling_s") if args.get(k) is not None}
            policy = TimeoutPolicy(**given)
        previous = self.timeout_policies.get(job)
        now = time.time()
        evidence = {"policy": policy.as_dict() if policy else None,
                    "previous": previous.as_dict() if previous else None}
        eid = await self.ctx.db.tx(lambda store: store.add_event(
            "timeout_policy", now=now, source=actor, job_id=job,
            reason="off" if policy is None else "auto", evidence=evidence))
        if policy is None:
            self.timeout_policies.pop(job, None)
        else:
            self.timeout_policies[job] = policy
            self._next_adjust = 0.0  # look at it at the next pass
        await self.ctx.publish_feed([eid])
        return {"job": job, "event": eid, **evidence}

    def _apply_policy(self, row: dict[str, Any]) -> None:
        job_id, policy = row["job_id"], row["reason"]
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise ValueError(f"job_id {job_id!r} is not a job")
        if policy not in STRAGGLER_POLICIES:
            raise ValueError(f"unknown straggler policy {policy!r}")
        self.policies[job_id] = policy

    def policy(self, job_id: int) -> str:
        return self.policies.get(job_id, self.settings().straggler_policy)

    async def record(self, change: StragglerChange) -> None:
        policy = self.policy(change.job_id)
        kind = "straggler" if change.flagged else "straggler_cleared"
        now = time.time()

        def decide(store: StoreApi) -> Effects:
            row = store.replica(change.replica_id)
            node = row["node"] if row else None
            eid = store.add_event(kind, now=now, source="stragglers", node=node,
                                  job_id=change.job_id, replica_id=change.replica_id,
                                  reason=change.reason,
                                  evidence={**change.evidence(), "policy": policy})
            effects = Effects(feed=[eid])
            if not change.flagged or policy == "report" or row is None \
                    or row["state"] != "active":
                return effects
            cause = StragglerEviction(replica_refs([row])[0],
                                      drain_node=policy == "evict_and_drain",
                                      reason=change.reason)
            take_decision(store, cause, cause_event=eid, source="stragglers", now=now,
                          policy=self.ctx.policy, effects=effects)
            return effects

        effects = await self.ctx.db.tx(decide)
        self.counts[(kind, policy)] += 1
        log.warning("%s: job %d replica %s: %s (policy %s)", kind, change.job_id,
                    change.replica_id, change.reason, policy)
        await self.ctx.carry_out(effects)

    # -- views and requests -----------------------------------------------------------------

    def replica_view(self) -> dict[str, dict[str, Any]]:
        """Per replica: step rate, own work time, straggler flag (for the API and `top`)."""
        n = self.detector.config.smoothing
        return {r: {"step_rate": round(t.step_rate(), 3), "straggler": t.flagged,
                    "work_ms": round(t.smoothed(n, "work_ms"), 3) if t.samples else None}
                for r, t in self.detector.tracks.items()}

    def job_rates(self) -> dict[int, float]:
        out = {}
        for job in self.detector.jobs():
            stats = self.detector.stats(job)
            if stats is not None:
                out[job] = stats.step_rate
        return out

    async def rpc_policy(self, args: dict[str, Any], actor: str) -> Any:
        job, policy = args.get("job"), args.get("policy")
        if isinstance(job, bool) or not isinstance(job, int) or job < 0:
            raise ValueError("job must be a Slurm job id")
        if policy not in STRAGGLER_POLICIES:
            raise ValueError(f"policy must be one of {', '.join(STRAGGLER_POLICIES)}")
        previous = self.policy(job)
        now = time.time()
        eid = await self.ctx.db.tx(lambda store: store.add_event(
            "straggler_policy", now=now, source=actor, job_id=job, reason=policy,
            evidence={"previous": previous}))
        self.policies[job] = policy
        await self.ctx.publish_feed([eid])
        return {"job": job, "policy": policy, "previous": previous, "event": eid}

    async def rpc_show(self, args: dict[str, Any], actor: str) -> Any:
        job = args.get("job")
        if isinstance(job, bool) or not isinstance(job, int):
            raise ValueError("job must be a Slurm job id")
        stats = self.detector.stats(job)
        if stats is None and job not in self.policies:
            raise NotFound(f"no heartbeats from job {job} in the last "
                           f"{self.detector.config.stale_s:.0f} s")
        n = self.detector.config.smoothing
        replicas = [{"replica_id": t.replica_id, "straggler": t.flagged,
                     "step": t.samples[-1].step, "step_rate": round(t.step_rate(), 3),
                     "step_ms": round(t.smoothed(n, "step_time_ms"), 3),
                     "allreduce_ms": round(t.smoothed(n, "allreduce_ms"), 3),
                     "work_ms": round(t.smoothed(n, "work_ms"), 3)}
                    for t in self.detector.job_tracks(job)]
        suggestions = [s.__dict__ for s in suggest_torchft_timeouts(stats.p99_step_ms)] \
            if stats else []
        auto = self.timeout_policies.get(job)
        return {"job": job, "policy": self.policy(job),
                "stats": stats.as_dict() if stats else None, "replicas": replicas,
                "timeouts": suggestions,
                "timeout_policy": auto.as_dict() if auto else None}
