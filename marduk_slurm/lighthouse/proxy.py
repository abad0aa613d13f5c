"""The lighthouse liveness proxy: a commanded leave that costs the survivors (almost) nothing.

torchft's lighthouse counts a replica healthy until its last heartbeat is older than
`heartbeat_timeout_ms`, and has no "leave" call: the survivors of a replica group that marduk
sent away wait out that timeout before their next quorum, exactly as after a crash. The job
therefore runs the real lighthouse with a short timeout and this proxy in front of it with the
operator's long one (templates/torchft.sbatch.j2); the Managers' TORCHFT_LIGHTHOUSE names the
proxy. The proxy forwards every call, and heartbeats the lighthouse on behalf of each replica
heard within the long timeout (domain/liveness.py), so an unannounced death still costs the long
timeout. When the replica is told to leave (the controller's leave command on NATS, which the
proxy hears with the job's credential, or the replica's own `Leave` call) the proxy stops at
once: the lighthouse sees the replica gone within the short timeout and the survivors form
their quorum without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.lighthouse_grpc import (
    LighthouseCallError,
    LighthouseProxyServer,
    LighthouseUpstream,
)
from marduk_slurm.backoff import Backoff
from marduk_slurm.domain import lighthouse_wire as wire
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.liveness import LeaveOutcome, LivenessTable
from marduk_slurm.errors import BusError, ProtocolError

log = logging.getLogger(__name__)

RELAY_TIMEOUT_S = 1.0
LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class ProxyConfig:
    """`listen` and `lighthouse` as host:port (or http://host:port); `long_timeout` is the
    operator's heartbeat timeout, `lighthouse_timeout` the real lighthouse's; `job_id` and
    `nats_url` (with `nats_creds`, the job's credential) let the proxy hear the controller's
    leave commands."""

    listen: str
    lighthouse: str
    long_timeout: timedelta
    lighthouse_timeout: timedelta = timedelta(milliseconds=200)
    relay_interval: timedelta = timedelta(milliseconds=50)
    job_id: int | None = None
    nats_url: str = ""
    nats_creds: str = ""
    creds_wait: timedelta = timedelta(seconds=60)

    def __post_init__(self) -> None:
        if not timedelta(milliseconds=1) <= self.relay_interval < self.long_timeout:
            raise ValueError("relay_interval must be at least 1 ms and below long_timeout")
        if not timedelta(0) < self.lighthouse_timeout < self.long_timeout:
            raise ValueError("lighthouse_timeout must be positive and below long_timeout")
        if self.nats_url and self.job_id is None:
            raise ValueError("a NATS URL needs the job id whose leave commands to hear")


class LighthouseProxy:
    """The proxy's state and tasks; also the `ProxyPolicy` of its gRPC server."""

    def __init__(self, config: ProxyConfig, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.table = LivenessTable(config.long_timeout.total_seconds())
        self.counts = self.table.counts
        self.upstream = LighthouseUpstream(config.lighthouse)
        self.server = LighthouseProxyServer(config.listen, self.upstream, self)
        self.nats_connected = False
        self._subscribed = False
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_warning = 0.0

    # -- ProxyPolicy ------------------------------------------------------------------------

    def on_heartbeat(self, replica_id: str) -> bool:
        return self.table.heard(replica_id, self.clock())

    def on_quorum(self, replica_id: str) -> bool:
        return self.table.heard(replica_id, self.clock())  # an implicit heartbeat in torchft

    def on_leave(self, replica_id: str) -> str:
        return self.leave(replica_id, "replica")

    def stats(self) -> dict[str, Any]:
        return {**self.counts, "relaying": sorted(self.table.relay_due(self.clock())),
                "nats_connected": self.nats_connected}

    # -- leaving ----------------------------------------------------------------------------

    def leave(self, marduk_replica_id: str, source: str) -> LeaveOutcome:
        """`marduk_replica_id` was told to leave: stop keeping it alive at the lighthouse."""
        replica_id = wire.torchft_replica_id(marduk_replica_id)
        outcome = self.table.leave(replica_id)
        self.counts[f"leave_from_{source}"] += 1
        if outcome is LeaveOutcome.APPLIED:
            log.info("%s left (told by %s): no longer heartbeated", replica_id, source)
            # A quorum call it has pending may still be answered with it in: the lighthouse
            # counts it healthy for its own timeout, and then the replica must take part in
            # that step. After that timeout no quorum can include it: end the call, so that
            # the replica reaches its step boundary (and leaves) instead of waiting.
            delay = (self.config.lighthouse_timeout + self.config.relay_interval).total_seconds()
            asyncio.get_running_loop().call_later(delay, self.server.cancel_quorums, replica_id)
        elif outcome is LeaveOutcome.UNKNOWN:
            self._warn("leave for %s (from %s) ignored: not heard within the long timeout",
                       replica_id[:64], source)
        return outcome

    def _warn(self, fmt: str, *args: Any) -> None:
        now = self.clock()
        if now - self._last_warning >= LOG_EVERY_S:  # one line per 10 s; the counters say all
            self._last_warning = now
            log.warning(fmt, *args)

    async def _on_command(self, msg: Any) -> None:
        try:
            cmd = m.decode_command(msg.data)
        except ProtocolError as exc:
            self.counts["command_malformed"] += 1
            self._warn("malformed command on %s: %s", msg.subject, exc)
            return
        if cmd.job_id != self.config.job_id:
            self.counts["command_other_job"] += 1
            return
        if isinstance(cmd, m.ReplicaCommand) and cmd.action == "leave":
            self.leave(cmd.replica_id, "nats")

    # -- tasks ------------------------------------------------------------------------------

    async def start(self) -> int:
        """Listen and start relaying; returns the port."""
        port = await self.server.start()
        self._spawn(self._relay_loop())
        if self.config.nats_url:
            self._spawn(self._listen_nats())
        log.info("lighthouse proxy on port %d for %s (long timeout %s)", port,
                 self.upstream.target, self.config.long_timeout)
        return port

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.stop()
        await self.upstream.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay_loop(self) -> None:
        interval = self.config.relay_interval.total_seconds()
        while True:
            for replica_id in self.table.relay_due(self.clock()):
                if replica_id not in self._in_flight:  # a slow lighthouse gets no pile-up
                    self._in_flight.add(replica_id)
                    self._spawn(self._relay(replica_id))
            await asyncio.sleep(interval)

    async def _relay(self, replica_id: str) -> None:
        try:
            if self.table.has_left(replica_id):
                return
            await self.upstream.heartbeat(wire.heartbeat_request(replica_id), RELAY_TIMEOUT_S)
            self.counts["relayed_heartbeats"] += 1
        except LighthouseCallError as exc:
            self.counts["relay_failures"] += 1
            self._warn("heartbeat for %s to the lighthouse failed: %s", replica_id, exc)
        finally:
            self._in_flight.discard(replica_id)

    async def _listen_nats(self) -> None:
        """Hear the job's replica commands; without NATS the proxy still relays, and leaves
        come only from the replicas themselves."""
        creds = self.config.nats_creds
        deadline = self.clock() + self.config.creds_wait.total_seconds()
        while creds and not os.path.exists(creds):
            if self.clock() >= deadline:
                log.warning("no NATS credential at %s: leaves come only from the replicas",
                            creds)
                return
            await asyncio.sleep(0.2)
        bus = Bus(self.config.nats_url, name=f"lighthouse-proxy-{self.config.job_id}",
                  creds=creds, on_state=self._on_bus_state)
        backoff = Backoff(base_s=0.5, max_s=10.0)
        while True:
            try:
                await bus.connect(retry=True)
                break
            except BusError as exc:
                self.counts["nats_connect_failures"] += 1
                self._warn("NATS not reachable yet: %s", exc)
                await asyncio.sleep(backoff.next())
        assert self.config.job_id is not None
        await bus.subscribe(subjects.replica_commands_all(self.config.job_id), self._on_command)
        await bus.flush()
        self._subscribed = self.nats_connected = True
        try:
            await asyncio.Event().wait()
        finally:
            await bus.close()

    def _on_bus_state(self, state: str) -> None:
        self.nats_connected = state == "connected" and self._subscribed
