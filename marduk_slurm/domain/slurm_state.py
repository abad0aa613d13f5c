"""Slurm node and job states as values, parsed from the strings Slurm prints.

A node state is one base state plus flags: `scontrol show node` prints `MIXED+DRAIN`,
`sinfo --json` (22.05) gives `"mixed"` and `["DRAIN"]`, newer Slurm a list
`["MIXED", "DRAIN"]`, and `sinfo -o %t` short forms like `drng` or `idle*`. All parse to the
same `NodeState`. Flags this code does not know are kept by name in `other_flags`, so a newer
Slurm never makes parsing fail; an unknown *base* state does, because every decision here
depends on it.

Drain semantics (Slurm's): DRAIN is a flag. With jobs still on the node (ALLOCATED/MIXED or
COMPLETING) the node is *draining*; once empty it is *drained*.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


class NodeBase(enum.StrEnum):
    IDLE = "IDLE"
    ALLOCATED = "ALLOCATED"
    MIXED = "MIXED"
    DOWN = "DOWN"
    ERROR = "ERROR"
    FUTURE = "FUTURE"
    UNKNOWN = "UNKNOWN"


class NodeFlag(enum.Flag):
    NONE = 0
    DRAIN = enum.auto()
    NOT_RESPONDING = enum.auto()
    COMPLETING = enum.auto()
    FAIL = enum.auto()
    MAINTENANCE = enum.auto()
    RESERVED = enum.auto()
    REBOOT_REQUESTED = enum.auto()
    REBOOT_ISSUED = enum.auto()
    POWERED_DOWN = enum.auto()
    POWERING_DOWN = enum.auto()
    POWERING_UP = enum.auto()
    POWER_DOWN = enum.auto()
    CLOUD = enum.auto()
    PLANNED = enum.auto()
    INVALID_REG = enum.auto()


# Names Slurm uses besides the canonical ones (short sinfo codes, older spellings).
_BASE_ALIASES = {
    "ALLOC": NodeBase.ALLOCATED,
    "MIX": NodeBase.MIXED,
    "UNK": NodeBase.UNKNOWN,
    "FUT": NodeBase.FUTURE,
    "ERR": NodeBase.ERROR,
}
_FLAG_ALIASES = {
    "NO_RESPOND": NodeFlag.NOT_RESPONDING,
    "MAINT": NodeFlag.MAINTENANCE,
    "RESV": NodeFlag.RESERVED,
    "COMP": NodeFlag.COMPLETING,
    "POWER_UP": NodeFlag.POWERING_UP,
    "POWERED_UP": NodeFlag.NONE,
}
# sinfo's short form encodes some flags as one trailing character.
_SUFFIX_FLAGS = {
    "*": NodeFlag.NOT_RESPONDING,
    "~": NodeFlag.POWERED_DOWN,
    "#": NodeFlag.POWERING_UP,
    "%": NodeFlag.POWERING_DOWN,
    "!": NodeFlag.POWER_DOWN,
    "$": NodeFlag.MAINTENANCE,
    "@": NodeFlag.REBOOT_REQUESTED,
    "^": NodeFlag.REBOOT_ISSUED,
    "-": NodeFlag.PLANNED,
}
# sinfo folds DRAIN into the name: drain = idle+drain, drng = busy+drain.
_COMBINED = {
    "DRAIN": (NodeBase.IDLE, NodeFlag.DRAIN),
    "DRAINED": (NodeBase.IDLE, NodeFlag.DRAIN),
    "DRNG": (NodeBase.MIXED, NodeFlag.DRAIN),
    "DRAINING": (NodeBase.MIXED, NodeFlag.DRAIN),
    "MAINT": (NodeBase.IDLE, NodeFlag.MAINTENANCE),
    "RESV": (NodeBase.IDLE, NodeFlag.RESERVED),
    "RESERVED": (NodeBase.IDLE, NodeFlag.RESERVED),
    "COMP": (NodeBase.ALLOCATED, NodeFlag.COMPLETING),
    "COMPLETING": (NodeBase.ALLOCATED, NodeFlag.COMPLETING),
    "FAIL": (NodeBase.DOWN, NodeFlag.FAIL | NodeFlag.DRAIN),
    "FAILING": (NodeBase.ALLOCATED, NodeFlag.FAIL | NodeFlag.DRAIN),
}

_BUSY = frozenset({NodeBase.ALLOCATED, NodeBase.MIXED})
# Any of these keeps the scheduler from starting new work on the node.
_UNSCHEDULABLE = (
    NodeFlag.DRAIN
    | NodeFlag.NOT_RESPONDING
    | NodeFlag.FAIL
    | NodeFlag.MAINTENANCE
    | NodeFlag.REBOOT_REQUESTED
    | NodeFlag.REBOOT_ISSUED
    | NodeFlag.POWERED_DOWN
    | NodeFlag.POWERING_DOWN
    | NodeFlag.POWER_DOWN
    | NodeFlag.INVALID_REG
)


@dataclass(frozen=True)
class NodeState:
    """One node's state: a base state and its flags."""

    base: NodeBase
    flags: NodeFlag = NodeFlag.NONE
    other_flags: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_str(cls, text: str) -> NodeState:
        """Parse `MIXED+DRAIN`, `DOWN+NOT_RESPONDING`, `idle*`, `drng`, ..."""
        parts = [part for part in text.strip().split("+") if part]
        if not parts:
            raise ValueError(f"empty node state {text!r}")
        return cls.from_parts(parts[0], parts[1:])

    @classmethod
    def from_parts(cls, state: str | Sequence[str], flags: Iterable[str] = ()) -> NodeState:
        """Parse sinfo --json's `state` (a string in 22.05, a list later) and `state_flags`."""
        words = [state] if isinstance(state, str) else list(state)
        if not words:
            raise ValueError("node state list is empty")
        base, base_flags = _parse_base(words[0])
        known, other = _parse_flags([*words[1:], *flags])
        return cls(base, base_flags | known, frozenset(other))

    def has(self, flag: NodeFlag) -> bool:
        return bool(self.flags & flag)

    def is_draining(self) -> bool:
        """DRAIN is set but jobs still run (or clean up) on the node."""
        busy = self.base in _BUSY or self.has(NodeFlag.COMPLETING)
        return self.has(NodeFlag.DRAIN) and busy

    def is_drained(self) -> bool:
        """DRAIN is set and no job is left on the node: safe to work on it."""
        return self.has(NodeFlag.DRAIN) and not self.is_draining()

    def is_available(self) -> bool:
        """The scheduler may start new work here (it is up, responding, not drained)."""
        if self.base not in (NodeBase.IDLE, NodeBase.MIXED, NodeBase.ALLOCATED):
            return False
        return not self.flags & _UNSCHEDULABLE

    def flag_names(self) -> tuple[str, ...]:
        """All flags by Slurm name, known first, for display and JSON."""
        known = [flag.name for flag in NodeFlag if flag.name and flag in self.flags]
        return tuple(known + sorted(self.other_flags))

    def __str__(self) -> str:
        return "+".join([self.base.value, *self.flag_names()])


def _parse_base(word: str) -> tuple[NodeBase, NodeFlag]:
    name, suffix_flags = _strip_suffixes(word)
    if name in _COMBINED:
        base, flags = _COMBINED[name]
        return base, flags | suffix_flags
    alias = _BASE_ALIASES.get(name)
    if alias is not None:
        return alias, suffix_flags
    try:
        return NodeBase(name), suffix_flags
    except ValueError:
        raise ValueError(f"unknown Slurm node state {word!r}") from None


def _strip_suffixes(word: str) -> tuple[str, NodeFlag]:
    name = word.strip().upper()
    flags = NodeFlag.NONE
    while name and name[-1] in _SUFFIX_FLAGS:
        flags |= _SUFFIX_FLAGS[name[-1]]
        name = name[:-1]
    if not name:
        raise ValueError(f"node state {word!r} has no name")
    return name, flags


def _parse_flags(words: Iterable[str]) -> tuple[NodeFlag, list[str]]:
    known = NodeFlag.NONE
    other: list[str] = []
    for word in words:
        name = word.strip().upper()
        if not name:
            continue
        flag = _FLAG_ALIASES.get(name)
        if flag is None:
            flag = NodeFlag.__members__.get(name)
        if flag is None:
            other.append(name)
        else:
            known |= flag
    return known, other


class JobState(enum.StrEnum):
    """A job's (or step's) state as Slurm names it."""

    PENDING = "PENDING"
    CONFIGURING = "CONFIGURING"
    RUNNING = "RUNNING"
    SUSPENDED = "SUSPENDED"
    COMPLETING = "COMPLETING"
    REQUEUED = "REQUEUED"
    REQUEUE_HOLD = "REQUEUE_HOLD"
    REQUEUE_FED = "REQUEUE_FED"
    RESIZING = "RESIZING"
    SIGNALING = "SIGNALING"
    STAGE_OUT = "STAGE_OUT"
    STOPPED = "STOPPED"
    SPECIAL_EXIT = "SPECIAL_EXIT"
    COMPLETED = "COMPLETED"
    CANCELLED = "CANCELLED"
    FAILED = "FAILED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"
    PREEMPTED = "PREEMPTED"
    BOOT_FAIL = "BOOT_FAIL"
    DEADLINE = "DEADLINE"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    REVOKED = "REVOKED"

    @classmethod
    def from_str(cls, text: str) -> JobState:
        """Parse `RUNNING`, `CANCELLED by 0`, `PD`, `COMPLETING+...`, `running`."""
        word = text.strip().split(" ", 1)[0].split("+", 1)[0].upper()
        if not word:
            raise ValueError(f"empty job state {text!r}")
        state = _JOB_SHORT.get(word)
        if state is not None:
            return state
        try:
            return cls(word)
        except ValueError:
            raise ValueError(f"unknown Slurm job state {text!r}") from None

    def is_terminal(self) -> bool:
        """The job is over: it holds no resources and will not run again by itself."""
        return self in _JOB_TERMINAL

    def is_active(self) -> bool:
        """Processes may still exist on its nodes."""
        return self in _JOB_ACTIVE


_JOB_SHORT = {
    "PD": JobState.PENDING,
    "CF": JobState.CONFIGURING,
    "R": JobState.RUNNING,
    "S": JobState.SUSPENDED,
    "CG": JobState.COMPLETING,
    "RQ": JobState.REQUEUED,
    "RH": JobState.REQUEUE_HOLD,
    "RF": JobState.REQUEUE_FED,
    "RS": JobState.RESIZING,
    "SI": JobState.SIGNALING,
    "SO": JobState.STAGE_OUT,
    "ST": JobState.STOPPED,
    "SE": JobState.SPECIAL_EXIT,
    "CD": JobState.COMPLETED,
    "CA": JobState.CANCELLED,
    "F": JobState.FAILED,
    "TO": JobState.TIMEOUT,
    "NF": JobState.NODE_FAIL,
    "PR": JobState.PREEMPTED,
    "BF": JobState.BOOT_FAIL,
    "DL": JobState.DEADLINE,
    "OOM": JobState.OUT_OF_MEMORY,
    "RV": JobState.REVOKED,
}
_JOB_TERMINAL = frozenset(
    {
        JobState.COMPLETED,
        JobState.CANCELLED,
        JobState.FAILED,
        JobState.TIMEOUT,
        JobState.NODE_FAIL,
        JobState.PREEMPTED,
        JobState.BOOT_FAIL,
        JobState.DEADLINE,
        JobState.OUT_OF_MEMORY,
        JobState.REVOKED,
    }
)
_JOB_ACTIVE = frozenset(
    {
        JobState.CONFIGURING,
        JobState.RUNNING,
        JobState.SUSPENDED,
        JobState.COMPLETING,
        JobState.RESIZING,
        JobState.SIGNALING,
        JobState.STAGE_OUT,
        JobState.STOPPED,
    }
)


# Slurm's step ids for the steps without a number (slurm.h): a step id stays an int
# everywhere, and only its label names these.
PENDING_STEP = 0xFFFFFFFD
EXTERN_STEP = 0xFFFFFFFC
BATCH_STEP = 0xFFFFFFFB
INTERACTIVE_STEP = 0xFFFFFFFA
STEP_NAMES = {
    PENDING_STEP: "pending",
    EXTERN_STEP: "extern",
    BATCH_STEP: "batch",
    INTERACTIVE_STEP: "interactive",
}
STEP_IDS = {name: number for number, name in STEP_NAMES.items()}


def step_name(step_id: int) -> str:
    """`0`, or `batch` for the batch script's step, as Slurm names it."""
    return STEP_NAMES.get(step_id, str(step_id))


def step_label(job_id: int, step_id: int) -> str:
    """`123.0` or `123.batch`, as Slurm prints a step.

    >>> step_label(5, BATCH_STEP)
    '5.batch'
    """
    return f"{job_id}.{step_name(step_id)}"
