"""A hot spare across a controller restart: the controller decides the leave and names the
standby, and is killed before the standby hears its assume command. The decision is on
record (one transaction), so the restarted controller re-sends the same assume, the standby
takes it and acknowledges, and nothing is decided twice. Real nats-server, real controller
processes, the real runtime client; no torch."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.runtime.client import MardukClient

from harness import ControllerProcess, cli_json, publish_durable, wait_for

JOB = 5151
STANDBY = f"job{JOB}_sb0:s2"


def client(url: str, replica_id: str, group: int, node: str, *, standby: bool = False
           ) -> MardukClient:
    c = MardukClient(url, JOB, group, connect_timeout=timedelta(seconds=2))
    c.start(replica_id, lambda: m.ReplicaRegister(
        replica_id=replica_id, job_id=JOB, step_id=2 if standby else group,
        replica_group=group, node=node, standby=standby, gpu_uuids=[f"GPU-{node}-0"],
        step=0, ts=time.time()), standby=standby)
    return c


def history(url: str) -> list[dict[str, Any]]:
    return list(cli_json("history", "--job", str(JOB), "--limit", "200", "--nats-url", url))


def kinds(url: str) -> list[str]:
    return [e["kind"] for e in history(url)]


def test_the_restarted_controller_resends_the_assume_it_decided(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    url = nats_server.url
    ctl = ControllerProcess(tmp_path / "state", url).start()
    groups = [client(url, f"job{JOB}_rg{g}:r{g}", g, f"n{g + 1}") for g in (0, 1)]
    standby = client(url, STANDBY, 0, "n3", standby=True)
    try:
        wait_for(lambda: {r["replica_id"]: r["state"] for r in cli_json(
            "replicas", "--job", str(JOB), "--nats-url", url)}.get(STANDBY) == "standby",
            what="the standby registered")
        standby.close()  # it will not hear the assume this controller sends
        verdict = m.Verdict(node="n2", gpu_uuid="GPU-n2-0", gpu_index=0,
                            action=GpuAction.DRAIN_NODE, reason="xid 79", xid=79,
                            ts=time.time())
        asyncio.run(publish_durable(url, [(subjects.node_event("n2", "verdict"),
                                           m.encode(verdict))]))
        wait_for(lambda: "standby_assigned" in kinds(url), what="the standby named")
        ctl.kill()  # after the decision, before any acknowledgement

        ctl = ControllerProcess(tmp_path / "state", url).start()
        standby = client(url, STANDBY, 0, "n3", standby=True)
        cmd = standby.wait_assignment(timedelta(seconds=20))
        assert cmd is not None and cmd.action == "assume", cmd
        assert cmd.replica_group == 1
        standby.send_assume_ack(cmd)
        wait_for(lambda: "standby_assumed" in kinds(url), what="the assume acknowledged")
        seen = kinds(url)
        assert seen.count("standby_assigned") == 1, seen  # decided once, before the restart
        assert seen.count("leave_requested") == 1, seen
        on_node = [e["kind"] for e in cli_json("history", "--node", "n2", "--nats-url", url)]
        assert on_node.count("gpu_verdict") == 1, on_node  # not applied again
    finally:
        standby.close()
        for c in groups:
            c.close()
        assert ctl.stop() == 0, ctl.log()
