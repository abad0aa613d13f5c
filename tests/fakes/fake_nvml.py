"""A stand-in for the `pynvml` module (the NVML library), for tests on machines without GPUs.

It is NOT NVML: it models only what `marduk_slurm.adapters.nvml` calls, with the same names,
constants and error classes as pynvml (nvidia-ml-py), so the adapter cannot tell the
difference. Each `FakeGpu` says how its device behaves: counters, NVML error codes per field,
lost (every call raises NVMLError_GpuIsLost), unsupported functions, or a hang (calls block
until the test releases them); `init_hang` wedges nvmlInit itself. XID events are queued
with `emit_xid`.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_FI_DEV_ECC_SBE_VOL_TOTAL = 3
NVML_FI_DEV_ECC_DBE_VOL_TOTAL = 4
NVML_FI_DEV_ECC_SBE_AGG_TOTAL = 5
NVML_FI_DEV_ECC_DBE_AGG_TOTAL = 6
NVML_FI_DEV_RETIRED_SBE = 29
NVML_FI_DEV_RETIRED_DBE = 30
NVML_FI_DEV_RETIRED_PENDING = 31
NVML_FI_DEV_GET_GPU_RECOVERY_ACTION = 230

NVML_VALUE_TYPE_UNSIGNED_INT = 1
NVML_VALUE_TYPE_UNSIGNED_LONG_LONG = 3
NVML_TEMPERATURE_GPU = 0
nvmlEventTypeXidCriticalError = 0x8

nvmlClocksEventReasonGpuIdle = 0x01
nvmlClocksEventReasonSwPowerCap = 0x04
nvmlClocksEventReasonHwThermalSlowdown = 0x40

_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """Like pynvml's: `value` is the NVML return code, str() its message."""

    code = NVML_ERROR_UNKNOWN

    def __init__(self, value: int | None = None) -> None:
        self.value = self.code if value is None else value
        super().__init__(self.value)

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML Error with code {self.value}")


# pynvml generates one subclass per error code; these are the ones the tests raise.
class NVMLError_NotSupported(NVMLError):
    code = NVML_ERROR_NOT_SUPPORTED


class NVMLError_DriverNotLoaded(NVMLError):
    code = NVML_ERROR_DRIVER_NOT_LOADED


class NVMLError_Timeout(NVMLError):
    code = NVML_ERROR_TIMEOUT


class NVMLError_GpuIsLost(NVMLError):
    code = NVML_ERROR_GPU_IS_LOST


class NVMLError_Unknown(NVMLError):
    code = NVML_ERROR_UNKNOWN


@dataclass
class FakeGpu:
    """One simulated device. `fields` maps an NVML field id to a value, or to an NVMLError
    instance for a per-field failure; a field id left out answers Not Supported."""

    uuid: str
    name: str = "NVIDIA H100 80GB HBM3"
    bus_id: str = "00000000:18:00.0"
    fields: dict[int, int | NVMLError] = field(
        default_factory=lambda: {
            NVML_FI_DEV_ECC_SBE_VOL_TOTAL: 0,
            NVML_FI_DEV_ECC_DBE_VOL_TOTAL: 0,
            NVML_FI_DEV_ECC_SBE_AGG_TOTAL: 0,
            NVML_FI_DEV_ECC_DBE_AGG_TOTAL: 0,
            NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: 0,
        }
    )
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)
    clock_reasons: int = 0
    temperature_c: int = 45
    power_mw: int = 350_000
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)  # function names that raise
    hang: threading.Event | None = None  # calls block until this is set


class FakeNvml:
    """Use an instance where the adapter expects the `pynvml` module."""

    def __init__(self, gpus: list[FakeGpu], *, init_error: int | None = None,
                 init_hang: threading.Event | None = None) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.init_hang = init_hang  # nvmlInit blocks until this is set (a wedged driver)
        self.initialized = False
        self.events: queue.Queue[tuple[int, int]] = queue.Queue()
        self.registered: set[int] = set()
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        # Constants and error classes are the module's, as in pynvml.
        try:
            return globals()[name]
        except KeyError:
            raise AttributeError(name) from None

    def emit_xid(self, index: int, xid: int) -> None:
        self.events.put((index, xid))

    def _device(self, name: str, handle: int) -> FakeGpu:
        self.calls.append(name)
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        gpu = self.gpus[handle]
        if gpu.hang is not None:
            gpu.hang.wait()
        if gpu.lost:
            raise NVMLError_GpuIsLost()
        if name in gpu.unsupported:
            raise NVMLError_NotSupported()
        return gpu

    def nvmlInit(self) -> None:
        self.calls.append("nvmlInit")
        if self.init_hang is not None:
            self.init_hang.wait()
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.calls.append("nvmlShutdown")
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> int:
        for handle, gpu in enumerate(self.gpus):
            if gpu.uuid == uuid:
                return handle
        raise NVMLError(NVML_ERROR_UNKNOWN)

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._device("nvmlDeviceGetUUID", handle).uuid

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._device("nvmlDeviceGetName", handle).name

    def nvmlDeviceGetPciInfo(self, handle: int) -> SimpleNamespace:
        # pynvml hands back the ctypes struct, whose char arrays are bytes.
        return SimpleNamespace(busId=self._device("nvmlDeviceGetPciInfo", handle).bus_id.encode())

    def nvmlDeviceGetFieldValues(self, handle: int, field_ids: list[int]) -> list[SimpleNamespace]:
        gpu = self._device("nvmlDeviceGetFieldValues", handle)
        return [self._field_value(gpu, field_id) for field_id in field_ids]

    @staticmethod
    def _field_value(gpu: FakeGpu, field_id: int) -> SimpleNamespace:
        value = gpu.fields.get(field_id, NVMLError_NotSupported())
        ret = value.value if isinstance(value, NVMLError) else NVML_SUCCESS
        number = 0 if isinstance(value, NVMLError) else value
        if field_id == NVML_FI_DEV_GET_GPU_RECOVERY_ACTION:
            return SimpleNamespace(
                fieldId=field_id,
                nvmlReturn=ret,
                valueType=NVML_VALUE_TYPE_UNSIGNED_INT,
                value=SimpleNamespace(uiVal=number),
            )
        return SimpleNamespace(
            fieldId=field_id,
            nvmlReturn=ret,
            valueType=NVML_VALUE_TYPE_UNSIGNED_LONG_LONG,
            value=SimpleNamespace(ullVal=number),
        )

    def nvmlDeviceGetRemappedRows(self, handle: int) -> tuple[int, int, int, int]:
        return self._device("nvmlDeviceGetRemappedRows", handle).remapped_rows

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: int) -> int:
        return self._device("nvmlDeviceGetCurrentClocksEventReasons", handle).clock_reasons

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._device("nvmlDeviceGetTemperature", handle).temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return self._device("nvmlDeviceGetPowerUsage", handle).power_mw

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlDeviceRegisterEvents(self, handle: int, event_types: int, event_set: str) -> None:
        self._device("nvmlDeviceRegisterEvents", handle)
        self.registered.add(handle)

    def nvmlEventSetWait_v2(self, event_set: str, timeout_ms: int) -> SimpleNamespace:
        try:
            index, xid = self.events.get(timeout=timeout_ms / 1000)
        except queue.Empty:
            raise NVMLError_Timeout() from None
        return SimpleNamespace(device=index, eventType=nvmlEventTypeXidCriticalError, eventData=xid)

    def nvmlEventSetFree(self, event_set: str) -> None:
        self.calls.append("nvmlEventSetFree")
