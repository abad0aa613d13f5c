"""GPU watching: inventory, XID events, health polls, verdicts, and fault injection.

Every NVML call goes through `NvmlRunner` (its own threads, a time limit on each call), so a
sick GPU never stalls the event loop. Two tasks read GPUs: `watch_xids` waits for XID events
in the runner's event thread and reads the GPU an event names at once; `poll` reads every GPU
every `poll_interval_s`. Reads are serialised here, because the runner answers "busy" to a
second call while one is running, and that must stay a sign of a hung driver.

A reading is judged by `FaultPolicy.evaluate`; the verdict is published durably only when it
changes (`verdict_changed`), and an NVML error is evidence inside a verdict, never a crash.
Injected XIDs enter where real ones do: on simulated GPUs through the simulated driver, on
real GPUs (only with allow_inject) into the next reading of that GPU.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgspec

from marduk_slurm.adapters.nvml import GpuInfo, NvmlRunner, SimulatedGpuSource
from marduk_slurm.agent.outbox import Outbox
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import (
    FaultPolicy,
    GpuAction,
    GpuReading,
    GpuVerdict,
    verdict_changed,
)
from marduk_slurm.domain.inject import REQUEST_ID_KEY
from marduk_slurm.errors import BusError, MardukError

log = logging.getLogger(__name__)

XID_WAIT_MS = 1000
MAX_XID = 2**31 - 1


class InjectRefused(MardukError, PermissionError):
    """Injection into real GPUs without allow_inject."""


class CorePublisher(Protocol):
    """Core NATS publishing, for the health summary (`adapters.bus.Bus` is one)."""

    @property
    def connected(self) -> bool: ...

    async def publish(self, subject: str, data: bytes) -> None: ...


@dataclass
class _Injection:
    xid: int
    actor: str
    done: asyncio.Future[GpuVerdict]
    request_id: str | None = None  # the controller's, echoed in the verdict (domain.inject)


class GpuWatcher:
    def __init__(
        self,
        runner: NvmlRunner,
        *,
        node: str,
        outbox: Outbox,
        bus: CorePublisher,
        policy: FaultPolicy,
        poll_interval_s: float,
        allow_inject: bool = False,
        extra_summary: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.runner = runner
        self.node = node
        self.outbox = outbox
        self.bus = bus
        self.policy = policy
        self.poll_interval_s = poll_interval_s
        self.allow_inject = allow_inject
        self.extra_summary = extra_summary  # the daemon adds its other counters
        self.simulated = isinstance(runner.source, SimulatedGpuSource)
        self.gpus: list[GpuInfo] = []
        self.verdicts: dict[str, GpuVerdict] = {}
        self.readings: dict[str, GpuReading] = {}  # the latest, for the summary's counters
        self.xid_counts: dict[str, Counter[int]] = {}
        self.stats: Counter[str] = Counter()
        self._read_lock = asyncio.Lock()
        self._injections: dict[str, list[_Injection]] = {}
        self._synthetic: dict[str, list[int]] = {}

    # -- inventory -------------------------------------------------------------------------

    async def enumerate(self) -> list[GpuInfo]:
        """Find the GPUs and queue the inventory for the controller."""
        self.gpus = await self.runner.gpus()
        inventory = m.GpuInventory(
            node=self.node,
            simulated=self.simulated,
            ts=time.time(),
            gpus=[
                m.GpuDescriptor(uuid=g.uuid, index=g.index, name=g.name, pci_bus_id=g.pci_bus_id)
                for g in self.gpus
            ],
        )
        self.outbox.put(
            subjects.node_event(self.node, "gpu_inventory"),
            m.encode(inventory),
            f"{self.node}.gpu_inventory.{time.time_ns()}",
        )
        kind = "SIMULATED" if self.simulated else "NVML"
        log.info(
            "%d %s GPU(s) on %s: %s",
            len(self.gpus),
            kind,
            self.node,
            ", ".join(f"{g.index}={g.uuid}" for g in self.gpus) or "none",
        )
        return self.gpus

    def index_map(self) -> dict[int, str]:
        return {g.index: g.uuid for g in self.gpus}

    def find(self, ref: str) -> GpuInfo:
        """A GPU by index ("1") or UUID; ValueError naming the known ones otherwise."""
        for gpu in self.gpus:
            if ref == gpu.uuid or (ref.isdigit() and int(ref) == gpu.index):
                return gpu
        known = ", ".join(f"{g.index} ({g.uuid})" for g in self.gpus) or "none"
        raise ValueError(f"no GPU {ref!r} on {self.node} (known: {known})")

    # -- the two readers -------------------------------------------------------------------

    async def watch_xids(self) -> None:
        """Read a GPU as soon as the driver reports an XID on it."""
        while True:
            events = await self.runner.wait_xid(XID_WAIT_MS)
            for uuid in dict.fromkeys(e.uuid for e in events):
                self.stats["xid_events"] += 1
                gpu = next((g for g in self.gpus if g.uuid == uuid), None)
                if gpu is None:
                    # Usually a GPU that fell off the bus before NVML could name it; the
                    # polls report it as lost.
                    log.error(
                        "XID %s on a GPU NVML cannot identify (%s)",
                        [e.xid for e in events if e.uuid == uuid],
                        uuid,
                    )
                    continue
                await self.check(gpu)

    async def poll(self) -> None:
        """Read every GPU every poll_interval_s and publish a health summary."""
        while True:
            started = time.monotonic()
            for gpu in self.gpus:
                await self.check(gpu)
            await self.publish_summary()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.1, self.poll_interval_s - elapsed))

    async def check(self, gpu: GpuInfo) -> GpuVerdict:
        """Read, judge and (when it changed) publish the verdict of one GPU."""
        async with self._read_lock:
            reading = await self.runner.read(gpu)
        self.stats["readings"] += 1
        synthetic = self._synthetic.pop(gpu.uuid, [])
        if synthetic:
            reading = replace(reading, xids=reading.xids + tuple(synthetic))
        if reading.errors:
            self.stats["nvml_errors"] += 1
        self._remember(reading)
        verdict = self.policy.evaluate(reading)
        injected = self._claim_injections(gpu.uuid, reading)
        if injected:
            verdict = replace(
                verdict,
                evidence={
                    **verdict.evidence,
                    "injected": True,
                    "injected_by": sorted({i.actor for i in injected}),
                    "injected_xids": [i.xid for i in injected],
                    "gpu_source": "simulated" if self.simulated else "nvml",
                    **_request_id(injected),
                },
            )
        if verdict_changed(self.verdicts.get(gpu.uuid), verdict):
            self._publish_verdict(gpu, reading, verdict)
        self.verdicts[gpu.uuid] = verdict
        for injection in injected:
            if not injection.done.done():
                injection.done.set_result(verdict)
        return verdict

    def _remember(self, reading: GpuReading) -> None:
        self.readings[reading.uuid] = reading
        counts = self.xid_counts.setdefault(reading.uuid, Counter())
        for xid in reading.xids:
            if xid in counts or len(counts) < m.MAX_XID_KINDS:
                counts[xid] += 1
            else:  # a GPU reporting more distinct XIDs than a summary carries
                self.stats["xid_kinds_dropped"] += 1

    def _claim_injections(self, uuid: str, reading: GpuReading) -> list[_Injection]:
        waiting = self._injections.get(uuid, [])
        claimed = [i for i in waiting if i.xid in reading.xids]
        rest = [i for i in waiting if i not in claimed and not i.done.done()]
        if rest:
            self._injections[uuid] = rest
        else:
            self._injections.pop(uuid, None)
        return claimed

    def _publish_verdict(self, gpu: GpuInfo, reading: GpuReading, verdict: GpuVerdict) -> None:
        msg = m.Verdict(
            node=self.node,
            gpu_uuid=gpu.uuid,
            gpu_index=gpu.index,
            action=verdict.action,
            reason=verdict.reason[:512] or "unknown",
            xid=reading.xids[0] if reading.xids else None,
            evidence=verdict.evidence,
            source="agent",
            ts=time.time(),
        )
        self.outbox.put(
            subjects.node_event(self.node, "verdict"),
            m.encode(msg),
            f"{self.node}.verdict.{gpu.uuid}.{time.time_ns()}",
        )
        self.stats["verdicts"] += 1
        level = logging.INFO if verdict.action is GpuAction.NONE else logging.WARNING
        log.log(
            level, "GPU %d (%s): %s: %s", gpu.index, gpu.uuid, verdict.action.value, verdict.reason
        )

    # -- summary ---------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        gpus = [
            {
                "uuid": g.uuid,
                "index": g.index,
                "action": self.verdicts[g.uuid].action.value
                if g.uuid in self.verdicts
                else "unknown",
                "reason": self.verdicts[g.uuid].reason if g.uuid in self.verdicts else "",
                **({"counters": msgspec.to_builtins(gpu_counters(
                    self.readings[g.uuid], self.xid_counts.get(g.uuid, Counter())))}
                   if g.uuid in self.readings else {}),
            }
            for g in self.gpus
        ]
        worst = max(
            (self.verdicts[g.uuid].action for g in self.gpus if g.uuid in self.verdicts),
            key=lambda a: a.severity,
            default=GpuAction.NONE,
        )
        return {
            "v": m.PROTOCOL_VERSION,
            "type": "node_health",
            "node": self.node,
            "ts": time.time(),
            "simulated": self.simulated,
            "worst": worst.value,
            "gpus": gpus,
            "stats": dict(self.stats),
            **(self.extra_summary() if self.extra_summary else {}),
        }

    async def publish_summary(self) -> None:
        """Core NATS, best effort: a missed summary is replaced by the next one."""
        if not self.bus.connected:
            return
        try:
            await self.bus.publish(
                subjects.node_health(self.node), msgspec.json.encode(self.summary())
            )
        except BusError as exc:
            log.debug("health summary not sent: %s", exc)

    # -- injection -------------------------------------------------------------------------

    async def inject(self, ref: str, xid: int, actor: str, timeout_s: float = 1.5, *,
                     request_id: str | None = None) -> GpuVerdict:
        """Feed XID `xid` to GPU `ref` and return the verdict it led to; the verdict's
        evidence carries `request_id`, the controller's id for this inject."""
        if isinstance(xid, bool) or not isinstance(xid, int) or not 0 <= xid <= MAX_XID:
            raise ValueError(f"xid must be a non-negative integer, got {xid!r}")
        gpu = self.find(ref)
        if not self.simulated and not self.allow_inject:
            raise InjectRefused(
                f"{self.node} has real GPUs; start the agent with "
                "--allow-inject to allow synthetic XIDs"
            )
        done: asyncio.Future[GpuVerdict] = asyncio.get_running_loop().create_future()
        self._injections.setdefault(gpu.uuid, []).append(
            _Injection(xid, actor, done, request_id))
        self.stats["injected"] += 1
        log.warning("injecting xid %d on GPU %d (%s) for %s", xid, gpu.index, gpu.uuid, actor)
        if isinstance(self.runner.source, SimulatedGpuSource):
            # The simulated driver raises the XID event; `watch_xids` takes it from there.
            self.runner.source.inject_xid(gpu.index, xid)
        else:
            self._synthetic.setdefault(gpu.uuid, []).append(xid)
            await self.check(gpu)
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except TimeoutError:
            done.cancel()
            raise

    async def reset(self, ref: str, actor: str) -> GpuVerdict:
        """Reset simulated GPU `ref` (what `nvidia-smi -r` does to a real one: a GPU lost
        after XID 79 is back on the bus) and return the verdict of a fresh reading."""
        gpu = self.find(ref)
        if not isinstance(self.runner.source, SimulatedGpuSource):
            raise InjectRefused(f"{self.node} has real GPUs; reset them with the driver's "
                                "tools (nvidia-smi -r), then let the polls see them")
        log.warning("resetting simulated GPU %d (%s) for %s", gpu.index, gpu.uuid, actor)
        self.runner.source.reset(gpu.index)
        self.stats["resets"] += 1
        return await self.check(gpu)


def gpu_counters(reading: GpuReading, xid_counts: Counter[int]) -> m.GpuCounters:
    """The counters of one reading, clamped to the protocol's bounds: a driver's odd value
    must not make the controller refuse the whole summary."""
    return m.GpuCounters(
        ecc_sbe_volatile=_count(reading.ecc_sbe_volatile),
        ecc_sbe_aggregate=_count(reading.ecc_sbe_aggregate),
        ecc_dbe_volatile=_count(reading.ecc_dbe_volatile),
        ecc_dbe_aggregate=_count(reading.ecc_dbe_aggregate),
        retired_pages_sbe=_count(reading.retired_pages_sbe),
        retired_pages_dbe=_count(reading.retired_pages_dbe),
        retired_pages_pending=reading.retired_pages_pending,
        remap_correctable=_count(reading.remap_correctable),
        remap_uncorrectable=_count(reading.remap_uncorrectable),
        remap_pending=reading.remap_pending,
        remap_failure=reading.remap_failure,
        temperature_c=_within(reading.temperature_c, -273.0, 1000.0),
        power_w=_within(reading.power_w, 0.0, 1e6),
        throttle_reasons=sorted(r[:64] for r in reading.throttle_reasons if r)[:64],
        xids=[m.XidCount(xid=x, count=_count(n) or 0) for x, n in sorted(xid_counts.items())
              if 0 <= x <= MAX_XID],
    )


def _count(value: int | None) -> int | None:
    return None if value is None else min(max(0, int(value)), 2**53)


def _within(value: float | None, low: float, high: float) -> float | None:
    if value is None or value != value:  # NaN
        return None
    return min(max(low, float(value)), high)


def _request_id(injected: list[_Injection]) -> dict[str, str]:
    """The evidence entry naming the inject request a verdict answers. Injections claimed by
    one reading share one verdict, which can carry one id: the first one's."""
    ids = [i.request_id for i in injected if i.request_id]
    return {REQUEST_ID_KEY: ids[0]} if ids else {}
