"""Hot spares at their edges, on the real local Slurm cluster: the controller (embedded NATS,
SQLite, the Slurm-commands backend), an agent per node with simulated GPUs, the SPANK plugin,
and jobs from the rendered template training with real torchft on CPU (scripts/train_tiny.py).
Each job: 2 replica groups on n1 and n2, 2 spare nodes, a standby on n3, n4 free.

- two faults at once: the one standby takes one group, the other is respawned cold on n4;
- the standby's own node fails: it stands down and a new standby starts on n4; a fault on
  n1 then goes to that standby, and a fault on its node while it heals sends the group away
  again, with no healthy node free: the group waits, and starts once n3 is resumed;
- a standby that never becomes ready (its model build hangs): the group waits the assume
  grace (5 s), then is respawned cold.

Every job must complete. The controller and agents are shared by the scenarios; each one
resets the GPUs it broke and resumes the nodes it drained.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from harness import load_drill
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

pytestmark = [pytest.mark.slurm, pytest.mark.torch, pytest.mark.slow]


class Site:
    """The shared services and what a scenario broke."""

    def __init__(self, module: ModuleType, work: Path) -> None:
        self.module = module
        self.drill = module.Drill(work, max_steps=3000, step_sleep_s=0.05, hot_spares=1,
                                  spares=2)
        self.broken: list[tuple[str, int]] = []

    def submit(self, **job_env: str) -> int:
        d = self.drill
        d.env.update(job_env)
        d.job_id = 0
        d.submit_job()
        return int(d.job_id)

    def rows(self, *, all_rows: bool = False) -> list[dict[str, Any]]:
        args = ["replicas", "--job", str(self.drill.job_id)] + (["--all"] if all_rows else [])
        return list(self.drill.marduk(*args))

    def training(self, standbys: int) -> None:
        def ready() -> bool:
            rows = self.rows()
            live = [r for r in rows if r.get("role", "replica") == "replica"
                    and r["participants"] == 2 and r["last_step"] >= 10]
            standing_by = [r for r in rows if r["state"] == "standby"]
            return len(live) == 2 and len(standing_by) == standbys
        self.drill.wait(f"2 groups training together, {standbys} standing by", ready, 240)

    def fault(self, node: str) -> None:
        self.drill.marduk("inject", "--node", node, "--gpu", "0", "--xid", "79")
        self.broken.append((node, 0))

    def full_strength_on(self, group: int, node: str, timeout_s: float = 180) -> None:
        def there() -> bool:
            return any(r["replica_group"] == group and r["node"] == node
                       and r.get("role", "replica") == "replica" and r["participants"] == 2
                       for r in self.rows())
        self.drill.wait(f"group {group} training on {node} with the other", there, timeout_s)

    def finish(self, after: int = 30) -> tuple[str, str]:
        """End the job `after` steps from now; its state and its output."""
        d = self.drill
        last = max(r["last_step"] for r in self.rows() if r.get("role") != "standby")
        d.marduk("config", "set", str(d.job_id), f"max_steps={last + after}", words=2)
        state = d.wait_job()
        return state, self.output()

    def output(self) -> str:
        path = self.drill.work / f"job-{self.drill.job_id}.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def history(self, since: float) -> list[dict[str, Any]]:
        return list(self.drill.marduk("history", "--since", str(since), "--limit", "1000"))

    def repair(self) -> None:
        """Reset what the scenario broke, resume its nodes, end its job."""
        d = self.drill
        if d.job_id:  # harmless if it ended
            subprocess.run(["scancel", str(d.job_id)], env=d.env, capture_output=True,
                           check=False)
        for node, index in self.broken:
            try:
                d.marduk("inject", "--node", node, "--gpu", str(index), "--reset")
            except RuntimeError as exc:
                print(f"reset {node}: {exc}")
        for node in sorted({n for n, _ in self.broken}):
            try:
                d.marduk("resume", node)
            except RuntimeError as exc:
                print(f"resume {node}: {exc}")
        self.broken.clear()
        for key in ("TINY_STANDBY_HANG_S",):
            d.env.pop(key, None)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory,
         slurm_cluster: SlurmCluster) -> Iterator[Site]:  # noqa: F811
    pytest.importorskip("torchft", reason="the jobs train with torchft")
    s = Site(load_drill(), tmp_path_factory.mktemp("edges"))
    try:
        s.drill.start_services()
        yield s
    finally:
        s.drill.job_id = 0
        s.drill.stop()


@pytest.fixture
def scenario(site: Site) -> Iterator[Site]:
    try:
        yield site
    finally:
        print("\n".join(line for line in site.output().splitlines()
                        if "marduk-supervisor" in line or "standby" in line)[-6000:])
        site.repair()


def test_two_faults_at_once_one_standby_takes_one_group_the_other_respawns_cold(
        scenario: Site) -> None:
    s = scenario
    s.submit()
    s.training(standbys=1)
    t0 = time.time()
    s.fault("n1")
    s.fault("n2")
    s.drill.wait("both nodes drained", lambda: all(
        "DRAIN" in s.drill.marduk("nodes", n)[0]["flags"] for n in ("n1", "n2")), 60)
    assigned = s.drill.wait("the standby assigned", lambda: [
        e for e in s.history(t0) if e["kind"] == "standby_assigned"], 30)
    assert len(assigned) == 1, assigned
    g = assigned[0]["evidence"]["replica_group"]
    s.full_strength_on(g, "n3")
    s.full_strength_on(1 - g, "n4")
    state, log = s.finish()
    assert state == "COMPLETED", log
    assert f"group {g}: told to leave (exit 75); assumed by standby 0 on n3" in log
    assert f"group {1 - g}: starting on n4" in log
    assert "all groups done after 1 restart(s)" in log


def test_the_standby_s_node_fails_then_its_group_s_node_fails_while_it_heals(
        scenario: Site) -> None:
    s = scenario
    s.submit()
    s.training(standbys=1)
    t0 = time.time()
    s.fault("n3")  # the standby's own node: it stands down, a new standby starts on n4
    s.drill.wait("a new standby on n4", lambda: [
        r for r in s.rows() if r["state"] == "standby" and r["node"] == "n4"], 120)
    log = s.output()
    assert "standby 0: exited (75) before assuming a group" in log
    assert "standby 1: starting on n4" in log

    s.fault("n1")  # group 0's node: the standby on n4 assumes group 0 ...
    s.drill.wait("the standby on n4 assigned to group 0", lambda: [
        e for e in s.history(t0) if e["kind"] == "standby_assigned"
        and e["node"] == "n4"], 30)
    s.fault("n4")  # ... and its node fails while it heals: no healthy node is free now
    s.drill.wait("group 0 waiting for a node", lambda: "group 0: no healthy spare node "
                 "free; waiting" in s.output(), 120)
    # n3 comes back (GPU reset, node resumed): the waiting group starts there, cold.
    s.drill.marduk("inject", "--node", "n3", "--gpu", "0", "--reset")
    s.drill.marduk("resume", "n3")
    s.full_strength_on(0, "n3")
    state, log = s.finish()
    assert state == "COMPLETED", log
    assert "group 0: starting on n3" in log
    kinds = [(e["kind"], e["node"]) for e in s.history(t0)]
    assert ("standby_dismissed", "n3") in kinds, kinds
    assert ("standby_assigned", "n4") in kinds, kinds
    assert ("leave_requested", "n4") in kinds, kinds


def test_a_standby_that_never_becomes_ready_costs_the_grace_then_a_cold_respawn(
        scenario: Site) -> None:
    s = scenario
    s.submit(TINY_STANDBY_HANG_S="600")
    s.training(standbys=0)  # its step runs, but it never registers
    t0 = time.time()
    s.fault("n1")
    s.full_strength_on(0, "n4")
    state, log = s.finish()
    assert state == "COMPLETED", log
    assert "group 0: no standby assumed it within 5 s; respawning cold" in log
    assert "group 0: starting on n4" in log
    kinds = [e["kind"] for e in s.history(t0)]
    assert "standby_assigned" not in kinds and "leave_requested" in kinds, kinds
