"""A real Slurm cluster with the marduk SPANK plugin in its plugstack, and a stand-in agent.

The cluster is a second instance of scripts/slurm-cluster.sh with its own base directory and
ports, so changing its plugstack.conf (which restarts it) never disturbs tests that use the
plain `slurm_cluster` fixture at the same time. It is stopped at the end of the session.

Import `spank_cluster_fixture` and `agent_listener_fixture` into a test module; the fixtures
are named `spank_cluster` and `agent_listener`.

`AgentListener` binds the Unix socket named in plugstack.conf and records every line the
plugin writes, as the node agent would receive them.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "slurm-cluster.sh"
SPANK_DIR = ROOT / "spank"
PLUGIN = SPANK_DIR / "marduk_spank.so"
BASE = Path("/tmp/marduk-slurm-spank")
AGENT_SOCKET = BASE / "agent.sock"
NATS_URL = "nats://127.0.0.1:4222"
CREDS_DIR = BASE / "jobs"  # creds_dir=: the plugin only names the file, nobody writes it here
NODES = ["n1", "n2", "n3"]
# Ports are picked free at session start (other clusters run side by side on this machine).
CLUSTER_ENV = {"MARDUK_SLURM_BASE": str(BASE), "MARDUK_SLURM_NODES": str(len(NODES))}


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
        return True


def _free_ports(start: int, count: int) -> int:
    """The first base >= start with base+1..base+count all free (slurmd i listens on base+i)."""
    for base in range(start, start + 2000, 10):
        if all(_port_free(base + i) for i in range(1, count + 1)):
            return base
    raise RuntimeError(f"no {count} free ports from {start}")


@dataclass
class SpankCluster:
    slurm_conf: str
    socket_path: Path
    plugstack: str = ""

    def env(self) -> dict[str, str]:
        """os.environ without the Slurm variables of any enclosing job, pointing at us."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
        env["SLURM_CONF"] = self.slurm_conf
        return env

    def run(self, *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env(), capture_output=True, text=True,
                              timeout=timeout_s, check=False)

    def reconfigure(self, plugstack: str) -> None:
        """Rewrite plugstack.conf; the script restarts the cluster when the line changes."""
        if plugstack != self.plugstack:
            _up(plugstack)
            self.plugstack = plugstack


def plugstack_line(*args: str, required: bool = False) -> str:
    kind = "required" if required else "optional"
    return " ".join([kind, str(PLUGIN), f"socket={AGENT_SOCKET}", f"nats_url={NATS_URL}",
                     f"creds_dir={CREDS_DIR}", *args])


def _up(plugstack: str) -> None:
    env = {**os.environ, **CLUSTER_ENV, "MARDUK_SLURM_PLUGSTACK": plugstack}
    result = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True,
                            text=True, timeout=600, check=False)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        pytest.skip(f"scripts/slurm-cluster.sh up failed (rc {result.returncode}):\n{tail}")


def _down() -> None:
    subprocess.run(["bash", str(SCRIPT), "down"], env={**os.environ, **CLUSTER_ENV},
                   capture_output=True, text=True, timeout=120, check=False)


def build_plugin() -> None:
    if shutil.which("make") is None or shutil.which("gcc") is None:
        pytest.skip("make and gcc are needed to build the SPANK plugin")
    if not Path("/usr/include/slurm/spank.h").exists():
        pytest.skip("<slurm/spank.h> is missing (libslurm-dev; scripts/slurm-cluster.sh up "
                    "installs it)")
    result = subprocess.run(["make", "-C", str(SPANK_DIR)], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, f"make failed:\n{result.stdout}\n{result.stderr}"


@pytest.fixture(scope="session", name="spank_cluster")
def spank_cluster_fixture() -> Iterator[SpankCluster]:
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster needs root (daemons run as root)")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is not available to install it")
    if not Path("/usr/include/slurm/spank.h").exists():
        _up("")  # installs libslurm-dev with the daemons
    build_plugin()
    CLUSTER_ENV["MARDUK_SLURM_CTLD_PORT"] = str(_free_ports(6960, 1) + 1)
    CLUSTER_ENV["MARDUK_SLURM_SLURMD_PORT"] = str(_free_ports(17700, len(NODES)))
    line = plugstack_line("default=on")
    _up(line)
    cluster = SpankCluster(str(BASE / "etc" / "slurm.conf"), AGENT_SOCKET, line)
    yield cluster
    _down()


@dataclass
class AgentListener:
    """Accepts connections on `path` and keeps every JSON line received, in order."""

    path: Path
    lines: list[dict[str, Any]] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> AgentListener:
        self.path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._serve, name="agent-listener", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        sock, self._sock = self._sock, None
        if self._thread:
            self._thread.join(timeout=5)
        if sock:
            sock.close()
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while self._sock is not None:
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
            with self._lock:
                self.lines.extend(json.loads(x) for x in data.decode().splitlines() if x)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.lines)

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool],
                 timeout_s: float = 15) -> list[dict[str, Any]]:
        """The lines once `predicate(lines)` holds; fails with what arrived otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines = self.snapshot()
            if predicate(lines):
                return lines
            time.sleep(0.05)
        raise AssertionError(f"agent did not receive the expected lines: {self.snapshot()}")


@pytest.fixture(name="agent_listener")
def agent_listener_fixture(spank_cluster: SpankCluster) -> Iterator[AgentListener]:
    listener = AgentListener(spank_cluster.socket_path).start()
    yield listener
    listener.stop()
