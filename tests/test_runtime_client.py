"""The runtime client without torch: registration, config revisions and acks through a real
controller, and a training loop that keeps its pace while NATS is down."""

from __future__ import annotations

import statistics
import time
from datetime import timedelta

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.errors import BusError
from marduk_slurm.runtime.client import MardukClient

from harness import ControllerProcess, cli_json, wait_for

JOB = 31


def make_client(url: str, group: int, step: list[int], buffer: int = 1024) -> MardukClient:
    client = MardukClient(url, JOB, group, heartbeat_buffer=buffer)
    replica_id = f"job{JOB}_rg{group}:uuid-{group}"

    def register() -> m.ReplicaRegister:
        return m.ReplicaRegister(replica_id=replica_id, job_id=JOB, replica_group=group,
                                 node=f"n{group}", gpu_uuids=[f"cpu:n{group}:0"],
                                 hyperparams={"lr": 0.1}, step=step[0], ts=time.time())
    client.start(replica_id, register)
    return client


def heartbeat(group: int, step: int) -> m.Heartbeat:
    return m.Heartbeat(replica_id=f"job{JOB}_rg{group}:uuid-{group}", job_id=JOB, step=step,
                       step_time_ms=50.0, participants=1, ts=time.time())


def test_register_revision_ack_and_latest_for_a_late_joiner(controller: ControllerProcess
                                                           ) -> None:
    client = make_client(controller.url, 0, [10])
    try:
        assert client.wait_first_config(timedelta(seconds=10))
        rows = wait_for(lambda: controller.request("replicas", {"job": JOB}), 10,
                        what="the replica registered")
        assert rows[0]["gpu_uuids"] == ["cpu:n0:0"] and rows[0]["node"] == "n0"
        client.send_heartbeat(heartbeat(0, 10))
        wait_for(lambda: controller.request("replicas", {"job": JOB})[0]["last_step"] == 10, 10,
                 what="the heartbeat written")

        reply = controller.request("config_set", {"job": JOB, "changes": {"lr": 0.5}})
        assert reply["revision"] == 1 and reply["apply_at_step"] >= 12
        cmds = wait_for(client.poll_commands, 10, what="the job command")
        assert isinstance(cmds[0], m.JobCommand) and cmds[0].changes == {"lr": 0.5}
        client.send_ack(1, cmds[0].apply_at_step)
        shown = wait_for(lambda: (d := controller.request("config_show", {"job": JOB}))
                         ["revisions"][0]["acked"] == 1 and d, 10, what="the ack")
        assert shown["replicas"][0]["config_revision"] == 1 and shown["replicas"][0]["current"]

        controller.request("config_set", {"job": JOB, "changes": {"max_steps": 500}})
        late = make_client(controller.url, 1, [0])
        try:
            assert late.wait_first_config(timedelta(seconds=10))
            latest = [c for c in late.poll_commands() if isinstance(c, m.JobCommand)]
            assert latest[0].revision == 2
            assert latest[0].changes == {"lr": 0.5, "max_steps": 500}
        finally:
            late.close()
    finally:
        client.close()


def paced_loop(client: MardukClient, steps: int, step_s: float, first: int) -> list[float]:
    """A stand-in training loop: fixed work per step, telemetry as ManagerMarduk sends it."""
    costs = []
    for step in range(first, first + steps):
        deadline = time.perf_counter() + step_s
        t0 = time.perf_counter()
        client.send_heartbeat(heartbeat(0, step))
        client.poll_commands()
        costs.append(time.perf_counter() - t0)
        while time.perf_counter() < deadline:
            pass
    return costs


def test_training_keeps_its_pace_with_nats_stopped(controller: ControllerProcess,
                                                   nats_server: NatsServerProcess) -> None:
    client = make_client(controller.url, 0, [0], buffer=64)
    try:
        assert client.wait_first_config(timedelta(seconds=10))
        t0 = time.perf_counter()
        up = paced_loop(client, 100, 0.005, 0)
        up_s = time.perf_counter() - t0
        nats_server.stop()
        wait_for(lambda: not client.connected, 10, what="the client to notice")
        t0 = time.perf_counter()
        down = paced_loop(client, 100, 0.005, 100)
        down_s = time.perf_counter() - t0
        assert down_s < up_s * 1.25, (up_s, down_s)
        assert max(down) < 0.005 and statistics.median(down) < 0.0005, down
        assert statistics.median(up) < 0.0005
        assert client.stats["heartbeats_dropped"] >= 36  # 100 beats into a buffer of 64

        registered_before = client.stats["durable_sent"]
        nats_server.start()
        wait_for(lambda: client.stats["durable_sent"] > registered_before, 20,
                 what="a re-registration after the reconnect")
        assert client.stats["reconnects"] >= 1
        # Heartbeats are at most once (core NATS): the buffered ones reach the controller only
        # if it is back on the server before the client flushes them. Training goes on, and
        # its next beats must arrive whichever of the two reconnected first.
        wait_for(lambda: _controller_connected(controller), 20, what="the controller back on NATS")
        paced_loop(client, 20, 0.005, 200)
        wait_for(lambda: cli_json("replicas", "--nats-url", controller.url)
                 and cli_json("replicas", "--nats-url", controller.url)[0]["last_step"] >= 150,
                 20, 0.2, "heartbeats delivered after the outage")
    finally:
        client.close()


def _controller_connected(controller: ControllerProcess) -> bool:
    """True once the controller answers on NATS again; "nobody answers" is not yet, not an error."""
    try:
        return controller.request("status")["nats"] == "connected"
    except BusError:
        return False


def told_to_leave(controller: ControllerProcess, grace: timedelta, exits: list[int],
                  heartbeat_step: int | None = None) -> MardukClient:
    """A registered replica on n0 with `grace` to leave (its exits recorded, not made), and
    a GPU fault on n0 that sends it away. The GPU is one the controller has no inventory of
    (no agent spoke): injected with force, as drills do."""
    client = MardukClient(controller.url, JOB, 0, leave_grace=grace, exit_process=exits.append)
    replica_id = f"job{JOB}_rg0:uuid-0"
    client.start(replica_id, lambda: m.ReplicaRegister(
        replica_id=replica_id, job_id=JOB, replica_group=0, node="n0",
        gpu_uuids=["cpu:n0:0"], step=7, ts=time.time()))
    wait_for(lambda: controller.request("replicas", {"job": JOB}), 10,
             what="the replica registered")
    if heartbeat_step is not None:
        client.send_heartbeat(heartbeat(0, heartbeat_step))
    controller.request("inject", {"node": "n0", "gpu": "cpu:n0:0", "xid": 79, "force": True})
    return client


def test_a_replica_stuck_in_a_step_when_told_to_leave_leaves_after_its_grace(
        controller: ControllerProcess) -> None:
    # The training thread never reaches a boundary (it never polls); the leave command from a
    # drain must still end the process, with the leave reported.
    exits: list[int] = []
    client = told_to_leave(controller, timedelta(seconds=0.5), exits, heartbeat_step=7)
    try:
        wait_for(lambda: exits, 15, what="the overdue leave's exit")
        assert exits == [75] and client.stats["leave_overdue"] == 1
        left = wait_for(lambda: [e for e in controller.request("history", {"job": JOB})
                                 if e["kind"] == "replica_leave"], 10, what="the leave reported")
        assert "stuck in a step" in left[0]["reason"], left
        assert left[0]["evidence"]["exit_code"] == 75 and left[0]["evidence"]["step"] == 7
    finally:
        client.close()


def test_a_replica_that_reported_its_leave_but_hangs_on_its_way_out_is_ended(
        controller: ControllerProcess) -> None:
    # It reached its boundary and reported the leave (as ManagerMarduk does, then closes the
    # client), but the process does not end: at exit it waits for a thread stuck in a call.
    exits: list[int] = []
    client = told_to_leave(controller, timedelta(seconds=1), exits)
    try:
        cmds = wait_for(client.poll_commands, 10, what="the leave command")
        assert cmds[0].action == "leave"  # type: ignore[union-attr]
        client.send_leave("told to leave", 75, 7)
        assert client.flush(timedelta(seconds=5))
        client.close()
        assert exits == []  # within the grace: nothing yet
        wait_for(lambda: exits, 10, what="the exit of a process stuck on its way out")
        assert exits == [75] and client.stats["leave_overdue"] == 1
        left = [e for e in controller.request("history", {"job": JOB})
                if e["kind"] == "replica_leave"]
        assert [e["reason"] for e in left] == ["told to leave"]  # reported once, as it was
    finally:
        client.close()
