"""The controller against a real nats-server and a real SQLite file, driven through the bus
and the real `marduk` command line."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from harness import ControllerProcess, cli_json, publish_core, publish_durable, run_cli, wait_for


def register_msg(job: int, group: int, node: str, gpus: list[str]) -> tuple[str, bytes]:
    msg = m.ReplicaRegister(replica_id=f"job{job}_rg{group}:uuid-{group}", job_id=job,
                            step_id=group, replica_group=group, node=node, gpu_uuids=gpus,
                            hyperparams={"lr": 0.01, "batch_size": 32}, ts=time.time())
    return subjects.job_event(job, "replica_register"), m.encode(msg)


def step_start_msg(job: int, step: int, node: str, gpus: list[str]) -> tuple[str, bytes]:
    msg = m.StepStart(job_id=job, step_id=step, node=node, gpu_indices=[0],
                      gpu_uuids=gpus, pid=100, uid=1000, ts=time.time())
    return subjects.node_event(node, "step_start"), m.encode(msg)


def step_end_msg(job: int, step: int, node: str) -> tuple[str, bytes]:
    msg = m.StepEnd(job_id=job, step_id=step, node=node, exit_status=0, ts=time.time())
    return subjects.node_event(node, "step_end"), m.encode(msg)


def cli(ctl: ControllerProcess) -> list[str]:
    return ["--nats-url", ctl.url]


def test_register_then_step_end_removes_mapping_and_keeps_history(controller: ControllerProcess
                                                                 ) -> None:
    asyncio.run(publish_durable(controller.url, [
        step_start_msg(7, 0, "n1", ["GPU-a"]),
        register_msg(7, 0, "n1", ["GPU-a"]),
        step_start_msg(7, 1, "n2", ["GPU-b"]),
        register_msg(7, 1, "n2", ["GPU-b"]),
    ]))
    rows = wait_for(lambda: len(r := cli_json("replicas", *cli(controller))) == 2 and r,
                    what="two replicas in the mapping")
    by_group = {r["replica_group"]: r for r in rows}
    assert by_group[0]["node"] == "n1" and by_group[0]["gpu_uuids"] == ["GPU-a"]
    assert by_group[1]["node"] == "n2" and by_group[1]["job_id"] == 7

    asyncio.run(publish_durable(controller.url, [step_end_msg(7, 0, "n1")]))
    rows = wait_for(lambda: len(r := cli_json("replicas", *cli(controller))) == 1 and r,
                    what="the ended step's replica to leave the mapping")
    assert rows[0]["replica_group"] == 1
    history = cli_json("history", "--job", "7", *cli(controller))
    kinds = [e["kind"] for e in history]
    assert kinds.count("replica_register") == 2 and "step_end" in kinds
    ended = next(e for e in history if e["kind"] == "step_end")
    assert ended["evidence"]["replicas_removed"] == ["job7_rg0:uuid-0"]
    everyone = cli_json("replicas", "--all", *cli(controller))
    assert {r["state"] for r in everyone} == {"active", "left"}


MALFORMED = [
    b"", b"{", b"[]", b"null", b"42", b'"text"', b"\xff\xfe\x00",
    b'{"type":"no_such_type"}',
    b'{"type":"step_start"}',
    b'{"type":"step_start","job_id":-1,"step_id":0,"node":"n1"}',
    b'{"type":"step_start","job_id":1,"step_id":0,"node":"bad node"}',
    b'{"type":"step_start","job_id":1,"step_id":0,"node":"n1","extra":1}',
    b'{"type":"step_start","v":99,"job_id":1,"step_id":0,"node":"n1"}',
    b'{"type":"verdict","node":"n1","gpu_uuid":"G","action":"explode","reason":"x"}',
    b'{"type":"replica_register","replica_id":"r","job_id":"seven","replica_group":0,'
    b'"node":"n1"}',
    b'{"type":"heartbeat","replica_id":"r","job_id":1,"step":1}',
    b"[" * 5000,
]


def test_malformed_messages_are_rejected_counted_and_the_daemon_stays_up(
        controller: ControllerProcess) -> None:
    items = [(subjects.node_event("n1", "step_start"), data) for data in MALFORMED]
    # A valid message on a subject that names another node is refused too.
    items.append((subjects.node_event("n9", "step_start"), step_start_msg(1, 0, "n1", [])[1]))
    asyncio.run(publish_durable(controller.url, items))
    asyncio.run(publish_core(controller.url, [(subjects.heartbeat(1), b"{oops")] * 5))
    status = wait_for(lambda: (s := controller.request("status"))["rejected_total"]
                      >= len(items) and s, what="every malformed message counted")
    assert status["rejected_total"] == len(items)  # persisted: durable ones only
    by_cause: dict[str, int] = {}
    for row in status["rejections"]:
        by_cause[row["cause"]] = by_cause.get(row["cause"], 0) + row["count"]
    assert sum(by_cause.values()) == len(items) + 5
    assert by_cause["malformed_json"] >= 5
    assert by_cause["subject_mismatch"] == 1
    assert by_cause["unsupported_version"] == 1
    # Counted by subject class and kind, with the sender's node masked.
    heartbeat_rows = [r for r in status["rejections"] if r["subject"] == "hb.*"]
    assert heartbeat_rows == [{"subject": "hb.*", "kind": "heartbeat",
                               "cause": "malformed_json", "count": 5}]
    # ...and it still works.
    asyncio.run(publish_durable(controller.url, [register_msg(3, 0, "n1", ["GPU-z"])]))
    wait_for(lambda: cli_json("replicas", "--job", "3", *cli(controller)),
             what="a valid registration after the malformed ones")


def test_controller_sigkilled_while_events_flow_loses_nothing(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    ctl = ControllerProcess(tmp_path / "state", nats_server.url).start()
    total, kills = 600, 3

    async def produce() -> None:
        bus = Bus(nats_server.url, name="producer")
        await bus.connect()
        for i in range(total):
            node = f"n{i % 8}"
            msg = m.StepStart(job_id=1000 + i, step_id=0, node=node, ts=time.time())
            await bus.publish_durable(subjects.node_event(node, "step_start"), m.encode(msg))
            await asyncio.sleep(0.002)
        await bus.close()

    async def chaos() -> None:
        for _ in range(kills):
            await asyncio.sleep(0.4)
            ctl.kill()
            await asyncio.to_thread(ctl.start)

    async def both() -> None:
        await asyncio.gather(produce(), chaos())

    asyncio.run(both())
    status = wait_for(lambda: (s := ctl.request("status"))["events"] >= total and s,
                      timeout_s=30, what="every event recorded")
    assert ctl.stop() == 0
    store = Store(tmp_path / "state" / "marduk.db")
    recorded = store.conn.execute(
        "SELECT COUNT(DISTINCT job_id) FROM events WHERE kind='step_start'").fetchone()[0]
    duplicates = store.conn.execute(
        "SELECT COUNT(*) - COUNT(DISTINCT job_id) FROM events WHERE kind='step_start'"
    ).fetchone()[0]
    steps = store.conn.execute("SELECT COUNT(*) FROM job_steps").fetchone()[0]
    assert (recorded, duplicates, steps) == (total, 0, total)
    assert status["events"] == total
    assert store.integrity_check() == "ok"


def test_nats_restart_under_a_running_controller(controller: ControllerProcess,
                                                 nats_server: NatsServerProcess) -> None:
    asyncio.run(publish_durable(controller.url, [register_msg(11, 0, "n1", ["GPU-1"])]))
    wait_for(lambda: cli_json("replicas", *cli(controller)), what="first registration")
    nats_server.restart()
    controller.wait_ready(30)  # answers again once it has reconnected
    # Events published after the restart still arrive, through the same durable consumer.
    asyncio.run(publish_durable(controller.url, [register_msg(11, 1, "n2", ["GPU-2"])]))
    rows = wait_for(lambda: len(r := cli_json("replicas", *cli(controller))) == 2 and r,
                    timeout_s=30, what="registration after the NATS restart")
    assert {r["node"] for r in rows} == {"n1", "n2"}
    assert controller.request("status")["nats"] == "connected"


def test_heartbeats_are_written_behind(controller: ControllerProcess) -> None:
    asyncio.run(publish_durable(controller.url, [register_msg(5, 0, "n1", ["GPU-h"])]))
    wait_for(lambda: cli_json("replicas", *cli(controller)), what="registration")
    beats = [(subjects.heartbeat(5), m.encode(m.Heartbeat(
        replica_id="job5_rg0:uuid-0", job_id=5, step=step, step_time_ms=12.5,
        allreduce_ms=3.0, participants=2, ts=time.time()))) for step in range(1, 101)]
    asyncio.run(publish_core(controller.url, beats))
    row = wait_for(lambda: (r := cli_json("replicas", *cli(controller))[0])["last_step"] == 100
                   and r, what="the last heartbeat persisted")
    assert row["step_time_ms"] == 12.5 and row["participants"] == 2


def test_gpu_verdict_tells_replicas_to_leave_and_queues_a_drain(
        controller: ControllerProcess) -> None:
    asyncio.run(publish_durable(controller.url, [
        register_msg(21, 0, "n2", ["GPU-bad"]), register_msg(21, 1, "n2", ["GPU-good"]),
        register_msg(21, 2, "n3", ["GPU-other"])]))
    wait_for(lambda: len(cli_json("replicas", *cli(controller))) == 3, what="3 replicas")

    async def listen_and_fault() -> list[m.ReplicaCommand]:
        bus = Bus(controller.url, name="replicas")
        await bus.connect()
        got: list[m.ReplicaCommand] = []

        async def on_cmd(msg) -> None:  # type: ignore[no-untyped-def]
            got.append(m.decode_command(msg.data))  # type: ignore[arg-type]

        await bus.subscribe("marduk.v1.cmd.replica.21.*", on_cmd)
        verdict = m.Verdict(node="n2", gpu_uuid="GPU-bad", gpu_index=0, action="drain_node",
                            reason="xid 79: GPU has fallen off the bus", xid=79,
                            ts=time.time())
        await bus.publish_durable(subjects.node_event("n2", "verdict"), m.encode(verdict))
        for _ in range(200):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.05)
        await bus.close()
        return got

    commands = asyncio.run(listen_and_fault())
    by_replica = {c.replica_id: c for c in commands}
    assert set(by_replica) == {"job21_rg0:uuid-0", "job21_rg1:uuid-1"}
    assert by_replica["job21_rg0:uuid-0"].immediate is True  # on the failed GPU
    assert by_replica["job21_rg1:uuid-1"].immediate is False  # same node: at a step boundary
    history = cli_json("history", "--node", "n2", *cli(controller))
    drain = [e for e in history if e["kind"] == "drain_requested"]
    assert len(drain) == 1
    assert drain[0]["reason"].startswith("marduk: xid=79 gpu=GPU-bad event=")
    # No Slurm here (backend none): the drain waits in the outbox, visibly.
    assert controller.request("status")["outbox_pending"] == 1


def test_cli_errors_are_clear(controller: ControllerProcess) -> None:
    proc = run_cli("drain", "n1", *cli(controller))
    assert proc.returncode == 2 and "reason is required" in proc.stderr
    proc = run_cli("drain", "nosuchnode", "reason=test", *cli(controller))
    assert proc.returncode == 1 and "unknown node" in proc.stderr
    proc = run_cli("drain", "n[1-", "reason=test", *cli(controller))
    assert proc.returncode == 2
    proc = run_cli("status", "--nats-url", "nats://127.0.0.1:1")
    assert proc.returncode == 3 and "cannot reach the controller" in proc.stderr


@pytest.mark.parametrize("verb", ["status", "replicas", "nodes", "history"])
def test_read_commands_print_tables(controller: ControllerProcess, verb: str) -> None:
    proc = run_cli(verb, *cli(controller))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_answers_from_sqlite_while_nats_is_down(controller: ControllerProcess,
                                                nats_server: NatsServerProcess) -> None:
    import json
    import urllib.request

    asyncio.run(publish_durable(controller.url, [register_msg(31, 0, "n1", ["GPU-q"])]))
    wait_for(lambda: cli_json("replicas", *cli(controller)), what="registration")
    base = wait_for(lambda: (controller.state_dir / "http.url").exists()
                    and (controller.state_dir / "http.url").read_text().strip(), what="http")
    nats_server.stop()

    def get(path: str) -> object:
        with urllib.request.urlopen(base + path, timeout=5) as resp:
            return json.load(resp)

    status = wait_for(lambda: (s := get("/api/status"))["nats"] != "connected" and s,
                      what="the controller to notice NATS is gone")
    assert status["replicas_active"] == 1
    rows = get("/api/replicas")["items"]
    assert isinstance(rows, list) and rows[0]["gpu_uuids"] == ["GPU-q"]
    nats_server.start()
    controller.wait_ready(30)
    assert controller.request("status")["nats"] == "connected"


def test_a_crashed_step_makes_its_groups_other_ranks_leave(controller: ControllerProcess
                                                           ) -> None:
    """Replica group 0 of job 30 has a rank on n1 and one on n2; its step on n1 dies of
    SIGKILL (exit 137): the rank on n2 is told to leave now; group 1 is not touched."""
    ranks = []
    for rank, (node, group) in enumerate((("n1", 0), ("n2", 0), ("n2", 1))):
        msg = m.ReplicaRegister(replica_id=f"job30_rg{group}:r{rank}", job_id=30,
                                step_id=rank, replica_group=group, group_rank=rank,
                                group_world_size=2, node=node, ts=time.time())
        ranks.append((subjects.job_event(30, "replica_register"), m.encode(msg)))
    starts = [step_start_msg(30, step, node, []) for step, node in ((0, "n1"), (1, "n2"),
                                                                     (2, "n2"))]
    asyncio.run(publish_durable(controller.url, starts + ranks))
    wait_for(lambda: len(controller.request("replicas", {"job": 30})) == 3, what="3 ranks")
    crash = m.StepEnd(job_id=30, step_id=0, node="n1", exit_status=137, ts=time.time())
    asyncio.run(publish_durable(controller.url, [
        (subjects.node_event("n1", "step_end"), m.encode(crash))]))
    leaves = wait_for(lambda: controller.request("history", {"kinds": ["leave_requested"]}),
                      what="the other rank told to leave")
    assert [(e["replica_id"], e["evidence"]["immediate"]) for e in leaves] == [
        ("job30_rg0:r1", True)]
    states = {r["replica_id"]: r["state"]
              for r in controller.request("replicas", {"job": 30, "all": True})}
    assert states == {"job30_rg0:r0": "left", "job30_rg0:r1": "leaving",
                      "job30_rg1:r2": "active"}


def test_without_slurm_the_reconcile_never_ends_a_reported_step(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    """With no Slurm backend there is no list of steps to compare with: an empty answer must
    not read as "every step is gone" once the grace period is over."""
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, reconcile_s=0.2,
                            extra_env={"MARDUK_CONTROLLER_STEP_GRACE_S": "0.5"}).start()
    try:
        asyncio.run(publish_durable(ctl.url, [step_start_msg(40, 0, "n1", ["GPU-z"]),
                                              register_msg(40, 0, "n1", ["GPU-z"])]))
        wait_for(lambda: ctl.request("replicas", {"job": 40}), what="the replica registered")
        wait_for(lambda: ctl.request("status")["counters"].get("reconciles", 0) >= 10,
                 what="reconciles well past the grace period")
        assert [r["state"] for r in ctl.request("replicas", {"job": 40, "all": True})] == [
            "active"]
        assert ctl.request("history", {"kinds": ["step_gone"]}) == []
    finally:
        assert ctl.stop() == 0
