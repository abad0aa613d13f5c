"""A standby controller taking over: after a SIGKILL of the leader, and after a clean stop.

Each round starts a fresh nats-server on loopback, the stand-in for Slurm's commands
(tests/fakes/fake_slurm.py), a leader and a standby controller with their own state
directories, and publishes GPU verdicts at a steady pace (a drain verdict every fourth):

- takeover: the leader is SIGKILLed; from the kill to the standby answering `status` as the
  leader (lease lapse + the standby's poll + catching up with the stream + a Slurm reconcile
  + starting its tasks);
- handover: the new leader is stopped with SIGTERM (it releases its lease) while the old one,
  started again, waits as a standby; from the signal to that one answering as the leader;
- baseline, same run: one controller SIGKILLed and started again in place (what systemd's
  restart gives a site without a standby, when the host survives), kill to answering.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/failover.py [--rounds 5] [--lease 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.cli.client import call
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.errors import BusError, BusTimeout

from fakes import fake_slurm
from harness import ControllerProcess

NODES = [f"f{k:03d}" for k in range(200)]
PACE_S = 0.01


def verdict(i: int) -> tuple[str, bytes, str]:
    node = NODES[(i // 4) % len(NODES)]
    drain = i % 4 == 0
    msg = m.Verdict(node=node, gpu_uuid=f"GPU-{node}-{i % 4}", gpu_index=i % 4,
                    action=GpuAction.DRAIN_NODE if drain else GpuAction.NONE,
                    reason=f"bench {i}" + (": xid 79" if drain else ""),
                    xid=79 if drain else None, ts=time.time())
    return subjects.node_event(node, "verdict"), m.encode(msg), f"{node}.verdict.{i}"


class Publisher:
    """Verdicts at a steady pace, in a thread of its own, until stopped."""

    def __init__(self, url: str, start: int) -> None:
        self.url, self.next, self.stop = url, start, threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        bus = Bus(self.url, name="bench-agents")
        await bus.connect()
        try:
            while not self.stop.is_set():
                subject, data, msg_id = verdict(self.next)
                await bus.publish_durable(subject, data, msg_id=msg_id)
                self.next += 1
                await asyncio.sleep(PACE_S)
        finally:
            await bus.close()

    def __enter__(self) -> Publisher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(10)


def leader_of(url: str) -> str:
    try:
        status: dict[str, Any] = asyncio.run(call(url, "status", {}, timeout_s=0.25))
    except (BusError, BusTimeout):
        return ""
    return str(status.get("controller", {}).get("id", ""))


def until_leader(url: str, name: str, since: float, limit_s: float = 60.0) -> float:
    while leader_of(url) != name:
        if time.monotonic() - since > limit_s:
            raise RuntimeError(f"{name} did not lead within {limit_s} s")
        time.sleep(0.01)
    return time.monotonic() - since


def one_round(base: Path, lease_s: float) -> dict[str, float]:
    server = NatsServerProcess(base / "nats")
    server.start()
    env = fake_slurm.install(base / "bin", base / "slurm", NODES)
    env["MARDUK_CONTROLLER_LEASE_S"] = str(lease_s)

    def controller(name: str, standby: bool) -> ControllerProcess:
        args = ("--standby", "--id", name) if standby else ("--id", name)
        return ControllerProcess(base / name, server.url, slurm_backend="commands",
                                 extra_env={**env, "MARDUK_FAKE_SLURM_CALLER": name},
                                 extra_args=args)

    procs: list[ControllerProcess] = []
    try:
        a = controller("a", False).start()
        b = controller("b", True).start(standby=True)
        procs += [a, b]
        with Publisher(server.url, 0) as pub:
            time.sleep(1.0)
            assert a.proc is not None
            killed = time.monotonic()
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait()
            takeover = until_leader(server.url, "b", killed)
            a2 = controller("a", False).start(standby=True)
            procs.append(a2)
            a2.wait_log("controller b on", 30)
            time.sleep(0.5)
            stopped = time.monotonic()
            assert b.stop() == 0
            handover = until_leader(server.url, "a", stopped)
            # Baseline: no standby left; the leader killed and started again in place.
            time.sleep(0.5)
            assert a2.proc is not None
            killed = time.monotonic()
            os.kill(a2.proc.pid, signal.SIGKILL)
            a2.proc.wait()
            a3 = controller("a", False)
            a3.proc = None
            procs.append(a3.start(standby=True))
            restart = until_leader(server.url, "a", killed)
            pub.stop.set()
        return {"takeover_s": takeover, "handover_s": handover, "restart_in_place_s": restart}
    finally:
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--lease", type=float, default=2.0, help="controller.lease_s")
    args = parser.parse_args()
    results: list[dict[str, float]] = []
    for k in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="marduk-failover-") as tmp:
            results.append(one_round(Path(tmp), args.lease))
        print(f"round {k + 1}: " + ", ".join(f"{key} {v:.2f}" for key, v in results[-1].items()),
              flush=True)
    print(f"\nlease {args.lease:g} s, {args.rounds} rounds, verdicts every {PACE_S * 1000:.0f} ms")
    for key in results[0]:
        values = sorted(r[key] for r in results)
        print(f"{key:>20}: p50 {statistics.median(values):.2f} s  (min {values[0]:.2f}, "
              f"max {values[-1]:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
