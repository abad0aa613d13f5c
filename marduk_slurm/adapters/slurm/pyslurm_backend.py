"""The pyslurm backend: Slurm's C API through pyslurm 25.11 (for Slurm 25.11 clusters only).

pyslurm is built against one Slurm major version and must match the cluster's (see
docs/slurm.md). Names used here are pyslurm 25.11's: `Nodes.load()`, `Nodes([...]).modify(
Node(state=..., reason=...))` (one RPC for many nodes: pyslurm joins the names into a
hostlist), `Jobs.load()`, `Job.get_resource_layout_per_node()` for GPU indices,
`JobSteps.load_all()`, `JobStep(job_id, step_id).send_signal(n)`, `Job(id).requeue()`,
`slurmctld.ping_primary()`, and `RPCError` with `.errno` and `.msg`.

Every pyslurm call blocks, so each runs in one named thread ("pyslurm", which also keeps
libslurm's non-thread-safe state on a single thread) with a time limit. A call past its
limit keeps the thread; later calls then fail at once as unavailable instead of queueing.

Node names and reasons pass the same checks as the commands backend (domain/slurm_names.py).
Anything a call raises, pyslurm's own errors or a loaded object of an unexpected shape,
leaves as a `SlurmError`.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from types import ModuleType
from typing import Any, TypeVar

from marduk_slurm.adapters.slurm.base import (
    STEP_IDS,
    SlurmJob,
    SlurmNode,
    SlurmStep,
    checked_node_names,
    checked_reason,
)
from marduk_slurm.adapters.slurm.parse import index_ranges
from marduk_slurm.domain import hostlist
from marduk_slurm.domain.slurm_state import JobState, NodeState
from marduk_slurm.errors import SlurmError, SlurmUnavailable

T = TypeVar("T")

# slurm_errno.h: codes meaning "slurmctld did not answer" rather than "it said no".
_UNAVAILABLE_ERRNOS = frozenset(
    [*range(1001, 1005), *range(1800, 1900), *range(5000, 5006), 2027]  # 2027: standby
)


class PyslurmBackend:
    """`SlurmBackend` over pyslurm. `module` replaces the import (tests pass a stand-in)."""

    name = "pyslurm"
    lists_steps = True

    def __init__(
        self,
        *,
        timeout_s: float,
        slurm_conf: str | None = None,
        module: ModuleType | Any | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self._pyslurm = module if module is not None else _import_pyslurm(slurm_conf)
        if module is not None and slurm_conf is not None:
            self._pyslurm.slurm_init(slurm_conf)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pyslurm")
        self._overrun: Future[Any] | None = None
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    async def list_nodes(self) -> list[SlurmNode]:
        return await self._call("list_nodes", lambda: [
            _node(node) for node in self._pyslurm.Nodes.load().values()])

    async def get_nodes(self, names: Sequence[str]) -> list[SlurmNode]:
        wanted = set(names)
        return [n for n in await self.list_nodes() if n.name in wanted]

    async def list_jobs(self) -> list[SlurmJob]:
        return await self._call("list_jobs", self._load_jobs)

    async def list_steps(self) -> list[SlurmStep]:
        return await self._call("list_steps", lambda: [
            _step(step) for steps in self._pyslurm.JobSteps.load_all().values()
            for step in steps.values()])

    async def drain(self, nodes: Sequence[str], reason: str) -> None:
        await self._modify_nodes("drain", nodes, state="DRAIN",
                                 reason=checked_reason(reason, "drain"))

    async def resume(self, nodes: Sequence[str]) -> None:
        await self._modify_nodes("resume", nodes, state="RESUME")

    async def down(self, nodes: Sequence[str], reason: str) -> None:
        await self._modify_nodes("down", nodes, state="DOWN",
                                 reason=checked_reason(reason, "down"))

    async def signal_step(self, job_id: int, step_id: int, signum: int) -> None:
        def send() -> None:
            # JobStep takes "batch"/"extern" by name and converts them back itself.
            step = self._pyslurm.JobStep(job_id, _step_arg(step_id))
            step.send_signal(signum)

        await self._call("signal_step", send)

    async def requeue(self, job_id: int) -> None:
        await self._call("requeue", lambda: self._pyslurm.Job(job_id).requeue())

    async def ping(self) -> bool:
        try:
            response = await self._call("ping", self._pyslurm.slurmctld.ping_primary)
        except SlurmError:
            return False
        return bool(getattr(response, "is_responding", False))

    def stats(self) -> dict[str, int]:
        counters = {"calls": sum(self.calls.values()), "failures": sum(self.failures.values())}
        counters.update({f"calls.{op}": n for op, n in self.calls.items()})
        counters.update({f"failures.{op}": n for op, n in self.failures.items()})
        return counters

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _load_jobs(self) -> list[SlurmJob]:
        # The resource layout reads the loaded job's memory: keep it on the pyslurm thread.
        return [_job(job) for job in self._pyslurm.Jobs.load().values()]

    async def _modify_nodes(self, op: str, nodes: Sequence[str], **changes: str) -> None:
        names = checked_node_names(nodes)
        if not names:
            return

        def modify() -> None:
            self._pyslurm.Nodes(names).modify(self._pyslurm.Node(**changes))

        await self._call(op, modify)

    async def _call(self, op: str, func: Callable[[], T]) -> T:
        self.calls[op] += 1
        if self._overrun is not None and not self._overrun.done():
            self.failures[op] += 1
            raise SlurmUnavailable(f"pyslurm {op}: an earlier call is still blocked")
        future = self._thread.submit(func)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except TimeoutError:
            self._overrun = future
            self.failures[op] += 1
            raise SlurmUnavailable(f"pyslurm {op}: no answer within {self.timeout_s:g} s") from None
        except self._pyslurm.RPCError as err:
            self.failures[op] += 1
            raise _classify(op, err) from err
        except SlurmError:
            self.failures[op] += 1
            raise
        except Exception as err:
            # pyslurm's other errors, or a loaded object the mapping does not understand:
            # a failed call for the caller, not an exception type it cannot expect.
            self.failures[op] += 1
            raise SlurmError(f"pyslurm {op}: {type(err).__name__}: {str(err)[:200]}") from err


def _import_pyslurm(slurm_conf: str | None) -> ModuleType:
    """Import pyslurm; with an explicit config, initialise libslurm with it instead."""
    already = "pyslurm" in sys.modules
    if slurm_conf is not None and not already:
        # pyslurm calls slurm_init() at import unless told not to; it must see our file.
        os.environ["PYSLURM_DISABLE_AUTO_INIT"] = "1"
    try:
        module = importlib.import_module("pyslurm")
    except ImportError as err:
        raise SlurmError(f"pyslurm cannot be imported ({err}); use the commands backend") from err
    if slurm_conf is not None:
        if already:
            module.slurm_fini()
        module.slurm_init(slurm_conf)
    return module


def _classify(op: str, err: Any) -> SlurmError:
    errno = getattr(err, "errno", None)
    message = f"pyslurm {op}: {getattr(err, 'msg', None) or err} (errno {errno})"
    if errno in _UNAVAILABLE_ERRNOS:
        return SlurmUnavailable(message)
    return SlurmError(message)


def _step_arg(step_id: int) -> int | str:
    for name, number in STEP_IDS.items():
        if number == step_id:
            return name
    return step_id


def _node(node: Any) -> SlurmNode:
    state = NodeState.from_str(node.state or "UNKNOWN")
    reason_time = node.reason_time
    gres = node.configured_gres or {}
    return SlurmNode(
        name=node.name,
        state=state,
        flags=state.flag_names(),
        reason=node.reason or "",
        reason_user=node.reason_user or None,
        reason_time=datetime.fromtimestamp(reason_time, UTC) if reason_time else None,
        gpus=sum(_gres_count(v) for k, v in gres.items() if k.split(":", 1)[0] == "gpu"),
        cpus=node.total_cpus or 0,
        partitions=tuple(node.partitions or ()),
    )


def _job(job: Any) -> SlurmJob:
    layout: Mapping[str, Any] = job.get_resource_layout_per_node() or {}
    gpu_indices = {
        node: _layout_gpu_indices(info.get("gres") or {}) for node, info in layout.items()
    }
    return SlurmJob(
        job_id=int(job.id),
        name=job.name or "",
        user=job.user_name or "",
        state=JobState.from_str(job.state),
        # allocated_nodes is the hostlist string, e.g. "n[1-2]" (None while pending)
        nodes=tuple(hostlist.expand(job.allocated_nodes or "")),
        gpu_indices={node: idx for node, idx in gpu_indices.items() if idx},
    )


def _layout_gpu_indices(gres: Mapping[str, Any]) -> tuple[int, ...]:
    """pyslurm's layout gres: {"gpu": {"count": 2, "indexes": "0-1"}} or {"gpu:a100": ...}."""
    indices: list[int] = []
    for name, value in gres.items():
        if name.split(":", 1)[0] == "gpu" and isinstance(value, Mapping):
            text = str(value.get("indexes") or "")
            if text[:1].isdigit():
                indices.extend(index_ranges(text))
    return tuple(sorted(set(indices)))


def _gres_count(value: Any) -> int:
    if isinstance(value, Mapping):
        return int(value.get("count", 0))
    return int(value) if str(value).isdigit() else 0


def _step(step: Any) -> SlurmStep:
    step_id = step.id
    return SlurmStep(
        job_id=int(step.job_id),
        step_id=STEP_IDS[step_id] if isinstance(step_id, str) else int(step_id),
        name=step.name or "",
        # pyslurm splits the step's hostlist on commas ("n[1,3]" -> ["n[1", "3]"]): rejoin
        nodes=tuple(hostlist.expand(",".join(step.allocated_nodes or ()))),
        state=JobState.from_str(step.state),
    )
