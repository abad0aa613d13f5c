"""GPU health: what an NVML reading means, as a value (`GpuVerdict`), never a bare bool.

`GpuReading` is one health poll of one GPU, as plain values; `FaultPolicy.evaluate` turns it
into a `GpuVerdict`. Where the driver reports its own recovery action, that field is trusted
over our XID table: the driver knows more about the fault than an error number does.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from marduk_slurm.errors import SettingsError


class GpuAction(enum.StrEnum):
    """What should happen about a GPU, in increasing severity."""

    NONE = "none"
    WATCH = "watch"
    RESTART_APP = "restart_app"  # a job fault, not a node fault
    RESET_GPU = "reset_gpu"
    DRAIN_NODE = "drain_node"

    @property
    def severity(self) -> int:
        return list(GpuAction).index(self)


@dataclass(frozen=True)
class GpuVerdict:
    """The health of one GPU: the action it calls for, why, and the evidence behind it."""

    action: GpuAction
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


# NVML's nvmlGpuRecoveryAction_t values (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION).
RECOVERY_ACTION_NAMES: Mapping[int, str] = {
    0: "none",
    1: "gpu reset",
    2: "node reboot",
    3: "drain p2p",
    4: "drain and reset",
    5: "recover imex domain",
    6: "bus reset",
    7: "system reboot",
}

# NVML error strings that mean "this GPU or driver cannot tell", not "this GPU is unwell".
BENIGN_NVML_ERRORS = frozenset({"Not Supported", "Insufficient Permissions", "Function Not Found"})

# Clock-event reasons that mean the GPU is too hot or power-limited (names used in readings).
THROTTLE_REASONS = frozenset(
    {
        "sw_power_cap",
        "hw_slowdown",
        "sw_thermal_slowdown",
        "hw_thermal_slowdown",
        "hw_power_brake_slowdown",
    }
)

_XID_DESCRIPTIONS: Mapping[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    32: "invalid or corrupted push buffer stream",
    38: "driver firmware error",
    43: "GPU stopped processing",
    45: "preemptive cleanup, due to previous errors",
    48: "double-bit ECC error",
    61: "internal micro-controller breakpoint/warning",
    62: "internal micro-controller halt",
    63: "ECC page retirement or row remapping recording event",
    64: "ECC page retirement or row remapping recording failure",
    68: "video decoder exception",
    69: "graphics engine class error",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    109: "context switch timeout",
    119: "GSP RPC timeout",
    120: "GSP error",
    121: "C2C link error",
    140: "unrecovered ECC error",
    143: "GPU initialization failure",
    154: "GPU recovery action changed",
}


def xid_description(xid: int) -> str:
    """A short human description of an XID error number ("unknown xid" when not in the table)."""
    return _XID_DESCRIPTIONS.get(xid, "unknown xid")


@dataclass(frozen=True)
class GpuReading:
    """One health poll of one GPU. `None` in a counter means NVML could not read it (see errors).

    `xids` are the XID errors seen since the previous reading of this GPU. `errors` maps a field
    name to the NVML error string that reading it returned ("Not Supported", "GPU is lost", ...).
    """

    uuid: str
    index: int
    node: str
    xids: tuple[int, ...] = ()
    ecc_dbe_volatile: int | None = None
    ecc_dbe_aggregate: int | None = None
    ecc_sbe_volatile: int | None = None
    ecc_sbe_aggregate: int | None = None
    retired_pages_sbe: int | None = None
    retired_pages_dbe: int | None = None
    retired_pages_pending: bool = False
    remap_correctable: int | None = None
    remap_uncorrectable: int | None = None
    remap_pending: bool = False
    remap_failure: bool = False
    recovery_action: int | None = None
    throttle_reasons: frozenset[str] = frozenset()
    temperature_c: int | None = None
    power_w: float | None = None
    lost: bool = False
    timed_out: bool = False
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Finding:
    action: GpuAction
    reason: str


def _xid_set(key: str, values: Iterable[int]) -> frozenset[int]:
    xids: set[int] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SettingsError(f"[policy] {key}: {value!r} is not an XID (a non-negative int)")
        xids.add(value)
    return frozenset(xids)


@dataclass(frozen=True)
class FaultPolicy:
    """The XID table and thresholds that turn a `GpuReading` into a `GpuVerdict`."""

    drain_xids: frozenset[int] = frozenset({48, 64, 74, 79, 95, 119, 120})
    reset_xids: frozenset[int] = frozenset()
    app_xids: frozenset[int] = frozenset({13, 31, 43, 94})
    ignore_xids: frozenset[int] = frozenset({63, 92})

    def __post_init__(self) -> None:
        sets = self._xid_sets()
        for i, (key_a, a) in enumerate(sets):
            for key_b, b in sets[i + 1 :]:
                if a & b:
                    raise SettingsError(
                        f"[policy] xid {sorted(a & b)} is in both {key_a} and {key_b}"
                    )

    def _xid_sets(self) -> list[tuple[str, frozenset[int]]]:
        return [
            ("drain_xids", self.drain_xids),
            ("reset_xids", self.reset_xids),
            ("app_xids", self.app_xids),
            ("ignore_xids", self.ignore_xids),
        ]

    @classmethod
    def from_settings(
        cls,
        *,
        drain_xids: Iterable[int] | None = None,
        app_xids: Iterable[int] | None = None,
        ignore_xids: Iterable[int] | None = None,
        reset_xids: Iterable[int] | None = None,
    ) -> FaultPolicy:
        """Build a policy from the `[policy]` settings; a key left out keeps its default.

        An XID listed in a key moves out of the defaults of the keys not given, so
        `drain_xids=[13]` alone makes 13 drain. Two given keys naming one XID is an error.
        """
        given = {
            key: _xid_set(key, values)
            for key, values in [
                ("drain_xids", drain_xids),
                ("reset_xids", reset_xids),
                ("app_xids", app_xids),
                ("ignore_xids", ignore_xids),
            ]
            if values is not None
        }
        claimed: frozenset[int] = frozenset().union(*given.values())
        defaults = cls()
        resolved = {key: given.get(key, default - claimed) for key, default in defaults._xid_sets()}
        return cls(**resolved)

    def xid_action(self, xid: int) -> GpuAction:
        """The action one XID calls for on its own; unknown XIDs are watched."""
        if xid in self.drain_xids:
            return GpuAction.DRAIN_NODE
        if xid in self.reset_xids:
            return GpuAction.RESET_GPU
        if xid in self.app_xids:
            return GpuAction.RESTART_APP
        if xid in self.ignore_xids:
            return GpuAction.NONE
        return GpuAction.WATCH

    def evaluate(self, reading: GpuReading) -> GpuVerdict:
        """The most severe action the reading calls for, with its reason and all the evidence."""
        findings = self._findings(reading)
        evidence = _evidence(reading)
        evidence["findings"] = [{"action": str(f.action), "reason": f.reason} for f in findings]
        if not findings:
            return GpuVerdict(GpuAction.NONE, "healthy", evidence)
        # max() keeps the first of equals, so the order of _findings breaks ties.
        worst = max(findings, key=lambda f: f.action.severity)
        return GpuVerdict(worst.action, worst.reason, evidence)

    def _findings(self, reading: GpuReading) -> list[_Finding]:
        findings = _recovery_findings(reading)
        for xid in dict.fromkeys(reading.xids):  # dedupe, keep order
            action = self.xid_action(xid)
            suffix = " (ignored)" if action is GpuAction.NONE else ""
            findings.append(_Finding(action, f"xid {xid}: {xid_description(xid)}{suffix}"))
        # After the XID that names the cause (79: fallen off the bus), the symptom.
        if reading.lost:
            findings.append(_Finding(GpuAction.DRAIN_NODE, "GPU is lost (NVML_ERROR_GPU_IS_LOST)"))
        findings.extend(_memory_findings(reading))
        findings.extend(_watch_findings(reading))
        return findings


def _recovery_findings(reading: GpuReading) -> list[_Finding]:
    action = reading.recovery_action
    if action is None or action == 0:
        return []
    name = RECOVERY_ACTION_NAMES.get(action, f"unknown ({action})")
    # Only a plain GPU reset stays on the node; anything else, known or not, takes it out.
    verdict = GpuAction.RESET_GPU if action == 1 else GpuAction.DRAIN_NODE
    return [_Finding(verdict, f"NVML recovery action: {name}")]


def _memory_findings(reading: GpuReading) -> list[_Finding]:
    findings = []
    if reading.ecc_dbe_volatile:
        findings.append(
            _Finding(
                GpuAction.DRAIN_NODE,
                f"{reading.ecc_dbe_volatile} uncorrectable (double-bit) ECC errors since boot",
            )
        )
    if reading.remap_failure:
        findings.append(_Finding(GpuAction.DRAIN_NODE, "row remapping failed"))
    if reading.remap_pending:
        findings.append(_Finding(GpuAction.RESET_GPU, "row remapping pending a GPU reset"))
    if reading.retired_pages_pending:
        findings.append(_Finding(GpuAction.RESET_GPU, "page retirement pending a GPU reset"))
    return findings


def _watch_findings(reading: GpuReading) -> list[_Finding]:
    findings = []
    throttled = sorted(reading.throttle_reasons & THROTTLE_REASONS)
    if throttled:
        findings.append(_Finding(GpuAction.WATCH, f"clocks throttled: {', '.join(throttled)}"))
    if reading.timed_out:
        detail = reading.errors.get("read", "timed out")
        findings.append(_Finding(GpuAction.WATCH, f"NVML did not answer: {detail}"))
    failed = sorted(
        key
        for key, error in reading.errors.items()
        if error not in BENIGN_NVML_ERRORS and not (reading.timed_out and key == "read")
    )
    if failed and not reading.lost:
        findings.append(_Finding(GpuAction.WATCH, f"NVML errors reading {', '.join(failed)}"))
    return findings


def _evidence(reading: GpuReading) -> dict[str, Any]:
    """A JSON-ready summary of the reading, attached to every verdict."""
    action = reading.recovery_action
    return {
        "gpu": reading.uuid,
        "index": reading.index,
        "node": reading.node,
        "xids": list(reading.xids),
        "ecc": {
            "dbe_volatile": reading.ecc_dbe_volatile,
            "dbe_aggregate": reading.ecc_dbe_aggregate,
            "sbe_volatile": reading.ecc_sbe_volatile,
            "sbe_aggregate": reading.ecc_sbe_aggregate,
        },
        "retired_pages": {
            "sbe": reading.retired_pages_sbe,
            "dbe": reading.retired_pages_dbe,
            "pending": reading.retired_pages_pending,
        },
        "row_remap": {
            "correctable": reading.remap_correctable,
            "uncorrectable": reading.remap_uncorrectable,
            "pending": reading.remap_pending,
            "failure": reading.remap_failure,
        },
        "recovery_action": action,
        "recovery_action_name": None if action is None else RECOVERY_ACTION_NAMES.get(action),
        "throttle_reasons": sorted(reading.throttle_reasons),
        "temperature_c": reading.temperature_c,
        "power_w": reading.power_w,
        "lost": reading.lost,
        "timed_out": reading.timed_out,
        "errors": dict(reading.errors),
    }


def verdict_changed(old: GpuVerdict | None, new: GpuVerdict) -> bool:
    """Whether `new` is worth publishing after `old` was.

    A change of action or reason is news; so is any fresh XID, because XIDs are events: the
    same "xid 13" twice in a row means the job faulted twice. Drifting temperatures are not.
    """
    if old is None:
        return True
    if old.action is not new.action or old.reason != new.reason:
        return True
    return bool(new.evidence.get("xids"))
