"""`config set` -> acknowledged by 1,000 simulated replicas, against the raw NATS fan-out.

Simulated replicas are `ReplicaLink`s (the real replica-side protocol code, no torch) spread
over a few NATS connections. Each acknowledges a JobCommand the moment it arrives with a
durable ConfigAck, as a replica whose apply step has already passed would. Measured per replica:
from sending the `config_set` request to JetStream confirming that replica's ack. The baseline,
in the same run: one core-NATS publish fanned out to 1,000 subscriptions on the same
connections, from publish to receipt.

    .venv/bin/python benchmarks/config_fanout.py [--replicas 1000] [--connections 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
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

    def __init__(self, buses: list[Bus], n: int) -> None:
        self.links: list[ReplicaLink] = []
        self.acked: dict[int, float] = {}
        self.received: dict[int, float] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        for i in range(n):
            bus = buses[i % len(buses)]
            link = ReplicaLink(bus, JOB, i, f"job{JOB}_rg{i}:sim", self.handler(i))
            self.links.append(link)

    def handler(self, i: int) -> Callable[[Command], None]:
        return lambda cmd: self.got(i, cmd)

    def got(self, i: int, cmd: Command) -> None:
        if isinstance(cmd, m.JobCommand):
            self.received[i] = time.perf_counter()
            task = asyncio.ensure_future(self.ack(i, cmd))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def ack(self, i: int, cmd: m.JobCommand) -> None:
        link = self.links[i]
        subject, data, msg_id = link.ack_message(cmd.revision, cmd.apply_at_step)
        await link.bus.publish_durable(subject, data, msg_id=msg_id, timeout_s=10)
        self.acked[i] = time.perf_counter()


async def raw_fanout(buses: list[Bus], n: int, trials: int) -> list[float]:
    got: list[float] = []
    sent = [0.0]
    for i in range(n):
        async def on_msg(msg: Any) -> None:
            got.append(time.perf_counter() - sent[0])
        await buses[i % len(buses)].subscribe("bench.fanout", on_msg)
    for b in buses:
        await b.flush()
    lat: list[float] = []
    for _ in range(trials):
        got.clear()
        sent[0] = time.perf_counter()
        await buses[0].publish("bench.fanout", b"x" * 200)
        while len(got) < n:
            await asyncio.sleep(0.001)
        lat += got
        await asyncio.sleep(0.05)
    return lat


async def config_fanout(buses: list[Bus], url: str, n: int, trials: int
                        ) -> tuple[list[float], list[float], list[float]]:
    fleet = Fleet(buses, n)
    for link in fleet.links:
        await link.subscribe()
    for b in buses:
        await b.flush()
    per_replica, all_acked, received = [], [], []
    for t in range(trials):
        fleet.acked.clear()
        fleet.received.clear()
        request = m.Request(args={"job": JOB, "changes": {"lr": 1e-3 * (t + 1)}}, actor="bench")
        start = time.perf_counter()
        raw = await buses[-1].request(subjects.rpc("config_set"), m.encode(request), 10)
        assert m.decode_reply(raw).ok
        while len(fleet.acked) < n:
            await asyncio.sleep(0.001)
        per_replica += [v - start for v in fleet.acked.values()]
        received += [v - start for v in fleet.received.values()]
        all_acked.append(max(fleet.acked.values()) - start)
        await asyncio.sleep(0.3)
    return per_replica, all_acked, received


async def run(url: str, n: int, conns: int, trials: int) -> None:
    buses = [Bus(url, name=f"bench-{i}") for i in range(conns)]
    for b in buses:
        await b.connect()
    try:
        base = await raw_fanout(buses, n, trials)
        per, whole, received = await config_fanout(buses, url, n, trials)
    finally:
        for b in buses:
            await b.close()
    print(f"{n} replicas over {conns} connections, {trials} trials")
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        nats = NatsServerProcess(Path(tmp) / "nats")
        url = nats.start()
        ctl = ControllerProcess(Path(tmp) / "state", url).start()
        try:
            asyncio.run(run(url, args.replicas, args.connections, args.trials))
        finally:
            ctl.stop()
            nats.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
