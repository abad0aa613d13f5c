"""Hot spares in the controller: standbys register, the decision that sends a group away
names one, the assume command is stored and re-sent, the standby's ack ends it. Real SQLite,
the real inbound handlers and decision path; no NATS."""

from __future__ import annotations

from pathlib import Path

import pytest

from marduk_slurm.adapters.store import Store
from marduk_slurm.controller import inbound
from marduk_slurm.controller.decisions import Effects, Policy
from marduk_slurm.controller.leaves import LeaveSender
from marduk_slurm.domain import messages as m
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.errors import IdentityError

JOB = 7
POLICY = Policy()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "marduk.db")
    s.migrate()
    return s


def apply(store: Store, msg: m.DurableMessage, now: float = 100.0) -> Effects:
    with store.transaction():
        return inbound.apply_message(store, msg, now, POLICY)


def register(store: Store, rid: str, group: int, node: str, *, standby: bool = False,
             step: int = 0) -> None:
    apply(store, m.ReplicaRegister(replica_id=rid, job_id=JOB, step_id=step,
                                   replica_group=group, node=node, standby=standby,
                                   gpu_uuids=[f"GPU-{node}-0"]))


def verdict(node: str, action: GpuAction = GpuAction.DRAIN_NODE) -> m.Verdict:
    return m.Verdict(node=node, gpu_uuid=f"GPU-{node}-0", action=action, reason="xid 79",
                     xid=79)


@pytest.fixture
def job(store: Store) -> Store:
    register(store, "job7_rg0:a", 0, "n1", step=0)
    register(store, "job7_rg1:b", 1, "n2", step=1)
    register(store, "job7_sb0:s2", 0, "n3", standby=True, step=2)
    return store


def test_a_standby_registers_in_state_standby_and_is_no_replica(job: Store) -> None:
    rows = {r["replica_id"]: r for r in job.replicas(job_id=JOB)}
    assert rows["job7_sb0:s2"]["state"] == "standby"
    assert rows["job7_sb0:s2"]["role"] == "standby"
    assert rows["job7_rg0:a"]["state"] == "active"
    assert [e["kind"] for e in job.events(job_id=JOB)].count("standby_register") == 1
    assert job.ready_standbys([JOB]) == [
        {"standby_id": "job7_sb0:s2", "job_id": JOB, "nodes": ["n3"], "drained": False}]


def test_a_gpu_fault_assigns_the_standby_in_the_same_transaction(job: Store) -> None:
    effects = apply(job, verdict("n2"))
    assert [(lv.replica.replica_id, lv.immediate) for lv, _ in effects.leaves] == [
        ("job7_rg1:b", True)]
    assert [(a.standby.standby_id, a.replica_group) for a, _ in effects.assumes] == [
        ("job7_sb0:s2", 1)]
    cmd = job.assume_command("job7_sb0:s2")
    assert cmd is not None and cmd["state"] == "pending" and cmd["replica_group"] == 1
    assigned = job.events(job_id=JOB, kinds=["standby_assigned"])
    assert assigned and assigned[0]["evidence"]["replica_group"] == 1
    assert job.replica("job7_sb0:s2")["state"] == "assuming"  # type: ignore[index]
    assert job.ready_standbys([JOB]) == []
    # a second fault of the same group (before the standby answered) gets no second standby
    register(job, "job7_sb1:s3", 1, "n4", standby=True, step=3)
    again = apply(job, verdict("n2", GpuAction.RESTART_APP))
    assert again.assumes == []
    # the standby answers: the command is done, its row leaves, the new replica registers
    apply(job, m.AssumeAck(standby_id="job7_sb0:s2", job_id=JOB, replica_group=1,
                           event_id=assigned[0]["id"]))
    assert job.assume_command("job7_sb0:s2")["state"] == "done"  # type: ignore[index]
    assert job.replica("job7_sb0:s2")["state"] == "left"  # type: ignore[index]
    assert job.events(job_id=JOB, kinds=["standby_assumed"])


def test_an_ack_for_a_group_it_was_not_given_is_refused(job: Store) -> None:
    apply(job, verdict("n2"))
    with pytest.raises(IdentityError):
        apply(job, m.AssumeAck(standby_id="job7_sb0:s2", job_id=JOB, replica_group=0))
    with pytest.raises(IdentityError):
        apply(job, m.AssumeAck(standby_id="job7_sb9:zz", job_id=JOB, replica_group=1))


def test_no_standby_on_the_drained_node_and_none_when_it_is_drained(job: Store) -> None:
    with job.transaction():
        job.mark_node_drained("n3", "marduk: x", None, 50.0)
    effects = apply(job, verdict("n2"))
    assert effects.leaves and effects.assumes == []


def test_a_standby_whose_step_ends_is_neither_ready_nor_a_crashed_group(job: Store) -> None:
    effects = apply(job, m.StepEnd(job_id=JOB, step_id=2, node="n3", exit_status=1))
    assert effects.leaves == [] and effects.assumes == []
    assert job.ready_standbys([JOB]) == []
    assert not job.events(job_id=JOB, kinds=["leave_requested"])


def test_a_crashed_group_is_taken_over_by_the_standby(job: Store) -> None:
    effects = apply(job, m.StepEnd(job_id=JOB, step_id=1, node="n2", exit_status=1))
    assert [(a.standby.standby_id, a.replica_group) for a, _ in effects.assumes] == [
        ("job7_sb0:s2", 1)]


def test_pending_assumes_of_gone_standbys_are_closed(job: Store) -> None:
    apply(job, verdict("n2"))
    apply(job, m.StepEnd(job_id=JOB, step_id=2, node="n3", exit_status=0))
    with job.transaction():
        gone = job.finish_assumes_of_gone_standbys(200.0)
        due = job.due_assume_commands(300.0)
    assert [r["standby_id"] for r in gone] == ["job7_sb0:s2"] and due == []


def test_standbys_on_a_node_being_drained_stand_down_whatever_their_job(job: Store) -> None:
    apply(job, m.ReplicaRegister(replica_id="job8_sb0:s9", job_id=8, step_id=9,
                                 replica_group=0, node="n3", standby=True,
                                 gpu_uuids=["GPU-n3-1"]))
    register(job, "job7_sb1:s4", 1, "n4", standby=True, step=4)
    effects = apply(job, verdict("n3"))
    assert sorted(d.standby.standby_id for d, _ in effects.dismissals) == [
        "job7_sb0:s2", "job8_sb0:s9"]
    assert effects.assumes == []  # no group left: the standby on n4 stays ready
    for sid in ("job7_sb0:s2", "job8_sb0:s9"):
        cmd = job.assume_command(sid)
        assert cmd is not None and (cmd["action"], cmd["state"]) == ("leave", "pending")
        assert job.replica(sid)["state"] == "leaving"  # type: ignore[index]
    assert [s["standby_id"] for s in job.ready_standbys([7, 8])] == ["job7_sb1:s4"]
    dismissed = job.events(kinds=["standby_dismissed"])
    assert len(dismissed) == 2 and all("n3 drained" in e["reason"] for e in dismissed)
    # A second fault on the same node does not dismiss them again.
    assert apply(job, verdict("n3")).dismissals == []
    # Gone as told: the command is done, and no "standby lost" is recorded for it.
    apply(job, m.StepEnd(job_id=JOB, step_id=2, node="n3", exit_status=75))
    with job.transaction():
        LeaveSender(None)._take_due_assumes(job, 200.0)  # type: ignore[arg-type]
    assert job.assume_command("job7_sb0:s2")["state"] == "done"  # type: ignore[index]
    assert not job.events(kinds=["standby_lost"])
    assert job.assume_command("job8_sb0:s9")["state"] == "pending"  # type: ignore[index]


def test_a_standby_of_several_ranks_is_one_standby(store: Store) -> None:
    register(store, "job7_rg0:a", 0, "n1")
    register(store, "job7_sb0:s5/0", 0, "n5", standby=True, step=5)
    register(store, "job7_sb0:s5/1", 0, "n6", standby=True, step=5)
    assert store.ready_standbys([JOB]) == [
        {"standby_id": "job7_sb0:s5", "job_id": JOB, "nodes": ["n5", "n6"], "drained": False}]
    effects = apply(store, verdict("n1"))
    assert [a.standby.nodes for a, _ in effects.assumes] == [("n5", "n6")]
    states = {r["replica_id"]: r["state"] for r in store.replicas(job_id=JOB)}
    assert states["job7_sb0:s5/0"] == states["job7_sb0:s5/1"] == "assuming"
    apply(store, m.AssumeAck(standby_id="job7_sb0:s5", job_id=JOB, replica_group=0))
    assert {r["replica_id"] for r in store.replicas(job_id=JOB)} == {"job7_rg0:a"}
