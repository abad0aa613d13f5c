"""Prometheus metrics, gathered at scrape time from what the controller already keeps.

Nothing here touches the per-message paths. A scrape first reads the database aggregates on
the store's thread (`refresh`, incremental for the history: only events newer than the last
scrape are counted), then `collect` turns them and the in-memory counters into metric
families. The one thing observed as it happens is the heartbeat ingest lag, once per flush.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from marduk_slurm.adapters.store import StoreApi
from marduk_slurm.controller.context import Context
from marduk_slurm.controller.risk_watch import RiskWatch
from marduk_slurm.controller.stragglers import StragglerWatch
from marduk_slurm.domain import messages as m
from marduk_slurm.supervisor import Supervisor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NATS_STATES = ("connecting", "connected", "disconnected", "closed")


@dataclass
class DbSnapshot:
    """Database aggregates; event counts accumulate across scrapes."""

    last_event_id: int = 0
    events: Counter[str] = field(default_factory=Counter)
    faults: Counter[tuple[str, str]] = field(default_factory=Counter)  # (xid, action)
    # Port and mount verdicts (node health beyond the GPU): (component, action).
    component_faults: Counter[tuple[str, str]] = field(default_factory=Counter)
    replicas: dict[tuple[str, str], int] = field(default_factory=dict)  # (job, state)
    outbox: dict[str, int] = field(default_factory=dict)  # kind -> pending
    nodes_drained: int = 0

    def read(self, store: StoreApi) -> None:
        for kind, xid, action, count, max_id in store.event_counts_since(self.last_event_id):
            self.events[kind] += count
            if kind == "gpu_verdict":
                self.faults[(str(xid), action)] += count
            elif kind in ("port_verdict", "mount_verdict"):
                self.component_faults[(kind.removesuffix("_verdict"), action)] += count
            self.last_event_id = max(self.last_event_id, max_id)
        self.replicas = store.replica_counts()
        self.outbox = store.pending_action_counts()
        self.nodes_drained = store.drained_node_count()


def _gauge(name: str, doc: str, labels: list[str], samples: Any) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in samples:
        family.add_metric(list(key), value)
    return family


def _counter(name: str, doc: str, labels: list[str], samples: Any) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in samples:
        family.add_metric(list(key), value)
    return family


def rejected_family(rejected: Counter[Any]) -> CounterMetricFamily:
    """marduk_rejected_messages{subject,kind,cause}: the controller counts rejected input by
    (subject class, message kind, cause); a plain-string key (an older counter) is a cause
    with subject and kind unknown."""
    samples = []
    for key, count in rejected.items():
        subject, kind, cause = key if isinstance(key, tuple) and len(key) == 3 else (
            "", "", str(key))
        samples.append(((str(subject), str(kind), str(cause)), count))
    return _counter("marduk_rejected_messages", "Messages and requests rejected since start, "
                    "by subject class, message kind and cause", ["subject", "kind", "cause"],
                    samples)


class MetricsCollector(Collector):
    def __init__(self, ctx: Context, supervisor: Supervisor, stragglers: StragglerWatch,
                 risk: RiskWatch) -> None:
        self.ctx = ctx
        self.supervisor = supervisor
        self.stragglers = stragglers
        self.risk = risk
        self.db = DbSnapshot()
        self.registry = CollectorRegistry(auto_describe=False)
        self.ingest_lag = Histogram(
            "marduk_heartbeat_ingest_lag_seconds",
            "Age of the oldest heartbeat of each write-behind batch when it is written",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=self.registry)
        self.registry.register(self)

    def on_flush(self, batch: list[m.Heartbeat], now: float) -> None:
        oldest = min((b.ts for b in batch if b.ts), default=0.0)
        if oldest:
            self.ingest_lag.observe(max(0.0, now - oldest))

    async def render(self) -> bytes:
        await self.ctx.db.read(self.db.read)
        return generate_latest(self.registry)

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield from self._store_metrics()
        yield from self._live_metrics()
        yield from self._analysis_metrics()

    def _store_metrics(self) -> Iterator[Metric]:
        d = self.db
        yield _gauge("marduk_replicas", "Replicas in the DR mapping by job and state",
                     ["job", "state"], d.replicas.items())
        yield _counter("marduk_events", "History events committed, by kind", ["kind"],
                       [((k,), v) for k, v in d.events.items()])
        yield _counter("marduk_gpu_faults", "GPU verdicts by XID ('' when none) and action",
                       ["xid", "action"], d.faults.items())
        yield _counter("marduk_component_faults", "Port and mount verdicts by component and "
                       "action", ["component", "action"], d.component_faults.items())
        yield _counter("marduk_node_drains", "Drains Slurm confirmed", [],
                       [((), d.events["drained"])])
        yield _counter("marduk_node_resumes", "Resumes Slurm confirmed", [],
                       [((), d.events["resumed"])])
        yield _gauge("marduk_nodes_drained", "Nodes with a drain flag in Slurm", [],
                     [((), d.nodes_drained)])
        yield _gauge("marduk_outbox_pending", "Slurm actions waiting for Slurm, by kind",
                     ["kind"], ((("drain",), 0), (("resume",), 0),
                                *(((k,), v) for k, v in d.outbox.items())))

    def _live_metrics(self) -> Iterator[Metric]:
        ctx = self.ctx
        yield rejected_family(ctx.rejected)
        yield _gauge("marduk_nats_connected", "1 when the controller's NATS link is up", [],
                     [((), int(ctx.nats_state == "connected"))])
        yield _gauge("marduk_nats_state", "The NATS link's state (1 for the current one)",
                     ["state"], [((s,), int(ctx.nats_state == s)) for s in NATS_STATES])
        yield _counter("marduk_task_crashes", "Crashes of supervised controller tasks",
                       ["task"], [((t,), n) for t, n in self.supervisor.crashes.items()])
        yield _counter("marduk_controller_operations", "Controller work counters "
                       "(heartbeats, events, leave commands, RPCs...)", ["op"],
                       [((k,), v) for k, v in ctx.stats.items()])
        yield _gauge("marduk_controller_uptime_seconds", "Seconds since the controller started",
                     [], [((), time.time() - ctx.started_at)])
        yield from self._leadership_metrics()

    def _leadership_metrics(self) -> Iterator[Metric]:
        lead = self.ctx.leadership
        if lead is None:
            return
        yield _gauge("marduk_controller_leader", "1 while this controller holds the lease "
                     "(docs/operations.md#failover-a-standby-controller)", ["controller"],
                     [((lead.id,), int(lead.current()))])
        yield _gauge("marduk_controller_lease_term", "The leader's term: the lease revision "
                     "at which it took the lease (the fencing token)", ["controller"],
                     [((lead.id,), lead.term)])
        yield _counter("marduk_controller_lease", "Lease work: renewals, renew_failures, "
                       "stale_leader_refusals, lease_lost", ["op"],
                       [((k,), v) for k, v in lead.stats.items()])

    def _analysis_metrics(self) -> Iterator[Metric]:
        watch = self.stragglers
        rates = watch.job_rates()
        yield _gauge("marduk_job_step_rate", "Steps per second (median over the job's "
                     "replicas)", ["job"], [((str(j),), r) for j, r in rates.items()])
        flagged: Counter[int] = Counter(t.job_id for t in watch.detector.tracks.values()
                                        if t.flagged)
        yield _gauge("marduk_stragglers", "Replicas flagged as stragglers now", ["job"],
                     [((str(j),), n) for j, n in flagged.items()])
        yield _counter("marduk_straggler_events", "Straggler flags raised and cleared, by "
                       "policy", ["kind", "policy"], watch.counts.items())
        yield _gauge("marduk_gpu_risk_score", "GPU failure risk score, 0-100 (see "
                     "docs/observability.md)", ["node", "gpu"],
                     [((s.node, s.gpu_uuid), s.score) for s in self.risk.latest])
