"""The node agent as a real child process, and a SPANK-like client of its Unix socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import subjects

from harness import REPO, DaemonProcess, marduk_argv


class AgentProcess(DaemonProcess):
    """`marduk agent` with simulated GPUs, its socket and state directory under tmp_path."""

    name = "agent"

    def __init__(
        self,
        base: Path,
        nats_url: str,
        *,
        node: str = "n2",
        gpus: int = 2,
        poll_interval_s: float = 0.5,
    ) -> None:
        self.node = node
        self.nats_url = nats_url
        self.gpus = gpus
        self.socket_path = base / "run" / "agent.sock"
        self.state_dir = base / "agent-state"
        self.log_path = base / "agent.log"
        self.env = {**os.environ, "MARDUK_AGENT_POLL_INTERVAL_S": str(poll_interval_s)}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0, *, wait_nats: bool = True) -> AgentProcess:
        argv = marduk_argv(
            "agent",
            "--node",
            self.node,
            "--simulate-gpus",
            str(self.gpus),
            "--socket",
            str(self.socket_path),
            "--state-dir",
            str(self.state_dir),
            "--nats-url",
            self.nats_url,
            "--log-level",
            "info",
        )
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO
            )
        self.wait_log("agent ready", timeout_s)
        if wait_nats:
            self.wait_log("connected to NATS", timeout_s)
        return self

    def new_log(self) -> str:
        """The log of the current run only."""
        return self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")

    def wait_log(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"agent exited {self.proc.returncode}:\n{self.log()}")
            if text in self.new_log():
                return
            time.sleep(0.05)
        raise RuntimeError(f"agent log has no {text!r} after {timeout_s} s:\n{self.log()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def report(self, *lines: dict[str, Any] | bytes) -> None:
        """Write lines to the socket the way the SPANK plugin does: connect, write, close."""
        data = b"".join(
            line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n" for line in lines
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(data)

    def journal(self) -> dict[str, Any]:
        return json.loads((self.state_dir / "steps.json").read_text())


def step_start(
    job: int,
    step: int,
    *,
    node: str | None = "n2",
    gpus: list[int] | None = None,
    pid: int = 0,
    uid: int | None = None,
) -> dict[str, Any]:
    line: dict[str, Any] = {
        "v": 1,
        "event": "step_start",
        "job_id": job,
        "step_id": step,
        "gpu_indices": gpus if gpus is not None else [0],
        "pid": pid or os.getpid(),
        "uid": os.getuid() if uid is None else uid,
    }
    if node is not None:
        line["node"] = node
    return line


def step_end(job: int, step: int, *, node: str = "n2", exit_status: int = 0) -> dict[str, Any]:
    return {
        "v": 1,
        "event": "step_end",
        "job_id": job,
        "step_id": step,
        "node": node,
        "exit_status": exit_status,
        "pid": os.getpid(),
        "uid": os.getuid(),
    }


async def next_health(url: str, node: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """The agent's next health summary on core NATS."""
    bus = Bus(url, name="test-health")
    await bus.connect()
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_msg(msg: Any) -> None:
        if not got.done():
            got.set_result(bytes(msg.data))

    try:
        await bus.subscribe(subjects.node_health(node), on_msg)
        return json.loads(await asyncio.wait_for(got, timeout_s))
    finally:
        await bus.close()


@pytest.fixture
def agent(tmp_path: Path, nats_server: NatsServerProcess) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path, nats_server.url).start()
    yield proc
    rc = proc.stop()
    assert rc == 0, f"agent exited {rc} on SIGTERM:\n{proc.log()}"
    assert not proc.socket_path.exists(), "the agent left its socket behind"
