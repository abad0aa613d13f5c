"""The end-to-end fault drill on a real local Slurm cluster.

What runs: the controller (embedded NATS, SQLite, the Slurm-commands backend), one agent per
node with simulated GPUs, marduk's SPANK plugin in every slurmd, and a job submitted from the
rendered sbatch template: a real torchft lighthouse and 2 replica groups training on CPU
(scripts/train_tiny.py) plus 1 spare node. Then XID 79 is injected on a GPU used by one
replica, and the drill follows what happens: the node is drained in Slurm with the reason,
that replica leaves, the supervisor starts it on the spare, torchft heals it, and training
reaches max_steps.

With `--hot-spares 1` the spare node runs a standby from the start (`marduk sbatch
--hot-spares`): the decision that sends the replica away tells the standby to assume its
group, and no cold respawn happens. Either way the drill times the fault (the controller's
`gpu_verdict`) to full strength (the replaced group's first step in a quorum of every group,
from the training log); benchmarks/recovery.py compares the two.

At the end it asks the controller for the job's fault timeline (`marduk timeline`: each
group's step rate and quorum size from the heartbeats, with the fault, drain, leave, standby
assumed or respawn and full strength marked) and draws it into a picture file next to its
logs (timeline.svg; needs matplotlib, the `plots` extra), printing its path.

Run by scripts/demo.sh (which prepares the environment and the cluster), and by
tests/test_drill.py. Prints what it does at each stage and ends with a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARDUK = [sys.executable, "-m", "marduk_slurm.cli.main"]
NODES = ["n1", "n2", "n3", "n4"]


def say(text: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {text}", flush=True)


def cluster_paths() -> tuple[str, Path]:
    """SLURM_CONF of the local cluster and its run directory (where agent sockets live)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm-cluster.sh"), "env"],
                         capture_output=True, text=True, check=True).stdout
    conf = out.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")
    return conf, Path(conf).parent.parent / "run"


@dataclass
class DrillResult:
    job_id: int = 0
    node: str = ""
    spare: str = ""
    gpu_uuid: str = ""
    reason: str = ""
    fault_to_drain_s: float = 0.0
    fault_to_full_strength_s: float = 0.0  # verdict -> replaced group in a full quorum
    hot_spares: int = 0
    assumed_by_standby: bool = False
    step_at_fault: int = 0  # the surviving group's step, first heartbeat after the injection
    step_rejoined: int = 0
    left_at_step: int = 0  # the replaced group's last committed step before it left
    healed_to_step: int = 0  # the step its new incarnation started from (healed)
    steps_discarded: int = 0  # step attempts after the fault that did not commit, all groups
    steps_redone: int = 0  # steps the replaced group had committed and did again
    final_step: int = 0
    max_steps: int = 0  # where the job was to end (moved by `finish_after`)
    steps_lost: int = 0
    # The surviving groups during the fault (verdict -> full strength): their longest step
    # (None: none over train_tiny's SLOW_STEP_S), their median step over the whole run, and
    # the steps they trained in a quorum without the replaced group.
    survivors_longest_step_ms: float | None = None
    survivors_median_step_ms: float = 0.0
    steps_at_reduced_strength: int = 0
    job_state: str = ""
    timeline_plot: str = ""  # the picture file, "" when it could not be drawn
    timeline: dict[str, Any] = field(default_factory=dict)  # `marduk timeline --json`
    history: list[dict[str, Any]] = field(default_factory=list)
    replicas: list[dict[str, Any]] = field(default_factory=list)
    work: str = ""


class Drill:
    def __init__(self, work: Path, *, max_steps: int, step_sleep_s: float,
                 hot_spares: int = 0, lighthouse_proxy: bool = True, spares: int = 1) -> None:
        self.work = work
        self.hot_spares = hot_spares
        self.spares = spares
        self.lighthouse_proxy = lighthouse_proxy
        self.conf, self.run_dir = cluster_paths()
        self.state = work / "controller"
        self.max_steps = max_steps
        self.env = {**os.environ, "SLURM_CONF": self.conf, "MARDUK_SLURM_CONF": self.conf,
                    "MARDUK_CONTROLLER_RECONCILE_INTERVAL_S": "5",
                    "MAX_STEPS": str(max_steps), "STEP_SLEEP_S": str(step_sleep_s),
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.job_id = 0

    # -- plumbing --------------------------------------------------------------------------

    def spawn(self, name: str, *args: str) -> None:
        log = (self.work / f"{name}.log").open("ab")
        self.procs.append(subprocess.Popen([*MARDUK, *args], stdout=log,
                                           stderr=subprocess.STDOUT, env=self.env, cwd=REPO))

    def marduk(self, *args: str, words: int = 1) -> Any:
        # Options right after the verb (`words` long: `config set` is 2): `sbatch` passes
        # everything after SCRIPT to it.
        argv = [*MARDUK, "--state-dir", str(self.state), *args[:words], "--json",
                *args[words:]]
        out = subprocess.run(argv, capture_output=True, text=True, env=self.env, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"marduk {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def wait(self, what: str, check: Callable[[], Any], timeout_s: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = check()
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                           f"logs in {self.work}")

    def scontrol(self, *args: str) -> str:
        return subprocess.run(["scontrol", *args], capture_output=True, text=True,
                              env=self.env).stdout

    # -- stages ----------------------------------------------------------------------------

    def start_services(self) -> None:
        say(f"starting the controller (embedded NATS + SQLite in {self.state})")
        self.spawn("controller", "controller", "--state-dir", str(self.state),
                   "--slurm-backend", "commands")
        self.wait("the controller", lambda: self.marduk("status"), 60)
        for node in NODES:
            self.spawn(f"agent-{node}", "agent", "--node", node, "--simulate-gpus", "2",
                       "--socket", str(self.run_dir / f"agent-{node}.sock"),
                       "--state-dir", str(self.work / f"agent-{node}"),
                       "--controller-state-dir", str(self.state))
        self.wait("every agent's GPU inventory",
                  lambda: self.marduk("status")["gpus"] >= 2 * len(NODES), 60)
        say(f"{len(NODES)} agents up, 2 simulated GPUs each; SPANK plugin reports steps to them")

    def submit_job(self) -> None:
        args = ["sbatch", "--replica-groups", "2", "--nodes-per-group", "1",
                "--gpus-per-node", "1", "--spares", str(self.spares), "--max-restarts", "2",
                "--hot-spares", str(self.hot_spares),
                "--param", f"assume_dir={self.work / 'assume'}",
                "--job-name", "marduk-drill", "--launcher", str(BIN / "python"),
                "--param", f"lighthouse={BIN / 'torchft_lighthouse'}",
                "--param", f"marduk={BIN / 'marduk'}",
                "--param", f"lighthouse_proxy={str(self.lighthouse_proxy).lower()}",
                "--sbatch-arg", f"output={self.work}/job-%j.out", "--submit",
                str(REPO / "scripts" / "train_tiny.py")]
        self.job_id = int(self.marduk(*args)["job_id"])
        spare = (f"{self.spares} spare node(s), {self.hot_spares} running a standby"
                 if self.hot_spares else f"{self.spares} spare node(s)")
        proxy = " behind marduk's liveness proxy" if self.lighthouse_proxy else ""
        say(f"submitted job {self.job_id} from the rendered template: lighthouse{proxy} + "
            f"2 replica groups + {spare}, {self.max_steps} steps")

    def replicas(self) -> list[dict[str, Any]]:
        return list(self.marduk("replicas", "--job", str(self.job_id)))

    def wait_training(self) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            rows = self.replicas()
            live = [r for r in rows if r["gpu_uuids"] and r["last_step"] >= 20
                    and r["participants"] == 2 and r.get("role", "replica") == "replica"]
            standing_by = [r for r in rows if r["state"] == "standby"]
            if len(live) == 2 and len(standing_by) >= self.hot_spares:
                return live + standing_by
            return None
        rows = self.wait("2 replica groups registered and training together", ready, 240)
        for r in rows:
            if r["state"] == "standby":
                say(f"  standby {r['replica_id']} on {r['node']}: model built, not in the "
                    "quorum")
                continue
            say(f"  group {r['replica_group']} on {r['node']}: step {r['last_step']}, "
                f"GPU {r['gpu_uuids'][0]}")
        return [r for r in rows if r["state"] != "standby"]

    def inject(self, victim: dict[str, Any]) -> float:
        node, uuid = victim["node"], victim["gpu_uuids"][0]
        index = next(g["idx"] for n in self.marduk("nodes", node) for g in n["gpus"]
                     if g["uuid"] == uuid)
        say(f"injecting XID 79 (GPU has fallen off the bus) on {node} GPU {index}, "
            f"used by replica group {victim['replica_group']}")
        t0 = time.time()
        injected = self.marduk("inject", "--node", node, "--gpu", str(index), "--xid", "79")
        say(f"  agent verdict: {injected.get('action')} ({injected.get('reason')})")
        return t0

    def survivor_step(self, victim: dict[str, Any]) -> int:
        """The other group's step as its heartbeats report it now."""
        return max(r["last_step"] for r in self.replicas()
                   if r["replica_group"] != victim["replica_group"]
                   and r.get("role", "replica") == "replica")

    def reset_gpu(self, node: str, uuid: str) -> None:
        """The simulated GPU stays off the bus after XID 79 until it is reset."""
        index = next(g["idx"] for n in self.marduk("nodes", node) for g in n["gpus"]
                     if g["uuid"] == uuid)
        reset = self.marduk("inject", "--node", node, "--gpu", str(index), "--reset")
        say(f"reset {node} GPU {index} (as nvidia-smi -r would): {reset.get('reason')}")

    def follow(self, victim: dict[str, Any], t0: float, result: DrillResult) -> None:
        node, group = victim["node"], victim["replica_group"]
        drained = self.wait(f"{node} drained in Slurm", lambda: [
            n for n in self.marduk("nodes", node) if "DRAIN" in n["flags"]], 60)
        result.reason = drained[0]["reason"]
        say(f"{node} drained in Slurm: {result.reason}")

        def rejoined() -> dict[str, Any] | None:
            # --all: a short job may be over (its rows left) by the time this looks.
            rows = self.marduk("replicas", "--job", str(self.job_id), "--all")
            for r in rows:
                if (r["replica_group"] == group and r["node"] != node
                        and r.get("role", "replica") == "replica"
                        and r["participants"] == 2 and r["last_step"] > 0):
                    return r
            return None
        new = self.wait(f"group {group} respawned on a spare and healed", rejoined, 180)
        result.fault_to_full_strength_s = time.time() - t0
        result.spare, result.step_rejoined = new["node"], new["last_step"]
        say(f"group {group} back on {new['node']} at step {new['last_step']}: seen at full "
            f"strength {result.fault_to_full_strength_s:.1f} s after the fault (polling; the "
            "summary reads the exact time from the training log)")

    def plot_timeline(self, t0: float, path: Path) -> tuple[dict[str, Any], str]:
        """The job's timeline from 30 s before the fault (the controller keeps 15 min), and
        the picture of it in `path` ("" when matplotlib is missing: the drill goes on)."""
        window = min(900.0, time.time() - t0 + 30.0)
        data = self.marduk("timeline", str(self.job_id), "--window", f"{window:.0f}")
        try:
            from marduk_slurm.adapters.timeline_plot import PlotsUnavailable, write_plot
            from marduk_slurm.domain.timeline import from_json

            title = (f"job {self.job_id}: XID 79, "
                     + ("hot spare" if self.hot_spares else "cold respawn"))
            write_plot(from_json(data), path, title=title)
        except PlotsUnavailable as exc:
            say(f"timeline plot not drawn: {exc}")
            return data, ""
        return data, str(path)

    def wait_job(self) -> str:
        def finished() -> str | None:
            out = self.scontrol("show", "-o", "job", str(self.job_id))
            state = out.split("JobState=", 1)[1].split()[0] if "JobState=" in out else ""
            return state if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None
        return str(self.wait(f"job {self.job_id} to finish", finished, 300))

    def stop(self) -> None:
        if self.job_id:
            subprocess.run(["scancel", str(self.job_id)], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def event_times(history: list[dict[str, Any]], t0: float) -> tuple[float, float]:
    """(verdict, drained) timestamps from the controller's own history."""
    verdict = next(e["ts"] for e in history if e["kind"] == "gpu_verdict" and e["ts"] >= t0
                   and e.get("xid") == 79)
    drained = next(e["ts"] for e in history if e["kind"] == "drained" and e["ts"] >= verdict)
    return verdict, drained


_PARTICIPANTS = re.compile(r"^group (\d+): participants (\d+) at step (\d+) t=([\d.]+)$")
_INCARNATION = re.compile(r"^group (\d+): replica \S+ on (\S+)")


def full_strength_at(output: str, group: int, old_node: str, groups: int,
                     after: float) -> float | None:
    """When the group's new incarnation (the first one started on another node than
    `old_node`) first committed a step in a quorum of all `groups` (scripts/train_tiny.py
    prints a line whenever its participant count changes)."""
    started = False
    for line in output.splitlines():
        if (m := _INCARNATION.match(line)) and int(m.group(1)) == group:
            started = started or m.group(2) != old_node
        elif (started and (m := _PARTICIPANTS.match(line)) and int(m.group(1)) == group
              and int(m.group(2)) == groups and float(m.group(4)) > after):
            return float(m.group(4))
    return None


_NOT_COMMITTED = re.compile(r"^group (\d+): step (\d+) not committed on (\S+) t=([\d.]+)$")
_FIRST_COMMIT = re.compile(r"^group (\d+): first commit at step (\d+) on (\S+) t=([\d.]+)$")
_EXIT = re.compile(r"^group (\d+): exit (-?\d+) at step (\d+) on (\S+)$")


def final_step(output: str) -> int:
    """The highest step a group exited at, from the training log: the last heartbeat before
    an exit may be lost (heartbeats are at most once), the exit line is not."""
    steps = [int(m.group(3)) for line in output.splitlines() if (m := _EXIT.match(line))]
    if not steps:
        raise ValueError("the training log has no exit line: the final step is unknown")
    return max(steps)


def step_losses(output: str, group: int, old_node: str, after: float
                ) -> tuple[int, int, int, int]:
    """(discarded, left_at, healed_to, redone), read from the training log
    (scripts/train_tiny.py):

    - discarded: step attempts in any group, after `after`, whose should_commit said no;
    - left_at: the last step the group committed on `old_node` before it exited;
    - healed_to: the step its new incarnation (on another node) started from, one below its
      first committed step;
    - redone: steps between the two that the group had committed and did again.

    ValueError when the log lacks the exit or the new incarnation's first commit: the figure
    is then unknown, not zero."""
    discarded, left_at, first = 0, None, None
    for line in output.splitlines():
        if (m := _NOT_COMMITTED.match(line)) and float(m.group(4)) >= after:
            discarded += 1
        elif (m := _EXIT.match(line)) and int(m.group(1)) == group and m.group(4) == old_node:
            left_at = int(m.group(3))
        elif ((m := _FIRST_COMMIT.match(line)) and int(m.group(1)) == group
              and m.group(3) != old_node and first is None):
            first = int(m.group(2))
    if left_at is None or first is None:
        raise ValueError(f"group {group}: the log lacks "
                         + ("its exit on " + old_node if left_at is None
                            else "a first commit on another node"))
    healed_to = first - 1
    return discarded, left_at, healed_to, max(0, left_at - healed_to)


_SLOW_STEP = re.compile(r"^group (\d+): slow step (\d+) took (\d+) ms on (\S+) t=([\d.]+)$")
_MEDIAN_STEP = re.compile(r"^group (\d+): median step (\d+) ms over (\d+) steps on (\S+)$")


def survivors_during(output: str, group: int, groups: int, after: float, until: float
                     ) -> tuple[float | None, float, int]:
    """(longest step, median step, steps at reduced strength) of the groups other than
    `group` between `after` and `until`, from the training log (scripts/train_tiny.py).
    The longest is None when no survivor step was slow enough to be printed."""
    longest: float | None = None
    medians: list[float] = []
    reduced, since = 0, {}  # survivor group -> the step it went below `groups` participants
    for line in output.splitlines():
        if (m := _SLOW_STEP.match(line)) and int(m.group(1)) != group and (
                after <= float(m.group(5)) <= until):
            longest = max(longest or 0.0, float(m.group(3)))
        elif (m := _MEDIAN_STEP.match(line)) and int(m.group(1)) != group:
            medians.append(float(m.group(2)))
        elif (m := _PARTICIPANTS.match(line)) and int(m.group(1)) != group and (
                after <= float(m.group(4)) <= until + 1.0):
            survivor, count, step = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if count < groups:
                since.setdefault(survivor, step)
            elif survivor in since:
                reduced += step - since.pop(survivor)
    return longest, max(medians, default=0.0), reduced


def run_drill(work: Path, *, max_steps: int = 300, step_sleep_s: float = 0.05,
              hot_spares: int = 0, finish_after: int | None = None,
              lighthouse_proxy: bool = True, plot: Path | None = None) -> DrillResult:
    """One drill. With `finish_after`, once the group is back at full strength the job is
    told (`marduk config set JOB max_steps=...`) to end that many steps later: a long
    `max_steps` then leaves room for a slow cold respawn without making every run long.
    The timeline's picture goes to `plot` (.svg or .png; default timeline.svg in `work`)."""
    drill = Drill(work, max_steps=max_steps, step_sleep_s=step_sleep_s, hot_spares=hot_spares,
                  lighthouse_proxy=lighthouse_proxy)
    result = DrillResult(work=str(work), hot_spares=hot_spares, max_steps=max_steps)
    try:
        drill.start_services()
        drill.submit_job()
        result.job_id = drill.job_id
        rows = drill.wait_training()
        victim = max(rows, key=lambda r: r["replica_group"])
        t0 = drill.inject(victim)
        result.step_at_fault = drill.survivor_step(victim)
        result.node, result.gpu_uuid = victim["node"], victim["gpu_uuids"][0]
        drill.follow(victim, t0, result)
        if finish_after is not None:
            last = max(r["last_step"] for r in drill.replicas())
            result.max_steps = last + finish_after
            drill.marduk("config", "set", str(drill.job_id), f"max_steps={result.max_steps}",
                         words=2)
        result.job_state = drill.wait_job()
        say(f"job {drill.job_id} finished: {result.job_state}")
        result.history = drill.marduk("history", "--since", str(t0 - 1), "--limit", "1000")
        result.replicas = drill.marduk("replicas", "--job", str(drill.job_id), "--all")
        result.timeline, result.timeline_plot = drill.plot_timeline(
            t0, plot or work / "timeline.svg")
        verdict_ts, drained_ts = event_times(result.history, t0 - 1)
        result.fault_to_drain_s = drained_ts - verdict_ts
        result.assumed_by_standby = any(e["kind"] == "standby_assumed" for e in result.history)
        output = "".join(p.read_text(errors="replace") for p in work.glob("job-*.out"))
        full = full_strength_at(output, victim["replica_group"], result.node, 2, verdict_ts)
        if full is not None:
            result.fault_to_full_strength_s = full - verdict_ts
        until = full if full is not None else verdict_ts + 60.0
        (result.survivors_longest_step_ms, result.survivors_median_step_ms,
         result.steps_at_reduced_strength) = survivors_during(
            output, victim["replica_group"], 2, verdict_ts, until)
        result.final_step = final_step(output)
        losses = step_losses(output, victim["replica_group"], result.node, t0)
        (result.steps_discarded, result.left_at_step, result.healed_to_step,
         result.steps_redone) = losses
        result.steps_lost = result.steps_discarded + result.steps_redone
    finally:
        if result.node:
            try:
                drill.reset_gpu(result.node, result.gpu_uuid)
            except (RuntimeError, StopIteration) as exc:
                say(f"  GPU not reset: {exc!r}")
            say(f"resuming {result.node} (marduk set this drain, so it may undo it)")
            try:
                drill.marduk("resume", result.node)
            except RuntimeError as exc:  # never drained (the drill failed before): say so
                say(f"  {exc}")
        say("stopping the agents and the controller")
        drill.stop()
    return result


def timeline_marks(timeline: dict[str, Any]) -> str:
    """What the timeline marked, in order, and what it did not see after the fault."""
    if not timeline:
        return ""
    kinds = " -> ".join(mk["kind"] for mk in timeline.get("marks", []))
    missing = timeline.get("missing") or []
    return f"\n                 marks: {kinds or 'none'}" + (
        f"; not seen: {', '.join(missing)}" if missing else "")


def summary(r: DrillResult) -> str:
    lines = ["", "=== drill summary ===",
             f"job            : {r.job_id}, {r.job_state}, reached step {r.final_step}",
             f"fault          : XID 79 on {r.node} GPU {r.gpu_uuid}",
             f"drained        : {r.node}, {r.fault_to_drain_s * 1000:.0f} ms after the verdict; "
             f"reason '{r.reason}'",
             f"replica moved  : {r.node} -> {r.spare} (the spare, "
             + ("a standby that assumed the group)" if r.assumed_by_standby
                else "respawned cold)"),
             f"full strength  : {r.fault_to_full_strength_s:.2f} s after the fault; the "
             f"surviving group was at step {r.step_at_fault} just after the injection, "
             f"{r.step_rejoined} when the replaced group was seen healed",
             "survivors      : longest step "
             + (f"{r.survivors_longest_step_ms:.0f} ms" if r.survivors_longest_step_ms
                else "under 100 ms")
             + f" between the fault and full strength (median step "
             f"{r.survivors_median_step_ms:.0f} ms); {r.steps_at_reduced_strength} step(s) "
             "trained without the replaced group",
             f"steps lost     : {r.steps_lost} = {r.steps_discarded} step attempts thrown away "
             f"after the fault (not committed, any group) + {r.steps_redone} redone (the "
             f"group left at step {r.left_at_step}, came back healed to step "
             f"{r.healed_to_step})",
             "timeline plot  : " + (r.timeline_plot or "not drawn (pip install "
                                    "'marduk-slurm[plots]')")
             + timeline_marks(r.timeline),
             "timeline (marduk history):"]
    t0 = r.history[0]["ts"] if r.history else 0.0
    for ev in r.history:
        if ev["kind"] in ("gpu_inventory",) or (ev["kind"] == "gpu_verdict"
                                                 and ev.get("xid") is None):
            continue
        lines.append(f"  +{ev['ts'] - t0:7.2f} s  {ev['kind']:<17} {ev['node'] or '-':<4} "
                     f"{ev['reason'][:90]}")
    state = f"{r.work}/controller"
    lines += [f"logs           : {r.work}",
              f"look next      : the drill's controller state is kept in {state}; reopen it "
              "with",
              f"                 .venv/bin/marduk controller --state-dir {state} "
              "--slurm-backend none &",
              f"                 then .venv/bin/marduk history --node {r.node} --state-dir "
              f"{state},",
              "                 marduk nodes, marduk replicas --all, and the dashboard at "
              "http://127.0.0.1:9108"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--step-sleep", type=float, default=0.05, help="seconds per step")
    ap.add_argument("--hot-spares", type=int, default=0, choices=(0, 1),
                    help="run the spare node as a standby (default 0: cold respawn)")
    ap.add_argument("--plot", type=Path, default=None, metavar="FILE",
                    help="the fault timeline's picture (.svg or .png; default timeline.svg "
                         "in the drill's work folder)")
    ap.add_argument("--no-lighthouse-proxy", action="store_true",
                    help="the Managers talk to the lighthouse directly (a commanded leave then "
                         "costs the survivors the whole heartbeat timeout)")
    args = ap.parse_args()
    if args.plot is not None and args.plot.suffix.lower() not in (".svg", ".png"):
        ap.error(f"--plot {args.plot}: the file must end in .svg or .png")
    work = Path(tempfile.mkdtemp(prefix="marduk-drill-"))
    try:
        result = run_drill(work, max_steps=args.max_steps, step_sleep_s=args.step_sleep,
                           hot_spares=args.hot_spares,
                           lighthouse_proxy=not args.no_lighthouse_proxy, plot=args.plot)
    except (RuntimeError, ValueError) as exc:  # ValueError: a figure the log cannot give
        say(f"drill failed: {exc}")
        return 1
    print(summary(result))
    return 0 if result.job_state == "COMPLETED" else 1


if __name__ == "__main__":
    sys.exit(main())
