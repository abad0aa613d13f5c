"""Malformed messages for the chaos tests: hypothesis strategies plus hand-written nasty cases.

Every payload returned is invalid by docs/protocol.md, as this module reads it with the
standard library's JSON parser and tests/protocol_schema.py: never with the project's own
decoders, so a decoder that lets a bad message through makes the chaos test fail instead of
dropping the case. A generated payload whose invalidity these rules cannot show is left out
(a dropped optional field, a value of the right type but outside a bound)."""

from __future__ import annotations

import json
import random
from typing import Any

import protocol_schema as schema
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

NODE_KINDS = ["step_start", "step_end", "verdict", "gpu_inventory", "node_verdict"]
JOB_KINDS = ["replica_register", "replica_leave", "config_ack"]
RPC_VERBS = ["status", "replicas", "nodes", "history", "drain", "resume", "inject", "config_set",
             "nosuch", "x" * 64]

TEMPLATES: dict[str, dict[str, Any]] = {
    "step_start": {"type": "step_start", "v": 1, "job_id": 7, "step_id": 0, "node": "n1"},
    "step_end": {"type": "step_end", "v": 1, "job_id": 7, "step_id": 0, "node": "n1"},
    "verdict": {"type": "verdict", "v": 1, "node": "n1", "gpu_uuid": "GPU-1",
                "action": "drain_node", "reason": "xid 79", "xid": 79},
    "gpu_inventory": {"type": "gpu_inventory", "v": 1, "node": "n1",
                      "gpus": [{"uuid": "GPU-1", "index": 0}]},
    "node_verdict": {"type": "node_verdict", "v": 1, "node": "n1", "component": "port",
                     "target": "mlx5_0/1", "action": "drain_node", "reason": "flapping"},
    "replica_register": {"type": "replica_register", "v": 1, "replica_id": "job7_rg0:u",
                         "job_id": 7, "replica_group": 0, "node": "n1"},
    "replica_leave": {"type": "replica_leave", "v": 1, "replica_id": "job7_rg0:u",
                      "job_id": 7, "reason": "done"},
    "config_ack": {"type": "config_ack", "v": 1, "replica_id": "job7_rg0:u", "job_id": 7,
                   "revision": 1, "applied_at_step": 3, "ok": True},
    "heartbeat": {"type": "heartbeat", "v": 1, "replica_id": "job7_rg0:u", "job_id": 7,
                  "step": 1, "step_time_ms": 10.0, "allreduce_ms": 1.0, "participants": 2},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=8)


@st.composite
def mutated(draw: Any, kinds: list[str]) -> bytes:
    """A valid-looking message with one thing wrong: a field dropped, retyped or added."""
    msg = dict(TEMPLATES[draw(st.sampled_from(kinds))])
    how = draw(st.sampled_from(["drop", "retype", "add", "version", "type"]))
    key = draw(st.sampled_from(sorted(msg)))
    if how == "drop":
        msg.pop(key)
    elif how == "retype":
        msg[key] = draw(json_values)
    elif how == "add":
        msg[draw(st.text(min_size=1, max_size=8))] = draw(json_values)
    elif how == "version":
        msg["v"] = draw(st.integers().filter(lambda v: v != 1))
    else:
        msg["type"] = draw(st.text(max_size=16))
    return json.dumps(msg).encode()


def payloads(kinds: list[str]) -> st.SearchStrategy[bytes]:
    return st.one_of(st.binary(max_size=256), json_values.map(lambda v: json.dumps(v).encode()),
                     mutated(kinds))


def draw_many(strategy: st.SearchStrategy[bytes], count: int) -> list[bytes]:
    out: list[bytes] = []

    @settings(max_examples=count // 50 + 1, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck), deadline=None)
    @given(st.lists(strategy, min_size=50, max_size=50))
    def collect(batch: list[bytes]) -> None:
        out.extend(batch)

    collect()
    return out[:count]


NASTY: list[bytes] = [
    b"", b"{", b"[]", b"null", b"42", b'"text"', b"\xff\xfe\x00", b"\x00" * 64, b"[" * 100_000,
    b'{"type":"step_start","v":1,"job_id":1e400,"step_id":0,"node":"n1"}',
    b'{"type":"step_start","v":1,"job_id":18446744073709551616,"step_id":0,"node":"n1"}',
    b'{"type":"step_start","v":1,"job_id":1,"step_id":0,"node":"n1\\u0000"}',
    b'{"type":"step_start","v":1,"job_id":1,"step_id":0,"node":"' + b"n" * 129 + b'"}',
    b'{"type":"step_start","v":1,"job_id":1,"step_id":0,"node":"n\xc3\x28"}',
    b'{"type":"heartbeat","v":1,"replica_id":"r","job_id":7,"step":1,"step_time_ms":NaN}',
    b'{"type":"step_start","type":"verdict"}',
    b'{"type":"replica_register","v":1,"replica_id":"' + b"r" * 201 + b'","job_id":7,'
    b'"replica_group":0,"node":"n1"}',
    json.dumps({**TEMPLATES["step_start"], "pad": "x" * 900_000}).encode(),
]


class NotJson(ValueError):
    """NaN and Infinity: Python's json module reads them, RFC 8259 JSON has no such thing."""


def _no_constants(name: str) -> Any:
    raise NotJson(name)


def _json(data: bytes) -> tuple[bool, Any]:
    """(True, value) for RFC 8259 JSON text, (False, None) otherwise."""
    try:
        return True, json.loads(data.decode("utf-8"), parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None


def _category(value: Any) -> str:
    for name, types in (("bool", bool), ("number", (int, float)), ("string", str),
                        ("array", list), ("object", dict)):
        if isinstance(value, types):
            return name
    return "null"


def _breaks_the_doc(msg: dict[str, Any], kind: str) -> bool:
    """True when `msg`, a JSON object, is not a valid `kind` by the doc: another tag, another
    version, a field the kind does not have, or a field of another JSON type."""
    if msg.get("type") != kind:
        return True
    if "v" in msg and not (type(msg["v"]) is int and msg["v"] == 1):
        return True
    example = schema.KINDS[kind].example
    for key, value in msg.items():
        if key not in example:
            return True  # unknown_field
        if example[key] is not None and value is not None \
                and _category(value) != _category(example[key]):
            return True
    return False


def durable_invalid(subject: str, data: bytes) -> bool:
    """Invalid on `subject` by the doc: not JSON, not an object, on a subject the doc does not
    list, a message the subject does not carry or about another node or job, or a message
    that breaks the doc's fields."""
    ok, msg = _json(data)
    if not ok or not isinstance(msg, dict):
        return True
    tokens = subject.split(".")
    if len(tokens) != 6 or tokens[2] != "evt" or tokens[3] not in ("node", "job"):
        return True  # bad_subject
    scope, owner, kind = tokens[3], tokens[4], tokens[5]
    if kind not in schema.KINDS or schema.KINDS[kind].scope != scope:
        return True
    named = msg.get("node") if scope == "node" else msg.get("job_id")
    if named is not None and str(named) != owner:
        return True  # subject_mismatch
    return _breaks_the_doc(msg, kind)


def fuzz_durable(count: int, seed: int = 8) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    node_subjects = [subjects.node_event(n, k) for n in ("n1", "n2") for k in NODE_KINDS]
    job_subjects = [subjects.job_event(j, k) for j in (7, 8) for k in JOB_KINDS]
    odd = ["marduk.v1.evt.garbage", "marduk.v1.evt.node.n1", "marduk.v1.evt.job.x.y.z"]
    every = node_subjects + job_subjects + odd
    items = [(rng.choice(every), data) for data in NASTY]
    # A valid message on a subject that names another node or job: impersonation.
    items += [(subjects.node_event("n2", "step_start"), m.encode(m.StepStart(
        job_id=7, step_id=0, node="n1"))), (subjects.job_event(8, "replica_leave"), m.encode(
            m.ReplicaLeave(replica_id="job7_rg0:u", job_id=7, reason="x")))]
    for data in draw_many(payloads(NODE_KINDS + JOB_KINDS), count + count // 10):
        items.append((rng.choice(every), data))
    return [(s, d) for s, d in items if durable_invalid(s, d)][:count]


def heartbeat_invalid(subject: str, data: bytes) -> bool:
    ok, msg = _json(data)
    if not ok or not isinstance(msg, dict):
        return True
    job = msg.get("job_id")
    if job is not None and subject != f"{schema.PREFIX}.hb.{job}":
        return True  # subject_mismatch
    return _breaks_the_doc(msg, "heartbeat")


def fuzz_heartbeats(count: int, seed: int = 9) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    every = [subjects.heartbeat(7), subjects.heartbeat(8)]
    items = [(rng.choice(every), d) for d in NASTY if len(d) < 1_000_000]
    drawn = draw_many(payloads(["heartbeat"]), count + count // 5)
    items += [(rng.choice(every), d) for d in drawn]
    return [(s, d) for s, d in items if heartbeat_invalid(s, d)][:count]


REQUEST_FIELDS = {"v": "number", "args": "object", "actor": "string", "timeout_ms": "number"}


def request_invalid(data: bytes) -> bool:
    """Not a request by the doc (`{"v": 1, "args": {...}, "actor": "name", "timeout_ms": ...}`,
    every field optional): not JSON, not an object, an unknown field or one of another type."""
    ok, msg = _json(data)
    if not ok or not isinstance(msg, dict):
        return True
    if "v" in msg and not (type(msg["v"]) is int and msg["v"] == 1):
        return True
    return any(key not in REQUEST_FIELDS or (value is not None and key != "v"
                                             and _category(value) != REQUEST_FIELDS[key])
               for key, value in msg.items())


def fuzz_requests(count: int, seed: int = 10) -> list[tuple[str, bytes]]:
    """Operator and job requests that cannot be decoded (or name no verb)."""
    rng = random.Random(seed)
    strategy = st.one_of(st.binary(max_size=128), json_values.map(lambda v: json.dumps(v).encode()))
    items: list[tuple[str, bytes]] = []
    for data in draw_many(strategy, count * 2):
        if not request_invalid(data):
            continue
        if rng.random() < 0.75:
            items.append((subjects.rpc(rng.choice(RPC_VERBS)), data))
        else:
            items.append((subjects.job_rpc(rng.choice([7, 8]), rng.choice(
                ["config_latest", "nosuch"])), data))
    return items[:count]
