"""The end-to-end drill on the real local Slurm cluster: controller, agents with simulated
GPUs, the SPANK plugin, NATS, and a job from the rendered template running real TorchFT
training with 2 replica groups and a spare node. XID 79 on a replica's GPU must end with the
node drained, the replica respawned on the spare and healed, and the job completed."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import load_drill
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.torch, pytest.mark.slow]



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
