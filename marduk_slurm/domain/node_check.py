"""`marduk resume NODES --check`: a health check run on each node by its agent.

The CLI names each check with an id (`new_check_id`) so that its Ctrl-C can cancel that check
and no other; the controller relays it to the agents (operators may not address agents), and
each agent runs it for at most the timeout asked and its own limit, whichever is shorter.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

CHECK_ID = re.compile(r"chk-[0-9a-f]{32}")
DEFAULT_CHECK_S = 300.0  # the CLI's --check-timeout default
MAX_CHECK_S = 3600.0


def new_check_id() -> str:
    return f"chk-{uuid.uuid4().hex}"


def check_args(args: dict[str, Any], limit_s: float = MAX_CHECK_S) -> tuple[str, float]:
    """(check_id, timeout_s) of a check request, the timeout at most `limit_s`; ValueError
    for a malformed id or a timeout that is not a positive finite number."""
    check_id = args.get("check_id")
    if not isinstance(check_id, str) or not CHECK_ID.fullmatch(check_id):
        raise ValueError(f"check_id is malformed: {str(check_id)[:80]!r}")
    timeout = args.get("timeout_s", limit_s)
    if (isinstance(timeout, bool) or not isinstance(timeout, int | float)
            or not 0 < timeout < float("inf")):
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout!r}")
    return check_id, min(float(timeout), limit_s)
