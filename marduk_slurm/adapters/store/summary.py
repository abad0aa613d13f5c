"""Store methods that sum the database up: the counts of `marduk status` and the aggregates
behind `/metrics`. Both run on the read lane, never on the writer."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Any

DASHBOARD_ROWS = (
    "SELECT replica_id, job_id, replica_group, group_rank, node, state, last_step, "
    "ROUND(step_time_ms, 1), ROUND(last_seen, 1), config_revision FROM replicas "
    "WHERE state != 'left'")
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
        return [tuple(r) for r in self.conn.execute(
            "SELECT kind, COALESCE(xid, ''), COALESCE(action, ''), COUNT(*), MAX(id) "
            "FROM events WHERE id > ? GROUP BY 1, 2, 3", (after_id,))]

    def replica_counts(self) -> dict[tuple[str, str], int]:
        """Live replicas per (job, state)."""
        return {(str(job), state): n for job, state, n in self.conn.execute(
            "SELECT job_id, state, COUNT(*) FROM replicas WHERE state != 'left' GROUP BY 1, 2")}

    def live_replica_ids(self, among: Iterable[str]) -> set[str]:
        """Those of these replicas and standbys still in the mapping (not left): the cost is
        the size of `among`, not of the mapping."""
        ids = list(among)
        if not ids:
            return set()
        return {r[0] for r in self.conn.execute(
            "SELECT replica_id FROM replicas WHERE state != 'left' AND replica_id IN "
            "(SELECT value FROM json_each(?))", (json.dumps(ids),))}

    def pending_action_counts(self) -> dict[str, int]:
        return dict(self.conn.execute(
            "SELECT kind, COUNT(*) FROM outbox WHERE state='pending' GROUP BY 1").fetchall())

    def drained_node_count(self) -> int:
        return self._one(f"SELECT COUNT(*) FROM nodes WHERE {DRAINED}")

    # -- the dashboard's replica table (controller.live_table) ------------------------------
    # Narrow rows as tuples, not Store.replicas()' joined dicts: at 100,000 replicas that is
    # the difference between 0.3 s and 1.8 s a read.

    def dashboard_rows(self, *, seen_since: float | None = None, after: str | None = None,
                       limit: int | None = None) -> sqlite3.Cursor:
        """Live replicas as (replica_id, job_id, replica_group, group_rank, node, state,
        last_step, step_time_ms, last_seen, config_revision): all of them, those seen since
        a time, or a slice in replica-id order."""
        sql = DASHBOARD_ROWS
        params: list[Any] = []
        if seen_since is not None:
            sql += " AND last_seen >= ?"
            params.append(seen_since)
        if after is not None:
            sql += " AND replica_id > ? ORDER BY replica_id LIMIT ?"
            params += [after, -1 if limit is None else limit]
        return self.conn.execute(sql, params)

    def replicas_left_since(self, ts: float) -> list[str]:
        return [r[0] for r in self.conn.execute(
            "SELECT replica_id FROM replicas WHERE state = 'left' AND left_at >= ?", (ts,))]
