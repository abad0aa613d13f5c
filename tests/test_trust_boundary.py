"""The trust boundary, one regression test per way a single message used to stop the
controller or act beyond its sender. Real nats-server, real controller process, real SQLite."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from harness import ControllerProcess, publish_core, publish_durable, wait_for

VERDICT = {"type": "verdict", "node": "n1", "gpu_uuid": "GPU-a", "action": "drain_node",
           "reason": "xid 79"}


def raw(subject: str, body: dict[str, Any]) -> tuple[str, bytes]:
    return subject, json.dumps(body).encode()


def register(job: int, replica_id: str, node: str, gpus: list[str], group: int = 0
             ) -> tuple[str, bytes]:
    msg = m.ReplicaRegister(replica_id=replica_id, job_id=job, replica_group=group, node=node,
                            gpu_uuids=gpus, ts=time.time())
    return subjects.job_event(job, "replica_register"), m.encode(msg)


def inventory(node: str, uuids: list[str]) -> tuple[str, bytes]:
    msg = m.GpuInventory(node=node, gpus=[m.GpuDescriptor(uuid=u, index=i)
                                          for i, u in enumerate(uuids)], simulated=True)
    return subjects.node_event(node, "gpu_inventory"), m.encode(msg)


def causes(ctl: ControllerProcess) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in ctl.request("status")["rejections"]:
        out[row["cause"]] = out.get(row["cause"], 0) + row["count"]
    return out


def replica(ctl: ControllerProcess, replica_id: str) -> dict[str, Any]:
    rows = ctl.request("replicas", {"all": True})
    return next(r for r in rows if r["replica_id"] == replica_id)


def db_values(state_dir: Path, sql: str) -> list[Any]:
    conn = sqlite3.connect(f"file:{state_dir / 'marduk.db'}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute(sql)]
    finally:
        conn.close()


def test_integers_beyond_int64_are_rejected_and_never_crash_a_task(
        controller: ControllerProcess) -> None:
    huge = 2**63
    beats = [raw(subjects.heartbeat(5), {"type": "heartbeat", "replica_id": "r", "job_id": 5,
                                         "step": huge})] * 50
    asyncio.run(publish_core(controller.url, beats))
    durable = [raw(subjects.node_event("n1", "verdict"), {**VERDICT, "xid": huge}),
               raw(subjects.node_event("n1", "step_end"),
                   {"type": "step_end", "job_id": 1, "step_id": 0, "node": "n1",
                    "exit_status": huge})]
    asyncio.run(publish_durable(controller.url, durable))
    wait_for(lambda: causes(controller).get("out_of_range", 0) >= 52,
             what="every oversized integer counted")
    status = controller.request("status")
    assert status["counters"].get("heartbeat_flush_failures", 0) == 0
    assert controller.proc is not None and controller.proc.poll() is None
    assert "crashed" not in controller.log()


def test_verdict_evidence_of_the_wrong_shape_is_rejected(controller: ControllerProcess) -> None:
    asyncio.run(publish_durable(controller.url, [
        raw(subjects.node_event("n1", "verdict"), {**VERDICT, "evidence": {"ecc": [1]}}),
        raw(subjects.node_event("n1", "verdict"), {**VERDICT, "evidence": {"xids": ["79"]}}),
    ]))
    wait_for(lambda: causes(controller).get("invalid_evidence", 0) == 2,
             what="both verdicts rejected for their evidence")
    assert controller.request("history", {"kinds": ["gpu_verdict"]}) == []


def test_deeply_nested_evidence_is_rejected_not_a_crash_loop(
        controller: ControllerProcess) -> None:
    body = json.dumps(VERDICT)[:-1] + ', "evidence": ' + '{"a": ' * 1000 + "1" + "}" * 1000
    shallow_but_deep = {**VERDICT, "evidence": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {
        "h": {"i": 1}}}}}}}}}}
    asyncio.run(publish_durable(controller.url, [
        (subjects.node_event("n1", "verdict"), (body + "}").encode()),
        raw(subjects.node_event("n1", "verdict"), shallow_but_deep),
    ]))
    wait_for(lambda: sum(causes(controller).values()) == 2, what="both rejected")
    assert causes(controller).get("too_deep") == 1
    assert "crashed" not in controller.log()


def test_control_characters_in_reasons_are_rejected_at_the_edge(
        controller: ControllerProcess) -> None:
    asyncio.run(publish_durable(controller.url, [
        raw(subjects.node_event("n1", "verdict"), {**VERDICT, "reason": "x\x1b[2J"}),
        raw(subjects.node_event("n1", "verdict"), {**VERDICT, "reason": "a\nforged row"}),
    ]))
    wait_for(lambda: causes(controller).get("bad_format", 0) == 2, what="both rejected")
    texts = db_values(controller.state_dir, "SELECT reason FROM events")
    assert not any("\x1b" in t or "\n" in t for t in texts)


def test_replica_id_of_another_job_cannot_be_taken_over_or_made_to_leave(
        controller: ControllerProcess) -> None:
    victim = "job4343_rg1:uuid-1"
    asyncio.run(publish_durable(controller.url, [
        inventory("n1", ["GPU-a"]), register(4343, victim, "n1", ["GPU-a"], group=1)]))
    wait_for(lambda: controller.request("replicas", {"job": 4343}), what="victim registered")
    leave = m.ReplicaLeave(replica_id=victim, job_id=4242, reason="bye")
    asyncio.run(publish_durable(controller.url, [
        register(4242, victim, "n2", ["GPU-z"]),
        (subjects.job_event(4242, "replica_leave"), m.encode(leave)),
    ]))
    wait_for(lambda: causes(controller).get("identity_conflict", 0) == 2,
             what="both cross-job messages refused")
    row = replica(controller, victim)
    assert (row["job_id"], row["node"], row["state"], row["gpu_uuids"]) == (
        4343, "n1", "active", ["GPU-a"])
    kinds = [e["kind"] for e in controller.request("history", {"kinds": ["identity_rejected"]})]
    assert kinds == ["identity_rejected", "identity_rejected"]
    # A heartbeat of job 4242 naming the victim does not touch its row either.
    beat = m.Heartbeat(replica_id=victim, job_id=4242, step=999, ts=time.time())
    asyncio.run(publish_core(controller.url, [(subjects.heartbeat(4242), m.encode(beat))]))
    time.sleep(0.5)
    assert replica(controller, victim)["last_step"] == 0


def test_replica_on_a_node_where_its_job_has_no_step_is_refused(
        controller: ControllerProcess) -> None:
    start = m.StepStart(job_id=77, step_id=0, node="n1", gpu_uuids=["GPU-a"], ts=time.time())
    asyncio.run(publish_durable(controller.url, [
        (subjects.node_event("n1", "step_start"), m.encode(start)),
        register(77, "job77:ok", "n1", ["GPU-a"]),
        register(77, "job77:elsewhere", "n3", []),
    ]))
    wait_for(lambda: causes(controller).get("node_not_in_job") == 1, timeout_s=20,
             what="the replica on n3 refused after its retries")
    assert [r["replica_id"] for r in controller.request("replicas", {"job": 77})] == ["job77:ok"]


def test_gpu_of_one_node_cannot_be_claimed_or_failed_by_another(
        controller: ControllerProcess) -> None:
    asyncio.run(publish_durable(controller.url, [
        inventory("n1", ["GPU-a"]), register(10, "job10:r0", "n1", ["GPU-a"])]))
    wait_for(lambda: controller.request("replicas", {"job": 10}), what="replica on n1")
    verdict = {**VERDICT, "node": "n2"}
    asyncio.run(publish_durable(controller.url, [
        inventory("n2", ["GPU-a", "GPU-b"]),
        raw(subjects.node_event("n2", "verdict"), verdict),
    ]))
    wait_for(lambda: causes(controller).get("identity_conflict", 0) == 2,
             what="the claim and the verdict refused")
    gpus = {g: n for g, n in zip(db_values(controller.state_dir, "SELECT uuid FROM gpus ORDER "
                                           "BY uuid"),
                                 db_values(controller.state_dir, "SELECT node FROM gpus ORDER "
                                           "BY uuid"), strict=True)}
    assert gpus == {"GPU-a": "n1", "GPU-b": "n2"}
    assert replica(controller, "job10:r0")["state"] == "active"
    conflicts = controller.request("history", {"kinds": ["gpu_identity_conflict"]})
    assert [(e["node"], e["gpu_uuid"]) for e in conflicts] == [("n2", "GPU-a")]
    # An operator releases the GPU; then the next report binds it anew.
    controller.request("gpu_release", {"uuid": "GPU-a"})
    asyncio.run(publish_durable(controller.url, [inventory("n2", ["GPU-a"])]))
    wait_for(lambda: db_values(controller.state_dir,
                               "SELECT node FROM gpus WHERE uuid='GPU-a'") == ["n2"],
             what="GPU-a bound to n2 after the release")


async def _collect_leaves(url: str, subject: str, seconds: float,
                          then: list[tuple[str, bytes]] | None = None) -> list[m.ReplicaCommand]:
    bus = Bus(url, name="test-replica")
    await bus.connect()
    got: list[m.ReplicaCommand] = []

    async def on_msg(msg: Any) -> None:
        cmd = m.decode_command(msg.data)
        if isinstance(cmd, m.ReplicaCommand):
            got.append(cmd)

    await bus.subscribe(subject, on_msg)
    try:
        if then:
            await bus.ensure_events_stream()
            for s, data in then:
                await bus.publish_durable(s, data)
        await asyncio.sleep(seconds)
    finally:
        await bus.close()
    return got


def test_leave_command_is_resent_until_the_replica_confirms(
        controller: ControllerProcess) -> None:
    rid = "job20:r0"
    asyncio.run(publish_durable(controller.url, [
        inventory("n1", ["GPU-a"]), register(20, rid, "n1", ["GPU-a"])]))
    wait_for(lambda: controller.request("replicas", {"job": 20}), what="replica registered")
    # The verdict's first leave command goes out while nobody listens (a replica reconnecting).
    asyncio.run(publish_durable(controller.url, [
        raw(subjects.node_event("n1", "verdict"), VERDICT)]))
    wait_for(lambda: replica(controller, rid)["state"] == "leaving", what="leave decided")
    cmds = asyncio.run(_collect_leaves(controller.url, subjects.replica_commands(20, 0), 3.0))
    assert cmds and all(c.replica_id == rid and c.action == "leave" for c in cmds)
    # Re-registering does not undo the leave: still leaving, and told again at once.
    cmds = asyncio.run(_collect_leaves(controller.url, subjects.replica_commands(20, 0), 0.5,
                                       then=[register(20, rid, "n1", ["GPU-a"])]))
    assert cmds and replica(controller, rid)["state"] == "leaving"
    # Once it confirms, the reminders stop.
    leave = m.ReplicaLeave(replica_id=rid, job_id=20, reason="told to leave", exit_code=75)
    asyncio.run(publish_durable(controller.url, [
        (subjects.job_event(20, "replica_leave"), m.encode(leave))]))
    wait_for(lambda: replica(controller, rid)["state"] == "left", what="replica left")
    cmds = asyncio.run(_collect_leaves(controller.url, subjects.replica_commands(20, 0), 3.0))
    assert cmds == []


def _poison_events(state_dir: Path) -> None:
    """A database-level refusal of one particular event: the kind of failure validation
    cannot foresee (a constraint, a bug), raised for that message alone."""
    store = Store(state_dir / "marduk.db")
    store.migrate()
    store.conn.execute(
        "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.reason LIKE '%poison%' "
        "BEGIN SELECT RAISE(ABORT, 'poisoned row'); END")
    store.close()


def test_a_message_that_keeps_failing_is_dead_lettered_and_its_batch_commits(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    state = tmp_path / "state"
    _poison_events(state)
    ctl = ControllerProcess(state, nats_server.url).start()
    try:
        asyncio.run(publish_durable(ctl.url, [
            inventory("n1", ["GPU-a"]),
            raw(subjects.node_event("n1", "verdict"), {**VERDICT, "reason": "poison"}),
            inventory("n2", ["GPU-b"]),
        ]))
        wait_for(lambda: ctl.request("status")["dead_letters"] == 1, timeout_s=20,
                 what="the poison message dead-lettered")
        assert sorted(db_values(state, "SELECT node FROM gpus")) == ["n1", "n2"]
        letters = ctl.request("deadletters")
        assert len(letters) == 1 and letters[0]["deliveries"] == 3
        assert "poisoned row" in letters[0]["error"] and "poison" in letters[0]["data_preview"]
        ctl.stop()
        # Terminated in JetStream: a restart does not see it again, and stays up.
        ctl.start()
        time.sleep(3)
        assert ctl.proc is not None and ctl.proc.poll() is None
        assert ctl.request("status")["dead_letters"] == 1
        assert ctl.request("status")["counters"].get("ingest_message_failures", 0) == 0
    finally:
        ctl.stop()


@pytest.mark.parametrize("step", [2**63, 2**53 + 1])
def test_heartbeat_flood_with_out_of_range_step_leaves_the_daemon_up(
        controller: ControllerProcess, step: int) -> None:
    beats = [raw(subjects.heartbeat(3), {"type": "heartbeat", "replica_id": "r", "job_id": 3,
                                         "step": step})] * 20
    for _ in range(5):
        asyncio.run(publish_core(controller.url, beats))
        time.sleep(0.1)
    wait_for(lambda: causes(controller).get("out_of_range", 0) >= 100, what="all counted")
    assert controller.proc is not None and controller.proc.poll() is None


def test_a_drill_answered_twice_is_acted_on_once(controller: ControllerProcess) -> None:
    """The controller's own fallback verdict and a late agent verdict carry the same inject
    request id: both recorded, one drain."""
    evidence = {"inject_request_id": "inj-" + "a" * 32, "xids": [79]}
    asyncio.run(publish_durable(controller.url, [
        inventory("n1", ["GPU-a"]),
        raw(subjects.node_event("n1", "verdict"), {**VERDICT, "evidence": evidence}),
        raw(subjects.node_event("n1", "verdict"), {**VERDICT, "evidence": evidence,
                                                   "source": "controller"}),
    ]))
    verdicts = wait_for(lambda: len(v := controller.request(
        "history", {"kinds": ["gpu_verdict"]})) == 2 and v, what="both verdicts recorded")
    assert [bool(v["evidence"].get("inject_repeat")) for v in verdicts] == [False, True]
    drains = controller.request("history", {"kinds": ["drain_requested"]})
    assert len(drains) == 1
