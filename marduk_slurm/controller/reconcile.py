"""Reconciliation with Slurm: node states and drains as Slurm has them, steps that ended.

Drains set by someone else are recorded (and shown) but never undone. Steps that Slurm no
longer runs leave the mapping, so a lost step-end report cannot leave stale rows behind.
A pass that fails, whatever the exception, is counted and the next one waits longer (capped
backoff); the loop itself never ends on one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from marduk_slurm.adapters.slurm.base import SlurmBackend, SlurmStep
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.backoff import Backoff
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.node_rows import changed_nodes, write_nodes
from marduk_slurm.domain.slurm_state import step_label
from marduk_slurm.errors import SlurmError

log = logging.getLogger(__name__)

# After failed passes the wait grows up to this many intervals.
MAX_BACKOFF_INTERVALS = 10


class Reconciler:
    def __init__(self, ctx: Context, slurm: SlurmBackend, *, interval_s: float,
                 step_grace_s: float = 30.0) -> None:
        self.ctx = ctx
        self.slurm = slurm
        self.interval_s = interval_s
        # A step reported by SPANK may not be visible in Slurm's step list yet.
        self.step_grace_s = step_grace_s
        self.last_ok: float | None = None
        self.last_error = ""
        self.passes = 0
        self.failing_since: float | None = None
        self.consecutive_failures = 0

    async def run(self) -> None:
        backoff = Backoff(base_s=self.interval_s,
                          max_s=self.interval_s * MAX_BACKOFF_INTERVALS)
        wait_s = self.interval_s
        while True:
            await asyncio.sleep(wait_s)
            if await self.reconcile_once():
                backoff.reset()
                wait_s = self.interval_s
            else:
                wait_s = max(self.interval_s, backoff.next())

    async def reconcile_once(self) -> bool:
        """One pass; returns False (and keeps going) when Slurm cannot be read."""
        try:
            await self.refresh_nodes()
            if self.slurm.lists_steps:  # without Slurm, steps end only when reported
                await self.reconcile_steps(await self.slurm.list_steps())
        except SlurmError as exc:
            self._failed(str(exc))
            log.warning("reconcile with Slurm failed: %s", exc)
            return False
        except Exception as exc:
            # Not an error a backend reports (a bug, the store): keep the traceback.
            self._failed(f"{type(exc).__name__}: {exc}")
            self.ctx.stats["reconcile_unexpected_errors"] += 1
            log.exception("reconcile with Slurm failed unexpectedly")
            return False
        self.last_ok = time.time()
        self.last_error = ""
        self.passes += 1
        self.failing_since, self.consecutive_failures = None, 0
        self.ctx.stats["reconciles"] += 1
        return True

    def _failed(self, error: str) -> None:
        self.last_error = error
        self.passes += 1
        self.consecutive_failures += 1
        if self.failing_since is None:
            self.failing_since = time.time()
        self.ctx.stats["reconcile_failures"] += 1

    def health(self) -> dict[str, Any]:
        """Whether Slurm answered the last reconcile pass (None: no pass yet), for status."""
        return {"reachable": None if not self.passes else self.consecutive_failures == 0,
                "last_ok": self.last_ok, "failing_since": self.failing_since,
                "consecutive_failures": self.consecutive_failures,
                "last_error": self.last_error}

    async def refresh_nodes(self) -> None:
        """Read every node from Slurm; record what changed, and drains and resumes someone
        else made (`foreign_drain`, `foreign_resume`) as events."""
        read_at = time.time()
        nodes = await self.slurm.list_nodes()
        changed = await self.ctx.db.read(
            lambda store: changed_nodes(store.node_slurm_rows(), nodes))
        if not changed:
            return
        ids = await self.ctx.db.tx(lambda store: write_nodes(
            store, changed, read_at=read_at, prefix=self.ctx.policy.reason_prefix))
        self.ctx.stats["foreign_node_changes"] += len(ids)
        if ids:
            await self.ctx.publish_feed(ids)

    async def reconcile_steps(self, steps: list[SlurmStep]) -> None:
        live = {(s.job_id, s.step_id, n) for s in steps for n in s.nodes}
        live_jobs = {s.job_id for s in steps}
        now = time.time()

        def write(store: StoreApi) -> list[int]:
            ids = []
            for row in store.running_steps():
                key = (row["job_id"], row["step_id"], row["node"])
                if key in live or now - row["started_at"] < self.step_grace_s:
                    continue
                if row["step_id"] >= 0xFFFFFFF0 and row["job_id"] in live_jobs:
                    continue  # batch/extern steps are not listed as steps by every Slurm
                gone = store.end_step(*key, None, now)
                ids.append(store.add_event(
                    "step_gone", now=now, source="reconcile", node=row["node"],
                    job_id=row["job_id"],
                    reason=f"step {step_label(row['job_id'], row['step_id'])} no longer runs "
                           "in Slurm",
                    evidence={"replicas_removed": gone}))
            return ids

        ids = await self.ctx.db.tx(write)
        if ids:
            await self.ctx.publish_feed(ids)
