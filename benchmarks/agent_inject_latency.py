"""Injected XID -> verdict on the bus, through a real node agent, against a raw NATS baseline.

Starts a nats-server (port 0) with the events stream, and `marduk agent` as a child process
with simulated GPUs. Each injection is an agent request (what `marduk inject` sends through
the controller); the clock stops when the Verdict it caused is seen on the verdict subject.
XIDs and GPUs alternate, and every XID is an event, so every injection yields a fresh
verdict. The baseline is the plain NATS request/reply round trip on the same server, in the
same run, with an in-process responder that answers at once.

    .venv/bin/python benchmarks/agent_inject_latency.py --count 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, BusTimeout

NODE = "bench1"
XIDS = (79, 13, 48, 31, 94, 74)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_agent(tmp: Path, url: str, gpus: int) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable,
        "-m",
        "marduk_slurm.cli.main",
        "agent",
        "--node",
        NODE,
        "--simulate-gpus",
        str(gpus),
        "--socket",
        str(tmp / "agent.sock"),
        "--state-dir",
        str(tmp / "agent-state"),
        "--nats-url",
        url,
        "--log-level",
        "error",
    ]
    # A long poll interval keeps the polls' own verdicts out of the measurement.
    env = {**os.environ, "MARDUK_AGENT_POLL_INTERVAL_S": "3600"}
    with (tmp / "agent.log").open("ab") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)


async def wait_agent(bus: Bus, timeout_s: float = 30.0) -> None:
    """Until the agent answers its inject subject (an empty request is refused at once)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await bus.request(subjects.agent_rpc(NODE, "inject"), m.encode(m.Request()), 1.0)
            return
        except (BusError, BusTimeout):
            await asyncio.sleep(0.1)
    raise RuntimeError("the agent did not answer in time")


class VerdictWatch:
    """Verdicts seen on the bus, by (gpu uuid, injected xid)."""

    def __init__(self) -> None:
        self.waiting: dict[tuple[str, int], asyncio.Future[float]] = {}

    async def on_msg(self, msg: Any) -> None:
        arrived = time.perf_counter()
        verdict = msgspec.json.decode(msg.data, type=m.Verdict)
        if verdict.evidence.get("injected"):
            for xid in verdict.evidence.get("injected_xids", []):
                future = self.waiting.pop((verdict.gpu_uuid, xid), None)
                if future is not None and not future.done():
                    future.set_result(arrived)


async def inject_once(
    bus: Bus, watch: VerdictWatch, gpu: int, xid: int, uuids: dict[int, str]
) -> tuple[float, float]:
    """(ms until the reply, ms until the verdict was on the bus) of one injection."""
    loop = asyncio.get_running_loop()
    seen: asyncio.Future[float] = loop.create_future()
    watch.waiting[(uuids[gpu], xid)] = seen
    request = m.encode(m.Request(args={"gpu": str(gpu), "xid": xid}, actor="bench"))
    started = time.perf_counter()
    raw = await bus.request(subjects.agent_rpc(NODE, "inject"), request, 5.0)
    replied = time.perf_counter()
    reply = m.decode_reply(raw)
    if not reply.ok:
        raise RuntimeError(f"inject refused: {reply.error}")
    arrived = await asyncio.wait_for(seen, 5.0)
    return (replied - started) * 1000, (arrived - started) * 1000


async def measure_inject(url: str, count: int, gpus: int) -> dict[str, list[float]]:
    bus = Bus(url, name="bench-inject")
    await bus.connect()
    watch = VerdictWatch()
    await bus.subscribe(subjects.node_event(NODE, "verdict"), watch.on_msg)
    await wait_agent(bus)
    uuids: dict[int, str] = {}
    for gpu in range(gpus):  # learn the UUIDs from the replies
        raw = await bus.request(
            subjects.agent_rpc(NODE, "inject"),
            m.encode(m.Request(args={"gpu": str(gpu), "xid": 63}, actor="bench")),
            5.0,
        )
        uuids[gpu] = m.decode_reply(raw).data["gpu_uuid"]
    results: dict[str, list[float]] = {"reply": [], "verdict": []}
    for i in range(count + 20):  # the first 20 warm up
        reply_ms, verdict_ms = await inject_once(bus, watch, i % gpus, XIDS[i % len(XIDS)], uuids)
        if i >= 20:
            results["reply"].append(reply_ms)
            results["verdict"].append(verdict_ms)
    await bus.close()
    return results


async def measure_baseline(url: str, count: int) -> list[float]:
    responder, client = Bus(url, name="bench-echo"), Bus(url, name="bench-client")
    await responder.connect()
    await client.connect()

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await responder.subscribe("bench.echo", echo)
    await responder.flush()
    payload = m.encode(m.Request(args={"gpu": "0", "xid": 79}))
    out = []
    for i in range(count + 20):
        started = time.perf_counter()
        await client.request("bench.echo", payload, 5.0)
        if i >= 20:
            out.append((time.perf_counter() - started) * 1000)
    await client.close()
    await responder.close()
    return out


async def prepare_stream(url: str) -> None:
    bus = Bus(url, name="bench-setup")
    await bus.connect()
    await bus.ensure_events_stream()
    await bus.close()


def report(rows: list[tuple[str, list[float]]], baseline_p50: float) -> None:
    print(
        f"{'measurement':<40} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
        f"{'max ms':>8} {'p50 x raw':>10}"
    )
    for name, values in rows:
        p50 = statistics.median(values)
        print(
            f"{name:<40} {len(values):>5} {p50:>8.3f} {percentile(values, 90):>8.3f} "
            f"{percentile(values, 99):>8.3f} {max(values):>8.3f} {p50 / baseline_p50:>10.1f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=200, help="measured injections")
    parser.add_argument("--gpus", type=int, default=4, help="simulated GPUs of the agent")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="marduk-bench-") as name:
        tmp = Path(name)
        server = NatsServerProcess(tmp / "nats")
        url = server.start()
        agent = None
        try:
            asyncio.run(prepare_stream(url))
            agent = start_agent(tmp, url, args.gpus)
            inject = asyncio.run(measure_inject(url, args.count, args.gpus))
            baseline = asyncio.run(measure_baseline(url, args.count))
        finally:
            if agent is not None:
                agent.send_signal(signal.SIGTERM)
                agent.wait(20)
            server.stop()
    base_p50 = statistics.median(baseline)
    print(
        f"agent with {args.gpus} simulated GPUs, nats-server on loopback, "
        f"{args.count} measured operations each (after 20 warm-up)"
    )
    report(
        [
            ("raw NATS request/reply (baseline)", baseline),
            ("inject request -> agent reply", inject["reply"]),
            ("inject request -> verdict on the bus", inject["verdict"]),
        ],
        base_p50,
    )
    ratio = statistics.median(inject["verdict"]) / base_p50
    print(f"\nverdict p50 is {ratio:.1f}x the raw NATS round trip")
    return 0


if __name__ == "__main__":
    sys.exit(main())
