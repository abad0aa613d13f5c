"""Fixtures shared by the test suite: a real nats-server on port 0 per test, and a real
controller process against it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess

from harness import ControllerProcess, wait_for


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServerProcess]:
    server = NatsServerProcess(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def controller(tmp_path: Path, nats_server: NatsServerProcess) -> Iterator[ControllerProcess]:
    proc = ControllerProcess(tmp_path / "state", nats_server.url).start()
    yield proc
    rc = proc.stop()
    assert rc == 0, f"controller exited {rc} on SIGTERM:\n{proc.log()}"


@pytest.fixture
def web_controller(tmp_path: Path, nats_server: NatsServerProcess
                   ) -> Iterator[tuple[ControllerProcess, str]]:
    """A controller and the base URL of its dashboard and HTTP API (on a free port)."""
    ctl = ControllerProcess(tmp_path / "state", nats_server.url).start()
    url_file = tmp_path / "state" / "http.url"
    wait_for(url_file.exists, 10, what="http.url")
    yield ctl, url_file.read_text().strip()
    assert ctl.stop() == 0, ctl.log()
