"""Bounded, fair admission of operator and job requests.

Requests wait in one queue per requester (the NATS inbox their answer goes to) and a fixed
number of workers take them round-robin, so one client firing thousands of requests delays
its own requests, not everybody's. Each request carries a deadline (the requester's timeout,
sent in the request, or a default); one still waiting at its deadline is dropped unanswered,
since nobody is waiting for the answer any more. Past a bound on what may wait, a new request
is refused at once with a "busy" answer rather than queued.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_DEADLINE_S = 10.0
MAX_DEADLINE_S = 120.0


@dataclass
class Pending:
    requester: str
    deadline: float  # time.monotonic()
    payload: Any


def requester_of(reply_subject: str) -> str:
    """The requester behind a reply subject: nats clients answer on `_INBOX.<client>.<id>`."""
    parts = reply_subject.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else reply_subject


class FairRequestQueue:
    def __init__(self, *, workers: int = 8, max_waiting: int = 2000,
                 max_per_requester: int = 200) -> None:
        self.workers = workers
        self.max_waiting = max_waiting
        self.max_per_requester = max_per_requester
        self._queues: OrderedDict[str, deque[Pending]] = OrderedDict()
        self._waiting = 0
        self._ready = asyncio.Event()
        self.stats = {"admitted": 0, "refused_busy": 0, "expired": 0, "served": 0}

    def offer(self, item: Pending) -> bool:
        """Queue a request; False when it must be refused (too many waiting)."""
        queue = self._queues.get(item.requester)
        if self._waiting >= self.max_waiting or (
                queue is not None and len(queue) >= self.max_per_requester):
            self.stats["refused_busy"] += 1
            return False
        if queue is None:
            queue = self._queues[item.requester] = deque()
        queue.append(item)
        self._waiting += 1
        self.stats["admitted"] += 1
        self._ready.set()
        return True

    def waiting(self) -> int:
        return self._waiting

    def _take(self) -> Pending | None:
        """The next request, round-robin over requesters; expired ones are dropped."""
        now = time.monotonic()
        while self._queues:
            requester, queue = self._queues.popitem(last=False)
            item = queue.popleft()
            self._waiting -= 1
            if queue:  # to the back of the line: others go first
                self._queues[requester] = queue
            if item.deadline <= now:
                self.stats["expired"] += 1
                continue
            return item
        self._ready.clear()
        return None

    async def serve(self, handle: Callable[[Pending], Awaitable[None]]) -> None:
        """Run the workers until cancelled."""
        async def worker() -> None:
            while True:
                item = self._take()
                if item is None:
                    await self._ready.wait()
                    continue
                await handle(item)
                self.stats["served"] += 1

        tasks = [asyncio.create_task(worker(), name=f"rpc-worker-{i}")
                 for i in range(self.workers)]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def deadline_for(timeout_ms: int | None, now: float) -> float:
    """The monotonic deadline of a request: its requester's timeout, capped."""
    seconds = DEFAULT_DEADLINE_S if timeout_ms is None else timeout_ms / 1000.0
    return now + min(max(seconds, 0.001), MAX_DEADLINE_S)
