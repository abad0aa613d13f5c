"""Operator actions (drain, resume, inject) and the summaries the CLI shows.

Every action is first a committed decision (an event row, outbox rows), then carried out; the
reply waits a few seconds for Slurm to confirm, and otherwise says the action is queued.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from marduk_slurm.adapters.health_check import run_check
from marduk_slurm.adapters.slurm.base import SlurmBackend
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.decisions import Effects, take_decision
from marduk_slurm.domain import hostlist, slurm_names, subjects
from marduk_slurm.domain import messages as m
from marduk_slurm.domain.decisions import OperatorDrain, may_resume
from marduk_slurm.domain.gpu_health import FaultPolicy, GpuReading
from marduk_slurm.domain.inject import AGENT_ANSWER_WAIT_S, REQUEST_ID_KEY, new_request_id
from marduk_slurm.errors import BusError, BusTimeout, NotFound, ProtocolError, SlurmError

AGENT_CHECK_MARGIN_S = 5.0  # how much longer than a node check the controller waits for it

class Operations:
    def __init__(self, ctx: Context, slurm: SlurmBackend, fault_policy: FaultPolicy,
                 refresh_nodes: Any, *, resume_check: str = "",
                 resume_check_timeout_s: float = 900.0,
                 resume_check_by_partition: dict[str, str] | None = None,
                 slurm_health: Callable[[], dict[str, Any]] | None = None) -> None:
        self.ctx = ctx
        self.slurm_health = slurm_health
        self.resume_check = resume_check
        self.resume_check_timeout_s = resume_check_timeout_s
        self.resume_check_by_partition = dict(resume_check_by_partition or {})
        self._checks: dict[str, asyncio.Future[list[dict[str, Any]]]] = {}  # node checks by id
        self._cancelled: set[str] = set()  # the ids of checks the operator cancelled
        self.slurm = slurm
        self.fault_policy = fault_policy
        self.refresh_nodes = refresh_nodes  # async () -> None: read nodes back from Slurm

    async def _known_nodes(self, expr: str) -> list[str]:
        # Capped expansion, then Slurm's name rules: a clear error before anything is asked.
        names = slurm_names.check_node_names(hostlist.expand(expr))
        known = {n["name"] for n in await self.ctx.db(self.ctx.db.store.nodes)}
        if set(names) - known:
            await self.refresh_nodes()
            known = {n["name"] for n in await self.ctx.db(self.ctx.db.store.nodes)}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise NotFound(f"unknown node(s): {hostlist.compress(unknown)} "
                           f"(known: {hostlist.compress(sorted(known)) or 'none'})")
        return names

    async def drain(self, expr: str, reason: str, *, actor: str, gpu: str | None,
                    wait_s: float) -> dict[str, Any]:
        names = await self._known_nodes(expr)
        # Stored and sent as Slurm will keep it: one printable line (slurm_names).
        reason = slurm_names.sanitize_reason(reason, slurm_names.MAX_OPERATOR_REASON_LEN)
        now = time.time()

        def decide(store: StoreApi) -> tuple[Effects, list[int]]:
            # One decision for the whole list: one event, one reason, one Slurm call.
            effects = Effects()
            eid = store.add_event("operator_drain", now=now, source=actor,
                                  node=names[0] if len(names) == 1 else None, gpu_uuid=gpu,
                                  reason=reason, evidence={"nodes": names})
            effects.feed.append(eid)
            take_decision(store, OperatorDrain(tuple(names), reason), cause_event=eid,
                          source=actor, now=now, policy=self.ctx.policy, effects=effects)
            return effects, [eid]

        effects, ids = await self.ctx.db.tx(decide)
        await self.ctx.carry_out(effects)
        return {"nodes": names, "events": ids, "leaves": len(effects.leaves),
                "slurm": await self._await_outbox("drain", names, wait_s)}

    async def resume(self, expr: str, *, actor: str, force: bool, wait_s: float,
                     operator_check: dict[str, Any] | None = None) -> dict[str, Any]:
        names = await self._known_nodes(expr)
        await self._health_checks(names, actor, operator_check)
        await self.refresh_nodes()  # judge on what Slurm says now, not on an old copy
        rows = {n["name"]: n for n in await self.ctx.db(self.ctx.db.store.nodes)}
        refused = {}
        for node in names:
            row = rows[node]
            allowed, why = may_resume(drained_by_marduk=row["drained_by_marduk"],
                                      reason=row["reason"], reason_user=row["reason_user"],
                                      force=force)
            if not allowed:
                refused[node] = why
        if refused:
            raise ValueError("; ".join(f"{n}: {why}" for n, why in refused.items()))
        now = time.time()

        def decide(store: StoreApi) -> Effects:
            effects = Effects()
            for node in names:
                store.cancel_pending("drain", node, now)
                eid = store.add_event("operator_resume", now=now, source=actor, node=node,
                                      reason="forced" if force else "resume",
                                      evidence={"previous_reason": rows[node]["reason"]})
                store.enqueue_slurm_action("resume", node, "", eid, now)
                effects.feed.append(eid)
            effects.outbox = True
            return effects

        await self.ctx.carry_out(await self.ctx.db.tx(decide))
        return {"nodes": names, "slurm": await self._await_outbox("resume", names, wait_s)}

    async def _health_checks(self, names: list[str], actor: str,
                             operator_check: dict[str, Any] | None) -> None:
        """Gate the resume on health checks: the one the operator ran (`--check`, its result
        sent along) and the configured `slurm.resume_check`. Each outcome is an event."""
        results: list[tuple[str, str, bool, dict[str, Any]]] = []
        if operator_check is not None:
            ok = operator_check.get("returncode") == 0
            results += [(n, "operator", ok, operator_check) for n in names]
        commands = await self._configured_checks(names)
        if commands:
            checks = await asyncio.gather(*(
                run_check(command, n, timeout_s=self.resume_check_timeout_s)
                for n, (command, _) in commands.items()))
            results += [(n, "configured", r.passed, {**r.evidence(), "partition": part})
                        for (n, (_, part)), r in zip(commands.items(), checks, strict=True)]
        if not results:
            return
        await self._record_checks(results, actor)
        failed = sorted({n for n, _, ok, _ in results if not ok})
        if failed:
            raise ValueError(f"health check failed on {hostlist.compress(failed)}; not resumed "
                             "(see marduk history)")

    async def _configured_checks(self, names: list[str]) -> dict[str, tuple[str, str | None]]:
        """The configured check of each node: {node: (command, the partition that chose it,
        None for slurm.resume_check)}; nodes without one are left out. The partitions are
        Slurm's, read now; when Slurm cannot say, the resume is refused rather than checked
        with the wrong command."""
        by_partition = self.resume_check_by_partition
        partitions: dict[str, tuple[str, ...]] = {}
        if by_partition:
            try:
                partitions = {n.name: n.partitions for n in await self.slurm.get_nodes(names)}
            except SlurmError as exc:
                raise ValueError(f"cannot read the partitions of {hostlist.compress(names)} "
                                 f"from Slurm to choose their health check: {exc}; not "
                                 "resumed") from None
        out: dict[str, tuple[str, str | None]] = {}
        for node in names:
            part = next((p for p in partitions.get(node, ()) if p in by_partition), None)
            if part is not None:
                out[node] = (by_partition[part], part)
            elif self.resume_check:
                out[node] = (self.resume_check, None)
        return out

    async def node_check(self, expr: str, check_id: str, timeout_s: float, *, actor: str
                         ) -> dict[str, Any]:
        """`marduk resume NODES --check`: each node's agent checks its node (every GPU read
        and judged now, then the site's `agent.health_check` program), at most `timeout_s`.
        Each outcome is a `resume_check_passed` / `_failed` event; a node whose agent does
        not answer in time fails. `cancel_check(check_id)` stops it on every node."""
        names = await self._known_nodes(expr)
        if check_id in self._checks:
            raise ValueError(f"check {check_id} is running already")
        task = asyncio.ensure_future(asyncio.gather(
            *(self._agent_check(n, check_id, timeout_s) for n in names)))
        self._checks[check_id] = task
        try:
            evidence = await task
        except asyncio.CancelledError:
            if check_id not in self._cancelled:  # not the operator: a shutdown; stop it too
                task.cancel()
                raise
            for node in names:  # the agents stop their checks' processes
                await self.ctx.publish(subjects.agent_rpc(node, "check_cancel"), m.encode(
                    m.Request(args={"check_id": check_id}, actor=actor)))
            await self._record_checks([(n, "node", False, {
                "command": "agent check", "returncode": None,
                "output": "cancelled by the operator; its processes were stopped"})
                for n in names], actor)
            raise ValueError("check cancelled; its processes on the nodes were stopped, "
                             "nothing was resumed") from None
        finally:
            self._checks.pop(check_id, None)
            self._cancelled.discard(check_id)
        results = [(n, "node", ev.get("returncode") == 0, ev)
                   for n, ev in zip(names, evidence, strict=True)]
        await self._record_checks(results, actor)
        return {"nodes": names, "passed": all(ok for *_, ok, _ in results),
                "checks": {n: ev for n, _, _, ev in results}}

    def cancel_check(self, check_id: str) -> bool:
        task = self._checks.get(check_id)
        if task is None or task.done():
            return False
        self._cancelled.add(check_id)
        task.cancel()
        return True

    async def _agent_check(self, node: str, check_id: str, timeout_s: float
                           ) -> dict[str, Any]:
        """One node's agent check, as evidence (`returncode` 0 = passed)."""
        request = m.Request(args={"check_id": check_id, "timeout_s": timeout_s})
        started = time.monotonic()
        try:
            raw = await self.ctx.bus.request(subjects.agent_rpc(node, "check"),
                                             m.encode(request),
                                             timeout_s=timeout_s + AGENT_CHECK_MARGIN_S)
            reply = m.decode_reply(raw)
        except (BusError, BusTimeout, ProtocolError) as exc:
            return {"command": "agent check", "returncode": None,
                    "output": f"the agent on {node} did not answer: {exc}"[:2000],
                    "duration_s": round(time.monotonic() - started, 3)}
        if not reply.ok:
            return {"command": "agent check", "returncode": None,
                    "output": f"the agent on {node} refused: {reply.error}"[:2000],
                    "duration_s": round(time.monotonic() - started, 3)}
        return dict(reply.data or {})

    async def _record_checks(self, results: list[tuple[str, str, bool, dict[str, Any]]],
                             actor: str) -> None:
        now = time.time()

        def record(store: StoreApi) -> list[int]:
            return [store.add_event(
                "resume_check_passed" if ok else "resume_check_failed", now=now,
                source=actor, node=node, reason=f"{kind} check: {ev.get('command', '')}"[:500],
                evidence=ev) for node, kind, ok, ev in results]

        await self.ctx.publish_feed(await self.ctx.db.tx(record))

    async def _await_outbox(self, kind: str, names: list[str], wait_s: float) -> dict[str, str]:
        """Wait up to `wait_s` for Slurm to confirm; report per node."""
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            rows = await self.ctx.db(self.ctx.db.store.latest_actions, kind)
            states = {r["node"]: (r["state"], r["last_error"]) for r in rows
                      if r["node"] in names}
            if all(s[0] != "pending" for s in states.values()) or time.monotonic() > deadline:
                return {n: _describe(states.get(n, ("done", ""))) for n in names}
            await asyncio.sleep(0.02)

    async def inject(self, node: str, gpu: str, xid: int, *, actor: str, at: float,
                     force: bool = False) -> dict[str, Any]:
        """Fault injection for drills: through the node's agent when one answers (the same
        verdict code as a real XID), else, for simulated GPUs or with `force`, as the verdict
        an agent would publish. Both carry one request id, so that a slow agent's late verdict
        is recorded but not acted on twice (domain.inject)."""
        request_id = new_request_id()
        request = m.Request(args={"gpu": gpu, "xid": xid, "request_id": request_id},
                            actor=actor)
        try:
            raw = await self.ctx.bus.request(subjects.agent_rpc(node, "inject"),
                                             m.encode(request), timeout_s=AGENT_ANSWER_WAIT_S)
            reply = m.decode_reply(raw)
            if not reply.ok:
                raise ValueError(f"agent on {node}: {reply.error}")
            return {"via": "agent", "request_id": request_id, **(reply.data or {})}
        except (BusError, BusTimeout) as exc:
            silence = str(exc)
        row = await self.ctx.db(self.ctx.db.store.node, node)
        if not force and not (row is not None and row.get("simulated_gpus")):
            # An agent that refuses drills on real GPUs must not be bypassed by its silence:
            # the verdict could drain a production node.
            raise ValueError(f"the agent on {node} did not answer ({silence}); the controller "
                             "injects by itself only on nodes with simulated GPUs (use --force "
                             "to inject on real GPUs anyway)")
        return await self._publish_injected_verdict(node, gpu, xid, actor, at, request_id)

    async def inject_node(self, node: str, component: str, target: str, fault: str, *,
                          actor: str) -> dict[str, Any]:
        """A drill on a port or mount point, by the node's agent only: the agent judges the
        reading the fault would make with its own policy and publishes the verdict, as for
        a real fault. There is no simulated port to fall back on."""
        request = m.Request(args={component: target, "fault": fault,
                                  "request_id": new_request_id()}, actor=actor)
        try:
            raw = await self.ctx.bus.request(subjects.agent_rpc(node, "inject"),
                                             m.encode(request), timeout_s=AGENT_ANSWER_WAIT_S)
        except (BusError, BusTimeout) as exc:
            raise ValueError(f"the agent on {node} did not answer ({exc}); only an agent "
                             f"injects {component} faults") from None
        reply = m.decode_reply(raw)
        if not reply.ok:
            raise ValueError(f"agent on {node}: {reply.error}")
        return {"via": "agent", **(reply.data or {})}

    async def reset_gpu(self, node: str, gpu: str, *, actor: str) -> dict[str, Any]:
        """A drill's GPU reset, by the node's agent only (simulated GPUs): the GPU's next
        verdict is published by the agent, as after any change."""
        request = m.Request(args={"gpu": gpu, "reset": True}, actor=actor)
        try:
            raw = await self.ctx.bus.request(subjects.agent_rpc(node, "inject"),
                                             m.encode(request), timeout_s=AGENT_ANSWER_WAIT_S)
        except (BusError, BusTimeout) as exc:
            raise ValueError(f"the agent on {node} did not answer ({exc}); only an agent "
                             "resets its GPUs") from None
        reply = m.decode_reply(raw)
        if not reply.ok:
            raise ValueError(f"agent on {node}: {reply.error}")
        return {"via": "agent", **(reply.data or {})}

    async def _publish_injected_verdict(self, node: str, gpu: str, xid: int, actor: str,
                                        at: float, request_id: str) -> dict[str, Any]:
        uuid, index = await self._resolve_gpu(node, gpu)
        # The same policy code an agent runs on a real XID.
        verdict = self.fault_policy.evaluate(
            GpuReading(uuid=uuid, index=-1 if index is None else index, node=node, xids=(xid,)))
        evidence = {**verdict.evidence, "injected": True, "injected_by": actor,
                    REQUEST_ID_KEY: request_id}
        if index is None:  # a GPU not in the inventory yet: no index to report (-1 is refused)
            evidence.pop("index", None)
        msg = m.Verdict(node=node, gpu_uuid=uuid, gpu_index=index, action=verdict.action,
                        reason=verdict.reason, xid=xid, ts=at, source="inject",
                        evidence=evidence)
        seq = await self.ctx.bus.publish_durable(subjects.node_event(node, "verdict"),
                                                 m.encode(msg))
        return {"via": "bus", "request_id": request_id, "gpu_uuid": uuid,
                "action": verdict.action.value, "reason": verdict.reason, "stream_seq": seq}

    async def _resolve_gpu(self, node: str, gpu: str) -> tuple[str, int | None]:
        gpus = await self.ctx.db(self.ctx.db.store.gpus, node)
        if gpu.isdigit():
            for row in gpus:
                if row["idx"] == int(gpu):
                    return row["uuid"], row["idx"]
            raise NotFound(f"no GPU with index {gpu} known on {node} "
                           f"(known: {', '.join(str(g['idx']) for g in gpus) or 'none'})")
        for row in gpus:
            if row["uuid"] == gpu:
                return row["uuid"], row["idx"]
        return gpu, None  # a UUID we have not seen yet is still a valid target

    async def status(self) -> dict[str, Any]:
        data: dict[str, Any] = await self.ctx.db.read(lambda store: store.status_counts())
        data.update({
            "uptime_s": round(time.time() - self.ctx.started_at, 1),
            "nats": self.ctx.nats_state,
            "nats_server": self.ctx.bus.server,
            "nats_reconnects": self.ctx.bus.reconnects,
            "slurm_backend": self.slurm.name,
            "slurm_calls": self.slurm.stats(),
            "counters": dict(self.ctx.stats),
            "rejections": self.ctx.rejections(),
            **({"slurm_health": self.slurm_health()}
               if self.slurm_health is not None and self.slurm.name != "none" else {}),
        })
        return data


def _describe(state: tuple[str, str]) -> str:
    status, error = state
    if status == "pending":
        return f"queued, will retry: {error}" if error else "queued"
    if status == "failed":
        return f"failed: {error}"
    return "done"
