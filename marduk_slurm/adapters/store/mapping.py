"""Store methods for the DR mapping: job steps, replicas, GPU mapping, hyperparameters."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any

import sqlite_utils

from marduk_slurm.domain import messages as m

# What a replica without CUDA reports as its device (runtime: `cpu:<node>:<rank>`).
CPU_PREFIX = "cpu:"

# A heartbeat only ever updates a replica of its own job (the subject binds the job, the
# replica id is bound to the job that registered it).
# A replica's revision only moves forward: a heartbeat written behind, sent before the ack
# of a newer revision was committed, must not take the row back.
HEARTBEAT_SQL = (
    "UPDATE replicas SET last_step=?, step_time_ms=?, allreduce_ms=?, participants=?, "
    "quorum_id=?, loss=?, config_revision=MAX(config_revision, ?), last_seen=? "
    "WHERE replica_id=? AND job_id=? AND state!='left'"
)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


class MappingMixin:
    conn: sqlite3.Connection
    db: sqlite_utils.Database

    def _touch_job(self, job_id: int, now: float) -> None:
        self.conn.execute(
            "INSERT INTO jobs (job_id, first_seen, last_seen) VALUES (?,?,?) "
            "ON CONFLICT(job_id) DO UPDATE SET last_seen=excluded.last_seen",
            (job_id, now, now),
        )

    def record_step_start(self, msg: m.StepStart, now: float) -> None:
        self._touch_job(msg.job_id, now)
        self.conn.execute(
            "INSERT INTO job_steps (job_id, step_id, node, gpu_indices, gpu_uuids, pid, uid, "
            "started_at) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(job_id, step_id, node) DO UPDATE "
            "SET gpu_indices=excluded.gpu_indices, gpu_uuids=excluded.gpu_uuids, "
            "pid=excluded.pid, uid=excluded.uid, ended_at=NULL, exit_status=NULL",
            (msg.job_id, msg.step_id, msg.node, _dumps(msg.gpu_indices), _dumps(msg.gpu_uuids),
             msg.pid, msg.uid, now),
        )

    def step(self, job_id: int, step_id: int, node: str) -> dict[str, Any] | None:
        rows = list(self.db.query(
            "SELECT * FROM job_steps WHERE job_id=? AND step_id=? AND node=?",
            [job_id, step_id, node],
        ))
        return rows[0] if rows else None

    def end_step(self, job_id: int, step_id: int, node: str, exit_status: int | None,
                 now: float) -> list[str]:
        """Mark the step ended; its replicas on that node leave the mapping. Returns them."""
        self.conn.execute(
            "UPDATE job_steps SET ended_at=?, exit_status=? WHERE job_id=? AND step_id=? "
            "AND node=?",
            (now, exit_status, job_id, step_id, node),
        )
        rows = self.conn.execute(
            "SELECT replica_id FROM replicas WHERE job_id=? AND step_id=? AND node=? "
            "AND state!='left'",
            (job_id, step_id, node),
        ).fetchall()
        gone = [r[0] for r in rows]
        for replica_id in gone:
            self.leave_replica(replica_id, f"step {job_id}.{step_id} ended", now)
        return gone

    def running_steps(self, node: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM job_steps WHERE ended_at IS NULL"
        params: list[Any] = []
        if node:
            sql += " AND node=?"
            params.append(node)
        return list(self.db.query(sql + " ORDER BY job_id, step_id, node", params))

    def register_replica(self, msg: m.ReplicaRegister, now: float) -> None:
        """Insert or refresh a replica, its GPU mapping rows and its hyperparameters."""
        self._touch_job(msg.job_id, now)
        role, state = ("standby", "standby") if msg.standby else ("replica", "active")
        self.conn.execute(
            "INSERT INTO replicas (replica_id, job_id, step_id, replica_group, group_rank, "
            "group_world_size, node, pid, state, registered_at, last_step, config_revision, "
            "last_seen, role) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT(replica_id) DO "
            "UPDATE SET step_id=excluded.step_id, node=excluded.node, pid=excluded.pid, "
            # A replica told to leave stays leaving when it reconnects: the leave is re-sent;
            # a standby named by a decision stays assuming: the assume is re-sent.
            "state=CASE WHEN replicas.state IN ('leaving', 'assuming') THEN replicas.state "
            "ELSE excluded.state END, "
            "left_at=NULL, leave_reason='', last_seen=excluded.last_seen",
            (msg.replica_id, msg.job_id, msg.step_id, msg.replica_group, msg.group_rank,
             msg.group_world_size, msg.node, msg.pid, state, now, msg.step,
             msg.config_revision, now, role),
        )
        self.conn.execute("DELETE FROM mapping WHERE replica_id=?", (msg.replica_id,))
        gpus = [g for g in msg.gpu_uuids if not g.startswith(CPU_PREFIX)]
        if not gpus and msg.step_id is not None:
            gpus = self._step_gpus(msg.job_id, msg.step_id, msg.node)
        self._map(msg.replica_id, msg.job_id, msg.step_id, msg.node, gpus or msg.gpu_uuids, now)
        self.set_hyperparams(msg.replica_id, msg.hyperparams, msg.config_revision, now)

    def _map(self, replica_id: str, job_id: int, step_id: int | None, node: str,
             gpus: Sequence[str], now: float) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO mapping VALUES (?,?,?,?,?,?)",
            [(replica_id, g, job_id, step_id, node, now) for g in gpus],
        )

    def _step_gpus(self, job_id: int, step_id: int, node: str) -> list[str]:
        row = self.conn.execute(
            "SELECT gpu_uuids FROM job_steps WHERE job_id=? AND step_id=? AND node=?",
            (job_id, step_id, node),
        ).fetchone()
        return list(json.loads(row[0])) if row else []

    def map_step_gpus_to_replicas(self, job_id: int, step_id: int, node: str,
                                  gpus: Sequence[str], now: float) -> list[str]:
        """Join a step's GPUs (from SPANK and the agent) to replicas of that step that could
        not name their own (a process without CUDA reports a `cpu:` id): the DR mapping is
        complete whichever of the two reports arrives first. Returns the replicas mapped."""
        if not gpus:
            return []
        rows = self.conn.execute(
            "SELECT replica_id FROM replicas WHERE job_id=? AND step_id=? AND node=? AND "
            "state!='left' AND NOT EXISTS (SELECT 1 FROM mapping m WHERE m.replica_id="
            "replicas.replica_id AND m.gpu_uuid NOT LIKE ?)",
            (job_id, step_id, node, CPU_PREFIX + "%"),
        ).fetchall()
        for (replica_id,) in rows:
            self.conn.execute("DELETE FROM mapping WHERE replica_id=?", (replica_id,))
            self._map(replica_id, job_id, step_id, node, gpus, now)
        return [r[0] for r in rows]

    def set_hyperparams(self, replica_id: str, values: dict[str, Any], revision: int,
                        now: float) -> None:
        self.conn.executemany(
            "INSERT INTO hyperparams VALUES (?,?,?,?,?) ON CONFLICT(replica_id, key) DO UPDATE "
            "SET value=excluded.value, revision=excluded.revision, updated_at=excluded.updated_at",
            [(replica_id, k, _dumps(v), revision, now) for k, v in values.items()],
        )

    def hyperparams(self, replica_id: str) -> dict[str, Any]:
        rows = self.conn.execute(
            "SELECT key, value FROM hyperparams WHERE replica_id=?", (replica_id,)
        ).fetchall()
        return {k: json.loads(v) for k, v in rows}

    def leave_replica(self, replica_id: str, reason: str, now: float) -> bool:
        """The replica left: its mapping rows go, its replica row stays as history."""
        cur = self.conn.execute(
            "UPDATE replicas SET state='left', left_at=?, leave_reason=? WHERE replica_id=? "
            "AND state!='left'",
            (now, reason[:500], replica_id),
        )
        self.conn.execute("DELETE FROM mapping WHERE replica_id=?", (replica_id,))
        return cur.rowcount > 0

    def mark_replica_leaving(self, replica_id: str) -> None:
        self.conn.execute(
            "UPDATE replicas SET state='leaving' WHERE replica_id=? AND state='active'",
            (replica_id,),
        )

    def replica(self, replica_id: str) -> dict[str, Any] | None:
        rows = self.replicas(replica_id=replica_id, include_left=True)
        return rows[0] if rows else None

    def replicas(self, *, job_id: int | None = None, node: str | None = None,
                 nodes: Sequence[str] | None = None,
                 gpu_uuid: str | None = None, replica_id: str | None = None,
                 include_left: bool = False, after: Sequence[Any] | None = None,
                 limit: int | None = None) -> list[dict[str, Any]]:
        """The DR mapping joined up: one row per replica with its GPU UUIDs. `after` (a
        row's `replica_page_key`) and `limit` page through them in order."""
        where, params = _replica_filter(job_id=job_id, node=node, include_left=include_left)
        if after is not None:
            where.append("(r.job_id, r.replica_group, r.group_rank, r.replica_id) > (?,?,?,?)")
            params.extend(after)
        if nodes is not None:
            where.append(f"r.node IN ({','.join('?' * len(nodes))})")
            params.extend(nodes)
        if replica_id:
            where.append("r.replica_id = ?")
            params.append(replica_id)
        if gpu_uuid:
            where.append("r.replica_id IN (SELECT replica_id FROM mapping WHERE gpu_uuid = ?)")
            params.append(gpu_uuid)
        sql = (
            "SELECT r.*, (SELECT json_group_array(gpu_uuid) FROM (SELECT gpu_uuid FROM mapping "
            "WHERE replica_id = r.replica_id ORDER BY gpu_uuid)) AS gpu_uuids FROM replicas r"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY r.job_id, r.replica_group, r.group_rank, r.replica_id"
            + ("" if limit is None else f" LIMIT {int(limit)}")
        )
        rows = list(self.db.query(sql, params))
        for row in rows:
            row["gpu_uuids"] = json.loads(row["gpu_uuids"])
        return rows

    def count_replicas(self, *, job_id: int | None = None, node: str | None = None,
                       include_left: bool = False) -> int:
        where, params = _replica_filter(job_id=job_id, node=node, include_left=include_left)
        sql = "SELECT COUNT(*) FROM replicas r" + (" WHERE " + " AND ".join(where) if where else "")
        return int(self.conn.execute(sql, params).fetchone()[0])

    def write_heartbeats(self, beats: Sequence[m.Heartbeat], now: float) -> int:
        """Write-behind of a batch of heartbeats in one transaction; returns rows updated.
        Raw executemany rather than sqlite-utils: this is the hottest write (50k rows/s)."""
        cur = self.conn.executemany(HEARTBEAT_SQL, [_beat_row(b, now) for b in beats])
        return cur.rowcount

    def write_heartbeats_one_by_one(self, beats: Sequence[m.Heartbeat], now: float
                                    ) -> tuple[int, list[tuple[m.Heartbeat, str]]]:
        """The slow path after a batch failed for a reason other than the database itself:
        each beat on its own, so one bad row is dropped instead of the whole batch."""
        written, bad = 0, []
        for beat in beats:
            try:
                self.conn.execute("SAVEPOINT beat")
                written += self.conn.execute(HEARTBEAT_SQL, _beat_row(beat, now)).rowcount
                self.conn.execute("RELEASE beat")
            except (OverflowError, ValueError, TypeError, sqlite3.IntegrityError) as exc:
                self.conn.execute("ROLLBACK TO beat")
                self.conn.execute("RELEASE beat")
                bad.append((beat, f"{type(exc).__name__}: {exc}"))
        return written, bad


def _beat_row(b: m.Heartbeat, now: float) -> tuple[Any, ...]:
    return (b.step, b.step_time_ms, b.allreduce_ms, b.participants, b.quorum_id, b.loss,
            b.config_revision, b.ts or now, b.replica_id, b.job_id)


def _replica_filter(*, job_id: int | None, node: str | None, include_left: bool
                    ) -> tuple[list[str], list[Any]]:
    """The WHERE terms (on `replicas r`) shared by listing and counting replicas."""
    where: list[str] = [] if include_left else ["r.state != 'left'"]
    params: list[Any] = []
    if job_id is not None:
        where.append("r.job_id = ?")
        params.append(job_id)
    if node:
        where.append("r.node = ?")
        params.append(node)
    return where, params


def replica_page_key(row: dict[str, Any]) -> list[Any]:
    """Where a page of `replicas()` ended: pass it back as `after` for the next page."""
    return [row["job_id"], row["replica_group"], row["group_rank"], row["replica_id"]]
