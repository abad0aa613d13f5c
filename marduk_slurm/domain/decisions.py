"""Every decision that takes capacity away from a job, in one place, as a value.

A *cause* (a GPU verdict, an operator's drain, a GPU whose failure risk crossed the threshold,
a straggler to evict, a job step that crashed) and the *facts* it concerns (the replicas on
the nodes involved, whether a node is drained already) go in; a `Decision` comes out: which
replicas leave (now, or at their next step boundary) and which nodes are drained with which
reason, and which ready standby (a hot spare) takes the place of each replica group that
leaves. The controller records the cause as an event, asks `decide()`, and carries the
decision out in the same transaction (`controller/decisions.py`). Nothing here touches Slurm,
NATS or SQLite; docs/architecture.md ("adding a new cause") shows the path end to end.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from marduk_slurm.domain.gpu_health import GpuAction


@dataclass(frozen=True)
class ReplicaRef:
    replica_id: str
    job_id: int
    replica_group: int
    node: str
    gpu_uuids: tuple[str, ...] = ()
    leaving: bool = False  # an earlier decision sent it away already


@dataclass(frozen=True)
class StandbyRef:
    """A ready standby of a job: a started, model-built training process (one per node of a
    replica group) that is not in torchft's quorum."""

    standby_id: str
    job_id: int
    nodes: tuple[str, ...]
    drained: bool = False  # one of its nodes is drained (by marduk or anyone)


@dataclass(frozen=True)
class Assignment:
    """`standby` assumes `replica_group` of its job, in place of the replicas that leave."""

    standby: StandbyRef
    replica_group: int
    reason: str


@dataclass(frozen=True)
class Dismissal:
    """`standby` stands down: a node it waits on is being drained, so it could never take a
    group there. Its process exits and the job's supervisor starts a standby elsewhere."""

    standby: StandbyRef
    reason: str


@dataclass(frozen=True)
class Leave:
    replica: ReplicaRef
    immediate: bool  # True: leave now; False: at the next step boundary
    reason: str


@dataclass(frozen=True)
class Drain:
    node: str
    reason: str
    batch_reason: str = ""  # the cause without GPU and event, shared by a storm of drains


@dataclass(frozen=True)
class Decision:
    leaves: list[Leave] = field(default_factory=list)
    drains: list[Drain] = field(default_factory=list)
    assignments: list[Assignment] = field(default_factory=list)
    dismissals: list[Dismissal] = field(default_factory=list)


@dataclass(frozen=True)
class NodeFacts:
    """What the decision needs to know about one node: its live replicas, and whether it is
    drained already (by marduk or anyone)."""

    replicas: tuple[ReplicaRef, ...] = ()
    drained: bool = False


@dataclass(frozen=True)
class Facts:
    """What the controller knows, as far as the cause concerns it (see `needs`)."""

    nodes: Mapping[str, NodeFacts] = field(default_factory=dict)
    job_replicas: tuple[ReplicaRef, ...] = ()  # live replicas of the cause's job, any node
    # Ready standbys of the jobs whose replicas the cause concerns, and the (job, group)
    # pairs a standby is already assuming (an earlier decision's assume is pending).
    standbys: tuple[StandbyRef, ...] = ()
    assuming: frozenset[tuple[int, int]] = frozenset()
    # Ready standbys of any job with a node among the cause's nodes.
    standbys_here: tuple[StandbyRef, ...] = ()


@dataclass(frozen=True)
class DecisionPolicy:
    reason_prefix: str = "marduk"  # marks a drain as marduk's own: `resume` may undo it
    leave_on_drain: bool = True  # the other replicas of a drained node leave too


# -- causes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuFault:
    """The agent's (or a drill's) verdict on one GPU."""

    node: str
    gpu_uuid: str
    action: GpuAction
    xid: int | None = None


@dataclass(frozen=True)
class NodeFault:
    """The agent's (or a drill's) verdict on a network port or a mount point of a node
    (domain.node_health): `code` says what was found (flapping, state, hung, ...)."""

    node: str
    component: str  # port, mount
    target: str  # mlx5_0/1, eth0, /lustre
    action: GpuAction
    code: str = ""


@dataclass(frozen=True)
class OperatorDrain:
    nodes: tuple[str, ...]
    reason: str  # as the operator wrote it


@dataclass(frozen=True)
class RiskThreshold:
    node: str
    gpu_uuid: str
    score: int


@dataclass(frozen=True)
class StragglerEviction:
    replica: ReplicaRef
    drain_node: bool  # policy evict_and_drain
    reason: str


@dataclass(frozen=True)
class StepCrash:
    """A job step ended with a failure (exit_codes.describe() says "crash"): its replicas are
    gone; a replica group that had ranks in it cannot go on with the ranks it has elsewhere."""

    job_id: int
    replica_groups: tuple[int, ...]  # the groups that had a replica in the crashed step
    node: str
    exit_status: int


Cause = GpuFault | OperatorDrain | RiskThreshold | StragglerEviction | StepCrash | NodeFault


def needs(cause: Cause) -> tuple[tuple[str, ...], int | None]:
    """The nodes whose facts `decide` needs for this cause, and the job whose replicas it
    needs (None: no job's). The standbys are read for every job with a replica in these."""
    if isinstance(cause, OperatorDrain):
        return cause.nodes, None
    if isinstance(cause, StragglerEviction):
        return (cause.replica.node,), None
    if isinstance(cause, StepCrash):
        return (), cause.job_id
    return (cause.node,), None


def decide(cause: Cause, *, event_id: int, facts: Facts, policy: DecisionPolicy) -> Decision:
    """The decision for one cause. `event_id` is the cause's own event (drain reasons name
    it, so that an operator can find the why); `facts` holds what `needs(cause)` names."""
    nodes = facts.nodes
    if isinstance(cause, GpuFault):
        decision = _gpu_fault(cause, event_id, nodes[cause.node], policy)
    elif isinstance(cause, NodeFault):
        decision = _node_fault(cause, event_id, nodes[cause.node], policy)
    elif isinstance(cause, OperatorDrain):
        decision = _operator_drain(cause, event_id, nodes, policy)
    elif isinstance(cause, RiskThreshold):
        decision = _risk(cause, event_id, nodes[cause.node], policy)
    elif isinstance(cause, StragglerEviction):
        decision = _straggler(cause, event_id, nodes[cause.replica.node], policy)
    else:
        decision = _step_crash(cause, facts.job_replicas)
    crashed = ({(cause.job_id, g): (cause.node,) for g in cause.replica_groups}
               if isinstance(cause, StepCrash) else {})
    return replace(decision, assignments=assign_standbys(decision, facts, crashed),
                   dismissals=dismiss_standbys(decision, facts))


def dismiss_standbys(decision: Decision, facts: Facts) -> list[Dismissal]:
    """The ready standbys on a node this decision drains stand down."""
    drains = {d.node: d for d in decision.drains}
    out = []
    for standby in facts.standbys_here:
        hit = next((drains[n] for n in standby.nodes if n in drains), None)
        if hit is not None:
            out.append(Dismissal(standby, f"node {hit.node} drained: {hit.reason}"[:500]))
    return out


def assign_standbys(decision: Decision, facts: Facts,
                    crashed: Mapping[tuple[int, int], tuple[str, ...]] | None = None
                    ) -> list[Assignment]:
    """Which ready standby takes the place of which replica group.

    A group is vacated when its replicas leave (those sent away by this decision, not by an
    earlier one) or, for a crashed step, when its replicas are gone already (`crashed`: the
    group and the nodes it lost). Groups that leave now are served first, then those leaving
    at a step boundary, each in (job, group) order. A group gets at most one standby, and
    none while an earlier assume for it is pending; a standby takes at most one group, only
    of its own job, and never when one of its nodes is drained, being drained by this
    decision, or one the group is leaving."""
    vacated: dict[tuple[int, int], tuple[bool, set[str]]] = {
        key: (True, set(nodes)) for key, nodes in (crashed or {}).items()}
    for leave in decision.leaves:
        r = leave.replica
        if r.leaving:
            continue
        now, nodes = vacated.get((r.job_id, r.replica_group), (False, set()))
        vacated[(r.job_id, r.replica_group)] = (now or leave.immediate, nodes | {r.node})
    draining = {d.node for d in decision.drains}
    taken: set[str] = set()
    out = []
    for (job, group), (now, nodes) in sorted(vacated.items(), key=lambda kv: (not kv[1][0],
                                                                               kv[0])):
        if (job, group) in facts.assuming:
            continue
        avoid = draining | nodes
        pick = next((s for s in facts.standbys if s.job_id == job and not s.drained
                     and s.standby_id not in taken and not avoid.intersection(s.nodes)), None)
        if pick is None:
            continue
        taken.add(pick.standby_id)
        why = (f"standby {pick.standby_id} assumes replica group {group} of job {job} "
               f"({'leaving now' if now else 'leaving at a step boundary'})")
        out.append(Assignment(pick, group, why))
    return out


def _gpu_fault(cause: GpuFault, event_id: int, node: NodeFacts,
               policy: DecisionPolicy) -> Decision:
    """- drain_node: replicas on the GPU leave now, so torchft's quorum drops them at once
      instead of waiting out a heartbeat timeout; the node is drained so Slurm stops placing
      work there; the other replicas on the node leave at their next step boundary.
    - reset_gpu, restart_app: replicas on the GPU leave now (the supervisor respawns them);
      the node stays in service.
    - watch, none: recorded only."""
    action, xid = cause.action, cause.xid
    if action in (GpuAction.NONE, GpuAction.WATCH):
        return Decision()
    why = f"gpu {cause.gpu_uuid}: {action.value}" + (f" (xid {xid})" if xid is not None else "")
    on_gpu = [r for r in node.replicas if cause.gpu_uuid in r.gpu_uuids]
    leaves = [Leave(r, immediate=True, reason=why) for r in on_gpu]
    if action is not GpuAction.DRAIN_NODE:
        return Decision(leaves=leaves)
    if policy.leave_on_drain:
        leaves += _boundary_leaves(node, f"node {cause.node} drained: {why}",
                                   skip={r.replica_id for r in on_gpu})
    reason = drain_reason(policy.reason_prefix, gpu_uuid=cause.gpu_uuid, xid=xid,
                          action=action.value, event_id=event_id)
    what = f"xid={xid}" if xid is not None else f"action={action.value}"
    return Decision(leaves=leaves, drains=[Drain(cause.node, reason,
                                                 f"{policy.reason_prefix}: {what}")])


def _node_fault(cause: NodeFault, event_id: int, node: NodeFacts,
                policy: DecisionPolicy) -> Decision:
    """- drain_node: the node is drained, and every replica on it leaves now: a port or a
      shared filesystem serves the whole node, so each of its replicas is as stuck as one
      on a failed GPU (leave_on_drain does not keep them).
    - watch, none: recorded only."""
    if cause.action is not GpuAction.DRAIN_NODE:
        return Decision()
    what = cause.code or cause.action.value
    why = f"{cause.component} {cause.target}: {what}"
    # A Slurm reason is one line of words: the target (a path may hold anything printable)
    # becomes one token.
    target = "".join(c if c.isprintable() and not c.isspace() else "_" for c in cause.target)
    reason = f"{policy.reason_prefix}: {cause.component}={target} {what} event={event_id}"
    return Decision(leaves=[Leave(r, immediate=True, reason=why) for r in node.replicas],
                    drains=[Drain(cause.node, reason,
                                  f"{policy.reason_prefix}: {cause.component} {what}")])


def _operator_drain(cause: OperatorDrain, event_id: int, facts: Mapping[str, NodeFacts],
                    policy: DecisionPolicy) -> Decision:
    """A planned drain: one reason for every node; replicas leave at a step boundary, to
    respawn elsewhere."""
    prefix = policy.reason_prefix
    text = cause.reason if cause.reason.startswith(prefix + ":") else f"{prefix}: {cause.reason}"
    decision = Decision()
    for node in cause.nodes:
        decision.drains.append(Drain(node, f"{text} event={event_id}"))
        if policy.leave_on_drain:
            decision.leaves.extend(_boundary_leaves(facts[node],
                                                    f"node {node} drained: {cause.reason}"))
    return decision


def _risk(cause: RiskThreshold, event_id: int, node: NodeFacts,
          policy: DecisionPolicy) -> Decision:
    """A GPU likely to fail: drain its node before it does (replicas leave at a boundary).
    A node drained already, by anyone, is left as it is."""
    if node.drained:
        return Decision()
    leaves = (_boundary_leaves(node, f"risk {cause.score}") if policy.leave_on_drain else [])
    reason = (f"{policy.reason_prefix}: risk={cause.score} gpu={cause.gpu_uuid} "
              f"event={event_id}")
    return Decision(leaves=leaves, drains=[Drain(cause.node, reason)])


def _straggler(cause: StragglerEviction, event_id: int, node: NodeFacts,
               policy: DecisionPolicy) -> Decision:
    """The slow replica leaves at its next step boundary; with evict_and_drain its node is
    drained too, and then the node's other replicas leave as with any drain."""
    r = cause.replica
    leaves = [Leave(r, immediate=False, reason=f"straggler: {cause.reason}")]
    if not cause.drain_node:
        return Decision(leaves=leaves)
    if policy.leave_on_drain:
        leaves += _boundary_leaves(node, f"node {r.node} drained: straggler {r.replica_id}",
                                   skip={r.replica_id})
    reason = f"{policy.reason_prefix}: straggler replica={r.replica_id} event={event_id}"
    return Decision(leaves=leaves, drains=[Drain(r.node, reason)])


def _step_crash(cause: StepCrash, job_replicas: tuple[ReplicaRef, ...]) -> Decision:
    """The ranks of a crashed group that run elsewhere wait in vain for their peers: they
    leave now, and the group is started again whole. The node is not drained: a crash says
    nothing about its hardware (a GPU verdict does)."""
    groups = set(cause.replica_groups)
    why = f"replica group of job {cause.job_id} lost a step on {cause.node} " \
          f"(exit status {cause.exit_status})"
    return Decision(leaves=[Leave(r, immediate=True, reason=why) for r in job_replicas
                            if r.job_id == cause.job_id and r.replica_group in groups])


def _boundary_leaves(node: NodeFacts, reason: str, skip: set[str] | frozenset[str] = frozenset()
                     ) -> list[Leave]:
    return [Leave(r, immediate=False, reason=reason) for r in node.replicas
            if r.replica_id not in skip]


def drain_reason(prefix: str, *, gpu_uuid: str | None, xid: int | None, action: str,
                 event_id: int) -> str:
    """A reason an operator can act on, e.g. ``marduk: xid=79 gpu=GPU-1a2b event=123``.

    The prefix marks the drain as Marduk's own, which is how `resume` knows it may undo it."""
    parts = [f"{prefix}:"]
    parts.append(f"xid={xid}" if xid is not None else f"action={action}")
    if gpu_uuid:
        parts.append(f"gpu={gpu_uuid}")
    parts.append(f"event={event_id}")
    return " ".join(parts)


def may_resume(*, drained_by_marduk: bool, reason: str, reason_user: str,
               force: bool) -> tuple[bool, str]:
    """Marduk only undoes what Marduk did, unless forced. Returns (allowed, explanation)."""
    if drained_by_marduk or force:
        return True, "forced" if force and not drained_by_marduk else "drained by marduk"
    who = reason_user or "someone else"
    return False, (f"drained by {who}, not by marduk (reason: {reason or 'none'}); "
                   "use --force to resume anyway")
