"""What an operator is told is true, fast and final: a resume check that cannot hang, a
status that says when Slurm is unreachable, config changes that report unknown jobs and
failed replicas, node lists as several words, and a CLI that imports only what it needs.

Against the real controller, and the real local Slurm cluster where Slurm matters (only n3
and n4 are drained here, and they are left resumed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.cli.commands import slurm_lines
from marduk_slurm.domain import messages as m
from marduk_slurm.runtime.client import MardukClient
from marduk_slurm.runtime.config import ConfigApplier

from harness import REPO, ControllerProcess, cli_json, marduk_argv, run_cli, wait_for
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

CHECK_JOB_NAME = "marduk-truth-check"


def slurm(conf: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SLURM_CONF": conf})


def node_state(conf: str, node: str) -> str:
    out = slurm(conf, "scontrol", "show", "-o", "node", node).stdout
    return out.split("State=", 1)[1].split()[0]


def check_jobs(conf: str) -> list[str]:
    """Jobs of the resume check still in Slurm's queue."""
    out = slurm(conf, "squeue", "-h", "-n", CHECK_JOB_NAME, "-o", "%i %T %R").stdout
    return out.split("\n") if out.strip() else []


def check_processes(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", marker], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line]


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:  # noqa: F811
    yield slurm_cluster
    slurm(slurm_cluster.slurm_conf, "scancel", "-n", CHECK_JOB_NAME)
    slurm(slurm_cluster.slurm_conf, "scontrol", "update", "nodename=n[3-4]", "state=resume")


@pytest.fixture
def slurm_controller(tmp_path: Path, nats_server: NatsServerProcess,
                     cluster: SlurmCluster) -> Iterator[ControllerProcess]:
    env = {"MARDUK_SLURM_CONF": cluster.slurm_conf, "MARDUK_SLURM_COMMAND_TIMEOUT_S": "3"}
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env=env).start()
    yield ctl
    assert ctl.stop() == 0, ctl.log()


# -- 1. a resume check that cannot hang -------------------------------------------------------


def _srun_check(tag: str) -> str:
    # A check as the docs once suggested: a Slurm job on exactly the drained node, which
    # Slurm never starts (ReqNodeNotAvail). `--comment` marks its processes for pgrep.
    return f"srun -J {CHECK_JOB_NAME} --comment={tag} -w {{node}} hostname"


@pytest.mark.slurm
def test_resume_check_times_out_and_leaves_no_srun_or_pending_job(
        slurm_controller: ControllerProcess, cluster: SlurmCluster) -> None:
    conf, url = cluster.slurm_conf, slurm_controller.url
    env = {"SLURM_CONF": conf}
    assert run_cli("drain", "n3", "reason=truth check", "--nats-url", url).returncode == 0
    wait_for(lambda: "DRAIN" in node_state(conf, "n3"), what="n3 drained")
    t0 = time.monotonic()
    proc = run_cli("resume", "n3", "--check", _srun_check("truth-timeout"), "--check-timeout",
                   "4", "--nats-url", url, env=env, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "timed out after 4 s" in proc.stdout and "health check failed on n3" in proc.stderr
    assert took < 20, took
    assert check_jobs(conf) == [] and check_processes("truth-timeout") == []
    assert "DRAIN" in node_state(conf, "n3")
    kinds = [e["kind"] for e in cli_json("history", "--node", "n3", "--nats-url", url)]
    assert "resume_check_failed" in kinds and "resumed" not in kinds
    assert run_cli("resume", "n3", "--nats-url", url).returncode == 0


@pytest.mark.slurm
def test_ctrl_c_during_a_resume_check_stops_it_whole_and_exits_130(
        slurm_controller: ControllerProcess, cluster: SlurmCluster) -> None:
    conf, url = cluster.slurm_conf, slurm_controller.url
    assert run_cli("drain", "n4", "reason=truth check", "--nats-url", url).returncode == 0
    wait_for(lambda: "DRAIN" in node_state(conf, "n4"), what="n4 drained")
    proc = subprocess.Popen(
        marduk_argv("resume", "n4", "--check", _srun_check("truth-ctrl-c"), "--nats-url", url),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "SLURM_CONF": conf})
    try:
        wait_for(lambda: any("PENDING" in j for j in check_jobs(conf)), 30, 0.2,
                 "the check's job pending on the drained node")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "nothing was resumed" in err
    assert check_jobs(conf) == [] and check_processes("truth-ctrl-c") == []
    assert "DRAIN" in node_state(conf, "n4")


# -- 7. several node words -------------------------------------------------------------------


@pytest.mark.slurm
def test_drain_and_resume_take_several_node_words(slurm_controller: ControllerProcess,
                                                  cluster: SlurmCluster) -> None:
    conf, url = cluster.slurm_conf, slurm_controller.url
    proc = run_cli("drain", "n4", "n3", "reason=two words", "--nats-url", url)
    assert proc.returncode == 0, proc.stderr
    assert "n3: drain done" in proc.stdout and "n4: drain done" in proc.stdout
    assert "DRAIN" in node_state(conf, "n3") and "DRAIN" in node_state(conf, "n4")
    proc = run_cli("resume", "n4", "n3", "--nats-url", url)
    assert proc.returncode == 0, proc.stderr
    assert "n3: resume done" in proc.stdout and "n4: resume done" in proc.stdout
    assert "DRAIN" not in node_state(conf, "n3") and "DRAIN" not in node_state(conf, "n4")
    proc = run_cli("resume", "n4", "colour=blue", "--nats-url", url)
    assert proc.returncode == 2 and "valid keys" in proc.stderr


# -- 2. Slurm unreachable --------------------------------------------------------------------


def _unreachable_conf(tmp_path: Path, conf: str) -> str:
    """The cluster's configuration with slurmctld on a port nothing listens on."""
    target = tmp_path / "etc"
    shutil.copytree(Path(conf).parent, target)
    text = (target / "slurm.conf").read_text()
    lines = ["SlurmctldPort=1" if line.startswith("SlurmctldPort=") else line
             for line in text.splitlines()]
    (target / "slurm.conf").write_text("\n".join(lines) + "\n")
    return str(target / "slurm.conf")


@pytest.mark.slurm
def test_status_says_slurm_is_unreachable_and_exits_1(
        tmp_path: Path, nats_server: NatsServerProcess, cluster: SlurmCluster) -> None:
    env = {"MARDUK_SLURM_CONF": _unreachable_conf(tmp_path, cluster.slurm_conf),
           "MARDUK_SLURM_COMMAND_TIMEOUT_S": "2"}
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env=env).start()
    try:
        proc = run_cli("status", "--nats-url", ctl.url)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Slurm UNREACHABLE since" in proc.stdout and "failed in a row" in proc.stdout
        assert run_cli("status", "--json", "--nats-url", ctl.url).returncode == 1
    finally:
        assert ctl.stop() == 0


def test_status_of_a_controller_without_slurm_exits_0(controller: ControllerProcess) -> None:
    proc = run_cli("status", "--nats-url", controller.url)
    assert proc.returncode == 0, proc.stderr
    assert "Slurm: not used" in proc.stdout


def test_status_takes_the_controllers_slurm_health_at_its_word() -> None:
    down = {"slurm_backend": "commands", "uptime_s": 600,
            "slurm_health": {"reachable": False, "last_ok": 1000.0, "failing_since": 1030.0,
                             "consecutive_failures": 7, "last_error": "connect failure"}}
    lines, unreachable = slurm_lines(down, now=1090.0)
    assert unreachable and "UNREACHABLE since" in lines[0] and "(60s ago)" in lines[0]
    assert "7 calls failed in a row" in lines[0] and "connect failure" in lines[0]
    up = {"slurm_backend": "commands",
          "slurm_health": {"reachable": True, "last_ok": 1089.5}}
    assert slurm_lines(up, now=1090.0) == (["Slurm: reachable, last answer now"], False)
    flaky = {"slurm_backend": "commands", "counters": {"reconciles": 5,
                                                       "reconcile_failures": 2}}
    lines, unreachable = slurm_lines(flaky)
    assert not unreachable and "2 of 7 reconcile passes" in lines[0]


def test_controller_help_says_slurm_is_needed_unless_backend_none() -> None:
    out = run_cli("controller", "--help").stdout
    assert "no Slurm needed" not in out
    assert "unless --slurm-backend none" in out.replace("\n", " ")


# -- 3 and 4. live configuration -------------------------------------------------------------

JOB = 77


class FakeOptimizer:
    def __init__(self) -> None:
        self.param_groups: list[dict[str, Any]] = [{"lr": 0.1}]


class Replica:
    """A training process in miniature: steps every 50 ms, heartbeats with its config
    revision, and applies revisions through the real ConfigApplier (no checkpoint loader
    registered), acknowledging each as ManagerMarduk does."""

    def __init__(self, url: str, group: int) -> None:
        self.group = group
        self.replica_id = f"job{JOB}_rg{group}:uuid-{group}"
        self.step = 0
        self.acking = True
        self.applier = ConfigApplier()
        self.applier.add_optimizer(FakeOptimizer())
        self.client = MardukClient(url, JOB, group)
        self.client.start(self.replica_id, self._register)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _register(self) -> m.ReplicaRegister:
        return m.ReplicaRegister(replica_id=self.replica_id, job_id=JOB,
                                 replica_group=self.group, node=f"n{self.group}",
                                 gpu_uuids=[f"cpu:n{self.group}:0"], hyperparams={"lr": 0.1},
                                 step=self.step, ts=time.time())

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.step += 1
            self.client.send_heartbeat(m.Heartbeat(
                replica_id=self.replica_id, job_id=JOB, step=self.step, step_time_ms=50.0,
                participants=2, config_revision=self.applier.revision, ts=time.time()))
            for cmd in self.client.poll_commands():
                if isinstance(cmd, m.JobCommand):
                    self.applier.offer(cmd)
            if self.acking:
                for cmd in self.applier.due(self.step):
                    self._apply(cmd)

    def _apply(self, cmd: m.JobCommand) -> None:
        try:
            self.applier.apply(cmd, 2)
        except ValueError as exc:
            self.client.send_ack(cmd.revision, self.step, ok=False, error=str(exc))
        else:
            self.client.send_ack(cmd.revision, self.step)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def test_config_set_on_an_unknown_job_fails_unless_forced(controller: ControllerProcess
                                                          ) -> None:
    url = controller.url
    proc = run_cli("config", "set", "999", "lr=0.1", "--nats-url", url)
    assert proc.returncode == 1, proc.stdout
    assert "job 999 is unknown to the controller" in proc.stderr and "--force" in proc.stderr
    assert run_cli("checkpoint", "load", "998", "/ckpt/x.pt", "--nats-url", url
                   ).returncode == 1
    assert controller.request("config_show", {"job": 999})["revisions"] == []
    proc = run_cli("config", "set", "999", "lr=0.1", "--force", "--nats-url", url)
    assert proc.returncode == 0, proc.stderr
    assert "no replica is running, it applies when one joins" in proc.stdout
    # Once a revision exists the job is known: no --force needed for the next one.
    assert run_cli("config", "set", "999", "lr=0.2", "--nats-url", url).returncode == 0


def test_a_failed_checkpoint_load_fails_with_the_replicas_reason(
        controller: ControllerProcess) -> None:
    url = controller.url
    replicas = [Replica(url, 0), Replica(url, 1)]
    try:
        wait_for(lambda: len(controller.request("replicas", {"job": JOB})) == 2
                 and all(r["last_step"] > 0 for r in controller.request("replicas",
                                                                         {"job": JOB})),
                 what="two replicas registered and stepping")
        proc = run_cli("checkpoint", "load", str(JOB), "/ckpt/step-10.pt", "--nats-url", url)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "revision 1 failed on 2 of 2 replica(s)" in proc.stderr
        assert proc.stderr.count("no checkpoint loader registered") == 2
        assert all(r.replica_id in proc.stderr for r in replicas)

        shown = run_cli("config", "show", str(JOB), "--nats-url", url)
        assert shown.returncode == 0
        rows = [line for line in shown.stdout.splitlines() if f"job{JOB}_rg" in line]
        assert len(rows) == 2 and all("no (revision 1 failed)" in r for r in rows), rows
        assert all("no checkpoint loader registered" in r for r in rows)
        assert " yes " not in shown.stdout
        revision_row = [line for line in shown.stdout.splitlines() if "/ckpt/step-10.pt" in line]
        assert "no checkpoint loader registered" in revision_row[0]

        proc = run_cli("config", "set", str(JOB), "lr=0.2", "--nats-url", url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "revision 2 applied at step" in proc.stdout and "by 2 replica(s)" in proc.stdout
        shown_json = cli_json("config", "show", str(JOB), "--nats-url", url)
        assert all(r["current"] and r["config_state"] == "current"
                   for r in shown_json["replicas"])

        for r in replicas:
            r.acking = False
        proc = run_cli("config", "set", str(JOB), "lr=0.3", "--wait", "1", "--nats-url", url)
        assert proc.returncode == 1
        assert "not confirmed within 1 s by 2 replica(s)" in proc.stderr
        proc = run_cli("config", "set", str(JOB), "lr=0.4", "--no-wait", "--nats-url", url)
        assert proc.returncode == 0 and "not waiting" in proc.stdout
    finally:
        for r in replicas:
            r.close()


# -- 9. start-up imports ---------------------------------------------------------------------

# msgspec is not here: the settings are msgspec-typed, and every command that asks the
# controller needs them and msgspec's codec anyway.
HEAVY = ("aiohttp", "jinja2", "prometheus_client", "sqlite_utils", "torch", "torchft", "nats")


def test_help_and_parsing_import_nothing_heavy() -> None:
    code = ("import sys; from marduk_slurm.cli import main; main.build_parser()"
            f".parse_args(['status']); print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip() == "[]"


def test_a_status_request_does_not_import_aiohttp(controller: ControllerProcess) -> None:
    code = ("import sys; from marduk_slurm.cli import main; "
            f"rc = main.main(['status', '--nats-url', {controller.url!r}]); "
            "print(rc, [m for m in ('aiohttp', 'jinja2', 'prometheus_client', 'sqlite_utils') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
