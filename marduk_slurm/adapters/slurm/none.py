"""The backend used when `slurm.backend = "none"`: no Slurm at all (a laptop, a demo of the
controller alone). Reads return nothing; actions stay queued in the outbox, visibly, rather
than pretending to succeed."""

from __future__ import annotations

import signal
from collections.abc import Sequence

from marduk_slurm.adapters.slurm.base import SlurmJob, SlurmNode, SlurmStep
from marduk_slurm.errors import SlurmUnavailable


class NoSlurm:
    name = "none"
    lists_steps = False

    async def list_nodes(self) -> list[SlurmNode]:
        return []

    async def get_nodes(self, names: Sequence[str]) -> list[SlurmNode]:
        return []

    async def list_jobs(self) -> list[SlurmJob]:
        return []

    async def list_steps(self) -> list[SlurmStep]:
        return []

    async def drain(self, nodes: Sequence[str], reason: str) -> None:
        raise SlurmUnavailable("no Slurm backend configured (slurm.backend = none)")

    async def resume(self, nodes: Sequence[str]) -> None:
        raise SlurmUnavailable("no Slurm backend configured (slurm.backend = none)")

    async def down(self, nodes: Sequence[str], reason: str) -> None:
        raise SlurmUnavailable("no Slurm backend configured (slurm.backend = none)")

    async def signal_step(self, job_id: int, step_id: int, signum: int = signal.SIGTERM) -> None:
        raise SlurmUnavailable("no Slurm backend configured (slurm.backend = none)")

    async def requeue(self, job_id: int) -> None:
        raise SlurmUnavailable("no Slurm backend configured (slurm.backend = none)")

    async def ping(self) -> bool:
        return False

    def stats(self) -> dict[str, int]:
        return {}
