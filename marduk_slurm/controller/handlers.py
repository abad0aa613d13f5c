"""Apply one durable message to the store, inside the caller's transaction.

Each handler writes rows and an event, and returns the effects to carry out after the commit
(commands to publish, feed events, a nudge to the outbox worker). Effects never run before the
commit, so a crash in between loses nothing: the message is redelivered and skipped as already
ingested only once its rows are safely written.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from marduk_slurm.adapters.store import Store
from marduk_slurm.domain import messages as m
from marduk_slurm.domain.fault_response import Leave, ReplicaRef, respond_to_verdict
from marduk_slurm.domain.gpu_health import GpuAction


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    leaves: list[tuple[Leave, int]] = field(default_factory=list)  # (leave, event id)
    feed: list[int] = field(default_factory=list)  # event ids to publish on the feed
    outbox: bool = False  # Slurm actions were queued

    def extend(self, other: Effects) -> None:
        self.leaves += other.leaves
        self.feed += other.feed
        self.outbox = self.outbox or other.outbox


@dataclass(frozen=True)
class Policy:
    reason_prefix: str = "marduk"
    leave_on_drain: bool = True


def replica_refs(rows: list[dict[str, Any]]) -> list[ReplicaRef]:
    return [ReplicaRef(r["replica_id"], r["job_id"], r["replica_group"], r["node"],
                       tuple(r.get("gpu_uuids", ()))) for r in rows]


def queue_leaves(store: Store, leaves: list[Leave], cause_event: int, source: str,
                 now: float, effects: Effects) -> None:
    """Record a leave decision per replica and schedule the command."""
    for leave in leaves:
        r = leave.replica
        store.mark_replica_leaving(r.replica_id)
        eid = store.add_event(
            "leave_requested", now=now, source=source, node=r.node, job_id=r.job_id,
            replica_id=r.replica_id, reason=leave.reason,
            evidence={"cause_event": cause_event, "immediate": leave.immediate},
        )
        effects.leaves.append((leave, eid))
        effects.feed.append(eid)


def on_step_start(store: Store, msg: m.StepStart, now: float, policy: Policy) -> Effects:
    store.ensure_node(msg.node, now)
    uuids = list(msg.gpu_uuids)
    if not uuids:  # resolve indices the agent could not, from the inventory we keep
        uuids = [u for i in msg.gpu_indices if (u := store.gpu_uuid(msg.node, i))]
        msg = _with_uuids(msg, uuids)
    store.record_step_start(msg, now)
    joined = store.map_step_gpus_to_replicas(msg.job_id, msg.step_id, msg.node, uuids, now)
    eid = store.add_event(
        "step_start", now=now, source="agent", node=msg.node, job_id=msg.job_id,
        reason=f"step {msg.job_id}.{msg.step_id} started on {msg.node}",
        evidence={"step_id": msg.step_id, "gpu_indices": msg.gpu_indices, "gpu_uuids": uuids,
                  "pid": msg.pid, "uid": msg.uid, "replicas_mapped": joined},
    )
    return Effects(feed=[eid])


def _with_uuids(msg: m.StepStart, uuids: list[str]) -> m.StepStart:
    return m.StepStart(job_id=msg.job_id, step_id=msg.step_id, node=msg.node, ts=msg.ts,
                       gpu_indices=msg.gpu_indices, gpu_uuids=uuids, pid=msg.pid, uid=msg.uid)


def on_step_end(store: Store, msg: m.StepEnd, now: float, policy: Policy) -> Effects:
    gone = store.end_step(msg.job_id, msg.step_id, msg.node, msg.exit_status, now)
    eid = store.add_event(
        "step_end", now=now, source="agent", node=msg.node, job_id=msg.job_id,
        reason=f"step {msg.job_id}.{msg.step_id} ended on {msg.node}",
        evidence={"step_id": msg.step_id, "exit_status": msg.exit_status,
                  "replicas_removed": gone},
    )
    return Effects(feed=[eid])


def on_inventory(store: Store, msg: m.GpuInventory, now: float, policy: Policy) -> Effects:
    store.upsert_gpus(msg.node, msg.gpus, msg.simulated, now)
    eid = store.add_event(
        "gpu_inventory", now=now, source="agent", node=msg.node,
        reason=f"{len(msg.gpus)} {'simulated ' if msg.simulated else ''}GPUs on {msg.node}",
        evidence={"gpus": [g.uuid for g in msg.gpus], "simulated": msg.simulated},
    )
    return Effects(feed=[eid])


def on_verdict(store: Store, msg: m.Verdict, now: float, policy: Policy) -> Effects:
    """A GPU verdict: persist it, then act on it (see domain.fault_response)."""
    store.set_gpu_health(msg.gpu_uuid, msg.node, msg.gpu_index, msg.action.value, msg.reason, now)
    eid = store.add_event(
        "gpu_verdict", now=now, source=msg.source, node=msg.node, gpu_uuid=msg.gpu_uuid,
        xid=msg.xid, action=msg.action.value, reason=msg.reason,
        evidence={**msg.evidence, "gpu_index": msg.gpu_index},
    )
    effects = Effects(feed=[eid])
    response = respond_to_verdict(
        action=msg.action, gpu_uuid=msg.gpu_uuid, xid=msg.xid, event_id=eid,
        replicas_on_gpu=replica_refs(store.replicas(gpu_uuid=msg.gpu_uuid)),
        replicas_on_node=replica_refs(store.replicas(node=msg.node)),
        reason_prefix=policy.reason_prefix, leave_on_drain=policy.leave_on_drain,
    )
    queue_leaves(store, response.leaves, eid, "policy", now, effects)
    if response.drain:
        queue_drain(store, msg.node, response.drain_reason, eid, "policy", now, effects,
                    batch_reason=response.batch_reason)
    return effects


def queue_drain(store: Store, node: str, reason: str, cause_event: int, source: str,
                now: float, effects: Effects, batch_reason: str = "") -> None:
    """Put a drain in the outbox. A drain already pending for the node is reused; whether
    the node is already drained is asked of Slurm just before acting, not of our copy."""
    action_id = store.enqueue_slurm_action("drain", node, reason, cause_event, now,
                                           batch_reason=batch_reason)
    eid = store.add_event("drain_requested", now=now, source=source, node=node, reason=reason,
                          action=GpuAction.DRAIN_NODE.value,
                          evidence={"cause_event": cause_event, "outbox_id": action_id})
    effects.feed.append(eid)
    effects.outbox = True


def on_register(store: Store, msg: m.ReplicaRegister, now: float, policy: Policy) -> Effects:
    store.register_replica(msg, now)
    eid = store.add_event(
        "replica_register", now=now, source="replica", node=msg.node, job_id=msg.job_id,
        replica_id=msg.replica_id,
        reason=f"replica group {msg.replica_group} rank {msg.group_rank} of job {msg.job_id} "
               f"on {msg.node}",
        evidence={"gpu_uuids": msg.gpu_uuids, "step_id": msg.step_id, "step": msg.step,
                  "hyperparams": msg.hyperparams, "pid": msg.pid},
    )
    return Effects(feed=[eid])


def on_leave(store: Store, msg: m.ReplicaLeave, now: float, policy: Policy) -> Effects:
    row = store.replica(msg.replica_id)
    left = store.leave_replica(msg.replica_id, msg.reason or "left", now)
    eid = store.add_event(
        "replica_leave", now=now, source="replica", job_id=msg.job_id,
        node=row["node"] if row else None, replica_id=msg.replica_id,
        reason=msg.reason or "left",
        evidence={"exit_code": msg.exit_code, "step": msg.step, "known": row is not None,
                  "was_active": left},
    )
    return Effects(feed=[eid])


def on_config_ack(store: Store, msg: m.ConfigAck, now: float, policy: Policy) -> Effects:
    store.record_config_ack(msg.job_id, msg.revision, msg.replica_id, msg.applied_at_step,
                            msg.ok, msg.error, now)
    return Effects()


HANDLERS: dict[type, Callable[[Store, Any, float, Policy], Effects]] = {
    m.StepStart: on_step_start,
    m.StepEnd: on_step_end,
    m.GpuInventory: on_inventory,
    m.Verdict: on_verdict,
    m.ReplicaRegister: on_register,
    m.ReplicaLeave: on_leave,
    m.ConfigAck: on_config_ack,
}


def apply_message(store: Store, msg: m.DurableMessage, now: float, policy: Policy) -> Effects:
    return HANDLERS[type(msg)](store, msg, now, policy)
