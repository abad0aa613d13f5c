"""GPU failure risk, live: evidence in, scores out, and (when configured) predictive drains.

Evidence comes from the verdicts already in the history (read once at start, then as the
controller's own feed publishes them) and from the agents' health summaries on
``marduk.v1.health.<node>``. Scores are recomputed every few seconds by `domain.risk`. With
``controller.risk_drain_threshold`` > 0, a GPU reaching it drains its node (event
``risk_drain``, then the usual drain path). A resume keeps the node's history (scores decay
as it leaves the window); only evidence that arrives after the resume may drain it again.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from marduk_slurm.adapters.bus import Incoming
from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.decisions import Effects, take_decision
from marduk_slurm.controller.startup import BAD_ROW_ERRORS, apply_rows
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.decisions import RiskThreshold
from marduk_slurm.domain.inject import is_marked_repeat
from marduk_slurm.domain.risk import RiskScore, RiskTracker
from marduk_slurm.errors import ProtocolError
from marduk_slurm.settings import ControllerSettings
from marduk_slurm.supervisor import unsubscribe_all

log = logging.getLogger(__name__)

SCORE_EVERY_S = 5.0
# A view (risk, nodes, top, the dashboard) may show scores this old: under a burst of
# queries, scoring runs at most once per this interval, shared by every query waiting.
VIEW_FRESH_S = 1.0
RESUME_KINDS = ("resumed", "operator_resume")


class RiskWatch:
    def __init__(self, ctx: Context, settings: Callable[[], ControllerSettings], *,
                 window_s: float = 24 * 3600.0) -> None:
        self.ctx = ctx
        self.settings = settings
        self.tracker = RiskTracker(window_s=window_s)
        # The GPUs with a score, as the views show them, by node: {node: {uuid: (score,
        # factor details)}}, and those nodes' names in order (for pages of nodes).
        self.by_node: dict[str, dict[str, tuple[int, list[str]]]] = {}
        self.risk_nodes: list[str] = []
        self._node_of: dict[str, str] = {}  # a scored GPU -> the node it is listed under
        self.drained: set[str] = set()  # GPUs whose risk drained their node
        self._threshold_seen = 0  # the drain threshold of the last pass (a lower one re-checks)
        self.summaries = 0
        # Scoring a day of verdicts on a large cluster takes a good part of a second: it runs
        # on a thread, never on the event loop that ingests faults. The loop only queues what
        # arrives; the thread applies the queue and scores, holding the lock.
        self._arrived: deque[Callable[[], None]] = deque()
        self._lock = threading.Lock()
        self._scored_at = -float("inf")  # time.monotonic() of the last scoring's start
        self._scoring: asyncio.Future[None] | None = None

    async def load(self) -> None:
        """Rebuild the scores from the history; a row that cannot be read is skipped."""
        # From scratch: a supervised restart reloads the same verdicts, which must not count
        # twice.
        self.tracker = RiskTracker(window_s=self.tracker.window_s)
        self.by_node, self.risk_nodes, self._node_of = {}, [], {}
        self.drained = set()
        since = time.time() - self.tracker.window_s
        rows = await self.ctx.db(lambda: self.ctx.db.store.events(
            kinds=["gpu_verdict", "risk_drain", *RESUME_KINDS], since=since, limit=100000))
        apply_rows(self.ctx.stats, "risk", rows, lambda row: self._apply(
            row["kind"], row["node"], row["gpu_uuid"], row["evidence"], row["ts"]))
        self._arrived.clear()  # what arrived before this load is in the history it read
        await self.refresh()

    def _apply(self, kind: str, node: str | None, gpu: str | None, evidence: dict[str, Any],
               ts: float) -> None:
        if not isinstance(evidence, dict):
            raise TypeError(f"evidence is a {type(evidence).__name__}, not an object")
        if kind == "gpu_verdict" and is_marked_repeat(evidence):
            return  # a second verdict for one inject drill: the same reading again
        if kind == "gpu_verdict" and node and gpu:
            index = evidence.get("gpu_index")
            self.tracker.add_verdict(gpu, node, index if isinstance(index, int) else None,
                                     evidence, ts)
        elif kind == "risk_drain" and gpu:
            self.drained.add(gpu)
        elif kind in RESUME_KINDS and node:
            self.drained -= {u for u, h in self.tracker.gpus.items() if h.node == node}
            self.tracker.mark_resumed(node, ts)

    async def on_feed(self, msg: Incoming) -> None:
        try:
            ev = m.decode_feed(msg.data)
        except ProtocolError:
            return  # our own feed; the publisher is not going to get it wrong
        self._arrived.append(lambda: self._apply_feed(ev))

    def _apply_feed(self, ev: m.FeedEvent) -> None:
        try:
            self._apply(ev.kind, ev.node, ev.gpu_uuid, ev.evidence, ev.ts or time.time())
        except BAD_ROW_ERRORS as exc:  # an agent's evidence of an unexpected shape
            self.ctx.stats["risk_feed_skipped"] += 1
            log.debug("risk: feed event not applied: %s", exc)

    async def on_health(self, msg: Incoming) -> None:
        node = msg.subject.rsplit(".", 1)[-1]
        try:
            summary = m.decode_health(msg.data)
        except ProtocolError as exc:
            self.ctx.reject(exc.reason, msg.subject, exc.detail, "health")
            return
        if summary.node != node:
            self.ctx.reject("subject_mismatch", msg.subject, "health summary of another node",
                            "health")
            return
        gpus = []
        for gpu in summary.gpus:
            known = self.tracker.gpus.get(gpu.uuid)
            if known is not None and known.node != node:  # a GPU belongs to its first node
                self.ctx.reject("identity_conflict", msg.subject,
                                f"GPU {gpu.uuid} of {known.node}", "health")
                continue
            gpus.append(msgspec.to_builtins(gpu))
        self.summaries += 1
        now = time.time()
        self._arrived.append(lambda: self.tracker.add_summary(node, {"node": node, "gpus": gpus},
                                                              now))

    async def run(self) -> None:
        """Load, subscribe, score. Restartable: the subscriptions end with the run, and the
        next run loads from scratch, so a supervised restart never feeds a reading twice."""
        await self.load()
        subscriptions = []
        try:
            subscriptions.append(await self.ctx.bus.subscribe(subjects.FEED, self.on_feed))
            subscriptions.append(await self.ctx.bus.subscribe(subjects.node_health("*"),
                                                              self.on_health))
            while True:
                await asyncio.sleep(SCORE_EVERY_S)
                await self.score_and_drain()
        finally:
            await unsubscribe_all(subscriptions)

    @property
    def latest(self) -> list[RiskScore]:
        """Every scored GPU as of the last scoring, in no particular order."""
        return list(self.tracker.current().values())

    async def score_and_drain(self) -> None:
        await self.refresh()
        threshold = self.settings().risk_drain_threshold
        if threshold > 0:
            changed = await asyncio.to_thread(self._score, since_resume=True)
            if threshold < self._threshold_seen or not self._threshold_seen:
                # A lower threshold (a reload) may put GPUs over it whose scores did not move.
                changed = list(self.tracker.current(since_resume=True).values())
            self._threshold_seen = threshold
            for score in changed:
                if score.score >= threshold and score.gpu_uuid not in self.drained:
                    await self.drain(score, threshold)

    async def drain(self, score: RiskScore, threshold: int) -> None:
        """The score crossed the threshold: recorded as a `risk_drain` event, then the one
        decision path drains the node (unless it is drained already, by anyone)."""
        now = time.time()
        why = "; ".join(f.detail for f in score.factors)

        def decide(store: StoreApi) -> tuple[Effects, bool]:
            eid = store.add_event("risk_drain", now=now, source="risk", node=score.node,
                                  gpu_uuid=score.gpu_uuid,
                                  reason=f"risk {score.score} >= {threshold}: {why}"[:500],
                                  evidence=score.as_dict())
            effects = Effects(feed=[eid])
            decision = take_decision(
                store, RiskThreshold(score.node, score.gpu_uuid, score.score),
                cause_event=eid, source="risk", now=now, policy=self.ctx.policy,
                effects=effects)
            return effects, bool(decision.drains)

        self.drained.add(score.gpu_uuid)
        effects, drains = await self.ctx.db.tx(decide)
        if drains:
            log.warning("predictive drain of %s: GPU %s risk %d (%s)", score.node,
                        score.gpu_uuid, score.score, why)
        await self.ctx.carry_out(effects)

    async def refresh(self) -> None:
        """Scores as of now, with every reading that arrived applied (on a thread)."""
        self._scored_at = time.monotonic()
        await asyncio.to_thread(self._score)

    async def view(self) -> None:
        """Scores for a view: fresh when readings arrived since the last scoring, but scored
        at most once per VIEW_FRESH_S, and one scoring serves every query waiting on it, so
        a burst of queries does not keep a core busy scoring (and the fault path waiting on
        the interpreter lock)."""
        if self._scoring is not None:
            return await asyncio.shield(self._scoring)
        if not self._arrived or time.monotonic() - self._scored_at < VIEW_FRESH_S:
            return
        self._scoring = asyncio.ensure_future(self.refresh())
        try:
            await asyncio.shield(self._scoring)
        finally:
            self._scoring = None

    def _score(self, *, since_resume: bool = False, now: float | None = None
               ) -> list[RiskScore]:
        """Apply what arrived and score the GPUs it touched; return their new scores."""
        with self._lock:
            while self._arrived:
                self._arrived.popleft()()
            changed = self.tracker.update(time.time() if now is None else now,
                                          since_resume=since_resume)
            if not since_resume and changed:
                self._index(changed)
            return changed

    def _index(self, changed: list[RiskScore]) -> None:
        """Bring the views' index (`by_node`, `risk_nodes`) up to date with changed scores.
        The event loop reads it meanwhile: what it holds is replaced, never changed."""
        by_node = dict(self.by_node)
        for s in changed:
            before = self._node_of.pop(s.gpu_uuid, None)
            if before is not None and before != s.node:  # the GPU moved: off its old node
                by_node[before] = {u: v for u, v in by_node.get(before, {}).items()
                                   if u != s.gpu_uuid}
                if not by_node[before]:
                    del by_node[before]
            gpus = dict(by_node.get(s.node, {}))
            gpus.pop(s.gpu_uuid, None)
            if s.score:
                gpus[s.gpu_uuid] = (s.score, [f.detail for f in s.factors])
                self._node_of[s.gpu_uuid] = s.node
            if gpus:
                by_node[s.node] = gpus
            else:
                by_node.pop(s.node, None)
        if by_node.keys() != self.by_node.keys():
            self.risk_nodes = sorted(by_node)
        self.by_node = by_node

    def _ordered(self) -> list[RiskScore]:
        with self._lock:
            return self.tracker.ordered()

    def for_nodes(self, names: list[str]) -> dict[str, tuple[int, list[str]]]:
        """The scored GPUs of these nodes: {uuid: (score, factor details)}."""
        out: dict[str, tuple[int, list[str]]] = {}
        for name in names:
            out.update(self.by_node.get(name, {}))
        return out

    def for_page(self, after: str, size: int) -> dict[str, tuple[int, list[str]]]:
        """Enough for a page of `size` nodes after `after` (by name): its scored nodes are
        among the first `size` scored nodes after `after`, so a page never carries the
        scores of a whole cluster to the query that builds it."""
        start = bisect.bisect_right(self.risk_nodes, after)
        return self.for_nodes(self.risk_nodes[start:start + size])

    async def rpc_risk(self, args: dict[str, Any], actor: str) -> Any:
        node = args.get("node")
        if node is not None and not isinstance(node, str):
            raise ValueError("node must be a node name")
        await self.view()
        if node:
            return [s.as_dict() for s in sorted(
                (s for s in self.tracker.current().values() if s.node == node),
                key=lambda s: (s.index or 0, s.gpu_uuid))]
        return [s.as_dict() for s in await asyncio.to_thread(self._ordered)]
