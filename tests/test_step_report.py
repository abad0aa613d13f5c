"""The SPANK socket protocol: parsing and validation of one line (pure)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from marduk_slurm.domain import messages as m
from marduk_slurm.domain.step_report import (
    BATCH_STEP_ID,
    MAX_LINE_BYTES,
    StepReport,
    parse_line,
    resolve_gpus,
    to_message,
)
from marduk_slurm.errors import ProtocolError

START = (
    b'{"v":1,"event":"step_start","job_id":123,"step_id":0,"node":"n1",'
    b'"gpu_indices":[0,1],"pid":4242,"uid":1000}'
)
END = (
    b'{"v":1,"event":"step_end","job_id":123,"step_id":0,"node":"n1","exit_status":0,'
    b'"pid":4242,"uid":1000}'
)


def line(**fields: Any) -> bytes:
    base: dict[str, Any] = {"v": 1, "event": "step_start", "job_id": 1, "step_id": 0}
    return json.dumps({**base, **fields}).encode()


def test_the_documented_lines_parse() -> None:
    start = parse_line(START, "agent-node")
    assert start == StepReport("step_start", 123, 0, "n1", (0, 1), None, 4242, 1000)
    end = parse_line(END + b"\n", "agent-node")
    assert end == StepReport("step_end", 123, 0, "n1", (), 0, 4242, 1000)
    assert start.key == end.key == (123, 0, "n1")


@pytest.mark.parametrize("node", [None, ""])
def test_missing_or_empty_node_is_the_agents(node: str | None) -> None:
    raw = line() if node is None else line(node=node)
    assert parse_line(raw, "n7").node == "n7"


def test_unknown_fields_are_ignored_and_optional_ones_default() -> None:
    report = parse_line(line(spank_version=3, extra={"a": [1]}), "n1")
    assert (report.gpu_indices, report.pid, report.uid, report.exit_status) == ((), 0, 0, None)


def test_batch_step_and_bounds() -> None:
    assert BATCH_STEP_ID == 0xFFFFFFFB
    assert parse_line(line(step_id=BATCH_STEP_ID), "n1").step_id == BATCH_STEP_ID
    assert parse_line(line(job_id=2**32 - 1), "n1").job_id == 2**32 - 1
    assert parse_line(line(event="step_end", exit_status=-1), "n1").exit_status == -1
    assert parse_line(line(event="step_end", exit_status=None), "n1").exit_status is None


def test_version_defaults_to_1() -> None:
    raw = json.dumps({"event": "step_end", "job_id": 5, "step_id": 2}).encode()
    assert parse_line(raw, "n1").job_id == 5


def test_duplicate_gpu_indices_are_folded() -> None:
    assert parse_line(line(gpu_indices=[3, 1, 3]), "n1").gpu_indices == (3, 1)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "malformed_json"),
        (b"{", "malformed_json"),
        (b"[]", "malformed_json"),
        (b"null", "malformed_json"),
        (b"\xff\xfe\x00", "malformed_json"),
        (b"x" * (MAX_LINE_BYTES + 1), "too_long"),
        (line(v=2), "unsupported_version"),
        (line(v="1"), "unsupported_version"),
        (line(event="step_pause"), "unknown_event"),
        (line(event=None), "unknown_event"),
        (json.dumps({"v": 1, "event": "step_start", "step_id": 0}).encode(), "missing_field"),
        (json.dumps({"v": 1, "event": "step_end", "job_id": 1}).encode(), "missing_field"),
        (line(job_id=-1), "invalid_field"),
        (line(job_id=2**32), "invalid_field"),
        (line(job_id="123"), "invalid_field"),
        (line(job_id=True), "invalid_field"),
        (line(job_id=1.5), "invalid_field"),
        (line(step_id=None), "invalid_field"),
        (line(node="bad node"), "invalid_field"),
        (line(node="n1.example.org"), "invalid_field"),
        (line(node=7), "invalid_field"),
        (line(gpu_indices=[0, -1]), "invalid_field"),
        (line(gpu_indices="0,1"), "invalid_field"),
        (line(gpu_indices=[True]), "invalid_field"),
        (line(pid=-5), "invalid_field"),
        (line(uid="root"), "invalid_field"),
        (line(event="step_end", exit_status="0"), "invalid_field"),
    ],
)
def test_bad_lines_are_rejected_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as err:
        parse_line(raw, "n1")
    assert err.value.reason == reason


def test_gpu_indices_resolve_through_the_inventory() -> None:
    uuids, missing = resolve_gpus([1, 0, 5], {0: "GPU-a", 1: "GPU-b"})
    assert uuids == ["GPU-b", "GPU-a"] and missing == [5]


def test_reports_become_protocol_messages() -> None:
    start = to_message(parse_line(START, "n1"), ["GPU-a", "GPU-b"], ts=10.0)
    assert isinstance(start, m.StepStart)
    assert (start.gpu_indices, start.gpu_uuids, start.pid, start.ts) == (
        [0, 1],
        ["GPU-a", "GPU-b"],
        4242,
        10.0,
    )
    end = to_message(parse_line(END, "n1"), [], ts=11.0)
    assert isinstance(end, m.StepEnd) and end.exit_status == 0
    # What the agent publishes, the controller's decoder accepts.
    assert m.decode_durable(m.encode(start)) == start
    assert m.decode_durable(m.encode(end)) == end
