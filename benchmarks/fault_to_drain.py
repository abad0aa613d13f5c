"""Fault verdict published -> node drained in Slurm, on a real Slurm 22.05 cluster.

Brings up a second local cluster (its own directory and ports) with 2 slurmd nodes plus 1,000
defined-but-absent nodes x[1-1000] that Slurm can still drain, then:

1. single faults: 100 verdicts one at a time; latency from the durable publish to the
   controller's "drained" event (emitted only once `scontrol update` has succeeded), and the
   raw `scontrol update` latency measured in the same run as the baseline;
2. a storm: 1,000 verdicts at once; total time until all are drained and Slurm calls made.

Every drain is then confirmed by reading Slurm (one `sinfo`). Needs root.

    .venv/bin/python benchmarks/fault_to_drain.py
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import contextlib

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from harness import ControllerProcess

REPO = Path(__file__).resolve().parent.parent
CLUSTER_ENV = {
    "MARDUK_SLURM_BASE": "/tmp/marduk-slurm-bench", "MARDUK_SLURM_CTLD_PORT": "6937",
    "MARDUK_SLURM_SLURMD_PORT": "17300", "MARDUK_SLURM_NODES": "2",
    "MARDUK_SLURM_EXTRA_NODES": "1000",
}
SINGLE, STORM = 100, 1000


def cluster(command: str) -> str:
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm-cluster.sh"), command],
                          capture_output=True, text=True, env={**os.environ, **CLUSTER_ENV},
                          timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"slurm-cluster.sh {command} failed:\n{proc.stderr[-2000:]}")
    lines = proc.stdout.strip().splitlines()
    return lines[-1].removeprefix("export SLURM_CONF=") if lines else ""


def scontrol(conf: str, *args: str) -> None:
    subprocess.run(["scontrol", *args], check=True, capture_output=True,
                   env={**os.environ, "SLURM_CONF": conf})


def drained_in_slurm(conf: str) -> set[str]:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                         env={**os.environ, "SLURM_CONF": conf}, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if "drain" in line.split()[1]
            or "drng" in line.split()[1]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def verdict(node: str, i: int) -> tuple[str, bytes]:
    msg = m.Verdict(node=node, gpu_uuid=f"GPU-{node}-0", gpu_index=0, action="drain_node",
                    reason="xid 79: GPU has fallen off the bus", xid=79, ts=time.time())
    return subjects.node_event(node, "verdict"), m.encode(msg)


async def single_faults(url: str) -> list[float]:
    bus = Bus(url, name="bench")
    await bus.connect()
    drained: dict[str, float] = {}

    async def on_feed(msg) -> None:  # type: ignore[no-untyped-def]
        ev = m.decode_feed(msg.data)
        if ev.kind == "drained" and ev.node:
            drained[ev.node] = time.perf_counter()

    await bus.subscribe(subjects.FEED, on_feed)
    latencies = []
    for i in range(1, SINGLE + 1):
        node = f"x{i}"
        t0 = time.perf_counter()
        await bus.publish_durable(*verdict(node, i))
        while node not in drained:
            await asyncio.sleep(0.0005)
        latencies.append(drained[node] - t0)
    await bus.close()
    return latencies


async def storm(url: str) -> float:
    bus = Bus(url, name="bench")
    await bus.connect()
    done = asyncio.Event()
    count = 0

    async def on_feed(msg) -> None:  # type: ignore[no-untyped-def]
        nonlocal count
        if m.decode_feed(msg.data).kind == "drained":
            count += 1
            if count == STORM:
                done.set()

    await bus.subscribe(subjects.FEED, on_feed)
    t0 = time.perf_counter()
    acks = [await bus.js.publish_async(*verdict(f"x{i}", i)) for i in range(1, STORM + 1)]
    await asyncio.gather(*acks)
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - t0
    await bus.close()
    return elapsed


def raw_scontrol(conf: str) -> list[float]:
    out = []
    for i in range(1, 51):
        t0 = time.perf_counter()
        scontrol(conf, "update", f"nodename=x{i}", "state=drain", "reason=bench baseline")
        out.append(time.perf_counter() - t0)
    scontrol(conf, "update", "nodename=x[1-50]", "state=resume")
    return out


def main() -> int:
    if os.geteuid() != 0:
        print("needs root (it runs a local Slurm cluster)")
        return 0
    print("bringing up the benchmark cluster (2 slurmd + 1,000 absent nodes)...", flush=True)
    conf = cluster("up")
    with contextlib.suppress(subprocess.CalledProcessError):
        scontrol(conf, "update", "nodename=x[1-1000]", "state=resume")
    baseline = raw_scontrol(conf)
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServerProcess(Path(tmp) / "nats")
        url = server.start()
        env = {"MARDUK_SLURM_CONF": conf, "MARDUK_CONTROLLER_RECONCILE_INTERVAL_S": "3600"}
        ctl = ControllerProcess(Path(tmp) / "state", url, slurm_backend="commands",
                                extra_env=env, reconcile_s=3600).start()
        try:
            lat = asyncio.run(single_faults(url))
            confirmed_single = {f"x{i}" for i in range(1, SINGLE + 1)} <= drained_in_slurm(conf)
            scontrol(conf, "update", f"nodename=x[1-{SINGLE}]", "state=resume")
            calls_before = ctl.request("status")["slurm_calls"].get("calls", 0)
            storm_s = asyncio.run(storm(url))
            calls = ctl.request("status")["slurm_calls"].get("calls", 0) - calls_before
            confirmed_storm = len({f"x{i}" for i in range(1, STORM + 1)}
                                  & drained_in_slurm(conf))
        finally:
            ctl.stop()
            server.stop()
    scontrol(conf, "update", "nodename=x[1-1000]", "state=resume")
    cluster("down")
    ms = [x * 1000 for x in lat]
    base = [x * 1000 for x in baseline]
    print(f"raw scontrol update (baseline)   : p50 {statistics.median(base):6.1f} ms  "
          f"p99 {pct(base, 0.99):6.1f} ms  (n={len(base)})")
    print(f"verdict -> drained, single fault : p50 {statistics.median(ms):6.1f} ms  "
          f"p99 {pct(ms, 0.99):6.1f} ms  (n={len(ms)}; goal p99 <= 100 ms); "
          f"ratio p50 to baseline {statistics.median(ms) / statistics.median(base):.1f}x; "
          f"all confirmed in Slurm: {confirmed_single}")
    print(f"storm: {STORM} faults at once     : {storm_s:.2f} s, {calls} Slurm calls, "
          f"{confirmed_storm}/{STORM} drained in Slurm")
    print(json.dumps({"single_p50_ms": round(statistics.median(ms), 2),
                      "single_p99_ms": round(pct(ms, 0.99), 2),
                      "scontrol_p50_ms": round(statistics.median(base), 2),
                      "storm_s": round(storm_s, 3), "storm_slurm_calls": calls}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
