"""The pyslurm backend against a stand-in module that checks call shapes only.

pyslurm 25.11 needs Slurm 25.11 libraries and cannot run against this project's 22.05 test
cluster; tests/fakes/fake_pyslurm.py mirrors the pyslurm names the backend uses. These tests
prove the backend calls them as pyslurm's sources say, and maps results and errors; they
prove nothing about Slurm itself (the commands backend's live tests do that).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator

import pytest

from marduk_slurm.adapters.slurm.base import BATCH_STEP
from marduk_slurm.adapters.slurm.pyslurm_backend import PyslurmBackend
from marduk_slurm.domain.slurm_state import JobState, NodeBase
from marduk_slurm.errors import SlurmError, SlurmUnavailable

from fakes import fake_pyslurm


@pytest.fixture
def backend() -> Iterator[PyslurmBackend]:
    fake_pyslurm.reset()
    backend = PyslurmBackend(timeout_s=2, module=fake_pyslurm)
    yield backend
    fake_pyslurm.block.set()
    backend.close()


async def test_drain_is_one_modify_call_for_many_nodes(backend: PyslurmBackend) -> None:
    await backend.drain(["n3", "n1", "n2", "n1"], "xid 79")
    assert fake_pyslurm.calls == [
        ("Nodes.modify", (["n1", "n2", "n3"], {"state": "DRAIN", "reason": "xid 79"}))
    ]
    assert backend.stats()["calls.drain"] == 1


async def test_resume_and_down_states(backend: PyslurmBackend) -> None:
    await backend.resume(["n1"])
    await backend.down(["n2"], "gpu lost")
    assert fake_pyslurm.calls == [
        ("Nodes.modify", (["n1"], {"state": "RESUME"})),
        ("Nodes.modify", (["n2"], {"state": "DOWN", "reason": "gpu lost"})),
    ]


async def test_drain_needs_a_reason(backend: PyslurmBackend) -> None:
    with pytest.raises(ValueError, match="reason"):
        await backend.drain(["n1"], " ")
    assert fake_pyslurm.calls == []


async def test_list_nodes_maps_fields(backend: PyslurmBackend) -> None:
    fake_pyslurm.nodes["n2"] = fake_pyslurm.FakeNode(
        name="n2",
        state="MIXED+DRAIN",
        reason="xid 79",
        reason_user="root",
        reason_time=1_795_460_879,
        configured_gres={"gpu": 2},
        partitions=["debug"],
    )
    (node,) = await backend.list_nodes()
    assert node.state.base is NodeBase.MIXED and node.state.is_draining()
    assert (node.reason, node.reason_user, node.gpus, node.partitions) == (
        "xid 79",
        "root",
        2,
        ("debug",),
    )
    assert node.reason_time is not None


async def test_list_jobs_takes_gpu_indices_from_the_layout(backend: PyslurmBackend) -> None:
    fake_pyslurm.jobs[7] = fake_pyslurm.FakeJob(
        id=7,
        name="train",
        allocated_nodes="n[1-2]",
        layout={
            "n1": {"cpu_ids": "0", "gres": {"gpu": {"count": 1, "indexes": "1"}}, "memory": 0},
            "n2": {"cpu_ids": "0", "gres": {"gpu:a100": {"count": 2, "indexes": "0-1"}}},
        },
    )
    fake_pyslurm.jobs[8] = fake_pyslurm.FakeJob(id=8, state="PENDING")
    jobs = {job.job_id: job for job in await backend.list_jobs()}
    assert jobs[7].nodes == ("n1", "n2")
    assert jobs[7].gpu_indices == {"n1": (1,), "n2": (0, 1)}
    assert jobs[8].state is JobState.PENDING and jobs[8].nodes == ()


async def test_list_steps_maps_batch_and_rejoins_hostlists(backend: PyslurmBackend) -> None:
    fake_pyslurm.steps[7] = {
        "batch": fake_pyslurm.FakeStep(7, "batch", "batch", allocated_nodes=["n1"]),
        0: fake_pyslurm.FakeStep(7, 0, "train", allocated_nodes=["n[1", "3]"]),
    }
    steps = {step.label: step for step in await backend.list_steps()}
    assert steps["7.batch"].step_id == BATCH_STEP
    assert steps["7.0"].nodes == ("n1", "n3")


async def test_signal_step_and_requeue(backend: PyslurmBackend) -> None:
    await backend.signal_step(7, 0, signal.SIGUSR1)
    await backend.signal_step(7, BATCH_STEP, signal.SIGTERM)
    await backend.requeue(7)
    assert fake_pyslurm.calls == [
        ("JobStep.send_signal", (7, 0, signal.SIGUSR1)),
        ("JobStep.send_signal", (7, "batch", signal.SIGTERM)),
        ("Job.requeue", (7, False)),
    ]


@pytest.mark.parametrize(
    ("errno", "error_type"),
    [
        (1800, SlurmUnavailable),
        (1001, SlurmUnavailable),
        (2017, SlurmError),
        (2027, SlurmUnavailable),
    ],
)
async def test_rpc_errors_are_classified(
    backend: PyslurmBackend, errno: int, error_type: type[SlurmError]
) -> None:
    fake_pyslurm.fail_next.append((errno, "message from slurm"))
    with pytest.raises(error_type, match="message from slurm") as info:
        await backend.drain(["n1"], "x")
    assert type(info.value) is error_type
    assert backend.stats()["failures.drain"] == 1


async def test_a_hung_call_times_out_and_later_calls_fail_fast(backend: PyslurmBackend) -> None:
    backend.timeout_s = 0.1
    fake_pyslurm.block.clear()
    with pytest.raises(SlurmUnavailable, match="no answer"):
        await backend.list_nodes()
    with pytest.raises(SlurmUnavailable, match="still blocked"):
        await backend.drain(["n1"], "x")
    assert await backend.ping() is False
    fake_pyslurm.block.set()


async def test_ping(backend: PyslurmBackend) -> None:
    assert await backend.ping() is True
    fake_pyslurm.fail_next.append((1800, "Unable to contact slurm controller"))
    assert await backend.ping() is False


def test_calls_run_on_the_named_thread(backend: PyslurmBackend) -> None:
    seen: list[str] = []
    backend._thread.submit(lambda: seen.append(threading.current_thread().name)).result()
    assert seen[0].startswith("pyslurm")


def test_explicit_slurm_conf_initialises_the_module() -> None:
    fake_pyslurm.reset()
    backend = PyslurmBackend(timeout_s=1, slurm_conf="/etc/x/slurm.conf", module=fake_pyslurm)
    backend.close()
    assert fake_pyslurm.calls == [("slurm_init", "/etc/x/slurm.conf")]
