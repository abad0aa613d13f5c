"""Step reports from the SPANK plugin: one JSON object per line on the agent's Unix socket.

The plugin (C, in slurmstepd) writes lines such as::

    {"v":1,"event":"step_start","job_id":123,"step_id":0,"node":"n1","gpu_indices":[0,1],
     "pid":4242,"uid":1000}
    {"v":1,"event":"step_end","job_id":123,"step_id":0,"node":"n1","exit_status":0,
     "pid":4242,"uid":1000}

`parse_line` turns one line into a `StepReport` or raises `ProtocolError` with a short reason
that the agent counts. Unknown fields are ignored, so a newer plugin can add fields without
breaking an older agent; a wrong type or range in a known field is an error, because a guessed
job id is worse than a dropped report. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from marduk_slurm.domain import messages as m
from marduk_slurm.errors import ProtocolError

EVENTS: Final = ("step_start", "step_end")
MAX_LINE_BYTES: Final = 64 * 1024
UINT32_MAX: Final = 0xFFFFFFFF
# Slurm's step id of the batch script; a valid step like any other.
BATCH_STEP_ID: Final = m.BATCH_STEP_ID

_NODE = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


@dataclass(frozen=True)
class StepReport:
    """One validated line from the socket."""

    event: str  # "step_start" or "step_end"
    job_id: int
    step_id: int
    node: str
    gpu_indices: tuple[int, ...] = ()
    exit_status: int | None = None
    pid: int = 0
    uid: int = 0

    @property
    def key(self) -> tuple[int, int, str]:
        """What identifies a step on a node: a start and its end share it."""
        return (self.job_id, self.step_id, self.node)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _uint(obj: Mapping[str, Any], key: str, *, required: bool, top: int = UINT32_MAX) -> int:
    if key not in obj:
        if required:
            raise ProtocolError("missing_field", key)
        return 0
    value = obj[key]
    if not _is_int(value) or not 0 <= value <= top:
        raise ProtocolError("invalid_field", f"{key}={value!r} (an integer 0..{top})")
    return int(value)


def _node(obj: Mapping[str, Any], default_node: str) -> str:
    node = obj.get("node")
    if node is None or node == "":
        node = default_node
    if not isinstance(node, str) or not _NODE.match(node):
        raise ProtocolError("invalid_field", f"node={node!r}")
    return node


def _gpu_indices(obj: Mapping[str, Any]) -> tuple[int, ...]:
    value = obj.get("gpu_indices")
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > 1024:
        raise ProtocolError("invalid_field", "gpu_indices must be a list of GPU indices")
    if not all(_is_int(i) and 0 <= i <= UINT32_MAX for i in value):
        raise ProtocolError("invalid_field", f"gpu_indices={value!r}")
    return tuple(dict.fromkeys(value))  # dedupe, keep the plugin's order


def _exit_status(obj: Mapping[str, Any]) -> int | None:
    value = obj.get("exit_status")
    if value is None:
        return None
    if not _is_int(value) or not -(2**31) <= value <= UINT32_MAX:
        raise ProtocolError("invalid_field", f"exit_status={value!r}")
    return int(value)


def _load(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError("too_long", f"{len(line)} bytes (limit {MAX_LINE_BYTES})")
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError("malformed_json", str(exc)[:200]) from None
    if not isinstance(obj, dict):
        raise ProtocolError("malformed_json", f"expected an object, got {type(obj).__name__}")
    return obj


def parse_line(line: bytes, default_node: str) -> StepReport:
    """Validate one socket line. A missing or empty "node" means the agent's own node."""
    obj = _load(line)
    version = obj.get("v", m.PROTOCOL_VERSION)
    if not _is_int(version) or version != m.PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"v={version!r}, this agent speaks v1")
    event = obj.get("event")
    if event not in EVENTS:
        raise ProtocolError("unknown_event", f"event={event!r} (valid: {', '.join(EVENTS)})")
    return StepReport(
        event=event,
        job_id=_uint(obj, "job_id", required=True),
        step_id=_uint(obj, "step_id", required=True),
        node=_node(obj, default_node),
        gpu_indices=_gpu_indices(obj) if event == "step_start" else (),
        exit_status=_exit_status(obj) if event == "step_end" else None,
        pid=_uint(obj, "pid", required=False, top=2**31 - 1),
        uid=_uint(obj, "uid", required=False),
    )


def resolve_gpus(
    indices: Sequence[int], inventory: Mapping[int, str]
) -> tuple[list[str], list[int]]:
    """GPU indices to UUIDs through the agent's inventory: (uuids, indices not found)."""
    uuids = [inventory[i] for i in indices if i in inventory]
    missing = [i for i in indices if i not in inventory]
    return uuids, missing


def to_message(report: StepReport, gpu_uuids: Sequence[str], ts: float) -> m.StepStart | m.StepEnd:
    """The durable message the agent publishes for a report."""
    if report.event == "step_start":
        return m.StepStart(
            job_id=report.job_id,
            step_id=report.step_id,
            node=report.node,
            gpu_indices=list(report.gpu_indices),
            gpu_uuids=list(gpu_uuids),
            pid=report.pid,
            uid=report.uid,
            ts=ts,
        )
    return m.StepEnd(
        job_id=report.job_id,
        step_id=report.step_id,
        node=report.node,
        exit_status=report.exit_status,
        ts=ts,
    )
