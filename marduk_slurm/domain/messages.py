"""The wire protocol, version 1: every message that crosses NATS, as a typed, validated value.

Messages are JSON objects tagged by a ``type`` field and carrying ``v`` (the protocol version).
`decode()` turns raw bytes into one of the models below or raises `ProtocolError` with a short
reason that the controller counts; it never lets anything else escape. docs/protocol.md is the
human description of this module and of `marduk_slurm.domain.subjects`.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Final, Literal

import msgspec

from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.errors import ProtocolError

PROTOCOL_VERSION: Final = 1

# Every integer on the wire fits SQLite's INTEGER (int64) and a range that makes sense for
# its field; every float is finite and bounded; every string is bounded and printable. What
# does not fit is rejected here, at the edge, and never reaches the store.
INT64_MAX: Final = 2**63 - 1
_PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]*\Z"

# Slurm node names: what a NATS subject token can hold, never starting like an option.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128,
                                   pattern=r"^[A-Za-z0-9_][A-Za-z0-9_\-]*\Z")]
# torchft replica ids are "<prefix>:<uuid>"; keep them printable and bounded.
ReplicaId = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[!-~]+\Z")]
GpuUuid = Annotated[str, msgspec.Meta(min_length=1, max_length=96, pattern=r"^[A-Za-z0-9_:\-]+\Z")]
JobId = Annotated[int, msgspec.Meta(ge=0, le=2**32)]
StepId = Annotated[int, msgspec.Meta(ge=0, le=2**32)]
NonNeg = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
# Training steps, revisions and counters: far beyond any run, within JSON's exact integers.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**53)]
Pid = Annotated[int, msgspec.Meta(ge=0, le=2**32)]
GpuIndex = Annotated[int, msgspec.Meta(ge=0, le=4095)]
Xid = Annotated[int, msgspec.Meta(ge=0, le=2**32)]
MAX_XID_KINDS = 64  # distinct XIDs a health summary counts per GPU
GroupSize = Annotated[int, msgspec.Meta(ge=0, le=2**20)]
ExitStatus = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**32)]
Int64 = Annotated[int, msgspec.Meta(ge=-INT64_MAX, le=INT64_MAX)]
# Unix seconds up to the year 2286; durations up to ~11 days.
Seconds = Annotated[float, msgspec.Meta(ge=0, le=1e10)]
Millis = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
Finite = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
Text = Annotated[str, msgspec.Meta(max_length=1024, pattern=_PRINTABLE)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=_PRINTABLE)]

# Free-form JSON objects (evidence, hyperparameters, config changes, request args) are checked
# after decoding: nesting depth, total size, and the same integer/float/string rules.
JSON_MAX_DEPTH: Final = 8
JSON_MAX_ITEMS: Final = 4096
JSON_MAX_STRING: Final = 4096

# Slurm's step id of the batch script (SLURM_BATCH_SCRIPT).
BATCH_STEP_ID: Final = 4294967291


class Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=True, kw_only=True):
    """Fields every message carries: protocol version and send time (unix seconds)."""

    v: int = PROTOCOL_VERSION
    ts: Seconds = 0.0


# -- node agent -> controller (durable) ------------------------------------------------------


class StepStart(Message, tag="step_start", kw_only=True):
    """A Slurm job step started on a node (reported by the SPANK plugin through the agent)."""

    job_id: JobId
    step_id: StepId
    node: Name
    gpu_indices: Annotated[list[GpuIndex], msgspec.Meta(max_length=64)] = []
    gpu_uuids: Annotated[list[GpuUuid], msgspec.Meta(max_length=64)] = []
    pid: Pid = 0
    uid: Pid = 0


class StepEnd(Message, tag="step_end", kw_only=True):
    """A Slurm job step ended on a node."""

    job_id: JobId
    step_id: StepId
    node: Name
    exit_status: ExitStatus | None = None


class Verdict(Message, tag="verdict", kw_only=True):
    """A GPU health verdict, published when it changes (or injected by `marduk inject`)."""

    node: Name
    gpu_uuid: GpuUuid
    gpu_index: GpuIndex | None = None
    action: GpuAction
    reason: Reason
    xid: Xid | None = None
    evidence: dict[str, Any] = {}
    source: Name = "agent"


# A port (mlx5_0/1, eth0) or a mount point (/lustre) of a node: printable, bounded.
NodeTarget = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=_PRINTABLE)]


class NodeVerdict(Message, tag="node_verdict", kw_only=True):
    """A verdict on a network port or a mount point of the node (domain.node_health),
    published when it changes (or injected by `marduk inject --port/--mount`)."""

    node: Name
    component: Literal["port", "mount"]
    target: NodeTarget
    action: Literal["none", "watch", "drain_node"]
    reason: Reason
    evidence: dict[str, Any] = {}
    source: Name = "agent"


class GpuDescriptor(msgspec.Struct, forbid_unknown_fields=True):
    uuid: GpuUuid
    index: GpuIndex
    name: Text = ""
    pci_bus_id: Text = ""


class GpuInventory(Message, tag="gpu_inventory", kw_only=True):
    """The GPUs an agent found on its node (sent on agent start)."""

    node: Name
    gpus: Annotated[list[GpuDescriptor], msgspec.Meta(max_length=256)]
    simulated: bool = False


# -- training replica -> controller (durable) ------------------------------------------------


class ReplicaRegister(Message, tag="replica_register", kw_only=True):
    """A TorchFT replica announces itself, its GPUs and its hyperparameters."""

    replica_id: ReplicaId
    job_id: JobId
    step_id: StepId | None = None
    replica_group: GroupSize
    group_rank: GroupSize = 0
    group_world_size: Annotated[int, msgspec.Meta(ge=1, le=2**20)] = 1
    node: Name
    gpu_uuids: Annotated[list[GpuUuid], msgspec.Meta(max_length=64)] = []
    pid: Pid = 0
    hyperparams: dict[str, Any] = {}
    config_revision: Count = 0
    step: Count = 0
    # A hot spare: started and model-built, not in torchft's quorum until told to assume a
    # group. Its `replica_group` is then its standby slot, not a replica group.
    standby: bool = False


class ReplicaLeave(Message, tag="replica_leave", kw_only=True):
    """A replica leaves: told to, finished, or failed."""

    replica_id: ReplicaId
    job_id: JobId
    reason: Text = ""
    exit_code: ExitStatus | None = None
    step: Count | None = None


class ConfigAck(Message, tag="config_ack", kw_only=True):
    """A replica applied a config revision at a step."""

    replica_id: ReplicaId
    job_id: JobId
    revision: Count
    applied_at_step: Count
    ok: bool = True
    error: Text = ""


class AssumeAck(Message, tag="assume_ack", kw_only=True):
    """A standby took the `assume` command: it now becomes `replica_group`."""

    standby_id: ReplicaId
    job_id: JobId
    replica_group: GroupSize
    event_id: NonNeg | None = None
    ok: bool = True
    error: Text = ""


# -- leading controller -> standby controllers (durable) -------------------------------------


class ActionApplied(Message, tag="action_applied", kw_only=True):
    """The leader carried out (or settled) a Slurm action: a standby marks its own copy of
    the action done, so that after a takeover it does not do it again. `fence` is the
    leader's term (the lease revision at which it took the lease)."""

    controller: Name
    fence: Count
    kind: Literal["drain", "resume"]
    node: Name
    outcome: Literal["done", "skipped", "failed"]
    reason: Text = ""


class ConfigRevised(Message, tag="config_revised", kw_only=True):
    """The leader committed a config revision (an operator's `config set`, or its own):
    a standby records the same revision under the same number."""

    controller: Name
    fence: Count
    job_id: JobId
    revision: Count
    apply_at_step: Count
    changes: dict[str, Any] = {}
    actor: Text = ""


# -- training replica -> controller (core NATS, written behind) ------------------------------


class Heartbeat(Message, tag="heartbeat", kw_only=True):
    """Per-step telemetry of one replica.

    The hottest message (one per replica per step): its replica id is only bounded, not
    matched against a pattern. A heartbeat only ever updates the row of a replica that
    registered (with a checked id) under the same job, so an id that matches no row stores
    nothing; the pattern check would cost a third of the decoding time."""

    replica_id: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    job_id: JobId
    step: Count
    step_time_ms: Millis = 0.0
    allreduce_ms: Millis = 0.0
    participants: GroupSize = 0
    quorum_id: Int64 = 0
    loss: Finite | None = None
    config_revision: Count = 0


# -- controller -> jobs and replicas (core NATS) ---------------------------------------------


class JobCommand(Message, tag="job_command", kw_only=True):
    """A config revision for every replica of a job, applied at `apply_at_step`."""

    job_id: JobId
    revision: Count
    apply_at_step: Count
    changes: dict[str, Any] = {}


class ReplicaCommand(Message, tag="replica_command", kw_only=True):
    """A command for one replica: leave, or (to a standby) assume `replica_group`."""

    replica_id: ReplicaId
    job_id: JobId
    action: Literal["leave", "assume"]
    reason: Text = ""
    immediate: bool = False
    event_id: NonNeg | None = None
    replica_group: GroupSize | None = None  # assume: the group the standby becomes
    # The sending leader's term (lease revision when it took the lease): a replica refuses a
    # command from an older term than one it has seen (a leader that lost its lease).
    fence: Count | None = None


# -- controller's event feed (core NATS) -----------------------------------------------------


class FeedEvent(Message, tag="event", kw_only=True):
    """One row of the failure/decision history, as it is committed."""

    id: NonNeg
    kind: Name
    reason: Text = ""
    node: str | None = None
    gpu_uuid: str | None = None
    job_id: int | None = None
    replica_id: str | None = None
    evidence: dict[str, Any] = {}


# -- CLI request/reply -----------------------------------------------------------------------


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A CLI or job request: `args` are checked by the handler of the verb."""

    v: int = PROTOCOL_VERSION
    args: dict[str, Any] = {}
    actor: Annotated[str, msgspec.Meta(max_length=128, pattern=_PRINTABLE)] = ""
    # How long the requester waits for the answer; the controller drops the request after.
    timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=600_000)] | None = None


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    ok: bool
    data: Any = None
    error: str = ""
    error_kind: str = ""


# -- node agent -> controller (core NATS, not persisted) ---------------------------------------


class XidCount(msgspec.Struct, kw_only=True):
    xid: Xid
    count: Count


# Throttle (clock event) reasons by name, as gpu_health names them: short words.
ThrottleReason = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=_PRINTABLE)]


class GpuCounters(msgspec.Struct, kw_only=True):
    """A GPU's NVML counters as of the agent's latest reading (None: NVML could not read
    it). ECC and page counters only ever grow, save the volatile ones at a driver reload;
    `xids` counts each XID seen since the agent started."""

    ecc_sbe_volatile: Count | None = None  # corrected
    ecc_sbe_aggregate: Count | None = None
    ecc_dbe_volatile: Count | None = None  # uncorrected
    ecc_dbe_aggregate: Count | None = None
    retired_pages_sbe: Count | None = None
    retired_pages_dbe: Count | None = None
    retired_pages_pending: bool | None = None
    remap_correctable: Count | None = None
    remap_uncorrectable: Count | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    temperature_c: Annotated[float, msgspec.Meta(ge=-273.0, le=1000.0)] | None = None
    power_w: Annotated[float, msgspec.Meta(ge=0.0, le=1e6)] | None = None
    throttle_reasons: Annotated[list[ThrottleReason], msgspec.Meta(max_length=64)] = []
    xids: Annotated[list[XidCount], msgspec.Meta(max_length=MAX_XID_KINDS)] = []


class HealthGpu(msgspec.Struct, kw_only=True):
    """One GPU of a health summary; fields the controller does not read are ignored."""

    uuid: GpuUuid
    index: GpuIndex | None = None
    action: Annotated[str, msgspec.Meta(max_length=32, pattern=_PRINTABLE)] = ""
    reason: Text = ""
    evidence: dict[str, Any] | None = None
    counters: GpuCounters | None = None


class HealthSummary(msgspec.Struct, kw_only=True):
    """The agent's periodic health summary (``marduk.v1.health.<node>``)."""

    node: Name
    gpus: Annotated[list[HealthGpu], msgspec.Meta(max_length=256)] = []


# -- the shape of verdict evidence -------------------------------------------------------------
# Evidence is open (drills and future agents add keys), but the keys the controller reads must
# have the shape the agent writes (domain.gpu_health._evidence); anything else is rejected.

OptCount = Count | None


class EccEvidence(msgspec.Struct, kw_only=True):
    dbe_volatile: OptCount = None
    dbe_aggregate: OptCount = None
    sbe_volatile: OptCount = None
    sbe_aggregate: OptCount = None


class RetiredPagesEvidence(msgspec.Struct, kw_only=True):
    sbe: OptCount = None
    dbe: OptCount = None
    pending: bool | None = None


class RowRemapEvidence(msgspec.Struct, kw_only=True):
    correctable: OptCount = None
    uncorrectable: OptCount = None
    pending: bool | None = None
    failure: bool | None = None


class EvidenceShape(msgspec.Struct, kw_only=True):
    gpu_index: GpuIndex | None = None
    index: GpuIndex | None = None
    xids: Annotated[list[Xid], msgspec.Meta(max_length=256)] = []
    ecc: EccEvidence | None = None
    retired_pages: RetiredPagesEvidence | None = None
    row_remap: RowRemapEvidence | None = None
    recovery_action: Annotated[int, msgspec.Meta(ge=0, le=2**32)] | None = None
    throttle_reasons: Annotated[list[Text], msgspec.Meta(max_length=64)] | None = None
    temperature_c: Finite | None = None
    power_w: Finite | None = None


def check_json(value: Any, what: str, *, max_depth: int = JSON_MAX_DEPTH,
               max_items: int = JSON_MAX_ITEMS) -> None:
    """A free-form JSON value must be shallow, small, and hold only storable scalars:
    integers within int64, finite floats, printable bounded strings (keys too)."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    items = 0
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > max_items:
            raise ProtocolError("too_large", f"{what}: more than {max_items} values")
        if isinstance(node, dict):
            if depth >= max_depth:
                raise ProtocolError("too_deep", f"{what}: nested deeper than {max_depth}")
            for key, child in node.items():
                _check_scalar(key, what)
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            if depth >= max_depth:
                raise ProtocolError("too_deep", f"{what}: nested deeper than {max_depth}")
            stack.extend((child, depth + 1) for child in node)
        else:
            _check_scalar(node, what)


def _check_scalar(value: Any, what: str) -> None:
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if not -INT64_MAX <= value <= INT64_MAX:
            raise ProtocolError("out_of_range", f"{what}: integer beyond int64")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError("out_of_range", f"{what}: non-finite number")
    elif isinstance(value, str):
        if len(value) > JSON_MAX_STRING:
            raise ProtocolError("too_large", f"{what}: string over {JSON_MAX_STRING} characters")
        if not printable(value):
            raise ProtocolError("control_character", f"{what}: control character in a string")
    else:
        raise ProtocolError("invalid_field", f"{what}: unexpected {type(value).__name__}")


_PRINTABLE_RE = re.compile(_PRINTABLE)


def printable(text: str) -> bool:
    """No control characters (C0, DEL, C1), line separators or bidi overrides."""
    return _PRINTABLE_RE.match(text) is not None


def _check_evidence(evidence: dict[str, Any]) -> None:
    check_json(evidence, "evidence")
    try:
        msgspec.convert(evidence, EvidenceShape)
    except msgspec.ValidationError as exc:
        raise ProtocolError("invalid_evidence", str(exc)[:300]) from None


def _check_free_json(msg: Any) -> None:
    """The open dicts of a decoded message (the typed fields are checked by msgspec)."""
    if isinstance(msg, Verdict):
        _check_evidence(msg.evidence)
    elif isinstance(msg, NodeVerdict):
        check_json(msg.evidence, "evidence")
    elif isinstance(msg, ReplicaRegister):
        check_json(msg.hyperparams, "hyperparams", max_items=1024)
    elif isinstance(msg, JobCommand | ConfigRevised):
        check_json(msg.changes, "changes", max_items=1024)
    elif isinstance(msg, Request):
        check_json(msg.args, "args", max_items=100_000)
    elif isinstance(msg, HealthSummary):
        for gpu in msg.gpus:
            if gpu.evidence is not None:
                _check_evidence(gpu.evidence)


DurableMessage = (
    StepStart | StepEnd | Verdict | GpuInventory | ReplicaRegister | ReplicaLeave | ConfigAck
    | AssumeAck | NodeVerdict | ActionApplied | ConfigRevised
)

class _Unsent(Message, tag="unsent"):
    """Never sent. Decoding one tagged struct alone, msgspec takes a message without `type`
    for it; in a union the tag is required, as every message must carry it."""


_encoder = msgspec.json.Encoder()
_durable_decoder = msgspec.json.Decoder(DurableMessage)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat | _Unsent)
_command_decoder = msgspec.json.Decoder(JobCommand | ReplicaCommand)
_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)
_feed_decoder = msgspec.json.Decoder(FeedEvent)
_health_decoder = msgspec.json.Decoder(HealthSummary)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def _classify(exc: msgspec.DecodeError) -> ProtocolError:
    text = str(exc)
    if text.startswith("JSON is malformed") or text.startswith("Input data was truncated"):
        reason = "malformed_json"
    elif "Invalid value" in text and "`$.type`" in text:
        reason = "unknown_type"
    elif "missing required field" in text:
        reason = "missing_field"
    elif "unknown field" in text:
        reason = "unknown_field"
    elif "length <=" in text:
        reason = "too_large"
    elif "<=" in text or ">=" in text or "out of range" in text:
        reason = "out_of_range"
    elif "matching regex" in text:
        reason = "bad_format"
    else:
        reason = "invalid_field"
    return ProtocolError(reason, text[:300])


def _check_version(msg: Any) -> Any:
    if getattr(msg, "v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"v={msg.v}, this controller speaks v1")
    return msg


def _decode_raw(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    """Decode, with every decoding failure as a ProtocolError of a countable reason."""
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise _classify(exc) from None
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError("malformed_json", str(exc)[:300]) from None


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    if len(data) > 1_000_000:
        raise ProtocolError("too_large", f"{len(data)} bytes")
    msg = _decode_raw(decoder, data)
    _check_free_json(msg)
    return _check_version(msg)


def decode_durable(data: bytes) -> DurableMessage:
    """Decode an agent or replica event from the durable stream."""
    return _decode(_durable_decoder, data)


def decode_heartbeat(data: bytes) -> Heartbeat:
    # The hot path (one message per replica per step), so inline: a heartbeat has no free-form
    # JSON to walk, and its bounds (finite times among them) are all in the type. Payloads
    # are at most NATS's message limit.
    hb = _check_version(_decode_raw(_heartbeat_decoder, data))
    if not isinstance(hb, Heartbeat):
        raise ProtocolError("unknown_type", "type 'unsent' is no message")
    return hb


def decode_health(data: bytes) -> HealthSummary:
    return _decode(_health_decoder, data)


def decode_command(data: bytes) -> JobCommand | ReplicaCommand:
    return _decode(_command_decoder, data)


def decode_request(data: bytes) -> Request:
    return _decode(_request_decoder, data)


def decode_reply(data: bytes) -> Reply:
    try:
        return _reply_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise _classify(exc) from None


def decode_feed(data: bytes) -> FeedEvent:
    return _decode(_feed_decoder, data)
