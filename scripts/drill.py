"""The fault drill: a real local Slurm cluster, the controller on its embedded NATS and SQLite,
one agent per node with simulated GPUs, an injected XID 79, and what marduk does about it.

Run by scripts/demo.sh (which sets up the environment and the cluster first). Prints what it
does at each stage and ends with a summary. Leaves nothing running.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MARDUK = [sys.executable, "-m", "marduk_slurm.cli.main"]


def say(text: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {text}", flush=True)


def slurm_conf() -> str:
    out = subprocess.run(["bash", str(REPO / "scripts" / "slurm-cluster.sh"), "env"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1].removeprefix("export SLURM_CONF=")


class Drill:
    def __init__(self, work: Path, nodes: list[str], conf: str) -> None:
        self.work = work
        self.nodes = nodes
        self.state = work / "controller"
        self.env = {**os.environ, "SLURM_CONF": conf, "MARDUK_SLURM_CONF": conf,
                    "MARDUK_CONTROLLER_RECONCILE_INTERVAL_S": "5"}
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.work / f"{name}.log").open("ab")
        proc = subprocess.Popen([*MARDUK, *args], stdout=log, stderr=subprocess.STDOUT,
                                env=self.env, cwd=REPO)
        self.procs.append(proc)
        return proc

    def marduk(self, *args: str) -> Any:
        out = subprocess.run([*MARDUK, *args, "--state-dir", str(self.state), "--json"],
                             capture_output=True, text=True, env=self.env, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"marduk {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def wait(self, what: str, check: Any, timeout_s: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = check()
            except RuntimeError:
                value = None
            if value:
                return value
            time.sleep(0.1)
        raise SystemExit(f"drill failed: timed out waiting for {what}; logs in {self.work}")

    def start(self) -> None:
        say(f"starting the controller (embedded NATS + SQLite in {self.state})")
        self.spawn("controller", "controller", "--state-dir", str(self.state),
                   "--slurm-backend", "commands")
        self.wait("the controller", lambda: self.marduk("status"))
        for node in self.nodes:
            self.spawn(f"agent-{node}", "agent", "--node", node, "--simulate-gpus", "2",
                       "--socket", str(self.work / f"agent-{node}.sock"),
                       "--state-dir", str(self.work / f"agent-{node}"),
                       "--controller-state-dir", str(self.state))
        say(f"started {len(self.nodes)} agents with 2 simulated GPUs each")
        self.wait("every agent's GPU inventory", lambda: self.marduk("status")["gpus"]
                  >= 2 * len(self.nodes))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


def run(drill: Drill, node: str, gpu: int) -> dict[str, Any]:
    t0 = time.time()
    say(f"injecting XID 79 (GPU has fallen off the bus) on {node} GPU {gpu}")
    injected = drill.marduk("inject", "--node", node, "--gpu", str(gpu), "--xid", "79")
    say(f"  -> verdict {injected.get('action')} via {injected.get('via')}")
    drained = drill.wait(f"{node} drained in Slurm", lambda: [
        n for n in drill.marduk("nodes", node) if "DRAIN" in n["flags"]])
    t_drain = time.time()
    say(f"{node} drained in Slurm after {(t_drain - t0) * 1000:.0f} ms: {drained[0]['reason']}")
    history = drill.marduk("history", "--node", node, "--since", str(t0 - 1))
    say(f"resuming {node} (marduk set this drain, so it may undo it)")
    drill.marduk("resume", node)
    return {"node": node, "gpu": injected.get("gpu_uuid"), "fault_to_drain_ms":
            round((t_drain - t0) * 1000), "reason": drained[0]["reason"], "history": history}


def summary(result: dict[str, Any], work: Path) -> None:
    print("\n=== drill summary ===")
    print(f"fault        : XID 79 on {result['node']} GPU {result['gpu']}")
    print(f"drained      : {result['node']} in {result['fault_to_drain_ms']} ms, "
          f"reason '{result['reason']}'")
    print("timeline     :")
    t0 = result["history"][0]["ts"] if result["history"] else 0
    for ev in result["history"]:
        print(f"  +{(ev['ts'] - t0) * 1000:7.0f} ms  {ev['kind']:<18} {ev['reason']}")
    print(f"logs         : {work}")
    print("look next    : marduk nodes, marduk history --node "
          f"{result['node']}, marduk status (with --state-dir of a running controller)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--node", default="n2")
    ap.add_argument("--gpu", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="marduk-drill-"))
    drill = Drill(work, ["n1", "n2", "n3", "n4"], slurm_conf())
    try:
        drill.start()
        result = run(drill, args.node, args.gpu)
    finally:
        say("stopping the agents and the controller")
        drill.stop()
    summary(result, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
