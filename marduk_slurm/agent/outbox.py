"""Durable publishing that survives NATS being away.

Everything the agent must not lose (step reports, verdicts, the GPU inventory) goes through
one `Outbox`: a bounded in-memory FIFO, published to JetStream in order by one task, each item
retried with backoff until the server confirms it. One queue keeps a step's start ahead of
its end. Each item carries a JetStream message id, so a retry after a lost confirmation is
dropped by the server's duplicate window instead of being recorded twice.

When the queue is full the oldest item is dropped with a counted warning: a node agent must
not grow without bound while NATS is down. Running steps are also in the on-disk journal
(see `journal`), so a dropped or lost step start is announced again after a restart.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from marduk_slurm.backoff import Backoff
from marduk_slurm.errors import BusError, BusTimeout

log = logging.getLogger(__name__)

OnPublished = Callable[[], Awaitable[None]]


class DurablePublisher(Protocol):
    """What the outbox needs from the bus (`adapters.bus.Bus` is one)."""

    @property
    def connected(self) -> bool: ...

    async def publish_durable(
        self, subject: str, data: bytes, *, msg_id: str = "", timeout_s: float = 5.0
    ) -> int: ...


@dataclass
class Pending:
    subject: str
    data: bytes
    msg_id: str
    on_published: OnPublished | None = None
    queued_at: float = 0.0


class Outbox:
    def __init__(
        self,
        bus: DurablePublisher,
        *,
        max_items: int = 10_000,
        publish_timeout_s: float = 2.0,
        backoff_max_s: float = 5.0,
    ) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {max_items}")
        self.bus = bus
        self.max_items = max_items
        self.publish_timeout_s = publish_timeout_s
        self.backoff_max_s = backoff_max_s
        self.stats: Counter[str] = Counter()
        self._queue: deque[Pending] = deque()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_warning = 0.0

    def __len__(self) -> int:
        return len(self._queue)

    def put(
        self, subject: str, data: bytes, msg_id: str, on_published: OnPublished | None = None
    ) -> None:
        """Queue one message; never blocks, never fails (drops the oldest when full)."""
        if len(self._queue) >= self.max_items:
            dropped = self._queue.popleft()
            self.stats["dropped"] += 1
            self._warn(
                f"outbox full ({self.max_items}): dropped the oldest message "
                f"({dropped.subject}); {self.stats['dropped']} dropped so far"
            )
        self._queue.append(Pending(subject, data, msg_id, on_published, time.monotonic()))
        self.stats["queued"] += 1
        self._idle.clear()
        self._wakeup.set()

    def _warn(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # one line per 10 s while NATS stays away
            self._last_warning = now
            log.warning("%s", text)

    async def run(self) -> None:
        """Publish queued messages in order, forever."""
        while True:
            await self._wakeup.wait()
            await self._drain()
            if not self._queue:
                self._wakeup.clear()
                self._idle.set()

    async def _drain(self) -> None:
        backoff = Backoff(base_s=0.1, max_s=self.backoff_max_s)
        while self._queue:
            if not self.bus.connected:
                await asyncio.sleep(0.1)  # nats-py reconnects by itself; just wait for it
                continue
            item = self._queue[0]
            try:
                await self.bus.publish_durable(
                    item.subject, item.data, msg_id=item.msg_id, timeout_s=self.publish_timeout_s
                )
            except (BusError, BusTimeout) as exc:
                self.stats["retries"] += 1
                self._warn(
                    f"cannot publish {item.subject} yet ({exc}); {len(self._queue)} "
                    f"messages waiting, retrying"
                )
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            # The item may have been dropped (queue full) while we awaited the server.
            if self._queue and self._queue[0] is item:
                self._queue.popleft()
            self.stats["published"] += 1
            if item.on_published is not None:
                await item.on_published()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until everything queued is published; False if that took over `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True
