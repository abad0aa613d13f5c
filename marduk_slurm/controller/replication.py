"""What a standby controller learns from the leader beyond the events stream it shares with it.

Both controllers ingest the same events and so queue the same Slurm actions (one pending
action per kind and node: adapters/store/outbox.py). Only the leader carries them out; each
time it settles one (done, found already done, refused by Slurm) it publishes an
`ActionApplied` record into the events stream, under the lease revision it held. A standby
that ingests the record settles its own pending copy of that action, so that after a
takeover it does not carry out again what the old leader did. The records are ordered with
the events that caused the actions: a standby settles the copy that the same cause queued.

What the record cannot cover (the old leader died between its Slurm call and its record) is
covered by the outbox reading the nodes from Slurm before draining them: a node the old
leader drained is found drained and not drained again (`drain_skipped`).

Config revisions are operator writes the events stream does not carry: the leader publishes
each committed revision (`ConfigRevised`) before any replica hears of it, and a standby keeps
it under the same number, so a new leader numbers the next revision after it.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, BusTimeout

log = logging.getLogger(__name__)


class Replication:
    """The controller's side of the records: publishing (leader), settling (standby)."""

    def __init__(self, controller_id: str) -> None:
        self.controller_id = controller_id
        # The lease revision this controller acts under (when it leads): the fencing token.
        self.current_fence: Callable[[], int] = lambda: 0
        self.highest_fence_seen = 0
        self.stats: Counter[str] = Counter()

    def on_applied(self, store: StoreApi, msg: m.ActionApplied, now: float) -> int | None:
        """Settle our copy of an action another controller carried out; the event id."""
        if msg.controller == self.controller_id:
            return None  # our own report: the action is settled here already
        stale = msg.fence < self.highest_fence_seen
        if stale:
            # A leader that lost the lease reports what it did before it knew: a fact still.
            self.stats["applied_records_stale"] += 1
        self.highest_fence_seen = max(self.highest_fence_seen, msg.fence)
        row = store.pending_action(msg.kind, msg.node)
        if row is not None:
            if msg.outcome == "failed":
                store.fail_action(row["id"], f"failed on the leader: {msg.reason}", now)
            else:
                store.complete_action(row["id"], now)
        if msg.outcome == "done" and msg.kind == "drain":
            store.mark_node_drained(msg.node, msg.reason, row["event_id"] if row else None, now)
        elif msg.outcome == "done":
            store.mark_node_resumed(msg.node, now)
        self.stats["applied_records"] += 1
        return store.add_event(
            "leader_applied", now=now, source=f"controller:{msg.controller}"[:128],
            node=msg.node, reason=f"{msg.kind} {msg.outcome} by the leader"[:500],
            evidence={"controller": msg.controller, "fence": msg.fence, "kind": msg.kind,
                      "outcome": msg.outcome, "outbox_id": row["id"] if row else None,
                      "stale": stale})

    def on_config(self, store: StoreApi, msg: m.ConfigRevised, now: float) -> int | None:
        """Record a config revision the leader made, under its number; the event id."""
        if msg.controller == self.controller_id:
            return None
        self.highest_fence_seen = max(self.highest_fence_seen, msg.fence)
        if not store.record_config_revision(msg.job_id, msg.revision, msg.changes,
                                            msg.apply_at_step, msg.actor, now):
            return None
        self.stats["config_records"] += 1
        return store.add_event(
            "config_set", now=now, source=msg.actor or "operator", job_id=msg.job_id,
            reason=f"revision {msg.revision} of job {msg.job_id} at step {msg.apply_at_step}: "
                   + ", ".join(f"{k}={v}" for k, v in msg.changes.items()),
            evidence={"revision": msg.revision, "apply_at_step": msg.apply_at_step,
                      "changes": msg.changes, "controller": msg.controller,
                      "fence": msg.fence})

    async def report_config(self, bus: Bus, job_id: int, revision: int, apply_at_step: int,
                            changes: dict[str, Any], actor: str) -> None:
        """Publish a committed config revision for the standbys, before any replica hears
        of it: a revision a replica may run is then one a new leader knows and never
        numbers again."""
        if not self.controller_id:
            return
        fence = self.current_fence()
        record = m.ConfigRevised(controller=self.controller_id, fence=fence, job_id=job_id,
                                 revision=revision, apply_at_step=apply_at_step,
                                 changes=changes, actor=actor[:1000], ts=time.time())
        try:
            await bus.publish_durable(
                subjects.controller_event(self.controller_id, "config_revised"),
                m.encode(record), msg_id=f"{self.controller_id}.config.{job_id}.{revision}")
        except (BusError, BusTimeout) as exc:
            self.stats["config_records_unsent"] += 1
            log.warning("could not report revision %d of job %d to the standbys: %s",
                        revision, job_id, exc)
            return
        self.stats["config_records_sent"] += 1

    async def report(self, bus: Bus, kind: str, actions: list[dict[str, Any]], outcome: str,
                     reason: str = "") -> None:
        """Publish one record per settled action. A failure is logged and counted: the
        standby then finds the node's state in Slurm before acting (see the module)."""
        if not self.controller_id:
            return  # a controller part on its own (no leadership): nobody to tell
        fence = self.current_fence()
        for action in actions:
            record = m.ActionApplied(
                controller=self.controller_id, fence=fence, kind=kind,  # type: ignore[arg-type]
                node=action["node"], outcome=outcome, reason=reason[:1000],  # type: ignore[arg-type]
                ts=time.time())
            msg_id = f"{self.controller_id}.{fence}.{kind}.{action['id']}.{outcome}"
            try:
                await bus.publish_durable(subjects.controller_event(
                    self.controller_id, "action_applied"), m.encode(record), msg_id=msg_id)
            except (BusError, BusTimeout) as exc:
                self.stats["applied_records_unsent"] += 1
                log.warning("could not report %s of %s to the standbys: %s", kind,
                            action["node"], exc)
                continue
            self.stats["applied_records_sent"] += 1
