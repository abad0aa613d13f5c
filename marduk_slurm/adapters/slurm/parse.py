"""Pure parsers for what Slurm's commands print, and the error classifier.

Tested against output recorded from a real Slurm 22.05 cluster (tests/data/slurm). Facts
those recordings show:
- `scontrol show -o` prints one record per line as `Key=Value` pairs, but values may hold
  spaces (`OS=Linux 6.1 #1 SMP`), a node's `Reason=` runs to the end of the line with
  `[user@time]` appended, and `scontrol -d show -o job` repeats `Nodes=... GRES=gpu:1(IDX:0)`
  once per group of nodes with the same allocation.
- An empty answer is a sentence on stdout: "No job steps in the system".
- `sinfo --json` exits 0 even when slurmctld is unreachable; the failure is only in its
  `errors` list (`"Unspecified error"`, errno -1) next to an empty `nodes` list.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from marduk_slurm.adapters.slurm.base import STEP_IDS, SlurmJob, SlurmNode, SlurmStep
from marduk_slurm.domain import hostlist
from marduk_slurm.domain.slurm_state import JobState, NodeState
from marduk_slurm.errors import SlurmError, SlurmUnavailable

# A key starts a new pair only after whitespace; keys hold letters, digits and _ / : . only.
_PAIR_START = re.compile(r"(?:^|\s)([A-Za-z][\w/:.]*)=")
_REASON = re.compile(r"\sReason=(?P<text>.*?)(?: \[(?P<user>[^@\]]*)@(?P<time>[^\]]*)\])?\s*$")
_GRES_IDX = re.compile(r"^gpu(?::[^:(]+)?:(?P<count>\d+)\(IDX:(?P<idx>[^)]*)\)")
_GRES_COUNT = re.compile(r"^gpu(?::[^:(]+)?:(?P<count>\d+)")
_EMPTY_ANSWER = re.compile(r"^No \w+( \w+)* in the system\s*$")

# Messages meaning "slurmctld did not answer" (src/common/slurm_errno.c), as opposed to
# "slurmctld answered no". Matched case-insensitively anywhere in stderr.
_UNAVAILABLE_MARKERS = (
    "unable to contact slurm controller",
    "communication connection failure",
    "socket timed out",
    "connection refused",
    "zero bytes were transmitted or received",
    "slurmctld is down",
    "in standby mode",
    "slurm backup controller in standby mode",
)


def pairs(line: str) -> list[tuple[str, str]]:
    """`Key=Value` pairs of one `scontrol show -o` record, in order, repeats kept."""
    starts = list(_PAIR_START.finditer(line))
    result: list[tuple[str, str]] = []
    for i, match in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(line)
        result.append((match.group(1), line[match.end() : end].strip()))
    return result


def records(text: str) -> Iterator[str]:
    """Non-empty record lines; the "No ... in the system" sentence yields nothing."""
    for line in text.splitlines():
        if line.strip() and not _EMPTY_ANSWER.match(line.strip()):
            yield line


def parse_scontrol_nodes(text: str) -> list[SlurmNode]:
    """`scontrol show -o node` -> nodes."""
    return [_scontrol_node(line) for line in records(text)]


def _scontrol_node(line: str) -> SlurmNode:
    reason_match = _REASON.search(line)
    reason, user, when = "", None, None
    if reason_match is not None:
        line = line[: reason_match.start()]
        reason = reason_match.group("text").strip()
        user = reason_match.group("user") or None
        when = _parse_time(reason_match.group("time"))
    fields = dict(pairs(line))
    state = NodeState.from_str(fields.get("State", "UNKNOWN"))
    return SlurmNode(
        name=fields["NodeName"],
        state=state,
        flags=state.flag_names(),
        reason=reason,
        reason_user=user,
        reason_time=when,
        gpus=gpu_count(fields.get("Gres", "")),
        cpus=_int(fields.get("CPUTot", "0")),
        partitions=_split_list(fields.get("Partitions", "")),
    )


def parse_sinfo_json(text: str) -> list[SlurmNode]:
    """`sinfo --json` -> nodes; raises SlurmUnavailable when its `errors` list is set."""
    data = _load_json(text, "sinfo --json")
    _raise_json_errors(data, "sinfo --json")
    return [_json_node(item) for item in data.get("nodes", [])]


def _json_node(item: Mapping[str, Any]) -> SlurmNode:
    state = NodeState.from_parts(item.get("state") or "UNKNOWN", item.get("state_flags", ()))
    reason_time = _json_number(item.get("reason_changed_at"))
    partitions = item.get("partitions") or ()
    reason = item.get("reason") or ""
    return SlurmNode(
        name=item["name"],
        state=state,
        flags=state.flag_names(),
        reason=reason,
        # 22.05 names a user even for a node that never had a reason; only trust it with one.
        reason_user=(item.get("reason_set_by_user") or None) if reason else None,
        reason_time=datetime.fromtimestamp(reason_time, UTC) if reason and reason_time else None,
        gpus=gpu_count(item.get("gres") or ""),
        cpus=_json_number(item.get("cpus")),
        partitions=tuple(partitions) if not isinstance(partitions, str) else (partitions,),
    )


def parse_scontrol_jobs(text: str) -> list[SlurmJob]:
    """`scontrol -d show -o job` -> jobs, with GPU indices per node from the detail groups."""
    return [_scontrol_job(line) for line in records(text)]


def _scontrol_job(line: str) -> SlurmJob:
    items = pairs(line)
    fields = dict(items)
    gpu_indices: dict[str, tuple[int, ...]] = {}
    group_nodes: list[str] = []
    # Only pairs after JOB_GRES are per-node detail; `Nodes=` before it does not occur in
    # 22.05, but NumNodes/ReqNodeList must never be taken for a group.
    for key, value in items:
        if key == "Nodes":
            group_nodes = hostlist.expand(value)
        elif key == "GRES" and group_nodes:
            indices = gpu_indices_of(value)
            for node in group_nodes:
                gpu_indices[node] = indices
    node_list = fields.get("NodeList", "")
    return SlurmJob(
        job_id=int(fields["JobId"]),
        name=fields.get("JobName", ""),
        user=fields.get("UserId", "").split("(", 1)[0],
        state=JobState.from_str(fields.get("JobState", "PENDING")),
        nodes=tuple(hostlist.expand(node_list)) if node_list not in ("", "(null)") else (),
        gpu_indices=gpu_indices,
    )


def parse_scontrol_steps(text: str) -> list[SlurmStep]:
    """`scontrol show -o step` -> steps."""
    steps = []
    for line in records(text):
        fields = dict(pairs(line))
        job_text, _, step_text = fields["StepId"].partition(".")
        node_list = fields.get("NodeList", "")
        steps.append(
            SlurmStep(
                job_id=int(job_text),
                step_id=STEP_IDS[step_text] if step_text in STEP_IDS else int(step_text),
                name=fields.get("Name", ""),
                nodes=tuple(hostlist.expand(node_list)) if node_list else (),
                state=JobState.from_str(fields.get("State", "RUNNING")),
            )
        )
    return steps


def gpu_count(gres: str) -> int:
    """GPUs in a GRES string: `gpu:2`, `gpu:a100:4(S:0-1)`, `gpu:a100:2,gpu:h100:2`."""
    total = 0
    for item in _split_gres(gres):
        match = _GRES_COUNT.match(item)
        if match is not None:
            total += int(match.group("count"))
    return total


def gpu_indices_of(gres: str) -> tuple[int, ...]:
    """GPU indices in an allocation: `gpu:2(IDX:0-1)` -> (0, 1); `IDX:N/A` -> ()."""
    indices: list[int] = []
    for item in _split_gres(gres):
        match = _GRES_IDX.match(item)
        if match is None or not match.group("idx")[:1].isdigit():
            continue
        indices.extend(index_ranges(match.group("idx")))
    return tuple(sorted(set(indices)))


def index_ranges(text: str) -> list[int]:
    """`0-1,3` -> [0, 1, 3]."""
    result: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise ValueError(f"bad index range {part!r} in {text!r}")
        result.extend(range(int(low), int(high or low) + 1))
    return result


def classify_failure(command: str, returncode: int, stderr: str, stdout: str = "") -> SlurmError:
    """The error a failed Slurm command means: retryable `SlurmUnavailable` or `SlurmError`."""
    message = (stderr.strip() or stdout.strip() or f"exit status {returncode}").splitlines()
    text = "; ".join(line.strip() for line in message if line.strip())
    detail = f"{command}: {text}"
    lowered = text.lower()
    if any(marker in lowered for marker in _UNAVAILABLE_MARKERS):
        return SlurmUnavailable(detail)
    return SlurmError(detail)


def _raise_json_errors(data: Mapping[str, Any], command: str) -> None:
    errors = data.get("errors") or []
    if not errors:
        return
    text = "; ".join(
        f"{err.get('error') or err.get('description') or 'error'} (errno {err.get('errno')})"
        for err in errors
        if isinstance(err, Mapping)
    )
    # 22.05 reports an unreachable controller only as "Unspecified error", errno -1;
    # a reachable one that fails names its error, so that case is a refusal.
    unavailable = all(err.get("errno") in (-1, None) for err in errors if isinstance(err, Mapping))
    error_type = SlurmUnavailable if unavailable else SlurmError
    raise error_type(f"{command}: {text or 'errors reported'}")


def _load_json(text: str, command: str) -> Mapping[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise SlurmError(f"{command}: output is not JSON ({err})") from err
    if not isinstance(data, Mapping):
        raise SlurmError(f"{command}: expected a JSON object, got {type(data).__name__}")
    return data


def _split_gres(gres: str) -> list[str]:
    """Split on commas outside parentheses: `gpu:2(S:0,1),nic:1` -> two items."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(gres):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            items.append(gres[start:i])
            start = i + 1
    items.append(gres[start:])
    return [item.strip().removeprefix("gres:") for item in items if item.strip()]


def _split_list(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part and part != "(null)")


def _parse_time(text: str | None) -> datetime | None:
    """scontrol prints local time without a zone; keep it naive rather than guess."""
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _json_number(value: Any) -> int:
    """22.05 prints plain numbers; 23.x+ wraps them as {"set": bool, "number": n}."""
    if isinstance(value, Mapping):
        return int(value.get("number", 0)) if value.get("set", True) else 0
    return int(value) if isinstance(value, int | float) else 0
