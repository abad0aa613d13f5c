"""The controller with the Slurm-commands backend against the real local Slurm cluster."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.cli.client import RequestFailed
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from harness import ControllerProcess, cli_json, publish_durable, run_cli, wait_for
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slurm


def scontrol(conf: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SLURM_CONF": conf})


def node_info(conf: str, node: str) -> dict[str, str]:
    out = scontrol(conf, "show", "-o", "node", node).stdout
    fields = {}
    for part in out.replace("Reason=", "\nReason=").split():
        key, _, value = part.partition("=")
        fields[key] = value
    state = out.split("State=", 1)[1].split()[0]
    reason = out.split("Reason=", 1)[1].rsplit(" [", 1)[0] if "Reason=" in out else ""
    return {"state": state, "reason": reason, "raw": out}


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:  # noqa: F811
    yield slurm_cluster
    # Leave every node in service for the next test, whoever drained it.
    subprocess.run(["bash", str(slurm_cluster.script), "up"], capture_output=True, timeout=120)
    scontrol(slurm_cluster.slurm_conf, "update", "nodename=n[1-4]", "state=resume")


@pytest.fixture
def slurm_controller(tmp_path: Path, nats_server: NatsServerProcess,
                     cluster: SlurmCluster) -> Iterator[ControllerProcess]:
    env = {"MARDUK_SLURM_CONF": cluster.slurm_conf, "MARDUK_SLURM_COMMAND_TIMEOUT_S": "3"}
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env=env).start()
    yield ctl
    assert ctl.stop() == 0, ctl.log()


def verdict(node: str, gpu: str, xid: int = 79) -> tuple[str, bytes]:
    msg = m.Verdict(node=node, gpu_uuid=gpu, gpu_index=0, action="drain_node",
                    reason=f"xid {xid}", xid=xid, ts=time.time())
    return subjects.node_event(node, "verdict"), m.encode(msg)


def test_gpu_fault_drains_the_node_in_slurm_once(slurm_controller: ControllerProcess,
                                                 cluster: SlurmCluster) -> None:
    conf = cluster.slurm_conf
    asyncio.run(publish_durable(slurm_controller.url, [verdict("n2", "GPU-n2-0")] * 3))
    info = wait_for(lambda: "DRAIN" in (i := node_info(conf, "n2"))["state"] and i,
                    what="n2 drained in Slurm")
    assert info["reason"].startswith("marduk: xid=79 gpu=GPU-n2-0 event=")
    history = cli_json("history", "--node", "n2", "--nats-url", slurm_controller.url)
    kinds = [e["kind"] for e in history]
    assert kinds.count("gpu_verdict") == 3
    assert kinds.count("drained") == 1  # repeated faults: one drain
    nodes = {n["name"]: n for n in cli_json("nodes", "--nats-url", slurm_controller.url)}
    assert nodes["n2"]["drained_by_marduk"] is True
    proc = run_cli("resume", "n2", "--nats-url", slurm_controller.url)
    assert proc.returncode == 0 and "n2: resume done" in proc.stdout, proc.stderr
    wait_for(lambda: "DRAIN" not in node_info(conf, "n2")["state"], what="n2 resumed")


def test_operator_drain_hostlist_and_admin_drains_are_left_alone(
        slurm_controller: ControllerProcess, cluster: SlurmCluster) -> None:
    conf, url = cluster.slurm_conf, slurm_controller.url
    proc = run_cli("drain", "n[3-4]", 'reason=swap GPU', "--nats-url", url)
    assert proc.returncode == 0, proc.stderr
    assert "n3: drain done" in proc.stdout and "n4: drain done" in proc.stdout
    assert node_info(conf, "n3")["reason"].startswith("marduk: swap GPU event=")
    # An administrator drains n1 by hand: marduk records it and will not undo it.
    assert scontrol(conf, "update", "nodename=n1", "state=drain", "reason=bad fan"
                    ).returncode == 0
    proc = run_cli("resume", "n1", "--nats-url", url)
    assert proc.returncode == 1
    assert "not by marduk" in proc.stderr and "bad fan" in proc.stderr
    assert "DRAIN" in node_info(conf, "n1")["state"]
    nodes = {n["name"]: n for n in cli_json("nodes", "--nats-url", url)}
    assert nodes["n1"]["drained_by_marduk"] is False and nodes["n1"]["reason"] == "bad fan"
    proc = run_cli("resume", "n1", "--force", "--nats-url", url)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("resume", "n[3-4]", "--nats-url", url)
    assert proc.returncode == 0, proc.stderr


def _slurmctld_pid(cluster: SlurmCluster) -> int:
    return int((cluster.base / "run" / "slurmctld.pid").read_text())


def test_drain_while_slurmctld_is_down_is_applied_when_it_returns(
        slurm_controller: ControllerProcess, cluster: SlurmCluster) -> None:
    conf = cluster.slurm_conf
    os.kill(_slurmctld_pid(cluster), signal.SIGTERM)
    wait_for(lambda: scontrol(conf, "ping").returncode != 0, what="slurmctld down")
    asyncio.run(publish_durable(slurm_controller.url, [verdict("n3", "GPU-n3-1", xid=48)]))
    wait_for(lambda: slurm_controller.request("status")["outbox_pending"] == 1,
             what="the drain queued in the outbox")
    wait_for(lambda: slurm_controller.request("status")["counters"].get("slurm_retries"),
             timeout_s=30, what="a failed attempt, to be retried")
    subprocess.run(["bash", str(cluster.script), "up"], capture_output=True, timeout=120,
                   check=True)
    info = wait_for(lambda: "DRAIN" in (i := node_info(conf, "n3"))["state"] and i,
                    timeout_s=60, what="the queued drain applied after slurmctld returned")
    assert info["reason"].startswith("marduk: xid=48 gpu=GPU-n3-1")
    assert slurm_controller.request("status")["outbox_pending"] == 0


def test_controller_restart_keeps_pending_drains(tmp_path: Path, nats_server: NatsServerProcess,
                                                 cluster: SlurmCluster) -> None:
    conf = cluster.slurm_conf
    env = {"MARDUK_SLURM_CONF": conf, "MARDUK_SLURM_COMMAND_TIMEOUT_S": "3"}
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env=env).start()
    os.kill(_slurmctld_pid(cluster), signal.SIGTERM)
    wait_for(lambda: scontrol(conf, "ping").returncode != 0, what="slurmctld down")
    asyncio.run(publish_durable(ctl.url, [verdict("n4", "GPU-n4-0")]))
    wait_for(lambda: ctl.request("status")["outbox_pending"] == 1, what="drain queued")
    ctl.kill()
    subprocess.run(["bash", str(cluster.script), "up"], capture_output=True, timeout=120,
                   check=True)
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env=env).start()
    wait_for(lambda: "DRAIN" in node_info(conf, "n4")["state"], timeout_s=60,
             what="the drain queued before the crash applied after the restart")
    assert ctl.stop() == 0


def test_a_fault_on_a_node_someone_else_drained_keeps_their_reason(
        slurm_controller: ControllerProcess, cluster: SlurmCluster) -> None:
    conf = cluster.slurm_conf
    assert scontrol(conf, "update", "nodename=n2", "state=drain", "reason=memory test"
                    ).returncode == 0
    asyncio.run(publish_durable(slurm_controller.url, [verdict("n2", "GPU-n2-1")]))
    history = wait_for(
        lambda: [e for e in cli_json("history", "--node", "n2", "--nats-url",
                                     slurm_controller.url) if e["kind"] == "drain_skipped"],
        what="the drain skipped")
    assert "memory test" in history[0]["reason"]
    assert node_info(conf, "n2")["reason"] == "memory test"


def checking_controller(tmp_path: Path, nats_server: NatsServerProcess, conf: str,
                        **env: str) -> ControllerProcess:
    """A controller on the real cluster with resume checks in its environment."""
    return ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                             extra_env={"MARDUK_SLURM_CONF": conf, **env}).start()


def drain_and_fail_the_check(url: str, node: str) -> None:
    assert run_cli("drain", node, "reason=burn-in", "--nats-url", url).returncode == 0
    proc = run_cli("resume", node, "--nats-url", url)
    assert proc.returncode == 1 and f"health check failed on {node}" in proc.stderr


def test_resume_is_gated_by_health_checks(tmp_path: Path, nats_server: NatsServerProcess,
                                          cluster: SlurmCluster) -> None:
    conf = cluster.slurm_conf
    marker = tmp_path / "healthy"
    # The configured check: passes only once the marker exists (a repaired GPU, say).
    ctl = checking_controller(tmp_path, nats_server, conf,
                              MARDUK_SLURM_RESUME_CHECK=f"test -e {marker}.{{node}}")
    try:
        url = ctl.url
        drain_and_fail_the_check(url, "n4")
        assert "DRAIN" in node_info(conf, "n4")["state"]
        # The operator's own check fails too: refused, and recorded.
        proc = run_cli("resume", "n4", "--check", "false", "--nats-url", url)
        assert proc.returncode == 1
        marker.with_name("healthy.n4").touch()
        proc = run_cli("resume", "n4", "--check", "true {node}", "--nats-url", url)
        assert proc.returncode == 0, proc.stderr
        kinds = [e["kind"] for e in cli_json("history", "--node", "n4", "--nats-url", url)]
        assert kinds.count("resume_check_failed") == 3  # configured twice, operator once
        assert kinds.count("resume_check_passed") == 2 and "resumed" in kinds
    finally:
        assert ctl.stop() == 0


def test_a_partition_names_its_own_resume_check(tmp_path: Path, nats_server: NatsServerProcess,
                                               cluster: SlurmCluster) -> None:
    conf = cluster.slurm_conf
    marker = tmp_path / "burnt-in"
    # The site-wide check passes; the "debug" partition's own check (every node here is in
    # it) wants the marker.
    ctl = checking_controller(tmp_path, nats_server, conf, MARDUK_SLURM_RESUME_CHECK="true",
                              MARDUK_SLURM_RESUME_CHECK_BY_PARTITION=json.dumps(
                                  {"gpu": "true", "debug": f"test -e {marker}.{{node}}"}))
    try:
        url = ctl.url
        drain_and_fail_the_check(url, "n3")
        marker.with_name("burnt-in.n3").touch()
        proc = run_cli("resume", "n3", "--nats-url", url)
        assert proc.returncode == 0, proc.stderr
        checks = [(e["kind"], e["evidence"]["partition"], e["evidence"]["command"])
                  for e in cli_json("history", "--node", "n3", "--nats-url", url)
                  if e["kind"].startswith("resume_check")]
        command = f"test -e {marker}.n3"
        assert checks == [("resume_check_failed", "debug", command),
                          ("resume_check_passed", "debug", command)]
    finally:
        assert ctl.stop() == 0


def test_operator_rpc_refuses_huge_hostlists_and_bad_names_and_sends_one_line_reasons(
        slurm_controller: ControllerProcess, cluster: SlurmCluster) -> None:
    conf, url = cluster.slurm_conf, slurm_controller.url
    for nodes, message in [("r[1-999999]n[1-999999]", "more than 100000 names"),
                           ("n[1-999999]", "more than 100000 names"),
                           ("-n4", "starts with '-'")]:
        with pytest.raises(RequestFailed, match=re.escape(message)):
            slurm_controller.request("drain", {"nodes": nodes, "reason": "x"})
    # A reason with a newline or an escape is refused at the edge, with the reason why...
    proc = run_cli("drain", "n4", "reason=swap GPU\nticket 7\x1b", "--nats-url", url)
    assert proc.returncode == 2 and "control character" in proc.stderr, proc.stderr
    # ...and the one that is taken reaches Slurm as one line.
    proc = run_cli("drain", "n4", "reason=swap GPU, ticket 7", "--nats-url", url)
    assert proc.returncode == 0 and "n4: drain done" in proc.stdout, proc.stderr
    info = node_info(conf, "n4")
    assert info["reason"].startswith("marduk: swap GPU, ticket 7 event="), info["raw"]
    assert info["raw"].count("\n") == 1
    assert slurm_controller.request("status")["counters"]["slurm_drains"] == 1  # still serving
    proc = run_cli("resume", "n4", "--nats-url", url)
    assert proc.returncode == 0, proc.stderr
