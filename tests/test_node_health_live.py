"""Node health beyond the GPU, end to end: a real agent process reading a fake sysfs tree,
a real nats-server and a real controller. A flapping port drains its node with the evidence
in the history and sends the replica on it away now; an InfiniBand port going down does the
same; drills go through the agent; a node verdict from the wrong subject, or shaped wrong,
is refused and counted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.node_check import new_check_id

from agent_fixtures import AgentProcess
from harness import ControllerProcess, publish_durable, run_cli, wait_for
from node_health_fixtures import FakeSysfs

IB = "mlx5_0/1"
JOB = 41


@pytest.fixture
def sysfs(tmp_path: Path) -> FakeSysfs:
    fake = FakeSysfs(tmp_path / "sys")
    fake.ib_port(IB)
    fake.net_port("eth9", carrier_changes=2)
    return fake


@pytest.fixture
def watching_agent(tmp_path: Path, nats_server: NatsServerProcess,
                   sysfs: FakeSysfs) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path, nats_server.url, gpus=1)
    proc.env.update({
        "MARDUK_AGENT_SYSFS_ROOT": str(sysfs.root), "MARDUK_AGENT_IB_PORTS": IB,
        "MARDUK_AGENT_NET_PORTS": "eth9", "MARDUK_AGENT_MOUNTS_READ_ONLY": "/",
        "MARDUK_AGENT_NODE_HEALTH_INTERVAL_S": "0.2"})
    proc.start()
    yield proc
    assert proc.stop() == 0, proc.log()


def events(ctl: ControllerProcess, kind: str) -> list[dict[str, Any]]:
    return [e for e in ctl.request("history", {"kinds": [kind], "node": "n2"})
            if e["kind"] == kind]


class CommandListener:
    """The replica's side of the leave command: what arrives on its group's subject."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.got: list[dict[str, Any]] = []

    async def listen(self, until: asyncio.Event) -> None:
        bus = Bus(self.url, name="test-replica")
        await bus.connect()

        async def on_msg(msg: Any) -> None:
            self.got.append(json.loads(bytes(msg.data)))

        try:
            await bus.subscribe(subjects.replica_commands(JOB, 0), on_msg)
            await until.wait()
        finally:
            await bus.close()


def test_a_flapping_port_drains_its_node_and_its_replica_leaves(
        controller: ControllerProcess, watching_agent: AgentProcess, sysfs: FakeSysfs) -> None:
    wait_for(lambda: len(events(controller, "port_verdict")) == 2, what="both ports judged")
    assert {e["action"] for e in events(controller, "port_verdict")} == {"none"}
    wait_for(lambda: events(controller, "mount_verdict"), what="the mount judged")
    register = m.ReplicaRegister(replica_id=f"job{JOB}_rg0:a", job_id=JOB, replica_group=0,
                                 node="n2", ts=time.time())
    asyncio.run(publish_durable(controller.url, [
        (subjects.job_event(JOB, "replica_register"), m.encode(register))]))
    wait_for(lambda: controller.request("replicas", {"job": JOB}), what="the replica")

    async def flap_and_listen() -> list[dict[str, Any]]:
        listener, done = CommandListener(controller.url), asyncio.Event()
        task = asyncio.create_task(listener.listen(done))
        await asyncio.sleep(0.5)  # subscribed before the decision can be taken
        for changes in (3, 4, 5):  # the link drops again and again
            sysfs.write("class/net/eth9/carrier_changes", f"{changes}\n")
            await asyncio.sleep(0.3)
        for _ in range(300):
            if listener.got:
                break
            await asyncio.sleep(0.05)
        done.set()
        await task
        return listener.got

    commands = asyncio.run(flap_and_listen())
    drain = wait_for(lambda: [e for e in events(controller, "port_verdict")
                              if e["action"] == "drain_node"], what="the drain verdict")[0]
    assert "flapping" in drain["reason"] and drain["source"] == "agent"
    assert drain["evidence"]["target"] == "eth9"
    assert drain["evidence"]["flaps_in_window"] >= 3 and drain["evidence"]["flaps"] == 5
    requested = wait_for(lambda: events(controller, "drain_requested"), what="the drain")
    assert requested[0]["reason"] == f"marduk: port=eth9 flapping event={drain['id']}"
    assert requested[0]["evidence"]["cause_event"] == drain["id"]
    leave = wait_for(lambda: events(controller, "leave_requested"), what="the leave")[0]
    assert leave["replica_id"] == f"job{JOB}_rg0:a"
    assert leave["evidence"] == {"cause_event": drain["id"], "immediate": True}
    assert [(c["action"], c["immediate"], c["replica_id"]) for c in commands] == [
        ("leave", True, f"job{JOB}_rg0:a")]

    # An InfiniBand port going down: its own verdict and its own drain decision.
    sysfs.write(f"class/infiniband/{IB.replace('/', '/ports/')}/state", "1: DOWN\n")
    down = wait_for(lambda: [e for e in events(controller, "port_verdict")
                             if e["action"] == "drain_node" and e["evidence"]["target"] == IB],
                    what="the IB port's verdict")[0]
    assert "state DOWN" in down["reason"]
    wait_for(lambda: any(f"port={IB} state event={down['id']}" in e["reason"]
                         for e in events(controller, "drain_requested")),
             what="the IB port's drain")

    node = controller.request("nodes", {"node": "n2"})[0]
    health = {c["target"]: c["health"] for c in node["components"]}
    assert health == {IB: "drain_node", "eth9": "drain_node", "/": "none"}
    shown = run_cli("history", "--node", "n2", "--nats-url", controller.url)
    assert shown.returncode == 0, shown.stderr
    lines = [line for line in shown.stdout.splitlines() if "port_verdict" in line]
    assert any("eth9" in line and "flapping" in line for line in lines), shown.stdout
    nodes = run_cli("nodes", "n2", "--nats-url", controller.url)
    assert "eth9:drain_node" in nodes.stdout and f"{IB}:drain_node" in nodes.stdout
    # Only changes went out: the port kept flapping and kept being down, unpublished. Whether
    # the agent read the first loss alone (watch) depends on when it read.
    by_port: dict[str, list[str]] = {}
    for e in events(controller, "port_verdict"):
        by_port.setdefault(e["evidence"]["target"], []).append(e["action"])
    assert by_port[IB] == ["none", "drain_node"]
    assert by_port["eth9"] in (["none", "watch", "drain_node"], ["none", "drain_node"])
    assert "port eth9: drain_node" in watching_agent.log()

    # The node check before a resume reads the ports again on the node: still failing.
    check = controller.request("node_check", {"nodes": "n2", "check_id": new_check_id(),
                                              "timeout_s": 30}, timeout_s=60)
    ev = check["checks"]["n2"]
    assert not check["passed"] and ev["returncode"] == 1, ev
    assert "port eth9 flapping" in ev["output"] and f"port {IB} state DOWN" in ev["output"]
    assert {c["target"]: c["action"] for c in ev["components"]}["/"] == "none"


def test_drills_on_ports_and_mounts_go_through_the_agent(
        controller: ControllerProcess, watching_agent: AgentProcess) -> None:
    wait_for(lambda: len(events(controller, "port_verdict")) == 2, what="both ports judged")
    ok = run_cli("inject", "--node", "n2", "--mount", "/", "--fault", "hang",
                 "--nats-url", controller.url)
    assert ok.returncode == 0, ok.stderr
    assert "injected hang on n2 mount / via agent: drain_node" in ok.stdout
    hang = wait_for(lambda: [e for e in events(controller, "mount_verdict")
                             if e["action"] == "drain_node"], what="the drill's verdict")[0]
    assert hang["evidence"]["injected"] is True and hang["evidence"]["outcome"] == "timed_out"
    wait_for(lambda: events(controller, "drain_requested"), what="the drill's drain")
    flap = run_cli("inject", "--json", "--node", "n2", "--port", IB, "--fault", "flap",
                   "--nats-url", controller.url)
    assert flap.returncode == 0, flap.stderr
    assert json.loads(flap.stdout)["action"] == "drain_node"
    for argv, error in [
            (["--port", "eth7", "--fault", "down"], "no port 'eth7' watched on n2"),
            (["--mount", "/", "--fault", "flap"], "fault must be one of hang, fail"),
            (["--port", IB], "--port and --mount take --fault"),
            (["--gpu", "0", "--fault", "down"], "--gpu takes --xid or --reset"),
            (["--port", IB, "--mount", "/", "--fault", "down"], "not allowed with")]:
        bad = run_cli("inject", "--node", "n2", *argv, "--nats-url", controller.url)
        assert bad.returncode != 0 and error in bad.stderr, (argv, bad.stderr)


def test_node_verdicts_are_refused_from_another_subject_or_out_of_shape(
        controller: ControllerProcess) -> None:
    def verdict(**changes: Any) -> bytes:
        base = {"type": "node_verdict", "v": 1, "node": "n3", "component": "port",
                "target": "eth0", "action": "drain_node", "reason": "x",
                "evidence": {}, "source": "agent"}
        return json.dumps({**base, **changes}).encode()

    bad = [
        (subjects.node_event("n2", "node_verdict"), verdict()),  # n2 speaking for n3
        (subjects.node_event("n3", "verdict"), verdict()),  # under another kind's subject
        (subjects.node_event("n3", "node_verdict"), verdict(action="reset_gpu")),
        (subjects.node_event("n3", "node_verdict"), verdict(component="gpu")),
        (subjects.node_event("n3", "node_verdict"), verdict(target="x" * 257)),
        (subjects.node_event("n3", "node_verdict"), verdict(target="eth0\n")),
        (subjects.node_event("n3", "node_verdict"), verdict(target="")),
        (subjects.node_event("n3", "node_verdict"), verdict(evidence={"n": 2**70})),
    ]
    asyncio.run(publish_durable(controller.url, bad))
    wait_for(lambda: sum(r["count"] for r in controller.request("status")["rejections"])
             == len(bad), what="every bad verdict refused")
    causes = {r["cause"] for r in controller.request("status")["rejections"]}
    assert causes == {"subject_mismatch", "out_of_range", "invalid_field", "too_large",
                      "bad_format"}, causes
    assert not controller.request("history", {"kinds": ["port_verdict", "drain_requested"]})
