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
from typing import Any

import nats.errors
from nats.aio.msg import Msg

from marduk_slurm.adapters.store import Store
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.handlers import Effects, apply_message
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import ProtocolError, StoreError

log = logging.getLogger(__name__)

DURABLE_NAME = "marduk-controller"
# How long JetStream waits for an ack before it redelivers: after a crash, the batch the dead
# controller had fetched comes back this much later. Redeliveries are skipped by sequence, so
# a short wait costs nothing but a re-read.
ACK_WAIT_S = 10.0


class EventIngest:
    def __init__(self, ctx: Context, *, batch: int = 256) -> None:
        self.ctx = ctx
        self.batch = batch
        self._store_failures = 0

    async def run(self) -> None:
        psub = await self.ctx.bus.durable_consumer(DURABLE_NAME, ack_wait_s=ACK_WAIT_S)
        while True:
            try:
                msgs = await psub.fetch(self.batch, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.ConnectionClosedError:
                raise
            except (nats.errors.Error, OSError) as exc:
                log.warning("fetch from %s failed: %s", subjects.EVENTS_STREAM, exc)
                await asyncio.sleep(0.5)
                continue
            await self.process(msgs)

    async def process(self, msgs: list[Msg]) -> None:
        items = [(_seq(msg), msg.subject, bytes(msg.data)) for msg in msgs]
        try:
            effects, rejected = await self.ctx.db.tx(lambda store: self._apply(store, items))
        except (sqlite3.Error, StoreError) as exc:
            await self._hold_back(msgs, exc)
            return
        self._store_failures = 0
        for reason, subject, detail in rejected:
            self.ctx.reject(reason, subject, detail)
        for msg in msgs:  # only now, after the commit
            try:
                await msg.ack()
            except (nats.errors.Error, OSError) as exc:
                log.warning("ack failed (message will be redelivered and skipped): %s", exc)
        self.ctx.stats["events_ingested"] += len(msgs) - len(rejected)
        await self.ctx.carry_out(effects)

    async def _hold_back(self, msgs: list[Msg], exc: Exception) -> None:
        """The database refused the batch (locked, disk full): leave it in JetStream, ask for
        redelivery soon, and wait before fetching again. The daemon stays up; it catches up
        by itself once the database takes writes again."""
        self._store_failures += 1
        self.ctx.stats["ingest_store_failures"] += 1
        delay = min(0.5 * 2 ** min(self._store_failures, 5), 10.0)
        log.error("database write failed (%s): %d event(s) left in JetStream, retrying in "
                  "%.1f s", exc, len(msgs), delay)
        for msg in msgs:
            # If even the nak fails, the message is still unacked: redelivered after ACK_WAIT_S.
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.nak(delay=delay)
        await asyncio.sleep(delay)

    def _apply(self, store: Store, items: list[tuple[int, str, bytes]]
               ) -> tuple[Effects, list[tuple[str, str, str]]]:
        effects = Effects()
        rejected: list[tuple[str, str, str]] = []
        now = time.time()
        for seq, subject, data in items:
            if seq and store.already_ingested(seq):
                self.ctx.stats["events_redelivered"] += 1
                continue
            try:
                msg = m.decode_durable(data)
                check_subject(subject, msg)
            except ProtocolError as exc:
                store.count_rejection(exc.reason, subject, exc.detail, now)
                rejected.append((exc.reason, subject, exc.detail))
            else:
                effects.extend(apply_message(store, msg, now, self.ctx.policy))
            if seq:
                store.mark_ingested(seq, now)
        return effects, rejected


def _seq(msg: Msg) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except (AttributeError, ValueError, TypeError, nats.errors.Error):
        return 0


# Who may send each durable message: an agent (node subjects) or a replica (job subjects).
_SCOPE: dict[type, str] = {
    m.StepStart: "node", m.StepEnd: "node", m.Verdict: "node", m.GpuInventory: "node",
    m.ReplicaRegister: "job", m.ReplicaLeave: "job", m.ConfigAck: "job",
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
    raise ProtocolError("subject_mismatch", f"{subject} does not match the message's {scope}")


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

    async def on_message(self, msg: Msg) -> None:
        # The hot path: decode, check the subject, keep the newest beat per replica.
        try:
            hb = m.decode_heartbeat(msg.data)
        except ProtocolError as exc:
            self.ctx.reject(exc.reason, msg.subject, exc.detail)
            return
        subject = self._subjects.get(hb.job_id)
        if subject is None:
            subject = self._subjects[hb.job_id] = subjects.heartbeat(hb.job_id)
        if msg.subject != subject:
            self.ctx.reject("subject_mismatch", msg.subject, "heartbeat of another job")
            return
        self.received += 1
        # Newer beats of one replica replace older ones: the row keeps the latest state.
        self.pending[hb.replica_id] = hb

    async def run(self) -> None:
        await self.ctx.bus.subscribe(subjects.HEARTBEATS_ALL, self.on_message)
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    async def flush(self) -> None:
        self.ctx.stats["heartbeats_received"] += self.received - self._received_reported
        self._received_reported = self.received
        if not self.pending:
            return
        batch, self.pending = list(self.pending.values()), {}
        now = time.time()

        def write(store: Store) -> int:
            return store.write_heartbeats(batch, now)

        try:
            await self.ctx.db.tx(write)
        except (sqlite3.Error, StoreError) as exc:
            # Keep the batch for the next period unless a newer beat replaced it meanwhile.
            for hb in batch:
                self.pending.setdefault(hb.replica_id, hb)
            self.ctx.stats["heartbeat_flush_failures"] += 1
            log.warning("heartbeat write-behind failed, retrying next period: %s", exc)
            return
        self.written += len(batch)
        self.ctx.stats["heartbeats_written"] += len(batch)
        oldest = min(b.ts for b in batch) if batch else now
        self.last_lag_ms = max(0.0, (time.time() - oldest) * 1000) if oldest else 0.0
        for callback in self.on_flush:
            try:
                callback(batch, now)
            except Exception:  # analysis must never stop the write-behind
                self.ctx.stats["heartbeat_flush_callback_errors"] += 1
                log.exception("heartbeat flush callback failed")
