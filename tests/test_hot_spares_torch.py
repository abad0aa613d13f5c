"""A hot spare with real torch + torchft: a real torchft_lighthouse, two replica groups and a
standby (one process each, CPU, Gloo), a real nats-server and controller. The standby stands
by outside torchft's quorum; a GPU verdict on group 1's node makes it assume group 1, heal
from group 0 through torchft's checkpoint transport, and train to the end of the job."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchft",
                    reason="torchft is not importable (pip install marduk-slurm[runtime])")

from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.exit_codes import EXIT_DONE, EXIT_LEAVE
from marduk_slurm.domain.gpu_health import GpuAction

from harness import ControllerProcess, cli_json, publish_durable, wait_for
from runtime_worker import Lighthouse, WorkerProcess

pytestmark = [pytest.mark.torch, pytest.mark.slow]
JOB = 4343


@pytest.fixture
def lighthouse(tmp_path: Path) -> Iterator[Lighthouse]:
    lh = Lighthouse(tmp_path / "lighthouse.log", heartbeat_timeout_ms=1000,
                    join_timeout_ms=10000)
    yield lh
    lh.stop()


def start(tmp_path: Path, lh: Lighthouse, ctl: ControllerProcess, group: int, node: str,
          **env: str) -> WorkerProcess:
    return WorkerProcess(group, lh, tmp_path, {
        "MARDUK_NATS_URL": ctl.url, "MARDUK_JOB_ID": str(JOB), "MARDUK_NODE": node,
        "STEP_SLEEP_S": "0.05", **env})


def committed(w: WorkerProcess) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in w.steps() if r.get("committed")}


def rows(ctl: ControllerProcess) -> list[dict[str, Any]]:
    return list(cli_json("replicas", "--job", str(JOB), "--nats-url", ctl.url))


def test_a_standby_assumes_the_failed_group_heals_and_the_job_completes(
        tmp_path: Path, lighthouse: Lighthouse, controller: ControllerProcess) -> None:
    g0 = start(tmp_path, lighthouse, controller, 0, "n0", MARDUK_STEP_ID="0")
    g1 = start(tmp_path, lighthouse, controller, 1, "n1", MARDUK_STEP_ID="1")
    spare = start(tmp_path, lighthouse, controller, 9, "n9", MARDUK_STEP_ID="2",
                  MARDUK_STANDBY="1", MARDUK_STANDBY_SLOT="0",
                  MARDUK_ASSUME_DIR=str(tmp_path))
    workers = [g0, g1, spare]
    try:
        def alive() -> None:
            for w in workers:
                assert w.proc.poll() is None, w.tail()

        def standby_registered() -> Any:
            alive()
            return [r for r in rows(controller) if r["state"] == "standby"]
        standby = wait_for(standby_registered, 90, 0.3, "the standby registered")[0]
        assert standby["replica_id"] == "job4343_sb0:s2" and standby["node"] == "n9"
        assert standby["role"] == "standby"

        def both_in_quorum() -> bool:
            alive()
            return all(w.steps() and w.steps()[-1]["np"] == 2 for w in (g0, g1))
        wait_for(both_in_quorum, 90, 0.1, "a quorum of the two groups")
        # Standing by: no Manager, so no heartbeat to the lighthouse and no place in the
        # quorum; the groups keep training two by two around it.
        beyond = g0.last_step() + 15
        wait_for(lambda: g0.last_step() > beyond, 60, 0.1, "15 more steps")
        assert all(r["np"] == 2 for r in g0.steps()[-15:])
        assert spare.events("ready") == [] and spare.steps() == []
        assert [r["state"] for r in rows(controller) if r["role"] == "standby"] == ["standby"]

        fault_at = time.time()
        verdict = m.Verdict(node="n1", gpu_uuid="cpu:n1:0", action=GpuAction.DRAIN_NODE,
                            reason="xid 79 (drill)", xid=79, ts=fault_at)
        asyncio.run(publish_durable(controller.url, [
            (subjects.node_event("n1", "verdict"), m.encode(verdict))]))
        assert g1.wait(30) == EXIT_LEAVE

        def spare_trains_with_g0() -> Any:
            assert g0.proc.poll() is None and spare.proc.poll() is None, spare.tail()
            steps = [r for r in spare.steps() if r.get("committed") and r["np"] == 2]
            return steps and steps[0]
        first = wait_for(spare_trains_with_g0, 60, 0.05, "the standby training as group 1")
        ready = spare.events("ready")[0]
        assert ready["rg"] == 1 and ready["assumed_from"] == "job4343_sb0:s2"
        assert ready["replica_id"].startswith(f"job{JOB}_rg1:")
        print(f"fault -> standby in the quorum at full strength: {first['t'] - fault_at:.2f} s")
        marker = tmp_path / "group-1.assumed"
        assert marker.read_text().split() == ["0", "2", "n9"]

        # Healed: the same weights as the survivor at every common step after the heal.
        wait_for(lambda: spare.last_step() > first["step"] + 10, 60, 0.1, "10 steps more")
        a, b = committed(g0), committed(spare)
        common = sorted(set(a) & set(b))
        assert len(common) >= 10
        assert [s for s in common if a[s]["digest"] != b[s]["digest"]] == []
        assert common[0] >= 5  # it joined a running job: its first step came from the heal

        history = cli_json("history", "--nats-url", controller.url)
        kinds = [e["kind"] for e in history]
        for chain in (["gpu_verdict", "leave_requested"],
                      ["gpu_verdict", "standby_assigned", "standby_assumed"]):
            positions = [kinds.index(k) for k in chain]
            assert positions == sorted(positions), kinds
        assigned = next(e for e in history if e["kind"] == "standby_assigned")
        assert assigned["evidence"]["replica_group"] == 1
        assert assigned["replica_id"] == "job4343_sb0:s2"
        live = {r["replica_group"]: r for r in rows(controller) if r["state"] == "active"}
        assert live[1]["node"] == "n9" and live[1]["role"] == "replica"

        target = max(g0.last_step(), spare.last_step()) + 60
        reply = cli_json("config", "set", str(JOB), f"max_steps={target}", "--nats-url",
                         controller.url)
        assert reply["apply_at_step"] < target
        assert g0.wait(60) == EXIT_DONE and spare.wait(60) == EXIT_DONE
        assert g0.events("exit")[0]["step"] == spare.events("exit")[0]["step"] == target
    finally:
        for w in workers:
            w.stop()


def test_a_standby_on_a_node_being_drained_stands_down(
        tmp_path: Path, lighthouse: Lighthouse, controller: ControllerProcess) -> None:
    spare = start(tmp_path, lighthouse, controller, 9, "n9", MARDUK_STEP_ID="2",
                  MARDUK_STANDBY="1", MARDUK_STANDBY_SLOT="0",
                  MARDUK_ASSUME_DIR=str(tmp_path))
    try:
        def standby_registered() -> Any:
            assert spare.proc.poll() is None, spare.tail()
            return [r for r in rows(controller) if r["state"] == "standby"]
        wait_for(standby_registered, 90, 0.3, "the standby registered")
        verdict = m.Verdict(node="n9", gpu_uuid="cpu:n9:0", action=GpuAction.DRAIN_NODE,
                            reason="xid 79 (drill)", xid=79, ts=time.time())
        asyncio.run(publish_durable(controller.url, [
            (subjects.node_event("n9", "verdict"), m.encode(verdict))]))
        assert spare.wait(30) == EXIT_LEAVE, spare.tail()
        assert spare.events("ready") == [] and not (tmp_path / "group-0.assumed").exists()
        wait_for(lambda: [r["state"] for r in cli_json(
            "replicas", "--all", "--job", str(JOB), "--nats-url", controller.url)] == ["left"],
            20, 0.2, "the standby's row to leave")
        kinds = [e["kind"] for e in cli_json("history", "--nats-url", controller.url)]
        assert "standby_dismissed" in kinds and "standby_lost" not in kinds, kinds
        assert kinds.index("gpu_verdict") < kinds.index("standby_dismissed")
    finally:
        spare.stop()
