"""NATS users and subject permissions, enforced by a real nats-server started with the config
that `marduk auth` generates, and a real controller with nats.auth on."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from marduk_slurm.adapters import nats_auth
from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.cli.client import call
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, BusTimeout

from harness import ControllerProcess, run_cli, wait_for

pytest.importorskip("bcrypt")


@pytest.fixture
def auth(tmp_path: Path) -> nats_auth.AuthDir:
    # Cost 4: the server checks the hash at every connect; production uses 11.
    auth = nats_auth.AuthDir(tmp_path / "auth", rounds=4)
    auth.ensure_initialised()
    return auth


@pytest.fixture
def server(tmp_path: Path, auth: nats_auth.AuthDir) -> Iterator[NatsServerProcess]:
    proc = NatsServerProcess(tmp_path / "nats", config_file=auth.server_config)
    proc.start()
    yield proc
    proc.stop()


class Conn:
    """A raw nats-py connection as one user, collecting the server's -ERR lines."""

    def __init__(self, url: str, creds: Path) -> None:
        self.url, self.creds = url, creds
        self.errors: list[str] = []
        self.nc: Any = None

    async def __aenter__(self) -> Conn:
        async def on_error(exc: Exception) -> None:
            self.errors.append(str(exc))

        self.nc = await nats.connect(self.url, error_cb=on_error, allow_reconnect=False,
                                     **nats_auth.connect_options(str(self.creds)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def violations(self, what: str) -> list[str]:
        await self.nc.flush()
        await asyncio.sleep(0.1)  # the -ERR may trail the PONG
        # nats-py lower-cases the server's -ERR text.
        return [e for e in self.errors
                if "permissions violation" in e.lower() and what.lower() in e.lower()]


def issue(auth: nats_auth.AuthDir, server: NatsServerProcess, role: str, scope: str) -> Path:
    creds = auth.issue(role, scope)
    path = auth.path / f"{creds.user}.json"
    nats_auth.write_private(path, creds.to_json())
    server.reload()
    time.sleep(0.2)
    return path


@pytest.fixture
async def controller_conn(server: NatsServerProcess, auth: nats_auth.AuthDir
                          ) -> AsyncIterator[Conn]:
    async with Conn(server.url, auth.path / nats_auth.CONTROLLER_CREDS) as conn:
        bus = Bus(server.url, name="setup", creds=str(auth.path / nats_auth.CONTROLLER_CREDS))
        await bus.connect()
        await bus.ensure_events_stream()
        await bus.close()
        yield conn


def test_credential_files_are_private_and_the_roster_holds_no_password(
        auth: nats_auth.AuthDir) -> None:
    creds = auth.issue("job", "42")
    for path in auth.path.iterdir():
        if path.name != ".lock":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    text = auth.roster_path.read_text() + auth.server_config.read_text()
    assert creds.password not in text and "$2a$04$" in text
    with pytest.raises(nats_auth.AuthError):
        auth.issue("job", "not-a-number")
    with pytest.raises(nats_auth.AuthError):
        auth.issue("agent", "n1.>")  # a wildcard would widen the permissions


async def test_job_publishes_its_own_telemetry_but_cannot_drain_or_listen_to_others(
        server: NatsServerProcess, auth: nats_auth.AuthDir, controller_conn: Conn) -> None:
    job = issue(auth, server, "job", "42")
    seen: list[str] = []

    async def record(msg: Any) -> None:
        seen.append(msg.subject)

    await controller_conn.nc.subscribe("marduk.v1.>", cb=record)
    await controller_conn.nc.flush()
    async with Conn(server.url, job) as conn:
        await conn.nc.publish(subjects.heartbeat(42), b"{}")
        register = m.ReplicaRegister(replica_id="job42_rg0:u", job_id=42, replica_group=0,
                                     node="n1")
        ack = await conn.nc.jetstream().publish(subjects.job_event(42, "replica_register"),
                                                m.encode(register), timeout=5)
        assert ack.seq >= 1  # a job needs no $JS.API permission to publish durably
        got: list[bytes] = []

        async def mine(msg: Any) -> None:
            got.append(msg.data)

        await conn.nc.subscribe(subjects.job_commands(42), cb=mine)
        await conn.nc.subscribe(subjects.job_commands(43), cb=mine)
        await conn.nc.subscribe("_INBOX.>", cb=mine)  # snooping on others' replies
        await conn.nc.publish(subjects.rpc("drain"), b'{"args":{"nodes":"n1"}}')
        await conn.nc.publish(subjects.heartbeat(43), b"{}")  # another job's heartbeat
        assert await conn.violations('Publish to "marduk.v1.rpc.drain"')
        assert await conn.violations('Publish to "marduk.v1.hb.43"')
        assert await conn.violations('Subscription to "marduk.v1.cmd.job.43"')
        assert await conn.violations('Subscription to "_INBOX.>"')
        await controller_conn.nc.publish(subjects.job_commands(42), b"for 42")
        await controller_conn.nc.publish(subjects.job_commands(43), b"for 43")
        await controller_conn.nc.flush()
        await asyncio.sleep(0.2)
        assert got == [b"for 42"]
        with pytest.raises(nats.errors.TimeoutError):  # the request never leaves the server
            await conn.nc.request(subjects.rpc("drain"), b"{}", timeout=0.5)
    assert subjects.heartbeat(42) in seen
    assert subjects.rpc("drain") not in seen and subjects.heartbeat(43) not in seen


async def test_agent_cannot_speak_for_another_node_or_touch_the_stream(
        server: NatsServerProcess, auth: nats_auth.AuthDir, controller_conn: Conn) -> None:
    agent = issue(auth, server, "agent", "n1")
    js = controller_conn.nc.jetstream()
    async with Conn(server.url, agent) as conn:
        ajs = conn.nc.jetstream()
        own = m.StepStart(job_id=1, step_id=0, node="n1")
        await ajs.publish(subjects.node_event("n1", "step_start"), m.encode(own), timeout=5)
        await conn.nc.publish(subjects.node_health("n1"), b"{}")
        forged = m.StepStart(job_id=1, step_id=0, node="n2")
        with pytest.raises(nats.errors.TimeoutError):
            await ajs.publish(subjects.node_event("n2", "step_start"), m.encode(forged),
                              timeout=1)
        assert await conn.violations('Publish to "marduk.v1.evt.node.n2.step_start"')
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await conn.nc.request(f"$JS.API.STREAM.DELETE.{subjects.EVENTS_STREAM}", b"",
                                  timeout=1)
        assert await conn.violations("$JS.API.STREAM.DELETE")
    info = await js.stream_info(subjects.EVENTS_STREAM)
    assert info.state.messages == 1  # only the agent's own node's event


async def test_agent_answers_its_own_requests_only(
        server: NatsServerProcess, auth: nats_auth.AuthDir, controller_conn: Conn) -> None:
    agent = issue(auth, server, "agent", "n1")
    async with Conn(server.url, agent) as conn:
        async def answer(msg: Any) -> None:
            await msg.respond(b"pong")

        await conn.nc.subscribe(subjects.agent_rpc("n1", "inject"), cb=answer)
        await conn.nc.subscribe(subjects.agent_rpc("n2", "inject"), cb=answer)
        assert await conn.violations('Subscription to "marduk.v1.agent.n2.inject"')
        reply = await controller_conn.nc.request(subjects.agent_rpc("n1", "inject"), b"",
                                                 timeout=2)
        assert reply.data == b"pong"


async def test_unknown_users_and_revoked_credentials_are_refused(
        server: NatsServerProcess, auth: nats_auth.AuthDir, tmp_path: Path) -> None:
    with pytest.raises((nats.errors.NoServersError, nats.errors.Error, OSError)):
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=1,
                           connect_timeout=2)
    job = issue(auth, server, "job", "7")
    bus = Bus(server.url, name="job7", creds=str(job))
    await bus.connect()
    await bus.close()
    auth.remove("job-7")
    server.reload()
    await asyncio.sleep(0.2)
    with pytest.raises(BusError):
        await Bus(server.url, name="job7", creds=str(job)).connect()
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "something else"}')
    with pytest.raises(BusError, match="not a valid credential file"):
        await Bus(server.url, name="x", creds=str(bad)).connect()


class AuthController(ControllerProcess):
    """The controller with nats.auth on: its test requests go as the operator."""

    def request(self, verb: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0
                ) -> Any:
        creds = str(self.state_dir / "auth" / nats_auth.OPERATOR_CREDS)
        return asyncio.run(call(self.url, verb, args or {}, timeout_s=timeout_s, creds=creds))


@pytest.mark.slow
def test_controller_with_auth_end_to_end(tmp_path: Path) -> None:
    state = tmp_path / "state"
    ctl = AuthController(state, "", extra_env={"MARDUK_NATS_AUTH": "true"}).start()
    try:
        cli_state = ["--state-dir", str(state)]
        job_path, node_path = tmp_path / "job7.json", tmp_path / "n1.json"
        for args in (["add-job", "7", "-o", str(job_path)],
                     ["add-node", "n1", "-o", str(node_path)]):
            proc = run_cli("auth", *args, *cli_state)
            assert proc.returncode == 0 and "reloaded" in proc.stderr, proc.stderr

        async def as_job_and_agent() -> None:
            agent = Bus(ctl.url, name="agent-n1", creds=str(node_path))
            await agent.connect()
            inventory = m.GpuInventory(node="n1", gpus=[m.GpuDescriptor(uuid="GPU-1", index=0)])
            await agent.publish_durable(subjects.node_event("n1", "gpu_inventory"),
                                        m.encode(inventory))
            await agent.close()
            job = Bus(ctl.url, name="job7", creds=str(job_path))
            await job.connect()
            register = m.ReplicaRegister(replica_id="job7_rg0:u", job_id=7, replica_group=0,
                                         node="n1", gpu_uuids=["GPU-1"])
            await job.publish_durable(subjects.job_event(7, "replica_register"),
                                      m.encode(register))
            await job.close()
            with pytest.raises(BusTimeout):  # a job cannot drain
                await call(ctl.url, "drain", {"nodes": "n1", "reason": "x"}, timeout_s=1.5,
                           creds=str(job_path))

        asyncio.run(as_job_and_agent())
        # The CLI finds the operator credential in the state directory by itself.
        replicas = wait_for(lambda: json.loads(run_cli("replicas", "--json", *cli_state).stdout),
                            what="the job's registration")
        assert replicas[0]["replica_id"] == "job7_rg0:u"
        proc = run_cli("drain", "n1", "reason=auth test", "--json", *cli_state)
        assert proc.returncode == 0, proc.stderr
        proc = run_cli("status", "--nats-url", ctl.url)  # no credential at all
        assert proc.returncode == 3 and "Authorization" in proc.stderr, proc.stderr
        assert os.stat(state / "auth" / "controller.json").st_mode & 0o077 == 0
    finally:
        assert ctl.stop() == 0, ctl.log()
