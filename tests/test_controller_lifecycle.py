"""The controller's life: embedded NATS, SIGHUP reloads, supervised tasks, reconciliation."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.supervisor import Supervisor

from harness import ControllerProcess, cli_json, publish_durable, run_cli, wait_for
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401


def test_embedded_nats_needs_nothing_but_a_state_dir(tmp_path: Path) -> None:
    ctl = ControllerProcess(tmp_path / "state", "").start()
    url_file = tmp_path / "state" / "nats.url"
    assert url_file.read_text().startswith("nats://127.0.0.1:")
    status = cli_json("status", "--state-dir", str(tmp_path / "state"))
    assert status["nats"] == "connected" and status["slurm_backend"] == "none"
    nats_pids = [p for p in os.listdir("/proc") if p.isdigit()
                 and "nats-server" in (cmd := _cmdline(p)) and str(tmp_path) in cmd]
    assert len(nats_pids) == 1
    assert ctl.stop() == 0
    assert not url_file.exists()
    assert not Path(f"/proc/{nats_pids[0]}").exists(), "the embedded nats-server outlived it"
    proc = run_cli("status", "--state-dir", str(tmp_path / "state"))
    assert proc.returncode == 3 and "nats.url not found" in proc.stderr


def _cmdline(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _replicas_on_n2(url: str) -> None:
    items = []
    for group, gpu in ((0, "GPU-bad"), (1, "GPU-ok")):
        msg = m.ReplicaRegister(replica_id=f"job3_rg{group}:x", job_id=3, replica_group=group,
                                node="n2", gpu_uuids=[gpu], ts=time.time())
        items.append((subjects.job_event(3, "replica_register"), m.encode(msg)))
    asyncio.run(publish_durable(url, items))


async def _fault_and_count_leaves(url: str) -> int:
    bus = Bus(url, name="t")
    await bus.connect()
    got: list[bytes] = []

    async def on_cmd(msg) -> None:  # type: ignore[no-untyped-def]
        got.append(msg.data)

    await bus.subscribe("marduk.v1.cmd.replica.3.*", on_cmd)
    verdict = m.Verdict(node="n2", gpu_uuid="GPU-bad", action="drain_node", reason="xid 79",
                        xid=79, ts=time.time())
    await bus.publish_durable(subjects.node_event("n2", "verdict"), m.encode(verdict))
    await asyncio.sleep(1.5)
    await bus.close()
    # Leave commands are re-sent until confirmed: count the replicas told, not the messages.
    return len({m.decode_command(data).replica_id for data in got})


def test_sighup_reloads_settings_and_refuses_a_bad_file(tmp_path: Path,
                                                        nats_server: NatsServerProcess) -> None:
    config = tmp_path / "marduk.toml"
    config.write_text("[controller]\nleave_on_drain = true\n")
    ctl = ControllerProcess(tmp_path / "state", nats_server.url,
                            extra_args=("--config", str(config))).start()
    try:
        config.write_text("[controller]\nleave_on_drain = false\n")
        assert ctl.proc is not None
        ctl.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "changed: controller.leave_on_drain" in ctl.log(), what="reload")
        _replicas_on_n2(ctl.url)
        wait_for(lambda: len(cli_json("replicas", "--nats-url", ctl.url)) == 2,
                 what="two replicas")
        # With leave_on_drain off, only the replica on the failed GPU is told to leave.
        assert asyncio.run(_fault_and_count_leaves(ctl.url)) == 1
        config.write_text("[controller]\nleave_on_drian = true\n")
        ctl.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload refused" in ctl.log(), what="the bad file refused")
        assert "unknown key controller.leave_on_drian" in ctl.log()
        assert ctl.request("status")["nats"] == "connected"
    finally:
        assert ctl.stop() == 0


async def test_supervisor_restarts_a_crashed_task_and_gives_up_on_a_crash_loop() -> None:
    sup = Supervisor(max_restarts=3, window_s=60, backoff_max_s=0.01)
    runs = {"flaky": 0, "broken": 0}

    async def flaky() -> None:
        runs["flaky"] += 1
        if runs["flaky"] < 3:
            raise RuntimeError("transient")

    async def broken() -> None:
        runs["broken"] += 1
        raise RuntimeError("always")

    sup.start("flaky", flaky)
    await asyncio.sleep(1.0)
    assert runs["flaky"] == 3 and sup.crashes["flaky"] == 2 and not sup.fatal.is_set()
    sup.start("broken", broken)
    await asyncio.wait_for(sup.fatal.wait(), 10)
    assert runs["broken"] == 4 and "broken crashed 4 times" in sup.fatal_reason
    await sup.stop()


@pytest.mark.slurm
def test_reconcile_removes_steps_slurm_no_longer_runs(
        tmp_path: Path, nats_server: NatsServerProcess,
        slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    env = {"MARDUK_SLURM_CONF": slurm_cluster.slurm_conf,
           "MARDUK_CONTROLLER_STEP_GRACE_S": "0.5"}
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env=env, reconcile_s=0.5).start()
    try:
        # A step whose end report was lost: Slurm has never heard of job 999999.
        start = m.StepStart(job_id=999999, step_id=0, node="n1", gpu_uuids=["GPU-s"])
        reg = m.ReplicaRegister(replica_id="job999999_rg0:x", job_id=999999, step_id=0,
                                replica_group=0, node="n1", gpu_uuids=["GPU-s"])
        asyncio.run(publish_durable(ctl.url, [
            (subjects.node_event("n1", "step_start"), m.encode(start)),
            (subjects.job_event(999999, "replica_register"), m.encode(reg))]))
        gone = wait_for(lambda: [e for e in cli_json("history", "--job", "999999", "--nats-url",
                                                     ctl.url) if e["kind"] == "step_gone"],
                        what="the stale step reconciled away")
        assert gone[0]["evidence"]["replicas_removed"] == ["job999999_rg0:x"]
        assert cli_json("replicas", "--job", "999999", "--nats-url", ctl.url) == []
    finally:
        assert ctl.stop() == 0
