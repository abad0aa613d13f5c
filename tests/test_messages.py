"""The wire protocol: valid messages round-trip, anything else is a counted ProtocolError."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from marduk_slurm.controller.ingest import check_subject
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import ProtocolError

VALID = [
    m.StepStart(job_id=1, step_id=0, node="n1", gpu_indices=[0, 1], gpu_uuids=["GPU-a"]),
    m.StepEnd(job_id=1, step_id=m.BATCH_STEP_ID, node="n1", exit_status=0),
    m.Verdict(node="n2", gpu_uuid="GPU-x", gpu_index=1, action="drain_node", reason="xid 79",
              xid=79, evidence={"xids": [79]}),
    m.GpuInventory(node="n1", gpus=[m.GpuDescriptor(uuid="GPU-a", index=0)], simulated=True),
    m.ReplicaRegister(replica_id="job1_rg0:3f2a", job_id=1, replica_group=0, node="n1",
                      hyperparams={"lr": 0.1}),
    m.ReplicaLeave(replica_id="job1_rg0:3f2a", job_id=1, reason="told to", exit_code=75),
    m.ConfigAck(replica_id="job1_rg0:3f2a", job_id=1, revision=2, applied_at_step=40),
]


@pytest.mark.parametrize("msg", VALID, ids=lambda x: type(x).__name__)
def test_valid_messages_round_trip(msg: msgspec.Struct) -> None:
    decoded = m.decode_durable(m.encode(msg))
    assert decoded == msg
    assert json.loads(m.encode(msg))["v"] == m.PROTOCOL_VERSION


@pytest.mark.parametrize(("data", "reason"), [
    (b"{", "malformed_json"),
    (b"\xff", "malformed_json"),
    (b'{"type":"nope"}', "unknown_type"),
    (b'{"type":"step_end","node":"n1","step_id":0}', "missing_field"),
    (b'{"type":"step_end","job_id":1,"step_id":0,"node":"n1","x":1}', "unknown_field"),
    (b'{"type":"step_end","job_id":1,"step_id":0,"node":"n1 n2"}', "bad_format"),
    (b'{"type":"step_end","job_id":1,"step_id":-3,"node":"n1"}', "out_of_range"),
    (b'{"type":"step_end","v":2,"job_id":1,"step_id":0,"node":"n1"}', "unsupported_version"),
    (b'{"type":"verdict","node":"n1","gpu_uuid":"G","action":"boom","reason":"r"}',
     "invalid_field"),
    (b" " * 1_000_001, "too_large"),
])
def test_malformed_messages_get_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        m.decode_durable(data)
    assert err.value.reason == reason


def test_a_heartbeat_must_name_its_type() -> None:
    """Every message carries `type` (docs/protocol.md); decoding one tagged struct alone,
    msgspec would take a message without it."""
    fields = b'"replica_id":"r","job_id":1,"step":1,"step_time_ms":1.0,"allreduce_ms":1.0,' \
             b'"participants":2'
    assert m.decode_heartbeat(b'{"type":"heartbeat",' + fields + b"}").step == 1
    for data in (b"{" + fields + b"}", b'{"type":"unsent"}', b'{"type":"step_start",' + fields
                 + b"}"):
        with pytest.raises(ProtocolError) as err:
            m.decode_heartbeat(data)
        assert err.value.reason in ("missing_field", "unknown_type"), data


def test_heartbeat_rejects_infinite_timings() -> None:
    data = b'{"type":"heartbeat","replica_id":"r","job_id":1,"step":1,"step_time_ms":1e999}'
    with pytest.raises(ProtocolError):
        m.decode_heartbeat(data)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                 lambda kids: st.lists(kids, max_size=4)
                 | st.dictionaries(st.sampled_from(["type", "v", "job_id", "node", "step_id",
                                                    "replica_id", "gpu_uuid", "x"]), kids,
                                   max_size=6),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
))
def test_decoders_raise_only_protocol_errors(data: bytes) -> None:
    for decode in (m.decode_durable, m.decode_heartbeat, m.decode_request, m.decode_command):
        try:
            decode(data)
        except ProtocolError as exc:
            assert exc.reason


def test_subject_must_match_the_message() -> None:
    start = VALID[0]
    check_subject(subjects.node_event("n1", "step_start"), start)
    for subject in (subjects.node_event("n2", "step_start"),
                    subjects.node_event("n1", "verdict"), "marduk.v1.evt.x",
                    subjects.job_event(1, "step_start")):
        with pytest.raises(ProtocolError):
            check_subject(subject, start)
    check_subject(subjects.job_event(1, "replica_register"), VALID[4])


@pytest.mark.parametrize(("counters", "reason"), [
    ({"ecc_sbe_volatile": -1}, "out_of_range"),
    ({"ecc_dbe_aggregate": 2**53 + 1}, "out_of_range"),
    ({"temperature_c": 1e9}, "out_of_range"),
    ({"power_w": -5.0}, "out_of_range"),
    ({"ecc_sbe_aggregate": "many"}, "invalid_field"),
    ({"throttle_reasons": ["hw_slowdown\u202e"]}, "bad_format"),
    ({"throttle_reasons": ["x" * 65]}, "too_large"),
    ({"xids": [{"xid": 79, "count": 1}] * (m.MAX_XID_KINDS + 1)}, "too_large"),
    ({"xids": [{"xid": -79, "count": 1}]}, "out_of_range"),
])
def test_health_counters_are_bounded(counters: dict[str, object], reason: str) -> None:
    data = json.dumps({"node": "n1", "gpus": [{"uuid": "GPU-a", "counters": counters}]})
    with pytest.raises(ProtocolError) as err:
        m.decode_health(data.encode())
    assert err.value.reason == reason, err.value


def test_health_counters_round_trip() -> None:
    counters = m.GpuCounters(ecc_sbe_aggregate=5000, ecc_dbe_volatile=2, retired_pages_sbe=40,
                             temperature_c=91.5, power_w=350.0,
                             throttle_reasons=["hw_thermal_slowdown"],
                             xids=[m.XidCount(xid=48, count=3)])
    summary = m.HealthSummary(node="n1", gpus=[m.HealthGpu(uuid="GPU-a", counters=counters)])
    assert m.decode_health(msgspec.json.encode(summary)) == summary


def test_a_trailing_newline_is_no_printable_text_nor_part_of_a_name() -> None:
    """`$` also matches before a final newline: the patterns end at `\\Z` instead."""
    assert not m.printable("reason\n") and m.printable("reason")
    for field, value in (("reason", "drained\n"), ("node", "n1\n"), ("gpu_uuid", "GPU-1\n")):
        raw = {"type": "verdict", "node": "n1", "gpu_uuid": "GPU-1", "action": "none",
               "reason": "x", field: value}
        with pytest.raises(ProtocolError) as err:
            m.decode_durable(json.dumps(raw).encode())
        assert err.value.reason == "bad_format", field
