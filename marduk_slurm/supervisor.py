"""Supervised long-running tasks: a crash is logged with its traceback, counted, and the task
restarted with backoff; a task that keeps crashing stops the daemon (non-zero exit), so systemd
restarts the whole process instead of leaving a half-working one.

A run that lasted `stable_s` or longer resets the backoff: a crash after hours of service is a
new incident, not the next step of the last one. Each restart calls the task's factory again,
so a task must be restartable: whatever one run subscribed to or opened, it releases in a
`finally` (or the next run reuses it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, Protocol

from marduk_slurm.backoff import Backoff

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Awaitable[None]]


class Subscription(Protocol):
    """What a task subscribed to (a nats-py subscription is one)."""

    async def unsubscribe(self, limit: int = 0) -> Any: ...


async def unsubscribe_all(subscriptions: Iterable[Subscription]) -> None:
    """End a run's subscriptions, for its `finally`: the restarted run subscribes again, and
    two live subscriptions would hand it every message twice."""
    for subscription in subscriptions:
        try:
            await subscription.unsubscribe()
        except Exception as exc:  # the connection may be closed already; nothing to undo
            log.debug("unsubscribe failed: %s", exc)


class Supervisor:
    def __init__(self, *, max_restarts: int = 5, window_s: float = 60.0,
                 backoff_base_s: float = 0.2, backoff_max_s: float = 10.0,
                 stable_s: float = 60.0) -> None:
        if stable_s <= 0 or backoff_base_s <= 0:
            raise ValueError("stable_s and backoff_base_s must be > 0")
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.delays: dict[str, list[float]] = {}  # the waits before each restart, per task
        self.crashes: Counter[str] = Counter()
        self.fatal = asyncio.Event()
        self.fatal_reason = ""
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, factory: TaskFactory) -> None:
        self._tasks[name] = asyncio.create_task(self._run(name, factory), name=name)

    async def _run(self, name: str, factory: TaskFactory) -> None:
        recent: deque[float] = deque()
        backoff = Backoff(base_s=self.backoff_base_s, max_s=self.backoff_max_s)
        while True:
            started = time.monotonic()
            try:
                await factory()
                log.info("task %s finished", name)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                now = time.monotonic()
                if now - started >= self.stable_s:
                    backoff.reset()
                if not self._count_crash(name, recent, now):
                    return
                delay = backoff.next()
                self.delays.setdefault(name, []).append(delay)
                await asyncio.sleep(delay)

    def _count_crash(self, name: str, recent: deque[float], now: float) -> bool:
        """Count and log a crash; False (and the daemon told to stop) when there were too
        many in the window."""
        self.crashes[name] += 1
        recent.append(now)
        while recent and now - recent[0] > self.window_s:
            recent.popleft()
        log.exception("task %s crashed (%d in the last %.0f s)", name, len(recent), self.window_s)
        if len(recent) > self.max_restarts:
            self.fatal_reason = f"task {name} crashed {len(recent)} times in {self.window_s:.0f} s"
            log.critical("%s; stopping the daemon", self.fatal_reason)
            self.fatal.set()
            return False
        return True

    async def stop(self, timeout_s: float | None = None, *,
                   keep: Collection[str] = ()) -> list[str]:
        """Cancel every task but those named in `keep` and wait for them, at most timeout_s.
        Returns the names of the tasks still running then, each logged with where it
        waits."""
        tasks = {name: task for name, task in self._tasks.items() if name not in keep}
        for name, task in tasks.items():
            task.cancel()
            del self._tasks[name]
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks.values(), timeout=timeout_s)
        stuck = [name for name, task in tasks.items() if task in pending]
        for task in tasks.values():  # their errors were logged where they crashed
            if task.done() and not task.cancelled():
                task.exception()
        for name in stuck:
            log.error("task %s did not stop within %.0f s of its cancellation; it waits in:\n%s",
                      name, timeout_s or 0, "\n".join(awaiting(tasks[name])))
        return stuck


def awaiting(task: asyncio.Task[Any]) -> list[str]:
    """Where a suspended task waits: its chain of awaits, outermost first (a task's own
    stack shows only the outermost coroutine)."""
    lines = []
    step: Any = task.get_coro()
    while step is not None:
        frame = getattr(step, "cr_frame", None) or getattr(step, "gi_frame", None)
        if frame is None:
            lines.append(f"  on {step!r}"[:300])
            break
        lines.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
        step = getattr(step, "cr_await", None) or getattr(step, "gi_yieldfrom", None)
    return lines

    def running(self) -> list[str]:
        return [n for n, t in self._tasks.items() if not t.done()]
