"""The few bytes of torchft's lighthouse protocol that the liveness proxy reads and writes.

torchft's proto (proto/torchft.proto in its repository) has

    message LighthouseHeartbeatRequest { string replica_id = 1; }
    message QuorumMember { string replica_id = 1; ... }
    message LighthouseQuorumRequest { QuorumMember requester = 1; }

The proxy forwards every call as raw bytes and only needs the replica id of the caller, so
this module decodes protobuf's wire format by hand (varint tags and lengths) instead of
generating stubs. Every read is bounded: a message that is not well formed, or whose replica
id is not printable ASCII of at most REPLICA_ID_MAX characters, raises `ValueError`.
"""

from __future__ import annotations

import re
from typing import Final

REPLICA_ID_MAX: Final = 256
MESSAGE_MAX: Final = 64 * 1024  # a quorum request carries a JSON `data` field; heartbeats ~60 B
_REPLICA_ID: Final = re.compile(rb"[!-~]{1,%d}" % REPLICA_ID_MAX)
_LEN: Final = 2  # wire type of strings, bytes and embedded messages
_VARINT_MAX_BYTES: Final = 10
# marduk's replica id is torchft's with "/<rank>" appended when a group has several ranks.
_RANK_SUFFIX: Final = re.compile(r"/[0-9]{1,6}$")


def _varint(raw: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(_VARINT_MAX_BYTES):
        if pos + i >= len(raw):
            raise ValueError("truncated varint")
        byte = raw[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _skip(raw: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 0:
        return _varint(raw, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    if wire_type == _LEN:
        length, pos = _varint(raw, pos)
        return pos + length
    raise ValueError(f"unsupported wire type {wire_type}")


def length_field(raw: bytes, field: int) -> bytes | None:
    """The last value of length-delimited `field` in message `raw` (protobuf: the last one
    wins), or None when absent."""
    if len(raw) > MESSAGE_MAX:
        raise ValueError(f"message of {len(raw)} bytes exceeds {MESSAGE_MAX}")
    pos, found = 0, None
    while pos < len(raw):
        tag, pos = _varint(raw, pos)
        number, wire_type = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if number == field and wire_type == _LEN:
            length, start = _varint(raw, pos)
            pos = start + length
            if pos > len(raw):
                raise ValueError("field runs past the end of the message")
            found = raw[start:pos]
            continue
        pos = _skip(raw, pos, wire_type)
        if pos > len(raw):
            raise ValueError("field runs past the end of the message")
    return found


def _replica_id(value: bytes | None) -> str:
    if value is None or not _REPLICA_ID.fullmatch(value):
        raise ValueError("replica_id missing, not printable ASCII or longer than "
                         f"{REPLICA_ID_MAX} characters")
    return value.decode("ascii")


def heartbeat_replica_id(raw: bytes) -> str:
    """The replica id of a LighthouseHeartbeatRequest."""
    return _replica_id(length_field(raw, 1))


def quorum_replica_id(raw: bytes) -> str:
    """The requester's replica id of a LighthouseQuorumRequest."""
    requester = length_field(raw, 1)
    if requester is None:
        raise ValueError("quorum request without a requester")
    return _replica_id(length_field(requester, 1))


def heartbeat_request(replica_id: str) -> bytes:
    """A LighthouseHeartbeatRequest for `replica_id` (what the proxy sends on its behalf)."""
    data = replica_id.encode("ascii")
    if not _REPLICA_ID.fullmatch(data):
        raise ValueError(f"not a replica id: {replica_id[:64]!r}")
    return bytes([0x0A]) + _encode_varint(len(data)) + data


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def torchft_replica_id(marduk_replica_id: str) -> str:
    """The lighthouse's id of a replica that marduk names: without the "/<rank>" suffix that
    marks one rank of a multi-rank group (runtime/manager.py, `marduk_replica_id`)."""
    return _RANK_SUFFIX.sub("", marduk_replica_id)
