"""Parsers and error classification, on output recorded from a real Slurm 22.05 cluster.

The files in tests/data/slurm were captured from scripts/slurm-cluster.sh while jobs ran
(one with `srun` steps), n2 was drained under a running job, x1/x2 were node records
without a slurmd, and slurmctld was stopped (the *_unreachable files).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from marduk_slurm.adapters.slurm import parse
from marduk_slurm.adapters.slurm.base import BATCH_STEP
from marduk_slurm.domain.slurm_state import JobState, NodeBase, NodeFlag
from marduk_slurm.errors import SlurmError, SlurmUnavailable

DATA = Path(__file__).parent / "data" / "slurm"


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def test_sinfo_json_nodes() -> None:
    nodes = {node.name: node for node in parse.parse_sinfo_json(recorded("sinfo.json"))}
    assert sorted(nodes) == ["n1", "n2", "n3", "n4", "x1", "x2"]
    n2 = nodes["n2"]
    assert n2.state.base is NodeBase.MIXED
    assert n2.state.is_draining() and not n2.state.is_drained()
    assert n2.flags == ("DRAIN",)
    assert n2.reason == "xid 79 on gpu1"
    assert n2.reason_user == "root"
    assert n2.reason_time is not None and n2.reason_time.year == 2026
    assert (n2.gpus, n2.cpus, n2.partitions) == (2, 2, ("debug",))
    assert nodes["n4"].state.is_available()
    assert nodes["x1"].state.is_drained()
    assert nodes["x1"].state.has(NodeFlag.NOT_RESPONDING)
    # 22.05 names a reason user even without a reason; the parser does not pass it on
    assert nodes["x2"].reason_user is None


def test_scontrol_nodes_agree_with_sinfo_json() -> None:
    text_nodes = parse.parse_scontrol_nodes(recorded("scontrol_show_node.txt"))
    json_nodes = parse.parse_sinfo_json(recorded("sinfo.json"))
    for text_node, json_node in zip(text_nodes, json_nodes, strict=True):
        assert text_node.name == json_node.name
        assert text_node.state == json_node.state
        assert (text_node.reason, text_node.reason_user) == (
            json_node.reason,
            json_node.reason_user,
        )
        assert (text_node.gpus, text_node.cpus) == (json_node.gpus, json_node.cpus)
        assert text_node.partitions == json_node.partitions


def test_scontrol_node_reason_with_spaces_and_equals() -> None:
    line = (
        "NodeName=g7 CPUTot=8 Gres=gpu:a100:4(S:0-1) State=IDLE+DRAIN Partitions=gpu,debug "
        "Reason=xid 79 on gpu=3 (fell off bus) [slurm@2026-01-02T03:04:05]"
    )
    (node,) = parse.parse_scontrol_nodes(line)
    assert node.reason == "xid 79 on gpu=3 (fell off bus)"
    assert node.reason_user == "slurm"
    assert node.gpus == 4
    assert node.partitions == ("gpu", "debug")


def test_sinfo_json_unreachable_controller_is_unavailable() -> None:
    # recorded: sinfo --json exits 0 with slurmctld stopped; only `errors` says so
    with pytest.raises(SlurmUnavailable, match="Unspecified error"):
        parse.parse_sinfo_json(recorded("sinfo_unreachable.json"))


def test_sinfo_json_garbage_is_an_error() -> None:
    with pytest.raises(SlurmError, match="not JSON"):
        parse.parse_sinfo_json("sinfo: error: something")


def test_scontrol_jobs_with_gpu_indices() -> None:
    jobs = {job.job_id: job for job in parse.parse_scontrol_jobs(recorded("scontrol_show_job.txt"))}
    assert jobs[1].name == "train-a" and jobs[1].user == "root"
    assert jobs[1].state is JobState.RUNNING
    assert jobs[1].nodes == ("n1", "n2")  # still running on the drained n2
    assert jobs[1].gpu_indices == {"n1": (0,), "n2": (0,)}
    assert jobs[2].gpu_indices == {"n3": (0, 1)}
    assert jobs[3].state is JobState.PENDING and jobs[3].nodes == () and jobs[3].gpu_indices == {}


def test_scontrol_jobs_different_gpus_per_node() -> None:
    jobs = parse.parse_scontrol_jobs(recorded("scontrol_show_job_multi.txt"))
    spread = next(job for job in jobs if job.name == "spread")
    assert spread.gpu_indices == {"n1": (1,), "n2": (0,)}


def test_scontrol_steps() -> None:
    steps = parse.parse_scontrol_steps(recorded("scontrol_show_step.txt"))
    assert [step.label for step in steps] == ["1.batch", "1.0", "2.batch", "2.0"]
    assert steps[0].step_id == BATCH_STEP
    assert steps[1].nodes == ("n1", "n2")
    assert steps[3].name == "worker" and steps[3].state is JobState.RUNNING


def test_empty_answers_parse_to_nothing() -> None:
    assert parse.parse_scontrol_steps(recorded("scontrol_show_step_after.txt")) == []
    assert parse.parse_scontrol_jobs("No jobs in the system\n") == []


@pytest.mark.parametrize(
    ("gres", "indices"),
    [
        ("gpu:1(IDX:0)", (0,)),
        ("gpu:2(IDX:0-1)", (0, 1)),
        ("gpu:a100:3(IDX:0,2-3)", (0, 2, 3)),
        ("gpu:1(IDX:N/A)", ()),
        ("nic:1(IDX:0),gpu:1(IDX:5)", (5,)),
        ("", ()),
    ],
)
def test_gpu_indices_of(gres: str, indices: tuple[int, ...]) -> None:
    assert parse.gpu_indices_of(gres) == indices


@pytest.mark.parametrize(
    ("gres", "count"),
    [("gpu:2", 2), ("gpu:a100:4(S:0-1)", 4), ("gpu:a100:2,gpu:h100:2", 4), ("(null)", 0)],
)
def test_gpu_count(gres: str, count: int) -> None:
    assert parse.gpu_count(gres) == count


@pytest.mark.parametrize(
    ("name", "error_type", "text"),
    [
        ("err_unreachable_update.txt", SlurmUnavailable, "Unable to contact slurm controller"),
        ("err_unknown_node.txt", SlurmError, "Invalid node name specified"),
        ("err_invalid_state.txt", SlurmError, "Invalid node state specified"),
        ("err_no_reason.txt", SlurmError, "must specify a reason"),
        ("err_invalid_job.txt", SlurmError, "Invalid job id specified"),
    ],
)
def test_classify_recorded_errors(name: str, error_type: type[SlurmError], text: str) -> None:
    error = parse.classify_failure("scontrol update", 1, recorded(name))
    assert type(error) is error_type
    assert text in str(error)
    assert str(error).startswith("scontrol update: ")


def test_unavailable_is_also_a_connection_error() -> None:
    error = parse.classify_failure("scontrol", 1, recorded("err_unreachable_update.txt"))
    assert isinstance(error, ConnectionError)
