"""What happens when a GPU fails, or an operator drains a node: the decision, as a value.

The controller persists the verdict, asks this module what to do, then carries the answer out:
tell replicas to leave (at once, or at their next step boundary) and drain the node in Slurm.
Nothing here touches Slurm, NATS or SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from marduk_slurm.domain.gpu_health import GpuAction


@dataclass(frozen=True)
class ReplicaRef:
    replica_id: str
    job_id: int
    replica_group: int
    node: str
    gpu_uuids: tuple[str, ...] = ()


@dataclass(frozen=True)
class Leave:
    replica: ReplicaRef
    immediate: bool  # True: leave now; False: at the next step boundary
    reason: str


@dataclass(frozen=True)
class FaultResponse:
    drain: bool
    drain_reason: str = ""
    batch_reason: str = ""  # the cause without GPU and event, shared by a storm of drains
    leaves: list[Leave] = field(default_factory=list)


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


def respond_to_verdict(*, action: GpuAction, gpu_uuid: str, xid: int | None, event_id: int,
                       replicas_on_gpu: list[ReplicaRef], replicas_on_node: list[ReplicaRef],
                       reason_prefix: str, leave_on_drain: bool) -> FaultResponse:
    """Decide what a GPU verdict means for its replicas and its node.

    - drain_node: replicas on the GPU leave now, so torchft's quorum drops them at once
      instead of waiting out a heartbeat timeout; the node is drained so Slurm stops placing
      work there; the other replicas on the node leave at their next step boundary.
    - reset_gpu, restart_app: replicas on the GPU leave now (the supervisor respawns them);
      the node stays in service.
    - watch, none: recorded only.
    """
    why = f"gpu {gpu_uuid}: {action.value}" + (f" (xid {xid})" if xid is not None else "")
    if action in (GpuAction.NONE, GpuAction.WATCH):
        return FaultResponse(drain=False)
    on_gpu = {r.replica_id for r in replicas_on_gpu}
    leaves = [Leave(r, immediate=True, reason=why) for r in replicas_on_gpu]
    if action is not GpuAction.DRAIN_NODE:
        return FaultResponse(drain=False, leaves=leaves)
    if leave_on_drain:
        leaves += [Leave(r, immediate=False, reason=f"node {r.node} drained: {why}")
                   for r in replicas_on_node if r.replica_id not in on_gpu]
    reason = drain_reason(reason_prefix, gpu_uuid=gpu_uuid, xid=xid, action=action.value,
                          event_id=event_id)
    cause = f"xid={xid}" if xid is not None else f"action={action.value}"
    return FaultResponse(drain=True, drain_reason=reason,
                         batch_reason=f"{reason_prefix}: {cause}", leaves=leaves)


def respond_to_operator_drain(*, replicas_on_node: list[ReplicaRef], reason: str,
                              leave_on_drain: bool) -> list[Leave]:
    """A planned drain: replicas on the node leave at a step boundary, to respawn elsewhere."""
    if not leave_on_drain:
        return []
    return [Leave(r, immediate=False, reason=f"node {r.node} drained: {reason}")
            for r in replicas_on_node]


def may_resume(*, drained_by_marduk: bool, reason: str, reason_user: str,
               force: bool) -> tuple[bool, str]:
    """Marduk only undoes what Marduk did, unless forced. Returns (allowed, explanation)."""
    if drained_by_marduk or force:
        return True, "forced" if force and not drained_by_marduk else "drained by marduk"
    who = reason_user or "someone else"
    return False, (f"drained by {who}, not by marduk (reason: {reason or 'none'}); "
                   "use --force to resume anyway")
