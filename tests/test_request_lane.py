"""Operator requests are bounded, fair and never silent, and they do not hold up the fault
path. Real nats-server, real controller, real SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.cli.client import RequestFailed, call
from marduk_slurm.controller import queries
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from harness import ControllerProcess, publish_durable, run_cli, wait_for


def _fill(state_dir: Path, replicas: int, events: int = 0) -> None:
    """A database as a busy site's would be, written before the controller starts."""
    store = Store(state_dir / "marduk.db")
    store.migrate()
    now = time.time()
    with store.transaction():
        for i in range(replicas):
            msg = m.ReplicaRegister(replica_id=f"job{i // 100}_rg{i % 100}:" + "u" * 64,
                                    job_id=i // 100, replica_group=i % 100,
                                    node=f"node{i // 8:05d}", gpu_uuids=[f"GPU-{i:08d}"],
                                    hyperparams={"lr": 0.001, "batch_size": 64})
            store.register_replica(msg, now)
            store.ensure_node(msg.node, now)
            if i % 8 == 7:  # each node's eight GPUs
                store.upsert_gpus(msg.node, [m.GpuDescriptor(uuid=f"GPU-{j:08d}", index=j % 8)
                                             for j in range(i - 7, i + 1)], False, now)
        for i in range(events):
            store.add_event("gpu_verdict", now=now, source="agent", node=f"node{i:05d}",
                            reason="xid 13: graphics engine exception " + "x" * 200)
    store.close()


@pytest.fixture
def busy_controller(tmp_path: Path, nats_server: NatsServerProcess):  # type: ignore[no-untyped-def]
    _fill(tmp_path / "state", replicas=3000, events=3000)
    ctl = ControllerProcess(tmp_path / "state", nats_server.url).start()
    yield ctl
    assert ctl.stop() == 0


def test_an_answer_too_large_for_nats_is_an_error_that_says_what_to_do(
        busy_controller: ControllerProcess) -> None:
    with pytest.raises(RequestFailed) as err:
        asyncio.run(call(busy_controller.url, "replicas", {}))
    assert err.value.kind == "too_large" and "--limit" in str(err.value)
    status = busy_controller.request("status")
    assert status["counters"]["rpc_reply_too_large"] == 1


def test_list_verbs_page_through_everything_with_a_cursor(
        busy_controller: ControllerProcess) -> None:
    seen: list[str] = []
    cursor = None
    while True:
        page = busy_controller.request("replicas", {"page_size": 700, "cursor": cursor})
        assert page["total"] == 3000
        seen += [r["replica_id"] for r in page["items"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 3000
    ids: list[int] = []
    cursor = None
    while True:
        page = busy_controller.request("history", {"page_size": 1000, "cursor": cursor})
        ids += [e["id"] for e in page["items"]]
        if (cursor := page["next"]) is None:
            break
    assert ids == sorted(ids) and len(ids) == 3000
    nodes = busy_controller.request("nodes", {"page_size": 100})
    assert nodes["total"] == 375 and len(nodes["items"]) == 100 and nodes["next"] == "node00099"


def test_top_is_one_screen_with_totals_and_nodes_carry_their_own_rows(
        busy_controller: ControllerProcess, tmp_path: Path) -> None:
    top = busy_controller.request("top", {})
    assert len(top["replicas"]) == 200 and top["replicas_total"] == 3000
    assert busy_controller.request("top", {"limit": 7})["replicas"] == top["replicas"][:7]
    with pytest.raises(RequestFailed, match="limit must be between 1 and 1000"):
        busy_controller.request("top", {"limit": 10**6})
    # Every node of a page with its own GPUs and replicas, as the database has them.
    page = busy_controller.request("nodes", {"page_size": 100, "cursor": "node00200"})
    db = sqlite3.connect(tmp_path / "state" / "marduk.db")
    for node in page["items"]:
        assert [r["replica_id"] for r in busy_controller.request(
            "replicas", {"node": node["name"]})] == node["replicas"]
        assert len(node["replicas"]) == len(node["gpus"]) == 8 and "risk" in node
        assert [g["uuid"] for g in node["gpus"]] == [u for (u,) in db.execute(
            "SELECT uuid FROM gpus WHERE node=? ORDER BY idx", (node["name"],))]
    proc = run_cli("nodes", "--json", "--nats-url", busy_controller.url)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)) == 375
    assert [n["name"] for n in json.loads(proc.stdout)] == [f"node{i:05d}" for i in range(375)]
    proc = run_cli("nodes", "--json", "--limit", "5", "--nats-url", busy_controller.url)
    assert [n["name"] for n in json.loads(proc.stdout)] == [f"node{i:05d}" for i in range(5)]


def test_history_beyond_one_answer_is_the_newest_n_oldest_first(
        busy_controller: ControllerProcess, tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state" / "marduk.db")
    newest = [i for (i,) in db.execute("SELECT id FROM events ORDER BY id DESC LIMIT 2500")]
    proc = run_cli("history", "--limit", "2500", "--json", "--nats-url", busy_controller.url)
    assert proc.returncode == 0, proc.stderr
    assert [e["id"] for e in json.loads(proc.stdout)] == sorted(newest)
    # The window asked for first: the newest ten are after_id < id <= through_id.
    window = busy_controller.request("history", {"window": 10})
    assert window == {"after_id": sorted(newest)[-11], "through_id": newest[0]}
    assert busy_controller.request("history", {"window": 10**6})["after_id"] == 0
    for bad in (2**63, -1, 0, "1e3", "\n5", 1.5):
        with pytest.raises(RequestFailed, match=r"window|beyond int64|control character"):
            busy_controller.request("history", {"window": bad})
    proc = run_cli("history", "--limit", "1001", "--node", "node00007", "--nats-url",
                   busy_controller.url)
    assert proc.returncode == 0 and "node00007" in proc.stdout, proc.stderr


def test_a_page_too_large_for_one_message_comes_back_shorter(tmp_path: Path) -> None:
    _fill(tmp_path, replicas=300)
    store = Store(tmp_path / "marduk.db", read_only=True)
    seen: list[str] = []
    cursor = None
    while True:
        data, outcome = queries.answer(store, "replicas", {"page_size": 300, "cursor": cursor},
                                       {}, 50_000)
        assert outcome == "ok" and len(data) <= 50_000
        page = json.loads(data)["data"]
        assert 0 < len(page["items"]) < 300 and page["total"] == 300
        seen += [r["replica_id"] for r in page["items"]]
        if (cursor := page["next"]) is None:
            break
    assert len(seen) == len(set(seen)) == 300
    data, outcome = queries.answer(store, "replicas", {}, {}, 50_000)
    assert outcome == "too_large" and json.loads(data)["error_kind"] == "too_large"


def _query_processes(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_list_queries_survive_their_processes_being_killed(
        busy_controller: ControllerProcess) -> None:
    first = busy_controller.request("replicas", {"page_size": 10})
    assert busy_controller.proc is not None
    workers = _query_processes(busy_controller.proc.pid)
    assert workers  # the query lane is processes (started as needed), not controller threads
    for pid in workers:
        os.kill(pid, signal.SIGKILL)
    assert busy_controller.request("replicas", {"page_size": 10}) == first
    assert set(_query_processes(busy_controller.proc.pid)).isdisjoint(workers)


async def _flood(url: str, n: int, *, timeout_ms: int, requesters: int = 1) -> None:
    """Heavy history requests whose requesters stop waiting at once (nobody reads the
    inboxes): what thousands of interrupted CLI calls look like to the controller."""
    bus = Bus(url, name="flood")
    await bus.connect()
    request = m.encode(m.Request(args={"limit": 10000}, timeout_ms=timeout_ms))
    nc = bus.nc
    assert nc is not None
    for i in range(n):
        await nc.publish(subjects.rpc("history"), request,
                         reply=f"_INBOX.gone{i % requesters}.{i}")
    await bus.flush()
    await bus.close()


def test_requests_nobody_waits_for_are_dropped_and_others_still_get_answers(
        busy_controller: ControllerProcess) -> None:
    asyncio.run(_flood(busy_controller.url, 3000, timeout_ms=200))
    # Another operator asks right behind the flood, with the CLI's usual timeout.
    status = busy_controller.request("status", timeout_s=10.0)
    stats = status["requests"]
    assert stats["refused_busy"] + stats["expired"] > 0
    wait_for(lambda: busy_controller.request("status")["requests"]["waiting"] == 0,
             what="the queue drained")


def test_a_fault_is_decided_while_heavy_queries_are_served(
        busy_controller: ControllerProcess) -> None:
    url = busy_controller.url

    async def scenario() -> list[str]:
        flood = asyncio.create_task(_flood(url, 1500, timeout_ms=60_000, requesters=200))
        await asyncio.sleep(0.2)
        verdict = m.Verdict(node="node00001", gpu_uuid="GPU-00000008", action="drain_node",
                            reason="xid 79", xid=79, ts=time.time())
        await publish_durable(url, [(subjects.node_event("node00001", "verdict"),
                                     m.encode(verdict))])
        await flood
        return []

    asyncio.run(scenario())
    # Read the database itself: every request lane is busy with the flood by design.
    db = busy_controller.state_dir / "marduk.db"

    def drain_decided() -> list[str]:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return [r[0] for r in conn.execute(
                "SELECT node FROM events WHERE kind='drain_requested'")]
        finally:
            conn.close()

    assert wait_for(drain_decided, timeout_s=30, what="the drain decided") == ["node00001"]
    status = busy_controller.request("status", timeout_s=60)
    assert status["requests"]["served"] >= 1
