"""Live job configuration on the controller side.

`config_set` validates the changes (domain.config_revision), picks the step at which every
replica applies them from the replicas' last heartbeats, commits the revision and its event row,
and only then publishes the `JobCommand`. A job the controller has never seen (no replica,
no step, no earlier revision) is refused as not found unless the request says `force` (a job
about to start): a typo in the job id must not look like a change that took. Replicas
acknowledge with durable `ConfigAck` messages, which the ingest path already stores;
`config_show` joins revisions, acks and replicas, and a replica whose ack of the latest
revision failed is not `current`. A replica that joins, heals or reconnects asks
`config_latest` (a job request, so a job can only ask about itself).
"""

from __future__ import annotations

import time
from typing import Any

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.rpc import RpcServer
from marduk_slurm.domain import config_revision as cr
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import MardukError, NotFound

# How far ahead of the fastest replica a revision is applied (see choose_apply_at_step).
LEAD_STEPS = 2
LEAD_S = 1.0


def _job(args: dict[str, Any]) -> int:
    value = args.get("job")
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise ValueError(f"job must be a Slurm job id, got {value!r}")
    return int(value)


def _progress(rows: list[dict[str, Any]]) -> list[cr.ReplicaProgress]:
    return [cr.ReplicaProgress(int(r["last_step"]), float(r["step_time_ms"]),
                               float(r["last_seen"])) for r in rows if r["state"] == "active"]


def _job_known(store: StoreApi, job: int) -> bool:
    """Whether the controller has seen the job: a replica (even one that left), a running
    step, or an earlier revision (one set with force before the job started)."""
    return bool(store.replicas(job_id=job, include_left=True)
                or store.config_revisions(job)
                or any(row["job_id"] == job for row in store.running_steps()))


class ConfigService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def config_set(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)
        changes = cr.validate_changes(args.get("changes") or {})
        return await self._new_revision(job, changes, actor, force=args.get("force") is True)

    async def checkpoint_load(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)
        changes = cr.validate_changes({"checkpoint": args.get("path")})
        return await self._new_revision(job, changes, actor, force=args.get("force") is True)

    async def revise(self, job: int, changes: dict[str, Any], actor: str) -> dict[str, Any]:
        """A revision made by the controller itself (the straggler task's timeouts)."""
        return await self._new_revision(job, cr.validate_changes(changes), actor, force=False)

    async def _new_revision(self, job: int, changes: dict[str, Any], actor: str, *,
                            force: bool) -> dict[str, Any]:
        if not self.ctx.may_act():
            raise MardukError("this controller does not lead (any more): no revision made")
        now = time.time()

        def commit(store: StoreApi) -> tuple[int, int, int, list[str]]:
            rows = store.replicas(job_id=job)
            if not rows and not force and not _job_known(store, job):
                raise NotFound(
                    f"job {job} is unknown to the controller: no replica registered and no "
                    f"step of it seen (for a job about to start, add --force)")
            at = cr.choose_apply_at_step(_progress(rows), now, lead_steps=LEAD_STEPS,
                                         lead_s=LEAD_S)
            revision = store.add_config_revision(job, changes, at, actor, now)
            eid = store.add_event(
                "config_set", now=now, source=actor or "operator", job_id=job,
                reason=f"revision {revision} of job {job} at step {at}: "
                       + ", ".join(f"{k}={v}" for k, v in changes.items()),
                evidence={"revision": revision, "apply_at_step": at, "changes": changes,
                          "replicas": len(rows)},
            )
            return revision, at, eid, [r["replica_id"] for r in rows if r["state"] == "active"]

        revision, at, eid, active = await self.ctx.db.tx(commit)
        await self.ctx.replication.report_config(self.ctx.bus, job, revision, at, changes,
                                                 actor)
        cmd = m.JobCommand(job_id=job, revision=revision, apply_at_step=at, changes=changes,
                           ts=time.time())
        # After the commit: a replica that misses this publish gets it from config_latest.
        await self.ctx.bus.publish(subjects.job_commands(job), m.encode(cmd))
        self.ctx.stats["config_revisions"] += 1
        await self.ctx.publish_feed([eid])
        # replica_ids: the replicas expected to acknowledge (`config set` waits for them).
        return {"job": job, "revision": revision, "apply_at_step": at, "replicas": len(active),
                "replica_ids": active, "event": eid}

    async def config_show(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)

        def read(store: StoreApi) -> dict[str, Any]:
            return {"revisions": store.config_revisions(job), "acks": store.config_acks(job),
                    "replicas": store.replicas(job_id=job)}

        data = await self.ctx.db(read, self.ctx.db.store)
        return summarize(job, data["revisions"], data["acks"], data["replicas"])

    async def config_latest(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)

        def read(store: StoreApi) -> tuple[list[dict[str, Any]], int]:
            rows = store.replicas(job_id=job)
            return store.config_revisions(job), max((r["last_step"] for r in rows), default=0)

        revisions, job_step = await self.ctx.db(read, self.ctx.db.store)
        return cr.latest_config(revisions, job_step)


def summarize(job: int, revisions: list[dict[str, Any]], acks: list[dict[str, Any]],
              replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Revisions with who acknowledged them, and which revision each replica runs.

    A replica counts a revision as reached even when applying it failed (its heartbeats then
    carry that revision), so `current` also asks its ack: a replica whose newest ack is a
    failure is not current, and `error` says why."""
    by_rev: dict[int, list[dict[str, Any]]] = {}
    newest_ack: dict[str, dict[str, Any]] = {}
    for ack in acks:
        by_rev.setdefault(int(ack["revision"]), []).append(ack)
        seen = newest_ack.get(ack["replica_id"])
        if seen is None or int(ack["revision"]) >= int(seen["revision"]):
            newest_ack[ack["replica_id"]] = ack
    latest = revisions[-1]["revision"] if revisions else 0
    revs = []
    for rev in revisions:
        got = by_rev.get(int(rev["revision"]), [])
        revs.append({**rev, "acks": [{k: a[k] for k in ("replica_id", "applied_at_step", "ok",
                                                         "error", "ts")} for a in got],
                     "acked": sum(1 for a in got if a["ok"]),
                     "failed": sum(1 for a in got if not a["ok"]),
                     "errors": sorted({a["error"] for a in got if not a["ok"]})})
    return {"job": job, "latest_revision": latest, "revisions": revs,
            "replicas": [_replica_config(r, newest_ack.get(r["replica_id"]), latest)
                         for r in replicas]}


def _replica_config(row: dict[str, Any], ack: dict[str, Any] | None, latest: int
                    ) -> dict[str, Any]:
    failed = ack is not None and not ack["ok"]
    reached = row["config_revision"] >= latest
    return {"replica_id": row["replica_id"], "replica_group": row["replica_group"],
            "group_rank": row["group_rank"], "node": row["node"], "state": row["state"],
            "last_step": row["last_step"], "config_revision": row["config_revision"],
            "current": reached and not failed,
            "config_state": "failed" if failed else "current" if reached else "pending",
            "error": ack["error"] if failed and ack is not None else "",
            "failed_revision": int(ack["revision"]) if failed and ack is not None else None}


def install(ctx: Context, rpc: RpcServer) -> ConfigService:
    """Register the config verbs on `rpc`."""
    service = ConfigService(ctx)
    rpc.register("config_set", service.config_set)
    rpc.register("config_show", service.config_show)
    rpc.register("checkpoint_load", service.checkpoint_load)
    rpc.register("config_latest", service.config_latest, job=True)
    return service
