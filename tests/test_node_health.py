"""Node health beyond the GPU, as pure values: port and mount readings -> verdicts, verdicts
-> decisions (domain/node_health.py, domain/decisions.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from marduk_slurm.adapters.store import Store
from marduk_slurm.controller import inbound
from marduk_slurm.domain import messages as m
from marduk_slurm.domain.decisions import (
    DecisionPolicy,
    Facts,
    NodeFacts,
    NodeFault,
    ReplicaRef,
    decide,
)
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.domain.node_health import (
    MountReading,
    NodeHealthPolicy,
    PortReading,
    ProbeOutcome,
    changed,
    injected_mount,
    injected_port,
    node_inject_target,
    prune,
)
from marduk_slurm.errors import ProtocolError

POLICY = NodeHealthPolicy(window_s=300.0, flap_changes=3, error_watch=10, error_drain=1000,
                          mount_slow_s=2.0)
IB_OK = PortReading("mlx5_0/1", 0.0, state="ACTIVE", phys_state="LinkUp", flaps=0,
                    counters={"symbol_error": 0, "port_rcv_errors": 0})
NET_OK = PortReading("eth0", 0.0, state="up", flaps=2, counters={"rx_errors": 0})


def later(r: PortReading, dt: float, **changes: object) -> PortReading:
    return dataclasses.replace(r, ts=r.ts + dt, **changes)  # type: ignore[arg-type]


def test_healthy_ports_are_healthy() -> None:
    for port in (IB_OK, NET_OK):
        v = POLICY.judge_port([port, later(port, 10)])
        assert (v.action, v.evidence["findings"]) == (GpuAction.NONE, [])


def test_an_infiniband_port_that_is_not_active_or_not_linked_drains() -> None:
    down = POLICY.judge_port([IB_OK, later(IB_OK, 10, state="DOWN")])
    assert down.action is GpuAction.DRAIN_NODE and "state DOWN" in down.reason
    polling = POLICY.judge_port([later(IB_OK, 10, phys_state="Polling")])
    assert polling.action is GpuAction.DRAIN_NODE and "Polling" in polling.reason
    assert polling.evidence["phys_state"] == "Polling"


def test_ethernet_operstate() -> None:
    assert POLICY.judge_port([later(NET_OK, 1, state="down")]).action is GpuAction.DRAIN_NODE
    assert POLICY.judge_port([later(NET_OK, 1, state="unknown")]).action is GpuAction.WATCH


def test_a_flapping_port_drains_and_a_single_loss_is_watched() -> None:
    one = POLICY.judge_port([NET_OK, later(NET_OK, 10, flaps=3)])
    assert one.action is GpuAction.WATCH and one.evidence["flaps_in_window"] == 1
    readings = [NET_OK, later(NET_OK, 10, flaps=4), later(NET_OK, 20, flaps=5)]
    flapping = POLICY.judge_port(readings)
    assert flapping.action is GpuAction.DRAIN_NODE
    assert "flapping" in flapping.reason and flapping.evidence["flaps_in_window"] == 3
    # IB counts link losses in link_downed, the same way.
    ib = POLICY.judge_port([IB_OK, later(IB_OK, 5, flaps=3)])
    assert ib.action is GpuAction.DRAIN_NODE


def test_losses_older_than_the_window_are_forgotten() -> None:
    readings = [NET_OK, later(NET_OK, 10, flaps=5), later(NET_OK, 400, flaps=5)]
    kept = prune(readings, now=400.0, window_s=300.0)
    assert [r.ts for r in kept] == [400.0]
    assert POLICY.judge_port(kept).action is GpuAction.NONE


def test_error_counters_are_judged_by_their_growth() -> None:
    some = POLICY.judge_port([IB_OK, later(IB_OK, 10, counters={"symbol_error": 12,
                                                                "port_rcv_errors": 0})])
    assert some.action is GpuAction.WATCH and "symbol_error +12" in some.reason
    many = POLICY.judge_port([IB_OK, later(IB_OK, 10, counters={"symbol_error": 900,
                                                                "port_rcv_errors": 100})])
    assert many.action is GpuAction.DRAIN_NODE
    assert many.evidence["growth_in_window"] == {"port_rcv_errors": 100, "symbol_error": 900}
    # A counter that was never zero is not a fault: only growth counts.
    high = later(IB_OK, 0, counters={"symbol_error": 10**9})
    assert POLICY.judge_port([high, later(high, 10)]).action is GpuAction.NONE


def test_a_counter_reset_counts_as_no_growth() -> None:
    before = later(NET_OK, 0, flaps=100)
    after = later(NET_OK, 10, flaps=0)
    assert POLICY.judge_port([before, after]).action is GpuAction.NONE
    # Growth after the reset still counts.
    again = later(NET_OK, 20, flaps=3)
    assert POLICY.judge_port([before, after, again]).action is GpuAction.DRAIN_NODE


def test_a_port_gone_drains_but_one_never_found_is_only_watched() -> None:
    gone = PortReading("mlx5_0/1", 5.0, present=False)
    assert POLICY.judge_port([IB_OK, gone]).action is GpuAction.DRAIN_NODE
    typo = POLICY.judge_port([gone], seen_before=False)
    assert typo.action is GpuAction.WATCH and "not found" in typo.reason


def test_unreadable_files_are_watched_not_fatal() -> None:
    odd = later(IB_OK, 1, state=None, errors={"state": "not a state: 'x'"})
    v = POLICY.judge_port([odd])
    assert v.action is GpuAction.WATCH and "cannot read state" in v.reason


def test_mount_outcomes() -> None:
    def judge(outcome: ProbeOutcome, errno_name: str = "", elapsed: float = 0.1,
              seen: bool = True) -> GpuAction:
        return POLICY.judge_mount(MountReading("/lustre", outcome, elapsed, True, errno_name),
                                  seen_before=seen).action

    assert judge(ProbeOutcome.OK) is GpuAction.NONE
    assert judge(ProbeOutcome.OK, elapsed=3.0) is GpuAction.WATCH
    assert judge(ProbeOutcome.TIMED_OUT, elapsed=10.0) is GpuAction.DRAIN_NODE
    assert judge(ProbeOutcome.HUNG, elapsed=30.0) is GpuAction.DRAIN_NODE
    assert judge(ProbeOutcome.TIMED_OUT, seen=False) is GpuAction.DRAIN_NODE  # no typo hangs
    for errno_name in ("EIO", "ESTALE", "ENOTCONN", "EROFS"):
        assert judge(ProbeOutcome.FAILED, errno_name) is GpuAction.DRAIN_NODE
    for errno_name in ("ENOSPC", "EDQUOT", "EACCES", ""):
        assert judge(ProbeOutcome.FAILED, errno_name) is GpuAction.WATCH
    assert judge(ProbeOutcome.NOT_MOUNTED) is GpuAction.DRAIN_NODE
    assert judge(ProbeOutcome.NOT_MOUNTED, seen=False) is GpuAction.WATCH
    assert judge(ProbeOutcome.FAILED, "ENOENT", seen=False) is GpuAction.WATCH


def test_only_a_new_finding_is_news() -> None:
    a = POLICY.judge_port([IB_OK, later(IB_OK, 10, counters={"symbol_error": 12})])
    b = POLICY.judge_port([IB_OK, later(IB_OK, 20, counters={"symbol_error": 40})])
    assert a.reason != b.reason and not changed(a, b)
    c = POLICY.judge_port([IB_OK, later(IB_OK, 30, state="DOWN",
                                        counters={"symbol_error": 40})])
    assert changed(b, c) and changed(None, a)
    healthy = POLICY.judge_port([IB_OK])
    assert changed(c, healthy) and not changed(healthy, POLICY.judge_port([later(IB_OK, 9)]))


def test_drills_are_judged_by_the_same_policy() -> None:
    for fault, action in (("down", GpuAction.DRAIN_NODE), ("flap", GpuAction.DRAIN_NODE),
                          ("errors", GpuAction.DRAIN_NODE)):
        for port in (IB_OK, NET_OK):
            assert POLICY.judge_port(injected_port(port, fault, POLICY)).action is action
    assert POLICY.judge_mount(injected_mount("/x", "hang", 10.0, True)).action \
        is GpuAction.DRAIN_NODE
    assert POLICY.judge_mount(injected_mount("/x", "fail", 10.0, False)).action \
        is GpuAction.DRAIN_NODE
    with pytest.raises(ValueError):
        injected_port(IB_OK, "melt", POLICY)


@pytest.mark.parametrize("args", [
    {"port": "eth0", "mount": "/x", "fault": "down"},
    {"port": "", "fault": "down"},
    {"port": "eth0\n", "fault": "down"},
    {"port": "x" * 257, "fault": "down"},
    {"port": 7, "fault": "down"},
    {"port": "eth0", "fault": "hang"},
    {"mount": "/x", "fault": "flap"},
    {"mount": "/x", "fault": None},
    {"mount": "/x", "fault": ["hang"]},
])
def test_drill_arguments_are_checked(args: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        node_inject_target(args)


def test_drill_arguments() -> None:
    assert node_inject_target({"gpu": "1", "xid": 79}) is None
    assert node_inject_target({"port": "mlx5_0/1", "fault": "flap"}) == (
        "port", "mlx5_0/1", "flap")
    assert node_inject_target({"mount": "/lustre", "fault": "hang"}) == (
        "mount", "/lustre", "hang")


# -- the decision --------------------------------------------------------------------------

A = ReplicaRef("j1_rg0:a", 1, 0, "n2", ("GPU-0",))
B = ReplicaRef("j1_rg1:b", 1, 1, "n2", ("GPU-1",))
N2 = Facts(nodes={"n2": NodeFacts((A, B))})


@pytest.mark.parametrize("leave_on_drain", [True, False])
def test_a_node_fault_drains_and_every_replica_on_the_node_leaves_now(
        leave_on_drain: bool) -> None:
    d = decide(NodeFault("n2", "port", "mlx5_0/1", GpuAction.DRAIN_NODE, "flapping"),
               event_id=7, facts=N2, policy=DecisionPolicy(leave_on_drain=leave_on_drain))
    assert [(x.node, x.reason, x.batch_reason) for x in d.drains] == [
        ("n2", "marduk: port=mlx5_0/1 flapping event=7", "marduk: port flapping")]
    assert [(x.replica.replica_id, x.immediate) for x in d.leaves] == [
        ("j1_rg0:a", True), ("j1_rg1:b", True)]
    assert d.leaves[0].reason == "port mlx5_0/1: flapping"


def test_a_watched_node_fault_is_recorded_only() -> None:
    for action in (GpuAction.NONE, GpuAction.WATCH):
        d = decide(NodeFault("n2", "mount", "/lustre", action, "slow"), event_id=7,
                   facts=N2, policy=DecisionPolicy())
        assert d.drains == [] and d.leaves == []


def test_a_mount_path_is_one_token_of_the_drain_reason() -> None:
    d = decide(NodeFault("n2", "mount", "/scratch dir", GpuAction.DRAIN_NODE, "hung"),
               event_id=3, facts=N2, policy=DecisionPolicy())
    assert d.drains[0].reason == "marduk: mount=/scratch_dir hung event=3"


# -- the controller's side, on a real database ---------------------------------------------


def test_a_node_reports_a_bounded_number_of_ports_and_mounts(tmp_path: Path) -> None:
    """An agent naming a new target in every verdict cannot grow the table without bound;
    targets it reported before are still taken."""
    store = Store(tmp_path / "marduk.db")
    store.migrate()

    def verdict(target: str, action: str = "watch") -> m.NodeVerdict:
        return m.NodeVerdict(node="n2", component="port", target=target, action=action,
                             reason=f"port {target}")

    with store.transaction():
        for i in range(inbound.MAX_COMPONENTS_PER_NODE):
            inbound.apply_message(store, verdict(f"eth{i}"), 1.0, DecisionPolicy())
        with pytest.raises(ProtocolError) as err:
            inbound.apply_message(store, verdict("one-too-many"), 2.0, DecisionPolicy())
        assert err.value.reason == "too_large"
        effects = inbound.apply_message(store, verdict("eth7", "drain_node"), 3.0,
                                        DecisionPolicy())
        assert effects.outbox  # a drain was queued for the known port
        other = m.NodeVerdict(node="n3", component="mount", target="/lustre",
                              action="none", reason="mount /lustre healthy")
        inbound.apply_message(store, other, 4.0, DecisionPolicy())
    assert store.component_count("n2") == inbound.MAX_COMPONENTS_PER_NODE
    node = store.with_details([store.node("n2")])[0]
    assert {c["target"]: c["health"] for c in node["components"]}["eth7"] == "drain_node"
    kinds = [e["kind"] for e in store.events(kinds=["port_verdict", "mount_verdict",
                                                    "drain_requested"], limit=10)]
    assert kinds[-3:] == ["port_verdict", "drain_requested", "mount_verdict"]
