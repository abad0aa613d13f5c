"""The outbox worker: carries queued Slurm actions out until Slurm confirms them.

Actions are rows written in the same transaction as the decision that caused them, so a
controller restart or a dead slurmctld loses none: an unreachable slurmctld means retry with
capped backoff; a permanent refusal (unknown node, a name Slurm must not be given) is recorded
as a failed action and an event. Any other exception from a Slurm call is a failed attempt,
retried with the same backoff and counted: the worker itself never dies of one.
Actions due together with the same kind and reason go to Slurm in one call (a hostlist).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from typing import Any

from marduk_slurm.adapters.slurm.base import SlurmBackend, SlurmNode
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.backoff import Backoff, backoff_delay
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.node_rows import write_nodes
from marduk_slurm.domain.slurm_names import sanitize_reason
from marduk_slurm.errors import SlurmError, SlurmUnavailable

log = logging.getLogger(__name__)

# The first retry of a Slurm action waits about this long; each further one twice as long.
RETRY_BASE_S = 0.5


def group_actions(actions: list[dict[str, Any]], *, batch_threshold: int
                  ) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Split due actions into Slurm calls: (kind, reason, actions).

    Actions with the same kind and reason always share a call (an operator's hostlist). When
    more than `batch_threshold` drains with one cause are due at once (a fault storm), they
    share one call under the cause's shorter reason, with a count and the first event, so a
    thousand faults cost one `scontrol update`; each node's own event stays in the history.
    """
    by_reason: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for action in actions:
        by_reason[(action["kind"], action["reason"])].append(action)
    by_cause: dict[str, list[list[dict[str, Any]]]] = defaultdict(list)
    groups = []
    for (kind, reason), group in by_reason.items():
        cause = group[0].get("batch_reason") or reason
        if kind == "drain" and cause != reason:
            by_cause[cause].append(group)
        else:
            groups.append((kind, reason, group))
    for cause, parts in by_cause.items():
        if len(parts) > batch_threshold:
            merged = [a for part in parts for a in part]
            first = min(a["event_id"] or 0 for a in merged)
            groups.append(("drain", f"{cause} nodes={len(merged)} first_event={first}", merged))
        else:
            groups += [("drain", part[0]["reason"], part) for part in parts]
    return groups


class OutboxWorker:
    def __init__(self, ctx: Context, slurm: SlurmBackend, *, retry_max_s: float = 30.0,
                 concurrency: int = 8, batch_threshold: int = 8) -> None:
        self.ctx = ctx
        self.batch_threshold = batch_threshold
        self.slurm = slurm
        self.retry_max_s = retry_max_s
        self.limit = asyncio.Semaphore(concurrency)

    async def run(self) -> None:
        # Guards the loop against the store (or a bug) failing outside any one Slurm call.
        backoff = Backoff(base_s=RETRY_BASE_S, max_s=self.retry_max_s)
        while True:
            try:
                await self.run_once()
            except Exception:
                self.ctx.stats["outbox_errors"] += 1
                log.exception("outbox pass failed; next pass after backoff")
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()
            next_due = await self.ctx.db(self.ctx.db.store.next_action_due)
            wait = 60.0 if next_due is None else max(0.0, next_due - time.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ctx.outbox_kick.wait(), timeout=wait)
            self.ctx.outbox_kick.clear()

    async def run_once(self) -> int:
        actions = await self.ctx.db(self.ctx.db.store.due_actions, time.time())
        if not actions:
            return 0
        drains = [a for a in actions if a["kind"] == "drain"]
        others = [a for a in actions if a["kind"] != "drain"]
        if drains:
            try:  # one read of Slurm for every drain due now
                drains = await self._skip_already_drained(drains)
            except Exception as exc:
                # Without the read a drain could overwrite someone else's: wait and retry.
                await self._retry(drains, _describe(exc), unexpected=_unexpected(exc))
                drains = []
        groups = group_actions(drains + others, batch_threshold=self.batch_threshold)
        await asyncio.gather(*(self._carry_out(kind, reason, group)
                               for kind, reason, group in groups))
        return len(actions)

    async def _carry_out(self, kind: str, reason: str, group: list[dict[str, Any]]) -> None:
        nodes = sorted({a["node"] for a in group})
        # The backend sends this line, not the raw reason: record what Slurm will show.
        reason = sanitize_reason(reason)
        if not await self.ctx.fence(f"{kind} {','.join(nodes)[:200]}"):
            return  # not the leader (any more): the action stays pending, for the next one
        try:
            async with self.limit:
                await self._call_slurm(kind, nodes, reason)
        except SlurmUnavailable as exc:
            await self._retry(group, str(exc))
            return
        except SlurmError as exc:
            # Outside the semaphore: the one-by-one calls take it again each.
            if len(group) > 1:  # one bad node must not sink the others: go one by one
                for action in group:
                    await self._carry_out(kind, action["reason"], [action])
                return
            await self._failed(group[0], str(exc))
            return
        except Exception as exc:
            await self._retry(group, _describe(exc), unexpected=True)
            return
        await self._done(kind, group, reason)

    async def _call_slurm(self, kind: str, nodes: list[str], reason: str) -> None:
        if kind == "drain":
            await self.slurm.drain(nodes, reason)
        elif kind == "resume":
            await self.slurm.resume(nodes)
        else:
            raise SlurmError(f"unknown outbox action {kind!r}")

    async def _skip_already_drained(self, group: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Read the nodes from Slurm just before draining: a node someone else drained keeps
        its reason (overwriting it would undo their drain), one we drained stays as it is."""
        read_at = time.time()
        current = {n.name: n for n in await self.slurm.get_nodes([a["node"] for a in group])}
        todo, skipped = [], []
        for action in group:
            node = current.get(action["node"])
            if node is not None and (node.state.is_drained() or node.state.is_draining()):
                skipped.append((action, node))
            else:
                todo.append(action)
        if skipped:
            await self._skipped(skipped, read_at)
        return todo

    async def _skipped(self, skipped: list[tuple[dict[str, Any], Any]], read_at: float) -> None:
        now = time.time()
        prefix = self.ctx.policy.reason_prefix

        def commit(store: StoreApi) -> list[int]:
            # The drain found here may be news (someone else's): recorded as such first.
            ids = write_nodes(store, [node for _, node in skipped], read_at=read_at,
                              prefix=prefix, now=now)
            for action, node in skipped:
                store.complete_action(action["id"], now)
                who = "marduk" if node.reason.startswith(prefix + ":") else (
                    node.reason_user or "someone else")
                ids.append(store.add_event(
                    "drain_skipped", now=now, source="slurm", node=node.name,
                    reason=f"already drained by {who}: {node.reason}",
                    evidence={"outbox_id": action["id"], "cause_event": action["event_id"]}))
            return ids

        ids = await self.ctx.db.tx(commit)
        await self.ctx.publish_feed(ids)
        await self.ctx.replication.report(self.ctx.bus, "drain", [a for a, _ in skipped],
                                          "skipped")

    async def _read_back(self, nodes: list[str]) -> list[SlurmNode]:
        """The nodes as Slurm has them right after our call, so the node view is fresh at
        once; a failed read leaves the row as the action implies, until the next reconcile."""
        try:
            return await self.slurm.get_nodes(nodes)
        except Exception as exc:
            self.ctx.stats["slurm_read_back_failures"] += 1
            log.warning("reading %d node(s) back after a Slurm action failed: %s",
                        len(nodes), _describe(exc))
            return []

    async def _done(self, kind: str, group: list[dict[str, Any]], reason: str) -> None:
        current = await self._read_back(sorted({a["node"] for a in group}))
        now = time.time()
        prefix = self.ctx.policy.reason_prefix

        def commit(store: StoreApi) -> list[int]:
            ids = []
            for action in group:
                store.complete_action(action["id"], now)
                if kind == "drain":
                    store.mark_node_drained(action["node"], reason, action["event_id"], now)
                else:
                    store.mark_node_resumed(action["node"], now)
                ids.append(store.add_event(
                    "drained" if kind == "drain" else "resumed", now=now, source="slurm",
                    node=action["node"], reason=reason or action["reason"],
                    evidence={"outbox_id": action["id"], "cause_event": action["event_id"],
                              "attempts": action["attempts"] + 1,
                              "queued_s": round(now - action["created_at"], 4),
                              "batch": len(group)},
                ))
            # Then Slurm's own view over the row (`IDLE+DRAIN` or `MIXED+DRAIN`, its user),
            # as of just after the call; the rows were just written, so none counts as newer.
            return ids + write_nodes(store, current, read_at=now, prefix=prefix, now=now)

        ids = await self.ctx.db.tx(commit)
        self.ctx.stats[f"slurm_{kind}s"] += len(group)
        await self.ctx.publish_feed(ids)
        await self.ctx.replication.report(self.ctx.bus, kind, group, "done", reason)

    async def _retry(self, group: list[dict[str, Any]], error: str, *,
                     unexpected: bool = False) -> None:
        attempts = max(a["attempts"] for a in group) + 1
        delay = backoff_delay(attempts, base_s=RETRY_BASE_S, max_s=self.retry_max_s)
        if unexpected:
            # Not a failure Slurm reported: keep the traceback, and count it apart.
            self.ctx.stats["slurm_unexpected_errors"] += 1
            log.error("Slurm call for %d action(s) failed unexpectedly, retry %d in %.1f s: %s",
                      len(group), attempts, delay, error, exc_info=True)
        else:
            log.warning("Slurm call failed for %d action(s), retry %d in %.1f s: %s",
                        len(group), attempts, delay, error)
        next_at = time.time() + delay

        def commit(store: StoreApi) -> None:
            for action in group:
                store.retry_action(action["id"], error, next_at)

        await self.ctx.db.tx(commit)
        self.ctx.stats["slurm_retries"] += len(group)

    async def _failed(self, action: dict[str, Any], error: str) -> None:
        now = time.time()
        log.error("Slurm refused %s of %s: %s", action["kind"], action["node"], error)

        def commit(store: StoreApi) -> int:
            store.fail_action(action["id"], error, now)
            return store.add_event(
                f"{action['kind']}_failed", now=now, source="slurm", node=action["node"],
                reason=error[:500], evidence={"outbox_id": action["id"],
                                              "cause_event": action["event_id"]},
            )

        eid = await self.ctx.db.tx(commit)
        self.ctx.stats["slurm_failures"] += 1
        await self.ctx.replication.report(self.ctx.bus, action["kind"], [action], "failed",
                                          error)
        await self.ctx.publish_feed([eid])


def _unexpected(exc: Exception) -> bool:
    """True for an exception that is not one of the Slurm errors a backend reports."""
    return not isinstance(exc, SlurmError)


def _describe(exc: Exception) -> str:
    return str(exc) if isinstance(exc, SlurmError) else f"{type(exc).__name__}: {exc}"
