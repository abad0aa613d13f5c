"""A GPU fault under operator query load: verdict published -> drain decided.

A real nats-server and a real controller (`--slurm-backend none`) over a busy site's database
(100,000 replicas in 1,000 jobs on 12,500 nodes with known GPUs, 50,000 history rows, written
before start). Two arms in the same run, on the same controller:

1. baseline: XID 79 verdicts (`action="drain_node"`) published durably at a steady rate on
   nodes whose GPUs are known, nothing else going on;
2. under load: the same faults (on other nodes) while 200 requesters, each on its own NATS
   connection, keep asking the heaviest questions one after the other: `history` with
   limit 10000, `replicas` and `nodes` a page of 1,000 at a time (each requester walks on
   through the pages), and `top`.

Latency is from just before the durable publish to the `drain_requested` event for that node
on the controller's feed (marduk.v1.feed.event). Also printed: what happened to the requests
(the controller's `status` request counters and each requester's own tally), the controller's
CPU time and RSS in each arm.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/query_load.py [--requesters 200]
        [--rate 2] [--seconds 20] [--replicas 100000] [--events 50000] [--target-p99-ms 50]
        [--verbs history,replicas,nodes,top]

The requesters stop 1 s after the last verdict; a drain decided later than that was held up
by the backlog they left. Not a test: the target is printed next to the figure, met or not.
The default run takes about 100 s on two shared cores (the fill and the two 20 s fault
arms), up to 90 s more when verdicts are still undecided after the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from site_database import REPLICAS_PER_NODE, fill, gpu_uuid, node_name

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.errors import BusError, BusTimeout

from harness import ControllerProcess

REQUEST_TIMEOUT_S = 10.0
VERBS = ("history", "replicas", "nodes", "top")
DECIDE_WAIT_S = 90.0  # after the last verdict; a verdict not decided by then counts as inf
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- the requesters (run in child processes: `query_load.py --load URL N SECONDS`) ----------


async def requester(url: str, n: int, plan: list[str], stop_at: float, tally: Counter[str],
                    times: dict[str, list[float]]) -> None:
    """One operator's script: the heaviest questions, one after the other, until stop_at."""
    bus = Bus(url, name=f"bench-requester-{n}")
    await bus.connect()
    cursors: dict[str, Any] = {"replicas": None, "nodes": None}
    i = n  # requesters start at different verbs
    try:
        while time.monotonic() < stop_at:
            verb = plan[i % len(plan)]
            i += 1
            args: dict[str, Any] = {"limit": 10000} if verb == "history" else {}
            if verb in cursors:
                args = {"page_size": 1000, "cursor": cursors[verb]}
                args = {k: v for k, v in args.items() if v is not None}
            request = m.Request(args=args, actor="bench", timeout_ms=int(REQUEST_TIMEOUT_S * 1000))
            t0 = time.perf_counter()
            try:
                raw = await bus.request(subjects.rpc(verb), m.encode(request), REQUEST_TIMEOUT_S)
            except BusTimeout:
                tally[f"{verb}:timeout"] += 1
                continue
            except BusError:
                tally[f"{verb}:bus_error"] += 1
                await asyncio.sleep(0.1)
                continue
            reply = m.decode_reply(raw)
            if reply.ok:
                tally[f"{verb}:ok"] += 1
                times[verb].append(time.perf_counter() - t0)
                if verb in cursors:
                    cursors[verb] = reply.data.get("next")
            else:
                tally[f"{verb}:{reply.error_kind}"] += 1
                if reply.error_kind == "busy":  # as a polite script would: wait, then retry
                    await asyncio.sleep(0.05)
    finally:
        await bus.close()


async def load_process(url: str, count: int, first: int, seconds: float, plan: list[str]
                       ) -> None:
    tally: Counter[str] = Counter()
    times: dict[str, list[float]] = {v: [] for v in plan}
    print("ready", flush=True)
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(requester(url, first + k, plan, stop_at, tally, times)
                           for k in range(count)))
    print(json.dumps({"tally": tally, "times": times}), flush=True)


# -- the faults ------------------------------------------------------------------------------


def verdict(node_index: int) -> tuple[str, bytes, str]:
    node = node_name(node_index)
    msg = m.Verdict(node=node, gpu_uuid=gpu_uuid(node_index * REPLICAS_PER_NODE), gpu_index=0,
                    action=GpuAction.DRAIN_NODE, reason="xid 79: GPU has fallen off the bus",
                    xid=79, ts=time.time())
    return subjects.node_event(node, "verdict"), m.encode(msg), node


async def faults(url: str, first_node: int, count: int, rate: float) -> list[float]:
    """`count` verdicts at `rate` per second; seconds from publish to drain_requested each."""
    bus = Bus(url, name="bench-faults")
    await bus.connect()
    await bus.ensure_events_stream()
    sent: dict[str, float] = {}
    decided: dict[str, float] = {}
    all_decided = asyncio.Event()

    async def on_feed(msg: Any) -> None:
        ev = m.decode_feed(msg.data)
        if ev.kind == "drain_requested" and ev.node in sent and ev.node not in decided:
            decided[ev.node] = time.perf_counter()
            if len(decided) == count:
                all_decided.set()

    await bus.subscribe(subjects.FEED, on_feed)
    await bus.flush()
    t_start = time.perf_counter()
    for k in range(count):
        await asyncio.sleep(max(0.0, t_start + k / rate - time.perf_counter()))
        subject, data, node = verdict(first_node + k)
        sent[node] = time.perf_counter()
        await bus.publish_durable(subject, data)
    try:
        await asyncio.wait_for(all_decided.wait(), DECIDE_WAIT_S)
    except TimeoutError:
        print(f"  only {len(decided)}/{count} drains decided within {DECIDE_WAIT_S:.0f} s "
              "of the last verdict", flush=True)
    await bus.close()
    return [decided[n] - sent[n] for n in sent if n in decided]


# -- the controller process ------------------------------------------------------------------


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB."""
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return (int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024)


def settle(pid: int, limit_s: float = 60.0) -> float:
    """Wait until the controller's start-up work is done (under 5% of a core for a second);
    returns how long that took, so the baseline does not measure start-up."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        before = cpu_s(pid)
        time.sleep(1.0)
        if cpu_s(pid) - before < 0.05:
            break
    return time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(lat_s: list[float], sent: int) -> dict[str, Any]:
    """Percentiles over every verdict sent: one never decided counts as infinitely late."""
    ms = sorted([x * 1000 for x in lat_s] + [math.inf] * (sent - len(lat_s)))
    return {"n": sent, "decided": len(lat_s), "p50_ms": round(statistics.median(ms), 1),
            "p99_ms": round(pct(ms, 0.99), 1), "max_ms": round(ms[-1], 1),
            "slowest_ms": [round(x, 0) for x in ms[-4:]]}


def start_load(url: str, requesters: int, processes: int, seconds: float, verbs: str
               ) -> list[subprocess.Popen[str]]:
    procs = []
    per = -(-requesters // processes)
    for p in range(processes):
        count = min(per, requesters - p * per)
        if count <= 0:
            break
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--load", url, str(count), str(p * per), str(seconds),
             verbs],
            stdout=subprocess.PIPE, text=True))
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("a requester process did not start")
    return procs


def finish_load(procs: list[subprocess.Popen[str]]) -> tuple[Counter[str], dict[str, list[float]]]:
    tally: Counter[str] = Counter()
    times: dict[str, list[float]] = {}
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        data = json.loads(out.strip().splitlines()[-1])
        tally.update(data["tally"])
        for verb, values in data["times"].items():
            times.setdefault(verb, []).extend(values)
    return tally, times


@contextlib.contextmanager
def site_controller(tmp: str, state: Path) -> Iterator[tuple[ControllerProcess, str]]:
    """A real nats-server and controller (`--slurm-backend none`, no reconcile to speak of)
    over the database in `state`, started; (controller, NATS URL). Both stop at the end."""
    server = NatsServerProcess(Path(tmp) / "nats")
    url = server.start()
    ctl = ControllerProcess(state, url, reconcile_s=3600)
    try:
        ctl.start(timeout_s=120)
        assert ctl.proc is not None
        yield ctl, url
    finally:
        if ctl.proc is not None and ctl.proc.poll() is None:
            ctl.stop()
        server.stop()


def arm(ctl: ControllerProcess, pid: int, first_node: int, count: int, rate: float
        ) -> tuple[list[float], float]:
    cpu0, t0 = cpu_s(pid), time.perf_counter()
    lat = asyncio.run(faults(ctl.url, first_node, count, rate))
    return lat, (cpu_s(pid) - cpu0) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requesters", type=int, default=200)
    ap.add_argument("--processes", type=int, default=4, help="requester processes")
    ap.add_argument("--rate", type=float, default=2.0, help="verdicts per second")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each fault arm")
    ap.add_argument("--replicas", type=int, default=100_000)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--target-p99-ms", type=float, default=50.0)
    ap.add_argument("--verbs", default=",".join(VERBS),
                    help="what the requesters ask, in turn (to find which verb costs the "
                    "fault path most)")
    args = ap.parse_args()
    if not set(args.verbs.split(",")) <= set(VERBS):
        raise SystemExit(f"--verbs: choose from {','.join(VERBS)}")
    count = max(1, int(args.rate * args.seconds))
    nodes = args.replicas // REPLICAS_PER_NODE
    if 2 * count > nodes:
        raise SystemExit(f"{2 * count} faults need as many nodes; only {nodes}")
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        fill_s = fill(state / "marduk.db", replicas=args.replicas, jobs=args.jobs,
                      events=args.events)
        print(f"requesters ask: {args.verbs}")
        print(f"database: {args.replicas:,} replicas in {args.jobs:,} jobs on {nodes:,} nodes, "
              f"{args.events:,} events (written in {fill_s:.1f} s)", flush=True)
        with site_controller(tmp, state) as (ctl, url):
            assert ctl.proc is not None
            pid = ctl.proc.pid
            settle_s = settle(pid)
            rss_start = rss_mib(pid)
            print(f"controller ready and idle {settle_s:.1f} s after answering status",
                  flush=True)
            print(f"baseline: {count} verdicts at {args.rate:g}/s, no queries...", flush=True)
            base, base_cpu = arm(ctl, pid, 0, count, args.rate)
            rss_base = rss_mib(pid)
            before = ctl.request("status")["requests"]
            print(f"under load: {args.requesters} requesters, same faults on other nodes...",
                  flush=True)
            warmup_s = 3.0
            procs = start_load(url, args.requesters, args.processes,
                               warmup_s + args.seconds + 1.0, args.verbs)
            time.sleep(warmup_s)
            loaded, load_cpu = arm(ctl, pid, count, count, args.rate)
            tally, times = finish_load(procs)
            rss_load = rss_mib(pid)
            after = ctl.request("status", timeout_s=60)
    report(args, base, loaded, base_cpu, load_cpu, (rss_start, rss_base, rss_load),
           before, after, tally, times)
    return 0


def report(args: argparse.Namespace, base: list[float], loaded: list[float], base_cpu: float,
           load_cpu: float, rss: tuple[tuple[float, float], ...], before: dict[str, int],
           after: dict[str, Any], tally: Counter[str], times: dict[str, list[float]]) -> None:
    count = max(1, int(args.rate * args.seconds))
    b, ld = summary(base, count), summary(loaded, count)
    for label, arm_summary in (("no load   ", b), ("under load", ld)):
        print(f"verdict -> drain_requested, {label} : p50 {arm_summary['p50_ms']:7.1f} ms  "
              f"p99 {arm_summary['p99_ms']:7.1f} ms  max {arm_summary['max_ms']:7.1f} ms  "
              f"(decided {arm_summary['decided']}/{arm_summary['n']}; slowest "
              f"{arm_summary['slowest_ms']})")
    ratio_p50 = ld["p50_ms"] / b["p50_ms"] if b["p50_ms"] else float("nan")
    ratio_p99 = ld["p99_ms"] / b["p99_ms"] if b["p99_ms"] else float("nan")
    met = ld["p99_ms"] <= args.target_p99_ms
    print(f"ratio loaded/baseline                  : p50 {ratio_p50:.1f}x  p99 {ratio_p99:.1f}x")
    print(f"target p99 <= {args.target_p99_ms:g} ms under load      : "
          f"{'met' if met else 'NOT MET'} ({ld['p99_ms']} ms)")
    served = {k: after["requests"][k] - before.get(k, 0)
              for k in ("admitted", "refused_busy", "expired", "served")}
    print(f"controller requests during load        : {served} "
          f"(still waiting {after['requests']['waiting']})")
    counters = after.get("counters", {})
    print(f"  answered late {counters.get('rpc_answered_late', 0)}, too large "
          f"{counters.get('rpc_reply_too_large', 0)}, refused busy "
          f"{counters.get('rpc_refused_busy', 0)}")
    print(f"requesters' tally                      : {dict(sorted(tally.items()))}")
    for verb, values in sorted(times.items()):
        if values:
            ms = [v * 1000 for v in values]
            print(f"  {verb:8s} answered: n={len(ms):5d}  p50 {statistics.median(ms):7.1f} ms  "
                  f"p99 {pct(ms, 0.99):7.1f} ms")
    print(f"controller CPU (cores busy)            : baseline {base_cpu:.2f}, under load "
          f"{load_cpu:.2f}")
    print(f"controller RSS MiB (now / peak)        : after start {rss[0][0]:.0f}/{rss[0][1]:.0f}"
          f", after baseline {rss[1][0]:.0f}/{rss[1][1]:.0f}, after load "
          f"{rss[2][0]:.0f}/{rss[2][1]:.0f}")
    print(json.dumps({"baseline": b, "loaded": ld, "ratio_p99": round(ratio_p99, 2),
                      "target_p99_ms": args.target_p99_ms, "target_met": met,
                      "requests": served, "cpu_baseline": round(base_cpu, 2),
                      "cpu_loaded": round(load_cpu, 2), "rss_peak_mib": round(rss[2][1])}))


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--load":
        asyncio.run(load_process(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                 float(sys.argv[5]), sys.argv[6].split(",")))
        sys.exit(0)
    sys.exit(main())
