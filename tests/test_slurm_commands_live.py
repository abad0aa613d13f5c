"""The Slurm-commands backend against a real Slurm 22.05 cluster (scripts/slurm-cluster.sh).

Each test puts back what it changed (jobs cancelled, nodes resumed). The test that stops
slurmctld runs last in this file and restarts it through the script.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Sequence

import pytest

from marduk_slurm.adapters.slurm.base import SlurmJob
from marduk_slurm.adapters.slurm.commands import CommandsBackend, SlurmCommandRunner
from marduk_slurm.domain.slurm_state import JobState
from marduk_slurm.errors import SlurmError, SlurmUnavailable

from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm

NODES = ["n1", "n2", "n3", "n4"]


@pytest.fixture
async def backend(slurm_cluster: SlurmCluster) -> AsyncIterator[CommandsBackend]:  # noqa: F811
    runner = SlurmCommandRunner(timeout_s=15, slurm_conf=slurm_cluster.slurm_conf)
    backend = CommandsBackend(runner)
    yield backend
    await runner.run(["scancel", "--user=root"], check=False)
    drained = [n.name for n in await backend.list_nodes() if n.name in NODES and n.reason]
    if drained:
        await backend.resume(drained)


async def submit(backend: CommandsBackend, *args: str) -> int:
    result = await backend.runner.run(["sbatch", "--parsable", "--chdir=/tmp", *args])
    return int(result.stdout.strip().split(";")[0])


async def wait_running(backend: CommandsBackend, job_ids: Sequence[int]) -> dict[int, SlurmJob]:
    for _ in range(100):
        jobs = {job.job_id: job for job in await backend.list_jobs()}
        if all(jobs[j].state is JobState.RUNNING for j in job_ids if j in jobs):
            return jobs
        await asyncio.sleep(0.1)
    raise AssertionError(f"jobs {job_ids} not running: {jobs}")


async def test_list_nodes(backend: CommandsBackend) -> None:
    nodes = {node.name: node for node in await backend.list_nodes()}
    assert set(NODES) <= set(nodes)
    assert all(nodes[name].gpus == 2 and nodes[name].state.is_available() for name in NODES)


async def test_drain_shows_reason_and_user_then_resume(backend: CommandsBackend) -> None:
    await backend.drain(["n3"], "marduk test: xid 79")
    node = next(n for n in await backend.list_nodes() if n.name == "n3")
    assert node.state.is_drained() and "DRAIN" in node.flags
    assert (node.reason, node.reason_user) == ("marduk test: xid 79", "root")
    await backend.resume(["n3"])
    # 22.05 marks a resumed node NOT_RESPONDING until its next ping (~1 s here)
    for _ in range(50):
        node = next(n for n in await backend.list_nodes() if n.name == "n3")
        if node.state.is_available():
            break
        await asyncio.sleep(0.1)
    assert node.state.is_available() and not node.reason


async def test_hostlist_batch_is_one_call(backend: CommandsBackend) -> None:
    before = backend.stats().get("calls.scontrol", 0)
    await backend.drain(["n4", "n2", "n3"], "batch")
    assert backend.stats()["calls.scontrol"] == before + 1
    drained = {n.name for n in await backend.list_nodes() if n.state.is_drained()}
    assert {"n2", "n3", "n4"} <= drained
    await backend.resume(["n2", "n3", "n4"])


async def test_drained_node_keeps_its_job_and_gets_no_new_one(backend: CommandsBackend) -> None:
    first = await submit(
        backend, "-w", "n1", "--gres=gpu:1", "-J", "mk-first", "--wrap", "sleep 30"
    )
    jobs = await wait_running(backend, [first])
    assert jobs[first].gpu_indices == {"n1": (0,)}
    await backend.drain(["n1"], "marduk test")
    node = next(n for n in await backend.list_nodes() if n.name == "n1")
    assert node.state.is_draining()
    # a job that could fit beside the first one on n1 must be placed elsewhere now
    second = await submit(backend, "--gres=gpu:1", "-J", "mk-second", "--wrap", "sleep 30")
    jobs = await wait_running(backend, [first, second])
    assert jobs[first].state is JobState.RUNNING and jobs[first].nodes == ("n1",)
    assert jobs[second].nodes and "n1" not in jobs[second].nodes


async def test_signal_step(backend: CommandsBackend) -> None:
    job = await submit(backend, "-N2", "--gres=gpu:1", "-J", "mk-steps", "--wrap", "srun sleep 30")
    await wait_running(backend, [job])
    for _ in range(50):
        steps = [s for s in await backend.list_steps() if s.job_id == job and s.step_id == 0]
        if steps:
            break
        await asyncio.sleep(0.1)
    assert len(steps[0].nodes) == 2
    await backend.signal_step(job, 0, signal.SIGCONT)  # harmless, proves the call shape
    with pytest.raises(SlurmError, match="Invalid job id"):
        await backend.signal_step(999_999, 0, signal.SIGCONT)


async def test_unknown_node_is_a_refusal(backend: CommandsBackend) -> None:
    with pytest.raises(SlurmError, match="Invalid node name") as info:
        await backend.drain(["nosuchnode"], "x")
    assert not isinstance(info.value, SlurmUnavailable)


async def test_resume_of_a_node_not_drained_is_refused(backend: CommandsBackend) -> None:
    with pytest.raises(SlurmError, match="Invalid node state"):
        await backend.resume(["n4"])


async def test_requeue_unknown_job_is_refused(backend: CommandsBackend) -> None:
    with pytest.raises(SlurmError, match="Invalid job id"):
        await backend.requeue(999_999)


async def test_stopped_controller_is_unavailable(
    backend: CommandsBackend,
    slurm_cluster: SlurmCluster,  # noqa: F811
) -> None:
    assert await backend.ping()
    pid = int((slurm_cluster.base / "run" / "slurmctld.pid").read_text())
    proc = await asyncio.create_subprocess_exec("kill", "-TERM", str(pid))
    await proc.wait()
    try:
        for _ in range(100):  # the leader exits last; wait until the port is free
            if not await backend.ping():
                break
            await asyncio.sleep(0.1)
        assert not await backend.ping()
        # scontrol retries ~9 s, then prints "Unable to contact slurm controller"
        with pytest.raises(SlurmUnavailable, match="Unable to contact"):
            await backend.drain(["n1"], "controller is down")
        short = CommandsBackend(
            SlurmCommandRunner(timeout_s=0.5, slurm_conf=slurm_cluster.slurm_conf)
        )
        with pytest.raises(SlurmUnavailable, match="no answer within"):
            await short.list_nodes()
    finally:
        await asyncio.to_thread(slurm_cluster.up)
    assert await backend.ping()
