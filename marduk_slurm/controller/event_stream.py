"""The dashboard's server-sent event stream: the replica table as a snapshot then deltas, and
the controller's feed of history events.

Each tick computes one `Delta` for all pages (`live_table`), encodes it once and queues the
same bytes for every page. A page's queue is bounded in bytes, not in messages: one that
falls behind by more than `client_bytes` is dropped (counted as `http_sse_dropped`, logged)
and its connection closed; the browser reconnects by itself and starts over from a fresh
snapshot. A snapshot is not queued at all: its parts are written one at a time, each waiting
for the socket, so a page that reads slowly holds one part, never the whole table.

While no page is open the table is not read, and when the last page goes its rows are freed
and the memory handed back to the system (`release_memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from aiohttp import web

from marduk_slurm.adapters.bus import Incoming
from marduk_slurm.controller.live_table import FIELDS, Delta, ReplicaTable, encode

if TYPE_CHECKING:
    from marduk_slurm.controller.observe import Observability

log = logging.getLogger(__name__)

TICK_S = 1.0  # the replica table is compared this often (or less, see EventStream.tick)
KEEPALIVE_S = 15.0
WRITE_STALL_S = 30.0  # a page whose socket takes nothing for this long is dropped
CLIENT_BYTES = 4 * 2**20  # what one page may fall behind by before it is dropped
SNAPSHOT_PART_ROWS = 2000
SEND_BUFFER_MAX = 1 * 2**20
KEEPALIVE = b": keepalive\n\n"
STREAM_HEADERS = {"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"}


def sse(event: str, data: bytes | str) -> bytes:
    text = data.encode() if isinstance(data, str) else data
    return b"event: %s\ndata: %s\n\n" % (event.encode(), text)


def release_memory() -> None:
    """Give freed memory back to the system: after a table of 100,000 rows is dropped, glibc
    keeps its arenas unless asked (measured in benchmarks/dashboard_scale.py)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to ask
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class StreamClient:
    """One open page: what is queued for it, in bytes, and which table version it has."""

    def __init__(self, peer: str, transport: asyncio.Transport | None, cap: int) -> None:
        self.peer = peer
        self.transport = transport
        self.cap = cap
        self.chunks: deque[bytes] = deque()
        self.queued = 0
        self.version: int | None = None  # None: it needs a snapshot before any delta
        self.closed = False
        self.wake = asyncio.Event()

    def put(self, chunk: bytes) -> bool:
        """Queue `chunk`; False when that would put the page more than `cap` bytes behind."""
        if self.queued + len(chunk) > self.cap:
            return False
        self.chunks.append(chunk)
        self.queued += len(chunk)
        self.wake.set()
        return True

    async def next(self, timeout_s: float) -> bytes | None:
        """The next chunk to write; a keepalive after `timeout_s` of nothing; None when woken
        for something else (a resync, the end)."""
        if not self.chunks:
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), timeout_s)
            except TimeoutError:
                return KEEPALIVE
            if not self.chunks:
                return None
        chunk = self.chunks.popleft()
        self.queued -= len(chunk)
        return chunk

    def resync(self) -> None:
        """Start over from a snapshot: what is queued is older than it."""
        self.chunks.clear()
        self.queued = 0
        self.version = None
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.resync()
        if self.transport is not None:  # wakes a write waiting for the socket
            self.transport.abort()


class EventStream:
    """Fans deltas of the replica table and the controller's feed out to SSE clients."""

    def __init__(self, obs: Observability, *, client_bytes: int | None = None,
                 tick_s: float = TICK_S, headers: dict[str, str] | None = None) -> None:
        self.obs = obs
        self.headers = {**STREAM_HEADERS, **(headers or {})}
        self.client_bytes = client_bytes or CLIENT_BYTES  # read now: tests may lower it
        self.tick_s = tick_s
        self.table = ReplicaTable()
        self.clients: set[StreamClient] = set()
        self.watched = asyncio.Event()  # set while a page is open
        self.fresh = asyncio.Event()  # the table has been read since the last page opened

    # -- fan-out ------------------------------------------------------------------------------

    def broadcast(self, chunk: bytes, version: int | None = None) -> None:
        """Queue `chunk` for every page (a delta: for those whose rows are at an older
        version)."""
        for client in list(self.clients):
            if version is not None and (client.version is None or client.version >= version):
                continue
            if not client.put(chunk):
                self.drop(client, f"{client.queued} bytes queued and {len(chunk)} more to "
                                  f"send, at most {client.cap}")

    def drop(self, client: StreamClient, why: str) -> None:
        self.obs.ctx.stats["http_sse_dropped"] += 1
        log.warning("dashboard client %s fell behind (%s): dropped; it reconnects to a "
                    "fresh snapshot", client.peer, why)
        self.clients.discard(client)
        client.close()
        if not self.clients:
            self._forget()

    async def on_feed(self, msg: Incoming) -> None:
        if self.clients:
            self.broadcast(sse("event", msg.data.decode(errors="replace")))

    def publish(self, delta: Delta) -> None:
        following = [c for c in self.clients if c.version is not None]
        if not following:
            return
        chunk = sse("delta", delta.encode())
        self.obs.ctx.stats["http_sse_delta_bytes"] += len(chunk)
        if len(chunk) > self.client_bytes // 2:
            # Most rows changed: a snapshot, sent at the pace of each socket, costs the same
            # bytes without holding them all in every page's queue.
            for client in following:
                client.resync()
            return
        self.broadcast(chunk, delta.version)

    # -- the tick -------------------------------------------------------------------------------

    async def tick(self) -> None:
        while True:
            await self.watched.wait()
            started = time.monotonic()
            await self.refresh()
            took = time.monotonic() - started
            # A full read of a large table may take longer than a tick; the next one still
            # waits a little, so that the read lane is not held all the time.
            await asyncio.sleep(max(self.tick_s - took, took / 4))

    async def refresh(self) -> None:
        live = self.obs.stragglers.replica_view()
        table = self.table
        tick = await self.obs.ctx.db.read(lambda store: table.refresh(store, live))
        if not self.clients:  # the last page left while the table was read
            del tick
            release_memory()
            return
        table.apply(tick)
        self.obs.ctx.stats["http_sse_ticks"] += 1
        self.fresh.set()
        self.publish(tick.delta)

    def _forget(self) -> None:
        self.watched.clear()
        self.fresh.clear()
        self.table.clear()
        release_memory()

    def close(self) -> None:
        for client in list(self.clients):
            client.close()
        self.clients.clear()
        self._forget()

    # -- one page -----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers=self.headers)
        await resp.prepare(request)
        self._limit_send_buffer(request, min(self.client_bytes, SEND_BUFFER_MAX))
        client = StreamClient(request.remote or "?", request.transport, self.client_bytes)
        self.clients.add(client)
        self.obs.ctx.stats["http_sse_opened"] += 1
        self.watched.set()
        try:
            await resp.write(b"retry: 2000\n\n")
            while not client.closed:
                if client.version is None:
                    await self._send_snapshot(client, resp)
                    continue
                chunk = await client.next(KEEPALIVE_S)
                if chunk is not None:
                    await self._write(client, resp, chunk)
        except ConnectionError:  # the page went, or was dropped
            pass
        finally:
            self._leave(client)
        return resp

    @staticmethod
    def _limit_send_buffer(request: web.Request, size: int) -> None:
        # Linux grows a socket's send buffer up to tcp_wmem's maximum (4 MiB) for a page that
        # does not read, on top of its queue; a fixed size keeps what a page holds bounded.
        sock = None if request.transport is None else request.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    async def _send_snapshot(self, client: StreamClient, resp: web.StreamResponse) -> None:
        await self.fresh.wait()
        table = self.table
        rows, version, summary = list(table.rows.values()), table.version, table.summary.as_json()
        client.version = version  # from here on, later deltas queue up behind the snapshot
        self.obs.ctx.stats["http_sse_snapshots"] += 1
        parts = max(1, -(-len(rows) // SNAPSHOT_PART_ROWS))
        head = encode({"v": version, "parts": parts, "total": len(rows), "fields": FIELDS,
                       "summary": summary})[:-1]
        for part in range(parts):
            start = part * SNAPSHOT_PART_ROWS
            body = b",".join(rows[start:start + SNAPSHOT_PART_ROWS])
            await self._write(client, resp, sse("snapshot", b'%s,"part":%d,"rows":[%s]}' % (
                head, part, body)))
            if client.version != version:  # dropped, or told to start over meanwhile
                return

    async def _write(self, client: StreamClient, resp: web.StreamResponse, chunk: bytes
                     ) -> None:
        # Without a limit a page that stops reading in the middle of a snapshot would hold
        # its handler (and one part) for as long as its TCP connection lives.
        try:
            await asyncio.wait_for(resp.write(chunk), WRITE_STALL_S)
        except TimeoutError:
            if not client.closed:
                self.drop(client, f"its socket took nothing for {WRITE_STALL_S:.0f} s")
            raise ConnectionResetError("dropped") from None

    def _leave(self, client: StreamClient) -> None:
        self.obs.ctx.stats["http_sse_closed"] += 1
        client.chunks.clear()
        if client in self.clients:
            self.clients.discard(client)
            if not self.clients:
                self._forget()
