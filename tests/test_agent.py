"""The node agent (simulated GPUs) against a real nats-server and a real controller: GPU
inventory, fault injection through the agent's own verdict code, SPANK-style step reports on
the real Unix socket, delivery after a NATS outage, and re-announcement after a restart."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.nvml import simulated_gpu_uuid
from marduk_slurm.agent.outbox import Outbox
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, NotFound

from agent_fixtures import AgentProcess, agent, next_health, step_end, step_start
from harness import ControllerProcess, publish_durable, run_cli, wait_for

__all__ = ["agent"]  # the fixture, imported for pytest

GPU0, GPU1 = simulated_gpu_uuid("n2", 0), simulated_gpu_uuid("n2", 1)


def node_gpus(ctl: ControllerProcess, node: str) -> list[dict[str, Any]]:
    try:
        return list(ctl.request("nodes", {"node": node})[0]["gpus"])
    except NotFound:  # not yet: the inventory is on its way
        return []


def events(ctl: ControllerProcess, kind: str, **args: Any) -> list[dict[str, Any]]:
    rows = ctl.request("history", {"kinds": [kind], **args})
    return [r for r in rows if r["kind"] == kind]


def test_inventory_and_inject_go_through_the_agent(
    controller: ControllerProcess, agent: AgentProcess
) -> None:
    gpus = wait_for(
        lambda: len(g := node_gpus(controller, "n2")) == 2 and g, what="the agent's inventory"
    )
    assert [g["uuid"] for g in gpus] == [GPU0, GPU1]
    assert "SIMULATED GPUs" in agent.log()

    proc = run_cli(
        "inject", "--node", "n2", "--gpu", "1", "--xid", "79", "--nats-url", controller.url
    )
    assert proc.returncode == 0, proc.stderr
    assert "via agent" in proc.stdout and "drain_node" in proc.stdout

    verdict = wait_for(
        lambda: [
            e for e in events(controller, "gpu_verdict", node="n2") if e["action"] == "drain_node"
        ],
        what="the agent's verdict",
    )[0]
    assert verdict["source"] == "agent" and verdict["gpu_uuid"] == GPU1
    assert verdict["evidence"]["injected"] is True
    assert verdict["evidence"]["xids"] == [79]
    drains = wait_for(
        lambda: events(controller, "drain_requested", node="n2"), what="a drain request"
    )
    assert "xid=79" in drains[0]["reason"]

    bad = run_cli(
        "inject", "--node", "n2", "--gpu", "7", "--xid", "79", "--nats-url", controller.url
    )
    assert bad.returncode != 0 and "no GPU '7'" in bad.stderr


def test_a_gpu_lost_after_xid_79_stays_lost_until_reset(
    controller: ControllerProcess, agent: AgentProcess
) -> None:
    """A GPU that fell off the bus does not come back by itself, poll after poll; a drill's
    reset (`marduk inject --reset`) brings it back, through the agent's own verdict."""
    wait_for(lambda: len(node_gpus(controller, "n2")) == 2, what="the agent's inventory")
    proc = run_cli("inject", "--node", "n2", "--gpu", "1", "--xid", "79",
                   "--nats-url", controller.url)
    assert proc.returncode == 0, proc.stderr
    first = asyncio.run(next_health(controller.url, "n2"))
    # Three more polls of both GPUs (the fixture polls every 0.5 s).
    later = wait_for(
        lambda: (h := asyncio.run(next_health(controller.url, "n2")))["stats"]["readings"]
        >= first["stats"]["readings"] + 6 and h, what="three more polls")
    assert [(g["action"], g["reason"]) for g in later["gpus"]] == [
        ("none", "healthy"), ("drain_node", "GPU is lost (NVML_ERROR_GPU_IS_LOST)")]

    reset = run_cli("inject", "--json", "--node", "n2", "--gpu", "1", "--reset",
                    "--nats-url", controller.url)
    assert reset.returncode == 0, reset.stderr
    data = json.loads(reset.stdout)
    assert (data["reset"], data["action"], data["gpu_uuid"]) == (True, "none", GPU1)
    wait_for(lambda: [e for e in events(controller, "gpu_verdict", node="n2")
                      if e["gpu_uuid"] == GPU1 and e["action"] == "none"],
             what="the healthy verdict after the reset")
    after = asyncio.run(next_health(controller.url, "n2"))
    assert [g["action"] for g in after["gpus"]] == ["none", "none"]
    both = run_cli("inject", "--node", "n2", "--gpu", "1", "--xid", "79", "--reset",
                   "--nats-url", controller.url)
    assert both.returncode != 0 and "not allowed with argument" in both.stderr


def test_step_reports_on_the_socket_reach_the_controller(
    controller: ControllerProcess, agent: AgentProcess
) -> None:
    # Two lines in one connection; the second leaves "node" out (the agent's own node).
    agent.report(step_start(31, 0, gpus=[0, 1]), step_start(31, 1, node=None, gpus=[1]))
    starts = wait_for(
        lambda: len(e := events(controller, "step_start", job=31)) == 2 and e,
        what="two step starts",
    )
    by_step = {e["evidence"]["step_id"]: e for e in starts}
    assert by_step[0]["evidence"]["gpu_uuids"] == [GPU0, GPU1]
    assert by_step[1]["evidence"]["gpu_uuids"] == [GPU1] and by_step[1]["node"] == "n2"

    register = m.ReplicaRegister(
        replica_id="job31_rg0:a",
        job_id=31,
        step_id=0,
        replica_group=0,
        node="n2",
        gpu_uuids=[GPU0, GPU1],
    )
    asyncio.run(
        publish_durable(
            controller.url, [(subjects.job_event(31, "replica_register"), m.encode(register))]
        )
    )
    wait_for(lambda: controller.request("replicas", {"job": 31}), what="the replica")

    agent.report(step_end(31, 0, exit_status=0))
    wait_for(
        lambda: not controller.request("replicas", {"job": 31}),
        what="the ended step's replica to leave the mapping",
    )
    ended = events(controller, "step_end", job=31)
    assert ended[0]["evidence"]["replicas_removed"] == ["job31_rg0:a"]
    # Only the step still running stays in the journal once its end is published.
    wait_for(
        lambda: [s["step_id"] for s in agent.journal()["steps"]] == [1],
        what="the journal to forget the ended step",
    )


def test_reports_made_while_nats_is_down_arrive_after_it_returns(
    controller: ControllerProcess, nats_server: NatsServerProcess, agent: AgentProcess
) -> None:
    wait_for(lambda: node_gpus(controller, "n2"), what="inventory")
    nats_server.stop()
    agent.report(step_start(41, 0, gpus=[0]))
    agent.report(step_end(41, 0, exit_status=9))
    time.sleep(0.5)
    assert agent.running
    nats_server.start()
    controller.wait_ready(30)
    wait_for(
        lambda: events(controller, "step_end", job=41),
        timeout_s=30,
        what="the reports made while NATS was down",
    )
    start = events(controller, "step_start", job=41)[0]
    assert start["evidence"]["gpu_uuids"] == [GPU0]


def test_restart_reannounces_running_steps(
    controller: ControllerProcess, agent: AgentProcess
) -> None:
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(gone.stdout)
    agent.report(step_start(51, 0, gpus=[0]), step_start(52, 0, gpus=[1], pid=dead_pid))
    wait_for(
        lambda: len(events(controller, "step_start", node="n2")) == 2, what="both steps recorded"
    )
    assert agent.stop() == 0
    assert {s["job_id"] for s in agent.journal()["steps"]} == {51, 52}

    agent.start()
    # The live step is announced again; the one whose process is gone is reported ended.
    wait_for(
        lambda: len(events(controller, "step_start", job=51)) == 2,
        what="the running step re-announced",
    )
    wait_for(lambda: events(controller, "step_end", job=52), what="the dead step ended")
    assert not events(controller, "step_end", job=51)
    assert "re-announced" in agent.new_log()


def test_hung_nvml_init_is_abandoned_and_the_agent_keeps_relaying_steps(
    tmp_path: Path, controller: ControllerProcess
) -> None:
    hung = Path(__file__).parent / "fakes" / "hung_nvml"
    agent = AgentProcess(tmp_path, controller.url, gpus=0)  # 0: NVML, here the wedged one
    agent.env.update(
        PYTHONPATH=os.pathsep.join([str(hung), agent.env.get("PYTHONPATH", "")]),
        MARDUK_AGENT_NVML_TIMEOUT_S="0.5",
    )
    try:
        started = time.monotonic()
        agent.start(timeout_s=10)
        assert time.monotonic() - started < 10
        assert "NVML init took over" in agent.log()
        agent.report(step_start(61, 0, gpus=[]))
        wait_for(lambda: events(controller, "step_start", job=61), what="the step relayed")
    finally:
        assert agent.stop() == 0


def test_malformed_lines_are_counted_and_the_agent_stays_up(
    controller: ControllerProcess, agent: AgentProcess
) -> None:
    agent.report(
        b"not json\n",
        b"[1,2]\n",
        b'{"v":1,"event":"step_start"}\n',
        b'{"v":2,"event":"step_start","job_id":1,"step_id":0}\n',
        b'{"v":1,"event":"explode","job_id":1,"step_id":0}\n',
        b'{"v":1,"event":"step_start","job_id":-3,"step_id":0}\n',
        b"\xff\xfe\n",
        b"x" * 70_000 + b"\n",
    )
    agent.report(step_start(61, 4294967291, gpus=[], node="") | {"future_field": True})
    wait_for(lambda: events(controller, "step_start", job=61), what="the valid batch step")
    assert agent.running

    def counted() -> dict[str, Any] | None:
        health = asyncio.run(next_health(controller.url, "n2"))
        relay = health["step_relay"]
        return health if relay.get("malformed", 0) == 8 else None

    health = wait_for(counted, what="the malformed lines counted")
    assert health["step_relay"]["malformed_by_reason"] == {
        "malformed_json": 3,
        "missing_field": 1,
        "unsupported_version": 1,
        "unknown_event": 1,
        "invalid_field": 1,
        "too_long": 1,
    }
    assert health["simulated"] is True and len(health["gpus"]) == 2


class _FakeBus:
    def __init__(self) -> None:
        self.connected = False
        self.sent: list[str] = []

    async def publish_durable(
        self, subject: str, data: bytes, *, msg_id: str = "", timeout_s: float = 5.0
    ) -> int:
        if not self.connected:
            raise BusError("down")
        self.sent.append(msg_id)
        return len(self.sent)


async def test_outbox_is_bounded_and_keeps_order() -> None:
    bus = _FakeBus()
    outbox = Outbox(bus, max_items=3)
    for i in range(5):
        outbox.put("s", b"x", f"id{i}")
    assert len(outbox) == 3 and outbox.stats["dropped"] == 2
    task = asyncio.create_task(outbox.run())
    await asyncio.sleep(0.05)
    bus.connected = True
    assert await outbox.flush(2.0)
    task.cancel()
    assert bus.sent == ["id2", "id3", "id4"]


@pytest.mark.parametrize(
    "args",
    [
        {"gpu": "1"},
        {"xid": 79},
        {"gpu": True, "xid": 1},
        {"gpu": "0", "xid": -1},
        {"gpu": "0", "xid": "x"},
    ],
)
def test_inject_args_are_checked(args: dict[str, Any]) -> None:
    from marduk_slurm.agent.rpc import inject_args

    with pytest.raises(ValueError):
        inject_args(args)


def test_summary_counters_are_clamped_to_the_protocol_bounds() -> None:
    from collections import Counter

    from marduk_slurm.agent.health import gpu_counters
    from marduk_slurm.domain.gpu_health import GpuReading

    reading = GpuReading(uuid="GPU-a", index=0, node="n1", ecc_sbe_volatile=-3,
                         ecc_dbe_aggregate=2**60, temperature_c=5000, power_w=float("nan"),
                         throttle_reasons=frozenset({"hw_slowdown"}))
    counters = gpu_counters(reading, Counter({79: 2}))
    assert (counters.ecc_sbe_volatile, counters.ecc_dbe_aggregate) == (0, 2**53)
    assert (counters.temperature_c, counters.power_w) == (1000.0, None)
    summary = m.HealthSummary(node="n1", gpus=[m.HealthGpu(uuid="GPU-a", counters=counters)])
    assert m.decode_health(msgspec.json.encode(summary)).gpus[0].counters == counters
