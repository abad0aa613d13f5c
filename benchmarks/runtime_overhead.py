"""What ManagerMarduk costs a training step, and what a commanded leave costs the survivors.

1. Step time of two replica groups with torchft's own Manager, then with ManagerMarduk
   (reporting to a real controller), same model and script (tests/runtime_worker.py); the
   median step time of each and their ratio (goal <= 1.01).
2. Survivors' stall: three groups train; one is SIGKILLed, later one is told to leave. The
   stall is the longest gap between two commits of a survivor around each event, for each
   lighthouse --heartbeat_timeout_ms given.

    .venv/bin/python benchmarks/runtime_overhead.py [--steps 300] [--timeouts 5000,1000,500]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


from marduk_slurm.adapters.nats_server import NatsServerProcess

from harness import ControllerProcess, wait_for
from runtime_worker import Lighthouse, WorkerProcess, commit_gap, send_leave

JOB = 77


def step_times(w: WorkerProcess, skip: int) -> list[float]:
    return [r["dt"] for r in w.steps() if r.get("committed") and r["step"] > skip]


def run_pair(tmp: Path, manager: str, steps: int, env: dict[str, str]) -> float:
    lh = Lighthouse(tmp / f"lh-{manager}.log")
    workers = [WorkerProcess(g, lh, tmp, {**env, "WORKER_MANAGER": manager,
                                          "MAX_STEPS": str(steps), "MARDUK_NODE": f"n{g}"})
               for g in (0, 1)]
    try:
        for w in workers:
            if w.wait(600) != 0:
                raise RuntimeError(w.tail())
    finally:
        for w in workers:
            w.stop()
        lh.stop()
    times = [t for w in workers for t in step_times(w, 20)]
    return statistics.median(times)


def stall(tmp: Path, url: str, timeout_ms: int) -> tuple[float, float]:
    lh = Lighthouse(tmp / f"lh-{timeout_ms}.log", heartbeat_timeout_ms=timeout_ms)
    env = {"MARDUK_NATS_URL": url, "MARDUK_JOB_ID": str(JOB), "STEP_SLEEP_S": "0.02"}
    ws = {g: WorkerProcess(g, lh, tmp, {**env, "MARDUK_NODE": f"n{g}"}) for g in range(3)}

    def three() -> bool:
        return all(w.steps() and w.steps()[-1]["np"] == 3 for w in ws.values())

    def past(groups: list[int], n: int) -> bool:
        return all(ws[g].last_step() > n for g in groups)

    try:
        wait_for(three, 120, 0.1, "three groups in quorum")
        ws[2].kill()
        killed = time.time()
        mark = ws[0].last_step()
        wait_for(lambda: past([0, 1], mark + 10), 60, 0.1, "survivors after the kill")
        kill_stall = commit_gap(ws[0].steps(), killed)
        ws[2] = WorkerProcess(2, lh, tmp, {**env, "MARDUK_NODE": "n2"})
        wait_for(three, 120, 0.1, "group 2 back")
        replica_id = ws[1].events("ready")[0]["replica_id"]
        left = time.time()
        send_leave(url, JOB, replica_id, 1, "bench")
        ws[1].wait(30)
        mark = ws[0].last_step()
        wait_for(lambda: past([0, 2], mark + 10), 60, 0.1, "survivors after the leave")
        return kill_stall, commit_gap(ws[0].steps(), left)
    finally:
        for w in ws.values():
            w.stop()
        lh.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--timeouts", default="5000,1000,500")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        nats = NatsServerProcess(tmp / "nats")
        url = nats.start()
        ctl = ControllerProcess(tmp / "state", url).start()
        try:
            env = {"MARDUK_NATS_URL": url, "MARDUK_JOB_ID": str(JOB)}
            runs = [(k, run_pair(tmp, k, args.steps, env))
                    for k in ("torchft", "marduk", "torchft", "marduk")]
            plain = statistics.median([t for k, t in runs if k == "torchft"])
            marduk = statistics.median([t for k, t in runs if k == "marduk"])
            print(f"median step time, 2 groups, {args.steps} steps, 2 runs each: torchft Manager "
                  f"{plain * 1e3:.2f} ms, ManagerMarduk {marduk * 1e3:.2f} ms, ratio "
                  f"{marduk / plain:.3f} (goal <= 1.01)")
            for timeout_ms in (int(t) for t in args.timeouts.split(",")):
                kill_s, leave_s = stall(tmp, url, timeout_ms)
                print(f"heartbeat_timeout_ms={timeout_ms}: survivor stall after SIGKILL "
                      f"{kill_s:.2f} s, after a commanded leave {leave_s:.2f} s, ratio "
                      f"{leave_s / kill_s:.2f}")
        finally:
            ctl.stop()
            nats.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
