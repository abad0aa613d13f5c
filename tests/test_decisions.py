"""Every cause that takes capacity away, through the one pure decision."""

from __future__ import annotations

from marduk_slurm.domain.decisions import (
    DecisionPolicy,
    Facts,
    GpuFault,
    NodeFacts,
    OperatorDrain,
    ReplicaRef,
    RiskThreshold,
    StepCrash,
    StragglerEviction,
    decide,
    drain_reason,
    may_resume,
    needs,
)
from marduk_slurm.domain.gpu_health import GpuAction

A = ReplicaRef("j1_rg0:a", 1, 0, "n2", ("GPU-bad",))
B = ReplicaRef("j1_rg1:b", 1, 1, "n2", ("GPU-ok",))
C = ReplicaRef("j1_rg0:c", 1, 0, "n3", ("GPU-c",))  # group 0's second rank, elsewhere
N2 = Facts(nodes={"n2": NodeFacts((A, B))})
POLICY = DecisionPolicy()


def fault(action: GpuAction, leave_on_drain: bool = True):  # type: ignore[no-untyped-def]
    return decide(GpuFault("n2", "GPU-bad", action, 79), event_id=12, facts=N2,
                  policy=DecisionPolicy(leave_on_drain=leave_on_drain))


def leaves(decision) -> list[tuple[str, bool]]:  # type: ignore[no-untyped-def]
    return [(x.replica.replica_id, x.immediate) for x in decision.leaves]


def test_drain_node_drains_and_evicts() -> None:
    d = fault(GpuAction.DRAIN_NODE)
    assert [(x.node, x.reason, x.batch_reason) for x in d.drains] == [
        ("n2", "marduk: xid=79 gpu=GPU-bad event=12", "marduk: xid=79")]
    assert leaves(d) == [("j1_rg0:a", True), ("j1_rg1:b", False)]


def test_drain_without_leave_on_drain_only_evicts_the_gpu() -> None:
    d = fault(GpuAction.DRAIN_NODE, leave_on_drain=False)
    assert d.drains and leaves(d) == [("j1_rg0:a", True)]


def test_gpu_level_actions_do_not_drain() -> None:
    for action in (GpuAction.RESET_GPU, GpuAction.RESTART_APP):
        d = fault(action)
        assert not d.drains and leaves(d) == [("j1_rg0:a", True)]
    for action in (GpuAction.NONE, GpuAction.WATCH):
        d = fault(action)
        assert not d.drains and d.leaves == []


def test_reason_without_xid_names_the_action() -> None:
    assert drain_reason("marduk", gpu_uuid=None, xid=None, action="drain_node",
                        event_id=3) == "marduk: action=drain_node event=3"


def test_operator_drain_one_reason_for_every_node_and_boundary_leaves() -> None:
    facts = Facts(nodes={"n2": NodeFacts((A, B)), "n3": NodeFacts((C,))})
    d = decide(OperatorDrain(("n2", "n3"), "swap GPU"), event_id=7, facts=facts, policy=POLICY)
    assert [(x.node, x.reason) for x in d.drains] == [
        ("n2", "marduk: swap GPU event=7"), ("n3", "marduk: swap GPU event=7")]
    assert leaves(d) == [("j1_rg0:a", False), ("j1_rg1:b", False), ("j1_rg0:c", False)]


def test_risk_drains_a_node_not_yet_drained_only() -> None:
    cause = RiskThreshold("n2", "GPU-bad", 80)
    d = decide(cause, event_id=5, facts=N2, policy=POLICY)
    assert [x.reason for x in d.drains] == ["marduk: risk=80 gpu=GPU-bad event=5"]
    assert leaves(d) == [("j1_rg0:a", False), ("j1_rg1:b", False)]
    drained = Facts(nodes={"n2": NodeFacts((A, B), drained=True)})
    assert decide(cause, event_id=5, facts=drained, policy=POLICY).drains == []


def test_straggler_evicted_alone_or_with_its_node() -> None:
    evict = decide(StragglerEviction(A, drain_node=False, reason="slow"), event_id=9,
                   facts=N2, policy=POLICY)
    assert leaves(evict) == [("j1_rg0:a", False)] and evict.drains == []
    # evict_and_drain: the node's other replicas leave too, as with any drain.
    both = decide(StragglerEviction(A, drain_node=True, reason="slow"), event_id=9,
                  facts=N2, policy=POLICY)
    assert leaves(both) == [("j1_rg0:a", False), ("j1_rg1:b", False)]
    assert [x.reason for x in both.drains] == ["marduk: straggler replica=j1_rg0:a event=9"]


def test_a_crashed_step_sends_its_groups_other_ranks_away_without_draining() -> None:
    assert needs(StepCrash(1, (0,), "n2", 137)) == ((), 1)
    other_job = ReplicaRef("j2_rg0:x", 2, 0, "n3")
    facts = Facts(job_replicas=(B, C, other_job))
    d = decide(StepCrash(1, (0,), "n2", 137), event_id=4, facts=facts, policy=POLICY)
    assert leaves(d) == [("j1_rg0:c", True)] and d.drains == []


def test_marduk_only_undoes_what_marduk_did() -> None:
    assert may_resume(drained_by_marduk=True, reason="marduk: x", reason_user="root",
                      force=False)[0]
    ok, why = may_resume(drained_by_marduk=False, reason="bad fan", reason_user="alice",
                         force=False)
    assert not ok and "alice" in why
    assert may_resume(drained_by_marduk=False, reason="bad fan", reason_user="alice",
                      force=True)[0]
