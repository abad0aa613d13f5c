"""What changed on a node between two reads of Slurm, and whether someone other than marduk
changed it.

A reconcile pass compares the node row the controller holds with what Slurm says now. A drain
whose reason does not carry marduk's prefix is someone else's (`scontrol update ...
state=drain`, a health check script, another tool): it becomes a `foreign_drain` event with
the user and time Slurm keeps with the reason. A drain that disappears while marduk has no
resume of its own in flight is a `foreign_resume` (Slurm keeps no user for a resume).
"""

from __future__ import annotations

from dataclasses import dataclass

FOREIGN_DRAIN = "foreign_drain"
FOREIGN_RESUME = "foreign_resume"


@dataclass(frozen=True)
class NodeView:
    """A node's drain as one read saw it; `known` is False for a row Slurm never filled."""

    drained: bool
    reason: str = ""
    reason_user: str = ""
    known: bool = True


def is_ours(reason: str, marduk_prefix: str) -> bool:
    """A reason marduk wrote (`marduk: xid=79 ...`)."""
    return reason.startswith(marduk_prefix + ":")


def node_change(previous: NodeView | None, current: NodeView, *, marduk_prefix: str,
                marduk_resume_pending: bool) -> str | None:
    """`foreign_drain`, `foreign_resume` or None (nothing someone else did).

    A node seen for the first time already drained by someone else counts as a foreign drain:
    its history starts there. A foreign drain whose reason changes is a new foreign drain.
    """
    before = previous if previous is not None and previous.known else None
    if current.drained and not is_ours(current.reason, marduk_prefix):
        if before is None or not before.drained or before.reason != current.reason:
            return FOREIGN_DRAIN
        return None
    if before is not None and before.drained and not current.drained:
        return None if marduk_resume_pending else FOREIGN_RESUME
    return None


def who(user: str) -> str:
    """The person Slurm names for a reason, for the history's source column."""
    return user or "unknown (outside marduk)"
