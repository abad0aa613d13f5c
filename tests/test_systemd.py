"""systemd integration: sd_notify (marduk_slurm.adapters.systemd.Notifier) against a real
AF_UNIX datagram socket, the unit files in systemd/, and the example settings file."""

from __future__ import annotations

import configparser
import dataclasses
import os
import shutil
import socket
import subprocess
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from marduk_slurm import settings
from marduk_slurm.adapters.systemd import Notifier

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
EXAMPLE = SYSTEMD_DIR / "marduk.toml.example"
UNITS = ("marduk.service", "marduk-standby.service", "marduk-agent.service")


# -- Notifier ---------------------------------------------------------------------------


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket standing in for systemd's NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    yield str(path), sock
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_notifier_sends_each_state(notify_socket: tuple[str, socket.socket]) -> None:
    address, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.enabled
    assert notifier.ready()
    assert received(sock) == "READY=1"
    assert notifier.ready("serving 4 nodes")
    assert received(sock) == "READY=1\nSTATUS=serving 4 nodes"
    assert notifier.status("reconciling")
    assert received(sock) == "STATUS=reconciling"
    assert notifier.watchdog()
    assert received(sock) == "WATCHDOG=1"
    assert notifier.reloading()
    assert received(sock) == "RELOADING=1"
    assert notifier.stopping("SIGTERM")
    assert received(sock) == "STOPPING=1\nSTATUS=SIGTERM"
    assert notifier.stopping()
    assert received(sock) == "STOPPING=1"
    notifier.close()
    notifier.close()  # twice is harmless


def test_notifier_abstract_address() -> None:
    name = f"marduk-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # what systemd means by "@name"
    sock.settimeout(2)
    try:
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert received(sock) == "READY=1\nSTATUS=up"
        notifier.close()
    finally:
        sock.close()


def test_notifier_without_notify_socket_does_nothing() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog() and not notifier.stopping()
    assert notifier.watchdog_s == 0.0
    notifier.close()


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.ready() is False  # systemd gone: report failure, never raise
    notifier.close()


@pytest.mark.parametrize(("env", "expected_s"), [
    ({"WATCHDOG_USEC": "30000000"}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, 0.0),  # meant for another process
    ({"WATCHDOG_USEC": "soon"}, 0.0),
    ({}, 0.0),
])
def test_watchdog_interval(env: dict[str, str], expected_s: float) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/nonexistent", **env}).watchdog_s == expected_s


# -- example settings -----------------------------------------------------------------


def test_example_settings_load() -> None:
    loaded = settings.load(EXAMPLE, env={})
    assert loaded.sources["nats.url"] == str(EXAMPLE)


def test_example_settings_list_every_key_with_its_default() -> None:
    with EXAMPLE.open("rb") as fh:
        example = tomllib.load(fh)
    assert list(example) == list(settings.SECTIONS)
    for section, cls in settings.SECTIONS.items():
        defaults = dataclasses.asdict(cls())
        assert example[section] == defaults, f"[{section}] differs from the defaults"


# -- unit files -------------------------------------------------------------------------


def read_unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(SYSTEMD_DIR / name)
    return parser


def test_controller_unit() -> None:
    service = read_unit("marduk.service")["Service"]
    assert service["Type"] == "notify" and service["NotifyAccess"] == "main"
    assert service["ExecStart"] == ("/usr/local/bin/marduk controller "
                                    "--config /etc/marduk/marduk.toml")
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["WatchdogSec"] == "30" and service["Restart"] == "on-failure"
    assert service["StateDirectory"] == "marduk"
    assert "/var/lib/marduk" in service["ReadWritePaths"].split()
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"


def test_standby_unit_has_a_state_directory_of_its_own() -> None:
    leader = read_unit("marduk.service")["Service"]
    service = read_unit("marduk-standby.service")["Service"]
    assert service["ExecStart"].split()[:3] == ["/usr/local/bin/marduk", "controller",
                                                "--standby"]
    state_dir = service["ExecStart"].split("--state-dir ")[1].split()[0]
    assert state_dir == "/var/lib/" + service["StateDirectory"] != "/var/lib/marduk"
    assert state_dir in service["ReadWritePaths"].split()
    # Everything else as the leader's unit: it becomes the leader.
    same = {k: v for k, v in service.items()
            if k not in ("ExecStart", "StateDirectory", "ReadWritePaths")}
    assert same == {k: v for k, v in leader.items()
                    if k not in ("ExecStart", "StateDirectory", "ReadWritePaths")}


def test_agent_unit_owns_the_socket_directory() -> None:
    service = read_unit("marduk-agent.service")["Service"]
    assert service["Type"] == "notify"
    assert "User" not in service  # root: NVML devices and /run/marduk
    assert service["RuntimeDirectory"] == "marduk"
    socket_dir = Path(settings.AgentSettings().socket).parent
    assert socket_dir == Path("/run") / service["RuntimeDirectory"]
    assert str(socket_dir) in service["ReadWritePaths"].split()
    assert service["ProtectSystem"] == "strict" and service["NoNewPrivileges"] == "yes"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists that ExecStart= exists; /usr/local/bin/marduk is there only once
    # installed, so check copies that start a binary every machine has.
    copies = []
    for name in UNITS:
        text = (SYSTEMD_DIR / name).read_text()
        assert "/usr/local/bin/marduk " in text
        copy = tmp_path / name
        copy.write_text(text.replace("/usr/local/bin/marduk ", "/bin/true "))
        copies.append(str(copy))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *copies],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
