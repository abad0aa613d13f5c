"""What each inbound durable message does to the store, inside the ingest's transaction.

Each handler checks who the message may speak for, writes rows and an event, and, for a
message that is a cause (a GPU verdict, a crashed step), hands it to the one decision path
(`controller.decisions.take_decision`). It returns the effects to carry out after the commit
(commands to publish, feed events, a nudge to the outbox worker). Effects never run before the
commit, so a crash in between loses nothing: the message is redelivered and skipped as already
ingested only once its rows are safely written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller.decisions import Effects, Policy, replica_refs, take_decision
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.decisions import GpuFault, Leave, NodeFault, StepCrash
from marduk_slurm.domain.exit_codes import describe
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.domain.inject import inject_request_id, mark_repeat
from marduk_slurm.domain.slurm_state import step_label
from marduk_slurm.errors import IdentityError, ProtocolError


def on_step_start(store: StoreApi, msg: m.StepStart, now: float, policy: Policy) -> Effects:
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
        reason=f"step {step_label(msg.job_id, msg.step_id)} started on {msg.node}",
        evidence={"step_id": msg.step_id, "gpu_indices": msg.gpu_indices, "gpu_uuids": uuids,
                  "pid": msg.pid, "uid": msg.uid, "replicas_mapped": joined},
    )
    effects.feed.append(eid)
    return effects


def _with_uuids(msg: m.StepStart, uuids: list[str]) -> m.StepStart:
    return m.StepStart(job_id=msg.job_id, step_id=msg.step_id, node=msg.node, ts=msg.ts,
                       gpu_indices=msg.gpu_indices, gpu_uuids=uuids, pid=msg.pid, uid=msg.uid)


def _own_gpus(store: StoreApi, node: str, uuids: list[str], now: float, what: str,
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


def on_step_end(store: StoreApi, msg: m.StepEnd, now: float, policy: Policy) -> Effects:
    gone = store.end_step(msg.job_id, msg.step_id, msg.node, msg.exit_status, now)
    for replica_id in gone:
        store.finish_leave_command(replica_id, "step ended", now)
    crashed = msg.exit_status is not None and describe(msg.exit_status) == "crash"
    eid = store.add_event(
        "step_end", now=now, source="agent", node=msg.node, job_id=msg.job_id,
        reason=f"step {step_label(msg.job_id, msg.step_id)} ended on {msg.node}",
        evidence={"step_id": msg.step_id, "exit_status": msg.exit_status,
                  "replicas_removed": gone, "crashed": crashed},
    )
    effects = Effects(feed=[eid])
    # A standby that crashed takes no group with it: only replicas count.
    groups = tuple(sorted({row["replica_group"] for rid in gone
                           if (row := store.replica(rid)) is not None
                           and row.get("role", "replica") == "replica"}))
    if crashed and groups:
        take_decision(store, StepCrash(msg.job_id, groups, msg.node, int(msg.exit_status or 0)),
                      cause_event=eid, source="policy", now=now, policy=policy,
                      effects=effects)
    return effects


def on_inventory(store: StoreApi, msg: m.GpuInventory, now: float, policy: Policy) -> Effects:
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


def on_verdict(store: StoreApi, msg: m.Verdict, now: float, policy: Policy) -> Effects:
    """A GPU verdict: persist it, then act on it (see domain.decisions). A verdict only
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
    take_decision(store, GpuFault(msg.node, msg.gpu_uuid, msg.action, msg.xid),
                  cause_event=eid, source="policy", now=now, policy=policy, effects=effects)
    return effects


# Ports and mount points one node may report: far more than any node has, few enough that an
# agent naming a new target in every verdict cannot grow the table without bound.
MAX_COMPONENTS_PER_NODE = 512


def on_node_verdict(store: StoreApi, msg: m.NodeVerdict, now: float, policy: Policy
                    ) -> Effects:
    """A verdict on a port or mount point of the node (domain.node_health): persisted as a
    `port_verdict` or `mount_verdict` event, then the same decision path as a GPU verdict.
    It only ever concerns its own node (the subject says which, ingest checks it)."""
    if (store.component_count(msg.node) >= MAX_COMPONENTS_PER_NODE
            and not store.has_component(msg.node, msg.component, msg.target)):
        raise ProtocolError("too_large", f"{msg.node} reports more than "
                            f"{MAX_COMPONENTS_PER_NODE} ports and mounts")
    # Drills of ports and mounts go through the agent only, so, unlike a GPU drill, one
    # never comes twice (once from the agent, once from the controller).
    eid = store.add_event(
        f"{msg.component}_verdict", now=now, source=msg.source, node=msg.node,
        action=msg.action, reason=msg.reason, evidence=msg.evidence)
    store.set_component_health(msg.node, msg.component, msg.target, msg.action, msg.reason,
                               eid, now)
    effects = Effects(feed=[eid])
    take_decision(store, NodeFault(msg.node, msg.component, msg.target,
                                   GpuAction(msg.action), _finding_code(msg.evidence)),
                  cause_event=eid, source="policy", now=now, policy=policy, effects=effects)
    return effects


def _finding_code(evidence: dict[str, Any]) -> str:
    """What the verdict's worst finding found (the first drain, else the first), as a short
    word for the drain reason; "" when the evidence does not say."""
    findings = evidence.get("findings")
    if not isinstance(findings, list):
        return ""
    codes = [(f.get("action"), f.get("code")) for f in findings if isinstance(f, dict)]
    ranked = sorted((a != "drain_node", i, c) for i, (a, c) in enumerate(codes)
                    if isinstance(c, str))
    code = ranked[0][2] if ranked else ""
    return "".join(ch for ch in code if ch.isalnum() or ch in "_:-")[:40]


def _check_replica_owner(store: StoreApi, replica_id: str, job_id: int) -> None:
    """A replica id belongs to the job that first registered it."""
    owner = store.replica_job(replica_id)
    if owner is not None and owner != job_id:
        raise IdentityError("identity_conflict",
                            f"job {job_id} used replica id {replica_id} of job {owner}")


def on_register(store: StoreApi, msg: m.ReplicaRegister, now: float, policy: Policy) -> Effects:
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
    what = (f"standby (slot {msg.replica_group})" if msg.standby
            else f"replica group {msg.replica_group}")
    eid = store.add_event(
        "standby_register" if msg.standby else "replica_register", now=now, source="replica",
        node=msg.node, job_id=msg.job_id, replica_id=msg.replica_id,
        reason=f"{what} rank {msg.group_rank} of job {msg.job_id} on {msg.node}",
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


def on_leave(store: StoreApi, msg: m.ReplicaLeave, now: float, policy: Policy) -> Effects:
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


def on_assume_ack(store: StoreApi, msg: m.AssumeAck, now: float, policy: Policy) -> Effects:
    """A standby took its assume command: the command is done and the standby's rows leave
    (it registers again as the group's replica, under torchft's new replica id)."""
    _check_replica_owner(store, msg.standby_id, msg.job_id)
    cmd = store.assume_command(msg.standby_id)
    if cmd is None or cmd["job_id"] != msg.job_id or cmd["replica_group"] != msg.replica_group:
        raise IdentityError("identity_conflict",
                            f"standby {msg.standby_id} of job {msg.job_id} acknowledged "
                            f"group {msg.replica_group}, which it was not told to assume")
    store.finish_assume_command(msg.standby_id, "standby confirmed" if msg.ok
                                else f"standby refused: {msg.error}", now)
    if msg.ok:
        store.standby_assumed(msg.standby_id, msg.replica_group, now)
    eid = store.add_event(
        "standby_assumed" if msg.ok else "standby_refused", now=now, source="replica",
        job_id=msg.job_id, replica_id=msg.standby_id,
        reason=(f"standby {msg.standby_id} assumes replica group {msg.replica_group}"
                if msg.ok else f"standby {msg.standby_id} could not assume: {msg.error}"),
        evidence={"replica_group": msg.replica_group, "assign_event": msg.event_id,
                  "ok": msg.ok})
    return Effects(feed=[eid])


def on_config_ack(store: StoreApi, msg: m.ConfigAck, now: float, policy: Policy) -> Effects:
    _check_replica_owner(store, msg.replica_id, msg.job_id)
    store.record_config_ack(msg.job_id, msg.revision, msg.replica_id, msg.applied_at_step,
                            msg.ok, msg.error, now)
    return Effects()


HANDLERS: dict[type, Callable[[StoreApi, Any, float, Policy], Effects]] = {
    m.StepStart: on_step_start,
    m.StepEnd: on_step_end,
    m.GpuInventory: on_inventory,
    m.Verdict: on_verdict,
    m.ReplicaRegister: on_register,
    m.ReplicaLeave: on_leave,
    m.ConfigAck: on_config_ack,
    m.AssumeAck: on_assume_ack,
    m.NodeVerdict: on_node_verdict,
}


def apply_message(store: StoreApi, msg: m.DurableMessage, now: float, policy: Policy) -> Effects:
    return HANDLERS[type(msg)](store, msg, now, policy)
