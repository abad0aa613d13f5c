"""The SQLite store on a real database file: migrations, the DR mapping, history, outbox."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from marduk_slurm.adapters.store import Store
from marduk_slurm.adapters.store.migrations import MIGRATIONS
from marduk_slurm.domain import messages as m


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "marduk.db")
    s.migrate()
    return s


def register(store: Store, rid: str, job: int, group: int, node: str, gpus: list[str],
             step: int = 0) -> None:
    with store.transaction():
        store.register_replica(m.ReplicaRegister(
            replica_id=rid, job_id=job, step_id=step, replica_group=group, node=node,
            gpu_uuids=gpus, hyperparams={"lr": 0.1, "betas": [0.9, 0.99]}), now=10.0)


def test_migrations_are_recorded_once_and_wal_is_on(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.db")
    assert s.migrate() == len(MIGRATIONS)
    assert s.migrate() == len(MIGRATIONS)  # idempotent
    assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    rows = s.conn.execute("SELECT version FROM schema_migrations").fetchall()
    assert [r[0] for r in rows] == list(range(1, len(MIGRATIONS) + 1))


def test_mapping_follows_steps_and_leaves(store: Store) -> None:
    with store.transaction():
        store.record_step_start(m.StepStart(job_id=5, step_id=0, node="n1",
                                            gpu_uuids=["G1", "G2"]), now=1.0)
    register(store, "job5_rg0:a", 5, 0, "n1", ["G1"])
    register(store, "job5_rg1:b", 5, 1, "n2", ["G3"], step=1)
    assert [r["replica_id"] for r in store.replicas(gpu_uuid="G1")] == ["job5_rg0:a"]
    assert store.replicas(node="n2")[0]["gpu_uuids"] == ["G3"]
    assert store.hyperparams("job5_rg0:a") == {"lr": 0.1, "betas": [0.9, 0.99]}
    with store.transaction():
        gone = store.end_step(5, 0, "n1", 0, now=20.0)
    assert gone == ["job5_rg0:a"]
    assert store.replicas(gpu_uuid="G1") == []
    left = store.replica("job5_rg0:a")
    assert left is not None and left["state"] == "left" and left["left_at"] == 20.0
    with store.transaction():
        assert store.leave_replica("job5_rg1:b", "told to", now=21.0) is True
        assert store.leave_replica("job5_rg1:b", "again", now=22.0) is False
    assert store.replicas() == []
    assert len(store.replicas(include_left=True)) == 2


def test_reregistration_moves_the_mapping(store: Store) -> None:
    register(store, "job5_rg0:a", 5, 0, "n1", ["G1"])
    register(store, "job5_rg0:a", 5, 0, "n4", ["G9"])
    rows = store.replicas()
    assert len(rows) == 1 and rows[0]["node"] == "n4" and rows[0]["gpu_uuids"] == ["G9"]


def test_heartbeats_update_latest_state_only_for_live_replicas(store: Store) -> None:
    register(store, "r:1", 1, 0, "n1", [])
    beats = [m.Heartbeat(replica_id="r:1", job_id=1, step=s, step_time_ms=float(s), ts=100.0 + s)
             for s in (1, 2, 3)] + [m.Heartbeat(replica_id="ghost", job_id=1, step=9)]
    with store.transaction():
        updated = store.write_heartbeats(beats, now=200.0)
    assert updated == 3
    row = store.replicas()[0]
    assert (row["last_step"], row["step_time_ms"], row["last_seen"]) == (3, 3.0, 103.0)


def test_events_filter_and_order(store: Store) -> None:
    with store.transaction():
        for i in range(5):
            store.add_event("gpu_verdict", now=float(i), node=f"n{i % 2}", job_id=i,
                            evidence={"i": i})
    assert [e["evidence"]["i"] for e in store.events(node="n0")] == [0, 2, 4]
    assert [e["id"] for e in store.events(since=3.0)] == [4, 5]
    assert [e["id"] for e in store.events(limit=2)] == [4, 5]  # newest two, oldest first
    assert store.events(job_id=1)[0]["kind"] == "gpu_verdict"


def test_outbox_dedups_pending_actions_and_retries(store: Store) -> None:
    with store.transaction():
        a = store.enqueue_slurm_action("drain", "n1", "marduk: xid=79", 1, now=1.0)
        b = store.enqueue_slurm_action("drain", "n1", "marduk: xid=48", 2, now=2.0)
    assert a == b
    assert [x["id"] for x in store.due_actions(now=1.0)] == [a]
    with store.transaction():
        store.retry_action(a, "slurmctld down", next_at=50.0)
    assert store.due_actions(now=10.0) == []
    assert store.next_action_due() == 50.0
    with store.transaction():
        store.complete_action(a, now=60.0)
    assert store.pending_actions() == []
    assert store.latest_actions("drain")[0]["attempts"] == 2


def test_transaction_rolls_back_as_a_whole(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.add_event("x", now=1.0)
        raise RuntimeError("boom")
    assert store.events() == []


def test_a_locked_database_is_a_clear_error(tmp_path: Path, store: Store) -> None:
    other = sqlite3.connect(tmp_path / "marduk.db", isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    slow = Store(tmp_path / "marduk.db", busy_timeout_ms=100)
    with pytest.raises(sqlite3.OperationalError, match="locked"), slow.transaction():
        slow.add_event("x", now=1.0)
    other.execute("ROLLBACK")
    with slow.transaction():
        slow.add_event("x", now=1.0)
    assert slow.integrity_check() == "ok"


def test_fault_storms_share_one_slurm_call_and_operator_lists_share_theirs() -> None:
    from marduk_slurm.controller.outbox import group_actions

    def drain(i: int, reason: str, batch: str) -> dict[str, object]:
        return {"id": i, "kind": "drain", "node": f"x{i}", "reason": reason,
                "batch_reason": batch, "event_id": 100 + i}

    storm = [drain(i, f"marduk: xid=79 gpu=G{i} event={100 + i}", "marduk: xid=79")
             for i in range(1, 21)]
    few = [drain(i, f"marduk: xid=48 gpu=G{i} event={100 + i}", "marduk: xid=48")
           for i in range(21, 23)]
    operator = [drain(i, "marduk: swap event=7", "marduk: swap event=7") for i in (30, 31)]
    groups = group_actions(storm + few + operator, batch_threshold=8)
    reasons = sorted((reason, len(group)) for _, reason, group in groups)
    assert reasons == sorted([
        ("marduk: xid=79 nodes=20 first_event=101", 20),
        ("marduk: xid=48 gpu=G21 event=121", 1), ("marduk: xid=48 gpu=G22 event=122", 1),
        ("marduk: swap event=7", 2)])


def test_replicas_without_cuda_take_their_steps_gpus_whichever_report_comes_first(
        store: Store) -> None:
    step = m.StepStart(job_id=8, step_id=1, node="n2", gpu_uuids=["GPU-s1", "GPU-s2"])
    # Step first, then the replica (reporting only its CPU id).
    with store.transaction():
        store.record_step_start(step, now=1.0)
    register(store, "job8_rg1:a", 8, 1, "n2", ["cpu:n2:0"], step=1)
    assert store.replicas(gpu_uuid="GPU-s1")[0]["replica_id"] == "job8_rg1:a"
    # Replica first, then the step of another group.
    register(store, "job8_rg2:b", 8, 2, "n3", ["cpu:n3:0"], step=2)
    with store.transaction():
        store.record_step_start(m.StepStart(job_id=8, step_id=2, node="n3",
                                            gpu_uuids=["GPU-t"]), now=2.0)
        mapped = store.map_step_gpus_to_replicas(8, 2, "n3", ["GPU-t"], now=2.0)
    assert mapped == ["job8_rg2:b"]
    assert store.replicas(node="n3")[0]["gpu_uuids"] == ["GPU-t"]
    # A replica that named real GPUs keeps them.
    register(store, "job8_rg3:c", 8, 3, "n4", ["GPU-own"], step=3)
    with store.transaction():
        assert store.map_step_gpus_to_replicas(8, 3, "n4", ["GPU-x"], now=3.0) == []


def test_a_late_heartbeat_does_not_take_the_config_revision_back(store: Store) -> None:
    register(store, "r:9", 9, 0, "n1", [])
    with store.transaction():
        store.record_config_ack(9, 2, "r:9", 40, True, "", now=5.0)
        store.write_heartbeats([m.Heartbeat(replica_id="r:9", job_id=9, step=39,
                                            config_revision=1)], now=6.0)
    row = store.replicas()[0]
    assert (row["config_revision"], row["last_step"]) == (2, 39)


def test_store_mixins_never_shadow_each_other() -> None:
    """Store is assembled from mixins; a method defined in two would silently hide one."""
    from marduk_slurm.adapters.store.store import Store as Assembled

    seen: dict[str, str] = {}
    for mixin in Assembled.__mro__[1:-1]:
        for name, value in vars(mixin).items():
            if callable(value) and not name.startswith("__"):
                assert name not in seen, f"{name} in both {seen[name]} and {mixin.__name__}"
                seen[name] = mixin.__name__
