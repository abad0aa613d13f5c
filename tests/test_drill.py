"""The end-to-end drill on the real local Slurm cluster: controller, agents with simulated
GPUs, the SPANK plugin, NATS, and a job from the rendered template running real TorchFT
training with 2 replica groups and a spare node. XID 79 on a replica's GPU must end with the
node drained, the replica respawned on the spare and healed, and the job completed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from harness import load_drill
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.torch, pytest.mark.slow]


def check_timeline(result: Any, replaced_by: str, leave_first: bool) -> None:
    """The fault timeline the drill drew: both groups' step rates from the heartbeats, the
    marks from the controller's history in their order, and the same marks in the file."""
    timeline = result.timeline
    print(f"timeline plot {result.timeline_plot}: {timeline['marks']}; "
          f"missing {timeline['missing']}")
    assert [g["group"] for g in timeline["groups"]] == [0, 1]
    marks = [(mk["kind"], mk["label"]) for mk in timeline["marks"]]
    kinds = [k for k, _ in marks]
    assert kinds[:1] == ["fault"] and kinds.count("fault") == 1, marks
    assert ("drain", f"{result.node} drained") in marks
    # A cold respawn follows the leave; a standby is told to assume with the leave, and may
    # acknowledge before the old replica confirms it left.
    assert kinds.index("replace") > 0 and "leave" in kinds, marks
    if leave_first:
        assert kinds.index("leave") < kinds.index("replace"), marks
    assert next(label for k, label in marks if k == "replace").startswith(replaced_by)
    if result.timeline_plot:  # matplotlib installed
        ids = [e.get("id", "") for e in ET.parse(result.timeline_plot).getroot().iter()]
        drawn = [i.split("-")[1] for i in ids if i.startswith("mark-") and not i.endswith("-q")]
        assert drawn == kinds
        assert {i.split("-")[2] for i in ids if i.startswith("series-group-")} == {"0", "1"}



def test_fault_drill(tmp_path: Path, slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    pytest.importorskip("torchft", reason="the drill trains with torchft")
    drill = load_drill()
    # A long max_steps, moved to 40 steps past the recovery: a cold respawn on a loaded host
    # (a new process importing torch) must not find the survivor finished already.
    result = drill.run_drill(tmp_path, max_steps=3000, step_sleep_s=0.05, finish_after=40)
    print(drill.summary(result))
    print(f"fault -> drain {result.fault_to_drain_s * 1000:.0f} ms, fault -> full strength "
          f"{result.fault_to_full_strength_s:.1f} s")
    assert result.job_state == "COMPLETED"
    assert result.final_step == result.max_steps < 3000
    assert result.reason.startswith(f"marduk: xid=79 gpu={result.gpu_uuid} event=")
    assert result.spare not in ("", result.node)
    # The global step never went back: the group came back healed to at least where it left.
    assert result.steps_redone == 0 and result.healed_to_step >= result.left_at_step
    # The chains of events, each in order (the leave and the drain run side by side).
    kinds = [(e["kind"], e["node"]) for e in result.history]
    replica_chain = [("gpu_verdict", result.node), ("leave_requested", result.node),
                     ("replica_leave", result.node), ("step_end", result.node),
                     ("step_start", result.spare), ("replica_register", result.spare)]
    node_chain = [("gpu_verdict", result.node), ("drain_requested", result.node),
                  ("drained", result.node)]
    for chain in (replica_chain, node_chain):
        positions = [kinds.index(link) for link in chain]
        assert positions == sorted(positions), kinds
    leave = next(e for e in result.history if e["kind"] == "replica_leave"
                 and e["node"] == result.node)
    assert leave["evidence"]["exit_code"] == 75  # told to leave: respawn elsewhere
    # `marduk replicas --all`: the group now runs on the spare; its old incarnation left.
    moved = [r for r in result.replicas if r["node"] == result.spare]
    old = [r for r in result.replicas if r["node"] == result.node]
    assert moved and old and moved[0]["replica_group"] == old[0]["replica_group"]
    assert old[0]["state"] == "left" and old[0]["gpu_uuids"] == []
    check_timeline(result, replaced_by=f"group {moved[0]['replica_group']} respawned on "
                                       f"{result.spare}", leave_first=True)


def test_fault_drill_with_a_hot_spare(tmp_path: Path, slurm_cluster: SlurmCluster  # noqa: F811
                                      ) -> None:
    """The spare node runs a standby: the decision that sends the faulty group away names it,
    it assumes the group and heals, the supervisor follows it there, nothing is respawned."""
    pytest.importorskip("torchft", reason="the drill trains with torchft")
    drill = load_drill()
    result = drill.run_drill(tmp_path, max_steps=3000, step_sleep_s=0.05, hot_spares=1,
                             finish_after=40)
    print(drill.summary(result))
    print(f"hot spare: fault -> full strength {result.fault_to_full_strength_s:.2f} s")
    assert result.job_state == "COMPLETED" and result.final_step == result.max_steps < 3000
    assert result.assumed_by_standby
    assert result.steps_redone == 0 and result.healed_to_step >= result.left_at_step
    assert result.fault_to_full_strength_s > 0  # how fast: benchmarks/recovery.py
    assert result.survivors_median_step_ms > 0  # read from the training log, not a default
    kinds = [(e["kind"], e["node"]) for e in result.history]
    chain = [("gpu_verdict", result.node), ("standby_assigned", result.spare),
             ("standby_assumed", None), ("replica_register", result.spare)]
    positions = [kinds.index(link) for link in chain]
    assert positions == sorted(positions), kinds
    # The standby's step started with the job: no step starts after the fault, no respawn.
    assert ("step_start", result.spare) not in kinds
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert "assumed by standby 0 on" in log and "respawning" not in log
    check_timeline(result, replaced_by="standby assumed group", leave_first=False)
