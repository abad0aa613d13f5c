"""Node health beyond the GPU: network ports and shared filesystems, judged like GPUs.

A flapping InfiniBand port or a hung shared filesystem fails training as surely as a dead GPU.
`PortReading` is one reading of a port's sysfs files (InfiniBand: ``state``, ``phys_state``,
error counters; Ethernet: ``operstate``, ``carrier_changes``, error statistics) and
`MountReading` one bounded probe of a mount point, as plain values. `NodeHealthPolicy` turns
them into a `GpuVerdict` with the same actions as a GPU's (``none``, ``watch``,
``drain_node``), so that the controller's one decision path treats a sick port like a GPU
that calls for a drain. Counters are judged by how much they grew within a window, from the
readings the watcher keeps (`prune` bounds them); nothing here reads a file or a clock.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from marduk_slurm.domain.gpu_health import GpuAction, GpuVerdict
from marduk_slurm.domain.messages import printable


class Component(enum.StrEnum):
    PORT = "port"
    MOUNT = "mount"


# The actions a port or mount verdict may carry: a port cannot be reset like a GPU, and a
# job fault is no node's.
NODE_ACTIONS: Final = (GpuAction.NONE, GpuAction.WATCH, GpuAction.DRAIN_NODE)

# InfiniBand error counters (``ports/<n>/counters/<name>``) that mean a sick link; link_downed
# is judged apart, as flapping. Ethernet: ``statistics/<name>``.
IB_ERROR_COUNTERS: Final = ("symbol_error", "link_error_recovery", "port_rcv_errors",
                            "port_rcv_remote_physical_errors", "local_link_integrity_errors",
                            "excessive_buffer_overrun_errors")
NET_ERROR_COUNTERS: Final = ("rx_errors", "tx_errors")
IB_FLAP_COUNTER: Final = "link_downed"

# Ethernet operstate values that mean "no link"; others than "up" and these are watched.
NET_DOWN_STATES: Final = frozenset({"down", "lowerlayerdown", "notpresent"})

# errno names of a probe that mean "this node cannot use this filesystem" (drain); any other
# failure (full, quota, permissions: the site's, not the node's) is watched.
MOUNT_DRAIN_ERRNOS: Final = frozenset({
    "EIO", "ESTALE", "ENOTCONN", "EHOSTDOWN", "EHOSTUNREACH", "ETIMEDOUT", "ENODEV", "ENXIO",
    "EROFS", "ENOENT", "ECONNREFUSED", "ECONNRESET", "ENETUNREACH", "ESHUTDOWN", "EREMOTEIO"})


def is_ib_port(target: str) -> bool:
    """InfiniBand ports are named DEVICE/PORT (mlx5_0/1); Ethernet ports by interface name."""
    return "/" in target


@dataclass(frozen=True)
class PortReading:
    """One reading of one port. `ts` is a monotonic time in seconds. A value that could not be
    read is None, and why is in `errors` (file -> reason)."""

    target: str
    ts: float
    present: bool = True
    state: str | None = None  # IB: ACTIVE, DOWN, INIT, ARMED; Ethernet: operstate (up, down)
    phys_state: str | None = None  # IB only: LinkUp, Polling, Disabled, ...
    flaps: int | None = None  # IB: link_downed; Ethernet: carrier_changes
    counters: Mapping[str, int] = field(default_factory=dict)  # error counters by name
    errors: Mapping[str, str] = field(default_factory=dict)


class ProbeOutcome(enum.StrEnum):
    OK = "ok"
    FAILED = "failed"  # the probe raised (errno in `errno_name`)
    NOT_MOUNTED = "not_mounted"  # the path is there but no filesystem is mounted on it
    TIMED_OUT = "timed_out"  # the probe did not finish within its time limit
    HUNG = "hung"  # the previous probe is still running: none was started


@dataclass(frozen=True)
class MountReading:
    path: str
    outcome: ProbeOutcome
    elapsed_s: float | None = None  # how long the probe took (or has been running)
    write: bool = True  # a write probe (stat, write, fsync, unlink) or a stat probe
    errno_name: str = ""
    error: str = ""


@dataclass(frozen=True)
class _Finding:
    action: GpuAction
    code: str  # stable across readings: what `changed` compares, with the action
    reason: str


@dataclass(frozen=True)
class NodeHealthPolicy:
    """Thresholds that turn port and mount readings into verdicts (agent.* settings)."""

    window_s: float = 300.0  # counters are judged by their growth within this window
    flap_changes: int = 3  # link losses (carrier changes, link_downed) in the window: drain
    error_watch: int = 10  # error counter increments in the window: watch
    error_drain: int = 1000  # ... drain (0: never)
    mount_slow_s: float = 2.0  # a probe that took longer is watched

    def judge_port(self, history: Sequence[PortReading], *, seen_before: bool = True
                   ) -> GpuVerdict:
        """The verdict of a port from its readings within the window, oldest first (the last
        is the current one). A port never seen since the agent started is at most watched:
        a typo in the configuration must not drain every node."""
        now = history[-1]
        findings = _port_state_findings(now, seen_before)
        flaps = _growth([r.flaps for r in history])
        if flaps >= self.flap_changes:
            findings.append(_Finding(GpuAction.DRAIN_NODE, "flapping",
                                     f"port {now.target} flapping: link lost {flaps} times in "
                                     f"{self.window_s:g} s"))
        elif flaps:
            findings.append(_Finding(GpuAction.WATCH, "link_lost",
                                     f"port {now.target}: link lost {flaps} times in "
                                     f"{self.window_s:g} s"))
        growth = {name: _growth([r.counters.get(name) for r in history])
                  for name in sorted(now.counters)}
        errors = sum(growth.values())
        if self.error_drain and errors >= self.error_drain:
            findings.append(_Finding(GpuAction.DRAIN_NODE, "errors", _errors_text(
                now.target, growth, self.window_s)))
        elif errors >= self.error_watch:
            findings.append(_Finding(GpuAction.WATCH, "errors", _errors_text(
                now.target, growth, self.window_s)))
        if now.errors:
            findings.append(_Finding(GpuAction.WATCH, "unreadable",
                                     f"port {now.target}: cannot read "
                                     f"{', '.join(sorted(now.errors))}"))
        evidence = {"component": Component.PORT.value, "target": now.target,
                    "present": now.present, "state": now.state, "phys_state": now.phys_state,
                    "flaps": now.flaps, "flaps_in_window": flaps,
                    "counters": dict(now.counters), "growth_in_window": growth,
                    "window_s": self.window_s, "readings_in_window": len(history),
                    "errors": dict(now.errors)}
        return _verdict(findings, evidence, f"port {now.target} healthy")

    def judge_mount(self, reading: MountReading, *, seen_before: bool = True) -> GpuVerdict:
        """The verdict of one probe. A hung or failing filesystem drains; one not found or
        not mounted drains only once it was seen healthy (a typo is watched, see judge_port)."""
        findings = _mount_findings(reading, self.mount_slow_s, seen_before)
        evidence = {"component": Component.MOUNT.value, "target": reading.path,
                    "outcome": reading.outcome.value, "probe": "write" if reading.write
                    else "stat", "elapsed_s": None if reading.elapsed_s is None
                    else round(reading.elapsed_s, 3), "errno": reading.errno_name,
                    "error": reading.error}
        return _verdict(findings, evidence, f"mount {reading.path} healthy")


def _port_state_findings(now: PortReading, seen_before: bool) -> list[_Finding]:
    if not now.present:
        action = GpuAction.DRAIN_NODE if seen_before else GpuAction.WATCH
        why = "gone" if seen_before else "not found (check the agent's port settings)"
        return [_Finding(action, "missing", f"port {now.target} {why}")]
    out = []
    if is_ib_port(now.target):
        if now.state is not None and now.state.upper() != "ACTIVE":
            out.append(_Finding(GpuAction.DRAIN_NODE, "state",
                                f"port {now.target} state {now.state} (not ACTIVE)"))
        if now.phys_state is not None and now.phys_state.lower() != "linkup":
            out.append(_Finding(GpuAction.DRAIN_NODE, "phys_state",
                                f"port {now.target} physical state {now.phys_state} "
                                "(not LinkUp)"))
    elif now.state is not None and now.state.lower() != "up":
        down = now.state.lower() in NET_DOWN_STATES
        out.append(_Finding(GpuAction.DRAIN_NODE if down else GpuAction.WATCH, "state",
                            f"port {now.target} operstate {now.state}"))
    return out


def _mount_findings(r: MountReading, slow_s: float, seen_before: bool) -> list[_Finding]:
    where = f"mount {r.path}"
    took = "" if r.elapsed_s is None else f" for {r.elapsed_s:.1f} s"
    if r.outcome is ProbeOutcome.TIMED_OUT:
        return [_Finding(GpuAction.DRAIN_NODE, "hung", f"{where}: probe hung{took}")]
    if r.outcome is ProbeOutcome.HUNG:
        return [_Finding(GpuAction.DRAIN_NODE, "hung", f"{where}: probe still hung{took}")]
    if r.outcome is ProbeOutcome.NOT_MOUNTED or (r.outcome is ProbeOutcome.FAILED
                                                  and r.errno_name == "ENOENT"):
        action = GpuAction.DRAIN_NODE if seen_before else GpuAction.WATCH
        what = "not mounted" if r.outcome is ProbeOutcome.NOT_MOUNTED else "not found"
        return [_Finding(action, "not_mounted", f"{where}: {what}")]
    if r.outcome is ProbeOutcome.FAILED:
        action = (GpuAction.DRAIN_NODE if r.errno_name in MOUNT_DRAIN_ERRNOS
                  else GpuAction.WATCH)
        detail = r.errno_name or "error"
        return [_Finding(action, f"failed:{detail}",
                         f"{where}: probe failed: {r.error or detail}")]
    if r.elapsed_s is not None and r.elapsed_s > slow_s:
        return [_Finding(GpuAction.WATCH, "slow", f"{where}: probe slow ({r.elapsed_s:.1f} s)")]
    return []


def _verdict(findings: list[_Finding], evidence: dict[str, Any], healthy: str) -> GpuVerdict:
    evidence["findings"] = [{"action": f.action.value, "code": f.code, "reason": f.reason}
                            for f in findings]
    if not findings:
        return GpuVerdict(GpuAction.NONE, healthy, evidence)
    worst = max(findings, key=lambda f: f.action.severity)  # the first of equals
    return GpuVerdict(worst.action, worst.reason, evidence)


def _errors_text(target: str, growth: Mapping[str, int], window_s: float) -> str:
    grew = ", ".join(f"{name} +{n}" for name, n in growth.items() if n)
    return f"port {target}: error counters rose in {window_s:g} s ({grew})"


def _growth(values: Sequence[int | None]) -> int:
    """How much a counter grew over successive readings. A drop is a reset (a driver reload,
    a counter cleared): the growth across it is not known, and counted as none."""
    total, last = 0, None
    for value in values:
        if value is None:
            continue
        if last is not None and value > last:
            total += value - last
        last = value
    return total


def prune(history: Sequence[PortReading], now: float, window_s: float) -> list[PortReading]:
    """The readings a verdict needs at `now`: those within the window (and at most 10,000,
    whatever the clock does)."""
    return [r for r in history if now - r.ts <= window_s][-10_000:]


def changed(old: GpuVerdict | None, new: GpuVerdict) -> bool:
    """Whether `new` is news after `old`: another action or other findings. Counts that move
    within one finding (errors still rising) are not, or a sick port would flood the history."""
    if old is None:
        return True
    return old.action is not new.action or _codes(old) != _codes(new)


def _codes(verdict: GpuVerdict) -> list[str]:
    return [f.get("code", "") for f in verdict.evidence.get("findings", [])]


# -- drills ----------------------------------------------------------------------------------

PORT_FAULTS: Final = ("down", "flap", "errors")
MOUNT_FAULTS: Final = ("hang", "fail")


def injected_port(last: PortReading, fault: str, policy: NodeHealthPolicy
                  ) -> list[PortReading]:
    """The readings that `fault` on a port would make after `last`: a drill is judged by the
    same code as a real fault."""
    after = dataclasses.replace(last, ts=last.ts + 0.001, errors={})
    if fault == "down":
        after = dataclasses.replace(after, state="DOWN" if is_ib_port(last.target) else "down",
                                    phys_state="Disabled" if is_ib_port(last.target) else None)
    elif fault == "flap":
        after = dataclasses.replace(after, flaps=(last.flaps or 0) + policy.flap_changes)
    elif fault == "errors":
        name = IB_ERROR_COUNTERS[0] if is_ib_port(last.target) else NET_ERROR_COUNTERS[0]
        bump = policy.error_drain or policy.error_watch
        after = dataclasses.replace(after, counters={
            **last.counters, name: last.counters.get(name, 0) + bump})
    else:
        raise ValueError(f"unknown port fault {fault!r} (known: {', '.join(PORT_FAULTS)})")
    return [last, after]


def injected_mount(path: str, fault: str, timeout_s: float, write: bool) -> MountReading:
    if fault == "hang":
        return MountReading(path, ProbeOutcome.TIMED_OUT, timeout_s, write)
    if fault == "fail":
        return MountReading(path, ProbeOutcome.FAILED, 0.0, write, "EIO",
                            "[Errno 5] Input/output error (injected)")
    raise ValueError(f"unknown mount fault {fault!r} (known: {', '.join(MOUNT_FAULTS)})")


def node_inject_target(args: dict[str, Any]) -> tuple[str, str, str] | None:
    """(component, target, fault) of a port or mount drill; None for a GPU drill."""
    port, mount, fault = args.get("port"), args.get("mount"), args.get("fault")
    if port is None and mount is None:
        return None
    if port is not None and mount is not None:
        raise ValueError("inject takes a port or a mount, not both")
    target = port if port is not None else mount
    if not isinstance(target, str) or not 0 < len(target) <= 256 or not printable(target):
        raise ValueError("inject port or mount must be a name of up to 256 printable "
                         "characters")
    known = PORT_FAULTS if port is not None else MOUNT_FAULTS
    if not isinstance(fault, str) or fault not in known:
        raise ValueError(f"inject fault must be one of {', '.join(known)}, "
                         f"got {str(fault)[:40]!r}")
    return ("port" if port is not None else "mount"), target, fault
