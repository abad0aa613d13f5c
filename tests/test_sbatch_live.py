"""`marduk sbatch --submit` on a real Slurm cluster, with a bash stand-in for train.py.

Three nodes: replica groups 0 and 1 plus one spare. The stand-in makes group 0 drain its own
node and crash, and group 1 exit 75 ("told to leave") once, so the supervisor must
- respawn group 0 on the spare, not on its drained node, and
- keep group 1 waiting until a healthy node frees up (the spare, once group 0 is done),
and the job ends 0 with two restarts. Uses the SPANK test cluster (tests/spank_fixtures.py)
so draining a node there never disturbs the shared cluster's tests.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marduk_slurm.cli.main import main as marduk_main

from spank_fixtures import NODES, SpankCluster, spank_cluster_fixture  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm

LIGHTHOUSE = Path(sys.executable).parent / "torchft_lighthouse"

STAND_IN = r"""#!/bin/bash
# train.py stand-in: record what the supervisor exported, then misbehave once per group.
dir=$(dirname "$0")
run=$dir/run.$REPLICA_GROUP_ID.$SLURM_STEP_ID
env | grep -E '^(REPLICA_GROUP_ID|NUM_REPLICA_GROUPS|TORCHFT_LIGHTHOUSE)=' > "$run"
env | grep -E '^(MASTER_ADDR|MASTER_PORT|MARDUK_REPLICA_GROUP)=' >> "$run"
echo "NODE=$SLURMD_NODENAME" >> "$run"
hostport=${TORCHFT_LIGHTHOUSE#http://}
if (exec 3<>"/dev/tcp/${hostport%:*}/${hostport#*:}"); then echo LIGHTHOUSE=up >> "$run"; fi
first=$dir/first.$REPLICA_GROUP_ID
if [ ! -e "$first" ]; then
  touch "$first"
  if [ "$REPLICA_GROUP_ID" = 0 ]; then
    scontrol update nodename="$SLURMD_NODENAME" state=drain reason="marduk test: gpu fault"
    exit 3
  fi
  sleep 2
  exit 75
fi
sleep $((REPLICA_GROUP_ID == 0 ? 4 : 1))  # group 1 leaves while group 0 holds the spare
exit 0
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_gone(cluster: SpankCluster, job_id: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        out = cluster.run("squeue", "-h", "-j", str(job_id), "-o", "%T").stdout.strip()
        if not out:
            return
        time.sleep(0.3)
    cluster.run("scancel", str(job_id))
    raise AssertionError(f"job {job_id} still queued or running after {timeout_s} s")


def wait_responding(cluster: SpankCluster, timeout_s: float = 15) -> None:
    """A resumed node reads `idle*` (not responding) for a moment; later tests need it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = cluster.run("sinfo", "-h", "-N", "-o", "%t").stdout.split()
        if states and all(s == "idle" for s in states):
            return
        time.sleep(0.2)


def submit(cluster: SpankCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
           capsys: pytest.CaptureFixture[str]) -> int:
    train = tmp_path / "train.sh"
    train.write_text(STAND_IN)
    train.chmod(0o755)
    port = free_port()
    for key, value in cluster.env().items():
        monkeypatch.setenv(key, value)
    rc = marduk_main([
        "sbatch", "--submit",
        "--replica-groups", "2", "--nodes-per-group", "1", "--gpus-per-node", "1",
        "--spares", "1", "--max-restarts", "3", "--job-name", "marduk-live", "--launcher", "",
        "--sbatch-arg", f"output={tmp_path}/job.out", "--sbatch-arg", f"chdir={tmp_path}",
        "--param", f"lighthouse={LIGHTHOUSE}", "--param", f"lighthouse_port={port}",
        "--param", f"master_port={free_port()}", "--param", "poll_s=0.2",
        str(train),
    ])
    assert rc == 0, capsys.readouterr().err
    return int(capsys.readouterr().out.strip())


def test_supervisor_respawns_on_spare_and_skips_drained_node(
        spank_cluster: SpankCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    if not LIGHTHOUSE.exists():
        pytest.skip("torchft_lighthouse is not installed next to this Python")
    job_id = submit(spank_cluster, tmp_path, monkeypatch, capsys)
    try:
        wait_gone(spank_cluster, job_id)
        state = spank_cluster.run("scontrol", "show", "job", str(job_id)).stdout
    finally:
        # One at a time: resuming a node that is not drained fails the whole command.
        for node in NODES:
            spank_cluster.run("scontrol", "update", f"nodename={node}", "state=resume")
        wait_responding(spank_cluster)
    log = (tmp_path / "job.out").read_text()
    print(log)
    assert "ExitCode=0:0" in state, state
    starts = re.findall(r"group (\d): starting on (\S+)", log)
    assert starts[:2] == [("0", "n1"), ("1", "n2")]
    assert ("0", "n3") in starts and ("1", "n3") in starts
    assert len(starts) == 4 and starts.count(("0", "n1")) == 1  # drained n1 never reused
    for line in ("group 0: crashed (exit 3); respawning",
                 "group 1: told to leave (exit 75); respawning on other nodes",
                 "group 1: no healthy spare node free; waiting",
                 "all groups done after 2 restart(s)"):
        assert line in log
    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ marduk-supervisor: ", log, re.M)
    runs = [dict(line.split("=", 1) for line in p.read_text().splitlines())
            for p in sorted(tmp_path.glob("run.*"))]
    assert len(runs) == 4
    for run in runs:
        assert run["NUM_REPLICA_GROUPS"] == "2" and run["LIGHTHOUSE"] == "up"
        assert run["MARDUK_REPLICA_GROUP"] == run["REPLICA_GROUP_ID"]
        assert run["TORCHFT_LIGHTHOUSE"].startswith("http://127.0.0.1:")
        assert run["MASTER_ADDR"] == "127.0.0.1"
    ports = {run["REPLICA_GROUP_ID"]: run["MASTER_PORT"] for run in runs}
    assert ports["0"] != ports["1"]


def test_render_only_prints_script(spank_cluster: SpankCluster) -> None:
    """The printed script is what --submit would send; sbatch --test-only accepts it."""
    result = subprocess.run(
        [sys.executable, "-m", "marduk_slurm.cli.main", "sbatch", "--replica-groups", "2",
         "--gpus-per-node", "1", "--spares", "1", "train.py"],
        capture_output=True, text=True, check=True, timeout=60)
    check = subprocess.run(["sbatch", "--test-only"], input=result.stdout, env=spank_cluster.env(),
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, check.stderr
