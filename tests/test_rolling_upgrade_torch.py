"""A rolling upgrade of the controller (docs/operations.md, "Upgrading without downtime")
while a job trains with real torch + torchft: two replica groups on ProcessGroupGloo behind a
real torchft_lighthouse, a real nats-server, the leader and then a standby controller.

The standby (the new version) starts and catches up from the stream, the leader is stopped
(it releases its lease) and the standby leads. Training never waits for any of it; the
configuration revisions go on numbering after the old leader's and apply at one step on both
groups; a fault after the handover is decided by the new leader, and the job finishes."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchft",
                    reason="torchft is not importable (pip install marduk-slurm[runtime])")

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.exit_codes import EXIT_DONE, EXIT_LEAVE
from marduk_slurm.domain.gpu_health import GpuAction

from harness import ControllerProcess, cli_json, publish_durable, wait_for
from runtime_worker import Lighthouse, WorkerProcess, commit_gap

pytestmark = [pytest.mark.torch, pytest.mark.slow]
JOB = 4747


@pytest.fixture
def lighthouse(tmp_path: Path) -> Iterator[Lighthouse]:
    lh = Lighthouse(tmp_path / "lighthouse.log", heartbeat_timeout_ms=1000)
    yield lh
    lh.stop()


def controller(tmp_path: Path, url: str, name: str, *, standby: bool) -> ControllerProcess:
    args = ("--standby", "--id", name) if standby else ("--id", name)
    return ControllerProcess(tmp_path / name, url, extra_args=args,
                             extra_env={"MARDUK_CONTROLLER_LEASE_S": "2"})


def leader(url: str) -> str:
    try:
        return str(cli_json("status", "--nats-url", url).get("controller", {}).get("id", ""))
    except AssertionError:  # nobody answers in this instant
        return ""


def first_step_at(w: WorkerProcess, revision: int) -> int | None:
    return next((r["step"] for r in w.steps() if r["rev"] >= revision), None)



def revisions(db: Path) -> list[int]:
    if not db.exists():
        return []
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return [r[0] for r in conn.execute("SELECT revision FROM config_revisions")]


def test_a_rolling_upgrade_while_a_job_trains(tmp_path: Path, lighthouse: Lighthouse,
                                              nats_server: NatsServerProcess) -> None:
    url = nats_server.url
    old = controller(tmp_path, url, "ctl-old", standby=False).start()
    new: ControllerProcess | None = None
    env = {"MARDUK_NATS_URL": url, "MARDUK_JOB_ID": str(JOB), "STEP_SLEEP_S": "0.05"}
    workers = [WorkerProcess(g, lighthouse, tmp_path, {**env, "MARDUK_STEP_ID": str(g),
                                                       "MARDUK_NODE": f"n{g}"})
               for g in (0, 1)]

    def training() -> None:
        for w in workers:
            assert w.proc.poll() is None, w.tail()

    def in_quorum() -> bool:
        training()
        return all(w.steps() and w.steps()[-1]["np"] == 2 for w in workers)

    try:
        wait_for(in_quorum, 120, 0.1, "both groups training together")
        first = cli_json("config", "set", str(JOB), "lr=0.05", "--nats-url", url)
        assert first["revision"] == 1
        wait_for(lambda: all(first_step_at(w, 1) is not None for w in workers), 60, 0.1,
                 "revision 1 applied")

        # 1. The new version starts as a standby and catches up from the stream.
        new = controller(tmp_path, url, "ctl-new", standby=True).start(standby=True)
        wait_for(lambda: revisions(tmp_path / "ctl-new" / "marduk.db") == [1], 30, 0.1,
                 "the standby knowing revision 1")
        # 2. The old leader is stopped (systemctl stop): it releases its lease.
        assert old.proc is not None
        stopped_at = time.time()
        steps_then = workers[0].last_step()
        old.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: leader(url) == "ctl-new", 30, 0.05, "the new version leading")
        handover_s = time.time() - stopped_at
        assert old.proc.wait(20) == 0, old.log()
        # Training never waited for the controllers.
        wait_for(lambda: workers[0].last_step() > steps_then + 20, 60, 0.1, "20 more steps")
        training()
        gap = commit_gap(workers[0].steps(), stopped_at)
        print(f"handover {handover_s:.2f} s; group 0's longest gap between commits across it "
              f"{gap:.3f} s")

        # 3. Revisions go on from the old leader's number and apply at one step on both.
        second = cli_json("config", "set", str(JOB), "lr=0.02", "--nats-url", url)
        assert second["revision"] == 2
        at = second["apply_at_step"]
        assert at > steps_then + 20  # ahead of the groups when it was asked for
        wait_for(lambda: min(w.last_step() for w in workers) > at + 3, 60, 0.1,
                 "both groups past the revision's step")
        for w in workers:  # step N's record is written after step N-1 -> N ran
            steps = {r["step"]: r for r in w.steps() if r.get("committed")}
            assert (steps[at]["rev"], steps[at + 1]["rev"]) == (1, 2), (w.group, at)
        assert all(r["lr"] == pytest.approx(0.02) for w in workers for r in w.steps()
                   if r["rev"] >= 2)

        # 4. A fault after the handover: the new leader decides, group 1 leaves.
        verdict = m.Verdict(node="n1", gpu_uuid="cpu:n1:0", action=GpuAction.DRAIN_NODE,
                            reason="xid 79 (drill)", xid=79, ts=time.time())
        asyncio.run(publish_durable(url, [(subjects.node_event("n1", "verdict"),
                                           m.encode(verdict))]))
        assert workers[1].wait(30) == EXIT_LEAVE, workers[1].tail()
        history: list[dict[str, Any]] = list(cli_json("history", "--job", str(JOB),
                                                       "--nats-url", url))
        assert [e["kind"] for e in history].count("leave_requested") == 1

        # 5. The job ends on the new leader's word.
        target = workers[0].last_step() + 60
        reply = cli_json("config", "set", str(JOB), f"max_steps={target}", "--nats-url", url)
        assert reply["revision"] == 3 and reply["apply_at_step"] < target
        assert workers[0].wait(60) == EXIT_DONE, workers[0].tail()
        assert workers[0].events("exit")[0]["step"] == target
    finally:
        for w in workers:
            w.stop()
        if old.proc is not None and old.proc.poll() is None:
            old.stop()
        if new is not None:
            assert new.stop() == 0, new.log()
