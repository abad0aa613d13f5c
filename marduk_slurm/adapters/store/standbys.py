"""Store methods for hot spares: standby rows and their durable assume commands.

A standby registers like a replica (`role='standby'`, state `standby`); a decision that names
it moves it to `assuming` and stores an assume command, re-sent until the standby
acknowledges it (then its row is `left`: it lives on as the group's new replica) or is gone.
A standby of several ranks has one row per rank (`<id>/<rank>`) and one command for all.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

import sqlite_utils

# Rows of one standby: its id, or its id plus "/<rank>" in a group of several ranks.
_OF_STANDBY = "(replica_id=? OR replica_id LIKE ? ESCAPE '\\')"


def _like_ranks(standby_id: str) -> str:
    escaped = standby_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "/%"


def standby_unit(replica_id: str) -> str:
    """The id a standby's assume command is stored and sent under (no /rank)."""
    return replica_id.split("/", 1)[0]


class StandbysMixin:
    conn: sqlite3.Connection
    db: sqlite_utils.Database

    def ready_standbys(self, job_ids: Iterable[int]) -> list[dict[str, Any]]:
        """Ready standbys of these jobs, one dict per standby: `standby_id`, `job_id`, `nodes`
        (in rank order) and `drained` (one of its nodes is drained)."""
        jobs = sorted(set(job_ids))
        if not jobs:
            return []
        rows = self.conn.execute(
            "SELECT r.replica_id, r.job_id, r.node, COALESCE(n.flags, '[]') LIKE '%DRAIN%' "
            "FROM replicas r LEFT JOIN nodes n ON n.name = r.node WHERE r.role='standby' AND "
            f"r.state='standby' AND r.job_id IN ({','.join('?' * len(jobs))}) "
            "ORDER BY r.job_id, r.replica_group, r.registered_at, r.group_rank",
            jobs).fetchall()
        out: dict[str, dict[str, Any]] = {}
        for replica_id, job_id, node, drained in rows:
            unit = out.setdefault(standby_unit(replica_id), {
                "standby_id": standby_unit(replica_id), "job_id": job_id, "nodes": [],
                "drained": False})
            unit["nodes"].append(node)
            unit["drained"] = unit["drained"] or bool(drained)
        return list(out.values())

    def ready_standbys_on(self, nodes: Iterable[str]) -> list[dict[str, Any]]:
        """Ready standbys, of any job, with a rank on one of these nodes."""
        names = sorted(set(nodes))
        if not names:
            return []
        jobs = [j for (j,) in self.conn.execute(
            "SELECT DISTINCT job_id FROM replicas WHERE role='standby' AND state='standby' AND "
            f"node IN ({','.join('?' * len(names))})", names)]
        return [u for u in self.ready_standbys(jobs) if set(u["nodes"]) & set(names)]

    def assuming_groups(self, job_ids: Iterable[int]) -> set[tuple[int, int]]:
        jobs = sorted(set(job_ids))
        if not jobs:
            return set()
        rows = self.conn.execute(
            "SELECT job_id, replica_group FROM assume_commands WHERE state='pending' AND "
            f"action='assume' AND job_id IN ({','.join('?' * len(jobs))})", jobs).fetchall()
        return {(int(j), int(g)) for j, g in rows}

    def mark_standby_assuming(self, standby_id: str, *, leaving: bool = False) -> None:
        """The standby was given a command: it is `assuming` a group, or `leaving`."""
        self.conn.execute(
            f"UPDATE replicas SET state=? WHERE role='standby' AND {_OF_STANDBY} "
            "AND state='standby'",
            ("leaving" if leaving else "assuming", standby_id, _like_ranks(standby_id)))

    def standby_assumed(self, standby_id: str, replica_group: int, now: float) -> bool:
        """The standby took its command: its rows leave (the new replica registers itself)."""
        cur = self.conn.execute(
            f"UPDATE replicas SET state='left', left_at=?, leave_reason=? WHERE role='standby' "
            f"AND {_OF_STANDBY} AND state!='left'",
            (now, f"assumed replica group {replica_group}", standby_id,
             _like_ranks(standby_id)))
        self.conn.execute(
            f"DELETE FROM mapping WHERE {_OF_STANDBY}", (standby_id, _like_ranks(standby_id)))
        return cur.rowcount > 0

    def put_assume_command(self, standby_id: str, job_id: int, replica_group: int, reason: str,
                           event_id: int, next_attempt_at: float, now: float,
                           action: str = "assume") -> None:
        """Store a command to a standby: `assume` a replica group, or `leave` (stand down,
        its node is drained; replica_group is then unused)."""
        self.conn.execute(
            "INSERT INTO assume_commands (standby_id, job_id, replica_group, reason, event_id, "
            "next_attempt_at, created_at, action) VALUES (?,?,?,?,?,?,?,?) "
            "ON CONFLICT(standby_id) DO "
            "UPDATE SET replica_group=excluded.replica_group, reason=excluded.reason, "
            "event_id=excluded.event_id, state='pending', attempts=0, "
            "next_attempt_at=excluded.next_attempt_at, done_at=NULL, done_reason='', "
            "action=excluded.action",
            (standby_id, job_id, replica_group, reason[:500], event_id, next_attempt_at, now,
             action))

    def assume_command(self, standby_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM assume_commands WHERE standby_id=?",
                                  [standby_id]))
        return rows[0] if rows else None

    def due_assume_commands(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        return list(self.db.query(
            "SELECT * FROM assume_commands WHERE state='pending' AND next_attempt_at<=? "
            "ORDER BY next_attempt_at LIMIT ?", [now, limit]))

    def assume_sent(self, standby_id: str, attempts: int, next_attempt_at: float) -> None:
        self.conn.execute(
            "UPDATE assume_commands SET attempts=?, next_attempt_at=? WHERE standby_id=? AND "
            "state='pending'", (attempts, next_attempt_at, standby_id))

    def finish_assume_command(self, standby_id: str, why: str, now: float) -> bool:
        cur = self.conn.execute(
            "UPDATE assume_commands SET state='done', done_at=?, done_reason=? WHERE "
            "standby_id=? AND state='pending'", (now, why[:200], standby_id))
        return cur.rowcount > 0

    def finish_assumes_of_gone_standbys(self, now: float) -> list[dict[str, Any]]:
        """Pending assume commands whose standby has no live row left (its step ended before
        it answered): done, and returned so the caller can record that the group got none."""
        rows = list(self.db.query(
            "SELECT * FROM assume_commands a WHERE state='pending' AND NOT EXISTS (SELECT 1 "
            "FROM replicas r WHERE r.role='standby' AND r.state!='left' AND (r.replica_id="
            "a.standby_id OR r.replica_id LIKE replace(replace(replace(a.standby_id, '\\', "
            "'\\\\'), '%', '\\%'), '_', '\\_') || '/%' ESCAPE '\\'))"))
        for row in rows:
            self.finish_assume_command(row["standby_id"], "standby gone", now)
        return rows
