"""The dashboard at 100,000 replicas: what open pages cost a real controller.

The replicas are written into the controller's SQLite before it starts (the Store API, as a
busy site's database would be). While `--churn` of them heartbeat once a second, 5 pages
follow `/api/events` for `--seconds` and one more page connects and never reads. Printed:
bytes each page received and the interval between its ticks (goal: a tick every <= 2 s),
controller CPU (from /proc/<pid>/stat) without pages and with them, its RSS at the peak and
after the pages left (goal <= 1 GiB), whether the page that never read was dropped, and
`/api/replicas`: one page against all of them (the size of the old unpaged answer), both in
this run.

    .venv/bin/python benchmarks/dashboard_scale.py [--replicas 100000] [--seconds 20]
                                                   [--churn 5000] [--no-trim]

`--no-trim` runs the controller without `malloc_trim` (garbage collection only), to measure
what handing memory back is worth. Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.cli.client import call
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

import harness
from harness import ControllerProcess

PAGES = 5
TICKS = os.sysconf("SC_CLK_TCK")
NO_TRIM = ("import sys, gc; import marduk_slurm.controller.event_stream as stream; "
           "stream.release_memory = gc.collect; "
           "from marduk_slurm.cli.main import main; sys.exit(main())")


def replica_id(i: int) -> str:
    return f"job{i // 100}_rg{i % 100}:" + "u" * 32


def fill(state_dir: Path, replicas: int) -> float:
    t0 = time.perf_counter()
    store = Store(state_dir / "marduk.db")
    store.migrate()
    now = time.time()
    with store.transaction():
        for i in range(replicas):
            msg = m.ReplicaRegister(replica_id=replica_id(i), job_id=i // 100,
                                    replica_group=i % 100, node=f"node{i // 8:05d}",
                                    gpu_uuids=[f"GPU-{i:08d}"])
            store.register_replica(msg, now)
            store.ensure_node(msg.node, now)
    store.close()
    return time.perf_counter() - t0


class Proc:
    """CPU seconds and memory of the controller, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime

    def memory(self, key: str = "VmRSS") -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0


def fetch(url: str) -> tuple[float, int, dict[str, Any]]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=120) as resp:
        body = resp.read()
    return time.perf_counter() - t0, len(body), json.loads(body)


def replica_pages(base: str) -> dict[str, float]:
    """One page of 500, and every page of 5000 (what the unpaged list was, in bytes)."""
    one_s, one_bytes, _ = fetch(f"{base}/api/replicas?limit=500")
    all_s, all_bytes, pages, cursor = 0.0, 0, 0, ""
    while True:
        took, size, page = fetch(f"{base}/api/replicas?limit=5000&cursor={cursor}")
        all_s, all_bytes, pages = all_s + took, all_bytes + size, pages + 1
        cursor = page["next"]
        if cursor is None:
            return {"one_s": one_s, "one_bytes": one_bytes, "all_s": all_s,
                    "all_bytes": all_bytes, "pages": pages}


class Page:
    """One open dashboard tab: counts what it receives, and the controller's time of each
    delta (`ts`, stamped at the tick) and when it arrived here."""

    def __init__(self) -> None:
        self.bytes = 0
        self.snapshot_bytes = 0  # received before the first delta
        self.ticks: list[float] = []  # the deltas' `ts`
        self.arrived: list[float] = []
        self.snapshots = 0
        self.first_s = float("nan")  # from connecting to the first delta
        self.connected = 0.0

    async def follow(self, session: aiohttp.ClientSession, url: str) -> None:
        buffer = b""
        self.connected = time.time()
        async with session.get(url) as resp:
            async for chunk in resp.content.iter_any():
                self.bytes += len(chunk)
                buffer += chunk
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    self.parse(event, len(chunk))

    def parse(self, event: bytes, chunk_size: int) -> None:
        if event.startswith(b"event: snapshot\n"):
            self.snapshots += 1
        elif event.startswith(b"event: delta\n"):
            if not self.ticks:
                self.snapshot_bytes = self.bytes - chunk_size
                self.first_s = time.time() - self.connected
            head = event[len(b"event: delta\ndata: "):][:80]
            self.ticks.append(json.loads(head.split(b',"add"')[0] + b"}")["ts"])
            self.arrived.append(time.time())

    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False)]

    def lag(self) -> list[float]:
        return [a - t for t, a in zip(self.ticks, self.arrived, strict=True)]


async def churn(url: str, replicas: int, stop: asyncio.Event) -> None:
    """`replicas` heartbeats a second, in tenths."""
    bus = Bus(url, name="bench-churn")
    await bus.connect()
    step = 0
    try:
        while not stop.is_set():
            step += 1
            for tenth in range(10):
                for i in range(tenth, replicas, 10):
                    beat = m.Heartbeat(replica_id=replica_id(i), job_id=i // 100, step=step,
                                       step_time_ms=100.0 + (step + i) % 7)
                    await bus.publish(subjects.heartbeat(i // 100), m.encode(beat))
                await bus.flush()
                await asyncio.sleep(0.1)
    finally:
        await bus.close()


def slow_page(base: str) -> socket.socket:
    url = urllib.parse.urlsplit(base)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((url.hostname, url.port))
    sock.sendall(b"GET /api/events HTTP/1.1\r\nHost: %s\r\n\r\n" % url.netloc.encode())
    return sock  # and never read


async def wait_for_drop(ctl: ControllerProcess, since: float, limit_s: float = 30.0
                        ) -> float:
    """Seconds from the slow page's connecting to its drop (nan: not within `limit_s` more)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        counters = (await call(ctl.url, "status", {}, timeout_s=10))["counters"]
        if counters.get("http_sse_dropped"):
            return time.monotonic() - since
        await asyncio.sleep(0.5)
    return float("nan")


async def watch(ctl: ControllerProcess, base: str, args: argparse.Namespace
                ) -> dict[str, Any]:
    proc = Proc(ctl.proc.pid if ctl.proc else 0)
    stop = asyncio.Event()
    churning = asyncio.create_task(churn(ctl.url, args.churn, stop))
    await asyncio.sleep(2)  # the churn settles
    cpu0, t0 = proc.cpu_s(), time.monotonic()
    await asyncio.sleep(5)
    idle_cpu = (proc.cpu_s() - cpu0) / (time.monotonic() - t0)
    rss_before = proc.memory()
    pages = [Page() for _ in range(PAGES)]
    peak = rss_before
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        cpu0, t0 = proc.cpu_s(), time.monotonic()
        tasks = [asyncio.create_task(p.follow(session, base + "/api/events")) for p in pages]
        slow = slow_page(base)
        while time.monotonic() - t0 < args.seconds:
            await asyncio.sleep(0.5)
            peak = max(peak, proc.memory())
        pages_cpu = (proc.cpu_s() - cpu0) / (time.monotonic() - t0)
        window_s = time.monotonic() - t0
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        dropped_after_s = await wait_for_drop(ctl, t0)
        counters = (await call(ctl.url, "status", {}, timeout_s=10))["counters"]
        slow.close()
    stop.set()
    await churning
    await asyncio.sleep(3)  # the controller notices the pages are gone and lets go
    after = (await call(ctl.url, "status", {}, timeout_s=10))["counters"]
    return {"dropped_after_s": dropped_after_s,
            "open_after": after.get("http_sse_opened", 0) - after.get("http_sse_closed", 0),
            "pages": pages, "idle_cpu": idle_cpu, "pages_cpu": pages_cpu, "window_s": window_s,
            "rss_before": rss_before, "rss_peak": peak, "rss_after": proc.memory(),
            "hwm": proc.memory("VmHWM"), "counters": counters}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def report(args: argparse.Namespace, fill_s: float, api: dict[str, float],
           run: dict[str, Any]) -> None:
    mib = 2**20
    pages: list[Page] = run["pages"]
    intervals = [i for p in pages for i in p.intervals()]
    counters = run["counters"]
    print(f"replicas                  : {args.replicas:,} (written in {fill_s:.1f} s), "
          f"{args.churn:,} heartbeating 1/s, {PAGES} pages + 1 that never reads, "
          f"{run['window_s']:.0f} s")
    print(f"/api/replicas one page    : {api['one_bytes'] / 1024:8.1f} KiB in "
          f"{api['one_s'] * 1000:7.1f} ms (limit 500)")
    print(f"  all pages (old answer)  : {api['all_bytes'] / mib:8.1f} MiB in "
          f"{api['all_s'] * 1000:7.1f} ms ({api['pages']} pages of 5000); "
          f"one page is {api['one_s'] / api['all_s']:.3f} of the time, "
          f"{api['one_bytes'] / api['all_bytes']:.4f} of the bytes")
    for n, page in enumerate(pages):
        gaps = page.intervals()
        print(f"page {n}: {page.bytes / mib:7.2f} MiB received ({page.snapshot_bytes / mib:.2f} "
              f"MiB snapshot, {page.snapshots} snapshot parts), {len(page.ticks)} deltas, "
              f"tick median {median(gaps):.2f} s, max {max(gaps, default=float('nan')):.2f} s, "
              f"arrived {median(page.lag()):.2f} s after the tick (median), first delta "
              f"{page.first_s:.1f} s after connecting")
    old = api["all_bytes"] * len(pages[0].ticks)
    print(f"  the old stream, whole list a tick: {old / mib:.0f} MiB a page in the same ticks; "
          f"this run: {pages[0].bytes / mib:.1f} MiB ({pages[0].bytes / max(old, 1):.3f})")
    print(f"tick interval, all pages  : median {median(intervals):.2f} s, max "
          f"{max(intervals, default=float('nan')):.2f} s (goal <= 2 s)")
    print(f"controller CPU            : {run['idle_cpu'] * 100:5.1f} % of a core without pages,"
          f" {run['pages_cpu'] * 100:5.1f} % with them (+"
          f"{(run['pages_cpu'] - run['idle_cpu']) * 100:.1f})")
    print(f"controller RSS            : {run['rss_before'] / mib:.0f} MiB before pages, peak "
          f"{run['rss_peak'] / mib:.0f} MiB (VmHWM {run['hwm'] / mib:.0f}), "
          f"{run['rss_after'] / mib:.0f} MiB after they left (goal <= 1024; "
          f"{'gc only' if args.no_trim else 'gc + malloc_trim'})")
    print(f"slow page dropped         : {counters.get('http_sse_dropped', 0)} "
          f"({run['dropped_after_s']:.0f} s after it connected; snapshots sent "
          f"{counters.get('http_sse_snapshots', 0)}, ticks "
          f"{counters.get('http_sse_ticks', 0)}, delta bytes "
          f"{counters.get('http_sse_delta_bytes', 0) / mib:.1f} MiB); pages still open after "
          f"they left: {run['open_after']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--replicas", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--churn", type=int, default=5000, help="replicas heartbeating 1/s")
    ap.add_argument("--no-trim", action="store_true", help="gc only, no malloc_trim")
    args = ap.parse_args()
    args.churn = min(args.churn, args.replicas)
    if args.no_trim:
        harness.marduk_argv = lambda *a: [sys.executable, "-c", NO_TRIM, *a]
    with tempfile.TemporaryDirectory(prefix="marduk-dash-") as tmp:
        state = Path(tmp) / "state"
        state.mkdir()
        fill_s = fill(state, args.replicas)
        nats = NatsServerProcess(Path(tmp) / "nats")
        nats.start()
        ctl = ControllerProcess(state, nats.url).start(timeout_s=120)
        try:
            base = (state / "http.url").read_text().strip()
            api = replica_pages(base)
            run = asyncio.run(watch(ctl, base, args))
        finally:
            ctl.stop()
            nats.stop()
    report(args, fill_s, api, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
