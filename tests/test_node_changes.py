"""Drains and resumes made outside marduk, told apart from marduk's own (domain), and the node
rows the reconciler and the outbox write from Slurm's answer (a real SQLite store)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from marduk_slurm.adapters.slurm.base import SlurmNode
from marduk_slurm.adapters.store import Store
from marduk_slurm.controller.node_rows import write_nodes
from marduk_slurm.domain.node_changes import (
    FOREIGN_DRAIN,
    FOREIGN_RESUME,
    NodeView,
    node_change,
)
from marduk_slurm.domain.slurm_state import NodeState

UP = NodeView(drained=False)
OURS = NodeView(drained=True, reason="marduk: xid=79 gpu=G event=3")
THEIRS = NodeView(drained=True, reason="bad fan", reason_user="root")


@pytest.mark.parametrize(("before", "now", "resuming", "kind"), [
    (UP, THEIRS, False, FOREIGN_DRAIN),
    (None, THEIRS, False, FOREIGN_DRAIN),  # first seen, already drained by someone
    (NodeView(drained=False, known=False), THEIRS, False, FOREIGN_DRAIN),
    (THEIRS, THEIRS, False, None),  # the same drain seen again
    (THEIRS, NodeView(drained=True, reason="bad fan, RMA", reason_user="ops"), False,
     FOREIGN_DRAIN),  # someone drained it again with a new reason
    (OURS, THEIRS, False, FOREIGN_DRAIN),  # our drain's reason overwritten
    (UP, OURS, False, None),
    (OURS, UP, True, None),  # our resume, not yet confirmed
    (OURS, UP, False, FOREIGN_RESUME),
    (THEIRS, UP, False, FOREIGN_RESUME),
    (THEIRS, UP, True, None),  # a forced resume of ours
    (UP, UP, False, None),
    (None, UP, False, None),
])
def test_node_change(before: NodeView | None, now: NodeView, resuming: bool,
                     kind: str | None) -> None:
    assert node_change(before, now, marduk_prefix="marduk",
                       marduk_resume_pending=resuming) == kind


def slurm_node(name: str, state: str, reason: str = "", user: str | None = None) -> SlurmNode:
    parsed = NodeState.from_str(state)
    return SlurmNode(name=name, state=parsed, flags=parsed.flag_names(), reason=reason,
                     reason_user=user,
                     reason_time=datetime(2026, 12, 2, 3, 4, 5, tzinfo=UTC) if reason else None)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "m.db")
    s.migrate()
    return s


def write(store: Store, nodes: list[SlurmNode], at: float) -> list[int]:
    with store.transaction():
        return write_nodes(store, nodes, read_at=at, prefix="marduk")


def test_foreign_drain_and_resume_become_events_with_who(store: Store) -> None:
    assert write(store, [slurm_node("n1", "IDLE"), slurm_node("n2", "IDLE")], 10.0) == []
    [eid] = write(store, [slurm_node("n1", "IDLE+DRAIN", "bad fan", "alice"),
                          slurm_node("n2", "IDLE")], 20.0)
    event = store.event(eid)
    assert event is not None
    assert (event["kind"], event["node"], event["source"], event["reason"]) == (
        "foreign_drain", "n1", "alice", "bad fan")
    assert event["evidence"]["set_at"] == "2026-12-02T03:04:05+00:00"
    row = store.node("n1")
    assert row is not None
    assert (row["state"], row["flags"], row["reason_user"], row["drained_by_marduk"]) == (
        "IDLE+DRAIN", ["DRAIN"], "alice", False)
    assert write(store, [slurm_node("n1", "IDLE+DRAIN", "bad fan", "alice")], 30.0) == []
    [eid] = write(store, [slurm_node("n1", "IDLE")], 40.0)
    event = store.event(eid)
    assert event is not None and event["kind"] == "foreign_resume"
    assert event["evidence"]["previous_user"] == "alice"


def test_a_row_confirmed_after_the_read_began_is_kept(store: Store) -> None:
    write(store, [slurm_node("n1", "IDLE+DRAIN", "marduk: x", "root")], 10.0)
    with store.transaction():
        store.mark_node_resumed("n1", 25.0)  # the outbox, while a reconcile read was running
    # The reconcile pass read Slurm at 20 (still drained) and writes after the resume.
    assert write(store, [slurm_node("n1", "IDLE+DRAIN", "marduk: x", "root")], 20.0) == []
    row = store.node("n1")
    assert row is not None and (row["state"], row["flags"], row["reason"]) == ("IDLE", [], "")


def test_pending_marduk_resume_is_not_foreign(store: Store) -> None:
    write(store, [slurm_node("n1", "MIXED+DRAIN", "marduk: x", "root")], 10.0)
    with store.transaction():
        store.enqueue_slurm_action("resume", "n1", "", None, 15.0)
    assert write(store, [slurm_node("n1", "MIXED")], 20.0) == []


def test_marks_keep_state_and_flags_in_step(store: Store) -> None:
    write(store, [slurm_node("n1", "MIXED")], 10.0)
    with store.transaction():
        store.mark_node_drained("n1", "marduk: swap", 7, 11.0)
    row = store.node("n1")
    assert row is not None and (row["state"], row["flags"], row["drain_event_id"]) == (
        "MIXED+DRAIN", ["DRAIN"], 7)
    with store.transaction():
        store.mark_node_resumed("n1", 12.0)
    row = store.node("n1")
    assert row is not None and (row["state"], row["flags"], row["reason"]) == ("MIXED", [], "")
