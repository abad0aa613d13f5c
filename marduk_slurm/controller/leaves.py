"""Durable leave and assume commands: a decision that a replica must leave is kept until the
replica confirms it (its `replica_leave` arrives) or is gone (it left, its step ended); a
decision that a standby assumes a group is kept until the standby confirms it (`assume_ack`)
or is gone (its step ended first: the group gets no standby, the sbatch supervisor respawns it).

The first command goes out right after the commit (`Context.carry_out`); this task re-sends
what is still pending with backoff, so a command lost to a crash, a NATS blip or a replica
that was reconnecting at the time still arrives. A replica that never answers is given up on
after `GIVE_UP_S`, with an event.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.backoff import backoff_delay
from marduk_slurm.controller.context import Context
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

log = logging.getLogger(__name__)

TICK_S = 0.5
RESEND_BASE_S = 1.0
RESEND_MAX_S = 30.0
GIVE_UP_S = 3600.0


class LeaveSender:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    async def run(self) -> None:
        while True:
            await self.tick()
            await asyncio.sleep(TICK_S)

    async def tick(self) -> int:
        """Re-send every leave that is due; returns how many went out."""
        if not self.ctx.may_act():
            return 0  # not the leader now: the commands wait, stored, for the one who is
        now = time.time()
        due = await self.ctx.db.tx(lambda store: self._take_due(store, now))
        for row in due:
            cmd = m.ReplicaCommand(
                replica_id=row["replica_id"], job_id=row["job_id"], action="leave",
                reason=row["reason"], immediate=bool(row["immediate"]),
                event_id=row["event_id"], ts=now, fence=self.ctx.fence_token(),
            )
            await self.ctx.publish(subjects.replica_commands(row["job_id"], row["replica_group"]),
                                   m.encode(cmd))
            self.ctx.stats["leave_commands_resent"] += 1
        assumes = await self.ctx.db.tx(lambda store: self._take_due_assumes(store, now))
        for row in assumes:
            leave = row["action"] == "leave"
            assume = m.ReplicaCommand(
                replica_id=row["standby_id"], job_id=row["job_id"], action=row["action"],
                reason=row["reason"], replica_group=None if leave else row["replica_group"],
                immediate=leave, event_id=row["event_id"], ts=now,
                fence=self.ctx.fence_token())
            await self.ctx.publish(subjects.standby_commands(row["job_id"]), m.encode(assume))
            self.ctx.stats["assume_commands_resent"] += 1
        return len(due) + len(assumes)

    def _take_due_assumes(self, store: StoreApi, now: float) -> list[dict[str, Any]]:
        for row in store.finish_assumes_of_gone_standbys(now):
            if row["action"] == "leave":
                continue  # stood down as told
            store.add_event("standby_lost", now=now, source="controller", job_id=row["job_id"],
                            replica_id=row["standby_id"],
                            reason=f"standby ended before it assumed replica group "
                                   f"{row['replica_group']}; the supervisor respawns the group",
                            evidence={"replica_group": row["replica_group"],
                                      "assign_event": row["event_id"]})
        due = []
        for row in store.due_assume_commands(now):
            attempts = row["attempts"] + 1
            store.assume_sent(row["standby_id"], attempts, now + backoff_delay(
                attempts, base_s=RESEND_BASE_S, max_s=RESEND_MAX_S, jitter=0.3))
            due.append(row)
        return due

    def _take_due(self, store: StoreApi, now: float) -> list[dict[str, Any]]:
        store.finish_leaves_of_gone_replicas(now)
        due = []
        for row in store.due_leave_commands(now):
            if now - row["created_at"] > GIVE_UP_S:
                store.finish_leave_command(row["replica_id"], "no answer, gave up", now)
                store.add_event("leave_abandoned", now=now, source="controller",
                                job_id=row["job_id"], replica_id=row["replica_id"],
                                reason=f"replica did not confirm its leave in {GIVE_UP_S:.0f} s",
                                evidence={"attempts": row["attempts"],
                                          "cause_event": row["event_id"]})
                continue
            attempts = row["attempts"] + 1
            store.leave_sent(row["replica_id"], attempts, now + backoff_delay(
                attempts, base_s=RESEND_BASE_S, max_s=RESEND_MAX_S, jitter=0.3))
            due.append(row)
        return due
