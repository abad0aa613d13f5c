"""A stand-in for the `pyslurm` module (25.11), for tests on machines without Slurm 25.11.

It is NOT Slurm and proves nothing about Slurm's behaviour: it only mirrors the names and
call shapes of pyslurm 25.11 that `marduk_slurm.adapters.slurm.pyslurm_backend` uses
(read from pyslurm's sources: core/node.pyx, core/job/job.pyx, core/job/step.pyx,
core/error.pyx, core/slurmctld/base.pyx), records every call in `calls`, and returns the
canned objects a test puts in `nodes`, `jobs` and `steps`. `fail_next` makes the next call
raise `RPCError(errno, msg)`; `block` makes calls wait until released (a hung slurmctld).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

calls: list[tuple[str, Any]] = []
nodes: dict[str, Any] = {}
jobs: dict[int, Any] = {}
steps: dict[int, dict[Any, Any]] = {}
fail_next: list[tuple[int, str]] = []
block = threading.Event()
block.set()


class PyslurmError(Exception):
    pass


class RPCError(PyslurmError):
    # pyslurm: RPCError(errno=SLURM_ERROR, msg=None) with .errno and .msg
    def __init__(self, errno: int = -1, msg: str | None = None) -> None:
        self.errno = errno
        self.msg = msg or f"errno {errno}"
        super().__init__(self.msg)


def reset() -> None:
    calls.clear()
    nodes.clear()
    jobs.clear()
    steps.clear()
    fail_next.clear()
    block.set()


def _rpc(name: str, arg: Any = None) -> None:
    block.wait()
    calls.append((name, arg))
    if fail_next:
        errno, msg = fail_next.pop(0)
        raise RPCError(errno, msg)


def slurm_init(config_path: str | None = None) -> None:
    calls.append(("slurm_init", config_path))


def slurm_fini() -> None:
    calls.append(("slurm_fini", None))


class Node:
    """pyslurm.Node(name=None, **kwargs); only the writable fields we use are accepted."""

    _WRITABLE = frozenset({"state", "reason", "comment", "weight"})

    def __init__(self, name: str | None = None, **kwargs: Any) -> None:
        unknown = set(kwargs) - self._WRITABLE
        if unknown:
            raise AttributeError(f"pyslurm.Node has no writable attribute {sorted(unknown)}")
        self.name = name
        self.changes = kwargs


class Nodes(dict):
    """pyslurm.Nodes(list_of_names) and Nodes.load(); modify() sends one update RPC."""

    def __init__(self, names: list[str] | None = None) -> None:
        super().__init__({name: Node(name) for name in names or []})

    @staticmethod
    def load(preload_passwd_info: bool = False) -> dict[str, Any]:
        _rpc("Nodes.load")
        return dict(nodes)

    def modify(self, changes: Node) -> None:
        if not isinstance(changes, Node):
            raise TypeError("Nodes.modify takes a pyslurm.Node")
        _rpc("Nodes.modify", (sorted(self), dict(changes.changes)))


@dataclass
class FakeNode:
    """The read-only attributes of a loaded pyslurm.Node that the backend reads."""

    name: str
    state: str = "IDLE"
    reason: str | None = None
    reason_user: str | None = None
    reason_time: int | None = None
    configured_gres: dict[str, Any] = field(default_factory=dict)
    total_cpus: int = 2
    partitions: list[str] = field(default_factory=list)


@dataclass
class FakeJob:
    id: int
    name: str = "job"
    user_name: str = "root"
    state: str = "RUNNING"
    allocated_nodes: str | None = None
    layout: dict[str, Any] = field(default_factory=dict)

    def get_resource_layout_per_node(self) -> dict[str, Any]:
        return self.layout


class Job:
    def __init__(self, job_id: int) -> None:
        self.id = job_id

    @staticmethod
    def load(job_id: int) -> Any:
        _rpc("Job.load", job_id)
        return jobs[job_id]

    def requeue(self, hold: bool = False) -> None:
        _rpc("Job.requeue", (self.id, hold))

    def send_signal(self, signal: int | str, steps: str = "children", hurry: bool = False) -> None:
        _rpc("Job.send_signal", (self.id, signal, steps))


class Jobs(dict):
    @staticmethod
    def load(preload_passwd_info: bool = False, frozen: bool = False) -> dict[int, Any]:
        _rpc("Jobs.load")
        return dict(jobs)


@dataclass
class FakeStep:
    job_id: int
    id: int | str
    name: str = "step"
    state: str = "RUNNING"
    allocated_nodes: list[str] = field(default_factory=list)


class JobStep:
    """pyslurm.JobStep(job_id=0, step_id=0); step_id may be "batch"/"extern"."""

    def __init__(self, job_id: int = 0, step_id: int | str = 0, **kwargs: Any) -> None:
        if isinstance(step_id, str) and step_id not in ("batch", "extern", "interactive"):
            raise ValueError(f"bad step id {step_id!r}")
        self.job_id = job_id
        self.id = step_id

    def send_signal(self, signal: int | str) -> None:
        _rpc("JobStep.send_signal", (self.job_id, self.id, signal))


class JobSteps(dict):
    @staticmethod
    def load_all() -> dict[int, dict[Any, Any]]:
        _rpc("JobSteps.load_all")
        return {job_id: dict(by_step) for job_id, by_step in steps.items()}


def _ping_primary() -> Any:
    _rpc("slurmctld.ping_primary")
    return SimpleNamespace(is_primary=True, is_responding=True, index=0, latency=0.5)


slurmctld = SimpleNamespace(ping_primary=_ping_primary)
