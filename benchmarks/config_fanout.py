"""`config set` -> acknowledged by 1,000 simulated replicas, against the raw NATS fan-out.

Simulated replicas are `ReplicaLink`s (the real replica-side protocol code, no torch) spread
over a few NATS connections and, like real replicas on many hosts, over several processes
(`--processes`). Each acknowledges a JobCommand the moment it arrives with a durable
ConfigAck, as a replica whose apply step has already passed would. Measured per replica:
from sending the `config_set` request to JetStream confirming that replica's ack. The baseline,
in the same run and the same layout: one core-NATS publish fanned out to 1,000 subscriptions
spread over the same number of processes and connections, each printing its receipt as a
replica prints its ack, from publish to receipt (wall clock, one machine).

    .venv/bin/python benchmarks/config_fanout.py [--replicas 1000] [--connections 20]
                                                 [--processes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.runtime.client import Command, ReplicaLink

from harness import ControllerProcess

JOB = 900


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Fleet:
    """N simulated replicas over C connections; records when each one's ack is stored."""

    def __init__(self, buses: list[Bus], n: int, *, first: int = 0, report: bool = False
                 ) -> None:
        self.links: list[ReplicaLink] = []
        self.acked: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.report = report  # print each ack (worker processes) instead of keeping it
        self.first = first
        for i in range(first, first + n):
            bus = buses[i % len(buses)]
            link = ReplicaLink(bus, JOB, i, f"job{JOB}_rg{i}:sim", self.handler(i))
            self.links.append(link)

    def handler(self, i: int) -> Callable[[Command], None]:
        return lambda cmd: self.got(i, cmd)

    def got(self, i: int, cmd: Command) -> None:
        if isinstance(cmd, m.JobCommand):
            received = time.time()  # wall clock: comparable across the fleet's processes
            task = asyncio.ensure_future(self.ack(i, cmd, received))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def ack(self, i: int, cmd: m.JobCommand, received: float) -> None:
        link = self.links[i - self.first]
        subject, data, msg_id = link.ack_message(cmd.revision, cmd.apply_at_step)
        await link.bus.publish_durable(subject, data, msg_id=msg_id, timeout_s=10)
        acked = time.time()
        if self.report:
            print(json.dumps([cmd.revision, i, received, acked]), flush=True)
        else:
            self.received[i], self.acked[i] = received, acked


async def worker(url: str, first: int, count: int, conns: int) -> None:
    """A process of the fleet: `count` replicas from index `first`; one line per ack on
    stdout: revision, replica, wall-clock receive and ack-stored times."""
    buses = [Bus(url, name=f"fleet-{first}-{c}") for c in range(conns)]
    for b in buses:
        await b.connect()
    fleet = Fleet(buses, count, first=first, report=True)
    for link in fleet.links:
        await link.subscribe()
    for b in buses:
        await b.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


async def raw_worker(url: str, first: int, count: int, conns: int) -> None:
    """The baseline's process: `count` plain subscriptions spread over `conns` connections as
    the fleet's replicas are; one line per message: trial, subscriber, wall-clock receipt."""
    buses = [Bus(url, name=f"raw-{first}-{c}") for c in range(conns)]
    for b in buses:
        await b.connect()
    for i in range(first, first + count):
        async def on_msg(msg: Any, i: int = i) -> None:
            print(json.dumps([int(msg.data), i, time.time()]), flush=True)
        await buses[i % len(buses)].subscribe("bench.fanout", on_msg)
    for b in buses:
        await b.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


class ProcessFleet:
    """The fleet spread over child processes running `worker`."""

    def __init__(self, url: str, n: int, conns: int, processes: int, role: str = "--worker"
                 ) -> None:
        share, extra = divmod(n, processes)
        self.procs: list[subprocess.Popen[str]] = []
        first = 0
        for p in range(processes):
            count = share + (p < extra)
            self.procs.append(subprocess.Popen(
                [sys.executable, __file__, role, url, str(first), str(count),
                 str(max(1, conns // processes))], stdout=subprocess.PIPE, text=True))
            first += count
        for proc in self.procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        self.lines: queue.Queue[str] = queue.Queue()
        for proc in self.procs:
            threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)

    def collect(self, revision: int, n: int, timeout_s: float = 30.0
                ) -> tuple[list[float], list[float]]:
        """(receive times, ack times) of the n replicas for `revision` (wall clock)."""
        recv, acked = [], []
        deadline = time.monotonic() + timeout_s
        while len(acked) < n and time.monotonic() < deadline:
            rev, _, r, a = json.loads(self.lines.get(timeout=timeout_s))
            if rev == revision:
                recv.append(r)
                acked.append(a)
        return recv, acked

    def collect_receipts(self, trial: int, n: int, timeout_s: float = 30.0) -> list[float]:
        """The n wall-clock receipts of the baseline's message `trial`."""
        got = []
        deadline = time.monotonic() + timeout_s
        while len(got) < n and time.monotonic() < deadline:
            key, _, received = json.loads(self.lines.get(timeout=timeout_s))
            if key == trial:
                got.append(received)
        return got

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


async def raw_fanout(bus: Bus, fleet: ProcessFleet, n: int, trials: int) -> list[float]:
    lat: list[float] = []
    for t in range(trials):
        sent = time.time()
        await bus.publish("bench.fanout", str(t).encode())
        await bus.flush()
        got = await asyncio.to_thread(fleet.collect_receipts, t, n)
        assert len(got) == n, f"{len(got)} of {n} receipts"
        lat += [r - sent for r in got]
        await asyncio.sleep(0.05)
    return lat


async def config_fanout(bus: Bus, fleet: ProcessFleet, n: int, trials: int
                        ) -> tuple[list[float], list[float], list[float]]:
    per_replica, all_acked, received = [], [], []
    for t in range(trials):
        # force: the simulated replicas never register, so the job is unknown to the controller
        request = m.Request(args={"job": JOB, "changes": {"lr": 1e-3 * (t + 1)}, "force": True},
                            actor="bench")
        start = time.time()
        raw = await bus.request(subjects.rpc("config_set"), m.encode(request), 10)
        reply = m.decode_reply(raw)
        assert reply.ok, reply.error
        recv, acked = await asyncio.to_thread(fleet.collect, reply.data["revision"], n)
        assert len(acked) == n, f"{len(acked)} of {n} acks"
        per_replica += [a - start for a in acked]
        received += [r - start for r in recv]
        all_acked.append(max(acked) - start)
        await asyncio.sleep(0.3)
    return per_replica, all_acked, received


async def run(url: str, n: int, conns: int, trials: int, processes: int) -> None:
    operator = Bus(url, name="bench-operator")
    await operator.connect()
    try:
        raw = await asyncio.to_thread(ProcessFleet, url, n, conns, processes, "--raw-worker")
        try:
            base = await raw_fanout(operator, raw, n, trials)
        finally:
            raw.stop()
        fleet = await asyncio.to_thread(ProcessFleet, url, n, conns, processes)
        try:
            per, whole, received = await config_fanout(operator, fleet, n, trials)
        finally:
            fleet.stop()
    finally:
        await operator.close()
    print(f"{n} replicas over {conns} connections in {processes} process(es), {trials} trials;"
          " the baseline's subscribers in the same layout")
    print(f"raw NATS fan-out, publish -> received:   p50 {pct(base, .5) * 1e3:7.1f} ms"
          f"   p99 {pct(base, .99) * 1e3:7.1f} ms")
    print(f"config set -> command received:        p50 {pct(received, .5) * 1e3:7.1f} ms"
          f"   p99 {pct(received, .99) * 1e3:7.1f} ms")
    print(f"config set -> ack stored by JetStream:  p50 {pct(per, .5) * 1e3:7.1f} ms"
          f"   p99 {pct(per, .99) * 1e3:7.1f} ms   (goal p99 <= 100 ms)")
    print(f"config set -> all {n} acked (per trial): median "
          f"{statistics.median(whole) * 1e3:.1f} ms, max {max(whole) * 1e3:.1f} ms")
    print(f"ratio p99 config/raw: {pct(per, .99) / pct(base, .99):.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--processes", type=int, default=2,
                        help="processes the simulated replicas are spread over")
    parser.add_argument("--worker", nargs=4, metavar=("URL", "FIRST", "COUNT", "CONNS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--raw-worker", nargs=4, metavar=("URL", "FIRST", "COUNT", "CONNS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    for role, fn in ((args.worker, worker), (args.raw_worker, raw_worker)):
        if role:
            url, first, count, conns = role
            asyncio.run(fn(url, int(first), int(count), int(conns)))
            return 0
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServerProcess(Path(tmp) / "nats")
        url = nats.start()
        ctl = ControllerProcess(Path(tmp) / "state", url).start()
        try:
            asyncio.run(run(url, args.replicas, args.connections, args.trials, args.processes))
        finally:
            ctl.stop()
            nats.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
