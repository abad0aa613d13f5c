"""The controller's SQLite store (sqlite-utils, WAL): the DR mapping, history and outbox.

All methods are synchronous and must be called from one thread: the controller runs them in
its single "sqlite" executor so that nothing blocks the event loop. Multi-row writes happen
inside `transaction()`, so a batch of events commits whole or not at all.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlite_utils

from marduk_slurm.adapters.store.mapping import MappingMixin
from marduk_slurm.adapters.store.migrations import MIGRATIONS
from marduk_slurm.adapters.store.outbox import OutboxMixin
from marduk_slurm.adapters.store.standbys import StandbysMixin
from marduk_slurm.adapters.store.summary import DRAINED, SummaryMixin
from marduk_slurm.adapters.store.trust import TrustMixin
from marduk_slurm.domain import messages as m
from marduk_slurm.errors import StoreError


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, default=str)


class Store(MappingMixin, OutboxMixin, TrustMixin, SummaryMixin, StandbysMixin):
    """One SQLite database file. `path=":memory:"` is allowed for tests of pure queries."""

    def __init__(self, path: Path | str, *, busy_timeout_ms: int = 5000,
                 read_only: bool = False) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            if read_only:  # a reader of the read lane: never writes, never changes the mode
                conn.execute("PRAGMA query_only=1")
            else:
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from exc
        self.db = sqlite_utils.Database(conn)
        self.conn = conn
        self._depth = 0

    def close(self) -> None:
        self.conn.close()

    # -- schema ----------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply pending migrations; return the schema version."""
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
            "applied_at REAL NOT NULL)"
        )
        row = self.conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        current = row[0] or 0
        for version, script in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            with self.transaction():
                for statement in _split_sql(script):
                    self.conn.execute(statement)
                self.conn.execute(
                    "INSERT INTO schema_migrations VALUES (?, ?)", (version, time.time())
                )
            current = version
        return current

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction; nested uses join the outer one."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self._depth = 0
            self.conn.execute("ROLLBACK")
            raise
        self._depth = 0
        self.conn.execute("COMMIT")

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    # -- ingest bookkeeping ----------------------------------------------------------------

    def already_ingested(self, seq: int) -> bool:
        row = self.conn.execute("SELECT 1 FROM ingested WHERE stream_seq=?", (seq,)).fetchone()
        return row is not None

    def mark_ingested(self, seq: int, now: float) -> None:
        self.conn.execute("INSERT OR IGNORE INTO ingested VALUES (?, ?)", (seq, now))

    def prune_ingested(self, older_than: float) -> int:
        cur = self.conn.execute("DELETE FROM ingested WHERE ts < ?", (older_than,))
        return cur.rowcount

    # -- history ---------------------------------------------------------------------------

    def add_event(self, kind: str, *, now: float, source: str = "", reason: str = "",
                  node: str | None = None, gpu_uuid: str | None = None,
                  job_id: int | None = None, replica_id: str | None = None,
                  xid: int | None = None, action: str | None = None,
                  evidence: dict[str, Any] | None = None) -> int:
        cur = self.conn.execute(
            "INSERT INTO events (ts, kind, source, node, gpu_uuid, job_id, replica_id, xid, "
            "action, reason, evidence) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (now, kind, source, node, gpu_uuid, job_id, replica_id, xid, action, reason,
             _dumps(evidence or {})),
        )
        return int(cur.lastrowid or 0)

    def events(self, *, node: str | None = None, job_id: int | None = None,
               since: float | None = None, after_id: int = 0, kinds: Sequence[str] = (),
               limit: int = 200, oldest_first: bool = False, before_id: int | None = None
               ) -> list[dict[str, Any]]:
        """Events after `after_id` matching the filters, in id order: the newest `limit` of
        them, or with `oldest_first` the first `limit` (to page forward through all)."""
        where, params = _event_filter(node=node, job_id=job_id, since=since, after_id=after_id,
                                      kinds=kinds, before_id=before_id)
        order = "ASC" if oldest_first else "DESC"
        sql = (f"SELECT * FROM (SELECT * FROM events WHERE {where} "
               f"ORDER BY id {order} LIMIT ?) ORDER BY id")
        rows = list(self.db.query(sql, [*params, limit]))
        for row in rows:
            row["evidence"] = json.loads(row["evidence"])
        return rows

    def event_window(self, newest: int, *, node: str | None = None, job_id: int | None = None,
                     since: float | None = None, kinds: Sequence[str] = ()
                     ) -> tuple[int, int]:
        """Where the newest `newest` matching events are: (after_id, through_id) such that
        they are exactly the matching events with after_id < id <= through_id. Paging forward
        through that window shows the newest N oldest first without holding N rows."""
        where, params = _event_filter(node=node, job_id=job_id, since=since, after_id=0,
                                      kinds=kinds, before_id=None)
        through = self.conn.execute(f"SELECT MAX(id) FROM events WHERE {where}",
                                    params).fetchone()[0]
        if through is None:
            return 0, 0
        row = self.conn.execute(f"SELECT id FROM events WHERE {where} AND id <= ? "
                                "ORDER BY id DESC LIMIT 1 OFFSET ?",
                                [*params, through, newest]).fetchone()
        return (0 if row is None else int(row[0])), int(through)

    def event(self, event_id: int) -> dict[str, Any] | None:
        rows = list(self.db["events"].rows_where("id = ?", [event_id]))
        if not rows:
            return None
        rows[0]["evidence"] = json.loads(rows[0]["evidence"])
        return rows[0]

    # -- nodes and GPUs --------------------------------------------------------------------

    def ensure_node(self, name: str, now: float) -> None:
        self.conn.execute(
            "INSERT OR IGNORE INTO nodes (name, updated_at) VALUES (?, ?)", (name, now)
        )

    def node(self, name: str) -> dict[str, Any] | None:
        rows = list(self.db["nodes"].rows_where("name = ?", [name]))
        return _node_row(rows[0]) if rows else None

    def nodes(self, *, after: str | None = None, limit: int | None = None
              ) -> list[dict[str, Any]]:
        """Nodes by name; `after` (the last name of a page) and `limit` page through them."""
        rows = self.db["nodes"].rows_where("name > ?" if after is not None else None,
                                           [after] if after is not None else None,
                                           order_by="name", limit=limit)
        return [_node_row(r) for r in rows]

    def count_nodes(self) -> int:
        return self.db["nodes"].count

    def node_slurm_rows(self, names: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """The Slurm columns of `names` (None: every node) by name, flags decoded, read lean:
        a reconcile pass compares a whole cluster with them every few seconds."""
        sql = "SELECT name, state, flags, reason, reason_user, updated_at FROM nodes"
        if names is not None and len(names) <= 500:
            cur = self.conn.execute(f"{sql} WHERE name IN ({','.join('?' * len(names))})",
                                    list(names))
        else:
            cur = self.conn.execute(sql)
        return {r[0]: {"state": r[1], "flags": json.loads(r[2]), "reason": r[3],
                       "reason_user": r[4], "updated_at": r[5]} for r in cur}

    def update_node_from_slurm(self, name: str, state: str, flags: Iterable[str], reason: str,
                               reason_user: str, now: float, marduk_prefix: str) -> None:
        """Record what Slurm says; a drain reason not starting with our prefix is not ours."""
        flags = sorted(flags)
        ours = reason.startswith(marduk_prefix + ":") and "DRAIN" in flags
        self.conn.execute(
            "INSERT INTO nodes (name, state, flags, reason, reason_user, drained_by_marduk, "
            "updated_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET "
            "state=excluded.state, flags=excluded.flags, reason=excluded.reason, "
            "reason_user=excluded.reason_user, drained_by_marduk=excluded.drained_by_marduk, "
            "drain_event_id=CASE WHEN excluded.drained_by_marduk THEN drain_event_id END, "
            "updated_at=excluded.updated_at",
            (name, state, _dumps(flags), reason, reason_user, int(ours), now),
        )

    def mark_node_drained(self, name: str, reason: str, event_id: int | None, now: float) -> None:
        """Slurm took our drain: the row says so until the next read of Slurm refines it."""
        self.ensure_node(name, now)
        row = self.node(name) or {}
        flags = sorted({*row.get("flags", []), "DRAIN"})
        self.conn.execute(
            "UPDATE nodes SET state=?, flags=?, reason=?, reason_user='', drained_by_marduk=1, "
            "drain_event_id=?, updated_at=? WHERE name=?",
            (_with_drain(row.get("state", "unknown"), True), _dumps(flags), reason, event_id,
             now, name),
        )

    def mark_node_resumed(self, name: str, now: float) -> None:
        """Slurm took our resume: no drain left in the state, the flags or the reason."""
        row = self.node(name)
        if row is None:
            return
        flags = [f for f in row["flags"] if f != "DRAIN"]
        self.conn.execute(
            "UPDATE nodes SET state=?, flags=?, reason='', reason_user='', drained_by_marduk=0, "
            "drain_event_id=NULL, updated_at=? WHERE name=?",
            (_with_drain(row["state"], False), _dumps(flags), now, name),
        )

    def upsert_gpus(self, node: str, gpus: Sequence[m.GpuDescriptor], simulated: bool,
                    now: float) -> None:
        self.ensure_node(node, now)
        self.conn.executemany(
            "INSERT INTO gpus (uuid, node, idx, name, pci_bus_id, updated_at) VALUES "
            "(?,?,?,?,?,?) ON CONFLICT(uuid) DO UPDATE SET node=excluded.node, idx=excluded.idx, "
            "name=excluded.name, pci_bus_id=excluded.pci_bus_id, updated_at=excluded.updated_at",
            [(g.uuid, node, g.index, g.name, g.pci_bus_id, now) for g in gpus],
        )
        self.conn.execute(
            "UPDATE nodes SET simulated_gpus=? WHERE name=?", (int(simulated), node)
        )

    def set_gpu_health(self, uuid: str, node: str, index: int | None, action: str,
                       reason: str, now: float) -> None:
        self.ensure_node(node, now)
        self.conn.execute(
            "INSERT INTO gpus (uuid, node, idx, health, health_reason, updated_at) VALUES "
            "(?,?,?,?,?,?) ON CONFLICT(uuid) DO UPDATE SET health=excluded.health, "
            "health_reason=excluded.health_reason, updated_at=excluded.updated_at",
            (uuid, node, -1 if index is None else index, action, reason, now),
        )

    def set_component_health(self, node: str, component: str, target: str, action: str,
                              reason: str, event_id: int, now: float) -> None:
        """The latest verdict on a port or mount point of `node`."""
        self.ensure_node(node, now)
        self.conn.execute(
            "INSERT INTO node_components (node, component, target, health, health_reason, "
            "event_id, updated_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(node, component, target) "
            "DO UPDATE SET health=excluded.health, health_reason=excluded.health_reason, "
            "event_id=excluded.event_id, updated_at=excluded.updated_at",
            (node, component, target, action, reason, event_id, now))

    def component_count(self, node: str) -> int:
        row = self.conn.execute("SELECT count(*) FROM node_components WHERE node=?",
                                (node,)).fetchone()
        return int(row[0])

    def has_component(self, node: str, component: str, target: str) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM node_components WHERE node=? AND component=? AND target=?",
            (node, component, target)).fetchone() is not None

    def gpus(self, node: str | None = None) -> list[dict[str, Any]]:
        if node:
            return list(self.db["gpus"].rows_where("node = ?", [node], order_by="idx"))
        return list(self.db["gpus"].rows_where(order_by="node, idx"))

    def with_details(self, nodes: list[dict[str, Any]], *, full_replicas: bool = False
                     ) -> list[dict[str, Any]]:
        """Add each node's `gpus` and `replicas` (ids, or whole rows with `full_replicas`) to
        node rows: a few queries per 500 nodes, not two per node."""
        for start in range(0, len(nodes), 500):
            chunk = nodes[start:start + 500]
            names = [n["name"] for n in chunk]
            marks = ",".join("?" * len(names))
            gpus: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for gpu in self.db.query(f"SELECT * FROM gpus WHERE node IN ({marks}) "
                                     "ORDER BY node, idx", names):
                gpus[gpu["node"]].append(gpu)
            components: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
            for row in self.db.query(
                    "SELECT node, component, target, health, health_reason, event_id, "
                    f"updated_at FROM node_components WHERE node IN ({marks}) "
                    "ORDER BY node, component, target", names):
                components[row.pop("node")].append(row)
            replicas: dict[str, list[Any]] = {name: [] for name in names}
            if full_replicas:
                for row in self.replicas(nodes=names):
                    replicas[row["node"]].append(row)
            else:
                for rid, node in self.conn.execute(
                        f"SELECT replica_id, node FROM replicas WHERE node IN ({marks}) AND "
                        "state != 'left' ORDER BY job_id, replica_group, group_rank, "
                        "replica_id", names):
                    replicas[node].append(rid)
            for node in chunk:
                node["gpus"] = gpus[node["name"]]
                node["components"] = components[node["name"]]
                node["replicas"] = replicas[node["name"]]
        return nodes

    def drained_nodes(self, limit: int) -> list[dict[str, Any]]:
        """Nodes with a drain flag in Slurm's last word, by name, at most `limit`."""
        rows = self.db["nodes"].rows_where(DRAINED, order_by="name", limit=limit)
        return [_node_row(r) for r in rows]

    def gpu_uuid(self, node: str, index: int) -> str | None:
        row = self.conn.execute(
            "SELECT uuid FROM gpus WHERE node=? AND idx=?", (node, index)
        ).fetchone()
        return str(row[0]) if row else None


def _event_filter(*, node: str | None, job_id: int | None, since: float | None,
                  after_id: int, kinds: Sequence[str], before_id: int | None
                  ) -> tuple[str, list[Any]]:
    """The WHERE clause (on `events`) shared by listing events and finding a window."""
    where: list[str] = ["id > ?"]
    params: list[Any] = [after_id]
    if before_id is not None:
        where.append("id < ?")
        params.append(before_id)
    if node:
        where.append("node = ?")
        params.append(node)
    if job_id is not None:
        where.append("job_id = ?")
        params.append(job_id)
    if since is not None:
        where.append("ts >= ?")
        params.append(since)
    if kinds:
        where.append(f"kind IN ({','.join('?' * len(kinds))})")
        params.extend(kinds)
    return " AND ".join(where), params


def _node_row(row: dict[str, Any]) -> dict[str, Any]:
    row["flags"] = json.loads(row["flags"])
    row["drained_by_marduk"] = bool(row["drained_by_marduk"])
    return row


def _with_drain(state: str, drained: bool) -> str:
    """`IDLE` <-> `IDLE+DRAIN`: the state text (base+flags, as the reconciler stores it) after
    a drain or resume Slurm confirmed, so the row never shows a drain that is gone."""
    base, *flags = state.split("+")
    flags = [f for f in flags if f != "DRAIN"]
    return "+".join([base, *flags, "DRAIN"] if drained else [base, *flags])


def _split_sql(script: str) -> list[str]:
    """Statements of a migration script (they contain no semicolons inside literals)."""
    lines = [ln.split("--", 1)[0] for ln in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
