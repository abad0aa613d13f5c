"""What the rest of marduk-slurm sees of Slurm: three values and one protocol.

Values are frozen and hold only what the controller decides on. Every backend method is
async; a backend never blocks the event loop (subprocesses, or a thread for pyslurm).
Errors: `SlurmUnavailable` (slurmctld unreachable or too slow: retry later) and `SlurmError`
(Slurm answered and refused: unknown node, invalid state; or its output did not parse). Both
carry Slurm's own message. `InvalidSlurmArgument` is a `SlurmError` raised before any call,
for a node name or reason that must not reach Slurm (domain/slurm_names.py has the rules).

This module imports none of its siblings: the backends import it, and `factory` builds them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from marduk_slurm.domain import slurm_names
from marduk_slurm.domain.slurm_state import (  # noqa: F401  (the backends import them here)
    BATCH_STEP,
    EXTERN_STEP,
    INTERACTIVE_STEP,
    PENDING_STEP,
    STEP_IDS,
    STEP_NAMES,
    JobState,
    NodeState,
    step_label,
)
from marduk_slurm.errors import SlurmError


class InvalidSlurmArgument(SlurmError, ValueError):
    """A node name or reason refused before any Slurm call; retrying will not help."""


def checked_node_names(nodes: Sequence[str]) -> list[str]:
    """`nodes` sorted and deduplicated, each a valid Slurm node name, or InvalidSlurmArgument."""
    names = sorted(set(nodes))
    try:
        return slurm_names.check_node_names(names)
    except ValueError as err:
        raise InvalidSlurmArgument(str(err)) from None


def checked_reason(reason: str, action: str) -> str:
    """`reason` as one printable line for Slurm; InvalidSlurmArgument when nothing is left
    (Slurm refuses a drain or down without one; saying so here names the caller's bug)."""
    line = slurm_names.sanitize_reason(reason)
    if not line:
        raise InvalidSlurmArgument(f"{action} needs a non-empty reason")
    return line


@dataclass(frozen=True)
class SlurmNode:
    """One node as slurmctld sees it.

    `state` carries the base state and the flags this code understands; `flags` lists every
    flag by Slurm's name, including ones a newer Slurm added. `reason_user`/`reason_time` say
    who set `reason` and when (None when Slurm does not say).
    """

    name: str
    state: NodeState
    flags: tuple[str, ...] = ()
    reason: str = ""
    reason_user: str | None = None
    reason_time: datetime | None = None
    gpus: int = 0
    cpus: int = 0
    partitions: tuple[str, ...] = ()


@dataclass(frozen=True)
class SlurmJob:
    """One job; `gpu_indices` maps each allocated node to the GPU indices the job holds there."""

    job_id: int
    name: str
    user: str
    state: JobState
    nodes: tuple[str, ...] = ()
    gpu_indices: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class SlurmStep:
    """One job step; `step_id` uses the `*_STEP` constants for batch/extern/interactive."""

    job_id: int
    step_id: int
    name: str
    nodes: tuple[str, ...]
    state: JobState

    @property
    def label(self) -> str:
        """`123.0` or `123.batch`, as Slurm prints it."""
        return step_label(self.job_id, self.step_id)


class SlurmBackend(Protocol):
    """The Slurm operations the controller needs. Node lists may hold thousands of names."""

    name: str
    # Whether list_steps() is Slurm's truth; when it is not (no Slurm at all), an empty
    # answer must not end every step the controller knows.
    lists_steps: bool

    async def list_nodes(self) -> list[SlurmNode]: ...

    async def get_nodes(self, names: Sequence[str]) -> list[SlurmNode]:
        """The named nodes only (cheaper than `list_nodes` on a large cluster); names Slurm
        does not know are left out of the answer."""
        ...

    async def list_jobs(self) -> list[SlurmJob]: ...

    async def list_steps(self) -> list[SlurmStep]: ...

    async def drain(self, nodes: Sequence[str], reason: str) -> None:
        """Stop new work on `nodes`; running jobs keep running. `reason` must not be empty."""
        ...

    async def resume(self, nodes: Sequence[str]) -> None:
        """Return drained or down nodes to service (Slurm refuses nodes in neither state)."""
        ...

    async def down(self, nodes: Sequence[str], reason: str) -> None:
        """Mark `nodes` DOWN: Slurm kills (or requeues) the jobs on them."""
        ...

    async def signal_step(self, job_id: int, step_id: int, signum: int) -> None: ...

    async def requeue(self, job_id: int) -> None: ...

    async def ping(self) -> bool:
        """True when slurmctld answers; never raises for an unreachable controller."""
        ...

    def stats(self) -> dict[str, int]:
        """Counters: `calls`, `failures`, and per-operation `calls.<op>`/`failures.<op>`."""
        ...

