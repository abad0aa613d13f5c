"""The real local Slurm cluster (scripts/slurm-cluster.sh) as a pytest session fixture.

Import `slurm_cluster` into a test module (or conftest.py) to use it. The cluster needs root
and, the first time, apt to install the Debian Slurm packages; without them the tests skip
with the reason. The cluster is left running afterwards (`up` is idempotent and takes well
under a second when it is already up); `scripts/slurm-cluster.sh down` stops it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "slurm-cluster.sh"


@dataclass(frozen=True)
class SlurmCluster:
    slurm_conf: str
    script: Path
    base: Path

    def up(self) -> None:
        _run_script("up")


def _run_script(command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), command], capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (daemons run as root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    result = _run_script("up")
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-5:])
        pytest.skip(f"scripts/slurm-cluster.sh up failed (rc {result.returncode}):\n{tail}")
    env_line = result.stdout.strip().splitlines()[-1]
    slurm_conf = env_line.removeprefix("export SLURM_CONF=")
    return SlurmCluster(slurm_conf, SCRIPT, Path(slurm_conf).parent.parent)
