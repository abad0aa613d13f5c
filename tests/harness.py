"""Real processes for integration tests: a nats-server on port 0 and the controller daemon."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.cli.client import call
from marduk_slurm.errors import BusError, BusTimeout

REPO = Path(__file__).resolve().parent.parent


def load_drill() -> ModuleType:
    """scripts/drill.py as a module (the drill is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("drill", REPO / "scripts" / "drill.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["drill"] = module
    spec.loader.exec_module(module)
    return module


def marduk_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "marduk_slurm.cli.main", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    """Run the real `marduk` command line, as an operator would."""
    return subprocess.run(marduk_argv(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)


def cli_json(*args: str, env: dict[str, str] | None = None) -> Any:
    proc = run_cli(*args, "--json", env=env)
    assert proc.returncode == 0, f"marduk {' '.join(args)} failed: {proc.stderr}"
    return json.loads(proc.stdout)


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, an HTTP error's included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class DaemonProcess:
    """What the test harness does with any marduk daemon child: log, stop, kill."""

    name = "daemon"
    proc: subprocess.Popen[bytes] | None
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM and wait: a daemon that ignores it fails the test."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"{self.name} ignored SIGTERM:\n{self.log()}") from None

    def kill(self) -> None:
        """SIGKILL: the crash the durability tests are about."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


class ControllerProcess(DaemonProcess):
    """`marduk controller` as a child process with its own state directory."""

    name = "controller"

    def __init__(self, state_dir: Path, nats_url: str, *, slurm_backend: str = "none",
                 extra_env: dict[str, str] | None = None, reconcile_s: float = 2.0,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.extra_args = extra_args
        self.state_dir = state_dir
        self.nats_url = nats_url
        self.slurm_backend = slurm_backend
        # Port 0 for the HTTP server: tests run many controllers, never on a fixed port.
        self.env = {**os.environ, "MARDUK_CONTROLLER_RECONCILE_INTERVAL_S": str(reconcile_s),
                    "MARDUK_CONTROLLER_HTTP_LISTEN": "127.0.0.1:0",
                    **(extra_env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state_dir / "controller.log"

    def start(self, timeout_s: float = 30.0, *, standby: bool = False) -> ControllerProcess:
        """Start and wait until it answers `status` (a leader), or, with `standby`, until it
        says that it waits for the lease (a standby answers no requests)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = marduk_argv("controller", "--state-dir", str(self.state_dir),
                           "--slurm-backend", self.slurm_backend, "--log-level", "info",
                           *self.extra_args)
        if self.nats_url:
            argv += ["--nats-url", self.nats_url]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=REPO)
        if standby:
            self.wait_log("waiting for the lease", timeout_s)
        else:
            self.wait_ready(timeout_s)
        return self

    def wait_log(self, text: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while text not in self.log_path.read_text(errors="replace"):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {text!r} in the log within {timeout_s} s:\n"
                                   f"{self.log()}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        if self.nats_url:
            return self.nats_url
        return (self.state_dir / "nats.url").read_text().strip()

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}:\n{self.log()}")
            try:
                self.request("status", timeout_s=1.0)
                return
            except (BusError, BusTimeout, OSError, FileNotFoundError):
                time.sleep(0.1)
        raise RuntimeError(f"controller not ready in {timeout_s} s:\n{self.log()}")

    def request(self, verb: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0
                ) -> Any:
        return asyncio.run(call(self.url, verb, args or {}, timeout_s=timeout_s))



async def publish_durable(url: str, items: list[tuple[str, bytes]]) -> list[int]:
    bus = Bus(url, name="test-publisher")
    await bus.connect()
    try:
        await bus.ensure_events_stream()
        return [await bus.publish_durable(subject, data) for subject, data in items]
    finally:
        await bus.close()


async def publish_core(url: str, items: list[tuple[str, bytes]]) -> None:
    bus = Bus(url, name="test-publisher")
    await bus.connect()
    try:
        for subject, data in items:
            await bus.publish(subject, data)
        await bus.flush()
    finally:
        await bus.close()


def wait_for(predicate: Any, timeout_s: float = 15.0, interval_s: float = 0.05,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
