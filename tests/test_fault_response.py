"""What happens when a GPU fails: the pure decision."""

from __future__ import annotations

from marduk_slurm.domain.fault_response import (
    ReplicaRef,
    drain_reason,
    may_resume,
    respond_to_operator_drain,
    respond_to_verdict,
)
from marduk_slurm.domain.gpu_health import GpuAction

A = ReplicaRef("j1_rg0:a", 1, 0, "n2", ("GPU-bad",))
B = ReplicaRef("j1_rg1:b", 1, 1, "n2", ("GPU-ok",))


def decide(action: GpuAction, leave_on_drain: bool = True):  # type: ignore[no-untyped-def]
    return respond_to_verdict(action=action, gpu_uuid="GPU-bad", xid=79, event_id=12,
                              replicas_on_gpu=[A], replicas_on_node=[A, B],
                              reason_prefix="marduk", leave_on_drain=leave_on_drain)


def test_drain_node_drains_and_evicts() -> None:
    r = decide(GpuAction.DRAIN_NODE)
    assert r.drain and r.drain_reason == "marduk: xid=79 gpu=GPU-bad event=12"
    assert [(x.replica.replica_id, x.immediate) for x in r.leaves] == [
        ("j1_rg0:a", True), ("j1_rg1:b", False)]


def test_drain_without_leave_on_drain_only_evicts_the_gpu() -> None:
    r = decide(GpuAction.DRAIN_NODE, leave_on_drain=False)
    assert r.drain and [x.replica.replica_id for x in r.leaves] == ["j1_rg0:a"]


def test_gpu_level_actions_do_not_drain() -> None:
    for action in (GpuAction.RESET_GPU, GpuAction.RESTART_APP):
        r = decide(action)
        assert not r.drain and [x.replica for x in r.leaves] == [A]
    for action in (GpuAction.NONE, GpuAction.WATCH):
        r = decide(action)
        assert not r.drain and r.leaves == []


def test_reason_without_xid_names_the_action() -> None:
    assert drain_reason("marduk", gpu_uuid=None, xid=None, action="drain_node",
                        event_id=3) == "marduk: action=drain_node event=3"


def test_operator_drain_leaves_at_a_step_boundary() -> None:
    leaves = respond_to_operator_drain(replicas_on_node=[A, B], reason="swap GPU",
                                       leave_on_drain=True)
    assert all(not x.immediate for x in leaves) and len(leaves) == 2


def test_marduk_only_undoes_what_marduk_did() -> None:
    assert may_resume(drained_by_marduk=True, reason="marduk: x", reason_user="root",
                      force=False)[0]
    ok, why = may_resume(drained_by_marduk=False, reason="bad fan", reason_user="alice",
                         force=False)
    assert not ok and "alice" in why and "bad fan" in why and "--force" in why
    assert may_resume(drained_by_marduk=False, reason="bad fan", reason_user="alice",
                      force=True) == (True, "forced")
