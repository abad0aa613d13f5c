"""A fleet on one controller: agents' and replicas' traffic of N nodes at once, faults under it.

For each size (nodes), on a fresh state: the mapping of a busy site is written first
(site_database: 8 GPUs and 8 replicas per node, 1 job per 80 replicas, as in the target
shape of 10,000 nodes, 80,000 GPUs and 1,000 jobs), then a real nats-server and a real
controller (`--slurm-backend none`) start, and simulator processes send what the nodes would:

- every replica's heartbeat once a second (`marduk.v1.hb.<job>`, spread over the second);
- every node's health summary every 5 s, each GPU with its NVML counters
  (`marduk.v1.health.<node>`, spread over the 5 s);
- step churn: job steps starting and ending on the nodes, as agents relay them from the
  SPANK plugin (durable `step_start` then, STEP_LIFE_S later, `step_end`), at --churn steps
  per second over the fleet (default: one per 100 nodes per second). Each is a step of one
  of the site's jobs with a step id of its own and no GPU, so it adds the durable writes
  and history events of a busy site without remapping the replicas the faults hit.

Under that load the main process publishes XID 79 verdicts at a steady rate (durable, as an
agent does) on nodes with replicas and times each:

- fault -> drain decided: the `drain_requested` event on the controller's feed;
- fault -> leave received: the first leave command for a replica of that node, as the
  replica's own subscription sees it.

With `--slurm-backend none` the drain stays queued in the outbox: the Slurm call itself is
not in these figures (on the local Slurm cluster it adds about 25 ms: fault_to_drain.py). Also
printed: the controller's CPU (cores busy) and RSS over the loaded window, the database's
growth (extrapolated per hour), the heartbeat lag the controller reports, what the simulator
sent against what the controller took, and restart to ready with that state (SIGTERM, start,
first answered `status`). Then how each cost grows with the size.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/fleet.py [--sizes 250,500,1000,2000]
        [--seconds 20] [--fault-rate 2] [--processes 2]

Targets (from the issue, printed next to the largest size reached, met or not): fault to
drain decided p99 <= 50 ms, fault to leave p99 <= 25 ms, restart to ready <= 2 s, the
controller <= 1 core and <= 1 GiB. This machine has 2 cores for everything: the simulators,
nats-server and the controller share them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from query_load import cpu_s, pct, rss_mib, settle, site_controller
from site_database import REPLICAS_PER_NODE, fill, gpu_uuid, node_name

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction

REPLICAS_PER_JOB = 80  # 80,000 replicas in 1,000 jobs at the target shape
HEALTH_EVERY_S = 5.0
STEP_LIFE_S = 10.0  # a churned step ends this long after it started
CHURN_STEP_BASE = 100_000  # churned steps' ids start here, clear of the site's own
TARGETS = {"drain_p99_ms": 50.0, "leave_p99_ms": 25.0, "restart_s": 2.0, "cores": 1.0,
           "rss_mib": 1024.0}


def replica(i: int) -> tuple[str, int]:
    """(replica id, job) of replica i, as site_database writes them."""
    job, group = divmod(i, REPLICAS_PER_JOB)
    return f"job{job}_rg{group}:" + "u" * 36, job


# -- the simulators (child processes: `fleet.py --sim URL FIRST COUNT SECONDS`) --------------


def health(node_index: int, t: float) -> tuple[str, bytes]:
    node = node_name(node_index)
    gpus = [m.HealthGpu(uuid=gpu_uuid(node_index * REPLICAS_PER_NODE + k), index=k,
                        action="none", reason="healthy",
                        counters=m.GpuCounters(ecc_sbe_volatile=0, ecc_sbe_aggregate=3,
                                               ecc_dbe_volatile=0, ecc_dbe_aggregate=0,
                                               retired_pages_sbe=0, retired_pages_dbe=0,
                                               temperature_c=61.0 + k, power_w=650.0))
            for k in range(REPLICAS_PER_NODE)]
    return subjects.node_health(node), m.encode(m.HealthSummary(node=node, gpus=gpus))


class StepChurn:
    """Steps starting and ending on the simulator's nodes at `per_s`, each published
    durably (as an agent's outbox does) on a task of its own, so that a slow JetStream
    acknowledgement does not hold up the heartbeats."""

    def __init__(self, bus: Bus, first_node: int, nodes: int, per_s: float,
                 sent: Counter[str]) -> None:
        self.bus, self.first_node, self.nodes, self.per_s = bus, first_node, nodes, per_s
        self.sent = sent
        self.started = 0
        self.open: list[tuple[float, m.StepEnd]] = []
        self.tasks: set[asyncio.Task[None]] = set()

    def tick(self, elapsed_s: float, now: float) -> None:
        while self.per_s > 0 and self.started < elapsed_s * self.per_s:
            index = self.first_node + self.started % self.nodes
            node = node_name(index)
            _, job = replica(index * REPLICAS_PER_NODE)
            step = CHURN_STEP_BASE + self.first_node * 1000 + self.started
            self.started += 1
            self._publish("step_start", m.StepStart(job_id=job, step_id=step, node=node))
            self.open.append((now + STEP_LIFE_S,
                              m.StepEnd(job_id=job, step_id=step, node=node, exit_status=0)))
        while self.open and self.open[0][0] <= now:
            self._publish("step_end", self.open.pop(0)[1])

    def _publish(self, kind: str, msg: m.StepStart | m.StepEnd) -> None:
        async def send() -> None:
            try:
                await self.bus.publish_durable(subjects.node_event(msg.node, kind),
                                               m.encode(msg))
                self.sent[kind] += 1
            except Exception as exc:  # counted: the report shows what did not go out
                self.sent[f"{kind}_failed:{type(exc).__name__}"] += 1
        task = asyncio.get_running_loop().create_task(send())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)


async def simulate(url: str, first_node: int, nodes: int, seconds: float, churn_per_s: float
                   ) -> dict[str, int]:
    """Send the nodes' traffic for `seconds`: each replica's heartbeat every second and each
    node's health every HEALTH_EVERY_S, both spread evenly, and the step churn; returns what
    was sent."""
    bus = Bus(url, name=f"fleet-sim-{first_node}")
    await bus.connect()
    sent: Counter[str] = Counter()
    churn = StepChurn(bus, first_node, nodes, churn_per_s, sent)
    replicas = range(first_node * REPLICAS_PER_NODE, (first_node + nodes) * REPLICAS_PER_NODE)
    ids = [replica(i) for i in replicas]
    start = time.monotonic()
    tick, ticks_per_s = 0, 20  # publish in 50 ms slices
    step = 0
    while time.monotonic() - start < seconds:
        await asyncio.sleep(max(0.0, start + tick / ticks_per_s - time.monotonic()))
        now = time.time()
        slot = tick % ticks_per_s
        if slot == 0:
            step += 1
        for rid, job in ids[slot::ticks_per_s]:
            await bus.publish(subjects.heartbeat(job), m.encode(m.Heartbeat(
                replica_id=rid, job_id=job, step=step, step_time_ms=1000.0,
                participants=REPLICAS_PER_JOB, ts=now)))
            sent["heartbeats"] += 1
        health_slots = int(HEALTH_EVERY_S * ticks_per_s)
        for k in range(tick % health_slots, nodes, health_slots):
            subject, data = health(first_node + k, now)
            await bus.publish(subject, data)
            sent["health"] += 1
        churn.tick(time.monotonic() - start, time.monotonic())
        tick += 1
    await churn.drain()
    await bus.close()
    return dict(sent)


def start_simulators(url: str, nodes: int, processes: int, seconds: float, churn_per_s: float
                     ) -> list[subprocess.Popen[str]]:
    per = -(-nodes // processes)
    procs = []
    for p in range(processes):
        count = min(per, nodes - p * per)
        if count > 0:
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--sim", url, str(p * per), str(count), str(seconds),
                 str(churn_per_s * count / nodes)],
                stdout=subprocess.PIPE, text=True))
    return procs


def simulators_sent(procs: list[subprocess.Popen[str]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        total.update(json.loads(out.strip().splitlines()[-1]))
    return total


# -- the faults ------------------------------------------------------------------------------


async def faults(url: str, nodes: list[int], rate: float, wait_s: float = 30.0
                 ) -> tuple[list[float], list[float], int]:
    """One XID 79 verdict per node at `rate` per second; (fault -> drain decided, fault ->
    leave received) in seconds, and how many were sent."""
    bus = Bus(url, name="fleet-faults")
    await bus.connect()
    await bus.ensure_events_stream()
    sent: dict[str, float] = {}
    decided: dict[str, float] = {}
    left: dict[str, float] = {}

    async def on_feed(msg: Any) -> None:
        ev = m.decode_feed(msg.data)
        if ev.kind == "drain_requested" and ev.node in sent:
            decided.setdefault(ev.node, time.perf_counter())

    async def on_command(msg: Any) -> None:
        cmd = m.decode_command(msg.data)
        if isinstance(cmd, m.ReplicaCommand) and cmd.action == "leave":
            job, group = cmd.replica_id.split("_rg", 1)
            i = int(job.removeprefix("job")) * REPLICAS_PER_JOB + int(group.split(":")[0])
            node = node_name(i // REPLICAS_PER_NODE)
            if node in sent:
                left.setdefault(node, time.perf_counter())

    await bus.subscribe(subjects.FEED, on_feed)
    await bus.subscribe("marduk.v1.cmd.replica.>", on_command)
    await bus.flush()
    t0 = time.perf_counter()
    for k, index in enumerate(nodes):
        await asyncio.sleep(max(0.0, t0 + k / rate - time.perf_counter()))
        node = node_name(index)
        msg = m.Verdict(node=node, gpu_uuid=gpu_uuid(index * REPLICAS_PER_NODE), gpu_index=0,
                        action=GpuAction.DRAIN_NODE, reason="xid 79: GPU has fallen off the bus",
                        xid=79, ts=time.time())
        sent[node] = time.perf_counter()
        await bus.publish_durable(subjects.node_event(node, "verdict"), m.encode(msg))
    deadline = time.perf_counter() + wait_s
    while (len(decided) < len(sent) or len(left) < len(sent)) and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
    await bus.close()
    return ([decided[n] - sent[n] for n in sent if n in decided],
            [left[n] - sent[n] for n in sent if n in left], len(sent))


# -- one size ------------------------------------------------------------------------------


def ms_stats(values: list[float], sent: int) -> dict[str, float]:
    """p50/p99 over every fault sent: one never seen counts as infinitely late."""
    ms = sorted([v * 1000 for v in values] + [float("inf")] * (sent - len(values)))
    return {"p50": round(pct(ms, 0.5), 1), "p99": round(pct(ms, 0.99), 1),
            "seen": len(values), "sent": sent}


def run_size(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    replicas = nodes * REPLICAS_PER_NODE
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        fill_s = fill(state / "marduk.db", replicas=replicas,
                      jobs=max(1, replicas // REPLICAS_PER_JOB), events=0)
        with site_controller(tmp, state) as (ctl, url):
            assert ctl.proc is not None
            settle(ctl.proc.pid)
            warmup = 5.0
            churn = args.churn if args.churn >= 0 else nodes / 100
            procs = start_simulators(url, nodes, args.processes,
                                     warmup + args.seconds + 2.0, churn)
            time.sleep(warmup)
            pid = ctl.proc.pid
            cpu0, t0 = cpu_s(pid), time.perf_counter()
            db0 = db_bytes(state)
            count = max(1, int(args.fault_rate * args.seconds))
            step = max(1, nodes // count)
            decided, left, sent = asyncio.run(faults(
                url, [k * step for k in range(count)], args.fault_rate))
            elapsed = time.perf_counter() - t0
            cores = (cpu_s(pid) - cpu0) / elapsed
            growth = (db_bytes(state) - db0) / elapsed * 3600
            rss_now, rss_peak = rss_mib(pid)
            lag_ms = ctl.request("top", {"limit": 1}, timeout_s=30)["status"][
                "heartbeat_lag_ms"]
            sim = simulators_sent(procs)
            time.sleep(1.0)  # the last second's heartbeats reach the counters
            counters = ctl.request("status", timeout_s=30).get("counters", {})
            ctl.stop()
            t_restart = time.perf_counter()
            ctl.start(timeout_s=120)
            restart_s = time.perf_counter() - t_restart
            ctl.stop()
    return {"nodes": nodes, "gpus": replicas, "replicas": replicas,
            "jobs": max(1, replicas // REPLICAS_PER_JOB), "fill_s": round(fill_s, 1),
            "offered_hb_per_s": replicas, "offered_health_per_s": nodes / HEALTH_EVERY_S,
            "offered_steps_per_s": churn,
            "sent": dict(sim),
            "heartbeats_received": counters.get("heartbeats_received"),
            "heartbeats_written": counters.get("heartbeats_written"),
            "heartbeat_lag_ms": lag_ms,
            "drain": ms_stats(decided, sent), "leave": ms_stats(left, sent),
            "cores": round(cores, 2), "rss_mib": round(rss_now), "rss_peak_mib": round(rss_peak),
            "db_growth_mib_per_h": round(growth / 2**20, 1), "restart_s": round(restart_s, 2)}


def db_bytes(state: Path) -> int:
    return sum(p.stat().st_size for p in state.glob("marduk.db*"))


def report(rows: list[dict[str, Any]]) -> None:
    print("\n| nodes | replicas (hb/s) | fault->drain decided p50 / p99 | fault->leave p50 / p99 "
          "| controller cores | RSS (peak) MiB | DB growth MiB/h | hb lag ms | restart s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d, lv = r["drain"], r["leave"]
        print(f"| {r['nodes']:,} | {r['replicas']:,} | {d['p50']} / {d['p99']} ms "
              f"({d['seen']}/{d['sent']}) | {lv['p50']} / {lv['p99']} ms ({lv['seen']}/"
              f"{lv['sent']}) | {r['cores']} | {r['rss_mib']} ({r['rss_peak_mib']}) | "
              f"{r['db_growth_mib_per_h']} | {r['heartbeat_lag_ms']} | {r['restart_s']} |")
    for r in rows:
        print(f"{r['nodes']:,} nodes: simulators sent {r['sent']}; controller received "
              f"{r['heartbeats_received']} heartbeats, wrote {r['heartbeats_written']}")
    first, last = rows[0], rows[-1]
    scale = last["nodes"] / first["nodes"]
    print(f"\ngrowth from {first['nodes']:,} to {last['nodes']:,} nodes ({scale:g}x): "
          f"cores {last['cores'] / max(first['cores'], 1e-9):.1f}x, RSS "
          f"{last['rss_mib'] / max(first['rss_mib'], 1):.1f}x, restart "
          f"{last['restart_s'] / max(first['restart_s'], 1e-9):.1f}x, drain p99 "
          f"{last['drain']['p99'] / max(first['drain']['p99'], 1e-9):.1f}x")
    checks = {"drain_p99_ms": last["drain"]["p99"], "leave_p99_ms": last["leave"]["p99"],
              "restart_s": last["restart_s"], "cores": last["cores"],
              "rss_mib": last["rss_peak_mib"]}
    print(f"targets at the largest size reached ({last['nodes']:,} nodes; the target shape is "
          "10,000):")
    for key, value in checks.items():
        print(f"  {key:13s} {value:>9} (target <= {TARGETS[key]:g}): "
              f"{'met' if value <= TARGETS[key] else 'NOT MET'}")
    print(json.dumps(rows))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="250,500,1000,2000", help="node counts, in order")
    ap.add_argument("--seconds", type=float, default=20.0, help="loaded window per size")
    ap.add_argument("--fault-rate", type=float, default=2.0, help="verdicts per second")
    ap.add_argument("--processes", type=int, default=2, help="simulator processes")
    ap.add_argument("--churn", type=float, default=-1.0,
                    help="steps started per second over the fleet (default: nodes / 100)")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 1 or any(s < 1 for s in sizes):
        raise SystemExit("--sizes: positive node counts, e.g. 250,500,1000,2000")
    rows = []
    for nodes in sizes:
        churn = args.churn if args.churn >= 0 else nodes / 100
        print(f"{nodes:,} nodes: {nodes * REPLICAS_PER_NODE:,} replicas heartbeating at 1 Hz, "
              f"health every {HEALTH_EVERY_S:g} s, {churn:g} steps started/s, faults at "
              f"{args.fault_rate:g}/s for {args.seconds:g} s...", flush=True)
        rows.append(run_size(nodes, args))
        print(f"  {rows[-1]}", flush=True)
    report(rows)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--sim":
        out = asyncio.run(simulate(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                   float(sys.argv[5]), float(sys.argv[6])))
        print(json.dumps(out), flush=True)
        sys.exit(0)
    sys.exit(main())
