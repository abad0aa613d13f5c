"""`marduk resume NODES --check`: each node's agent checks its own node (every GPU read and
judged now, then the site's `agent.health_check` program), relayed by the controller, each
outcome in the history; Ctrl-C cancels it on the node, its processes with it. Real
nats-server, controller and agent (simulated GPUs), the real CLI."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.cli.client import RequestFailed
from marduk_slurm.domain.node_check import new_check_id
from marduk_slurm.errors import NotFound

from agent_fixtures import AgentProcess, agent  # noqa: F401
from harness import REPO, ControllerProcess, marduk_argv, run_cli, wait_for
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401


def node_check(ctl: ControllerProcess, node: str, **args: Any) -> dict[str, Any]:
    return dict(ctl.request("node_check", {"nodes": node, "check_id": new_check_id(),
                                           "timeout_s": 30, **args}, timeout_s=60))


def checks(ctl: ControllerProcess, node: str) -> list[tuple[str, str]]:
    rows = ctl.request("history", {"node": node,
                                   "kinds": ["resume_check_passed", "resume_check_failed"]})
    return [(r["kind"], r["evidence"].get("output", "")) for r in rows]


def known(ctl: ControllerProcess, node: str) -> bool:
    """The node is in the controller's view (its agent's inventory arrived)."""
    try:
        return bool(ctl.request("nodes", {"node": node}))
    except NotFound:
        return False


def running(pattern: str) -> bool:
    return subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0


def test_the_agent_passes_healthy_gpus_and_fails_a_lost_one(
        controller: ControllerProcess, agent: AgentProcess) -> None:  # noqa: F811
    wait_for(lambda: known(controller, "n2"), what="the agent's inventory")
    first = node_check(controller, "n2")
    ev = first["checks"]["n2"]
    assert first["passed"] and ev["returncode"] == 0 and len(ev["gpus"]) == 2, ev
    assert ev["output"] == "2 GPU(s) healthy"

    lost = run_cli("inject", "--node", "n2", "--gpu", "1", "--xid", "79",
                   "--nats-url", controller.url)
    assert lost.returncode == 0, lost.stderr
    failed = node_check(controller, "n2")
    ev = failed["checks"]["n2"]
    assert not failed["passed"] and ev["returncode"] == 1
    assert ev["output"].startswith("GPU 1 (GPU-SIM-") and "GPU is lost" in ev["output"], ev

    proc = run_cli("resume", "n2", "--check", "--nats-url", controller.url)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "n2: check FAILED" in proc.stdout and "not resumed" in proc.stderr
    kinds = [k for k, _ in checks(controller, "n2")]
    assert kinds.count("resume_check_passed") == 1 and kinds.count("resume_check_failed") == 2


def test_a_node_whose_agent_does_not_answer_fails_its_check(
        controller: ControllerProcess, agent: AgentProcess) -> None:  # noqa: F811
    wait_for(lambda: known(controller, "n2"), what="the agent's inventory")
    assert node_check(controller, "n2")["passed"]
    agent.stop()
    failed = node_check(controller, "n2", timeout_s=1)
    out = failed["checks"]["n2"]["output"]
    assert not failed["passed"] and out.startswith("the agent on n2 did not answer"), out


def test_ctrl_c_cancels_the_check_and_its_processes_on_the_node(
        tmp_path: Path, controller: ControllerProcess,
        nats_server: NatsServerProcess) -> None:
    marker = "sleep 37.125"  # the site's check program, found by its exact command line
    (tmp_path / "a").mkdir()
    node = AgentProcess(tmp_path / "a", nats_server.url)
    node.env["MARDUK_AGENT_HEALTH_CHECK"] = marker
    node.start()
    try:
        wait_for(lambda: known(controller, "n2"), what="the agent's inventory")
        cli = subprocess.Popen(marduk_argv("resume", "n2", "--check", "--nats-url",
                                           controller.url),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=REPO)
        wait_for(lambda: running(marker), what="the check program running on the node")
        cli.send_signal(signal.SIGINT)
        out, err = cli.communicate(timeout=30)
        assert cli.returncode == 130, out + err
        assert "cancelled on the nodes" in err and "nothing was resumed" in err
        wait_for(lambda: not running(marker), 10, what="the check program stopped")
        kinds = wait_for(lambda: checks(controller, "n2"), what="the cancel on record")
        assert kinds == [("resume_check_failed",
                          "cancelled by the operator; its processes were stopped")]
        time.sleep(0.5)
        assert node.running, node.log()
    finally:
        node.stop()


def test_check_requests_are_bounded() -> None:
    from marduk_slurm.domain.node_check import check_args

    good = new_check_id()
    assert check_args({"check_id": good, "timeout_s": 30}, 300.0) == (good, 30.0)
    assert check_args({"check_id": good, "timeout_s": 10**9}, 300.0) == (good, 300.0)
    assert check_args({"check_id": good}, 300.0) == (good, 300.0)
    for timeout in (0, -1, float("nan"), float("inf"), True, "30", None, [30]):
        with pytest.raises(ValueError, match="timeout_s must be a positive number"):
            check_args({"check_id": good, "timeout_s": timeout}, 300.0)
    for check_id in ("", "chk-" + "0" * 31, "chk-" + "g" * 32, good + "\n", "-" + good,
                     "x" * 10_000_000, 7, None):
        with pytest.raises(ValueError, match="check_id is malformed"):
            check_args({"check_id": check_id, "timeout_s": 1}, 300.0)


def test_the_controller_refuses_bad_check_requests(controller: ControllerProcess) -> None:
    for args in ({"nodes": "n2", "check_id": "nope"},
                 {"nodes": "n2", "check_id": new_check_id(), "timeout_s": 10**6},
                 {"nodes": "n2", "check_id": new_check_id(), "timeout_s": "NaN"},
                 {"nodes": "", "check_id": new_check_id()}):
        with pytest.raises(RequestFailed):
            controller.request("node_check", args)
    assert controller.request("node_check_cancel", {"check_id": new_check_id()}) == {
        "cancelled": False}


def test_an_agent_that_watches_no_gpu_fails_the_check_at_once(
        tmp_path: Path, nats_server: NatsServerProcess,
        slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    # The node is known from Slurm (an agent without GPUs sends no inventory).
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env={"MARDUK_SLURM_CONF": slurm_cluster.slurm_conf}).start()
    (tmp_path / "a").mkdir()
    node = AgentProcess(tmp_path / "a", nats_server.url, gpus=0)  # no NVML on this host
    node.start()
    try:
        failed = node_check(ctl, "n2", timeout_s=60)
        out = failed["checks"]["n2"]["output"]
        # Its own answer (not "did not answer" after the timeout).
        assert not failed["passed"] and out.startswith("the agent watches no GPU: "), out
    finally:
        node.stop()
        assert ctl.stop() == 0
