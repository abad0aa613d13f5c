"""What ManagerMarduk costs a training step, and what a commanded leave costs the survivors.

1. The hook's own cost: in every step, the time spent in ManagerMarduk's code (its
   start_quorum and should_commit minus torchft's inside them, plus should_stop), timed in
   the worker (tests/runtime_worker.py, HookClock); p50 and p99 in microseconds. The same
   clock around torchft's own Manager gives the floor (what the clock itself costs).
2. Step time: two replica groups with torchft's own Manager, then with ManagerMarduk
   (reporting to a real controller), same model and script, in interleaved pairs (the order
   alternates: A B, B A, ...). Each run gives its median step time (boundary included);
   each pair a ratio. The figure is the geometric mean of the pairs' ratios with a 95%
   confidence interval (Student t over the log ratios): the goal (<= 1.01) is met only when
   the whole interval is below it, and not resolved while the interval spans it.
3. Survivors' stall: three groups train; one is SIGKILLed, later one is told to leave. The
   stall is the longest gap between two commits of a survivor around each event, for each
   lighthouse --heartbeat_timeout_ms given (none: skipped).
4. The same commanded leave with the Managers behind `marduk lighthouse-proxy` (the real
   lighthouse at a short timeout and quorum tick, the proxy holding the 1000 ms timeout) and
   without it (the lighthouse at 1000 ms, tick 100 ms), alternating, --proxy-runs runs of
   each arm; --proxy-settings lists the proxied arms as SHORT_MS/TICK_MS. For each arm: the
   survivors' stall and their longest step around the leave (p50/p90/max), how far the
   longest step is above the survivors' median step (the target: at most 250 ms); then, in
   the same runs, a SIGKILL of a second group (what an unannounced death costs). Before each
   leave the three groups train STEADY_STEPS steps; a step out of the full quorum then is a
   live replica the lighthouse dropped (the short timeout too short for this host), counted.

    .venv/bin/python benchmarks/runtime_overhead.py [--steps 300] [--pairs 6]
        [--timeouts 5000,1000,500] [--proxy-runs 5] [--proxy-settings 250/100,150/25]
        [--sections overhead,stall,proxy]
"""

from __future__ import annotations

import argparse
import math
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
STEADY_STEPS = 100  # steps of all three groups before the leave, watched for false drops


def committed(w: WorkerProcess, skip: int) -> list[dict[str, float]]:
    return [r for r in w.steps() if r.get("committed") and r["step"] > skip]


def run_pair(tmp: Path, manager: str, steps: int, env: dict[str, str]
             ) -> tuple[float, list[float]]:
    """(median step time in s, the hook's cost of every step in us) of two groups."""
    lh = Lighthouse(tmp / f"lh-{manager}.log")
    workers = [WorkerProcess(g, lh, tmp, {**env, "WORKER_MANAGER": manager,
                                          "WORKER_HOOK_TIMING": "1",
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
    records = [r for w in workers for r in committed(w, 20)]
    return statistics.median(r["dt"] for r in records), [r["hook_us"] for r in records]


# Student t, two-sided 95%, by degrees of freedom (beyond the table: the normal's 1.96).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def ratio_ci(ratios: list[float]) -> tuple[float, float, float]:
    """Geometric mean of `ratios` and its 95% confidence interval."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    df = len(logs) - 1
    t = T95.get(df) or next((v for k, v in sorted(T95.items()) if k >= df), 1.96)
    half = t * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def overhead(tmp: Path, env: dict[str, str], steps: int, pairs: int) -> None:
    ratios: list[float] = []
    times: dict[str, list[float]] = {"torchft": [], "marduk": []}
    hooks: dict[str, list[float]] = {"torchft": [], "marduk": []}
    for i in range(pairs):
        pair: dict[str, float] = {}
        for kind in (("torchft", "marduk") if i % 2 == 0 else ("marduk", "torchft")):
            pair[kind], hook_us = run_pair(tmp, kind, steps, env)
            times[kind].append(pair[kind])
            hooks[kind].extend(hook_us)
        ratios.append(pair["marduk"] / pair["torchft"])
        print(f"  pair {i + 1}: torchft {pair['torchft'] * 1e3:.2f} ms, marduk "
              f"{pair['marduk'] * 1e3:.2f} ms, ratio {ratios[-1]:.3f}", flush=True)
    for kind, label in (("marduk", "ManagerMarduk's own code"),
                        ("torchft", "the clock around torchft's Manager (floor)")):
        us = hooks[kind]
        print(f"hook cost per step, {label}: p50 {percentile(us, 0.5):.0f} us, p99 "
              f"{percentile(us, 0.99):.0f} us ({len(us)} steps)")
    step_us = statistics.median(times["marduk"]) * 1e6
    print(f"  p50 hook cost / median step ({step_us / 1e3:.2f} ms): "
          f"{percentile(hooks['marduk'], 0.5) / step_us:.2%}")
    mean, low, high = ratio_ci(ratios)
    verdict = ("met" if high <= 1.01 else "NOT MET" if low > 1.01
               else "not resolved (the interval spans it)")
    print(f"step time ratio ManagerMarduk/torchft over {pairs} interleaved pairs, "
          f"{steps} steps, 2 groups: {mean:.3f} (95% CI {low:.3f}-{high:.3f}); "
          f"goal <= 1.01: {verdict}")
    print(f"  per-run medians: torchft {', '.join(f'{t * 1e3:.2f}' for t in times['torchft'])}"
          f" ms; marduk {', '.join(f'{t * 1e3:.2f}' for t in times['marduk'])} ms")


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


def proxied_leave(tmp: Path, url: str, setting: tuple[int, int] | None, run: int
                  ) -> dict[str, float]:
    """Three groups; group 1 told to leave, then group 2 SIGKILLed. Survivor group 0's stall
    and the survivors' longest step after each, without the liveness proxy (`setting`
    None) or with it, the lighthouse at (short timeout, quorum tick) in ms."""
    proxy = setting is not None
    short_ms, tick_ms = setting or (1000, 100)
    tag = f"{short_ms}-{tick_ms}-{'proxy' if proxy else 'plain'}-{run}"
    lh = Lighthouse(tmp / f"lh-{tag}.log", heartbeat_timeout_ms=short_ms,
                    quorum_tick_ms=tick_ms)
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
        steady_from = time.time()
        warm = ws[0].last_step() + STEADY_STEPS
        wait_for(lambda: past([0, 1, 2], warm), 120, 0.1, "steady steps")
        replica_id = ws[1].events("ready")[0]["replica_id"]
        left = time.time()
        # A live replica dropped by the lighthouse with nobody told to leave (the short
        # timeout too short for the proxy's relays on this host): steps not in the full quorum.
        false_drops = sum(1 for w in ws.values() for r in w.steps()
                          if steady_from <= r["t"] < left and r["np"] < 3)
        send_leave(url, JOB, replica_id, 1, "bench")
        mark = ws[0].last_step()
        wait_for(lambda: past([0, 2], mark + 20), 60, 0.1, "survivors after the leave")
        try:
            ws[1].wait(30)
        except subprocess.TimeoutExpired:
            print(f"  run {run}: the leaver did not exit within 30 s after its leave:\n"
                  f"{ws[1].tail()[-1500:]}", flush=True)
        out = {"leave_stall": commit_gap(ws[0].steps(), left),
               "leave_step": longest_step([ws[0], ws[2]], left, time.time()),
               "median_step": statistics.median(
                   r["dt"] for w in (ws[0], ws[2]) for r in w.steps() if r["t"] < left)}
        out["above_median"] = out["leave_step"] - out["median_step"]
        out["false_drops"] = false_drops
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


def proxy_section(tmp: Path, url: str, runs: int, settings: list[tuple[int, int]]) -> None:
    arms: list[tuple[int, int] | None] = [None, *settings]
    results: dict[tuple[int, int] | None, list[dict[str, float]]] = {a: [] for a in arms}
    for run in range(runs):
        for arm in arms:
            r = proxied_leave(tmp, url, arm, run)
            results[arm].append(r)
            print(f"  run {run} {label(arm)}: " + ", ".join(
                f"{k} {v:.0f}" if k == "false_drops" else f"{k} {v:.3f} s"
                for k, v in r.items()), flush=True)
    for arm in arms:
        drops = sum(int(r["false_drops"]) for r in results[arm])
        print(f"steps out of the full quorum with nobody told to leave, {label(arm)}: "
              f"{drops} in {runs} x {STEADY_STEPS} steady steps of 3 groups")
    for key, what in (("leave_stall", "survivor stall after a commanded leave"),
                      ("leave_step", "survivors' longest step around the leave"),
                      ("above_median", "longest step above the median step"),
                      ("kill_stall", "survivor stall after a SIGKILL")):
        plain = statistics.median(r[key] for r in results[None])
        print(f"{what}, {runs} runs each:")
        for arm in arms:
            values = [r[key] for r in results[arm]]
            print(f"  {label(arm):34s} p50 {pct(values, .5):.3f} s  p90 {pct(values, .9):.3f} s"
                  f"  max {max(values):.3f} s  p50 ratio to no proxy "
                  f"{statistics.median(values) / plain:.2f}")
    for arm in settings:
        worst = max(r["above_median"] for r in results[arm])
        print(f"target: survivors' longest step <= median + 0.250 s, {label(arm)}: worst "
              f"+{worst:.3f} s: {'met' if worst <= 0.250 else 'NOT MET'}")


def label(arm: tuple[int, int] | None) -> str:
    return ("no proxy (lighthouse 1000 ms)" if arm is None
            else f"proxy, lighthouse {arm[0]} ms tick {arm[1]} ms")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=6,
                        help="interleaved torchft/ManagerMarduk pairs (at least 2 for a CI)")
    parser.add_argument("--timeouts", default="5000,1000,500",
                        help="lighthouse heartbeat timeouts for the stall runs ('' skips)")
    parser.add_argument("--proxy-runs", type=int, default=5)
    parser.add_argument("--proxy-settings", default="250/100",
                        help="proxied arms as SHORT_MS/TICK_MS, comma-separated")
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
                overhead(tmp, env, args.steps, args.pairs)
            timeouts = [int(t) for t in args.timeouts.split(",") if t] if "stall" in sections \
                else []
            for timeout_ms in timeouts:
                kill_s, leave_s = stall(tmp, url, timeout_ms)
                print(f"heartbeat_timeout_ms={timeout_ms}: survivor stall after SIGKILL "
                      f"{kill_s:.2f} s, after a commanded leave {leave_s:.2f} s, ratio "
                      f"{leave_s / kill_s:.2f}")
            if "proxy" in sections:
                settings = [(int(a), int(b)) for a, b in (
                    item.split("/") for item in args.proxy_settings.split(","))]
                proxy_section(tmp, url, args.proxy_runs, settings)
        finally:
            ctl.stop()
            nats.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
