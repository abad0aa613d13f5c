"""A standby controller without shared storage: the lease, the takeover, the fencing.

Every controller ingests the events stream into its own database; the one that holds the
lease (a key of a JetStream key-value bucket, its revision the fencing token) acts. These
tests use a real nats-server, real controller processes with their own state directories,
and a stand-in for Slurm's commands (tests/fake_slurm.py) that logs every `scontrol update`
with the calling controller's pid, so that drains are counted across both controllers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.lease import LeaseLost, LeaseStore
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.controller.leadership import Leadership, NotLeader
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.errors import BusError, BusTimeout

from fakes import fake_slurm
from harness import ControllerProcess, cli_json, publish_durable, run_cli, wait_for

LEASE_S = 2.0


# -- the lease itself, in one process -------------------------------------------------------


def test_the_lease_is_held_by_one_and_a_lapsed_leader_is_refused(
        nats_server: NatsServerProcess) -> None:
    async def scenario() -> dict[str, Any]:
        buses = [Bus(nats_server.url, name=f"ctl-{k}") for k in range(2)]
        for bus in buses:
            await bus.connect()
        try:
            a, b = (Leadership(LeaseStore(bus, ttl_s=LEASE_S), f"ctl-{k}", lease_s=LEASE_S)
                    for k, bus in enumerate(buses))
            for one in (a, b):
                assert await one.lease.open() == LEASE_S
            await a.acquire()
            first = a.token
            holding = asyncio.create_task(a.hold())
            # While a renews, b waits: longer than the lease, so renewals are what keep it.
            waiting = asyncio.create_task(b.acquire())
            await asyncio.sleep(LEASE_S * 2)
            assert not waiting.done() and b.role == "standby"
            assert b.holder["id"] == "ctl-0" and a.token > first
            await a.check("drain n1")  # a current leader passes
            # a stops renewing (a process stopped, a network cut): the server lets it lapse.
            holding.cancel()
            stopped = time.monotonic()
            await waiting
            lapse_s = time.monotonic() - stopped
            assert b.role == "leader" and b.token > a.token
            refused = []
            try:
                await a.check("drain n1")
            except NotLeader as exc:
                refused.append(str(exc))
            with pytest.raises(LeaseLost):
                await a.lease.renew(b"late", a.token)
            # A clean stop releases the lease at once, for the next one.
            c = Leadership(LeaseStore(buses[0], ttl_s=LEASE_S), "ctl-c", lease_s=LEASE_S)
            await c.lease.open()
            taking = asyncio.create_task(c.acquire())
            await asyncio.sleep(0.3)
            assert not taking.done()
            released = time.monotonic()
            await b.release()
            await taking
            return {"lapse_s": lapse_s, "refused": refused, "a": a.view(),
                    "handover_s": time.monotonic() - released, "c": c.view()}
        finally:
            for bus in buses:
                await bus.close()

    result = asyncio.run(scenario())
    print(f"lease lapse seen by the standby after {result['lapse_s']:.2f} s "
          f"(lease {LEASE_S} s); released lease taken in {result['handover_s']:.2f} s")
    assert len(result["refused"]) == 1 and "not the leader" in result["refused"][0]
    assert result["a"]["stale_leader_refusals"] == 1 and result["a"]["role"] == "lost"
    assert result["c"]["role"] == "leader" and result["c"]["leader"]["id"] == "ctl-c"


def test_a_controller_restarted_in_place_takes_its_dead_runs_lease_at_once(
        nats_server: NatsServerProcess) -> None:
    import subprocess

    from marduk_slurm.controller.leadership import holder_value

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: the previous run of this controller

    async def scenario() -> list[tuple[str, int, int]]:
        bus = Bus(nats_server.url, name="ctl")
        await bus.connect()
        try:
            outcomes = []
            # The holder's process: gone (taken at once), alive (this test's parent: waited
            # out), or another controller's id (waited out).
            for holder_id, pid in (("ctl-a", gone.pid), ("ctl-a", os.getppid()),
                                   ("ctl-z", gone.pid)):
                lease = LeaseStore(bus, ttl_s=LEASE_S)
                await lease.open()
                value = json.loads(holder_value(holder_id, time.time()))
                previous = await lease.create(json.dumps({**value, "pid": pid}).encode())
                me = Leadership(lease, "ctl-a", lease_s=LEASE_S)
                taking = asyncio.create_task(me.acquire())
                await asyncio.sleep(LEASE_S / 2)
                outcome = "taken" if taking.done() else "waiting"
                await taking  # (the lease lapses meanwhile when it is waited out)
                outcomes.append((outcome, me.stats["lease_taken_from_own_dead_run"],
                                 int(me.token > previous)))
                await me.release()
            return outcomes
        finally:
            await bus.close()

    assert asyncio.run(scenario()) == [("taken", 1, 1), ("waiting", 0, 1), ("waiting", 0, 1)]


# -- two controller processes ---------------------------------------------------------------

PUBLISHERS = 4
NODES_PER_PUBLISHER = 10
GPUS_PER_NODE = 4
DRAIN_GPU = 2  # this GPU's verdict drains its node; the others' are "none"
TOTAL = PUBLISHERS * NODES_PER_PUBLISHER * GPUS_PER_NODE
STORM_NODES = [f"c{p}n{k:02d}" for p in range(PUBLISHERS) for k in range(NODES_PER_PUBLISHER)]
# Long enough that the leader dies in its middle: one round of verdicts per period.
ROUND_S = 0.06


def verdict(node: str, index: int, drain: bool) -> tuple[str, bytes, str]:
    uuid = f"GPU-{node}-{index}"
    msg = m.Verdict(node=node, gpu_uuid=uuid, gpu_index=index,
                    action=GpuAction.DRAIN_NODE if drain else GpuAction.NONE,
                    reason=f"storm {node}/{index}: " + ("xid 79" if drain else "healthy"),
                    xid=79 if drain else None, source="agent", ts=time.time())
    return subjects.node_event(node, "verdict"), m.encode(msg), f"{node}.verdict.{uuid}"


def storm_rounds() -> list[list[tuple[str, bytes, str]]]:
    """Round k holds the k-th verdict of every publisher (one node's GPUs after another)."""
    per_publisher = [[verdict(f"c{p}n{k:02d}", i, i == DRAIN_GPU)
                      for k in range(NODES_PER_PUBLISHER) for i in range(GPUS_PER_NODE)]
                     for p in range(PUBLISHERS)]
    return [list(items) for items in zip(*per_publisher, strict=True)]


class Site:
    """A nats-server, the fake Slurm, and controllers started on them."""

    def __init__(self, tmp_path: Path, url: str, nodes: list[str]) -> None:
        self.tmp_path = tmp_path
        self.url = url
        self.slurm_dir = tmp_path / "slurm"
        self.env = fake_slurm.install(tmp_path / "bin", self.slurm_dir, nodes)
        self.env |= {"MARDUK_CONTROLLER_LEASE_S": str(LEASE_S),
                     "MARDUK_CONTROLLER_OUTBOX_RETRY_MAX_S": "1"}

    def controller(self, name: str, *, standby: bool) -> ControllerProcess:
        args = ("--standby", "--id", name) if standby else ("--id", name)
        return ControllerProcess(self.tmp_path / name, self.url, slurm_backend="commands",
                                 extra_env={**self.env, "MARDUK_FAKE_SLURM_CALLER": name},
                                 extra_args=args)

    def drain_calls(self) -> list[dict[str, Any]]:
        return [c for c in fake_slurm.calls(self.slurm_dir) if c["state"] == "DRAIN"]

    def leader(self) -> str:
        """The id of the controller that answers requests now ("" when none does)."""
        try:
            status = asyncio.run(_status(self.url))
        except (BusError, BusTimeout):
            return ""
        return str(status.get("controller", {}).get("id", ""))


async def _status(url: str) -> dict[str, Any]:
    from marduk_slurm.cli.client import call
    result: dict[str, Any] = await call(url, "status", {}, timeout_s=0.25)
    return result


def _exists(db: Path) -> bool:
    return db.exists()


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [tuple(row) for row in conn.execute(sql, args)]
    finally:
        conn.close()


async def consumer_idle(url: str, durable: str, timeout_s: float = 60.0) -> None:
    """Until the consumer has nothing left to deliver and nothing unacknowledged."""
    bus = Bus(url, name="probe")
    await bus.connect()
    try:
        deadline = time.monotonic() + timeout_s
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            info = json.loads(await bus.request(
                f"$JS.API.CONSUMER.INFO.{subjects.EVENTS_STREAM}.{durable}", b"", 2.0))
            if info.get("num_pending") == 0 and info.get("num_ack_pending") == 0:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"consumer {durable} still has a backlog: {info}")
    finally:
        await bus.close()


async def storm_with_kill(url: str, site: Site, leader: ControllerProcess, standby_db: Path
                          ) -> dict[str, Any]:
    """Publish the storm; SIGKILL the leader once it has drained a few nodes in Slurm and
    the standby has settled at least one from the leader's report."""
    bus = Bus(url, name="agents")
    await bus.connect()
    confirmed: list[str] = []
    at_kill: dict[str, Any] = {}
    assert leader.proc is not None
    pid = leader.proc.pid

    async def killer() -> None:
        while (sum(c["caller"] == "ctl-a" for c in site.drain_calls()) < 2
               or not _exists(standby_db) or not rows(
                   standby_db, "SELECT 1 FROM events WHERE kind='leader_applied'")):
            await asyncio.sleep(0.02)
        at_kill["confirmed"] = len(confirmed)
        os.kill(pid, signal.SIGKILL)
        at_kill["t"] = time.monotonic()

    killing = asyncio.create_task(killer())
    try:
        for batch in storm_rounds():
            for subject, data, msg_id in batch:
                await bus.publish_durable(subject, data, msg_id=msg_id)
                confirmed.append(msg_id)
            await asyncio.sleep(ROUND_S)
        try:
            await asyncio.wait_for(killing, 30)
        except TimeoutError:
            raise AssertionError("the standby never settled a drain from the leader's reports "
                                 f"(drains: {site.drain_calls()})") from None
    finally:
        killing.cancel()
        await bus.close()
    return {**at_kill, "confirmed_total": len(confirmed)}


def test_standby_takes_over_when_the_leader_is_killed_in_a_fault_storm(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    site = Site(tmp_path, nats_server.url, STORM_NODES)
    a = site.controller("ctl-a", standby=False).start()
    b = site.controller("ctl-b", standby=True).start(standby=True)
    try:
        b.wait_log("controller ctl-a on", 10)  # the standby names who leads
        assert site.leader() == "ctl-a"
        # The leader names its standby, and how far behind it is.
        standbys = wait_for(lambda: a.request("status")["controller"]["standbys"], 10,
                            what="the standby announcing itself")
        assert [(s["id"], s["consumer"], s["behind"]) for s in standbys] == [
            ("ctl-b", "marduk-controller-ctl-b", 0)]
        assert a.proc is not None
        result = asyncio.run(storm_with_kill(nats_server.url, site, a,
                                             tmp_path / "ctl-b" / "marduk.db"))
        # Until the standby answers as the leader (it answers only once it acts).
        wait_for(lambda: site.leader() == "ctl-b", 30, interval_s=0.02,
                 what="the standby taking over")
        takeover_s = time.monotonic() - result["t"]
        print(f"takeover (SIGKILL to the standby answering as leader): {takeover_s:.2f} s, "
              f"lease {LEASE_S} s; leader killed after {result['confirmed']} of {TOTAL} "
              f"verdicts")
        asyncio.run(consumer_idle(nats_server.url, "marduk-controller-ctl-b"))
        wait_for(lambda: b.request("status")["outbox_pending"] == 0, 30,
                 what="the new leader's outbox empty")
        status = cli_json("status", "--nats-url", nats_server.url)
        assert status["controller"]["role"] == "leader"
        assert status["controller"]["leader"]["id"] == "ctl-b"
        assert status["controller"]["lease_revision"] > 0
        text = run_cli("status", "--nats-url", nats_server.url).stdout
        assert "leader ctl-b on " in text and "role of this controller: leader" in text
        assert "standby controllers: none" in text  # the old leader is dead
    finally:
        assert b.stop() == 0, b.log()
    assert 0 < result["confirmed"] < TOTAL == result["confirmed_total"]

    # 0 events lost, 0 duplicates: every verdict once in the new leader's history.
    db_b = tmp_path / "ctl-b" / "marduk.db"
    seen = Counter(r[0] for r in rows(db_b, "SELECT reason FROM events WHERE kind='gpu_verdict'"))
    sent = Counter(m.decode_durable(data).reason
                   for batch in storm_rounds() for _, data, _ in batch)
    assert seen == sent
    # Every drain verdict's node drained in Slurm exactly once, by one controller or the other.
    calls = site.drain_calls()
    per_node = Counter(node for c in calls for node in c["nodes"])
    assert per_node == {node: 1 for node in STORM_NODES}
    by = Counter(c["caller"] for c in calls for _ in c["nodes"])
    assert by["ctl-a"] > 0 and by["ctl-b"] > 0 and sum(by.values()) == len(STORM_NODES), by
    # The new leader settled each node's drain once: carried it out, or learned from the old
    # leader's report that it was done, or found it done in Slurm (a report lost in the kill).
    settled = Counter(node for (node,) in rows(
        db_b, "SELECT node FROM events WHERE kind IN ('drained', 'leader_applied', "
        "'drain_skipped')"))
    assert settled == {node: 1 for node in STORM_NODES}
    reported = rows(db_b, "SELECT count(*) FROM events WHERE kind='leader_applied'")[0][0]
    skipped = rows(db_b, "SELECT count(*) FROM events WHERE kind='drain_skipped'")[0][0]
    print(f"drains: {by['ctl-a']} by the old leader ({reported} settled on the standby by "
          f"its reports, {skipped} found drained in Slurm), {by['ctl-b']} by the new leader")
    assert reported > 0
    assert rows(db_b, "SELECT count(*) FROM outbox WHERE state='pending'") == [(0,)]


def test_a_stopped_leader_does_not_act_when_it_resumes_and_waits_as_standby(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    site = Site(tmp_path, nats_server.url, ["x1", "x2"])
    a = site.controller("ctl-a", standby=False).start()
    b = site.controller("ctl-b", standby=True).start(standby=True)
    assert a.proc is not None and b.proc is not None
    try:
        os.kill(a.proc.pid, signal.SIGSTOP)  # a leader that hangs (or a network cut)
        wait_for(lambda: site.leader() == "ctl-b", 30, what="the standby taking over")
        subject, data, _ = verdict("x1", 0, True)
        asyncio.run(publish_durable(nats_server.url, [(subject, data)]))
        wait_for(lambda: site.drain_calls(), 30, what="the new leader draining x1")
        os.kill(a.proc.pid, signal.SIGCONT)
        # It finds its lease gone and stops acting at once, without acting on what it
        # ingests now, and waits as a standby of the new leader.
        a.wait_log("stops acting: leadership lost", 30)
        a.wait_log("controller ctl-b on", 30)
        assert [(c["caller"], c["nodes"]) for c in site.drain_calls()] == [("ctl-b", ["x1"])]
        assert site.leader() == "ctl-b"
        # Once it leads again (the new leader stops), it does not drain x1 again: its copy
        # of that drain was settled by the leader's report, or (had the report come before
        # the verdict, as when a fetched batch is delivered again after the ack wait) found
        # drained in Slurm.
        assert b.stop() == 0, b.log()
        wait_for(lambda: site.leader() == "ctl-a", 30, what="the old leader leading again")
        asyncio.run(consumer_idle(nats_server.url, "marduk-controller-ctl-a"))
        wait_for(lambda: a.request("status")["outbox_pending"] == 0, 30,
                 what="its outbox empty")
    finally:
        if a.proc is not None and a.proc.poll() is None:
            os.kill(a.proc.pid, signal.SIGCONT)
        assert a.stop() == 0, a.log()
        assert b.stop() == 0, b.log()
    assert "leadership lost" in a.log()
    db_a = tmp_path / "ctl-a" / "marduk.db"
    records = [json.loads(e) for (e,) in rows(
        db_a, "SELECT evidence FROM events WHERE kind='leader_applied' AND node='x1'")]
    assert [(r["controller"], r["outcome"]) for r in records] == [("ctl-b", "done")]
    skipped = rows(db_a, "SELECT count(*) FROM events WHERE kind='drain_skipped' AND "
                         "node='x1'")[0][0]
    assert (records[0]["outbox_id"] is not None) + skipped == 1
    assert rows(db_a, "SELECT count(*) FROM events WHERE kind='drained'") == [(0,)]
    assert len(site.drain_calls()) == 1


def test_a_replica_refuses_commands_of_an_older_controller_term() -> None:
    from types import SimpleNamespace

    from marduk_slurm.runtime.client import ReplicaLink

    got: list[Any] = []
    link = ReplicaLink(Bus("nats://127.0.0.1:1", name="t"), 7, 0, "job7_rg0:u1", got.append)

    def leave(fence: int | None) -> Any:
        cmd = m.ReplicaCommand(replica_id="job7_rg0:u1", job_id=7, action="leave",
                               reason="drain", fence=fence, ts=time.time())
        return SimpleNamespace(subject=subjects.replica_commands(7, 0), data=m.encode(cmd))

    for fence in (5, 9, 5, None, 9, 8, 12):
        asyncio.run(link._on_message(leave(fence)))
    assert [c.fence for c in got] == [5, 9, None, 9, 12]
    assert link.stale_commands == 2 and link.fence == 12


# -- a rolling upgrade: a job trains through a handover ---------------------------------------

JOB = 77
TRAINER_NODE = "n1"
TRAINER_ID = f"job{JOB}_rg0:uuid-0"


class Trainer:
    """A training replica without torch: a step every STEP_S, a heartbeat per step, config
    revisions applied at their step and acknowledged, a leave command obeyed."""

    STEP_S = 0.05

    def __init__(self, url: str) -> None:
        from datetime import timedelta

        from marduk_slurm.runtime.client import MardukClient

        self.client = MardukClient(url, JOB, 0, connect_timeout=timedelta(seconds=2))
        self.step = 0
        self.revision = 0
        self.applied: list[tuple[int, int]] = []  # (revision, step)
        self.commands: list[Any] = []
        self.pending: list[m.JobCommand] = []
        self.left = False
        self.stop = False
        import threading
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Trainer:
        self.client.start(TRAINER_ID, lambda: m.ReplicaRegister(
            replica_id=TRAINER_ID, job_id=JOB, replica_group=0, node=TRAINER_NODE,
            gpu_uuids=[f"GPU-{TRAINER_NODE}-0"], hyperparams={"lr": 0.1}, step=self.step,
            config_revision=self.revision, ts=time.time()))
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop and not self.left:
            time.sleep(self.STEP_S)
            self.step += 1
            for cmd in self.client.poll_commands():
                self.commands.append(cmd)
                if isinstance(cmd, m.JobCommand):
                    self.pending.append(cmd)
                elif cmd.action == "leave":
                    self.client.send_leave(cmd.reason, 75, self.step)
                    self.left = True
            for cmd in [c for c in self.pending if c.apply_at_step <= self.step]:
                self.pending.remove(cmd)
                if cmd.revision > self.revision:
                    self.revision = cmd.revision
                    self.applied.append((cmd.revision, self.step))
                    self.client.send_ack(cmd.revision, self.step)
            self.client.send_heartbeat(m.Heartbeat(
                replica_id=TRAINER_ID, job_id=JOB, step=self.step, step_time_ms=50.0,
                config_revision=self.revision, ts=time.time()))

    def close(self) -> None:
        from datetime import timedelta

        self.stop = True
        self.thread.join(5)
        self.client.flush(timedelta(seconds=5))
        self.client.close()


async def paced_verdicts(url: str, items: list[tuple[str, bytes, str]], period_s: float
                         ) -> None:
    bus = Bus(url, name="agents")
    await bus.connect()
    try:
        for subject, data, msg_id in items:
            await bus.publish_durable(subject, data, msg_id=msg_id)
            await asyncio.sleep(period_s)
    finally:
        await bus.close()


def test_rolling_upgrade_hands_over_while_a_job_trains(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    """docs/operations.md, "Upgrading without downtime": start a standby (the new version),
    let it catch up, stop the old leader (it releases its lease), the standby leads."""
    import threading

    nodes = [TRAINER_NODE] + [f"u{k}" for k in range(8)]
    site = Site(tmp_path, nats_server.url, nodes)
    url = nats_server.url
    a = site.controller("ctl-a", standby=False).start()
    trainer = Trainer(url).start()
    try:
        wait_for(lambda: a.request("replicas", {"job": JOB}), 30, what="the replica registered")
        first = cli_json("config", "set", str(JOB), "lr=0.01", "--nats-url", url)
        assert first["revision"] == 1
        # The new version starts as a standby and catches up (here: the same version).
        b = site.controller("ctl-b", standby=True).start(standby=True)
        db_b = tmp_path / "ctl-b" / "marduk.db"
        wait_for(lambda: rows(db_b, "SELECT revision FROM config_revisions") == [(1,)], 30,
                 what="the standby knowing revision 1")
        # Faults keep coming through the handover.
        storm = [verdict(node, i, i == 0) for node in nodes[1:] for i in range(2)]
        publishing = threading.Thread(target=lambda: asyncio.run(
            paced_verdicts(url, storm, 0.05)))
        publishing.start()
        time.sleep(0.3)
        step_at_stop = trainer.step
        stopped = time.monotonic()
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)  # systemctl stop marduk: it releases its lease
        wait_for(lambda: site.leader() == "ctl-b", 30, interval_s=0.02,
                 what="the standby leading")
        handover_s = time.monotonic() - stopped
        assert a.proc.wait(20) == 0, a.log()
        assert "lease released" in a.log()
        publishing.join(30)
        # The new leader numbers the next revision after the old leader's.
        second = cli_json("config", "set", str(JOB), "lr=0.02", "--nats-url", url)
        assert second["revision"] == 2
        wait_for(lambda: [r for r, _ in trainer.applied] == [1, 2], 30,
                 what="the trainer applying revision 2")
        # A fault under the trainer after the handover: the new leader drains its node and
        # tells it to leave.
        asyncio.run(publish_durable(url, [verdict(TRAINER_NODE, 0, True)[:2]]))
        wait_for(lambda: trainer.left, 30, what="the trainer told to leave")
        asyncio.run(consumer_idle(url, "marduk-controller-ctl-b"))
        wait_for(lambda: b.request("status")["outbox_pending"] == 0, 30,
                 what="the new leader's outbox empty")
        term_b = b.request("status")["controller"]["term"]
        print(f"handover (SIGTERM to the standby answering as leader): {handover_s:.2f} s "
              f"(lease {LEASE_S} s); trainer at step {step_at_stop} then, {trainer.step} at "
              f"the end")
    finally:
        trainer.close()
        assert b.stop() == 0, b.log()
    # Every verdict once in the new leader's history; every faulty node drained once.
    sent = Counter(m.decode_durable(data).reason for _, data, _ in storm)
    sent[m.decode_durable(verdict(TRAINER_NODE, 0, True)[1]).reason] += 1
    seen = Counter(r[0] for r in rows(db_b, "SELECT reason FROM events "
                                            "WHERE kind='gpu_verdict'"))
    assert seen == sent
    assert Counter(n for c in site.drain_calls() for n in c["nodes"]) == {n: 1 for n in nodes}
    # One leave decision for the trainer, its commands all from the new leader's term.
    assert rows(db_b, "SELECT count(*) FROM events WHERE kind='leave_requested' "
                      "AND replica_id=?", TRAINER_ID) == [(1,)]
    leaves = [c for c in trainer.commands if isinstance(c, m.ReplicaCommand)]
    assert leaves and {c.fence for c in leaves} == {term_b}
    assert trainer.client.link is not None and trainer.client.link.stale_commands == 0
    assert [r for r, _ in trainer.applied] == [1, 2]


# -- the records a leader sends its standbys, at the edge and applied ------------------------


def applied(**fields: Any) -> bytes:
    record = {"type": "action_applied", "v": 1, "controller": "ctl-a", "fence": 3,
              "kind": "drain", "node": "n1", "outcome": "done", "reason": "xid 79", **fields}
    return json.dumps(record).encode()


@pytest.mark.parametrize(("fields", "reason"), [
    ({"fence": -1}, "out_of_range"),
    ({"fence": 2**63}, "out_of_range"),
    ({"node": "-n1"}, "bad_format"),
    ({"controller": "a.b"}, "bad_format"),
    ({"kind": "reboot"}, "invalid_field"),
    ({"outcome": "maybe"}, "invalid_field"),
    ({"reason": "x\nDrained by root"}, "bad_format"),
    ({"reason": "x" * 10_000}, "too_large"),
    ({"extra": 1}, "unknown_field"),
])
def test_action_records_out_of_bounds_are_refused(fields: dict[str, Any], reason: str) -> None:
    from marduk_slurm.errors import ProtocolError

    with pytest.raises(ProtocolError) as refused:
        m.decode_durable(applied(**fields))
    assert refused.value.reason == reason


def test_a_record_must_come_from_the_controller_its_subject_names() -> None:
    from marduk_slurm.controller.ingest import check_subject
    from marduk_slurm.errors import ProtocolError

    msg = m.decode_durable(applied())
    check_subject(subjects.controller_event("ctl-a", "action_applied"), msg)
    for subject in (subjects.controller_event("ctl-b", "action_applied"),
                    subjects.node_event("n1", "action_applied"),
                    subjects.controller_event("ctl-a", "config_revised")):
        with pytest.raises(ProtocolError) as refused:
            check_subject(subject, msg)
        assert refused.value.reason == "subject_mismatch"
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(20):
        inner["k"] = {}
        inner = inner["k"]
    revised = {"type": "config_revised", "controller": "ctl-a", "fence": 1, "job_id": 7,
               "revision": 1, "apply_at_step": 5, "changes": deep}
    with pytest.raises(ProtocolError):
        m.decode_durable(json.dumps(revised).encode())


def test_a_standby_settles_its_copy_once_and_ignores_its_own_records() -> None:
    from marduk_slurm.adapters.store import Store
    from marduk_slurm.controller.replication import Replication

    store = Store(":memory:")
    store.migrate()
    now = time.time()
    with store.transaction():
        drain = store.enqueue_slurm_action("drain", "n1", "xid 79", None, now)
        resume = store.enqueue_slurm_action("resume", "n2", "", None, now)
    standby = Replication("ctl-b")
    done = m.decode_durable(applied())
    assert isinstance(done, m.ActionApplied)
    with store.transaction():
        assert standby.on_applied(store, done, now) is not None
        standby.on_applied(store, done, now)  # again (a replay): nothing pending is touched
    assert [(a["id"], a["state"]) for a in store.latest_actions("drain")] == [(drain, "done")]
    assert store.pending_action("resume", "n2") is not None  # another kind and node
    own = m.decode_durable(applied(controller="ctl-b", node="n2", kind="resume"))
    assert isinstance(own, m.ActionApplied)
    with store.transaction():
        assert standby.on_applied(store, own, now) is None
    assert store.pending_action("resume", "n2")["id"] == resume
    older = m.decode_durable(applied(fence=2, node="n3"))
    assert isinstance(older, m.ActionApplied)
    with store.transaction():
        standby.on_applied(store, older, now)
    assert standby.stats["applied_records_stale"] == 1


# -- a clumsy operator ----------------------------------------------------------------------


def test_a_second_controller_on_the_same_consumer_refuses_to_start(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    """Two primaries without an id share the consumer `marduk-controller`: each would get
    part of the events. The second one says so and exits 2 (it does not lead either)."""
    first = ControllerProcess(tmp_path / "a", nats_server.url).start()
    try:
        second = ControllerProcess(tmp_path / "b", nats_server.url)
        with pytest.raises(RuntimeError, match="controller exited 2"):
            second.start(standby=True)
        assert "is in use by another running controller" in second.log()
        assert first.request("status")["controller"]["role"] == "leader"
        # With an id of its own it starts, as a standby of the first.
        third = ControllerProcess(tmp_path / "c", nats_server.url,
                                  extra_args=("--id", "other")).start(standby=True)
        assert third.stop() == 0, third.log()
    finally:
        assert first.stop() == 0, first.log()


@pytest.mark.parametrize(("env", "error"), [
    ({"MARDUK_CONTROLLER_ID": "a.b"}, "controller.id"),
    ({"MARDUK_CONTROLLER_ID": "-x"}, "controller.id"),
    ({"MARDUK_CONTROLLER_ID": "x" * 65}, "controller.id"),
    ({"MARDUK_CONTROLLER_ID": "a\nb"}, "controller.id"),
    ({"MARDUK_CONTROLLER_LEASE_S": "0"}, "controller.lease_s"),
    ({"MARDUK_CONTROLLER_LEASE_S": "nan"}, "controller.lease_s"),
    ({"MARDUK_CONTROLLER_LEASE_S": "1e9"}, "controller.lease_s"),
    ({"MARDUK_CONTROLLER_STANDBY": "true"}, "needs nats.url"),
])
def test_leadership_settings_out_of_bounds_are_refused(env: dict[str, str], error: str
                                                       ) -> None:
    from marduk_slurm import settings
    from marduk_slurm.errors import SettingsError

    with pytest.raises(SettingsError, match=error):
        settings.load(None, env=env)
