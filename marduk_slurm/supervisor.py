"""Supervised long-running tasks: a crash is logged with its traceback, counted, and the task
restarted with backoff; a task that keeps crashing stops the daemon (non-zero exit), so systemd
restarts the whole process instead of leaving a half-working one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Awaitable[None]]


class Supervisor:
    def __init__(self, *, max_restarts: int = 5, window_s: float = 60.0,
                 backoff_max_s: float = 10.0) -> None:
        self.max_restarts = max_restarts
        self.window_s = window_s
        self.backoff_max_s = backoff_max_s
        self.crashes: Counter[str] = Counter()
        self.fatal = asyncio.Event()
        self.fatal_reason = ""
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, factory: TaskFactory) -> None:
        self._tasks[name] = asyncio.create_task(self._run(name, factory), name=name)

    async def _run(self, name: str, factory: TaskFactory) -> None:
        recent: deque[float] = deque()
        delay = 0.2
        while True:
            try:
                await factory()
                log.info("task %s finished", name)
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.crashes[name] += 1
                now = time.monotonic()
                recent.append(now)
                while recent and now - recent[0] > self.window_s:
                    recent.popleft()
                log.exception("task %s crashed (%d in the last %.0f s)", name, len(recent),
                              self.window_s)
                if len(recent) > self.max_restarts:
                    self.fatal_reason = (f"task {name} crashed {len(recent)} times in "
                                         f"{self.window_s:.0f} s")
                    log.critical("%s; stopping the daemon", self.fatal_reason)
                    self.fatal.set()
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max_s)

    async def stop(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()

    def running(self) -> list[str]:
        return [n for n, t in self._tasks.items() if not t.done()]
