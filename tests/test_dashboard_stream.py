"""The dashboard's replica stream and replica pages at scale, against a real controller over
real HTTP: a snapshot then small deltas, a page that stops reading is dropped without growing
the controller, and `/api/replicas` pages through everything with a cursor."""

from __future__ import annotations

import asyncio
import http.client
import json
import queue
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

import harness
from harness import ControllerProcess, http_get, publish_core, publish_durable, wait_for

FILLED = 3000
NEW_JOB = 5000
SLOW_CLIENT_BYTES = 64 * 1024




def fill(state_dir: Path, replicas: int) -> None:
    """Replicas of 100 per job, written into the database before the controller starts."""
    store = Store(state_dir / "marduk.db")
    store.migrate()
    now = time.time()
    with store.transaction():
        for i in range(replicas):
            msg = m.ReplicaRegister(replica_id=f"job{i // 100}_rg{i % 100}:" + "u" * 32,
                                    job_id=i // 100, replica_group=i % 100,
                                    node=f"node{i // 8:05d}", gpu_uuids=[f"GPU-{i:08d}"])
            store.register_replica(msg, now)
            store.ensure_node(msg.node, now)
    store.close()


def start(tmp_path: Path, nats_url: str, replicas: int) -> tuple[ControllerProcess, str]:
    state = tmp_path / "state"
    state.mkdir(parents=True)
    fill(state, replicas)
    ctl = ControllerProcess(state, nats_url).start()
    wait_for((state / "http.url").exists, 10, what="http.url")
    return ctl, (state / "http.url").read_text().strip()


@pytest.fixture
def filled(tmp_path: Path, nats_server: NatsServerProcess
           ) -> Iterator[tuple[ControllerProcess, str]]:
    ctl, base = start(tmp_path, nats_server.url, FILLED)
    yield ctl, base
    assert ctl.stop() == 0, ctl.log()


class SseReader:
    """Reads /api/events on a thread: each event's name, its size on the wire, its data."""

    def __init__(self, base: str) -> None:
        url = urllib.parse.urlsplit(base)
        self.conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=30)
        self.conn.request("GET", "/api/events")
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200
        self.events: queue.Queue[tuple[str, int, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        name, data, size = "", b"", 0
        try:
            for line in self.resp:
                size += len(line)
                if line.startswith(b"event: "):
                    name = line[7:].strip().decode()
                elif line.startswith(b"data: "):
                    data += line[6:].rstrip(b"\n")
                elif line == b"\n" and name:
                    self.events.put((name, size, json.loads(data)))
                    name, data, size = "", b"", 0
                elif line == b"\n":
                    size = 0
        except (OSError, ValueError, AttributeError):  # closed by the test (http.client
            # clears its file object on close, under the reading thread)
            pass

    def next(self, match: Callable[[str, Any], bool], what: str, timeout_s: float = 20.0
             ) -> tuple[list[tuple[str, int, Any]], tuple[str, int, Any]]:
        """Events up to the first that matches (those before it, and it)."""
        seen: list[tuple[str, int, Any]] = []
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no event with {what}; saw "
                                     f"{[(e[0], e[1]) for e in seen]}") from None
            if match(event[0], event[2]):
                return seen, event
            seen.append(event)

    def close(self) -> None:
        if self.conn.sock is not None:
            self.conn.sock.shutdown(socket.SHUT_RDWR)
        self.conn.close()


def has_row(rows: list[list[Any]], replica_id: str, where: Callable[[list[Any]], bool]
            = lambda r: True) -> bool:
    return any(r[0] == replica_id and where(r) for r in rows)


def test_a_page_gets_a_snapshot_then_only_what_changed(
        filled: tuple[ControllerProcess, str]) -> None:
    ctl, base = filled
    reader = SseReader(base)
    try:
        parts, last = reader.next(lambda n, d: n == "snapshot" and d["part"] + 1 == d["parts"],
                                  "the last part of the snapshot")
        snapshot = [*(e for e in parts if e[0] == "snapshot"), last]
        fields = snapshot[0][2]["fields"]
        assert fields[0] == "replica_id" and len(fields) <= 13
        assert [e[2]["part"] for e in snapshot] == list(range(len(snapshot))) and len(snapshot) > 1
        assert sum(len(e[2]["rows"]) for e in snapshot) == last[2]["total"] == FILLED
        snapshot_bytes = sum(e[1] for e in snapshot)
        step = fields.index("last_step")

        rid = f"job{NEW_JOB}_rg0:new"
        asyncio.run(publish_durable(ctl.url, [(subjects.job_event(NEW_JOB, "replica_register"),
            m.encode(m.ReplicaRegister(replica_id=rid, job_id=NEW_JOB, replica_group=0,
                                       node="n-new", gpu_uuids=["GPU-new"])))]))
        before, added = reader.next(lambda n, d: n == "delta" and has_row(d["add"], rid),
                                    "the new replica added")
        assert added[2]["add"] == [added[2]["add"][0]] and not added[2]["change"]
        assert added[2]["summary"]["replicas"] == FILLED + 1

        asyncio.run(publish_core(ctl.url, [(subjects.heartbeat(NEW_JOB), m.encode(m.Heartbeat(
            replica_id=rid, job_id=NEW_JOB, step=42, step_time_ms=100.0)))]))
        between, changed = reader.next(
            lambda n, d: n == "delta" and has_row(d["change"], rid, lambda r: r[step] == 42),
            "the heartbeat's step as a change")
        assert not changed[2]["add"] and not changed[2]["remove"]

        asyncio.run(publish_durable(ctl.url, [(subjects.job_event(NEW_JOB, "replica_leave"),
            m.encode(m.ReplicaLeave(replica_id=rid, job_id=NEW_JOB, reason="done")))]))
        after, removed = reader.next(lambda n, d: n == "delta" and rid in d["remove"],
                                     "the replica removed")
        assert removed[2]["summary"]["replicas"] == FILLED
    finally:
        reader.close()
    stream = [*before, added, *between, changed, *after, removed]
    deltas = [e for e in stream if e[0] == "delta"]
    assert not [e for e in stream if e[0] == "snapshot"], "the table was sent again"
    # A delta carries the rows that changed, never the table: 3,000 rows are over 300 KB.
    assert snapshot_bytes > 300_000, snapshot_bytes
    assert max(e[1] for e in deltas) < 1000, [e[1] for e in deltas]


def test_replica_pages_cover_everything_once_and_bad_paging_is_a_400(
        filled: tuple[ControllerProcess, str]) -> None:
    _, base = filled
    seen: list[str] = []
    cursor = ""
    pages = 0
    while True:
        status, body = http_get(f"{base}/api/replicas?limit=700&cursor={cursor}")
        assert status == 200, body
        page = json.loads(body)
        assert page["total"] == FILLED and len(page["items"]) <= 700
        seen += [r["replica_id"] for r in page["items"]]
        pages += 1
        if page["next"] is None:
            break
        cursor = page["next"]
    assert len(seen) == len(set(seen)) == FILLED and pages == 5
    default = json.loads(http_get(f"{base}/api/replicas")[1])
    assert len(default["items"]) == 500 and default["next"]
    one_job = json.loads(http_get(f"{base}/api/replicas?job=3&limit=5000")[1])
    assert {r["job_id"] for r in one_job["items"]} == {3} and one_job["total"] == 100
    for bad in ("limit=0", "limit=5001", "limit=x", "cursor=%%%", "cursor=W10",
                "cursor=WzEsMiwzXQ", "limit=5&limit=6", "after=3"):
        status, body = http_get(f"{base}/api/replicas?{bad}")
        assert status == 400, (bad, body)
        assert json.loads(body)["parameter"] in ("limit", "cursor", "after"), body


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


SMALL_CAP = ("import sys; import marduk_slurm.controller.event_stream as stream; "
             f"stream.CLIENT_BYTES = {SLOW_CLIENT_BYTES}; "
             "from marduk_slurm.cli.main import main; sys.exit(main())")


def test_a_page_that_stops_reading_is_dropped_and_the_controller_does_not_grow(
        tmp_path: Path, nats_server: NatsServerProcess, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    # The real controller, with a page allowed to fall behind by 64 KiB instead of 4 MiB.
    monkeypatch.setattr(harness, "marduk_argv", lambda *args: [sys.executable, "-c", SMALL_CAP,
                                                               *args])
    ctl, base = start(tmp_path, nats_server.url, 5000)
    assert ctl.proc is not None
    try:
        reader = SseReader(base)  # a page that keeps up: the table is read, deltas flow
        reader.next(lambda n, d: n == "delta", "a first delta")
        rss_before = rss_bytes(ctl.proc.pid)
        url = urllib.parse.urlsplit(base)
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads it
        slow.connect((url.hostname, url.port))
        slow.sendall(b"GET /api/events HTTP/1.1\r\nHost: %s\r\n\r\n" % url.netloc.encode())
        beats = 0

        def step() -> None:
            nonlocal beats  # 100 replicas step: about 14 KB of deltas a tick
            beats += 1
            asyncio.run(publish_core(ctl.url, [(subjects.heartbeat(i // 100), m.encode(
                m.Heartbeat(replica_id=f"job{i // 100}_rg{i % 100}:" + "u" * 32,
                            job_id=i // 100, step=beats, step_time_ms=100.0)))
                for i in range(100)]))

        def dropped() -> bool:
            step()
            return bool(ctl.request("status")["counters"].get("http_sse_dropped"))
        wait_for(dropped, 60, interval_s=0.3, what="the slow page dropped")
        rss_after = rss_bytes(ctl.proc.pid)
        # The page that reads stays on, and follows.
        step()
        reader.next(lambda n, d: n == "delta" and d["change"] and d["change"][0][6] == beats,
                    "a delta after the drop")
        reader.close()
        slow.close()
    finally:
        assert ctl.stop() == 0, ctl.log()
    # Dropped for the bytes it owed, not by the write stall limit (30 s without progress).
    assert "bytes queued and" in ctl.log() and f"at most {SLOW_CLIENT_BYTES}): dropped" \
        in ctl.log(), ctl.log()
    # The slow page held at most its 64 KiB queue and its socket buffer; before bytes were
    # counted it held 256 ticks, each the whole table (about 1 MB at this size).
    assert rss_after - rss_before < 16 * 2**20, (rss_before, rss_after)
