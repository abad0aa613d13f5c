"""The controller on a real 3-server NATS cluster, its events stream at 3 JetStream replicas.

In the middle of a storm of GPU verdicts from agent-like publishers (the agent's own outbox:
each verdict with its message id, retried until JetStream confirms it), the server that leads
the events stream, leads the controller's consumer, and carries the connections of the
controller, a node agent and a training replica is SIGKILLed. Every confirmed verdict must be
in the controller's history exactly once, every node with a drain verdict must get exactly
one drain decision, and the controller, the agent, the publishers and the replica must carry
on through the surviving servers by themselves.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.store import Store
from marduk_slurm.agent.outbox import Outbox
from marduk_slurm.controller.ingest import DURABLE_NAME
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.errors import BusError, BusTimeout
from marduk_slurm.runtime.client import MardukClient

from agent_fixtures import AgentProcess
from harness import ControllerProcess, cli_json, wait_for
from nats_cluster import NatsCluster, leader_of, move_leader

PUBLISHERS = 4
NODES_PER_PUBLISHER = 12
GPUS_PER_NODE = 4
DRAIN_GPU = 2  # on every node, this GPU's verdict drains the node; the others' are "none"
TOTAL = PUBLISHERS * NODES_PER_PUBLISHER * GPUS_PER_NODE
JOB = 77
# The replica runs on the drained GPU of the storm's last node: its leave command comes from
# a verdict published after the kill.
REPLICA_NODE = f"c{PUBLISHERS - 1}n{NODES_PER_PUBLISHER - 1:02d}"
REPLICA_ID = f"job{JOB}_rg0:uuid-0"
AGENT_NODE, AGENT_GPUS = "a1", 2


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    cluster = NatsCluster(tmp_path / "nats").start()
    yield cluster
    cluster.stop()


def gpu_uuid(node: str, index: int) -> str:
    return f"GPU-{node}-{index}"


def storm(publisher: int) -> list[tuple[str, bytes, str]]:
    """One agent's verdicts: every GPU of its nodes, the drain verdict among them."""
    items = []
    for k in range(NODES_PER_PUBLISHER):
        node = f"c{publisher}n{k:02d}"
        for index in range(GPUS_PER_NODE):
            drain = index == DRAIN_GPU
            uuid = gpu_uuid(node, index)
            verdict = m.Verdict(
                node=node, gpu_uuid=uuid, gpu_index=index,
                action=GpuAction.DRAIN_NODE if drain else GpuAction.NONE,
                reason=f"storm {node}/{index}: " + ("xid 79" if drain else "healthy"),
                xid=79 if drain else None, source="agent", ts=time.time())
            # The message id the agent gives a verdict (agent/health.py).
            items.append((subjects.node_event(node, "verdict"), m.encode(verdict),
                          f"{node}.verdict.{uuid}.{time.time_ns()}"))
    return items


def start_replica(url: str) -> MardukClient:
    client = MardukClient(url, JOB, 0, connect_timeout=timedelta(seconds=2))

    def register() -> m.ReplicaRegister:
        return m.ReplicaRegister(replica_id=REPLICA_ID, job_id=JOB, replica_group=0,
                                 node=REPLICA_NODE, gpu_uuids=[gpu_uuid(REPLICA_NODE, DRAIN_GPU)],
                                 hyperparams={"lr": 0.1}, step=1, ts=time.time())
    client.start(REPLICA_ID, register)
    return client


class Storm:
    """The publishers: one bus (every server's URL) and one agent outbox each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.buses = [Bus(url, name=f"agent-{p}") for p in range(PUBLISHERS)]
        self.outboxes = [Outbox(bus, publish_timeout_s=2.0, backoff_max_s=1.0)
                         for bus in self.buses]
        self.items = [storm(p) for p in range(PUBLISHERS)]
        self.confirmed: set[str] = set()  # message ids JetStream acknowledged

    async def run(self, kill_after: int, kill: asyncio.Event) -> None:
        """Publish every verdict, paced; set `kill` once `kill_after` are confirmed; return
        when every one is."""
        for bus in self.buses:
            await bus.connect(retry=True)
        runners = [asyncio.create_task(box.run()) for box in self.outboxes]
        try:
            for k in range(max(len(items) for items in self.items)):
                for box, items in zip(self.outboxes, self.items, strict=True):
                    subject, data, msg_id = items[k]
                    box.put(subject, data, msg_id, self._confirm(msg_id, kill_after, kill))
                await asyncio.sleep(0.01)
            for box in self.outboxes:
                assert await box.flush(120), f"outbox left {len(box)} unconfirmed"
        finally:
            for task in runners:
                task.cancel()
            await asyncio.gather(*runners, return_exceptions=True)

    def _confirm(self, msg_id: str, kill_after: int, kill: asyncio.Event):  # type: ignore[no-untyped-def]
        async def confirmed() -> None:
            self.confirmed.add(msg_id)
            if len(self.confirmed) >= kill_after:
                kill.set()
        return confirmed

    async def close(self) -> None:
        for bus in self.buses:
            await bus.close()


async def wait_backlog_empty(bus: Bus, consumer: str, timeout_s: float = 60.0) -> None:
    """Until the consumer has nothing left to deliver and nothing delivered unacknowledged."""
    deadline = time.monotonic() + timeout_s
    info: dict[str, object] = {}
    while time.monotonic() < deadline:
        try:
            info = json.loads(await bus.request(f"$JS.API.CONSUMER.INFO.{consumer}", b"", 2.0))
        except (BusError, BusTimeout):
            info = {}
        if info.get("num_pending") == 0 and info.get("num_ack_pending") == 0:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"consumer {consumer} still has a backlog: {info}")


def test_events_stream_survives_its_leader_dying_in_a_fault_storm(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    # A lease longer than JetStream's election (docs/operations.md, "The lease and a NATS
    # cluster"): the controller rides the election out instead of stepping down for it.
    ctl = ControllerProcess(tmp_path / "state", nats_cluster.url,
                            extra_env={"MARDUK_NATS_STREAM_REPLICAS": "3",
                                       "MARDUK_CONTROLLER_LEASE_S": "15"}).start()
    stream = subjects.EVENTS_STREAM
    consumer = f"{stream}.{DURABLE_NAME}"
    # The server that carries the controller's connection is made the leader of both the
    # stream and the controller's consumer: its death then takes all three away at once.
    home = nats_cluster.server_at(ctl.request("status")["nats_server"])
    survivors = {s.url for s in nats_cluster.servers if s is not home}
    # The agent and the replica are given that server's URL only: the others they learn
    # from the cluster itself.
    (tmp_path / "agent").mkdir()
    agent = AgentProcess(tmp_path / "agent", home.url, node=AGENT_NODE, gpus=AGENT_GPUS)
    replica = start_replica(home.url)
    box = Storm(nats_cluster.url)
    at_kill: dict[str, object] = {}

    async def scenario() -> None:
        probe = Bus(nats_cluster.url, name="probe")
        await probe.connect(retry=True)
        info = await probe.stream_info()
        assert info["replicas"] == 3
        assert {info["leader"], *(f["name"] for f in info["followers"])} == {"s1", "s2", "s3"}
        await move_leader(probe, "STREAM", stream, home.name)
        await move_leader(probe, "CONSUMER", consumer, home.name)
        kill = asyncio.Event()

        async def killer() -> None:
            await kill.wait()
            at_kill["confirmed"] = len(box.confirmed)
            at_kill["stream_leader"] = await leader_of(probe, "STREAM", stream)
            at_kill["consumer_leader"] = await leader_of(probe, "CONSUMER", consumer)
            nats_cluster.kill(home.name)

        killing = asyncio.create_task(killer())
        await box.run(kill_after=TOTAL // 3, kill=kill)
        await killing
        # A publisher that lost every confirmation sends everything again, same ids: the
        # stream keeps one copy of each (JetStream's duplicate window, on the new leader too).
        before = (await probe.stream_info())["last_seq"]
        again = Bus(nats_cluster.url, name="agent-again")
        await again.connect(retry=True)
        seqs = [await again.publish_durable(subject, data, msg_id=msg_id, timeout_s=5.0)
                for items in box.items for subject, data, msg_id in items]
        # Each resend is answered with the sequence of its first copy: none is stored again
        # (other publishers, the agent among them, may add messages of their own meanwhile).
        assert seqs and max(seqs) <= before
        await again.close()
        # Everything in the stream delivered to the controller and acknowledged by it.
        await wait_backlog_empty(probe, consumer)
        await box.close()
        await probe.close()

    try:
        agent.start()
        wait_for(lambda: ctl.request("replicas", {"job": JOB}), 30, what="the replica registered")
        asyncio.run(scenario())
        assert at_kill["stream_leader"] == home.name and at_kill["consumer_leader"] == home.name
        assert 0 < at_kill["confirmed"] < TOTAL  # type: ignore[operator]
        assert len(box.confirmed) == TOTAL
        assert sum(o.stats["retries"] for o in box.outboxes) > 0  # the kill hit publishes

        # The controller, the replica and the agent carried on through the survivors.
        status = ctl.request("status")
        assert status["nats"] == "connected" and status["nats_server"] in survivors
        assert status["nats_reconnects"] >= 1
        assert replica.connected and replica.bus.server in survivors
        assert replica.stats["reconnects"] >= 1
        leave = wait_for(lambda: [c for c in replica.poll_commands()
                                  if isinstance(c, m.ReplicaCommand) and c.action == "leave"],
                         30, what="the replica's leave command, sent after the kill")
        assert leave[0].immediate is True
        agent.wait_log("NATS reconnected", 30)
        # An operator's drill through every server's URL, the dead one among them: the agent
        # answers it (it reconnected and subscribed again) and its verdict drains its node.
        injected = cli_json("inject", "--node", AGENT_NODE, "--gpu", "0", "--xid", "79",
                            "--nats-url", nats_cluster.url)
        assert injected["via"] == "agent"
        wait_for(lambda: ctl.request("history", {"node": AGENT_NODE,
                                                 "kinds": ["drain_requested"]}),
                 30, what="the agent's verdict drains its node")
        status = ctl.request("status")
        assert status["outbox_pending"] == PUBLISHERS * NODES_PER_PUBLISHER + 1
    finally:
        replica.close()
        assert agent.stop() == 0, agent.log()
        assert ctl.stop() == 0, ctl.log()

    store = Store(tmp_path / "state" / "marduk.db")
    storm_nodes = [f"c{p}n{k:02d}" for p in range(PUBLISHERS) for k in range(NODES_PER_PUBLISHER)]
    verdicts = Counter(row[0] for row in store.conn.execute(
        "SELECT reason FROM events WHERE kind = 'gpu_verdict' AND node != ?", (AGENT_NODE,)))
    sent = Counter(m.decode_durable(data).reason for items in box.items  # type: ignore[union-attr]
                   for _, data, _ in items)
    assert verdicts == sent  # 0 lost, 0 duplicates
    drains = Counter(row[0] for row in store.conn.execute(
        "SELECT node FROM events WHERE kind = 'drain_requested' AND node != ?", (AGENT_NODE,)))
    assert drains == {node: 1 for node in storm_nodes}
    # The agent's node: one drain per drain verdict of its agent (the XID, and the lost GPU's
    # next poll when it came before the agent stopped), each caused by such a verdict.
    causes = [json.loads(row[0])["cause_event"] for row in store.conn.execute(
        "SELECT evidence FROM events WHERE kind = 'drain_requested' AND node = ?",
        (AGENT_NODE,))]
    assert 1 <= len(causes) <= 2, causes
    assert all(tuple(store.conn.execute(
        "SELECT kind, source, action FROM events WHERE id = ?", (c,)).fetchone()) == (
        "gpu_verdict", "agent", "drain_node") for c in causes)
    agent_verdicts = store.conn.execute(
        "SELECT source, xid FROM events WHERE kind = 'gpu_verdict' AND node = ? AND xid = 79",
        (AGENT_NODE,)).fetchall()
    assert [tuple(row) for row in agent_verdicts] == [("agent", 79)]


def test_a_single_replica_stream_is_raised_to_stream_replicas_with_its_consumer(
        tmp_path: Path, nats_cluster: NatsCluster) -> None:
    """A site that moves to a cluster (or raises nats.stream_replicas): the next start of the
    controller replicates the existing stream, and its consumer follows."""
    consumer = f"{subjects.EVENTS_STREAM}.{DURABLE_NAME}"

    async def layout() -> tuple[int, int]:
        bus = Bus(nats_cluster.url, name="probe")
        await bus.connect(retry=True)
        try:
            stream = await bus.stream_info()
            info = json.loads(await bus.request(f"$JS.API.CONSUMER.INFO.{consumer}", b"", 5.0))
            return stream["replicas"], 1 + len(info.get("cluster", {}).get("replicas") or [])
        finally:
            await bus.close()

    ctl = ControllerProcess(tmp_path / "state", nats_cluster.url).start()
    assert ctl.stop() == 0
    assert asyncio.run(layout()) == (1, 1)
    ctl = ControllerProcess(tmp_path / "state", nats_cluster.url,
                            extra_env={"MARDUK_NATS_STREAM_REPLICAS": "3"}).start()
    try:
        wait_for(lambda: asyncio.run(layout()) == (3, 3), 30,
                 what="the stream and its consumer at 3 replicas")
    finally:
        assert ctl.stop() == 0, ctl.log()


def test_more_replicas_than_servers_stops_the_controller_with_the_reason(
        tmp_path: Path) -> None:
    from marduk_slurm.adapters.nats_server import NatsServerProcess

    server = NatsServerProcess(tmp_path / "nats")
    server.start()
    ctl = ControllerProcess(tmp_path / "state", server.url,
                            extra_env={"MARDUK_NATS_STREAM_REPLICAS": "3"})
    try:
        with pytest.raises(RuntimeError) as exited:
            ctl.start()
        # It exits (rather than wait for JetStream as for a cluster still electing a leader).
        assert ctl.proc is not None and ctl.proc.poll() not in (None, 0)
        assert "cannot create stream MARDUK_EVENTS with 3 replica(s)" in str(exited.value)
    finally:
        ctl.stop()
        server.stop()
