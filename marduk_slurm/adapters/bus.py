"""NATS adapter (nats-py): core publish/subscribe, request/reply, and the JetStream events stream.

Everything NATS-specific stays here: callers see `Bus`, raw bytes, and our own errors
(`BusError`, `BusTimeout`). Reconnection is nats-py's, unlimited, with a capped wait; the
connection state is reported through `on_state` for metrics and logs.

A URL may name several servers of one NATS cluster, comma-separated
(`nats://a:4222,nats://b:4222,nats://c:4222`): the connection picks one at random (spreading
a site's agents and replicas over the cluster) and, when that server goes away, reconnects to
another, also to those the cluster announces but the URL does not name.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

from marduk_slurm.adapters import nats_auth
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusClosed, BusError, BusTimeout

log = logging.getLogger(__name__)

# JetStream answers of a cluster that has no meta leader yet (starting, or electing a new
# one after a server died): worth waiting for, unlike a request it refuses.
JETSTREAM_UNAVAILABLE = (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError,
                         nats.errors.TimeoutError, TimeoutError)


# How long JetStream remembers a message id: a publisher that retries a message whose
# confirmation it lost (a server died after storing it) within this window is not recorded twice.
DUPLICATE_WINDOW_S = 120.0


def server_urls(url: str) -> list[str]:
    """The servers of a NATS URL: one, or several of one cluster, comma-separated."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise BusError(f"no NATS server in {url!r}")
    return servers


class Incoming(Protocol):
    """A core NATS message as the apps' handlers see it (nats-py's message is one)."""

    subject: str
    data: bytes
    reply: str

    async def respond(self, data: bytes) -> None: ...


Handler = Callable[[Incoming], Awaitable[None]]


class StreamMessage:
    """A message of the events stream, fetched by a durable consumer: its content, its stream
    sequence, how many times it was delivered, and its settlement (ack, nak, term), each
    failure of which is a `BusError`."""

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self.subject: str = msg.subject
        self.data = bytes(msg.data)
        self.seq, self.deliveries = _metadata(msg)

    async def ack(self) -> None:
        await self._settle(self._msg.ack())

    async def nak(self, delay_s: float) -> None:
        await self._settle(self._msg.nak(delay=delay_s))

    async def term(self) -> None:
        await self._settle(self._msg.term())

    @staticmethod
    async def _settle(call: Awaitable[None]) -> None:
        try:
            await call
        except (nats.errors.Error, OSError) as exc:
            raise BusError(str(exc)) from exc


def _metadata(msg: Msg) -> tuple[int, int]:
    """(stream sequence, deliveries); (0, 1) for a message without JetStream metadata."""
    try:
        meta = msg.metadata
        return int(meta.sequence.stream), int(meta.num_delivered)
    except (AttributeError, ValueError, TypeError, nats.errors.Error):
        return 0, 1


@dataclass(frozen=True)
class ConsumerState:
    delivered_seq: int  # the last stream sequence delivered (to this process or an earlier)
    ack_floor_seq: int  # every message up to this one is acknowledged
    num_pending: int  # not delivered yet
    num_ack_pending: int  # delivered, not acknowledged yet
    num_waiting: int = 0  # pull requests waiting: someone fetches from it now


class DurableConsumer:
    """A pull consumer of the events stream."""

    def __init__(self, psub: JetStreamContext.PullSubscription) -> None:
        self._psub = psub

    async def fetch(self, batch: int, timeout_s: float) -> list[StreamMessage]:
        """Up to `batch` messages; [] when none came within `timeout_s`."""
        try:
            msgs = await self._psub.fetch(batch, timeout=timeout_s)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.ConnectionClosedError as exc:
            raise BusClosed(str(exc)) from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"fetch from {subjects.EVENTS_STREAM} failed: {exc}") from exc
        return [StreamMessage(msg) for msg in msgs]


class Bus:
    """One NATS connection of one process."""

    def __init__(self, url: str, *, name: str, creds: str = "", connect_timeout_s: float = 5.0,
                 on_state: Callable[[str], None] | None = None, user: str = "",
                 password: str = "") -> None:
        self.url = url
        self.name = name
        # A marduk credential file (user, password, inbox prefix) or a NATS .creds file.
        self.creds = creds
        self.user = user
        self.password = password
        self.connect_timeout_s = connect_timeout_s
        self.on_state = on_state or (lambda state: None)
        self.nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._closing = False
        self._last_error_log = 0.0
        self._quiet = False
        self.reconnects = 0  # reconnections after a loss, to this server or another

    # -- connection ------------------------------------------------------------------------

    async def connect(self, *, retry: bool = False) -> None:
        """Connect. With `retry` (daemons) keep trying until NATS answers, then reconnect
        forever after any loss; without (the CLI) fail at once with a clear error."""
        self.on_state("connecting")
        self._closing = False  # a bus closed and connected again (a new URL) logs its losses
        self._quiet = not retry  # the CLI reports the failure itself, once
        try:
            auth = nats_auth.connect_options(self.creds)
        except nats_auth.AuthError as exc:
            raise BusError(str(exc)) from None
        if self.user:
            auth.update(user=self.user, password=self.password)
        servers = server_urls(self.url)
        try:
            self.nc = await nats.connect(
                servers, name=self.name, **auth,
                connect_timeout=self.connect_timeout_s, allow_reconnect=retry,
                max_reconnect_attempts=-1 if retry else 1, reconnect_time_wait=0.2,
                error_cb=self._on_error, disconnected_cb=self._on_disconnect,
                reconnected_cb=self._on_reconnect, closed_cb=self._on_closed,
                pending_size=64 * 1024 * 1024,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            self.on_state("disconnected")
            raise BusError(f"cannot connect to NATS at {self.url}: {exc or type(exc).__name__}"
                           ) from exc
        self._js = self.nc.jetstream()
        self.on_state("connected")

    async def _on_error(self, exc: Exception) -> None:
        now = time.monotonic()
        # One line per 10 s while NATS stays away.
        if not self._quiet and now - self._last_error_log > 10:
            self._last_error_log = now
            log.warning("NATS at %s: %s", self.url, exc or type(exc).__name__)

    async def _on_disconnect(self) -> None:
        if self._closing:
            return
        log.warning("NATS disconnected from %s", self.url)
        self.on_state("disconnected")

    async def _on_reconnect(self) -> None:
        self.reconnects += 1
        log.info("NATS reconnected to %s", self.server)
        self.on_state("connected")

    async def _on_closed(self) -> None:
        self.on_state("closed")

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    @property
    def server(self) -> str:
        """The server this connection is on now (one of a cluster's); "" when none."""
        nc = self.nc
        where = nc.connected_url if nc is not None and nc.is_connected else None
        if where is None:
            return ""
        return f"{where.scheme}://{where.hostname}:{where.port}"

    def _client(self) -> Client:
        if self.nc is None:
            raise BusError("not connected to NATS")
        return self.nc

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BusError("not connected to NATS")
        return self._js

    async def close(self) -> None:
        """Send what is still buffered, then close. Not a drain: draining waits for pull
        subscriptions' outstanding fetches, which only adds seconds to every shutdown."""
        self._closing = True
        if self.nc is not None and not self.nc.is_closed:
            if self.nc.is_connected:
                with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
                    await self.nc.flush(timeout=2)
            with contextlib.suppress(nats.errors.Error, OSError):
                await self.nc.close()
        self.nc = None

    # -- core NATS -------------------------------------------------------------------------

    def max_payload(self) -> int:
        """The largest message the server takes (its max_payload, 1 MiB by default)."""
        nc = self.nc
        limit = getattr(nc, "max_payload", 0) if nc is not None else 0
        return int(limit) if limit else 1024 * 1024

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self._client().publish(subject, data)
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"publish to {subject} failed: {exc}") from exc

    async def flush(self, timeout_s: float = 5.0) -> None:
        try:
            await self._client().flush(timeout=int(max(timeout_s, 1)))
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BusError(f"flush failed: {exc}") from exc

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "",
                        pending_msgs_limit: int = 512 * 1024) -> Subscription:
        return await self._client().subscribe(
            subject, queue=queue, cb=handler, pending_msgs_limit=pending_msgs_limit,
            pending_bytes_limit=256 * 1024 * 1024,
        )

    async def request(self, subject: str, data: bytes, timeout_s: float) -> bytes:
        try:
            msg = await self._client().request(subject, data, timeout=timeout_s)
        except nats.errors.NoRespondersError:
            raise BusError(f"nobody answers on {subject} (is the controller running?)") from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise BusTimeout(f"no answer on {subject} within {timeout_s:.1f} s") from None
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"request on {subject} failed: {exc}") from exc
        return bytes(msg.data)

    # -- JetStream -------------------------------------------------------------------------

    async def ensure_events_stream(self, *, replicas: int = 1, max_age_s: float = 7 * 86400.0
                                   ) -> None:
        """Create (or update) the durable events stream. `BusTimeout` while JetStream cannot
        answer yet (a cluster electing its meta leader): worth retrying; `BusError` when it
        refuses the stream (for instance more replicas than it has servers)."""
        config = StreamConfig(
            name=subjects.EVENTS_STREAM, subjects=[subjects.EVENTS_ALL],
            retention=RetentionPolicy.LIMITS, max_age=max_age_s, num_replicas=replicas,
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        try:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:  # there already, with another config
                await self.js.update_stream(config)
        except JETSTREAM_UNAVAILABLE as exc:
            raise BusTimeout(f"JetStream cannot create {subjects.EVENTS_STREAM} yet: "
                             f"{_describe(exc)}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot create stream {subjects.EVENTS_STREAM} with "
                           f"{replicas} replica(s): {_describe(exc)}") from exc

    async def publish_durable(self, subject: str, data: bytes, *, msg_id: str = "",
                              timeout_s: float = 5.0) -> int:
        """Publish to the events stream and wait for the server to store it; returns seq."""
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        try:
            ack = await self.js.publish(subject, data, timeout=timeout_s, headers=headers)
        except (TimeoutError, nats.errors.TimeoutError):
            raise BusTimeout(f"JetStream did not confirm {subject} in {timeout_s:.1f} s") from None
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"durable publish to {subject} failed: {exc}") from exc
        return int(ack.seq)

    async def durable_consumer(self, durable: str, *, ack_wait_s: float = 30.0,
                               max_ack_pending: int = 20000) -> DurableConsumer:
        config = ConsumerConfig(
            durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait_s,
            deliver_policy=DeliverPolicy.ALL, max_ack_pending=max_ack_pending,
            max_deliver=-1,
        )
        return DurableConsumer(await self.js.pull_subscribe(
            subjects.EVENTS_ALL, durable=durable, stream=subjects.EVENTS_STREAM, config=config
        ))

    async def consumer_state(self, durable: str) -> ConsumerState | None:
        """Where a durable consumer of the events stream stands; None before it exists."""
        try:
            info = await self.js.consumer_info(subjects.EVENTS_STREAM, durable)
        except nats.js.errors.NotFoundError:
            return None  # not created yet: its first fetch creates it
        except JETSTREAM_UNAVAILABLE as exc:
            raise BusTimeout(f"no answer about consumer {durable}: {_describe(exc)}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"no information about consumer {durable}: {_describe(exc)}"
                           ) from exc
        return ConsumerState(
            delivered_seq=int((info.delivered.stream_seq if info.delivered else 0) or 0),
            ack_floor_seq=int((info.ack_floor.stream_seq if info.ack_floor else 0) or 0),
            num_pending=int(info.num_pending or 0),
            num_ack_pending=int(info.num_ack_pending or 0),
            num_waiting=int(info.num_waiting or 0))

    async def stream_info(self) -> dict[str, Any]:
        """The events stream's state and, on a NATS cluster, where its replicas are: the
        leader's server name and each other replica's (`current`: caught up with it)."""
        try:
            info = await self.js.stream_info(subjects.EVENTS_STREAM)
        except JETSTREAM_UNAVAILABLE as exc:
            raise BusTimeout(f"no answer about {subjects.EVENTS_STREAM}: {_describe(exc)}"
                             ) from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"no information about {subjects.EVENTS_STREAM}: {_describe(exc)}"
                           ) from exc
        cluster = info.cluster
        return {
            "messages": info.state.messages, "last_seq": info.state.last_seq,
            "replicas": info.config.num_replicas,
            "leader": (cluster.leader or "") if cluster is not None else "",
            "followers": [{"name": peer.name, "current": bool(peer.current)}
                          for peer in ((cluster.replicas or []) if cluster is not None else [])],
        }


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
