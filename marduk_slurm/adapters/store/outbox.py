"""Store methods for the outbox of Slurm actions and for live config revisions."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

import sqlite_utils


class OutboxMixin:
    conn: sqlite3.Connection
    db: sqlite_utils.Database

    def enqueue_slurm_action(self, kind: str, node: str, reason: str, event_id: int | None,
                             now: float, batch_reason: str = "") -> int:
        """Queue a drain or resume; a pending action of the same kind on the node is reused,
        so repeated faults on one node stay one drain. `batch_reason` is the shorter reason
        used when many actions with the same cause go to Slurm in one call."""
        row = self.conn.execute(
            "SELECT id FROM outbox WHERE kind=? AND node=? AND state='pending'", (kind, node)
        ).fetchone()
        if row:
            return int(row[0])
        cur = self.conn.execute(
            "INSERT INTO outbox (kind, node, reason, event_id, next_attempt_at, created_at, "
            "batch_reason) VALUES (?,?,?,?,?,?,?)",
            (kind, node, reason, event_id, now, now, batch_reason or reason),
        )
        return int(cur.lastrowid or 0)

    def due_actions(self, now: float, limit: int = 5000) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT * FROM outbox WHERE state='pending' AND next_attempt_at <= ? "
            "ORDER BY id LIMIT ?", [now, limit],
        ))

    def latest_actions(self, kind: str) -> list[dict[str, Any]]:
        """The newest action of `kind` per node."""
        return list(self.db.query(
            "SELECT * FROM outbox WHERE id IN (SELECT MAX(id) FROM outbox WHERE kind=? "
            "GROUP BY node)", [kind],
        ))

    def pending_actions(self) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM outbox WHERE state='pending' ORDER BY id"))

    def pending_action_nodes(self, kind: str) -> set[str]:
        """Nodes with a `kind` action not yet confirmed by Slurm."""
        return {str(r[0]) for r in self.conn.execute(
            "SELECT DISTINCT node FROM outbox WHERE kind=? AND state='pending'", (kind,))}

    def pending_action(self, kind: str, node: str) -> dict[str, Any] | None:
        """The one pending action of `kind` on `node` (enqueue_slurm_action keeps at most
        one), or None."""
        rows = list(self.db.query(
            "SELECT * FROM outbox WHERE kind=? AND node=? AND state='pending'", [kind, node]))
        return rows[0] if rows else None

    def next_action_due(self) -> float | None:
        row = self.conn.execute(
            "SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def complete_action(self, action_id: int, now: float) -> None:
        self.conn.execute(
            "UPDATE outbox SET state='done', done_at=?, attempts=attempts+1 WHERE id=?",
            (now, action_id),
        )

    def retry_action(self, action_id: int, error: str, next_at: float) -> None:
        self.conn.execute(
            "UPDATE outbox SET attempts=attempts+1, last_error=?, next_attempt_at=? WHERE id=?",
            (error[:500], next_at, action_id),
        )

    def fail_action(self, action_id: int, error: str, now: float) -> None:
        self.conn.execute(
            "UPDATE outbox SET state='failed', attempts=attempts+1, last_error=?, done_at=? "
            "WHERE id=?",
            (error[:500], now, action_id),
        )

    def cancel_pending(self, kind: str, node: str, now: float) -> int:
        cur = self.conn.execute(
            "UPDATE outbox SET state='failed', last_error='superseded', done_at=? "
            "WHERE kind=? AND node=? AND state='pending'",
            (now, kind, node),
        )
        return cur.rowcount

    # -- live config revisions -------------------------------------------------------------

    def add_config_revision(self, job_id: int, changes: dict[str, Any], apply_at_step: int,
                            actor: str, now: float) -> int:
        self.conn.execute(
            "INSERT INTO jobs (job_id, first_seen, last_seen) VALUES (?,?,?) "
            "ON CONFLICT(job_id) DO NOTHING", (job_id, now, now),
        )
        row = self.conn.execute(
            "SELECT COALESCE(MAX(revision), 0) FROM config_revisions WHERE job_id=?", (job_id,)
        ).fetchone()
        revision = int(row[0]) + 1
        self.conn.execute(
            "INSERT INTO config_revisions VALUES (?,?,?,?,?,?)",
            (job_id, revision, now, actor, apply_at_step,
             json.dumps(changes, sort_keys=True)),
        )
        self.conn.execute(
            "UPDATE jobs SET config_revision=? WHERE job_id=?", (revision, job_id)
        )
        return revision

    def record_config_revision(self, job_id: int, revision: int, changes: dict[str, Any],
                               apply_at_step: int, actor: str, now: float) -> bool:
        """Keep a revision another controller numbered; False when it is here already."""
        self.conn.execute(
            "INSERT INTO jobs (job_id, first_seen, last_seen) VALUES (?,?,?) "
            "ON CONFLICT(job_id) DO NOTHING", (job_id, now, now),
        )
        cur = self.conn.execute(
            "INSERT INTO config_revisions VALUES (?,?,?,?,?,?) "
            "ON CONFLICT(job_id, revision) DO NOTHING",
            (job_id, revision, now, actor, apply_at_step, json.dumps(changes, sort_keys=True)),
        )
        self.conn.execute(
            "UPDATE jobs SET config_revision=MAX(COALESCE(config_revision, 0), ?) "
            "WHERE job_id=?", (revision, job_id))
        return cur.rowcount > 0

    def config_revisions(self, job_id: int) -> list[dict[str, Any]]:
        rows = list(self.db.query(
            "SELECT * FROM config_revisions WHERE job_id=? ORDER BY revision", [job_id]
        ))
        for row in rows:
            row["changes"] = json.loads(row["changes"])
        return rows

    def record_config_ack(self, job_id: int, revision: int, replica_id: str, step: int,
                          ok: bool, error: str, now: float) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO config_acks VALUES (?,?,?,?,?,?,?)",
            (job_id, revision, replica_id, step, int(ok), error, now),
        )
        if ok:
            self.conn.execute(
                "UPDATE replicas SET config_revision=MAX(config_revision, ?) WHERE replica_id=?",
                (revision, replica_id),
            )

    def config_acks(self, job_id: int) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT * FROM config_acks WHERE job_id=? ORDER BY revision, replica_id", [job_id]
        ))
