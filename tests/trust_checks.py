"""What the trust-boundary fuzz (tests/test_trust_fuzz.py) checks once the storm is over, read
from outside the controller: its SQLite file (read-only, with the stdlib), the NATS roster, and
its log. Bounds come from docs/protocol.md, never from the project's own decoders.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Any

import protocol_schema as schema
import trust_fuzz_cases as fuzz

from marduk_slurm.adapters import nats_auth

# -- the database, read as a stranger ------------------------------------------------------


def query(db: Path, sql: str, *params: Any) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


INT_RANGES = {"job_id": (0, schema.JOB_ID_MAX), "step_id": (0, schema.JOB_ID_MAX),
              "group_world_size": (1, 2**63 - 1), "ok": (0, 1), "drained_by_marduk": (0, 1),
              "simulated_gpus": (0, 1)}
SIGNED_INTS = {"exit_status", "exit_code", "quorum_id"}
JSON_COLUMNS = {"flags", "gpu_indices", "gpu_uuids", "value", "changes", "evidence"}
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
ID_PATTERNS = {"node": NAME_RE, "gpu_uuid": re.compile(r"[A-Za-z0-9_:-]{1,96}"),
               "uuid": re.compile(r"[A-Za-z0-9_:-]{1,96}"),
               "replica_id": re.compile(r"[!-~]{1,200}")}
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_JSON_DEPTH, MAX_JSON_BYTES = 32, 1_000_000


def depth(value: Any) -> int:
    """Nesting depth, without recursion (the values may be nested past Python's limit)."""
    deepest, todo = 0, [(value, 0)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            level += 1
            deepest = max(deepest, level)
            todo += [(v, level) for v in (item.values() if isinstance(item, dict) else item)]
    return deepest


def check_value(table: str, col: str, decl: str, value: Any) -> str | None:
    where = f"{table}.{col}"
    if value is None:
        return None
    if decl == "INTEGER":
        if not isinstance(value, int):
            return f"{where}: {type(value).__name__} {str(value)[:60]!r} in an INTEGER column"
        low, high = INT_RANGES.get(col, (-(2**63), 2**63 - 1) if col in SIGNED_INTS
                                   else (0, 2**63 - 1))
        return None if low <= value <= high else f"{where}: {value} outside {low}..{high}"
    if decl == "REAL":
        if not isinstance(value, int | float) or not math.isfinite(value):
            return f"{where}: {value!r} is not a finite number"
        if (col in ("ts", "since", "last_seen", "first_seen") or col.endswith("_at")
                or col.endswith("_ms")) and value < 0:
            return f"{where}: {value} is negative"
        return None
    if not isinstance(value, str):
        return f"{where}: {type(value).__name__} in a {decl} column"
    if CONTROL.search(value):
        return f"{where}: control characters in {value[:60]!r}"
    pattern = ID_PATTERNS.get(col) or (NAME_RE if (table, col) == ("nodes", "name") else None)
    if pattern is not None and not pattern.fullmatch(value):
        return f"{where}: {value[:60]!r} is not a valid {col}"
    if col in JSON_COLUMNS:
        if len(value) > MAX_JSON_BYTES:
            return f"{where}: {len(value)} bytes of JSON"
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError) as exc:
            return f"{where}: not JSON ({type(exc).__name__})"
        if depth(parsed) > MAX_JSON_DEPTH:
            return f"{where}: JSON nested {depth(parsed)} deep"
    return None


def database_violations(db: Path) -> list[str]:
    found: list[str] = []
    tables = [r["name"] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table' "
                                           "AND name NOT LIKE 'sqlite_%'")]
    for table in tables:
        cols = [(c["name"], c["type"].upper()) for c in query(db, f"PRAGMA table_info({table})")]
        for row in query(db, f"SELECT * FROM {table}"):
            for name, decl in cols:
                problem = check_value(table, name, decl, row[name])
                if problem and problem not in found:
                    found.append(problem)
    return found


def victim_violations(db: Path, last_setup_event: int) -> list[str]:
    """The job and node that sent nothing during the storm must look as they did."""
    found = []
    rows = query(db, "SELECT * FROM replicas WHERE replica_id=?", fuzz.VICTIM_REPLICA)
    want = {"job_id": fuzz.VICTIM_JOB, "node": fuzz.VICTIM_NODE, "state": "active",
            "last_step": 5}
    got = {k: rows[0][k] for k in want} if rows else None
    if got != want:
        found.append(f"victim replica {fuzz.VICTIM_REPLICA}: {got}, expected {want}")
    rows = query(db, "SELECT node, health FROM gpus WHERE uuid=?", fuzz.VICTIM_GPU)
    if [tuple(r) for r in rows] != [(fuzz.VICTIM_NODE, "none")]:
        found.append(f"victim GPU {fuzz.VICTIM_GPU}: {[tuple(r) for r in rows]}, expected "
                     f"[({fuzz.VICTIM_NODE!r}, 'none')]")
    # A replica names its own node (a job may lie about where it runs, to its own harm) and
    # the reconcile with Slurm (none here) ends the victim's step; every other event about
    # the victim's node, GPU or replica must come from the victim.
    for r in query(db, "SELECT id, kind, source, node, replica_id, gpu_uuid, reason FROM events "
                       "WHERE id > ? AND ((node=? AND source NOT IN ('replica', 'reconcile')) "
                       "OR gpu_uuid=? OR replica_id=?) "
                       # Refusals are recorded: that is the controller doing its job.
                       "AND kind NOT IN ('gpu_identity_conflict', 'identity_rejected')",
                   last_setup_event, fuzz.VICTIM_NODE, fuzz.VICTIM_GPU, fuzz.VICTIM_REPLICA):
        found.append(f"event about the victim written during the storm: {dict(r)}")
    if query(db, "SELECT 1 FROM outbox WHERE node=?", fuzz.VICTIM_NODE):
        found.append(f"a Slurm action queued for the victim node {fuzz.VICTIM_NODE}")
    return found[:20]


def refused_traces(db: Path) -> list[str]:
    """What the wrong credentials sent must have left no row behind."""
    rows = query(db, "SELECT id, kind FROM events WHERE reason LIKE '%wrongcred%' OR "
                     "replica_id LIKE '%wrongcred%'")
    rows += query(db, "SELECT replica_id, job_id FROM replicas WHERE replica_id LIKE "
                      "'%wrongcred%'")
    return [f"a message sent with a wrong credential was applied: {tuple(r)}" for r in rows]


def roster_violations(state: Path) -> list[str]:
    roster = json.loads((state / "auth" / nats_auth.ROSTER_FILE).read_text())
    return [f"credential issued for job {u['scope']} (job ids are 0..2**32)"
            for u in roster["users"]
            if u["role"] == "job" and int(u["scope"]) > schema.JOB_ID_MAX]


# -- the controller's log ---------------------------------------------------------------------


def log_findings(text: str) -> list[str]:
    """Crash lines and the exception each traceback ends with, once each."""
    lines = text.splitlines()
    found: list[str] = []
    for i, line in enumerate(lines):
        # A message rejected for its depth is the controller doing its job, not a finding.
        if "rejected message" not in line and re.search(
                r"crashed|CRITICAL|exited|recursion depth|disconnected", line):
            found.append(re.sub(r"^\S+ \S+ ", "", line)[:240])
        if line.startswith("Traceback"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                j += 1
            if j < len(lines):
                found.append(f"  exception: {lines[j][:240]}")
    return list(dict.fromkeys(found))
