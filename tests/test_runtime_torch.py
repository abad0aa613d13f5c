"""ManagerMarduk with real torch + torchft: a real torchft_lighthouse, replica groups on
ProcessGroupGloo (one process each, CPU), a real nats-server and a real controller, driven
through the real `marduk` command line."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchft",
                    reason="torchft is not importable (pip install marduk-slurm[runtime])")


import torch

from marduk_slurm.domain.exit_codes import EXIT_DONE, EXIT_LEAVE

from harness import ControllerProcess, cli_json, run_cli, wait_for
from runtime_worker import (
    Lighthouse,
    WorkerProcess,
    build_model,
    commit_gap,
    digest,
    send_leave,
)

pytestmark = [pytest.mark.torch, pytest.mark.slow]
JOB = 4242


@pytest.fixture
def lighthouse(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Lighthouse]:
    timeout_ms = getattr(request, "param", 1000)
    lh = Lighthouse(tmp_path / "lighthouse.log", heartbeat_timeout_ms=timeout_ms)
    yield lh
    lh.stop()


class Cluster:
    """Replica groups of one job, each a worker process, all reporting to the controller."""

    def __init__(self, tmp_path: Path, lighthouse: Lighthouse, ctl: ControllerProcess) -> None:
        self.tmp_path, self.lighthouse, self.ctl = tmp_path, lighthouse, ctl
        self.workers: dict[int, WorkerProcess] = {}

    def start(self, group: int, **env: str) -> WorkerProcess:
        base = {"MARDUK_NATS_URL": self.ctl.url, "MARDUK_JOB_ID": str(JOB),
                "MARDUK_STEP_ID": str(group), "MARDUK_NODE": f"n{group}",
                "STEP_SLEEP_S": "0.05"}
        self.workers[group] = WorkerProcess(group, self.lighthouse, self.tmp_path,
                                            {**base, **env})
        return self.workers[group]

    def stop_all(self) -> None:
        for w in self.workers.values():
            w.stop()

    def cli(self, *args: str) -> list[str]:
        return [*args, "--nats-url", self.ctl.url]

    def alive(self) -> None:
        for g, w in self.workers.items():
            if w.proc.poll() not in (None, -9):
                raise AssertionError(f"group {g} exited {w.proc.returncode}:\n{w.tail()}")

    def wait_until(self, predicate: Any, timeout_s: float, what: str) -> Any:
        def check() -> Any:
            self.alive()
            return predicate()
        return wait_for(check, timeout_s, 0.1, what)

    def wait_steps(self, groups: list[int], beyond: int, timeout_s: float = 60.0) -> None:
        def ready() -> bool:
            for g in groups:
                w = self.workers[g]
                if w.proc.poll() is not None:
                    raise AssertionError(f"group {g} exited {w.proc.returncode}:\n{w.tail()}")
            return all(self.workers[g].last_step() > beyond for g in groups)
        wait_for(ready, timeout_s, 0.1, f"groups {groups} past step {beyond}")


@pytest.fixture
def cluster(tmp_path: Path, lighthouse: Lighthouse, controller: ControllerProcess
            ) -> Iterator[Cluster]:
    c = Cluster(tmp_path, lighthouse, controller)
    yield c
    c.stop_all()


def by_step(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {r["step"]: r for r in records if r.get("committed")}


def test_config_revisions_apply_at_the_same_step_on_every_group(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    a, b = cluster.start(0), cluster.start(1)
    rows = cluster.wait_until(lambda: len(r := cli_json(*cluster.cli("replicas", "--job",
                                                                     str(JOB)))) == 2 and r,
                              60, "both groups registered")
    assert sorted(r["node"] for r in rows) == ["n0", "n1"]
    assert {r["gpu_uuids"][0] for r in rows} == {"cpu:n0:0", "cpu:n1:0"}
    assert all(r["replica_id"].startswith(f"job{JOB}_rg") and ":" in r["replica_id"]
               for r in rows)
    cluster.wait_until(lambda: all(w.steps() and w.steps()[-1]["np"] == 2 for w in (a, b)), 60,
                       "a quorum of both groups")

    before = max(a.last_step(), b.last_step())
    proc = run_cli(*cluster.cli("config", "set", str(JOB), "lr=0.05", "user.input_scale=0.5",
                                "timeout=12.5", "quorum_timeout=45"))
    assert proc.returncode == 0, proc.stderr
    shown = cli_json(*cluster.cli("config", "show", str(JOB)))
    at = shown["revisions"][0]["apply_at_step"]
    assert at > before  # ahead of every group when it was asked for, never in the past
    cluster.wait_steps([0, 1], at + 3)
    sa, sb = by_step(a.steps()), by_step(b.steps())
    for steps in (sa, sb):  # step N's record is written after step N-1 -> N ran with that lr
        assert steps[at]["lr"] == 0.01 and steps[at + 1]["lr"] == 0.05
        # torchft's own timeouts, read back from the Manager, change at the same step.
        assert (steps[at]["timeout"], steps[at]["quorum_timeout"]) == (10.0, 60.0)
        assert (steps[at + 1]["timeout"], steps[at + 1]["quorum_timeout"]) == (12.5, 45.0)
    common = sorted(set(sa) & set(sb))
    assert [s for s in common if s > at and sa[s]["digest"] != sb[s]["digest"]] == []

    ckpt = tmp_path / "ckpt.pt"
    reference = build_model(seed=99)
    torch.save({"model": reference.state_dict()}, ckpt)
    assert run_cli(*cluster.cli("checkpoint", "load", str(JOB), str(ckpt))).returncode == 0
    wait_for(lambda: a.events("checkpoint_loaded") and b.events("checkpoint_loaded"), 30, 0.1,
             "the checkpoint loaded on both groups")
    la, lb = a.events("checkpoint_loaded")[0], b.events("checkpoint_loaded")[0]
    assert la["step"] == lb["step"] and la["digest"] == lb["digest"] == digest(reference)

    def all_acked() -> Any:
        data = cli_json(*cluster.cli("config", "show", str(JOB)))
        return all(r["acked"] == 2 for r in data["revisions"]) and data
    shown = wait_for(all_acked, 20, 0.2, "acks of both revisions from both groups")
    assert [r["revision"] for r in shown["revisions"]] == [1, 2]
    assert {r["config_revision"] for r in shown["replicas"]} == {2}
    applied = {ack["applied_at_step"] for r in shown["revisions"][:1] for ack in r["acks"]}
    assert applied == {at}

    target = max(a.last_step(), b.last_step()) + 40
    reply = cli_json(*cluster.cli("config", "set", str(JOB), f"max_steps={target}"))
    assert reply["revision"] == 3 and reply["apply_at_step"] < target
    assert a.wait(60) == EXIT_DONE and b.wait(60) == EXIT_DONE
    assert a.events("exit")[0]["step"] == b.events("exit")[0]["step"] == target
    wait_for(lambda: cli_json(*cluster.cli("replicas", "--job", str(JOB))) == [], 15, 0.2,
             "both groups left the mapping")


def test_a_group_stalled_past_a_live_timeout_is_given_up_on(cluster: Cluster,
                                                            tmp_path: Path) -> None:
    """Under the process group's timeout of 5 s, a 3 s stall of one group is waited out: the
    other group's step commits. `marduk config set JOB timeout=1.5` lowers torchft's timeout
    and the process group's; Gloo takes its new timeout when it is next configured, which a
    third group joining does (the joiner gets 1.5 s from config_latest). Then the same stall
    is given up on: the other groups' steps are not committed, and all three go on
    committing together afterwards."""
    stall = tmp_path / "stall-group-1"
    a, b = cluster.start(0), cluster.start(1, STALL_FILE=str(stall))
    cluster.wait_until(lambda: all(w.steps() and w.steps()[-1]["np"] == 2 for w in (a, b)),
                       60, "a quorum of both groups")

    def stall_group_1(n: int, groups: tuple[WorkerProcess, ...]) -> list[dict[str, Any]]:
        """Group 1 sleeps 3 s in one step; group 0's records from that step until every
        group committed 5 more steps together."""
        stall.write_text("3")
        cluster.wait_until(lambda: len(b.events("stall")) == n, 30, f"stall {n} begun")
        at = b.events("stall")[-1]["step"]

        def together_again() -> bool:
            return all(len([r for r in w.steps() if r["step"] > at + 1 and r["committed"]
                            and r["np"] == len(groups)]) >= 5 for w in groups)
        cluster.wait_until(together_again, 90, f"every group committing after stall {n}")
        return [r for r in a.steps() if r["step"] >= at]

    waited = stall_group_1(1, (a, b))
    assert all(r["committed"] for r in waited), waited[:6]
    assert max(r["dt"] for r in waited) > 2.0  # it did wait for the stalled group

    proc = run_cli(*cluster.cli("config", "set", str(JOB), "timeout=1.5"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    c = cluster.start(2)
    cluster.wait_until(lambda: all(w.steps() and w.steps()[-1]["np"] == 3
                                   and w.steps()[-1].get("timeout") == 1.5
                                   for w in (a, b, c)),
                       60, "three groups in one quorum, all at the new timeout")
    given_up = stall_group_1(2, (a, b, c))
    assert [r for r in given_up if not r["committed"]], given_up[:6]


def test_survivors_keep_committing_through_kills_and_a_leave(cluster: Cluster) -> None:
    workers = cluster.workers
    for g in range(3):
        cluster.start(g)

    def three_in_quorum() -> bool:
        return all(w.steps() and w.steps()[-1]["np"] == 3 for w in workers.values())

    crashes = 0
    for _ in range(2):  # kill group 2 while all three train, twice; the survivors must not crash
        cluster.wait_until(three_in_quorum, 90, "a quorum of three")
        workers[2].kill()
        killed_at = time.time()
        cluster.wait_steps([0, 1], max(workers[g].last_step() for g in (0, 1)) + 10, 60)
        crashes += sum(workers[g].proc.poll() is not None for g in (0, 1))
        print(f"SIGKILL: survivor waited {commit_gap(workers[0].steps(), killed_at):.2f} s")
        cluster.start(2)
    assert crashes == 0

    cluster.wait_until(three_in_quorum, 90, "group 2 back in the quorum")
    rows = cli_json(*cluster.cli("replicas", "--job", str(JOB)))
    leaver = next(r for r in rows if r["replica_group"] == 1)
    left_at = time.time()
    send_leave(cluster.ctl.url, JOB, leaver["replica_id"], 1, "test: leave")
    assert workers[1].wait(30) == EXIT_LEAVE
    cluster.wait_steps([0, 2], max(workers[g].last_step() for g in (0, 2)) + 10, 60)
    stall = commit_gap(workers[0].steps(), left_at)
    print(f"commanded leave: survivor waited {stall:.2f} s")
    assert stall < 5.0
    history = cli_json(*cluster.cli("history", "--job", str(JOB)))
    leave = [e for e in history if e["kind"] == "replica_leave"]
    assert leave and leave[-1]["evidence"]["exit_code"] == EXIT_LEAVE
    assert all(workers[g].proc.poll() is None for g in (0, 2))


def test_a_replica_told_to_leave_while_its_quorum_hangs_leaves_at_once(
        tmp_path: Path, controller: ControllerProcess) -> None:
    # The lighthouse needs two replicas and gets one: the replica's quorum call hangs (as a
    # replica's does once the lighthouse proxy refuses it), with the training thread blocked
    # in its first allreduce, where no step boundary comes. Told to leave, it must go now,
    # not when torchft gives up on the quorum (quorum_timeout: 60 s in the worker).
    lh = Lighthouse(tmp_path / "lighthouse.log", heartbeat_timeout_ms=1000, min_replicas=2)
    c = Cluster(tmp_path, lh, controller)
    try:
        w = c.start(0, MARDUK_LEAVE_GRACE_S="0")  # no overdue exit: only the quorum's wait
        ready = c.wait_until(lambda: w.events("ready"), 60, "the replica ready")
        wait_for(lambda: (tmp_path / "lighthouse.log").read_bytes().count(
            b"Received quorum request") >= 1, 30, 0.1, "its quorum request at the lighthouse")
        assert w.steps() == []  # no step has ended: it waits in the quorum
        sent = time.monotonic()
        send_leave(controller.url, JOB, ready[0]["replica_id"], 0, "drill")
        assert w.wait(45) == EXIT_LEAVE, w.tail()  # < quorum_timeout: it did not wait it out
        print(f"left {time.monotonic() - sent:.2f} s after the command")
        left = wait_for(lambda: [e for e in cli_json("history", *c.cli())
                                 if e["kind"] == "replica_leave"], 20, 0.2, "the leave")
        assert left[0]["evidence"]["exit_code"] == EXIT_LEAVE
    finally:
        c.stop_all()
        lh.stop()


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "1e400", "86401", "abc", "1\n2", "--5"])
def test_a_leave_grace_out_of_bounds_is_refused(text: str) -> None:
    from marduk_slurm.runtime.manager import leave_grace
    with pytest.raises(ValueError):
        leave_grace(text)


def test_a_leave_grace_of_zero_is_none_and_unset_is_30_s() -> None:
    from datetime import timedelta

    from marduk_slurm.runtime.manager import leave_grace
    assert leave_grace("0") is None and leave_grace("") == timedelta(seconds=30)
    assert leave_grace(" 2.5 ") == timedelta(seconds=2.5)
