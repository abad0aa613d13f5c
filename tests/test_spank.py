"""The marduk SPANK plugin (spank/marduk_spank.c) in a real Slurm 22.05 cluster.

A Python listener on the agent socket stands in for the node agent. Every step's tasks write
their environment to a file named after the node, so the test compares what the task saw
(SLURM_STEP_GPUS, SLURM_JOB_ID) with what the plugin exported and reported.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from spank_fixtures import (  # noqa: F401  (fixtures)
    CREDS_DIR,
    NATS_URL,
    AgentListener,
    SpankCluster,
    agent_listener_fixture,
    plugstack_line,
    spank_cluster_fixture,
)

pytestmark = pytest.mark.slurm

BATCH_STEP = 4294967291
# The batch script has no SLURM_STEP_ID; its file ends in ".batch".
ENV_DUMP = ('env | grep -E "^(MARDUK_|SLURM_JOB_ID=|SLURM_STEP_GPUS=)"'
            " > {dir}/env.$SLURMD_NODENAME.${{SLURM_STEP_ID:-batch}}")


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return dict(pairs)


def of_job(lines: list[dict[str, Any]], job_id: int) -> list[dict[str, Any]]:
    return [x for x in lines if x["job_id"] == job_id]


def sbatch(cluster: SpankCluster, tmp_path: Path, script: str, *options: str) -> int:
    """Submit, wait for the job to end (-W), return its id; the job must succeed."""
    path = tmp_path / "job.sh"
    path.write_text(f"#!/bin/bash\nset -e\n{script}\n")
    result = cluster.run("sbatch", "-W", "--parsable", f"--chdir={tmp_path}",
                         f"--output={tmp_path}/job.out", *options, str(path))
    output = (tmp_path / "job.out").read_text() if (tmp_path / "job.out").exists() else ""
    assert result.returncode == 0, f"sbatch failed: {result.stderr}\n{output}"
    return int(result.stdout.strip().split(";")[0])


def test_srun_step_reports_start_and_end_per_node(
        spank_cluster: SpankCluster, agent_listener: AgentListener, tmp_path: Path) -> None:
    result = spank_cluster.run("srun", "-N2", "--gres=gpu:1", f"--chdir={tmp_path}", "bash",
                               "-c", ENV_DUMP.format(dir=tmp_path))
    assert result.returncode == 0, result.stderr
    env = {node: read_env(tmp_path / f"env.{node}.0") for node in ("n1", "n2")}
    job_id = int(env["n1"]["SLURM_JOB_ID"])
    lines = agent_listener.wait_for(
        lambda ls: sum(x["event"] == "step_end" for x in of_job(ls, job_id)) == 2)
    starts = {x["node"]: x for x in of_job(lines, job_id) if x["event"] == "step_start"}
    ends = {x["node"]: x for x in of_job(lines, job_id) if x["event"] == "step_end"}
    assert set(starts) == set(ends) == {"n1", "n2"}, lines  # once per node, not per task
    for node in ("n1", "n2"):
        gpus = [int(g) for g in env[node]["SLURM_STEP_GPUS"].split(",")]
        assert starts[node] == {"v": 1, "event": "step_start", "job_id": job_id, "step_id": 0,
                                "node": node, "gpu_indices": gpus,
                                "pid": starts[node]["pid"], "uid": 0}
        assert ends[node]["exit_status"] == 0 and ends[node]["pid"] == starts[node]["pid"]
        assert env[node]["MARDUK_JOB_ID"] == str(job_id)
        assert env[node]["MARDUK_STEP_ID"] == "0"
        assert env[node]["MARDUK_NODE"] == node
        assert env[node]["MARDUK_GPUS"] == env[node]["SLURM_STEP_GPUS"]
        assert env[node]["MARDUK_NATS_URL"] == NATS_URL
        assert env[node]["MARDUK_NATS_CREDS"] == f"{CREDS_DIR}/{job_id}.json"


def test_sbatch_job_reports_batch_step_and_failed_srun_step(
        spank_cluster: SpankCluster, agent_listener: AgentListener, tmp_path: Path) -> None:
    dump = ENV_DUMP.format(dir=tmp_path)
    script = f"{dump}\nsrun --gres=gpu:1 bash -c '{dump}; exit 3' || true"
    job_id = sbatch(spank_cluster, tmp_path, script, "-N1", "--gres=gpu:1")
    lines = agent_listener.wait_for(
        lambda ls: sum(x["event"] == "step_end" for x in of_job(ls, job_id)) == 2)
    by_key = {(x["event"], x["step_id"]): x for x in of_job(lines, job_id)}
    batch_env = read_env(next(tmp_path.glob("env.*.batch")))
    node = batch_env["MARDUK_NODE"]
    gpus = [int(g) for g in batch_env["MARDUK_GPUS"].split(",")]
    assert by_key["step_start", BATCH_STEP]["node"] == node
    assert by_key["step_start", BATCH_STEP]["gpu_indices"] == gpus
    assert by_key["step_end", BATCH_STEP]["exit_status"] == 0
    assert by_key["step_start", 0]["gpu_indices"] == gpus
    assert by_key["step_end", 0]["exit_status"] == 3
    assert batch_env["MARDUK_STEP_ID"] == str(BATCH_STEP)
    assert read_env(tmp_path / f"env.{node}.0")["MARDUK_STEP_ID"] == "0"


def test_marduk_off_suppresses_reports_and_environment(
        spank_cluster: SpankCluster, agent_listener: AgentListener, tmp_path: Path) -> None:
    dump = ENV_DUMP.format(dir=tmp_path)
    job_id = sbatch(spank_cluster, tmp_path, f"{dump}\nsrun --gres=gpu:1 bash -c '{dump}'",
                    "--marduk=off", "--gres=gpu:1")
    # A job with reports on, submitted after, proves the listener was listening.
    on_id = sbatch(spank_cluster, tmp_path, "true", "--marduk=on")
    agent_listener.wait_for(lambda ls: any(x["event"] == "step_end" for x in of_job(ls, on_id)))
    assert of_job(agent_listener.snapshot(), job_id) == []
    for path in tmp_path.glob("env.*"):
        assert not any(k.startswith("MARDUK_") for k in read_env(path)), path


def test_bad_option_value_is_refused(spank_cluster: SpankCluster) -> None:
    result = spank_cluster.run("sbatch", "--marduk=maybe", "--wrap=true")
    assert result.returncode != 0
    assert "--marduk takes on or off" in result.stderr


@pytest.mark.parametrize("stale_socket", [False, True], ids=["no-socket", "stale-socket"])
def test_jobs_run_when_agent_is_absent(
        spank_cluster: SpankCluster, tmp_path: Path, stale_socket: bool) -> None:
    spank_cluster.socket_path.unlink(missing_ok=True)
    if stale_socket:  # a socket file nobody listens on: connect() is refused
        listener = AgentListener(spank_cluster.socket_path).start()
        listener._sock.close()  # type: ignore[union-attr]
    started = time.monotonic()
    job_id = sbatch(spank_cluster, tmp_path, "srun -N2 --gres=gpu:1 true", "-N2",
                    "--gres=gpu:1")
    took = time.monotonic() - started
    print(f"job {job_id} with no agent: {took:.2f} s")
    spank_cluster.socket_path.unlink(missing_ok=True)


def test_strict_required_plugin_fails_step_without_agent(
        spank_cluster: SpankCluster, tmp_path: Path) -> None:
    """strict=1 on a `required` line is the one case where a missing agent fails the step.
    Runs last here: it restarts the cluster twice (plugstack changes)."""
    default = spank_cluster.plugstack
    spank_cluster.reconfigure(plugstack_line("default=on", "strict=1", required=True))
    try:
        spank_cluster.socket_path.unlink(missing_ok=True)
        marker = tmp_path / "ran"
        # srun 22.05 exits 0 even when the launch fails, so look at what happened instead.
        failed = spank_cluster.run("srun", "-N1", "touch", str(marker))
        assert "required plugin marduk_spank.so: task_post_fork() failed" in failed.stderr
        assert not marker.exists()
        listener = AgentListener(spank_cluster.socket_path).start()
        try:
            ok = spank_cluster.run("srun", "-N1", "true")
        finally:
            listener.stop()
        assert ok.returncode == 0, ok.stderr
        off = spank_cluster.run("srun", "-N1", "--marduk=off", "true")
        assert off.returncode == 0, off.stderr  # off means no report, so nothing can fail
    finally:
        spank_cluster.reconfigure(default)
