"""What the controller's parts share: the store (behind its one thread), the bus, counters,
and carrying out effects after a commit."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import multiprocessing
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.store import Store, StoreApi
from marduk_slurm.controller import queries
from marduk_slurm.controller.decisions import Effects, Policy
from marduk_slurm.controller.leadership import Leadership, NotLeader
from marduk_slurm.controller.replication import Replication
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_REJECTION_KEYS = 1000
# The list queries' processes, and how far they stand back for the controller's own work.
QUERY_PROCESSES = 2
QUERY_NICE = 10


URGENT, BACKGROUND = 0, 1  # write-lane priorities: see PriorityWriter


class PriorityWriter:
    """The write lane's one thread: store calls run one at a time, urgent ones (a fault's
    decision, the outbox, leave commands, an operator's drain) before background ones (the
    heartbeat write-behind), first come first served within a priority. A background call
    that is running is not interrupted: the heartbeat writer keeps its calls short."""

    def __init__(self, name: str) -> None:
        self._queue: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: int, fn: Callable[..., T], *args: Any) -> Future[T]:
        future: Future[T] = Future()
        self._queue.put((priority, next(self._seq), (future, fn, args)))
        return future

    def _run(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it started
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Run what is queued, then stop."""
        self._queue.put((math.inf, next(self._seq), None))
        self._thread.join()


class StoreRunner:
    """Runs store calls off the event loop, in two lanes.

    The write lane is one dedicated thread with the one writing connection: ingest, the
    outbox, leave commands and heartbeats, so a fault's decision never queues behind anything
    but other writes, and among writes it goes first: the heartbeat write-behind is
    background work (`background=True`), written in short transactions. The read lane is a
    small pool of read-only connections (WAL lets them read while the writer writes):
    operator queries, the dashboard and metrics go there, so a burst of heavy queries cannot
    delay a fault.
    """

    def __init__(self, store: Store, *, readers: int = 2,
                 query_processes: int = QUERY_PROCESSES) -> None:
        # The concrete store: its path opens the read lane's connections and the query
        # processes'. The apps see it as `store`, a StoreApi.
        self._store = store
        self.query_processes = query_processes
        self._query_pool: ProcessPoolExecutor | None = None
        self.executor = PriorityWriter("sqlite")
        self._local = threading.local()
        self._readers: list[Store] = []
        self._readers_lock = threading.Lock()
        self.read_executor = ThreadPoolExecutor(max_workers=readers,
                                                thread_name_prefix="sqlite-read")

    @property
    def store(self) -> StoreApi:
        """The writing connection (the write lane's thread only)."""
        return self._store

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(self.executor.submit(URGENT, fn, *args))

    async def tx(self, fn: Callable[[StoreApi], T], *, background: bool = False) -> T:
        """Run `fn(store)` inside one transaction; `background` work waits for the urgent."""
        def run() -> T:
            with self.store.transaction():
                return fn(self.store)
        return await asyncio.wrap_future(
            self.executor.submit(BACKGROUND if background else URGENT, run))

    async def read(self, fn: Callable[[StoreApi], T]) -> T:
        """Run `fn(store)` on a read-only connection of the read lane."""
        if self._store.path == ":memory:":  # nothing to share a memory database with
            return await self(fn, self.store)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.read_executor, self._read, fn)

    async def answer_query(self, verb: str, args: dict[str, Any], risk: queries.RiskByGpu,
                           max_payload: int) -> tuple[bytes, str]:
        """A list query (controller.queries), answered and encoded in a query process: the
        third lane, for work that is heavy in Python as well as in SQLite."""
        if self._store.path == ":memory:" or self.query_processes == 0:
            return await self.read(
                lambda store: queries.answer(store, verb, args, risk, max_payload))
        call = (queries.worker_answer, verb, args, risk, max_payload)
        try:
            return await self._in_query_process(*call)
        except BrokenProcessPool:  # a query process died (killed, out of memory): once more
            return await self._in_query_process(*call)

    async def _in_query_process(self, fn: Callable[..., T], *args: Any) -> T:
        pool = self._query_pool or self.start_queries()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            log.warning("a query process died; the next query starts them again")
            if self._query_pool is pool:
                self._query_pool = None
                pool.shutdown(wait=False, cancel_futures=True)
            raise

    def start_queries(self) -> ProcessPoolExecutor:
        """Start the query processes (spawned, never forked from this threaded process)."""
        self._query_pool = ProcessPoolExecutor(
            max_workers=self.query_processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=queries.worker_init,
            initargs=(str(self._store.path), os.getpid(), QUERY_NICE))
        return self._query_pool

    def _read(self, fn: Callable[[StoreApi], T]) -> T:
        reader: Store | None = getattr(self._local, "store", None)
        if reader is None:
            reader = Store(self._store.path, read_only=True)
            self._local.store = reader
            with self._readers_lock:
                self._readers.append(reader)
        return fn(reader)

    def close(self) -> None:
        if self._query_pool is not None:
            self._query_pool.shutdown(wait=True, cancel_futures=True)
        self.read_executor.shutdown(wait=True)
        for reader in self._readers:
            reader.close()
        self.executor.shutdown()
        self._store.close()


class Context:
    def __init__(self, db: StoreRunner, bus: Bus, policy: Policy) -> None:
        self.db = db
        self.bus = bus
        self.policy = policy
        self.stats: Counter[str] = Counter()
        # Rejected input by (subject class, message kind, cause); see reject().
        self.rejected: Counter[tuple[str, str, str]] = Counter()
        self.outbox_kick = asyncio.Event()
        self.started_at = time.time()
        self.nats_state = "disconnected"
        # A standby records decisions and carries none out; the leader acts while its lease
        # is current (controller/leadership.py). Without a lease (tests of one part) it acts.
        self.acting = True
        self.leadership: Leadership | None = None
        self.replication = Replication("")

    def may_act(self) -> bool:
        """Whether to carry decisions out now, by this controller's own clock."""
        return self.acting and (self.leadership is None or self.leadership.current())

    def fence_token(self) -> int | None:
        """The term commands carry (controller/leadership.py); None without a lease."""
        return self.leadership.term if self.leadership is not None else None

    async def fence(self, what: str) -> bool:
        """Before an action that must happen once (a Slurm call): whether the lease is still
        ours, asked of NATS. A refusal is counted and logged by the leadership."""
        if not self.acting:
            return False
        if self.leadership is None:
            return True
        try:
            await self.leadership.check(what)
        except NotLeader:
            self.stats["stale_leader_refusals"] += 1
            return False
        return True

    def reject(self, reason: str, subject: str, detail: str, kind: str = "") -> None:
        """Count input that was refused at the edge (never stored), by subject class, message
        kind and cause. The set of keys is bounded: senders choose subjects, not counters."""
        key = (subjects.subject_class(subject), kind or "?", reason)
        if key not in self.rejected and len(self.rejected) >= MAX_REJECTION_KEYS:
            key = ("other", kind or "?", reason)
        self.rejected[key] += 1
        log.warning("rejected message on %r: %s %r", subject[:200], reason, detail[:200])

    def rejections(self) -> list[dict[str, Any]]:
        """The counters as rows, most frequent first."""
        return [{"subject": s, "kind": k, "cause": c, "count": n}
                for (s, k, c), n in self.rejected.most_common()]

    async def carry_out(self, effects: Effects) -> None:
        """Publish what a commit decided. A failure here is logged, not raised: the decision
        is already on record, and a leave command that does not arrive is re-sent from its
        stored intent (controller.leaves) until the replica confirms it."""
        for cause, subject, detail, kind in effects.rejected:
            self.reject(cause, subject, detail, kind)
        if not self.may_act():
            # A standby (or a leader whose lease may have lapsed): the commands are stored
            # and go out from controller.leaves once this controller leads.
            return
        if effects.outbox:
            self.outbox_kick.set()
        for leave, event_id in effects.leaves:
            cmd = m.ReplicaCommand(
                replica_id=leave.replica.replica_id, job_id=leave.replica.job_id,
                action="leave", reason=leave.reason, immediate=leave.immediate,
                event_id=event_id, ts=time.time(), fence=self.fence_token(),
            )
            subject = subjects.replica_commands(leave.replica.job_id, leave.replica.replica_group)
            await self.publish(subject, m.encode(cmd))
            self.stats["leave_commands"] += 1
        for assignment, event_id in effects.assumes:
            sb = assignment.standby
            cmd = m.ReplicaCommand(
                replica_id=sb.standby_id, job_id=sb.job_id, action="assume",
                reason=assignment.reason[:1000], replica_group=assignment.replica_group,
                event_id=event_id, ts=time.time(), fence=self.fence_token())
            await self.publish(subjects.standby_commands(sb.job_id), m.encode(cmd))
            self.stats["assume_commands"] += 1
        for dismissal, event_id in effects.dismissals:
            sb = dismissal.standby
            cmd = m.ReplicaCommand(
                replica_id=sb.standby_id, job_id=sb.job_id, action="leave",
                reason=dismissal.reason[:1000], immediate=True, event_id=event_id,
                ts=time.time(), fence=self.fence_token())
            await self.publish(subjects.standby_commands(sb.job_id), m.encode(cmd))
            self.stats["standby_dismissals"] += 1
        if effects.feed:
            await self.publish_feed(effects.feed)

    async def publish_feed(self, event_ids: list[int]) -> None:
        rows = await self.db(lambda: [self.db.store.event(i) for i in event_ids])
        for row in rows:
            if row is None:
                continue
            ev = m.FeedEvent(id=row["id"], ts=row["ts"], kind=row["kind"], reason=row["reason"],
                             node=row["node"], gpu_uuid=row["gpu_uuid"], job_id=row["job_id"],
                             replica_id=row["replica_id"], evidence=row["evidence"])
            await self.publish(subjects.FEED, m.encode(ev))

    async def publish(self, subject: str, data: bytes) -> None:
        try:
            await self.bus.publish(subject, data)
        except BusError as exc:
            self.stats["publish_failures"] += 1
            log.warning("could not publish on %s: %s", subject, exc)
