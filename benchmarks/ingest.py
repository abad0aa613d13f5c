"""Heartbeat ingest: a real controller vs a bare nats-py subscriber, same server, same run.

Simulated replicas register (durably, through JetStream), then send heartbeats; the number
that matters is heartbeats per second with everything persisted: the run ends only when the
controller's SQLite rows hold the last step of every replica. The baseline is a bare nats-py
subscriber (no decode, no storage) receiving the same stream from the same publisher.

    .venv/bin/python benchmarks/ingest.py [--replicas 10000] [--rounds 20]

Prints rates and the ratio; exits 0. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from harness import ControllerProcess

JOBS = 10  # replicas are spread over this many jobs


def replica_id(i: int) -> str:
    return f"job{i % JOBS}_rg{i}:bench"


async def register_all(url: str, replicas: int) -> float:
    bus = Bus(url, name="bench-register")
    await bus.connect()
    t0 = time.perf_counter()
    futures = []
    for i in range(replicas):
        msg = m.ReplicaRegister(replica_id=replica_id(i), job_id=i % JOBS, replica_group=i,
                                node=f"n{i % 500}", gpu_uuids=[f"GPU-{i}"], ts=time.time())
        futures.append(await bus.js.publish_async(
            subjects.job_event(i % JOBS, "replica_register"), m.encode(msg)))
    await asyncio.gather(*futures)
    await bus.close()
    return time.perf_counter() - t0


def heartbeat_payloads(replicas: int, rounds: int, first_step: int = 1
                       ) -> list[tuple[str, bytes]]:
    out = []
    for step in range(first_step, first_step + rounds):
        for i in range(replicas):
            hb = m.Heartbeat(replica_id=replica_id(i), job_id=i % JOBS, step=step,
                             step_time_ms=101.5, allreduce_ms=12.25, participants=8,
                             quorum_id=3, loss=0.5, ts=time.time())
            out.append((subjects.heartbeat(i % JOBS), m.encode(hb)))
    return out


async def publish(url: str, payloads: list[tuple[str, bytes]], rate: float = 0.0) -> float:
    """Publish everything, as fast as possible or paced at `rate` messages per second."""
    bus = Bus(url, name="bench-publisher")
    await bus.connect()
    nc = bus.nc
    assert nc is not None
    t0 = time.perf_counter()
    for n, (subject, data) in enumerate(payloads):
        await nc.publish(subject, data)
        if n % 1000 == 0:
            if rate:
                ahead = t0 + n / rate - time.perf_counter()
                await asyncio.sleep(max(0.0, ahead))
            else:
                await asyncio.sleep(0)  # let the flusher run, as a real sender would
    await nc.flush()
    elapsed = time.perf_counter() - t0
    await bus.close()
    return elapsed


BARE = """
import asyncio, sys, time, nats
async def main(url, n):
    nc = await nats.connect(url)
    got = 0; first = None; done = asyncio.Event()
    async def cb(msg):
        nonlocal got, first
        if first is None: first = time.perf_counter()
        got += 1
        if got == n: done.set()
    await nc.subscribe("marduk.v1.hb.>", cb=cb, pending_msgs_limit=-1, pending_bytes_limit=-1)
    await nc.flush(); print("ready", flush=True)
    await asyncio.wait_for(done.wait(), 600)
    print(time.perf_counter() - first, flush=True)
    await nc.close()
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def run_bare(url: str, payloads: list[tuple[str, bytes]]) -> float:
    proc = subprocess.Popen([sys.executable, "-c", BARE, url, str(len(payloads))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    asyncio.run(publish(url, payloads))
    proc.stdout.readline()
    proc.wait(60)
    return time.perf_counter() - t0


def persisted(db: Path, replicas: int, rounds: int) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT COUNT(*) FROM replicas WHERE last_step = ?",
                           (rounds,)).fetchone()
    finally:
        conn.close()
    return int(row[0]) == replicas


def run_controller(ctl: ControllerProcess, payloads: list[tuple[str, bytes]], replicas: int,
                   rounds: int, rate: float = 0.0) -> tuple[float, float, dict[str, int]]:
    """Returns (seconds until all persisted, seconds after the last publish, counters)."""
    db = ctl.state_dir / "marduk.db"
    before = ctl.request("status")["counters"]
    t0 = time.perf_counter()
    asyncio.run(publish(ctl.url, payloads, rate))
    t_sent = time.perf_counter()
    while not persisted(db, replicas, rounds):
        time.sleep(0.01)
    t_done = time.perf_counter()
    after = ctl.request("status")["counters"]
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return t_done - t0, t_done - t_sent, delta


def registered(ctl: ControllerProcess, replicas: int) -> float:
    t0 = time.perf_counter()
    reg_s = asyncio.run(register_all(ctl.url, replicas))
    while ctl.request("status")["replicas_active"] < replicas:
        time.sleep(0.05)
    return max(reg_s, time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=20000, help="replicas for the burst runs")
    ap.add_argument("--rounds", type=int, default=10, help="heartbeats per replica (burst)")
    ap.add_argument("--rate", type=float, default=50000,
                    help="paced run: heartbeats/s, one per replica per second (1 Hz)")
    ap.add_argument("--seconds", type=int, default=6, help="paced run length")
    args = ap.parse_args()
    n = args.replicas * args.rounds
    paced_replicas = int(args.rate)
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServerProcess(Path(tmp) / "nats")
        url = server.start()
        try:
            burst = heartbeat_payloads(args.replicas, args.rounds)
            size = sum(len(d) for _, d in burst) / n
            print(f"burst: {n:,} heartbeats ({args.replicas:,} replicas x {args.rounds}), "
                  f"{size:.0f} bytes each")
            bare_s = run_bare(url, burst)
            ctl = ControllerProcess(Path(tmp) / "state", url).start()
            reg_s = registered(ctl, max(args.replicas, paced_replicas))
            ctl_s, _, burst_counters = run_controller(ctl, burst, args.replicas, args.rounds)
            del burst
            # Steps continue above the burst's, so "persisted" means this run's last beat.
            first = args.rounds + 1
            paced = heartbeat_payloads(paced_replicas, args.seconds, first_step=first)
            total_s, tail_s, paced_counters = run_controller(
                ctl, paced, paced_replicas, first + args.seconds - 1, rate=args.rate)
            ctl.stop()
        finally:
            server.stop()
    bare_rate, ctl_rate = n / bare_s, n / ctl_s
    paced_n = paced_replicas * args.seconds
    print(f"registrations           : {max(args.replicas, paced_replicas):,} committed in "
          f"{reg_s:.2f} s")
    print(f"bare nats-py subscriber : {bare_rate:>10,.0f} msgs/s        (burst, {bare_s:.2f} s)")
    print(f"controller, persisted   : {ctl_rate:>10,.0f} heartbeats/s  (burst, {ctl_s:.2f} s, "
          f"{burst_counters.get('heartbeats_written', 0):,} row writes after coalescing)")
    print(f"ratio controller/bare   : {ctl_rate / bare_rate:.2f}   (goal >= 0.5)")
    print(f"paced 1 Hz x {paced_replicas:,} replicas for {args.seconds} s: "
          f"{paced_n / total_s:,.0f} heartbeats/s persisted, last row {tail_s * 1000:.0f} ms "
          f"after the last send, {paced_counters.get('heartbeats_written', 0):,} row writes "
          f"for {paced_counters.get('heartbeats_received', 0):,} received")
    print(json.dumps({"bare_msgs_per_s": round(bare_rate), "controller_hb_per_s":
                      round(ctl_rate), "ratio": round(ctl_rate / bare_rate, 3),
                      "paced_hb_per_s": round(paced_n / total_s),
                      "paced_tail_ms": round(tail_s * 1000)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
