"""The NVML adapter against a stand-in pynvml module (tests/fakes/fake_nvml.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from marduk_slurm.adapters.nvml import (
    GpuInfo,
    GpuSourceError,
    GpuSourceTimeout,
    NvmlGpuSource,
    NvmlRunner,
    SimulatedGpuSource,
    XidEvent,
    simulated_gpu_uuid,
)
from marduk_slurm.domain.gpu_health import FaultPolicy, GpuAction, GpuReading

from fakes import fake_nvml
from fakes.fake_nvml import FakeGpu, FakeNvml

NODE = "gpu-node-01"


def two_gpus() -> list[FakeGpu]:
    return [
        FakeGpu("GPU-aaaa", bus_id="00000000:18:00.0"),
        FakeGpu("GPU-bbbb", bus_id="00000000:2A:00.0"),
    ]


@pytest.fixture
def nvml() -> FakeNvml:
    return FakeNvml(two_gpus())


@pytest.fixture
def source(nvml: FakeNvml) -> Iterator[NvmlGpuSource]:
    gpu_source = NvmlGpuSource(NODE, module=nvml)
    yield gpu_source
    gpu_source.close()


def test_enumeration_and_event_registration(nvml: FakeNvml, source: NvmlGpuSource) -> None:
    assert source.gpus() == [
        GpuInfo("GPU-aaaa", 0, "00000000:18:00.0", "NVIDIA H100 80GB HBM3"),
        GpuInfo("GPU-bbbb", 1, "00000000:2A:00.0", "NVIDIA H100 80GB HBM3"),
    ]
    assert nvml.registered == {0, 1}


def test_healthy_reading(source: NvmlGpuSource) -> None:
    reading = source.read(source.gpus()[0])
    assert (reading.uuid, reading.index, reading.node) == ("GPU-aaaa", 0, NODE)
    assert reading.ecc_dbe_volatile == 0 and reading.ecc_sbe_aggregate == 0
    assert reading.recovery_action == 0
    assert reading.remap_pending is False and reading.remap_failure is False
    assert reading.temperature_c == 45 and reading.power_w == 350.0
    assert not reading.lost
    # Retired pages are Not Supported on HBM3 boards (they remap rows instead).
    assert reading.errors == {
        "retired_pages_sbe": "Not Supported",
        "retired_pages_dbe": "Not Supported",
        "retired_pages_pending": "Not Supported",
    }
    assert FaultPolicy().evaluate(reading).action is GpuAction.NONE


def test_ecc_counters_and_row_remap(nvml: FakeNvml, source: NvmlGpuSource) -> None:
    gpu = nvml.gpus[1]
    gpu.fields[fake_nvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL] = 2
    gpu.fields[fake_nvml.NVML_FI_DEV_ECC_SBE_VOL_TOTAL] = 17
    gpu.fields[fake_nvml.NVML_FI_DEV_RETIRED_PENDING] = 1
    gpu.remapped_rows = (3, 1, 1, 0)
    gpu.clock_reasons = fake_nvml.nvmlClocksEventReasonHwThermalSlowdown
    reading = source.read(source.gpus()[1])
    assert reading.ecc_dbe_volatile == 2 and reading.ecc_sbe_volatile == 17
    assert reading.retired_pages_pending is True
    assert (reading.remap_correctable, reading.remap_uncorrectable) == (3, 1)
    assert reading.remap_pending is True and reading.remap_failure is False
    assert reading.throttle_reasons == frozenset({"hw_thermal_slowdown"})
    verdict = FaultPolicy().evaluate(reading)
    assert verdict.action is GpuAction.DRAIN_NODE
    assert verdict.reason == "2 uncorrectable (double-bit) ECC errors since boot"


def test_xid_event_reaches_wait_and_next_reading(nvml: FakeNvml, source: NvmlGpuSource) -> None:
    nvml.emit_xid(1, 79)
    nvml.emit_xid(1, 63)
    assert source.wait_xid(1000) == [XidEvent("GPU-bbbb", 1, 79), XidEvent("GPU-bbbb", 1, 63)]
    assert source.wait_xid(10) == []
    reading = source.read(source.gpus()[1])
    assert reading.xids == (79, 63)
    assert source.read(source.gpus()[1]).xids == ()  # consumed by the reading
    assert source.read(source.gpus()[0]).xids == ()
    verdict = FaultPolicy().evaluate(reading)
    assert verdict.action is GpuAction.DRAIN_NODE
    assert verdict.reason == "xid 79: GPU has fallen off the bus"


def test_lost_gpu_is_evidence_not_exception(nvml: FakeNvml, source: NvmlGpuSource) -> None:
    nvml.gpus[0].lost = True
    reading = source.read(source.gpus()[0])
    assert reading.lost is True
    assert reading.errors == {"field_values": "GPU is lost"}  # later calls are skipped
    assert FaultPolicy().evaluate(reading).action is GpuAction.DRAIN_NODE
    assert not source.read(source.gpus()[1]).lost


def test_gpu_lost_before_start_is_reported_not_hidden() -> None:
    gpus = two_gpus()
    gpus[1].lost = True
    source = NvmlGpuSource(NODE, module=FakeNvml(gpus))
    lost_gpu = source.gpus()[1]
    assert lost_gpu.index == 1 and lost_gpu.uuid == f"GPU-UNREADABLE-{NODE}-1"
    reading = source.read(lost_gpu)
    assert reading.lost and reading.errors == {"enumeration": "GPU is lost"}
    assert FaultPolicy().evaluate(reading).action is GpuAction.DRAIN_NODE
    assert not source.read(source.gpus()[0]).lost
    source.close()


def test_not_supported_fields_are_recorded(nvml: FakeNvml, source: NvmlGpuSource) -> None:
    gpu = nvml.gpus[0]
    gpu.unsupported = {"nvmlDeviceGetRemappedRows", "nvmlDeviceGetPowerUsage"}
    del gpu.fields[fake_nvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION]  # a driver without the field
    reading = source.read(source.gpus()[0])
    assert reading.recovery_action is None
    assert reading.remap_correctable is None and reading.power_w is None
    assert reading.errors["recovery_action"] == "Not Supported"
    assert reading.errors["row_remap"] == "Not Supported"
    assert reading.errors["power_w"] == "Not Supported"
    assert reading.temperature_c == 45
    assert FaultPolicy().evaluate(reading).action is GpuAction.NONE


@pytest.mark.parametrize(("value", "action"), [(0, "none"), (1, "reset_gpu"), (4, "drain_node")])
def test_recovery_action_field(nvml: FakeNvml, value: int, action: str) -> None:
    nvml.gpus[0].fields[fake_nvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION] = value
    source = NvmlGpuSource(NODE, module=nvml)
    reading = source.read(source.gpus()[0])
    source.close()
    assert reading.recovery_action == value
    assert FaultPolicy().evaluate(reading).action == action


def test_per_field_unknown_error_is_watched(nvml: FakeNvml, source: NvmlGpuSource) -> None:
    nvml.gpus[0].fields[fake_nvml.NVML_FI_DEV_ECC_DBE_VOL_TOTAL] = fake_nvml.NVMLError_Unknown()
    reading = source.read(source.gpus()[0])
    assert reading.ecc_dbe_volatile is None
    assert reading.errors["ecc_dbe_volatile"] == "Unknown Error"
    assert FaultPolicy().evaluate(reading).action is GpuAction.WATCH


def test_unsupported_xid_events_still_enumerate() -> None:
    gpus = two_gpus()
    gpus[0].unsupported = {"nvmlDeviceRegisterEvents"}
    source = NvmlGpuSource(NODE, module=FakeNvml(gpus))
    assert len(source.gpus()) == 2
    assert source.read(source.gpus()[0]).errors["xid_events"] == "Not Supported"
    assert "xid_events" not in source.read(source.gpus()[1]).errors
    source.close()


def test_no_driver_is_a_clear_error() -> None:
    nvml = FakeNvml([], init_error=fake_nvml.NVML_ERROR_DRIVER_NOT_LOADED)
    with pytest.raises(GpuSourceError, match="Driver Not Loaded"):
        NvmlGpuSource(NODE, module=nvml)


def test_close_frees_events_and_shuts_down(nvml: FakeNvml) -> None:
    source = NvmlGpuSource(NODE, module=nvml)
    source.close()
    source.close()
    assert nvml.calls.count("nvmlEventSetFree") == 1
    assert not nvml.initialized


async def test_runner_reads_in_a_named_thread(nvml: FakeNvml) -> None:
    names: list[str] = []
    source = NvmlGpuSource(NODE, module=nvml)
    read = source.read

    def spy(gpu: GpuInfo) -> GpuReading:
        names.append(threading.current_thread().name)
        return read(gpu)

    source.read = spy  # type: ignore[method-assign]
    runner = NvmlRunner(source)
    gpus = await runner.gpus()
    reading = await runner.read(gpus[0])
    assert reading.uuid == "GPU-aaaa" and not reading.timed_out
    assert names[0].startswith("nvml")
    nvml.emit_xid(0, 13)
    assert await runner.wait_xid(1000) == [XidEvent("GPU-aaaa", 0, 13)]
    await runner.aclose()
    assert not nvml.initialized


async def test_runner_time_limit_on_a_hung_call(nvml: FakeNvml) -> None:
    hang = threading.Event()
    source = NvmlGpuSource(NODE, module=nvml)
    runner = NvmlRunner(source, call_timeout=timedelta(milliseconds=100))
    gpus = await runner.gpus()
    nvml.gpus[0].hang = hang
    try:
        reading = await runner.read(gpus[0])
        assert reading.timed_out and reading.uuid == "GPU-aaaa" and reading.node == NODE
        assert reading.errors == {"read": "no answer within 0.1 s"}
        verdict = FaultPolicy().evaluate(reading)
        assert verdict.action is GpuAction.WATCH
        assert verdict.reason == "NVML did not answer: no answer within 0.1 s"
        # The hung call still holds the thread: the next poll says so at once.
        busy = await runner.read(gpus[1])
        assert busy.timed_out and "still busy" in busy.errors["read"]
    finally:
        hang.set()
    await runner.aclose()


async def test_runner_open_builds_the_source_off_the_loop(nvml: FakeNvml) -> None:
    runner = await NvmlRunner.open(lambda: NvmlGpuSource(NODE, module=nvml))
    assert [gpu.uuid for gpu in await runner.gpus()] == ["GPU-aaaa", "GPU-bbbb"]
    await runner.aclose()


def test_simulated_uuids_are_stable_and_distinct() -> None:
    first = [gpu.uuid for gpu in SimulatedGpuSource("node-a", 4).gpus()]
    again = [gpu.uuid for gpu in SimulatedGpuSource("node-a", 4).gpus()]
    other = [gpu.uuid for gpu in SimulatedGpuSource("node-b", 4).gpus()]
    assert first == again
    assert len(set(first) | set(other)) == 8
    assert first[2] == simulated_gpu_uuid("node-a", 2)
    assert all(uuid.startswith("GPU-SIM-") for uuid in first)


def test_simulated_gpus_are_healthy() -> None:
    source = SimulatedGpuSource("node-a", 2)
    for gpu in source.gpus():
        verdict = FaultPolicy().evaluate(source.read(gpu))
        assert (verdict.action, verdict.reason) == (GpuAction.NONE, "healthy")
    assert source.wait_xid(10) == []


def test_simulated_xid_79_drains_through_the_policy() -> None:
    source = SimulatedGpuSource("node-a", 8)
    gpu = source.gpus()[3]
    source.inject_xid(3, 79)
    assert source.wait_xid(1000) == [XidEvent(gpu.uuid, 3, 79)]
    verdict = FaultPolicy().evaluate(source.read(gpu))
    assert verdict.action is GpuAction.DRAIN_NODE
    assert verdict.reason == "xid 79: GPU has fallen off the bus"


def test_a_simulated_gpu_stays_lost_after_xid_79_until_reset() -> None:
    """A GPU that fell off the bus does not come back by itself: every later reading is
    lost (as NVML answers GPU_IS_LOST) until the GPU is reset; the other GPUs stay healthy."""
    source = SimulatedGpuSource("node-a", 2)
    lost, other = source.gpus()
    source.inject_xid(0, 79)
    source.read(lost)  # the reading that carries the XID
    for _ in range(3):
        reading = source.read(lost)
        assert reading.lost and reading.xids == () and reading.temperature_c is None
        verdict = FaultPolicy().evaluate(reading)
        assert (verdict.action, verdict.reason) == (GpuAction.DRAIN_NODE,
                                                    "GPU is lost (NVML_ERROR_GPU_IS_LOST)")
    assert not source.read(other).lost
    source.inject_xid(0, 79)
    source.reset(0)  # drops the pending XID too: a reset GPU starts clean
    assert FaultPolicy().evaluate(source.read(lost)).action is GpuAction.NONE
    source.inject_xid(1, 13)  # an XID that leaves the GPU on the bus
    assert FaultPolicy().evaluate(source.read(other)).action is not GpuAction.NONE
    assert not source.read(other).lost


def test_simulated_wait_wakes_on_injection() -> None:
    source = SimulatedGpuSource("node-a", 1)
    timer = threading.Timer(0.05, source.inject_xid, args=(0, 13))
    timer.start()
    events = source.wait_xid(5000)
    timer.join()
    assert [event.xid for event in events] == [13]


def test_simulated_sticky_faults() -> None:
    source = SimulatedGpuSource("node-a", 2)
    source.set_fault(1, lost=True)
    assert FaultPolicy().evaluate(source.read(source.gpus()[1])).action is GpuAction.DRAIN_NODE
    source.clear_faults(1)
    assert not source.read(source.gpus()[1]).lost
    with pytest.raises(IndexError):
        source.set_fault(5, lost=True)


async def test_runner_open_gives_up_on_a_hung_nvml_init() -> None:
    wedged = threading.Event()
    nvml = FakeNvml(two_gpus(), init_hang=wedged)
    # Should the limit not hold, the init is released after 30 s instead of hanging the
    # suite: far beyond the bound below, so the check cannot pass by a slow machine's luck.
    release = threading.Timer(30.0, wedged.set)
    release.daemon = True
    release.start()
    started = time.monotonic()
    with pytest.raises(GpuSourceTimeout, match="NVML init took over"):
        await NvmlRunner.open(lambda: NvmlGpuSource(NODE, module=nvml),
                              call_timeout=timedelta(milliseconds=200))
    assert time.monotonic() - started < 10, "open waited for the hung init thread"
    release.cancel()
    wedged.set()
    # The source built after the limit is nobody's: it is closed again.
    for _ in range(100):
        if "nvmlShutdown" in nvml.calls:
            break
        await asyncio.sleep(0.02)
    assert nvml.calls[0] == "nvmlInit" and nvml.calls[-1] == "nvmlShutdown"
    assert not nvml.initialized
