"""torchft's timeouts following a job's step times (`marduk straggler timeouts`), against a
real controller and NATS: replicas in miniature heartbeat with a known step time, the
straggler task makes a config revision with timeout = k x p99 and quorum_timeout = 2k x p99
(within the bounds), records it as `timeouts_adjusted` with its evidence, the replicas apply
it through the real ConfigApplier and acknowledge, and a p99 that moves little makes no new
revision. The real-torch side (the Manager's timeouts change at one step on every group) is
tests/test_runtime_torch.py."""

from __future__ import annotations

import threading
import time
from typing import Any

from marduk_slurm.domain import messages as m
from marduk_slurm.runtime.client import MardukClient
from marduk_slurm.runtime.config import ConfigApplier

from harness import ControllerProcess, cli_json, run_cli, wait_for

JOB = 6262


class Replica:
    """Steps at a given pace (it only reports it), applies revisions with the real applier,
    its timeouts landing in `timeouts` as they would in the Manager."""

    def __init__(self, url: str, group: int, step_ms: float) -> None:
        self.replica_id = f"job{JOB}_rg{group}:t{group}"
        self.group, self.step, self.step_ms = group, 0, step_ms
        self.timeouts: dict[str, float] = {}
        self.applier = ConfigApplier()
        self.applier.timeout_setter = self.timeouts.__setitem__
        self.client = MardukClient(url, JOB, group)
        self.client.start(self.replica_id, lambda: m.ReplicaRegister(
            replica_id=self.replica_id, job_id=JOB, replica_group=group, node=f"n{group}",
            gpu_uuids=[f"cpu:n{group}:0"], step=self.step, ts=time.time()))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.step += 1
            self.client.send_heartbeat(m.Heartbeat(
                replica_id=self.replica_id, job_id=JOB, step=self.step,
                step_time_ms=self.step_ms, participants=2,
                config_revision=self.applier.revision, ts=time.time()))
            for cmd in self.client.poll_commands():
                if isinstance(cmd, m.JobCommand):
                    self.applier.offer(cmd)
            for cmd in self.applier.due(self.step):
                self.applier.apply(cmd, 2)
                self.client.send_ack(cmd.revision, self.step)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.client.close()


def adjustments(url: str) -> list[dict[str, Any]]:
    return [e for e in cli_json("history", "--job", str(JOB), "--nats-url", url)
            if e["kind"] == "timeouts_adjusted"]


def test_timeouts_follow_the_step_times_within_bounds(controller: ControllerProcess) -> None:
    url = controller.url
    replicas = [Replica(url, 0, 300.0), Replica(url, 1, 290.0)]
    try:
        wait_for(lambda: len(cli_json("replicas", "--job", str(JOB), "--nats-url", url)) == 2,
                 what="both replicas registered")
        proc = run_cli("straggler", "timeouts", str(JOB), "--k", "10", "--floor", "1",
                       "--ceiling", "100", "--nats-url", url)
        assert proc.returncode == 0, proc.stderr
        assert "timeout 10 x p99 step" in proc.stdout
        [adjusted] = wait_for(lambda: adjustments(url), 40, 0.5, what="the first adjustment")
        ev = adjusted["evidence"]
        assert ev["p99_step_ms"] == 300.0 and ev["samples"] >= 20 and ev["replicas"] == 2
        assert ev["changes"] == {"timeout": 3.0, "quorum_timeout": 6.0}
        assert ev["previous"] == {} and adjusted["source"] == "stragglers"
        wait_for(lambda: all(r.timeouts == {"timeout": 3.0, "quorum_timeout": 6.0}
                             for r in replicas), what="both replicas applied the revision")
        shown = cli_json("config", "show", str(JOB), "--nats-url", url)
        assert [(r["revision"], r["actor"]) for r in shown["revisions"]] == [(1, "stragglers")]
        # A p99 that moves by less than a fifth makes no new revision; one that doubles does.
        for r in replicas:
            r.step_ms = 330.0
        time.sleep(12)  # longer than one adjustment period
        assert len(adjustments(url)) == 1
        for r in replicas:
            r.step_ms = 800.0
        wait_for(lambda: len(adjustments(url)) == 2, 60, 0.5, what="the second adjustment")
        second = adjustments(url)[1]["evidence"]
        assert second["previous"] == {"timeout": 3.0, "quorum_timeout": 6.0}
        assert second["changes"] == {"timeout": 8.0, "quorum_timeout": 16.0}

        off = cli_json("straggler", "timeouts", str(JOB), "--off", "--nats-url", url)
        assert off["policy"] is None and off["previous"]["k"] == 10
    finally:
        for r in replicas:
            r.close()


def test_a_bad_timeout_policy_is_refused(controller: ControllerProcess) -> None:
    for args in (("--k", "0"), ("--floor", "10", "--ceiling", "20"), ("--k", "nan"),
                 ("--ceiling", "1e9")):
        proc = run_cli("straggler", "timeouts", str(JOB), *args, "--nats-url", controller.url)
        assert proc.returncode != 0 and proc.stderr.strip(), args
