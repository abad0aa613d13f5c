"""NVML adapter: GPU enumeration, health polls and XID events, behind `GpuSource`.

Only this module imports `pynvml`, and only when `NvmlGpuSource` is built, so the rest of the
project (and machines without a driver) never load it. NVML calls block, sometimes for a long
time on a sick GPU, so the agent makes them through `NvmlRunner`: a named thread and a time
limit on every call. A failed NVML call is evidence, not an exception: `read` always returns
a `GpuReading`, with the failure in `errors` (and `lost=True` for NVML_ERROR_GPU_IS_LOST).

XIDs arrive as events: `wait_xid` returns them and also keeps them, per GPU, for the next
`read`, so the reading (not the event) is what `FaultPolicy.evaluate` judges.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from marduk_slurm.domain.gpu_health import GpuReading
from marduk_slurm.errors import MardukError

log = logging.getLogger(__name__)

T = TypeVar("T")


class GpuSourceError(MardukError, RuntimeError):
    """NVML cannot be used on this machine (no library, no driver, init failed)."""


class GpuSourceTimeout(GpuSourceError, TimeoutError):
    """An NVML call that must answer (enumeration) did not within its time limit."""


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as enumerated: stable identity, not health."""

    uuid: str
    index: int
    pci_bus_id: str
    name: str


@dataclass(frozen=True)
class XidEvent:
    """One XID critical error reported by the driver."""

    uuid: str
    index: int | None  # None when the event names a GPU we did not enumerate
    xid: int


class GpuSource(Protocol):
    """Where GPU identity, health and XID events come from (real NVML or a simulation)."""

    node: str

    def gpus(self) -> list[GpuInfo]: ...

    def read(self, gpu: GpuInfo) -> GpuReading: ...

    def wait_xid(self, timeout_ms: int) -> list[XidEvent]: ...

    def close(self) -> None: ...


class _XidInbox:
    """XIDs seen per GPU and not yet part of a reading; shared by the event and poll threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uuid: dict[str, list[int]] = {}

    def add(self, uuid: str, xid: int) -> None:
        with self._lock:
            self._by_uuid.setdefault(uuid, []).append(xid)

    def take(self, uuid: str) -> tuple[int, ...]:
        with self._lock:
            return tuple(self._by_uuid.pop(uuid, ()))


# Field ids read in one nvmlDeviceGetFieldValues call, and the GpuReading field each fills.
_FIELD_IDS = {
    "ecc_dbe_volatile": "NVML_FI_DEV_ECC_DBE_VOL_TOTAL",
    "ecc_dbe_aggregate": "NVML_FI_DEV_ECC_DBE_AGG_TOTAL",
    "ecc_sbe_volatile": "NVML_FI_DEV_ECC_SBE_VOL_TOTAL",
    "ecc_sbe_aggregate": "NVML_FI_DEV_ECC_SBE_AGG_TOTAL",
    "retired_pages_sbe": "NVML_FI_DEV_RETIRED_SBE",
    "retired_pages_dbe": "NVML_FI_DEV_RETIRED_DBE",
    "retired_pages_pending": "NVML_FI_DEV_RETIRED_PENDING",
    "recovery_action": "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION",
}
# nvmlValueType_t -> the c_nvmlValue_t union member that holds it.
_VALUE_MEMBERS = dict(enumerate(["dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal"]))
_THROTTLE_BITS = {
    "sw_power_cap": 0x04,
    "hw_slowdown": 0x08,
    "sw_thermal_slowdown": 0x20,
    "hw_thermal_slowdown": 0x40,
    "hw_power_brake_slowdown": 0x80,
}
_GPU_IS_LOST = 15  # NVML_ERROR_GPU_IS_LOST, fixed by the NVML ABI


class _Probe:
    """Runs the NVML calls of one reading, turning each failure into evidence."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml
        self.values: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.lost = False

    def call(self, key: str, fn: Callable[..., T], *args: Any) -> T | None:
        if self.lost:  # every later call would fail the same way, slowly
            return None
        try:
            return fn(*args)
        # A reading must come back whatever NVML does, so nothing may escape here.
        except Exception as err:
            self.fail(key, err)
            return None

    def fail(self, key: str, err: BaseException) -> None:
        code = getattr(err, "value", None)
        if code == getattr(self.nvml, "NVML_ERROR_GPU_IS_LOST", _GPU_IS_LOST):
            self.lost = True
        is_nvml = isinstance(err, self.nvml.NVMLError)
        self.errors[key] = str(err) if is_nvml else f"{type(err).__name__}: {err}"


class NvmlGpuSource:
    """The real `GpuSource`: NVML through pynvml (or a stand-in module, for tests)."""

    def __init__(self, node: str, module: Any = None) -> None:
        self.node = node
        self._nvml = module if module is not None else _import_pynvml()
        self._inbox = _XidInbox()
        self._closed = False
        self._enumeration_errors: dict[str, BaseException] = {}
        try:
            self._nvml.nvmlInit()
        except Exception as err:
            raise GpuSourceError(f"NVML init failed: {err}") from err
        try:
            self._handles, self._gpus = self._enumerate()
        except Exception as err:
            self._nvml.nvmlShutdown()
            raise GpuSourceError(f"NVML enumeration failed: {err}") from err
        self._event_errors: dict[str, str] = {}
        self._event_set = self._register_xid_events()

    def _enumerate(self) -> tuple[dict[str, Any], list[GpuInfo]]:
        nvml = self._nvml
        handles: dict[str, Any] = {}
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = _text(nvml.nvmlDeviceGetUUID(handle))
                bus_id = _text(nvml.nvmlDeviceGetPciInfo(handle).busId)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except Exception as err:
                # A GPU already off the bus must still be reported (as lost), not hide the node.
                uuid, bus_id, name = f"GPU-UNREADABLE-{self.node}-{index}", "", ""
                self._enumeration_errors[uuid] = err
            else:
                handles[uuid] = handle
            gpus.append(GpuInfo(uuid, index, bus_id, name))
        return handles, gpus

    def _register_xid_events(self) -> Any:
        nvml = self._nvml
        try:
            event_set = nvml.nvmlEventSetCreate()
        except Exception as err:
            self._event_errors = {gpu.uuid: str(err) for gpu in self._gpus}
            return None
        for uuid, handle in self._handles.items():
            try:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
            except Exception as err:  # e.g. Not Supported on some boards: keep the others
                self._event_errors[uuid] = str(err)
        return event_set

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    def read(self, gpu: GpuInfo) -> GpuReading:
        probe = _Probe(self._nvml)
        handle = self._handles.get(gpu.uuid)
        if gpu.uuid in self._enumeration_errors:
            probe.fail("enumeration", self._enumeration_errors[gpu.uuid])
        elif handle is None:
            handle = probe.call("handle", self._nvml.nvmlDeviceGetHandleByUUID, gpu.uuid)
        if gpu.uuid in self._event_errors:
            probe.errors["xid_events"] = self._event_errors[gpu.uuid]
        if handle is not None:
            self._read_fields(probe, handle)
            self._read_remap(probe, handle)
            self._read_sensors(probe, handle)
        return GpuReading(
            uuid=gpu.uuid,
            index=gpu.index,
            node=self.node,
            xids=self._inbox.take(gpu.uuid),
            lost=probe.lost,
            errors=probe.errors,
            **probe.values,
        )

    def _read_fields(self, probe: _Probe, handle: Any) -> None:
        nvml = self._nvml
        keys = [key for key, name in _FIELD_IDS.items() if hasattr(nvml, name)]
        ids = [getattr(nvml, _FIELD_IDS[key]) for key in keys]
        results = probe.call("field_values", nvml.nvmlDeviceGetFieldValues, handle, ids)
        if results is None:
            return
        for key, result in zip(keys, results, strict=False):
            if result.nvmlReturn != 0:
                probe.fail(key, nvml.NVMLError(result.nvmlReturn))
                continue
            value = getattr(result.value, _VALUE_MEMBERS.get(result.valueType, "ullVal"))
            probe.values[key] = bool(value) if key == "retired_pages_pending" else int(value)

    def _read_remap(self, probe: _Probe, handle: Any) -> None:
        rows = probe.call("row_remap", self._nvml.nvmlDeviceGetRemappedRows, handle)
        if rows is not None:
            correctable, uncorrectable, pending, failure = rows
            probe.values.update(
                remap_correctable=int(correctable),
                remap_uncorrectable=int(uncorrectable),
                remap_pending=bool(pending),
                remap_failure=bool(failure),
            )

    def _read_sensors(self, probe: _Probe, handle: Any) -> None:
        nvml = self._nvml
        mask = probe.call("throttle_reasons", self._clock_event_reasons, handle)
        if mask is not None:
            probe.values["throttle_reasons"] = frozenset(
                name for name, bit in _THROTTLE_BITS.items() if mask & bit
            )
        sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        temperature = probe.call("temperature_c", nvml.nvmlDeviceGetTemperature, handle, sensor)
        if temperature is not None:
            probe.values["temperature_c"] = int(temperature)
        power_mw = probe.call("power_w", nvml.nvmlDeviceGetPowerUsage, handle)
        if power_mw is not None:
            probe.values["power_w"] = power_mw / 1000.0

    def _clock_event_reasons(self, handle: Any) -> int:
        nvml = self._nvml
        try:
            return int(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
        except nvml.NVMLError as err:
            # Drivers before r535 only know the older name of the same call.
            if err.value != nvml.NVML_ERROR_FUNCTION_NOT_FOUND:
                raise
            return int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    def wait_xid(self, timeout_ms: int) -> list[XidEvent]:
        """Block up to `timeout_ms` for XID events; returns at once when one arrives."""
        if self._event_set is None:
            time.sleep(timeout_ms / 1000)
            return []
        events: list[XidEvent] = []
        wait_ms = timeout_ms
        # After the first event, drain what is queued without waiting again.
        while len(events) < 64:
            data = self._next_event(wait_ms)
            if data is None:
                break
            events.append(self._to_event(data))
            wait_ms = 0
        return events

    def _next_event(self, wait_ms: int) -> Any:
        nvml = self._nvml
        started = time.monotonic()
        try:
            return nvml.nvmlEventSetWait_v2(self._event_set, wait_ms)
        except nvml.NVMLError as err:
            if err.value != nvml.NVML_ERROR_TIMEOUT:
                # A lost GPU fails the wait at once; the polls report it. Don't spin meanwhile.
                left_s = wait_ms / 1000 - (time.monotonic() - started)
                time.sleep(max(0.0, left_s))
            return None

    def _to_event(self, data: Any) -> XidEvent:
        try:
            uuid = _text(self._nvml.nvmlDeviceGetUUID(data.device))
        except Exception:  # the device may be the one that just fell off the bus
            uuid = "unknown"
        index = next((gpu.index for gpu in self._gpus if gpu.uuid == uuid), None)
        xid = int(data.eventData)
        self._inbox.add(uuid, xid)
        return XidEvent(uuid, index, xid)

    def close(self) -> None:
        """Free the event set and shut NVML down; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._event_set is not None:
                self._nvml.nvmlEventSetFree(self._event_set)
        finally:
            self._nvml.nvmlShutdown()


def _import_pynvml() -> Any:
    try:
        return importlib.import_module("pynvml")
    except ImportError as err:
        raise GpuSourceError("pynvml is not installed (pip install nvidia-ml-py)") from err


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


_SIM_NAMESPACE = uuidlib.UUID("5b0c6a0e-3f0a-4c7e-9a53-6d617264756b")


def simulated_gpu_uuid(node: str, index: int) -> str:
    """A stable UUID for simulated GPU `index` of `node`, the same on every run."""
    return f"GPU-SIM-{uuidlib.uuid5(_SIM_NAMESPACE, f'{node}/{index}')}"


# XIDs after which a GPU is gone from the bus: NVML answers GPU_IS_LOST to every later call
# until the GPU is reset (`nvidia-smi -r`) or the node rebooted.
FALLEN_OFF_BUS_XIDS = frozenset({79})


class SimulatedGpuSource:
    """`count` healthy GPUs that exist only in memory, for clusters and tests without NVML.

    `inject_xid` feeds the same path a real XID takes (the next `wait_xid`, then the next
    `read`), so the verdict comes from `FaultPolicy.evaluate` as it would for real hardware.
    After XID 79 the GPU stays lost, as a real one does, until `reset` (a drill's stand-in for
    `nvidia-smi -r`) or a new source (the agent restarted: the node rebooted).
    """

    def __init__(self, node: str, count: int) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.node = node
        self._gpus = [
            GpuInfo(
                simulated_gpu_uuid(node, i), i, f"00000000:{0x18 + i:02X}:00.0", "Simulated GPU"
            )
            for i in range(count)
        ]
        self._inbox = _XidInbox()
        self._events: list[XidEvent] = []
        self._ready = threading.Condition()
        self._faults: dict[int, dict[str, Any]] = {}
        self._lost: set[int] = set()

    def gpus(self) -> list[GpuInfo]:
        return list(self._gpus)

    def inject_xid(self, index: int, xid: int) -> None:
        """Report XID `xid` on GPU `index`, as the driver would."""
        gpu = self._gpus[index]
        self._inbox.add(gpu.uuid, xid)
        if xid in FALLEN_OFF_BUS_XIDS:
            self._lost.add(index)
        with self._ready:
            self._events.append(XidEvent(gpu.uuid, index, xid))
            self._ready.notify_all()

    def reset(self, index: int) -> None:
        """Reset GPU `index`: back on the bus, no pending XID, no fault set on it."""
        gpu = self._gpus[index]
        self._lost.discard(index)
        self._faults.pop(index, None)
        self._inbox.take(gpu.uuid)

    def set_fault(self, index: int, **fields: Any) -> None:
        """Make every later reading of GPU `index` carry `fields` (e.g. `lost=True`)."""
        self._gpus[index]  # an IndexError here beats a fault that never shows up
        self._faults.setdefault(index, {}).update(fields)

    def clear_faults(self, index: int) -> None:
        self._faults.pop(index, None)

    def read(self, gpu: GpuInfo) -> GpuReading:
        xids = self._inbox.take(gpu.uuid)
        if gpu.index in self._lost:  # what NVML answers for a GPU off the bus: nothing read
            reading = GpuReading(uuid=gpu.uuid, index=gpu.index, node=self.node, xids=xids,
                                 lost=True,
                                 errors={"handle": "GPU is lost (simulated, after XID 79)"})
        else:
            reading = GpuReading(
                uuid=gpu.uuid,
                index=gpu.index,
                node=self.node,
                xids=xids,
                ecc_dbe_volatile=0,
                ecc_dbe_aggregate=0,
                ecc_sbe_volatile=0,
                ecc_sbe_aggregate=0,
                remap_correctable=0,
                remap_uncorrectable=0,
                recovery_action=0,
                temperature_c=40,
                power_w=80.0,
            )
        return replace(reading, **self._faults.get(gpu.index, {}))

    def wait_xid(self, timeout_ms: int) -> list[XidEvent]:
        with self._ready:
            self._ready.wait_for(lambda: bool(self._events), timeout=timeout_ms / 1000)
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        with self._ready:
            self._ready.notify_all()


def _build_source(factory: Callable[[], GpuSource], result: Future[GpuSource]) -> None:
    """Run `factory` for `NvmlRunner.open`; a source nobody waits for any more is closed."""
    try:
        source = factory()
    except BaseException as exc:  # handed to the waiter, which re-raises it
        with contextlib.suppress(InvalidStateError):  # unless it gave up waiting
            result.set_exception(exc)
        return
    try:
        result.set_result(source)
    except InvalidStateError:  # the waiter gave up (timeout); release NVML again
        log.warning("NVML init answered after its time limit; closing it")
        source.close()


class NvmlRunner:
    """Makes `GpuSource` calls off the event loop, each with a time limit.

    Polls and enumeration share one thread named "nvml"; the XID wait, which blocks by
    design, has its own ("nvml-events") so it never delays a poll. A call that overruns its
    limit keeps its thread; later polls then answer "busy" at once instead of queueing
    behind it, so a hung driver costs one thread, not an ever-growing backlog.
    """

    def __init__(
        self, source: GpuSource, *, call_timeout: timedelta = timedelta(seconds=5)
    ) -> None:
        self.source = source
        self.call_timeout = call_timeout
        self._polls = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._events = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml-events")
        self._pending: Future[Any] | None = None

    @classmethod
    async def open(
        cls, factory: Callable[[], GpuSource], *, call_timeout: timedelta = timedelta(seconds=5)
    ) -> NvmlRunner:
        """Build the source (nvmlInit and enumeration block too) in a thread, with a limit.

        The thread is a daemon thread of its own, not an executor's: leaving a `with
        ThreadPoolExecutor` joins its threads, so a hung nvmlInit would hold the caller past
        the limit. On timeout the thread is abandoned; a source it builds later is closed.
        """
        result: Future[GpuSource] = Future()
        threading.Thread(target=_build_source, args=(factory, result), name="nvml-init",
                         daemon=True).start()
        try:
            source = await asyncio.wait_for(asyncio.wrap_future(result),
                                            call_timeout.total_seconds())
        except TimeoutError as err:
            raise GpuSourceTimeout(f"NVML init took over {call_timeout}") from err
        return cls(source, call_timeout=call_timeout)

    async def gpus(self) -> list[GpuInfo]:
        """The GPUs of the source; raises `GpuSourceTimeout` when NVML does not answer."""
        try:
            return await self._call(self.source.gpus)
        except TimeoutError as err:
            raise GpuSourceTimeout(f"NVML enumeration took over {self.call_timeout}") from err

    async def read(self, gpu: GpuInfo) -> GpuReading:
        """One health poll; a hung or busy NVML gives a reading marked `timed_out`."""
        try:
            return await self._call(self.source.read, gpu)
        except TimeoutError as err:
            detail = str(err) or f"no answer within {self.call_timeout.total_seconds():g} s"
            return GpuReading(
                uuid=gpu.uuid,
                index=gpu.index,
                node=self.source.node,
                timed_out=True,
                errors={"read": detail},
            )

    async def wait_xid(self, timeout_ms: int) -> list[XidEvent]:
        """XID events within `timeout_ms`; an overrunning wait counts as no events."""
        loop = asyncio.get_running_loop()
        limit_s = timeout_ms / 1000 + self.call_timeout.total_seconds()
        future = loop.run_in_executor(self._events, self.source.wait_xid, timeout_ms)
        try:
            return await asyncio.wait_for(future, limit_s)
        except TimeoutError:
            return []

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._pending is not None and not self._pending.done():
            raise TimeoutError("NVML still busy with an earlier call that did not return")
        future = self._polls.submit(fn, *args)
        self._pending = future
        # On timeout the thread keeps running; `_pending` remembers it (see the class doc).
        return await asyncio.wait_for(
            asyncio.wrap_future(future), self.call_timeout.total_seconds()
        )

    async def aclose(self) -> None:
        """Close the source once the XID wait has returned, then let the threads go.

        The close runs on the event thread because freeing the event set under a blocked
        nvmlEventSetWait is undefined; a hung poll thread is abandoned, not waited for.
        """
        closing = self._events.submit(self.source.close)
        self._events.shutdown(wait=False)
        self._polls.shutdown(wait=False, cancel_futures=True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.wrap_future(closing), self.call_timeout.total_seconds())
