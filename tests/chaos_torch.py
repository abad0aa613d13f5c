"""NATS restarted under real torchft training (used by tests/test_chaos.py; needs torchft).

Two replica groups train on Gloo with ManagerMarduk against a real lighthouse, controller and
nats-server. NATS goes away for a few seconds: training must not notice (no step waits on
Marduk), and a configuration set right after NATS returns must reach both groups, which were
disconnected and fetch the latest revision again on reconnect."""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.nats_server import NatsServerProcess

from harness import ControllerProcess, cli_json, run_cli, wait_for
from runtime_worker import Lighthouse, WorkerProcess

JOB = 5151
OUTAGE_S = 4.0


def _gaps(worker: WorkerProcess, start: float, end: float) -> list[float]:
    times = [r["t"] for r in worker.steps() if r.get("committed")]
    return [b - a for a, b in itertools.pairwise(times) if b > start and a < end]


def nats_outage_under_training(tmp_path: Path, nats_server: NatsServerProcess,
                               ctl: ControllerProcess) -> dict[str, Any]:
    lighthouse = Lighthouse(tmp_path / "lighthouse.log", heartbeat_timeout_ms=1000)
    env = {"MARDUK_NATS_URL": ctl.url, "MARDUK_JOB_ID": str(JOB), "STEP_SLEEP_S": "0.05"}
    workers = [WorkerProcess(g, lighthouse, tmp_path, {**env, "MARDUK_STEP_ID": str(g),
                                                       "MARDUK_NODE": f"n{g}"})
               for g in range(2)]
    try:
        def alive() -> bool:
            for w in workers:
                assert w.proc.poll() is None, w.tail()
            return True

        def together() -> bool:
            return alive() and all(w.steps() and w.steps()[-1]["np"] == 2 for w in workers) \
                and len(cli_json("replicas", "--job", str(JOB), "--nats-url", ctl.url)) == 2
        wait_for(together, 120, 0.2, "both groups training together and registered")
        time.sleep(2.0)  # a baseline of step times
        down = time.time()
        nats_server.stop()
        time.sleep(OUTAGE_S)
        nats_server.start()
        back = time.time()
        ctl.wait_ready(30)
        # --no-wait: the time to apply is measured here, from `sent` on.
        proc = run_cli("config", "set", str(JOB), "lr=0.05", "--json", "--no-wait",
                       "--nats-url", ctl.url)
        assert proc.returncode == 0, proc.stderr
        sent = time.time()

        def applied() -> bool:
            alive()
            return all(any(r["lr"] == 0.05 for r in w.steps()) for w in workers)
        wait_for(applied, 60, 0.1, "lr=0.05 applied on both groups")
        applied_at = time.time()
        alive()
        first = [next(r["step"] for r in w.steps() if r["lr"] == 0.05) for w in workers]
        baseline = [g for w in workers for g in _gaps(w, down - 2.0, down)]
        outage = [g for w in workers for g in _gaps(w, down, back + 1.0)]
        steps_during = [sum(1 for r in w.steps() if down <= r["t"] <= back) for w in workers]
        def both_acked() -> Any:
            shown = cli_json("config", "show", str(JOB), "--nats-url", ctl.url)
            return all(r["acked"] == 2 for r in shown["revisions"]) and shown
        acked = wait_for(both_acked, 30, 0.2, "both acknowledgements")
        return {
            "NATS outage, s": f"{back - down:.2f}",
            "median step time before, s": f"{statistics.median(baseline):.3f}",
            "max step time during the outage, s": f"{max(outage):.3f}",
            "steps committed during the outage (group 0, 1)": ", ".join(map(str, steps_during)),
            "steps blocked (gap > 1 s during the outage)": sum(g > 1.0 for g in outage),
            "config set after NATS returned -> applied on both, s": f"{applied_at - sent:.2f}",
            "config applied on both groups at the same step": first[0] == first[1],
            "acknowledged by": acked["revisions"][0]["acked"],
        }
    finally:
        for w in workers:
            w.stop()
        lighthouse.stop()
