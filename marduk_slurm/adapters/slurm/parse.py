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
- A reason holding newlines (anyone with scontrol can set one) is printed by `show -o` as
  its first line, ` [user@time]`, then each further line after eight spaces; `sinfo --json`
  gives it as written, with `\n`. A raw line break inside a record (other versions, a `\r`)
  continues the record before it.

Output that does not parse (garbage, a stray line, JSON of the wrong shape, a missing key,
an absurd number) raises `SlurmError`, like any other failed Slurm call; no other exception
type leaves this module's `parse_*` functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from marduk_slurm.adapters.slurm.base import STEP_IDS, SlurmJob, SlurmNode, SlurmStep
from marduk_slurm.domain import hostlist
from marduk_slurm.domain.slurm_state import JobState, NodeState
from marduk_slurm.errors import SlurmError, SlurmUnavailable

# A key starts a new pair only after whitespace; keys hold letters, digits and _ / : . only.
_PAIR_START = re.compile(r"(?:^|\s)([A-Za-z][\w/:.]*)=")
# The reason runs to the end of the record; ` [user@time]` follows its first line, and its
# further lines follow after eight spaces (22.05, `-o`) or a line break (folded records).
_REASON = re.compile(
    r"\sReason=(?P<text>[^\n]*?)(?: \[(?P<user>[^@\]\n]*)@(?P<time>[^\]\n]*)\])?"
    r"(?P<more>(?: {8}[^\n]*|\n[^\n]*)*?)\s*$"
)
_REASON_LINE_BREAK = re.compile(r"\n\s*| {8}")
_GRES_IDX = re.compile(r"^gpu(?::[^:(]+)?:(?P<count>\d+)\(IDX:(?P<idx>[^)]*)\)")
_GRES_COUNT = re.compile(r"^gpu(?::[^:(]+)?:(?P<count>\d+)")
_EMPTY_ANSWER = re.compile(r"^No \w+( \w+)* in the system\s*$")

# Bounds past which a number in Slurm's output is garbage, not a cluster.
MAX_GPUS_PER_NODE = 1024
MAX_CPUS_PER_NODE = 1 << 20
MAX_SLURM_ID = (1 << 32) - 1  # job and step ids are uint32_t in slurm.h

T = TypeVar("T")
# What a parser raises on input it does not understand; each becomes a SlurmError.
_PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError,
                 OSError, RecursionError)

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


def records(text: str, first_key: str) -> Iterator[str]:
    """One string per record, each starting with `first_key=`; the "No ... in the system"
    sentence yields nothing.

    Only `\n` ends a line (`str.splitlines` would also split on `\r` and `\x1c` inside a
    reason). A line that does not start a record continues the one before it, joined with
    `\n`; one before any record is garbage and raises ValueError.
    """
    start = f"{first_key}="
    record: str | None = None
    for line in text.split("\n"):
        if not line.strip() or (record is None and _EMPTY_ANSWER.match(line.strip())):
            continue
        if line.startswith(start):
            if record is not None:
                yield record
            record = line.rstrip("\r")
        elif record is None:
            raise ValueError(f"expected a record starting with {start!r}, got {line[:80]!r}")
        else:
            record = f"{record}\n{line.rstrip(chr(13))}"
    if record is not None:
        yield record


def parse_scontrol_nodes(text: str) -> list[SlurmNode]:
    """`scontrol show -o node` -> nodes; SlurmError for output that does not parse."""
    nodes = _parsing("scontrol show node", lambda: [
        _scontrol_node(line) for line in records(text, "NodeName")])
    names = [node.name for node in nodes]
    if len(set(names)) != len(names):
        # A reason can hold a line that looks like a record; a repeated node shows one did.
        raise SlurmError("scontrol show node: a node is listed twice; output not trusted")
    return nodes


def _scontrol_node(line: str) -> SlurmNode:
    reason_match = _REASON.search(line)
    reason, user, when = "", None, None
    if reason_match is not None:
        line = line[: reason_match.start()]
        more = _REASON_LINE_BREAK.split(reason_match.group("more"))
        lines = [reason_match.group("text").strip(), *(part.strip() for part in more)]
        reason = "\n".join(part for part in lines if part)
        user = reason_match.group("user") or None
        when = _parse_time(reason_match.group("time"))
    if "\n" in line:
        raise ValueError(f"a line break outside the reason in {line[:80]!r}")
    fields = dict(pairs(line))
    state = NodeState.from_str(fields.get("State", "UNKNOWN"))
    return SlurmNode(
        name=_name(fields["NodeName"]),
        state=state,
        flags=state.flag_names(),
        reason=reason,
        reason_user=user,
        reason_time=when,
        gpus=_bounded(gpu_count(fields.get("Gres", "")), MAX_GPUS_PER_NODE, "GPU count"),
        cpus=_bounded(_int(fields.get("CPUTot", "0")), MAX_CPUS_PER_NODE, "CPU count"),
        partitions=_split_list(fields.get("Partitions", "")),
    )


def parse_sinfo_json(text: str) -> list[SlurmNode]:
    """`sinfo --json` -> nodes; raises SlurmUnavailable when its `errors` list is set, and
    SlurmError for output that is not the JSON sinfo prints."""
    data = _load_json(text, "sinfo --json")
    _raise_json_errors(data, "sinfo --json")
    return _parsing("sinfo --json", lambda: _json_nodes(data))


def _json_nodes(data: Mapping[str, Any]) -> list[SlurmNode]:
    items = data.get("nodes", [])
    if not isinstance(items, list):
        raise TypeError(f"'nodes' is a {type(items).__name__}, not a list")
    nodes = [_json_node(item) for item in items]
    if len({node.name for node in nodes}) != len(nodes):
        raise ValueError("a node is listed twice")
    return nodes


def _json_node(item: Mapping[str, Any]) -> SlurmNode:
    if not isinstance(item, Mapping):
        raise TypeError(f"a node is a {type(item).__name__}, not an object")
    state = NodeState.from_parts(item.get("state") or "UNKNOWN", item.get("state_flags") or ())
    reason_time = _json_number(item.get("reason_changed_at"))
    partitions = item.get("partitions") or ()
    reason = _json_text(item.get("reason"), "reason")
    user = _json_text(item.get("reason_set_by_user"), "reason_set_by_user")
    return SlurmNode(
        name=_name(item["name"]),
        state=state,
        flags=state.flag_names(),
        reason=reason,
        # 22.05 names a user even for a node that never had a reason; only trust it with one.
        reason_user=(user or None) if reason else None,
        reason_time=datetime.fromtimestamp(reason_time, UTC) if reason and reason_time else None,
        gpus=_bounded(gpu_count(_json_text(item.get("gres"), "gres")), MAX_GPUS_PER_NODE,
                      "GPU count"),
        cpus=_bounded(_json_number(item.get("cpus")), MAX_CPUS_PER_NODE, "CPU count"),
        partitions=_json_partitions(partitions),
    )


def parse_scontrol_jobs(text: str) -> list[SlurmJob]:
    """`scontrol -d show -o job` -> jobs, with GPU indices per node from the detail groups;
    SlurmError for output that does not parse."""
    return _parsing("scontrol show job", lambda: [
        _scontrol_job(line) for line in records(text, "JobId")])


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
        job_id=_bounded(int(fields["JobId"]), MAX_SLURM_ID, "job id"),
        name=fields.get("JobName", ""),
        user=fields.get("UserId", "").split("(", 1)[0],
        state=JobState.from_str(fields.get("JobState", "PENDING")),
        nodes=tuple(hostlist.expand(node_list)) if node_list not in ("", "(null)") else (),
        gpu_indices=gpu_indices,
    )


def parse_scontrol_steps(text: str) -> list[SlurmStep]:
    """`scontrol show -o step` -> steps; SlurmError for output that does not parse."""
    return _parsing("scontrol show step", lambda: [
        _scontrol_step(line) for line in records(text, "StepId")])


def _scontrol_step(line: str) -> SlurmStep:
    fields = dict(pairs(line))
    job_text, _, step_text = fields["StepId"].partition(".")
    node_list = fields.get("NodeList", "")
    step_id = STEP_IDS[step_text] if step_text in STEP_IDS else int(step_text)
    return SlurmStep(
        job_id=_bounded(int(job_text), MAX_SLURM_ID, "job id"),
        step_id=_bounded(step_id, MAX_SLURM_ID, "step id"),
        name=fields.get("Name", ""),
        nodes=tuple(hostlist.expand(node_list)) if node_list else (),
        state=JobState.from_str(fields.get("State", "RUNNING")),
    )


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
    """`0-1,3` -> [0, 1, 3]; ValueError past `MAX_GPUS_PER_NODE` indices (checked before
    building them) or on anything else."""
    bounds: list[tuple[int, int]] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        if not low.isdigit() or (high and not high.isdigit()) or len(low + high) > 36:
            raise ValueError(f"bad index range {part[:40]!r} in {text[:80]!r}")
        bounds.append((int(low), int(high or low)))
    if sum(high - low + 1 for low, high in bounds) > MAX_GPUS_PER_NODE:
        raise ValueError(f"index range {text[:80]!r} holds more than {MAX_GPUS_PER_NODE}")
    return [index for low, high in bounds for index in range(low, high + 1)]


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
    if not isinstance(errors, list):
        raise SlurmError(f"{command}: 'errors' is a {type(errors).__name__}, not a list")
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


def _parsing(command: str, parse: Callable[[], T]) -> T:
    """`parse()`, with anything it raises on bad input turned into SlurmError: output Slurm's
    command printed but that does not parse is a failed call, never a crash of the caller."""
    try:
        return parse()
    except _PARSE_ERRORS as err:
        raise SlurmError(f"{command}: output not understood ({type(err).__name__}: "
                         f"{str(err)[:200]})") from err


def _load_json(text: str, command: str) -> Mapping[str, Any]:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or absurd nesting
        raise SlurmError(f"{command}: output is not JSON ({str(err)[:200]})") from err
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
    return int(text) if text.isdigit() and len(text) < 20 else 0


def _bounded(value: int, limit: int, what: str) -> int:
    if not 0 <= value <= limit:
        raise ValueError(f"{what} {value} is outside 0..{limit}")
    return value


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"node name {str(value)[:40]!r} is empty or not text")
    return value


def _json_text(value: Any, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"{key!r} is a {type(value).__name__}, not a string")
    return value


def _json_partitions(value: Any) -> tuple[str, ...]:
    parts = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(part, str) for part in parts):
        raise TypeError("'partitions' holds something other than strings")
    return parts


def _json_number(value: Any) -> int:
    """22.05 prints plain numbers; 23.x+ wraps them as {"set": bool, "number": n}."""
    if isinstance(value, Mapping):
        return int(value.get("number", 0)) if value.get("set", True) else 0
    return int(value) if isinstance(value, int | float) else 0
