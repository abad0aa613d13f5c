"""Fault-injection drills: the request id that makes an injected verdict count once.

`marduk inject` asks the node's agent; when the agent does not answer in time the controller
may publish the verdict itself (simulated GPUs, or `--force`). A slow agent can still answer
afterwards, so the same drill can produce two verdicts. Both carry the request id the
controller made for that inject (evidence key ``inject_request_id``): the first verdict with
an id is acted on, a later one with the same id is only recorded.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Container, Mapping
from typing import Any

REQUEST_ID_KEY = "inject_request_id"
# Set in the recorded evidence of a repeat: it is history only (no drain, no eviction, and
# no second reading for the risk scores).
REPEAT_KEY = "inject_repeat"
AGENT_ANSWER_WAIT_S = 2.0  # how long the controller waits for the agent's own verdict
_REQUEST_ID = re.compile(r"inj-[0-9a-f]{32}")


def new_request_id() -> str:
    return f"inj-{uuid.uuid4().hex}"


def valid_request_id(value: Any) -> str | None:
    """`value` when it is a request id as `new_request_id` makes them, else None."""
    return value if isinstance(value, str) and _REQUEST_ID.fullmatch(value) else None


def inject_request_id(evidence: Mapping[str, Any]) -> str | None:
    """The inject request id a verdict's evidence carries; None for verdicts of real faults
    (and for a malformed id, which cannot match any request)."""
    return valid_request_id(evidence.get(REQUEST_ID_KEY))


def is_repeat_of_applied_inject(evidence: Mapping[str, Any], applied: Container[str]) -> bool:
    """True when this verdict answers an inject whose verdict was already acted on: record
    it, do not drain or evict for it again. `applied` holds the ids of verdicts acted on."""
    request_id = inject_request_id(evidence)
    return request_id is not None and request_id in applied


def mark_repeat(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """The evidence to record for a repeat (see `is_repeat_of_applied_inject`)."""
    return {**evidence, REPEAT_KEY: True}


def is_marked_repeat(evidence: Mapping[str, Any]) -> bool:
    return evidence.get(REPEAT_KEY) is True
