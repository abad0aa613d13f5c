"""How a decision is carried out: the one apply path of every cause that takes capacity away.

The caller records its cause as an event (a GPU verdict, an operator's drain, a risk or a
straggler event, the end of a crashed step) and calls `take_decision` inside the same
transaction: the facts are read from the store, `domain.decisions.decide` decides, and the
decision is written here as events, outbox rows (drains), durable leave commands and durable
assume commands (a standby takes the place of a group that leaves). What
must reach NATS or Slurm comes back as `Effects`, carried out only after the commit
(`Context.carry_out`): a crash in between loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.domain.decisions import (
    Assignment,
    Cause,
    Decision,
    DecisionPolicy,
    Dismissal,
    Facts,
    Leave,
    NodeFacts,
    ReplicaRef,
    StandbyRef,
    StepCrash,
    decide,
    needs,
)
from marduk_slurm.domain.gpu_health import GpuAction

# The controller's decision settings (reason prefix, leave_on_drain); SIGHUP replaces them.
Policy = DecisionPolicy

# A leave command goes out at once after the commit; the re-sender takes over from here.
FIRST_LEAVE_RESEND_S = 1.0


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    leaves: list[tuple[Leave, int]] = field(default_factory=list)  # (leave, event id)
    assumes: list[tuple[Assignment, int]] = field(default_factory=list)  # (assignment, event)
    dismissals: list[tuple[Dismissal, int]] = field(default_factory=list)  # (dismissal, event)
    feed: list[int] = field(default_factory=list)  # event ids to publish on the feed
    outbox: bool = False  # Slurm actions were queued
    # Parts of a message refused while the rest applied: (cause, subject, detail, kind).
    rejected: list[tuple[str, str, str, str]] = field(default_factory=list)

    def extend(self, other: Effects) -> None:
        self.leaves += other.leaves
        self.assumes += other.assumes
        self.dismissals += other.dismissals
        self.feed += other.feed
        self.outbox = self.outbox or other.outbox
        self.rejected += other.rejected


def take_decision(store: StoreApi, cause: Cause, *, cause_event: int, source: str, now: float,
                  policy: Policy, effects: Effects) -> Decision:
    """Decide what `cause` (already recorded as event `cause_event`) means, and write the
    decision down. Must run inside the caller's transaction."""
    decision = decide(cause, event_id=cause_event, facts=gather_facts(store, cause),
                      policy=policy)
    apply_decision(store, decision, cause_event=cause_event, source=source, now=now,
                   effects=effects)
    return decision


def gather_facts(store: StoreApi, cause: Cause) -> Facts:
    """Read what `decide` needs for this cause (domain.decisions.needs), and the ready
    standbys of every job it concerns."""
    node_names, job_id = needs(cause)
    nodes = {}
    for name in node_names:
        row = store.node(name)
        nodes[name] = NodeFacts(tuple(replica_refs(store.replicas(node=name))),
                                drained=row is not None and "DRAIN" in row["flags"])
    job_replicas: tuple[ReplicaRef, ...] = ()
    if job_id is not None:
        job_replicas = tuple(replica_refs(store.replicas(job_id=job_id)))
    jobs = {r.job_id for n in nodes.values() for r in n.replicas}
    jobs |= {r.job_id for r in job_replicas}
    if isinstance(cause, StepCrash):
        jobs.add(cause.job_id)
    standbys = tuple(StandbyRef(s["standby_id"], s["job_id"], tuple(s["nodes"]), s["drained"])
                     for s in store.ready_standbys(jobs))
    here = tuple(StandbyRef(s["standby_id"], s["job_id"], tuple(s["nodes"]), s["drained"])
                 for s in store.ready_standbys_on(node_names))
    return Facts(nodes=nodes, job_replicas=job_replicas, standbys=standbys,
                 assuming=frozenset(store.assuming_groups(jobs)) if standbys else frozenset(),
                 standbys_here=here)


def apply_decision(store: StoreApi, decision: Decision, *, cause_event: int, source: str,
                   now: float, effects: Effects) -> None:
    queue_leaves(store, decision.leaves, cause_event, source, now, effects)
    for drain in decision.drains:
        queue_drain(store, drain.node, drain.reason, cause_event, source, now, effects,
                    batch_reason=drain.batch_reason)
    queue_assumes(store, decision.assignments, cause_event, source, now, effects)
    queue_dismissals(store, decision.dismissals, cause_event, source, now, effects)


def queue_dismissals(store: StoreApi, dismissals: list[Dismissal], cause_event: int, source: str,
                     now: float, effects: Effects) -> None:
    """Record each standby told to stand down and store its command (durable, re-sent until
    the standby is gone)."""
    for d in dismissals:
        sb = d.standby
        store.mark_standby_assuming(sb.standby_id, leaving=True)
        eid = store.add_event(
            "standby_dismissed", now=now, source=source, node=sb.nodes[0] if sb.nodes else None,
            job_id=sb.job_id, replica_id=sb.standby_id, reason=d.reason,
            evidence={"cause_event": cause_event, "nodes": list(sb.nodes)})
        store.put_assume_command(sb.standby_id, sb.job_id, -1, d.reason, eid,
                                 now + FIRST_LEAVE_RESEND_S, now, action="leave")
        effects.dismissals.append((d, eid))
        effects.feed.append(eid)


def replica_refs(rows: list[dict[str, Any]]) -> list[ReplicaRef]:
    """The replicas among `rows` (standbys are not replicas until they assume a group)."""
    return [ReplicaRef(r["replica_id"], r["job_id"], r["replica_group"], r["node"],
                       tuple(r.get("gpu_uuids", ())), leaving=r.get("state") == "leaving")
            for r in rows if r.get("role", "replica") == "replica"]


def queue_assumes(store: StoreApi, assignments: list[Assignment], cause_event: int, source: str,
                  now: float, effects: Effects) -> None:
    """Record each assignment and store its assume command (durable, re-sent until the
    standby acknowledges it or is gone), in the decision's transaction."""
    for a in assignments:
        sb = a.standby
        store.mark_standby_assuming(sb.standby_id)
        eid = store.add_event(
            "standby_assigned", now=now, source=source, node=sb.nodes[0] if sb.nodes else None,
            job_id=sb.job_id, replica_id=sb.standby_id, reason=a.reason,
            evidence={"cause_event": cause_event, "replica_group": a.replica_group,
                      "nodes": list(sb.nodes)})
        store.put_assume_command(sb.standby_id, sb.job_id, a.replica_group, a.reason, eid,
                                 now + FIRST_LEAVE_RESEND_S, now)
        effects.assumes.append((a, eid))
        effects.feed.append(eid)


def queue_leaves(store: StoreApi, leaves: list[Leave], cause_event: int, source: str,
                 now: float, effects: Effects) -> None:
    """Record a leave per replica, store its command (durable), schedule the first send."""
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


def queue_drain(store: StoreApi, node: str, reason: str, cause_event: int, source: str,
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
