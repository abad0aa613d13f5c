"""Store methods that sum the database up: the counts of `marduk status` and the aggregates
behind `/metrics`. Both run on the read lane, never on the writer."""

from __future__ import annotations

import sqlite3
from typing import Any

# Nodes drained by anyone: the flags column holds Slurm's flags as a JSON list.
DRAINED = "flags LIKE '%DRAIN%'"


class SummaryMixin:
    conn: sqlite3.Connection

    def _one(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        row = self.conn.execute(sql, params).fetchone()
        return int(row[0] or 0) if row else 0

    def status_counts(self) -> dict[str, int]:
        """The numbers of `marduk status`."""
        one = self._one
        return {
            "nodes": one("SELECT COUNT(*) FROM nodes"),
            "nodes_drained": one(f"SELECT COUNT(*) FROM nodes WHERE {DRAINED}"),
            "nodes_drained_by_marduk": one("SELECT COUNT(*) FROM nodes WHERE "
                                           "drained_by_marduk=1"),
            "gpus": one("SELECT COUNT(*) FROM gpus"),
            "jobs_active": one("SELECT COUNT(DISTINCT job_id) FROM replicas WHERE "
                               "state!='left'"),
            "replicas_active": one("SELECT COUNT(*) FROM replicas WHERE state!='left'"),
            # Events are never deleted: the last id is their number, without a full scan.
            "events": one("SELECT COALESCE(MAX(id), 0) FROM events"),
            "outbox_pending": one("SELECT COUNT(*) FROM outbox WHERE state='pending'"),
            "rejected_total": one("SELECT COALESCE(SUM(count), 0) FROM rejection_counts"),
            "dead_letters": one("SELECT COUNT(*) FROM dead_letters"),
        }

    def event_counts_since(self, after_id: int) -> list[tuple[str, str, str, int, int]]:
        """(kind, xid, action, count, max id) of the events after `after_id`."""
        return [tuple(r) for r in self.conn.execute(  # type: ignore[misc]
            "SELECT kind, COALESCE(xid, ''), COALESCE(action, ''), COUNT(*), MAX(id) "
            "FROM events WHERE id > ? GROUP BY 1, 2, 3", (after_id,))]

    def replica_counts(self) -> dict[tuple[str, str], int]:
        """Live replicas per (job, state)."""
        return {(str(job), state): n for job, state, n in self.conn.execute(
            "SELECT job_id, state, COUNT(*) FROM replicas WHERE state != 'left' GROUP BY 1, 2")}

    def pending_actions(self) -> dict[str, int]:
        return dict(self.conn.execute(
            "SELECT kind, COUNT(*) FROM outbox WHERE state='pending' GROUP BY 1").fetchall())

    def drained_node_count(self) -> int:
        return self._one(f"SELECT COUNT(*) FROM nodes WHERE {DRAINED}")
