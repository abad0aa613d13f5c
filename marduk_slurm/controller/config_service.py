"""Live job configuration on the controller side.

`config_set` validates the changes (domain.config_revision), picks the step at which every
replica applies them from the replicas' last heartbeats, commits the revision and its event row,
and only then publishes the `JobCommand`. Replicas acknowledge with durable `ConfigAck`
messages, which the ingest path already stores; `config_show` joins revisions, acks and
replicas. A replica that joins, heals or reconnects asks `config_latest` (a job request, so a
job can only ask about itself).
"""

from __future__ import annotations

import time
from typing import Any

from marduk_slurm.adapters.store import Store
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.rpc import RpcServer
from marduk_slurm.domain import config_revision as cr
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

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


class ConfigService:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def config_set(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)
        changes = cr.validate_changes(args.get("changes") or {})
        return await self._new_revision(job, changes, actor)

    async def checkpoint_load(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)
        changes = cr.validate_changes({"checkpoint": args.get("path")})
        return await self._new_revision(job, changes, actor)

    async def _new_revision(self, job: int, changes: dict[str, Any], actor: str
                            ) -> dict[str, Any]:
        now = time.time()

        def commit(store: Store) -> tuple[int, int, int, int]:
            rows = store.replicas(job_id=job)
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
            return revision, at, eid, len(rows)

        revision, at, eid, n = await self.ctx.db.tx(commit)
        cmd = m.JobCommand(job_id=job, revision=revision, apply_at_step=at, changes=changes,
                           ts=time.time())
        # After the commit: a replica that misses this publish gets it from config_latest.
        await self.ctx.bus.publish(subjects.job_commands(job), m.encode(cmd))
        self.ctx.stats["config_revisions"] += 1
        await self.ctx.publish_feed([eid])
        return {"job": job, "revision": revision, "apply_at_step": at, "replicas": n,
                "event": eid}

    async def config_show(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)

        def read(store: Store) -> dict[str, Any]:
            return {"revisions": store.config_revisions(job), "acks": store.config_acks(job),
                    "replicas": store.replicas(job_id=job)}

        data = await self.ctx.db(read, self.ctx.db.store)
        return summarize(job, data["revisions"], data["acks"], data["replicas"])

    async def config_latest(self, args: dict[str, Any], actor: str) -> Any:
        job = _job(args)

        def read(store: Store) -> tuple[list[dict[str, Any]], int]:
            rows = store.replicas(job_id=job)
            return store.config_revisions(job), max((r["last_step"] for r in rows), default=0)

        revisions, job_step = await self.ctx.db(read, self.ctx.db.store)
        return cr.latest_config(revisions, job_step)


def summarize(job: int, revisions: list[dict[str, Any]], acks: list[dict[str, Any]],
              replicas: list[dict[str, Any]]) -> dict[str, Any]:
    """Revisions with who acknowledged them, and which revision each replica runs."""
    by_rev: dict[int, list[dict[str, Any]]] = {}
    for ack in acks:
        by_rev.setdefault(int(ack["revision"]), []).append(ack)
    latest = revisions[-1]["revision"] if revisions else 0
    revs = []
    for rev in revisions:
        got = by_rev.get(int(rev["revision"]), [])
        revs.append({**rev, "acks": [{k: a[k] for k in ("replica_id", "applied_at_step", "ok",
                                                         "error", "ts")} for a in got],
                     "acked": sum(1 for a in got if a["ok"]),
                     "failed": sum(1 for a in got if not a["ok"])})
    reps = [{"replica_id": r["replica_id"], "replica_group": r["replica_group"],
             "group_rank": r["group_rank"], "node": r["node"], "state": r["state"],
             "last_step": r["last_step"], "config_revision": r["config_revision"],
             "current": r["config_revision"] >= latest} for r in replicas]
    return {"job": job, "latest_revision": latest, "revisions": revs, "replicas": reps}


def install(ctx: Context, rpc: RpcServer) -> None:
    """Register the config verbs on `rpc`."""
    service = ConfigService(ctx)
    rpc.register("config_set", service.config_set)
    rpc.register("config_show", service.config_show)
    rpc.register("checkpoint_load", service.checkpoint_load)
    rpc.register("config_latest", service.config_latest, job=True)
