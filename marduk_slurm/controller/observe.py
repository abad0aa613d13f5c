"""Observability, wired into the controller: stragglers, GPU risk, metrics, the dashboard.

`install` builds the parts, hooks the straggler detector and the ingest-lag histogram onto
the heartbeat flush, registers the request verbs (``straggler_policy``, ``straggler_show``,
``risk``, ``top``) and starts the supervised tasks. The views here (replicas with their live
numbers, nodes with GPUs, risk and replicas) are shared by the HTTP API, the SSE stream and
`marduk top`, so they all show the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from marduk_slurm.adapters.store import Store
from marduk_slurm.adapters.store.mapping import replica_page_key
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.ingest import HeartbeatWriter
from marduk_slurm.controller.metrics import MetricsCollector
from marduk_slurm.controller.operations import Operations
from marduk_slurm.controller.risk_watch import RiskWatch
from marduk_slurm.controller.rpc import RpcServer
from marduk_slurm.controller.stragglers import StragglerWatch
from marduk_slurm.settings import ControllerSettings
from marduk_slurm.supervisor import Supervisor


class Observability:
    def __init__(self, ctx: Context, ops: Operations, supervisor: Supervisor,
                 heartbeats: HeartbeatWriter, settings: Callable[[], ControllerSettings]
                 ) -> None:
        self.ctx = ctx
        self.ops = ops
        self.settings = settings
        self.heartbeats = heartbeats
        self.stragglers = StragglerWatch(ctx, settings)
        self.risk = RiskWatch(ctx, settings)
        self.metrics = MetricsCollector(ctx, supervisor, self.stragglers, self.risk)

    # -- shared views -----------------------------------------------------------------------

    async def replicas(self, job_id: int | None = None) -> list[dict[str, Any]]:
        rows = await self.ctx.db.read(lambda store: store.replicas(job_id=job_id))
        return self._with_live(rows)

    async def replica_page(self, job_id: int | None, after: list[Any] | None, limit: int
                           ) -> dict[str, Any]:
        """`limit` replicas after the page key `after`: `{items, next, total}`, where `next`
        is the page key of the last row when there may be more."""
        def read(store: Store) -> dict[str, Any]:
            rows = store.replicas(job_id=job_id, after=after, limit=limit)
            return {"items": rows, "total": store.count_replicas(job_id=job_id),
                    "next": replica_page_key(rows[-1]) if len(rows) == limit else None}
        page = await self.ctx.db.read(read)
        self._with_live(page["items"])
        return page

    def _with_live(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        live = self.stragglers.replica_view()
        for row in rows:
            view = live.get(row["replica_id"], {})
            row["step_rate"] = view.get("step_rate")
            row["work_ms"] = view.get("work_ms")
            row["straggler"] = bool(view.get("straggler"))
        return rows

    async def nodes(self) -> list[dict[str, Any]]:
        def read(store: Store) -> list[dict[str, Any]]:
            # A drain Slurm has not confirmed yet is shown too: the decision stands, and
            # "queued, Slurm unreachable" is what an operator needs to see.
            pending = {a["node"]: a for a in store.latest_actions("drain")
                       if a["state"] == "pending"}
            out = []
            for node in store.nodes():
                node["gpus"] = store.gpus(node["name"])
                node["replicas"] = store.replicas(node=node["name"])
                action = pending.get(node["name"])
                node["drain_pending"] = None if action is None else {
                    "reason": action["reason"], "last_error": action["last_error"],
                    "since": action["created_at"]}
                out.append(node)
            return out
        rows = await self.ctx.db.read(read)
        scores = {s.gpu_uuid: s for s in await self.risk.refresh()}
        for node in rows:
            for gpu in node["gpus"]:
                score = scores.get(gpu["uuid"])
                gpu["risk"] = score.score if score else 0
                gpu["risk_factors"] = [f.detail for f in score.factors] if score else []
            node["risk"] = max((g["risk"] for g in node["gpus"]), default=0)
        return rows

    async def status(self) -> dict[str, Any]:
        data = await self.ops.status()
        data["stragglers"] = len(self.stragglers.detector.flagged())
        data["heartbeat_lag_ms"] = round(self.heartbeats.last_lag_ms, 1)
        return data

    async def top(self, args: dict[str, Any], actor: str) -> dict[str, Any]:
        """Everything `marduk top` shows, in one request."""
        nodes = await self.nodes()
        return {
            "ts": time.time(),
            "status": await self.status(),
            "replicas": await self.replicas(),
            "job_rates": {str(j): r for j, r in self.stragglers.job_rates().items()},
            "drained": [{"name": n["name"], "by_marduk": n["drained_by_marduk"],
                         "risk": n["risk"], "pending": n["drain_pending"] is not None,
                         "reason": n["reason"] or (n["drain_pending"] or {}).get("reason", "")}
                        for n in nodes if "DRAIN" in n["flags"] or n["drain_pending"]],
        }


def install(ctx: Context, rpc: RpcServer, ops: Operations, supervisor: Supervisor,
            heartbeats: HeartbeatWriter, settings: Callable[[], ControllerSettings]
            ) -> Observability:
    """Build, hook up and start the observability tasks of the controller."""
    from marduk_slurm.controller.http import HttpServer  # aiohttp only where it is used

    obs = Observability(ctx, ops, supervisor, heartbeats, settings)
    heartbeats.on_flush += [obs.stragglers.on_flush, obs.metrics.on_flush]
    rpc.register("straggler_policy", obs.stragglers.rpc_policy)
    rpc.register("straggler_show", obs.stragglers.rpc_show)
    rpc.register("risk", obs.risk.rpc_risk)
    rpc.register("top", obs.top)
    supervisor.start("stragglers", obs.stragglers.run)
    supervisor.start("risk", obs.risk.run)
    if settings().http_listen:
        supervisor.start("http", HttpServer(obs, settings().http_listen,
                                            settings().state_dir).run)
    return obs
