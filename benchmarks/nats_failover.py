"""The events stream on a 3-server NATS cluster (JetStream R3) losing its leader.

Each round starts a fresh 3-server cluster on loopback (tests/nats_cluster.py) and a controller
on it with `nats.stream_replicas = 3`, moves the leadership of the stream and the controller's
consumer to the server the controller is connected to, then publishes GPU verdicts durably at a
steady pace (one publisher, every server's URL, each verdict retried with its message id until
confirmed, as the agent does) and SIGKILLs that server after a third of them. Measured:

- the stall: from the kill to the first verdict JetStream confirms again;
- catch-up: from the kill to the controller having recorded every verdict (its consumer has
  nothing pending or unacknowledged);
- the confirm latency of one durable publish before the kill, on the cluster (R3) and, as the
  baseline from the same run, on a single server (R1).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/nats_failover.py [--rounds 3] [--verdicts 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.controller.ingest import DURABLE_NAME
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, BusTimeout

from harness import ControllerProcess
from nats_cluster import NatsCluster, move_leader

PACE_S = 0.005


def verdict(i: int) -> tuple[str, bytes, str]:
    node = f"b{i // 4:04d}"
    msg = m.Verdict(node=node, gpu_uuid=f"GPU-{node}-{i % 4}", gpu_index=i % 4, action="none",
                    reason=f"bench {i}", ts=time.time())
    return subjects.node_event(node, "verdict"), m.encode(msg), f"{node}.verdict.{i}"


async def publish_until_confirmed(bus: Bus, item: tuple[str, bytes, str]) -> float:
    """Publish with retries, as the agent's outbox does; the time of the confirmation."""
    subject, data, msg_id = item
    while True:
        try:
            await bus.publish_durable(subject, data, msg_id=msg_id, timeout_s=1.0)
            return time.monotonic()
        except (BusError, BusTimeout):
            await asyncio.sleep(0.05)


async def confirm_latencies(bus: Bus, count: int, offset: int) -> list[float]:
    out = []
    for i in range(count):
        t0 = time.monotonic()
        out.append(await publish_until_confirmed(bus, verdict(offset + i)) - t0)
    return out


async def backlog_empty(bus: Bus) -> bool:
    try:
        info = json.loads(await bus.request(
            f"$JS.API.CONSUMER.INFO.{subjects.EVENTS_STREAM}.{DURABLE_NAME}", b"", 2.0))
    except (BusError, BusTimeout):
        return False
    return info.get("num_pending") == 0 and info.get("num_ack_pending") == 0


async def storm(cluster: NatsCluster, home_name: str, total: int) -> dict[str, float]:
    bus = Bus(cluster.url, name="bench-agent")
    await bus.connect(retry=True)
    await move_leader(bus, "STREAM", subjects.EVENTS_STREAM, home_name)
    await move_leader(bus, "CONSUMER", f"{subjects.EVENTS_STREAM}.{DURABLE_NAME}", home_name)
    r3 = await confirm_latencies(bus, 50, 10_000_000)
    killed_at = 0.0
    confirms = []
    for i in range(total):
        if i == total // 3:
            cluster.kill(home_name)
            killed_at = time.monotonic()
        confirms.append(await publish_until_confirmed(bus, verdict(i)))
        await asyncio.sleep(PACE_S)
    stall = min(t for t in confirms if t > killed_at) - killed_at
    while not await backlog_empty(bus):
        await asyncio.sleep(0.05)
    caught_up = time.monotonic() - killed_at
    await bus.close()
    return {"stall_s": stall, "catch_up_s": caught_up,
            "r3_confirm_ms": 1000 * statistics.median(r3)}


def round_once(root: Path, total: int) -> dict[str, float]:
    cluster = NatsCluster(root / "nats").start()
    ctl = ControllerProcess(root / "state", cluster.url,
                            extra_env={"MARDUK_NATS_STREAM_REPLICAS": "3"}).start()
    try:
        home = cluster.server_at(ctl.request("status")["nats_server"])
        result = asyncio.run(storm(cluster, home.name, total))
        status = ctl.request("status")
        result["gpu_rows"] = status["gpus"]
    finally:
        ctl.stop()
        cluster.stop()
    return result


def single_server_confirm_ms(root: Path) -> float:
    server = NatsServerProcess(root / "single")
    server.start()

    async def measure() -> float:
        bus = Bus(server.url, name="bench-agent")
        await bus.connect(retry=True)
        await bus.ensure_events_stream(replicas=1)
        latencies = await confirm_latencies(bus, 50, 0)
        await bus.close()
        return 1000 * statistics.median(latencies)
    try:
        return asyncio.run(measure())
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--verdicts", type=int, default=300)
    args = parser.parse_args()
    rows = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="marduk-failover-") as tmp:
            rows.append(round_once(Path(tmp), args.verdicts))
            row = rows[-1]
            print(f"round {n + 1}: stall {row['stall_s']:.2f} s, catch-up "
                  f"{row['catch_up_s']:.2f} s, R3 confirm {row['r3_confirm_ms']:.2f} ms, "
                  f"{row['gpu_rows']:.0f}/{args.verdicts + 50} GPUs recorded")
    with tempfile.TemporaryDirectory(prefix="marduk-failover-") as tmp:
        r1 = single_server_confirm_ms(Path(tmp))
    stalls = [r["stall_s"] for r in rows]
    catch_up = [r["catch_up_s"] for r in rows]
    r3 = statistics.median(r["r3_confirm_ms"] for r in rows)
    print(f"leader killed mid-storm, {args.rounds} rounds: publish stall median "
          f"{statistics.median(stalls):.2f} s (max {max(stalls):.2f}); every verdict recorded "
          f"{statistics.median(catch_up):.2f} s after the kill (max {max(catch_up):.2f})")
    print(f"durable publish confirmed in {r3:.2f} ms (R3 cluster) vs {r1:.2f} ms "
          f"(baseline: one server, R1), medians")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
