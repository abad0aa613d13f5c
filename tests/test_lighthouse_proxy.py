"""The lighthouse liveness proxy against torchft's real lighthouse (its LighthouseServer, in
process) and torchft's own LighthouseClient, the Rust client the Managers use; leave commands
over a real nats-server.

The real lighthouse runs with a short heartbeat timeout and a join timeout of ten minutes, so
a quorum that leaves a silent replica out can only form once the lighthouse sees that replica
unhealthy, which the proxy allows only after a leave or after its own long timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest

pytest.importorskip("torchft",
                    reason="torchft is not importable (pip install marduk-slurm[runtime])")
pytest.importorskip("grpc", reason="grpcio is not importable")

from torchft._torchft import LighthouseClient, LighthouseServer

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.lighthouse_grpc import (
    HEARTBEAT,
    LEAVE,
    QUORUM,
    LighthouseCallError,
    _proxy_call,
    announce_leave,
)
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import lighthouse_wire as wire
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.lighthouse.proxy import LighthouseProxy, ProxyConfig

from runtime_worker import lighthouse_heartbeats

pytestmark = [pytest.mark.torch]
JOB = 515
SHORT_MS = 500
TEN_MINUTES_MS = 600_000


@pytest.fixture
def real_lighthouse() -> Iterator[int]:
    lh = LighthouseServer(bind="127.0.0.1:0", min_replicas=1, join_timeout_ms=TEN_MINUTES_MS,
                          quorum_tick_ms=50, heartbeat_timeout_ms=SHORT_MS)
    yield int(lh.address().rsplit(":", 1)[1])
    lh.shutdown()


async def start_proxy(port: int, long_ms: int, nats_url: str = "") -> LighthouseProxy:
    proxy = LighthouseProxy(ProxyConfig(
        listen="127.0.0.1:0", lighthouse=f"127.0.0.1:{port}",
        long_timeout=timedelta(milliseconds=long_ms),
        lighthouse_timeout=timedelta(milliseconds=SHORT_MS),
        job_id=JOB if nats_url else None, nats_url=nats_url))
    await proxy.start()
    return proxy


class Replica:
    """A replica as the lighthouse sees it: heartbeats every 100 ms (torchft's default) from
    a thread, through torchft's own client, until `silence()`."""

    def __init__(self, replica_id: str, proxy: LighthouseProxy) -> None:
        self.replica_id = replica_id
        self.addr = f"http://127.0.0.1:{proxy.server.port}"
        self.beating = threading.Event()
        self.beating.set()
        self.closed = threading.Event()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._beat, daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        client = LighthouseClient(self.addr, timedelta(seconds=5))
        while not self.closed.is_set():
            if self.beating.is_set():
                try:
                    client.heartbeat(self.replica_id)
                except Exception as exc:  # torchft raises its own error types
                    self.errors.append(repr(exc))
            time.sleep(0.1)

    def silence(self) -> None:
        """Stop heartbeating without a word, as a SIGKILLed process does."""
        self.beating.clear()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)

    async def quorum(self, step: int, timeout_s: float = 120.0) -> list[str]:
        def ask() -> list[str]:
            client = LighthouseClient(self.addr, timedelta(seconds=5))
            result = client.quorum(self.replica_id, timedelta(seconds=timeout_s), step=step)
            return sorted(p.replica_id for p in result.participants)
        return await asyncio.to_thread(ask)


@pytest.fixture
async def pair(real_lighthouse: int, nats_server: NatsServerProcess
               ) -> AsyncIterator[tuple[LighthouseProxy, Replica, Replica]]:
    proxy = await start_proxy(real_lighthouse, TEN_MINUTES_MS, nats_server.url)
    a, b = Replica(f"job{JOB}_rg0:aaaa", proxy), Replica(f"job{JOB}_rg1:bbbb", proxy)
    await wait_until(lambda: proxy.nats_connected and len(proxy.table) == 2, "two replicas")
    assert await asyncio.gather(a.quorum(1), b.quorum(1)) == [sorted([a.replica_id,
                                                                      b.replica_id])] * 2
    yield proxy, a, b
    a.close()
    b.close()
    await proxy.stop()


async def wait_until(predicate: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def publish(url: str, *payloads: bytes, group: int = 1) -> None:
    bus = Bus(url, name="test-leaves")
    await bus.connect()
    for payload in payloads:
        await bus.publish(subjects.replica_commands(JOB, group), payload)
    await bus.flush()
    await bus.close()


def leave(replica_id: str, job_id: int = JOB, action: str = "leave") -> bytes:
    return m.encode(m.ReplicaCommand(replica_id=replica_id, job_id=job_id, action=action,  # type: ignore[arg-type]
                                     reason="gpu fault", ts=time.time()))


async def test_a_commanded_leave_drops_the_replica_and_the_survivor_forms_its_quorum(
        pair: tuple[LighthouseProxy, Replica, Replica], real_lighthouse: int,
        nats_server: NatsServerProcess) -> None:
    proxy, a, b = pair
    # b is still heartbeating when the command comes (a hung or slow process), and waits
    # for its next quorum: the proxy drops its beats from then on, and ends its quorum call
    # once the lighthouse can no longer count it, so that it reaches its step boundary.
    pending_b = asyncio.create_task(b.quorum(2))
    await wait_until(lambda: proxy.server.pending_quorums() == 1, "b's quorum call")
    await publish(nats_server.url, leave(b.replica_id))
    with pytest.raises(Exception, match="told to leave"):
        await pending_b
    assert await a.quorum(2) == [a.replica_id]
    await wait_until(lambda: proxy.counts["dropped_after_leave"] >= 2, "b's beats dropped")
    seen = lighthouse_heartbeats(real_lighthouse)
    assert seen[b.replica_id][1], f"b still healthy at the lighthouse: {seen}"
    assert not seen[a.replica_id][1]
    assert proxy.table.relay_due(time.monotonic()) == [a.replica_id]
    assert proxy.counts["leave_applied"] == 1 and proxy.counts["leave_from_nats"] == 1
    with pytest.raises(Exception, match="told to leave"):
        await b.quorum(3, timeout_s=5)  # refused: it would make b healthy again
    assert await a.quorum(3) == [a.replica_id]


async def test_a_silent_replica_stays_healthy_until_the_long_timeout(
        real_lighthouse: int) -> None:
    long_ms = 4000
    proxy = await start_proxy(real_lighthouse, long_ms)
    a, b = Replica(f"job{JOB}_rg0:aaaa", proxy), Replica(f"job{JOB}_rg1:bbbb", proxy)
    try:
        await wait_until(lambda: len(proxy.table) == 2, "two replicas")
        assert await asyncio.gather(a.quorum(1), b.quorum(1)) == [
            sorted([a.replica_id, b.replica_id])] * 2
        b.silence()
        silenced = time.monotonic()
        pending_a = asyncio.create_task(a.quorum(2))
        # Well past the lighthouse's own (short) timeout, and before the proxy's long one
        # (with a second to spare), b still counts: no quorum without it.
        await asyncio.sleep(SHORT_MS / 1000 * 3)
        while time.monotonic() < silenced + long_ms / 1000 - 1.0:
            assert proxy.table.alive(b.replica_id, time.monotonic())
            assert not lighthouse_heartbeats(real_lighthouse)[b.replica_id][1]
            assert not pending_a.done(), "a quorum formed without b before the long timeout"
            await asyncio.sleep(0.1)
        # Once the long timeout has passed, b is dead there too and a goes on alone.
        assert await pending_a == [a.replica_id]
        assert not proxy.table.alive(b.replica_id, time.monotonic())
        assert proxy.counts["expired"] == 1 and not proxy.counts["leave_applied"]
    finally:
        a.close()
        b.close()
        await proxy.stop()


async def test_junk_and_unknown_leaves_are_counted_and_ignored(
        pair: tuple[LighthouseProxy, Replica, Replica], nats_server: NatsServerProcess) -> None:
    proxy, a, b = pair
    await publish(nats_server.url,
                  b"\xff\x00 not a command", b"{}", b'{"type":"replica_command"}',
                  leave(f"job{JOB}_rg1:never-heard"),  # unknown id
                  leave(b.replica_id, job_id=JOB + 1),  # another job's command
                  leave(b.replica_id, action="assume"),  # not a leave
                  leave("x" * 300))  # beyond the protocol's bound
    await wait_until(lambda: proxy.counts["leave_unknown"] == 1
                     and proxy.counts["command_other_job"] == 1
                     and proxy.counts["command_malformed"] == 4, "the junk counted")
    address = f"127.0.0.1:{proxy.server.port}"
    assert await announce_leave(address, "job1_rg0:someone-else") == "unknown"
    for method in (LEAVE, HEARTBEAT, QUORUM):
        for raw in (b"\xff\xff\xff", b"\x0a\x05ab", b"\x0a\x03a b", b"\x0a\x81\x02" + b"a" * 257):
            with pytest.raises(LighthouseCallError) as err:
                await _proxy_call(address, method, raw, 5.0)
            assert err.value.code == "INVALID_ARGUMENT"
    assert proxy.server.malformed == 12
    assert proxy.counts["leave_unknown"] == 2 and not proxy.counts["leave_applied"]
    # Nobody was dropped: the previous quorum is still whole, so it comes back at once.
    assert await asyncio.gather(a.quorum(2), b.quorum(2)) == [
        sorted([a.replica_id, b.replica_id])] * 2
    # A rank's id names its group; a leave re-sent until confirmed is a repeat.
    assert await announce_leave(address, f"{b.replica_id}/3") == "applied"
    await publish(nats_server.url, leave(b.replica_id))
    await wait_until(lambda: proxy.counts["leave_repeated"] == 1, "the repeat counted")
    assert await a.quorum(3) == [a.replica_id]


def test_replica_ids_are_read_from_torchft_requests_and_bounded() -> None:
    rid = "job7_rg1:0f6c5f9e-2b1d-4c4e-9f0a-1a2b3c4d5e6f"
    assert wire.heartbeat_replica_id(wire.heartbeat_request(rid)) == rid
    member = (b"\x0a" + bytes([len(rid)]) + rid.encode() + b"\x12\x04addr\x20\x07"
              + b"\x3a\x02{}" + b"\x40\x01")
    quorum = b"\x0a" + bytes([len(member)]) + member
    assert wire.quorum_replica_id(quorum) == rid
    assert wire.torchft_replica_id(f"{rid}/12") == rid
    assert wire.torchft_replica_id("a/b") == "a/b"
    for junk in (b"", b"\x08\x01", b"\x0a", b"\x0a\x10short", b"\x80" * 11, b"\x0f",
                 b"\x0a" * (wire.MESSAGE_MAX + 1)):
        with pytest.raises(ValueError):
            wire.heartbeat_replica_id(junk)
    with pytest.raises(ValueError):
        wire.heartbeat_request("has space")
