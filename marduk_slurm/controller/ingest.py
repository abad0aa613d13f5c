"""Getting messages in: durable events from JetStream, heartbeats from core NATS.

Durable events are fetched in batches, applied in one SQLite transaction per batch, and
acknowledged only after the commit. Redelivered messages (the controller died between commit
and ack) are recognised by their stream sequence and skipped. Malformed messages are committed
as rejections and acknowledged too: redelivering them would never make them valid.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from marduk_slurm.adapters.bus import ConsumerState, Incoming, StreamMessage
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.backoff import Backoff
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.decisions import Effects
from marduk_slurm.controller.inbound import apply_message
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import (
    BusClosed,
    BusError,
    BusTimeout,
    IdentityError,
    ProtocolError,
    StoreError,
)
from marduk_slurm.supervisor import unsubscribe_all

log = logging.getLogger(__name__)

DURABLE_NAME = "marduk-controller"
# How long JetStream waits for an ack before it redelivers: after a crash, the batch the dead
# controller had fetched comes back this much later. Redeliveries are skipped by sequence, so
# a short wait costs nothing but a re-read.
ACK_WAIT_S = 10.0


# A message whose handling fails this many times is set aside (dead letter) and terminated.
MAX_DELIVERIES = 3
POISON_RETRY_S = 1.0


@dataclass
class _Item:
    seq: int
    subject: str
    data: bytes
    deliveries: int
    outcome: str = "ack"  # ack, nak (try again later), term (dead-lettered)


@dataclass
class _BatchResult:
    effects: Effects = field(default_factory=Effects)
    rejected: list[tuple[str, str, str, str]] = field(default_factory=list)


class EventIngest:
    def __init__(self, ctx: Context, *, batch: int = 256, durable: str = DURABLE_NAME) -> None:
        self.ctx = ctx
        self.durable = durable  # every controller has its own (leader and standbys)
        # Messages an earlier run of this controller had fetched and not acknowledged when it
        # stopped: JetStream delivers them again only after the ack wait. And whether a
        # fetched batch is being applied now. Both tell a new leader when it has caught up.
        self.stranded = 0
        self.busy = False
        self.batch = batch
        self._store_failures = Backoff(base_s=0.5, max_s=10.0)

    async def run(self) -> None:
        consumer = await self.ctx.bus.durable_consumer(self.durable, ack_wait_s=ACK_WAIT_S)
        with contextlib.suppress(BusError, BusTimeout):
            state = await self.ctx.bus.consumer_state(self.durable)
            self.stranded = state.num_ack_pending if state is not None else 0
        backoff = Backoff(base_s=0.2, max_s=5.0)
        while True:
            try:
                msgs = await consumer.fetch(self.batch, timeout_s=1.0)
            except BusClosed:
                raise
            except BusError as exc:
                delay = backoff.next()
                log.warning("%s; fetching again in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            if msgs:
                self.busy = True
                try:
                    await self.process(msgs)
                finally:
                    self.busy = False
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # Cancelled while nats-py's fetch was completing: its wait_for returned the
                # messages and swallowed the cancellation. They are committed and acked now;
                # stop here, or the shutdown waits on this loop for its whole time limit.
                raise asyncio.CancelledError

    def caught_up(self, state: ConsumerState, target: int) -> bool:
        """Whether every message up to stream sequence `target` is applied here, but for
        those an earlier run had fetched (they come back after the ack wait; waiting for
        them would add up to ACK_WAIT_S to every restart)."""
        if state.ack_floor_seq >= target:
            return True
        return (state.delivered_seq >= target and not self.busy
                and state.num_ack_pending <= self.stranded)

    async def process(self, msgs: list[StreamMessage]) -> None:
        items = [_Item(msg.seq, msg.subject, msg.data, msg.deliveries) for msg in msgs]
        try:
            result = await self.ctx.db.tx(lambda store: self._apply(store, items))
        except (sqlite3.Error, StoreError) as exc:
            await self._hold_back(msgs, exc)
            return
        self._store_failures.reset()
        for reason, subject, kind, detail in result.rejected:
            self.ctx.reject(reason, subject, detail, kind)
        for msg, item in zip(msgs, items, strict=True):  # only now, after the commit
            await _settle(msg, item.outcome)
        self.ctx.stats["events_ingested"] += sum(i.outcome == "ack" for i in items) - len(
            result.rejected)
        await self.ctx.carry_out(result.effects)

    async def _hold_back(self, msgs: list[StreamMessage], exc: Exception) -> None:
        """The database refused the batch (locked, disk full): leave it in JetStream, ask for
        redelivery soon, and wait before fetching again. The daemon stays up; it catches up
        by itself once the database takes writes again."""
        delay = self._store_failures.next()
        self.ctx.stats["ingest_store_failures"] += 1
        log.error("database write failed (%s): %d event(s) left in JetStream, retrying in "
                  "%.1f s", exc, len(msgs), delay)
        for msg in msgs:
            # If even the nak fails, the message is still unacked: redelivered after ACK_WAIT_S.
            with contextlib.suppress(BusError):
                await msg.nak(delay)
        await asyncio.sleep(delay)

    def _apply(self, store: StoreApi, items: list[_Item]) -> _BatchResult:
        result = _BatchResult()
        now = time.time()
        for item in items:
            if item.seq and store.already_ingested(item.seq):
                self.ctx.stats["events_redelivered"] += 1
                continue
            self._apply_one(store, item, now, result)
            if item.seq and item.outcome != "nak":
                store.mark_ingested(item.seq, now)
        return result

    def _apply_one(self, store: StoreApi, item: _Item, now: float, result: _BatchResult) -> None:
        """Decode, check and apply one message in its own savepoint: whatever it raises, the
        rest of the batch commits."""
        kind = item.subject.rsplit(".", 1)[-1][:32]
        try:
            msg = m.decode_durable(item.data)
            check_subject(item.subject, msg)
            with store.savepoint():
                if isinstance(msg, m.ActionApplied):  # the leader's reports, for standbys
                    self.ctx.replication.on_applied(store, msg, now)
                elif isinstance(msg, m.ConfigRevised):
                    self.ctx.replication.on_config(store, msg, now)
                else:
                    result.effects.extend(apply_message(store, msg, now, self.ctx.policy))
        except IdentityError as exc:
            if exc.retry and item.deliveries < MAX_DELIVERIES:
                item.outcome = "nak"
                return
            self._refuse(store, item, kind, exc, now, result)
            store.add_event("identity_rejected", now=now, source="controller",
                            reason=f"{exc.reason}: {exc.detail}"[:500],
                            evidence={"subject": item.subject[:200], "stream_seq": item.seq})
        except ProtocolError as exc:
            self._refuse(store, item, kind, exc, now, result)
        except sqlite3.OperationalError as exc:
            if transient_store_error(exc):
                raise  # the database, not the message: hold the whole batch back
            self._poison(store, item, exc, now)
        except Exception as exc:
            self._poison(store, item, exc, now)

    def _refuse(self, store: StoreApi, item: _Item, kind: str, exc: ProtocolError, now: float,
                result: _BatchResult) -> None:
        subject = subjects.subject_class(item.subject)
        store.count_rejection(exc.reason, subject, kind, exc.detail, now)
        result.rejected.append((exc.reason, item.subject, kind, exc.detail))

    def _poison(self, store: StoreApi, item: _Item, exc: BaseException, now: float) -> None:
        """A message whose handling raised: retried a few times (the cause may pass), then
        kept in the dead-letter table and terminated in JetStream. Never a crash loop."""
        error = f"{type(exc).__name__}: {exc}"[:1000]
        self.ctx.stats["ingest_message_failures"] += 1
        if item.deliveries < MAX_DELIVERIES:
            log.warning("event on %r failed (delivery %d of %d), will retry: %s",
                        item.subject[:200], item.deliveries, MAX_DELIVERIES, error)
            item.outcome = "nak"
            return
        store.add_dead_letter(item.subject, item.seq, item.deliveries, error, item.data, now)
        self.ctx.stats["dead_letters"] += 1
        log.error("event on %r dead-lettered after %d deliveries: %s", item.subject[:200],
                  item.deliveries, error)
        item.outcome = "term"


def transient_store_error(exc: sqlite3.OperationalError) -> bool:
    """Whether the database itself failed (locked, full, I/O), as opposed to one statement."""
    text = str(exc).lower()
    return any(word in text for word in ("locked", "busy", "disk", "full", "i/o", "readonly",
                                         "read-only", "unable to open", "interrupted"))


async def _settle(msg: StreamMessage, outcome: str) -> None:
    try:
        if outcome == "nak":
            await msg.nak(POISON_RETRY_S)
        elif outcome == "term":
            await msg.term()
        else:
            await msg.ack()
    except BusError as exc:
        log.warning("%s failed (message will be redelivered and skipped): %s", outcome, exc)


# Who may send each durable message: an agent (node subjects), a replica (job subjects) or the
# leading controller (ctl subjects; NATS permissions give those to the controller alone).
_SCOPE: dict[type, str] = {
    m.StepStart: "node", m.StepEnd: "node", m.Verdict: "node", m.GpuInventory: "node",
    m.ReplicaRegister: "job", m.ReplicaLeave: "job", m.ConfigAck: "job",
    m.AssumeAck: "job", m.NodeVerdict: "node", m.ActionApplied: "ctl", m.ConfigRevised: "ctl",
}


def check_subject(subject: str, msg: Any) -> None:
    """The subject names the node or job the message is about; they must agree, so that
    NATS permissions on subjects also bind the content (an agent cannot speak for another
    node, a job for another job)."""
    parts = subject.split(".")
    if len(parts) != 6 or parts[2] != "evt":
        raise ProtocolError("bad_subject", subject)
    scope, key, kind = parts[3], parts[4], parts[5]
    if kind != msg.__struct_config__.tag or scope != _SCOPE[type(msg)]:
        raise ProtocolError("subject_mismatch", f"{subject} carries {type(msg).__name__}")
    if scope == "node" and msg.node == key:
        return
    if scope == "job" and str(msg.job_id) == key:
        return
    if scope == "ctl" and msg.controller == key:
        return
    raise ProtocolError("subject_mismatch", f"{subject} does not match the message's {scope}")


# Beats per write-behind transaction: a fault's decision on the write lane waits for one such
# transaction at most (HeartbeatWriter.flush).
HEARTBEAT_CHUNK = 500


class HeartbeatWriter:
    """Decode heartbeats as they arrive; write them behind, in one transaction per period."""

    def __init__(self, ctx: Context, *, flush_ms: int = 50) -> None:
        self.ctx = ctx
        self.flush_s = flush_ms / 1000.0
        self.pending: dict[str, m.Heartbeat] = {}
        self._subjects: dict[int, str] = {}
        self.received = 0
        self._received_reported = 0
        self.written = 0
        self.last_lag_ms = 0.0
        # Called with each written batch (newest beat per replica) and the flush time: the
        # place for per-batch analysis (stragglers, metrics), never the per-message path.
        self.on_flush: list[Callable[[list[m.Heartbeat], float], None]] = []

    async def on_message(self, msg: Incoming) -> None:
        # The hot path: decode, check the subject, keep the newest beat per replica.
        try:
            hb = m.decode_heartbeat(msg.data)
        except ProtocolError as exc:
            self.ctx.reject(exc.reason, msg.subject, exc.detail, "heartbeat")
            return
        subject = self._subjects.get(hb.job_id)
        if subject is None:
            subject = self._subjects[hb.job_id] = subjects.heartbeat(hb.job_id)
        if msg.subject != subject:
            self.ctx.reject("subject_mismatch", msg.subject, "heartbeat of another job",
                            "heartbeat")
            return
        self.received += 1
        # Newer beats of one replica replace older ones: the row keeps the latest state.
        self.pending[hb.replica_id] = hb

    def _keep_for_next_period(self, batch: list[m.Heartbeat], exc: Exception) -> None:
        # Keep the batch for the next period unless a newer beat replaced it meanwhile.
        for hb in batch:
            self.pending.setdefault(hb.replica_id, hb)
        self.ctx.stats["heartbeat_flush_failures"] += 1
        log.warning("heartbeat write-behind failed, retrying next period: %s", exc)

    async def _write_one_by_one(self, batch: list[m.Heartbeat], now: float
                                ) -> list[m.Heartbeat]:
        """A batch failed because of its content: write beats singly and drop the bad ones
        (counted), so one beat can never stop the write-behind. Returns the beats written."""
        try:
            _written, bad = await self.ctx.db.tx(
                lambda store: store.write_heartbeats_one_by_one(batch, now), background=True)
        except (sqlite3.Error, StoreError) as exc:
            self._keep_for_next_period(batch, exc)
            return []
        for hb, error in bad:
            self.ctx.reject("unstorable", subjects.heartbeat(hb.job_id), error, "heartbeat")
        self.ctx.stats["heartbeats_written"] += len(batch) - len(bad)
        refused = {id(hb) for hb, _ in bad}
        return [hb for hb in batch if id(hb) not in refused]

    async def run(self) -> None:
        subscription = await self.ctx.bus.subscribe(subjects.HEARTBEATS_ALL, self.on_message)
        try:  # a restarted run subscribes again: never twice
            while True:
                await asyncio.sleep(self.flush_s)
                await self.flush()
        finally:
            await unsubscribe_all([subscription])

    async def flush(self) -> None:
        self.ctx.stats["heartbeats_received"] += self.received - self._received_reported
        self._received_reported = self.received
        if not self.pending:
            return
        batch, self.pending = list(self.pending.values()), {}
        now = time.time()
        # Background work in short transactions: a fault's decision waits for one chunk at
        # most, never for a whole period's beats of a large cluster.
        written: list[m.Heartbeat] = []
        for first in range(0, len(batch), HEARTBEAT_CHUNK):
            written += await self._write(batch[first:first + HEARTBEAT_CHUNK], now)
        if not written:
            return
        oldest = min(b.ts for b in written) if written else now
        self.last_lag_ms = max(0.0, (time.time() - oldest) * 1000) if oldest else 0.0
        for callback in self.on_flush:
            try:
                callback(written, now)
            except Exception:  # analysis must never stop the write-behind
                self.ctx.stats["heartbeat_flush_callback_errors"] += 1
                log.exception("heartbeat flush callback failed")

    async def _write(self, chunk: list[m.Heartbeat], now: float) -> list[m.Heartbeat]:
        """Write one chunk; returns the beats written (none when it is kept for the next
        period)."""
        try:
            await self.ctx.db.tx(lambda store: store.write_heartbeats(chunk, now),
                                 background=True)
        except sqlite3.OperationalError as exc:
            if not transient_store_error(exc):
                return await self._write_one_by_one(chunk, now)
            self._keep_for_next_period(chunk, exc)
            return []
        except (sqlite3.Error, StoreError) as exc:
            self._keep_for_next_period(chunk, exc)
            return []
        except Exception:
            return await self._write_one_by_one(chunk, now)
        self.written += len(chunk)
        self.ctx.stats["heartbeats_written"] += len(chunk)
        return chunk
