"""What ManagerMarduk costs a training step, and what a commanded leave costs the survivors.

1. Step time of two replica groups with torchft's own Manager, then with ManagerMarduk
   (reporting to a real controller), same model and script (tests/runtime_worker.py); the
   median step time of each and their ratio (goal <= 1.01).
2. Survivors' stall: three groups train; one is SIGKILLed, later one is told to leave. The
   stall is the longest gap between two commits of a survivor around each event, for each
   lighthouse --heartbeat_timeout_ms given.
3. The same commanded leave with the Managers behind `marduk lighthouse-proxy` (the real
   lighthouse at --short-ms, the proxy holding the 1000 ms timeout) and without it (the
   lighthouse at 1000 ms), alternating, --proxy-runs runs each: the survivors' stall and their
   longest step around the leave, p50/p90; then, in the same runs, a SIGKILL of a second group
   (what an unannounced death costs with the proxy).

    .venv/bin/python benchmarks/runtime_overhead.py [--steps 300] [--timeouts 5000,1000,500]
        [--proxy-runs 5] [--short-ms 250] [--sections overhead,stall,proxy]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


from marduk_slurm.adapters.nats_server import NatsServerProcess

from harness import ControllerProcess, wait_for
from runtime_worker import (
    Lighthouse,
    LighthouseProxyProcess,
    WorkerProcess,
    commit_gap,
    send_leave,
)

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


def overhead(tmp: Path, steps: int, env: dict[str, str]) -> None:
    runs = [(k, run_pair(tmp, k, steps, env)) for k in ("torchft", "marduk", "torchft", "marduk")]
    plain = statistics.median([t for k, t in runs if k == "torchft"])
    marduk = statistics.median([t for k, t in runs if k == "marduk"])
    print(f"median step time, 2 groups, {steps} steps, 2 runs each: torchft Manager "
          f"{plain * 1e3:.2f} ms, ManagerMarduk {marduk * 1e3:.2f} ms, ratio "
          f"{marduk / plain:.3f} (goal <= 1.01)")


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


def longest_step(ws: list[WorkerProcess], after: float, before: float) -> float:
    """The survivors' longest step that ended between `after` and `before` (wall clock)."""
    return max((r["dt"] for w in ws for r in w.steps() if after <= r["t"] <= before),
               default=0.0)


def proxied_leave(tmp: Path, url: str, proxy: bool, short_ms: int, run: int
                  ) -> dict[str, float]:
    """Three groups; group 1 told to leave, then group 2 SIGKILLed. Survivor group 0's stall
    and the survivors' longest step after each, with or without the liveness proxy."""
    tag = f"{'proxy' if proxy else 'plain'}-{run}"
    lh = Lighthouse(tmp / f"lh-{tag}.log", heartbeat_timeout_ms=short_ms if proxy else 1000)
    front: Lighthouse | LighthouseProxyProcess = lh
    if proxy:
        front = LighthouseProxyProcess(lh, tmp / f"proxy-{tag}.log", long_timeout_ms=1000,
                                       job_id=JOB, nats_url=url)
    env = {"MARDUK_NATS_URL": url, "MARDUK_JOB_ID": str(JOB), "STEP_SLEEP_S": "0.02"}
    ws = {g: WorkerProcess(g, front, tmp, {**env, "MARDUK_NODE": f"n{g}"}) for g in range(3)}

    def past(groups: list[int], n: int) -> bool:
        return all(ws[g].last_step() > n for g in groups)

    try:
        wait_for(lambda: all(w.steps() and w.steps()[-1]["np"] == 3 for w in ws.values()),
                 120, 0.1, "three groups in quorum")
        if isinstance(front, LighthouseProxyProcess):
            wait_for(lambda: front.stats()["nats_connected"], 30, 0.1, "the proxy on NATS")
        warm = ws[0].last_step() + 20
        wait_for(lambda: past([0, 1, 2], warm), 60, 0.1, "warm steps")
        replica_id = ws[1].events("ready")[0]["replica_id"]
        left = time.time()
        send_leave(url, JOB, replica_id, 1, "bench")
        mark = ws[0].last_step()
        wait_for(lambda: past([0, 2], mark + 20), 60, 0.1, "survivors after the leave")
        try:
            ws[1].wait(30)
        except subprocess.TimeoutExpired:
            print(f"  run {run}: the leaver did not exit within 30 s after its leave:\n"
                  f"{ws[1].tail()[-1500:]}", flush=True)
        out = {"leave_stall": commit_gap(ws[0].steps(), left),
               "leave_step": longest_step([ws[0], ws[2]], left, time.time())}
        ws[2].kill()
        killed = time.time()
        mark = ws[0].last_step()
        wait_for(lambda: past([0], mark + 20), 60, 0.1, "the survivor after the kill")
        out["kill_stall"] = commit_gap(ws[0].steps(), killed)
        return out
    finally:
        for w in ws.values():
            w.stop()
        if isinstance(front, LighthouseProxyProcess):
            front.stop()
        lh.stop()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def proxy_section(tmp: Path, url: str, runs: int, short_ms: int) -> None:
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for run in range(runs):
        for proxy in (False, True):
            r = proxied_leave(tmp, url, proxy, short_ms, run)
            results[proxy].append(r)
            print(f"  run {run} {'proxy' if proxy else 'plain'}: " + ", ".join(
                f"{k} {v:.3f} s" for k, v in r.items()), flush=True)
    for key, what in (("leave_stall", "survivor stall after a commanded leave"),
                      ("leave_step", "survivors' longest step around the leave"),
                      ("kill_stall", "survivor stall after a SIGKILL")):
        plain = [r[key] for r in results[False]]
        prox = [r[key] for r in results[True]]
        print(f"{what}, {runs} runs: without proxy p50 {pct(plain, .5):.3f} s p90 "
              f"{pct(plain, .9):.3f} s; with proxy (lighthouse {short_ms} ms) p50 "
              f"{pct(prox, .5):.3f} s p90 {pct(prox, .9):.3f} s; ratio of p50 "
              f"{statistics.median(prox) / statistics.median(plain):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--timeouts", default="5000,1000,500")
    parser.add_argument("--proxy-runs", type=int, default=5)
    parser.add_argument("--short-ms", type=int, default=250)
    parser.add_argument("--sections", default="overhead,stall,proxy")
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        nats = NatsServerProcess(tmp / "nats")
        url = nats.start()
        ctl = ControllerProcess(tmp / "state", url).start()
        try:
            env = {"MARDUK_NATS_URL": url, "MARDUK_JOB_ID": str(JOB)}
            if "overhead" in sections:
                overhead(tmp, args.steps, env)
            for timeout_ms in (int(t) for t in args.timeouts.split(",") if "stall" in sections):
                kill_s, leave_s = stall(tmp, url, timeout_ms)
                print(f"heartbeat_timeout_ms={timeout_ms}: survivor stall after SIGKILL "
                      f"{kill_s:.2f} s, after a commanded leave {leave_s:.2f} s, ratio "
                      f"{leave_s / kill_s:.2f}")
            if "proxy" in sections:
                proxy_section(tmp, url, args.proxy_runs, args.short_ms)
        finally:
            ctl.stop()
            nats.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
