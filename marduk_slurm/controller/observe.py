"""Observability, wired into the controller: stragglers, GPU risk, metrics, the dashboard.

`install` builds the parts, hooks the straggler detector, the ingest-lag histogram and the
fault timeline's step samples onto the heartbeat flush, registers the request verbs
(``straggler_policy``, ``straggler_show``, ``risk``, ``top``, ``timeline``) and starts the
supervised tasks. The views here (replicas with their live
numbers, nodes with GPUs, risk and replicas) are shared by the HTTP API, the SSE stream and
`marduk top`, so they all show the same thing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.adapters.store.mapping import replica_page_key
from marduk_slurm.controller import queries
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.ingest import HeartbeatWriter
from marduk_slurm.controller.metrics import MetricsCollector
from marduk_slurm.controller.operations import Operations
from marduk_slurm.controller.risk_watch import RiskWatch
from marduk_slurm.controller.rpc import RpcServer
from marduk_slurm.controller.stragglers import StragglerWatch
from marduk_slurm.controller.timeline import TimelineService
from marduk_slurm.domain import input_bounds as bounds
from marduk_slurm.settings import ControllerSettings
from marduk_slurm.supervisor import Supervisor

# Rows of each table in `top`: a screen's worth by default, and never a whole large cluster.
TOP_ROWS = 200
MAX_TOP_ROWS = 1000


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
        self.timeline = TimelineService(ctx)

    # -- shared views -----------------------------------------------------------------------

    async def replicas(self, job_id: int | None = None) -> list[dict[str, Any]]:
        rows = await self.ctx.db.read(lambda store: store.replicas(job_id=job_id))
        return self._with_live(rows)

    async def replica_page(self, job_id: int | None, after: list[Any] | None, limit: int
                           ) -> dict[str, Any]:
        """`limit` replicas after the page key `after`: `{items, next, total}`, where `next`
        is the page key of the last row when there may be more."""
        def read(store: StoreApi) -> dict[str, Any]:
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
        def read(store: StoreApi) -> list[dict[str, Any]]:
            pending = _pending_drains(store)
            out = store.with_details(store.nodes(), full_replicas=True)
            for node in out:
                node["drain_pending"] = pending.get(node["name"])
            return out
        return queries.with_risk(await self.ctx.db.read(read), await self.risk_for({}))

    async def risk_for(self, args: dict[str, Any]) -> queries.RiskByGpu:
        """The scores a `nodes` query needs: one node's, a page's, or (the one-answer form)
        every scored GPU's."""
        # The query's own argument checks: what they refuse, the query would refuse too.
        node = queries.opt_str(args, "node", pattern=bounds.NODE_NAME)
        size = queries.page_size(args)
        await self.risk.view()
        if node:
            return self.risk.for_nodes([node])
        if size is not None:
            after = queries.opt_str(args, "cursor", pattern=bounds.NODE_NAME) or ""
            return self.risk.for_page(after, size)
        return self.risk.for_nodes(self.risk.risk_nodes)

    async def status(self) -> dict[str, Any]:
        data = await self.ops.status()
        data["stragglers"] = len(self.stragglers.detector.flagged())
        data["heartbeat_lag_ms"] = round(self.heartbeats.last_lag_ms, 1)
        return data

    async def top(self, args: dict[str, Any], actor: str) -> dict[str, Any]:
        """One screen of `marduk top` in one request: the status line, each job's rate, the
        first `limit` replicas and drained nodes (default TOP_ROWS) with their totals. Bounded
        whatever the cluster's size, since a live view is asked for every second."""
        limit = bounds.bounded_int("limit", args.get("limit") or TOP_ROWS, 1, MAX_TOP_ROWS)

        def read(store: StoreApi) -> dict[str, Any]:
            pending = _pending_drains(store)
            drained = store.drained_nodes(limit)
            shown = {n["name"] for n in drained}
            drained += [n for n in (store.node(name) for name in sorted(pending)
                                    if name not in shown) if n is not None]
            return {"replicas": store.replicas(limit=limit),
                    "replicas_total": store.count_replicas(),
                    "drained": store.with_details(drained[:limit]),
                    "drained_total": store.drained_node_count() + len(
                        [n for n in pending if n not in shown]),
                    "pending": pending}
        view = await self.ctx.db.read(read)
        await self.risk.view()
        nodes = queries.with_risk(view["drained"], self.risk.for_nodes(
            [n["name"] for n in view["drained"]]))
        return {
            "ts": time.time(),
            "status": await self.status(),
            "replicas": self._with_live(view["replicas"]),
            "replicas_total": view["replicas_total"],
            "job_rates": {str(j): r for j, r in self.stragglers.job_rates().items()},
            "drained": [{"name": n["name"], "by_marduk": n["drained_by_marduk"],
                         "risk": n["risk"], "pending": n["name"] in view["pending"],
                         "reason": n["reason"] or (view["pending"].get(n["name"]) or {}).get(
                             "reason", "")}
                        for n in nodes],
            "drained_total": view["drained_total"],
        }


def _pending_drains(store: StoreApi) -> dict[str, dict[str, Any]]:
    """Drains decided but not yet confirmed by Slurm, by node. They are shown too: the
    decision stands, and "queued, Slurm unreachable" is what an operator needs to see."""
    return {a["node"]: {"reason": a["reason"], "last_error": a["last_error"],
                        "since": a["created_at"]}
            for a in store.latest_actions("drain") if a["state"] == "pending"}


def install(ctx: Context, rpc: RpcServer, ops: Operations, supervisor: Supervisor,
            heartbeats: HeartbeatWriter, settings: Callable[[], ControllerSettings]
            ) -> Observability:
    """Build, hook up and start the observability tasks of the controller."""
    from marduk_slurm.controller.http import HttpServer  # aiohttp only where it is used

    obs = Observability(ctx, ops, supervisor, heartbeats, settings)
    heartbeats.on_flush += [obs.stragglers.on_flush, obs.metrics.on_flush,
                            obs.timeline.samples.on_flush]
    rpc.register("straggler_policy", obs.stragglers.rpc_policy)
    rpc.register("straggler_show", obs.stragglers.rpc_show)
    rpc.register("timeout_policy", obs.stragglers.rpc_timeouts)
    rpc.register("risk", obs.risk.rpc_risk)
    rpc.register("top", obs.top)
    rpc.register("timeline", obs.timeline.rpc_timeline)
    rpc.risk_view = obs.risk_for
    supervisor.start("stragglers", obs.stragglers.run)
    supervisor.start("risk", obs.risk.run)
    if settings().http_listen:
        supervisor.start("http", HttpServer(obs, settings().http_listen,
                                            settings().state_dir).run)
    return obs
