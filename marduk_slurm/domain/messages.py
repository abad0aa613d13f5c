"""The wire protocol, version 1: every message that crosses NATS, as a typed, validated value.

Messages are JSON objects tagged by a ``type`` field and carrying ``v`` (the protocol version).
`decode()` turns raw bytes into one of the models below or raises `ProtocolError` with a short
reason that the controller counts; it never lets anything else escape. docs/protocol.md is the
human description of this module and of `marduk_slurm.domain.subjects`.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Final, Literal

import msgspec

from marduk_slurm.domain.gpu_health import GpuAction
from marduk_slurm.errors import ProtocolError

PROTOCOL_VERSION: Final = 1

# Slurm node names and similar identifiers: what a NATS subject token can hold.
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_\-]+$")]
# torchft replica ids are "<prefix>:<uuid>"; keep them printable and bounded.
ReplicaId = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[!-~]+$")]
GpuUuid = Annotated[str, msgspec.Meta(min_length=1, max_length=96, pattern=r"^[A-Za-z0-9_:\-]+$")]
JobId = Annotated[int, msgspec.Meta(ge=0, le=2**32)]
StepId = Annotated[int, msgspec.Meta(ge=0, le=2**32)]
NonNeg = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]
Millis = Annotated[float, msgspec.Meta(ge=0)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]

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
    gpu_indices: list[NonNeg] = []
    gpu_uuids: list[GpuUuid] = []
    pid: NonNeg = 0
    uid: NonNeg = 0


class StepEnd(Message, tag="step_end", kw_only=True):
    """A Slurm job step ended on a node."""

    job_id: JobId
    step_id: StepId
    node: Name
    exit_status: int | None = None


class Verdict(Message, tag="verdict", kw_only=True):
    """A GPU health verdict, published when it changes (or injected by `marduk inject`)."""

    node: Name
    gpu_uuid: GpuUuid
    gpu_index: NonNeg | None = None
    action: GpuAction
    reason: Reason
    xid: NonNeg | None = None
    evidence: dict[str, Any] = {}
    source: Name = "agent"


class GpuDescriptor(msgspec.Struct, forbid_unknown_fields=True):
    uuid: GpuUuid
    index: NonNeg
    name: Text = ""
    pci_bus_id: Text = ""


class GpuInventory(Message, tag="gpu_inventory", kw_only=True):
    """The GPUs an agent found on its node (sent on agent start)."""

    node: Name
    gpus: list[GpuDescriptor]
    simulated: bool = False


# -- training replica -> controller (durable) ------------------------------------------------


class ReplicaRegister(Message, tag="replica_register", kw_only=True):
    """A TorchFT replica announces itself, its GPUs and its hyperparameters."""

    replica_id: ReplicaId
    job_id: JobId
    step_id: StepId | None = None
    replica_group: NonNeg
    group_rank: NonNeg = 0
    group_world_size: Annotated[int, msgspec.Meta(ge=1)] = 1
    node: Name
    gpu_uuids: list[GpuUuid] = []
    pid: NonNeg = 0
    hyperparams: dict[str, Any] = {}
    config_revision: NonNeg = 0
    step: NonNeg = 0


class ReplicaLeave(Message, tag="replica_leave", kw_only=True):
    """A replica leaves: told to, finished, or failed."""

    replica_id: ReplicaId
    job_id: JobId
    reason: Text = ""
    exit_code: int | None = None
    step: NonNeg | None = None


class ConfigAck(Message, tag="config_ack", kw_only=True):
    """A replica applied a config revision at a step."""

    replica_id: ReplicaId
    job_id: JobId
    revision: NonNeg
    applied_at_step: NonNeg
    ok: bool = True
    error: Text = ""


# -- training replica -> controller (core NATS, written behind) ------------------------------


class Heartbeat(Message, tag="heartbeat", kw_only=True):
    """Per-step telemetry of one replica."""

    replica_id: ReplicaId
    job_id: JobId
    step: NonNeg
    step_time_ms: Millis = 0.0
    allreduce_ms: Millis = 0.0
    participants: NonNeg = 0
    quorum_id: int = 0
    loss: float | None = None
    config_revision: NonNeg = 0


# -- controller -> jobs and replicas (core NATS) ---------------------------------------------


class JobCommand(Message, tag="job_command", kw_only=True):
    """A config revision for every replica of a job, applied at `apply_at_step`."""

    job_id: JobId
    revision: NonNeg
    apply_at_step: NonNeg
    changes: dict[str, Any] = {}


class ReplicaCommand(Message, tag="replica_command", kw_only=True):
    """A command for one replica (today: leave)."""

    replica_id: ReplicaId
    job_id: JobId
    action: Literal["leave"]
    reason: Text = ""
    immediate: bool = False
    event_id: NonNeg | None = None


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
    actor: Annotated[str, msgspec.Meta(max_length=128)] = ""


class Reply(msgspec.Struct, kw_only=True, omit_defaults=True):
    ok: bool
    data: Any = None
    error: str = ""
    error_kind: str = ""


DurableMessage = (
    StepStart | StepEnd | Verdict | GpuInventory | ReplicaRegister | ReplicaLeave | ConfigAck
)

_encoder = msgspec.json.Encoder()
_durable_decoder = msgspec.json.Decoder(DurableMessage)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
_command_decoder = msgspec.json.Decoder(JobCommand | ReplicaCommand)
_request_decoder = msgspec.json.Decoder(Request)
_reply_decoder = msgspec.json.Decoder(Reply)
_feed_decoder = msgspec.json.Decoder(FeedEvent)


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
    else:
        reason = "invalid_field"
    return ProtocolError(reason, text[:300])


def _check_version(msg: Any) -> Any:
    if msg.v != PROTOCOL_VERSION:
        raise ProtocolError("unsupported_version", f"v={msg.v}, this controller speaks v1")
    return msg


def _decode(decoder: msgspec.json.Decoder[Any], data: bytes) -> Any:
    if len(data) > 1_000_000:
        raise ProtocolError("too_large", f"{len(data)} bytes")
    try:
        msg = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _classify(exc) from None
    except msgspec.DecodeError as exc:
        raise _classify(exc) from None
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise ProtocolError("malformed_json", str(exc)[:300]) from None
    return _check_version(msg)


def decode_durable(data: bytes) -> DurableMessage:
    """Decode an agent or replica event from the durable stream."""
    return _decode(_durable_decoder, data)


def decode_heartbeat(data: bytes) -> Heartbeat:
    hb: Heartbeat = _decode(_heartbeat_decoder, data)
    if not math.isfinite(hb.step_time_ms) or not math.isfinite(hb.allreduce_ms):
        raise ProtocolError("invalid_field", "non-finite timing")
    return hb


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
