"""Watching the node beyond its GPUs: network ports (sysfs) and mount points (probes).

Every `interval_s` the watcher reads every configured port in one `ThreadProbe` and probes
every mount point in one each (adapters/node_probes.py), all with a time limit, so a hung
driver or filesystem never stalls the event loop and a probe still stuck from last time is
reported as hung, not started again. Each reading is judged by `NodeHealthPolicy`
(domain/node_health.py) and the verdict is published through the agent's durable outbox, as a
`node_verdict`, only when it changed. Drills (`inject`) make the reading a fault would make
and judge it with the same code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.node_probes import (
    MountProber,
    ThreadProbe,
    printable_text,
    read_ports,
)
from marduk_slurm.agent.outbox import Outbox
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction, GpuVerdict
from marduk_slurm.domain.inject import REQUEST_ID_KEY
from marduk_slurm.domain.node_health import (
    Component,
    MountReading,
    NodeHealthPolicy,
    PortReading,
    ProbeOutcome,
    changed,
    injected_mount,
    injected_port,
    prune,
)

log = logging.getLogger(__name__)

SYSFS_TARGET = "sysfs"  # the target of a verdict on reading the ports as a whole


@dataclass
class NodeWatchConfig:
    """What to watch, and how (the agent.* settings of the same names)."""

    sysfs_root: Path = Path("/sys")
    ib_ports: list[str] = field(default_factory=list)
    net_ports: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)  # write probe
    mounts_read_only: list[str] = field(default_factory=list)  # stat probe
    interval_s: float = 10.0
    probe_timeout_s: float = 10.0

    @property
    def enabled(self) -> bool:
        return bool(self.ib_ports or self.net_ports or self.mounts or self.mounts_read_only)


class NodeWatcher:
    def __init__(self, config: NodeWatchConfig, policy: NodeHealthPolicy, *, node: str,
                 outbox: Outbox, mount_probes: dict[str, MountProber] | None = None) -> None:
        self.config = config
        self.policy = policy
        self.node = node
        self.outbox = outbox
        self.port_reader: ThreadProbe[list[PortReading]] = ThreadProbe("ports")
        self.history: dict[str, list[PortReading]] = {}
        self.seen: set[tuple[str, str]] = set()  # (component, target) found healthy once
        self.verdicts: dict[tuple[str, str], GpuVerdict] = {}
        self.stats: Counter[str] = Counter()
        # One round at a time: a node check's round waits for the periodic one, or the probe
        # still running in it would look hung to the other.
        self._round = asyncio.Lock()
        self.mounts = mount_probes if mount_probes is not None else {
            path: MountProber(path, write=path in config.mounts, node=node)
            for path in dict.fromkeys(config.mounts + config.mounts_read_only)}

    async def run(self) -> None:
        """Check everything every interval_s, for ever."""
        while True:
            started = time.monotonic()
            await self.check_all()
            await asyncio.sleep(max(0.1, self.config.interval_s - (time.monotonic() - started)))

    async def check_all(self) -> None:
        """One round: ports and every mount at once, each within its time limit."""
        async with self._round:
            await asyncio.gather(self.check_ports(),
                                 *(self.check_mount(p) for p in self.mounts))

    async def check_ports(self) -> None:
        c = self.config
        if not (c.ib_ports or c.net_ports):
            return
        result = await self.port_reader.run(
            lambda: read_ports(c.sysfs_root, c.ib_ports, c.net_ports), c.probe_timeout_s)
        self.stats["port_reads"] += 1
        if result.outcome is not ProbeOutcome.OK or result.value is None:
            # The driver behind sysfs is stuck: no port can be judged, which is news itself.
            self.stats[f"port_reads_{result.outcome.value}"] += 1
            what = printable_text(f"{result.outcome.value}: {result.error}"[:300]
                                  if result.error is not None else result.outcome.value)
            self._publish(Component.PORT, SYSFS_TARGET, GpuVerdict(
                GpuAction.WATCH, f"reading the ports' sysfs files {what}"[:500],
                {"component": "port", "target": SYSFS_TARGET, "outcome": result.outcome.value,
                 "elapsed_s": round(result.elapsed_s, 3),
                 "findings": [{"action": "watch", "code": "sysfs", "reason": what[:200]}]}))
            return
        self._sysfs_works()
        for reading in result.value:
            self.judge_port(reading)

    def judge_port(self, reading: PortReading) -> GpuVerdict:
        key = (Component.PORT.value, reading.target)
        history = prune([*self.history.get(reading.target, []), reading], reading.ts,
                        self.policy.window_s)
        self.history[reading.target] = history
        verdict = self.policy.judge_port(history, seen_before=key in self.seen)
        if reading.present:
            self.seen.add(key)
        self._publish(Component.PORT, reading.target, verdict)
        return verdict

    async def check_mount(self, path: str) -> GpuVerdict:
        reading = await self.mounts[path].probe(self.config.probe_timeout_s)
        self.stats["mount_probes"] += 1
        self.stats[f"mount_probes_{reading.outcome.value}"] += 1
        return self.judge_mount(reading)

    def judge_mount(self, reading: MountReading, extra: dict[str, Any] | None = None
                    ) -> GpuVerdict:
        key = (Component.MOUNT.value, reading.path)
        verdict = self.policy.judge_mount(reading, seen_before=key in self.seen)
        if reading.outcome is ProbeOutcome.OK:
            self.seen.add(key)
        if extra:
            verdict = GpuVerdict(verdict.action, verdict.reason, {**verdict.evidence, **extra})
        self._publish(Component.MOUNT, reading.path, verdict, force=bool(extra))
        return verdict

    def _sysfs_works(self) -> None:
        """Reading the ports works (again, after a verdict that it did not)."""
        if (Component.PORT.value, SYSFS_TARGET) in self.verdicts:
            self._publish(Component.PORT, SYSFS_TARGET, GpuVerdict(
                GpuAction.NONE, "reading the ports' sysfs files works",
                {"component": "port", "target": SYSFS_TARGET, "findings": []}))

    def _publish(self, component: Component, target: str, verdict: GpuVerdict, *,
                 force: bool = False) -> None:
        key = (component.value, target)
        if not force and not changed(self.verdicts.get(key), verdict):
            return
        self.verdicts[key] = verdict
        msg = m.NodeVerdict(node=self.node, component=component.value, target=target,
                            action=verdict.action.value,  # type: ignore[arg-type]
                            reason=printable_text(verdict.reason)[:512] or "unknown",
                            evidence=verdict.evidence, source="agent", ts=time.time())
        self.outbox.put(subjects.node_event(self.node, "node_verdict"), m.encode(msg),
                        f"{self.node}.node_verdict.{time.time_ns()}.{self.stats['verdicts']}")
        self.stats["verdicts"] += 1
        level = logging.INFO if verdict.action is GpuAction.NONE else logging.WARNING
        log.log(level, "%s %s: %s: %s", component.value, target, verdict.action.value,
                verdict.reason)

    # -- summary and drills --------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        return {
            "components": [{"component": c, "target": t, "action": v.action.value,
                            "reason": v.reason} for (c, t), v in sorted(self.verdicts.items())],
            "stats": dict(self.stats),
            "hung": sorted(p for p, probe in self.mounts.items() if probe.runner.busy)
            + (["ports"] if self.port_reader.busy else []),
        }

    def inject(self, component: str, target: str, fault: str, actor: str,
               request_id: str | None = None) -> GpuVerdict:
        """Judge the reading `fault` would make on a watched port or mount, and publish its
        verdict (always, marked as injected); ValueError for anything else."""
        extra = {"injected": True, "injected_by": actor, "injected_fault": fault,
                 **({REQUEST_ID_KEY: request_id} if request_id else {})}
        self.stats["injected"] += 1
        log.warning("injecting %s fault %r on %s for %s", component, fault, target, actor)
        if component == Component.PORT.value:
            history = self.history.get(target)
            if not history:
                known = ", ".join(sorted(self.history)) or "none"
                raise ValueError(f"no port {target!r} watched on {self.node} (known: {known})")
            readings = injected_port(history[-1], fault, self.policy)
            verdict = self.policy.judge_port(readings)
            verdict = GpuVerdict(verdict.action, verdict.reason, {**verdict.evidence, **extra})
            self._publish(Component.PORT, target, verdict, force=True)
            return verdict
        if component == Component.MOUNT.value:
            if target not in self.mounts:
                known = ", ".join(sorted(self.mounts)) or "none"
                raise ValueError(f"no mount {target!r} watched on {self.node} (known: {known})")
            reading = injected_mount(target, fault, self.config.probe_timeout_s,
                                     self.mounts[target].write)
            return self.judge_mount(reading, extra)
        raise ValueError(f"component must be port or mount, got {component!r}")
