"""Store methods of the trust boundary: isolating one message inside a batch, the dead-letter
table, rejection counters, identity look-ups, and the durable leave commands."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlite_utils

DEAD_LETTER_KEEP_BYTES = 64 * 1024


class TrustMixin:
    conn: sqlite3.Connection
    db: sqlite_utils.Database

    @contextmanager
    def savepoint(self, name: str = "msg") -> Iterator[None]:
        """Inside a transaction: undo only this block's writes if it raises, so one bad
        message cannot take its batch down with it."""
        self.conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self.conn.execute(f"ROLLBACK TO {name}")
            self.conn.execute(f"RELEASE {name}")
            raise
        self.conn.execute(f"RELEASE {name}")

    # -- rejections and dead letters -------------------------------------------------------

    def count_rejection(self, cause: str, subject: str, kind: str, detail: str,
                        now: float) -> None:
        self.conn.execute(
            "INSERT INTO rejection_counts VALUES (?,?,?,1,?,?) ON CONFLICT(subject, kind, cause) "
            "DO UPDATE SET count=count+1, last_at=excluded.last_at, "
            "last_detail=excluded.last_detail",
            (subject[:200], kind[:64], cause[:64], now, detail[:300]),
        )

    def add_dead_letter(self, subject: str, seq: int, deliveries: int, error: str,
                        data: bytes, now: float) -> int:
        cur = self.conn.execute(
            "INSERT INTO dead_letters (ts, subject, stream_seq, deliveries, error, size, data) "
            "VALUES (?,?,?,?,?,?,?)",
            (now, subject[:200], seq, deliveries, error[:1000], len(data),
             data[:DEAD_LETTER_KEEP_BYTES]),
        )
        return int(cur.lastrowid or 0)

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = list(self.db["dead_letters"].rows_where(order_by="id desc", limit=limit))
        for row in rows:
            data = row.pop("data") or b""
            row["data_preview"] = data[:200].decode("utf-8", errors="replace")
        return rows

    # -- identities ------------------------------------------------------------------------

    def replica_job(self, replica_id: str) -> int | None:
        """The job a replica id belongs to: the one that first registered it."""
        row = self.conn.execute("SELECT job_id FROM replicas WHERE replica_id=?",
                                (replica_id,)).fetchone()
        return None if row is None else int(row[0])

    def gpu_owners(self, uuids: list[str]) -> dict[str, str]:
        """The node each known GPU UUID is bound to."""
        if not uuids:
            return {}
        marks = ",".join("?" * len(uuids))
        rows = self.conn.execute(f"SELECT uuid, node FROM gpus WHERE uuid IN ({marks})", uuids)
        return {u: n for u, n in rows}

    def release_gpu(self, uuid: str) -> None:
        """Forget the GPU's node binding (and its health): the next report binds it anew."""
        self.conn.execute("DELETE FROM gpus WHERE uuid=?", (uuid,))

    def inject_applied(self, request_id: str) -> bool:
        """Whether a verdict of this drill request was already acted on."""
        row = self.conn.execute(
            "SELECT 1 FROM events WHERE kind='gpu_verdict' AND "
            "json_extract(evidence, '$.inject_request_id')=? LIMIT 1", (request_id,)).fetchone()
        return row is not None

    def job_nodes(self, job_id: int) -> set[str] | None:
        """Nodes where the job has a running step, or None when no step of it is known (no
        SPANK relay): then nothing can be checked."""
        rows = self.conn.execute(
            "SELECT DISTINCT node, ended_at IS NULL FROM job_steps WHERE job_id=?", (job_id,)
        ).fetchall()
        if not rows:
            return None
        return {node for node, running in rows if running}

    # -- durable leave commands ------------------------------------------------------------

    def put_leave_command(self, replica_id: str, job_id: int, replica_group: int, reason: str,
                          immediate: bool, event_id: int, now: float) -> None:
        """Store the intent to make a replica leave; the sender re-sends it until the replica
        confirms or is gone. A second decision for the same replica refreshes the intent."""
        self.conn.execute(
            "INSERT INTO leave_commands (replica_id, job_id, replica_group, reason, immediate, "
            "event_id, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?) "
            "ON CONFLICT(replica_id) DO UPDATE SET reason=excluded.reason, "
            "immediate=MAX(immediate, excluded.immediate), event_id=excluded.event_id, "
            "state='pending', attempts=0, next_attempt_at=excluded.next_attempt_at, "
            "done_at=NULL, done_reason=''",
            (replica_id, job_id, replica_group, reason[:500], int(immediate), event_id, now, now),
        )

    def pending_leave(self, replica_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query(
            "SELECT * FROM leave_commands WHERE replica_id=? AND state='pending'", [replica_id]))
        return rows[0] if rows else None

    def due_leave_commands(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT * FROM leave_commands WHERE state='pending' AND next_attempt_at<=? "
            "ORDER BY next_attempt_at LIMIT ?", [now, limit]))

    def next_leave_due(self) -> float | None:
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM leave_commands WHERE state='pending'").fetchone()
        return None if row[0] is None else float(row[0])

    def leave_sent(self, replica_id: str, attempts: int, next_attempt_at: float) -> None:
        self.conn.execute(
            "UPDATE leave_commands SET attempts=?, next_attempt_at=? WHERE replica_id=? "
            "AND state='pending'", (attempts, next_attempt_at, replica_id))

    def finish_leave_command(self, replica_id: str, why: str, now: float) -> bool:
        cur = self.conn.execute(
            "UPDATE leave_commands SET state='done', done_at=?, done_reason=? WHERE "
            "replica_id=? AND state='pending'", (now, why[:200], replica_id))
        return cur.rowcount > 0

    def finish_leaves_of_gone_replicas(self, now: float) -> int:
        """Replicas that left or whose step ended need no more reminders."""
        cur = self.conn.execute(
            "UPDATE leave_commands SET state='done', done_at=?, done_reason='replica gone' "
            "WHERE state='pending' AND (replica_id IN (SELECT replica_id FROM replicas WHERE "
            "state='left') OR replica_id NOT IN (SELECT replica_id FROM replicas))", (now,))
        return cur.rowcount
