"""Node rows written from what Slurm says, inside the caller's transaction.

Only rows that changed are written (a 1,000-node cluster read every few seconds must not hold
the write lane for a thousand upserts), and a row written after the read began (an outbox
confirmation that raced the read) is newer than the read and kept. Drains and resumes made
outside marduk become events (domain/node_changes.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from marduk_slurm.adapters.slurm.base import SlurmNode
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.domain.node_changes import FOREIGN_DRAIN, NodeView, node_change, who


def changed_nodes(rows: dict[str, dict[str, Any]], nodes: Iterable[SlurmNode]
                  ) -> list[SlurmNode]:
    """The nodes whose row (`StoreApi.node_slurm_rows`) differs from what Slurm says, or is
    missing: found on a read connection, so the write lane only sees the few that changed."""
    return [n for n in nodes if n.name not in rows or _differs(rows[n.name], n)]


def write_nodes(store: StoreApi, nodes: Sequence[SlurmNode], *, read_at: float, prefix: str,
                now: float | None = None) -> list[int]:
    """Write what changed; returns the ids of the foreign drain/resume events it added."""
    now = read_at if now is None else now
    rows = store.node_slurm_rows([n.name for n in nodes])
    resuming = store.pending_action_nodes("resume")
    ids = []
    for node in nodes:
        row = rows.get(node.name)
        if row is not None and row["updated_at"] > read_at:
            continue  # confirmed by the outbox after this read began: newer than the read
        if row is not None and not _differs(row, node):
            continue
        store.update_node_from_slurm(node.name, str(node.state), list(node.flags),
                                     node.reason, node.reason_user or "", now, prefix)
        kind = node_change(_view(row), _current(node), marduk_prefix=prefix,
                           marduk_resume_pending=node.name in resuming)
        if kind is not None:
            ids.append(_record(store, kind, node, row, now))
    return ids


def _differs(row: dict[str, Any], node: SlurmNode) -> bool:
    return (row["state"] != str(node.state) or row["flags"] != sorted(node.flags)
            or row["reason"] != node.reason or row["reason_user"] != (node.reason_user or ""))


def _view(row: dict[str, Any] | None) -> NodeView | None:
    if row is None:
        return None
    return NodeView(drained="DRAIN" in row["flags"], reason=row["reason"],
                    reason_user=row["reason_user"], known=row["state"] != "unknown")


def _current(node: SlurmNode) -> NodeView:
    return NodeView(drained="DRAIN" in node.flags, reason=node.reason,
                    reason_user=node.reason_user or "")


def _record(store: StoreApi, kind: str, node: SlurmNode, row: dict[str, Any] | None,
            now: float) -> int:
    if kind == FOREIGN_DRAIN:
        when = node.reason_time.isoformat() if node.reason_time else None
        return store.add_event(
            kind, now=now, source=who(node.reason_user or ""), node=node.name,
            reason=node.reason, evidence={"user": node.reason_user, "set_at": when,
                                          "state": str(node.state),
                                          "first_seen": row is None or row["state"] == "unknown"})
    previous = row or {}
    return store.add_event(
        kind, now=now, source="slurm", node=node.name,
        reason=f"drain lifted outside marduk (was: {previous.get('reason') or 'no reason'})",
        evidence={"previous_reason": previous.get("reason", ""),
                  "previous_user": previous.get("reason_user", ""),
                  "state": str(node.state)})
