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
    StandbyRef,
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


# -- hot spares: which standby takes which group ------------------------------------------------

S4 = StandbyRef("j1_sb0:s4", 1, ("n4",))
S5 = StandbyRef("j1_sb1:s5", 1, ("n5",))


def assigned(decision) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return [(a.standby.standby_id, a.replica_group) for a in decision.assignments]


def with_standbys(*standbys: StandbyRef, **more) -> Facts:  # type: ignore[no-untyped-def]
    return Facts(nodes={"n2": NodeFacts((A, B))}, standbys=standbys, **more)


def test_a_group_that_leaves_now_gets_a_standby_first() -> None:
    d = decide(GpuFault("n2", "GPU-bad", GpuAction.DRAIN_NODE, 79), event_id=12,
               facts=with_standbys(S4), policy=POLICY)
    # group 0 leaves now (its GPU failed), group 1 at its boundary: the one standby goes to 0
    assert assigned(d) == [("j1_sb0:s4", 0)]
    both = decide(GpuFault("n2", "GPU-bad", GpuAction.DRAIN_NODE, 79), event_id=12,
                  facts=with_standbys(S4, S5), policy=POLICY)
    assert assigned(both) == [("j1_sb0:s4", 0), ("j1_sb1:s5", 1)]
    assert "leaving now" in both.assignments[0].reason


def test_no_standby_on_a_drained_node_a_draining_node_or_the_failing_node() -> None:
    fault = GpuFault("n2", "GPU-bad", GpuAction.DRAIN_NODE, 79)
    on_failing = StandbyRef("j1_sb0:x", 1, ("n2",))
    drained = StandbyRef("j1_sb1:y", 1, ("n6",), drained=True)
    d = decide(fault, event_id=1, facts=with_standbys(on_failing, drained), policy=POLICY)
    assert d.assignments == []
    # an operator drain of n2 and n4: the standby on n4 is being drained, n5's is not
    facts = Facts(nodes={"n2": NodeFacts((A,)), "n4": NodeFacts(())}, standbys=(S4, S5))
    d = decide(OperatorDrain(("n2", "n4"), "swap"), event_id=2, facts=facts, policy=POLICY)
    assert assigned(d) == [("j1_sb1:s5", 0)]
    # a multi-node standby with one node on the failing node is not used either
    wide = StandbyRef("j1_sb2:w", 1, ("n7", "n2"))
    d = decide(fault, event_id=1, facts=with_standbys(wide, S5), policy=POLICY)
    assert assigned(d) == [("j1_sb1:s5", 0)]


def test_one_standby_per_group_and_never_twice() -> None:
    # group 0 has ranks on n2 and n3: one standby for the group, not one per rank
    facts = Facts(nodes={"n2": NodeFacts((A, B)), "n3": NodeFacts((C,))}, standbys=(S4, S5))
    d = decide(OperatorDrain(("n2", "n3"), "swap"), event_id=3, facts=facts, policy=POLICY)
    assert assigned(d) == [("j1_sb0:s4", 0), ("j1_sb1:s5", 1)]
    # a group a standby is already assuming gets no second one
    d = decide(GpuFault("n2", "GPU-bad", GpuAction.RESTART_APP, 79), event_id=4,
               facts=with_standbys(S4, assuming=frozenset({(1, 0)})), policy=POLICY)
    assert d.assignments == []
    # nor does a group whose replicas an earlier decision sent away already
    gone = ReplicaRef("j1_rg0:a", 1, 0, "n2", ("GPU-bad",), leaving=True)
    d = decide(GpuFault("n2", "GPU-bad", GpuAction.RESTART_APP, 79), event_id=5,
               facts=Facts(nodes={"n2": NodeFacts((gone, B))}, standbys=(S4,)), policy=POLICY)
    assert leaves(d) == [("j1_rg0:a", True)] and d.assignments == []


def test_standbys_of_another_job_are_not_used() -> None:
    other = StandbyRef("j2_sb0:o", 2, ("n4",))
    d = decide(GpuFault("n2", "GPU-bad", GpuAction.RESTART_APP, 79), event_id=6,
               facts=with_standbys(other), policy=POLICY)
    assert d.assignments == []


def test_a_crashed_group_gets_a_standby_away_from_the_crashed_node() -> None:
    facts = Facts(job_replicas=(B,), standbys=(StandbyRef("j1_sb0:x", 1, ("n2",)), S4))
    d = decide(StepCrash(1, (0,), "n2", 137), event_id=4, facts=facts, policy=POLICY)
    assert d.leaves == [] and assigned(d) == [("j1_sb0:s4", 0)]
    assert decide(StepCrash(1, (0,), "n2", 137), event_id=4, facts=Facts(job_replicas=(B,)),
                  policy=POLICY).assignments == []
