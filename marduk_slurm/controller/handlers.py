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

import msgspec

from marduk_slurm.adapters.store import Store
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.fault_response import Leave, ReplicaRef, respond_to_verdict
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.domain.inject import inject_request_id, mark_repeat
from marduk_slurm.errors import IdentityError

# A leave command goes out at once after the commit; the re-sender takes over from here.
FIRST_LEAVE_RESEND_S = 1.0


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    leaves: list[tuple[Leave, int]] = field(default_factory=list)  # (leave, event id)
    feed: list[int] = field(default_factory=list)  # event ids to publish on the feed
    outbox: bool = False  # Slurm actions were queued
    # Parts of a message refused while the rest applied: (cause, subject, detail, kind).
    rejected: list[tuple[str, str, str, str]] = field(default_factory=list)

    def extend(self, other: Effects) -> None:
        self.leaves += other.leaves
        self.feed += other.feed
        self.outbox = self.outbox or other.outbox
        self.rejected += other.rejected


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
        # The intent is stored with the decision: re-sent until the replica confirms it left
        # or is gone, whatever happens to the first command (crash, NATS blip, reconnect).
        store.put_leave_command(r.replica_id, r.job_id, r.replica_group, leave.reason,
                                leave.immediate, eid, now + FIRST_LEAVE_RESEND_S)
        effects.leaves.append((leave, eid))
        effects.feed.append(eid)


def on_step_start(store: Store, msg: m.StepStart, now: float, policy: Policy) -> Effects:
    store.ensure_node(msg.node, now)
    effects = Effects()
    uuids = _own_gpus(store, msg.node, list(msg.gpu_uuids), now, "step_start", effects)
    if not uuids:  # resolve indices the agent could not, from the inventory we keep
        uuids = [u for i in msg.gpu_indices if (u := store.gpu_uuid(msg.node, i))]
    if uuids != list(msg.gpu_uuids):
        msg = _with_uuids(msg, uuids)
    store.record_step_start(msg, now)
    joined = store.map_step_gpus_to_replicas(msg.job_id, msg.step_id, msg.node, uuids, now)
    eid = store.add_event(
        "step_start", now=now, source="agent", node=msg.node, job_id=msg.job_id,
        reason=f"step {msg.job_id}.{msg.step_id} started on {msg.node}",
        evidence={"step_id": msg.step_id, "gpu_indices": msg.gpu_indices, "gpu_uuids": uuids,
                  "pid": msg.pid, "uid": msg.uid, "replicas_mapped": joined},
    )
    effects.feed.append(eid)
    return effects


def _with_uuids(msg: m.StepStart, uuids: list[str]) -> m.StepStart:
    return m.StepStart(job_id=msg.job_id, step_id=msg.step_id, node=msg.node, ts=msg.ts,
                       gpu_indices=msg.gpu_indices, gpu_uuids=uuids, pid=msg.pid, uid=msg.uid)


def _own_gpus(store: Store, node: str, uuids: list[str], now: float, what: str,
              effects: Effects, subject: str = "") -> list[str]:
    """The UUIDs of `uuids` that are not bound to another node. A GPU belongs to the node that
    first reported it; a report from elsewhere is refused, with an event, until an operator
    releases it (`marduk gpus release`)."""
    owners = store.gpu_owners(uuids)
    mine = [u for u in uuids if owners.get(u, node) == node]
    for uuid in uuids:
        if owners.get(uuid, node) != node:
            store.add_event(
                "gpu_identity_conflict", now=now, source="controller", node=node,
                gpu_uuid=uuid, reason=f"{what} from {node} names GPU {uuid} of {owners[uuid]}",
                evidence={"bound_to": owners[uuid], "reported_by": node, "message": what})
            detail = f"GPU {uuid} of {owners[uuid]} reported by {node}"
            subject = subject or subjects.node_event(node, what)
            store.count_rejection("identity_conflict", subjects.subject_class(subject), what,
                                  detail, now)
            effects.rejected.append(("identity_conflict", subject, detail, what))
    return mine


def on_step_end(store: Store, msg: m.StepEnd, now: float, policy: Policy) -> Effects:
    gone = store.end_step(msg.job_id, msg.step_id, msg.node, msg.exit_status, now)
    for replica_id in gone:
        store.finish_leave_command(replica_id, "step ended", now)
    eid = store.add_event(
        "step_end", now=now, source="agent", node=msg.node, job_id=msg.job_id,
        reason=f"step {msg.job_id}.{msg.step_id} ended on {msg.node}",
        evidence={"step_id": msg.step_id, "exit_status": msg.exit_status,
                  "replicas_removed": gone},
    )
    return Effects(feed=[eid])


def on_inventory(store: Store, msg: m.GpuInventory, now: float, policy: Policy) -> Effects:
    effects = Effects()
    mine = set(_own_gpus(store, msg.node, [g.uuid for g in msg.gpus], now, "gpu_inventory",
                         effects))
    gpus = [g for g in msg.gpus if g.uuid in mine]
    store.upsert_gpus(msg.node, gpus, msg.simulated, now)
    eid = store.add_event(
        "gpu_inventory", now=now, source="agent", node=msg.node,
        reason=f"{len(gpus)} {'simulated ' if msg.simulated else ''}GPUs on {msg.node}",
        evidence={"gpus": [g.uuid for g in gpus], "simulated": msg.simulated,
                  "refused": sorted({g.uuid for g in msg.gpus} - mine)},
    )
    effects.feed.append(eid)
    return effects


def on_verdict(store: Store, msg: m.Verdict, now: float, policy: Policy) -> Effects:
    """A GPU verdict: persist it, then act on it (see domain.fault_response). A verdict only
    ever concerns its own node: a GPU bound to another node is refused, and only replicas on
    the verdict's node are asked to leave."""
    owner = store.gpu_owners([msg.gpu_uuid]).get(msg.gpu_uuid, msg.node)
    if owner != msg.node:
        raise IdentityError("identity_conflict",
                            f"verdict from {msg.node} for GPU {msg.gpu_uuid} of {owner}")
    request_id = inject_request_id(msg.evidence)
    if request_id and store.inject_applied(request_id):
        # The same drill answered twice (the agent late, after the controller's own verdict):
        # on record, acted on once.
        eid = store.add_event(
            "gpu_verdict", now=now, source=msg.source, node=msg.node, gpu_uuid=msg.gpu_uuid,
            xid=msg.xid, action=msg.action.value, reason=msg.reason,
            evidence=mark_repeat({**msg.evidence, "gpu_index": msg.gpu_index}))
        return Effects(feed=[eid])
    store.set_gpu_health(msg.gpu_uuid, msg.node, msg.gpu_index, msg.action.value, msg.reason, now)
    eid = store.add_event(
        "gpu_verdict", now=now, source=msg.source, node=msg.node, gpu_uuid=msg.gpu_uuid,
        xid=msg.xid, action=msg.action.value, reason=msg.reason,
        evidence={**msg.evidence, "gpu_index": msg.gpu_index},
    )
    effects = Effects(feed=[eid])
    response = respond_to_verdict(
        action=msg.action, gpu_uuid=msg.gpu_uuid, xid=msg.xid, event_id=eid,
        replicas_on_gpu=replica_refs(store.replicas(gpu_uuid=msg.gpu_uuid, node=msg.node)),
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


def _check_replica_owner(store: Store, replica_id: str, job_id: int) -> None:
    """A replica id belongs to the job that first registered it."""
    owner = store.replica_job(replica_id)
    if owner is not None and owner != job_id:
        raise IdentityError("identity_conflict",
                            f"job {job_id} used replica id {replica_id} of job {owner}")


def on_register(store: Store, msg: m.ReplicaRegister, now: float, policy: Policy) -> Effects:
    _check_replica_owner(store, msg.replica_id, msg.job_id)
    nodes = store.job_nodes(msg.job_id)
    if nodes is not None and msg.node not in nodes:
        # The step relay may not have reported this node's step yet: retried a few times
        # before it counts as a rejection.
        raise IdentityError("node_not_in_job",
                            f"replica {msg.replica_id} of job {msg.job_id} on {msg.node}, "
                            f"where the job has no running step", retry=True)
    effects = Effects()
    uuids = _own_gpus(store, msg.node, list(msg.gpu_uuids), now, "replica_register", effects,
                      subjects.job_event(msg.job_id, "replica_register"))
    if len(uuids) != len(msg.gpu_uuids):
        msg = msgspec.structs.replace(msg, gpu_uuids=uuids)
    store.register_replica(msg, now)
    eid = store.add_event(
        "replica_register", now=now, source="replica", node=msg.node, job_id=msg.job_id,
        replica_id=msg.replica_id,
        reason=f"replica group {msg.replica_group} rank {msg.group_rank} of job {msg.job_id} "
               f"on {msg.node}",
        evidence={"gpu_uuids": msg.gpu_uuids, "step_id": msg.step_id, "step": msg.step,
                  "hyperparams": msg.hyperparams, "pid": msg.pid},
    )
    effects.feed.append(eid)
    pending = store.pending_leave(msg.replica_id)
    if pending is not None:  # told to leave before it reconnected: tell it again
        ref = replica_refs(store.replicas(replica_id=msg.replica_id))
        if ref:
            effects.leaves.append((Leave(ref[0], immediate=bool(pending["immediate"]),
                                         reason=pending["reason"]), pending["event_id"] or eid))
    return effects


def on_leave(store: Store, msg: m.ReplicaLeave, now: float, policy: Policy) -> Effects:
    _check_replica_owner(store, msg.replica_id, msg.job_id)
    row = store.replica(msg.replica_id)
    left = store.leave_replica(msg.replica_id, msg.reason or "left", now)
    store.finish_leave_command(msg.replica_id, "replica confirmed", now)
    eid = store.add_event(
        "replica_leave", now=now, source="replica", job_id=msg.job_id,
        node=row["node"] if row else None, replica_id=msg.replica_id,
        reason=msg.reason or "left",
        evidence={"exit_code": msg.exit_code, "step": msg.step, "known": row is not None,
                  "was_active": left},
    )
    return Effects(feed=[eid])


def on_config_ack(store: Store, msg: m.ConfigAck, now: float, policy: Policy) -> Effects:
    _check_replica_owner(store, msg.replica_id, msg.job_id)
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
