"""The automatic per-job credential: a real auth-enabled controller (embedded nats-server), a
real agent with simulated GPUs and its node credential, SPANK-style step reports, and the
runtime client connecting with the file the agent wrote."""

from __future__ import annotations

import asyncio
import json
import stat
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest

from marduk_slurm.adapters import nats_auth
from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess, reload_running
from marduk_slurm.cli.client import call
from marduk_slurm.controller.job_creds import NOT_EMBEDDED, JobCredentialService
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError
from marduk_slurm.runtime.client import MardukClient

from agent_fixtures import AgentProcess, step_end, step_start
from harness import ControllerProcess, wait_for

pytest.importorskip("bcrypt")

JOB, OTHER_JOB, UID = 77, 78, 4242


class AuthController(ControllerProcess):
    """The controller with nats.auth on: its test requests go as the operator."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, "", extra_env={"MARDUK_NATS_AUTH": "true"})

    def request(self, verb: str, args: dict[str, Any] | None = None, timeout_s: float = 10.0
                ) -> Any:
        creds = str(self.state_dir / "auth" / nats_auth.OPERATOR_CREDS)
        return asyncio.run(call(self.url, verb, args or {}, timeout_s=timeout_s, creds=creds))


def add_node(state: Path, node: str, out: Path) -> Path:
    """What `marduk auth add-node` does: issue, write 0600, SIGHUP the embedded server."""
    creds = nats_auth.AuthDir(state / "auth").issue("agent", node)
    nats_auth.write_private(out, creds.to_json())
    assert reload_running(state / "nats")
    return out


async def connect(url: str, creds: Path, errors: list[str] | None = None) -> Any:
    async def on_error(exc: Exception) -> None:
        if errors is not None:
            errors.append(str(exc).lower())

    for _ in range(40):  # a SIGHUP reload takes a moment to admit a new user
        try:
            return await nats.connect(url, allow_reconnect=False, error_cb=on_error,
                                      **nats_auth.connect_options(str(creds)))
        except (nats.errors.Error, OSError):
            await asyncio.sleep(0.05)
    raise AssertionError(f"cannot connect with {creds}")


async def ask_credential(url: str, agent_creds: Path, node: str, job: int) -> m.Reply:
    nc = await connect(url, agent_creds)
    try:
        request = m.Request(args={"job": job, "uid": UID}, actor=f"agent-{node}")
        msg = await nc.request(subjects.cred_rpc(node), m.encode(request), timeout=10)
        return m.decode_reply(msg.data)
    finally:
        await nc.close()


def start_client(url: str, creds: Path) -> MardukClient:
    client = MardukClient(url, JOB, 0, creds=str(creds), creds_wait=timedelta(seconds=20))
    replica_id = f"job{JOB}_rg0:u"

    def register() -> m.ReplicaRegister:
        return m.ReplicaRegister(replica_id=replica_id, job_id=JOB, replica_group=0, node="n2",
                                 ts=time.time())

    client.start(replica_id, register)
    return client


@pytest.fixture
def controller(tmp_path: Path) -> Iterator[AuthController]:
    ctl = AuthController(tmp_path / "state")
    ctl.start()
    yield ctl
    assert ctl.stop() == 0, ctl.log()


@pytest.mark.slow
def test_agent_writes_the_job_credential_that_the_job_then_uses(
        controller: AuthController, tmp_path: Path) -> None:
    state, jobs_dir = controller.state_dir, tmp_path / "jobs"
    agent = AgentProcess(tmp_path, controller.url, node="n2")
    agent.env.update(MARDUK_NATS_CREDS=str(add_node(state, "n2", tmp_path / "n2.json")),
                     MARDUK_AGENT_JOB_CREDENTIALS_DIR=str(jobs_dir))
    agent.start()
    creds = jobs_dir / f"{JOB}.json"
    # The runtime starts before its credential exists, as a task does under SPANK.
    client = start_client(controller.url, creds)
    try:
        agent.report(step_start(JOB, 0, uid=UID), step_start(JOB, 1, uid=UID))
        wait_for(creds.exists, what="the job's credential file")
        info = creds.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == UID
        assert stat.S_IMODE(jobs_dir.stat().st_mode) == 0o711
        assert nats_auth.read_credentials(creds).user == f"job-{JOB}"  # type: ignore[union-attr]
        replicas = wait_for(lambda: controller.request("replicas", {"job": JOB}),
                            what="the job's registration through its own credential")
        assert replicas[0]["replica_id"] == f"job{JOB}_rg0:u"
        assert client.stats["creds_waits"] > 0
        asyncio.run(refused_elsewhere(controller.url, creds))
        # A second node of the same job gets the very same credential, once it runs a step.
        n3 = add_node(state, "n3", tmp_path / "n3.json")
        asyncio.run(relay_step(controller.url, n3, "n3", JOB, 0))
        reply = asyncio.run(ask_credential(controller.url, n3, "n3", JOB))
        assert reply.ok and json.loads(reply.data["credentials"]) == json.loads(creds.read_text())
        agent.report(step_end(JOB, 0))
        time.sleep(0.3)
        assert creds.exists(), "removed while step 1 still runs"
        agent.report(step_end(JOB, 1))
        wait_for(lambda: not creds.exists(), what="the file's removal after the last step")
        assert f"job {JOB}: credential written to {creds} for uid {UID}" in agent.new_log()
    finally:
        client.close()
        assert agent.stop() == 0, agent.log()


async def relay_step(url: str, agent_creds: Path, node: str, job: int, step: int, *,
                     ended: bool = False, delay_s: float = 0.0) -> None:
    """What an agent's step relay does: the step's start (or end) into the events stream,
    with that node's own credential."""
    await asyncio.sleep(delay_s)
    bus = Bus(url, name=f"test-agent-{node}", creds=str(agent_creds))
    for _ in range(40):  # a SIGHUP reload takes a moment to admit a new user
        try:
            await bus.connect()
            break
        except BusError:
            await asyncio.sleep(0.05)
    try:
        msg: m.StepStart | m.StepEnd = (
            m.StepEnd(job_id=job, step_id=step, node=node, exit_status=0, ts=time.time())
            if ended else
            m.StepStart(job_id=job, step_id=step, node=node, uid=UID, ts=time.time()))
        event = "step_end" if ended else "step_start"
        await bus.publish_durable(subjects.node_event(node, event), m.encode(msg))
    finally:
        await bus.close()


def refusals(controller: AuthController) -> list[dict[str, Any]]:
    rows = controller.request("history", {"kinds": ["job_credential_refused"]})
    return [(r["node"], r["job_id"]) for r in rows]


@pytest.mark.slow
def test_job_credential_goes_only_to_nodes_running_a_step_of_that_job(
        controller: AuthController, tmp_path: Path) -> None:
    state, url = controller.state_dir, controller.url
    n2 = add_node(state, "n2", tmp_path / "n2.json")
    n3 = add_node(state, "n3", tmp_path / "n3.json")
    asyncio.run(relay_step(url, n3, "n3", JOB, 0))

    # n2 never ran a step of the job: it names the job, and is refused.
    reply = asyncio.run(ask_credential(url, n2, "n2", JOB))
    assert not reply.ok and reply.error_kind == "no_step", reply
    assert "n2 runs no step of job 77" in reply.error
    assert not nats_auth.AuthDir(state / "auth").job_credential_path(str(JOB)).exists()
    assert refusals(controller) == [("n2", JOB)]
    assert "credential refused to the agent of n2" in controller.log()

    # The node that runs it gets it; and so does n2 when its request overtakes its own
    # step_start on the way to the controller (the controller waits for the step).
    assert asyncio.run(ask_credential(url, n3, "n3", JOB)).ok

    async def ask_then_relay() -> m.Reply:
        ask = asyncio.create_task(ask_credential(url, n2, "n2", JOB))
        await relay_step(url, n2, "n2", JOB, 1, delay_s=1.0)
        return await ask

    assert asyncio.run(ask_then_relay()).ok

    # After its last step there ended, n3 is refused again.
    asyncio.run(relay_step(url, n3, "n3", JOB, 0, ended=True))
    reply = wait_for(lambda: (r := asyncio.run(ask_credential(url, n3, "n3", JOB))) and
                     not r.ok and r, what="a refusal after the step ended")
    assert reply.error_kind == "no_step"
    assert refusals(controller)[-1] == ("n3", JOB)
    status = controller.request("status")
    assert status["counters"]["job_credential_refused"] >= 2


async def refused_elsewhere(url: str, creds: Path) -> None:
    errors: list[str] = []
    nc = await connect(url, creds, errors)
    try:
        await nc.publish(subjects.heartbeat(JOB), b"{}")
        await nc.publish(subjects.heartbeat(OTHER_JOB), b"{}")
        await nc.subscribe(subjects.job_commands(OTHER_JOB))
        await nc.flush()
        await asyncio.sleep(0.2)
    finally:
        await nc.close()
    assert any(f'publish to "{subjects.heartbeat(OTHER_JOB)}"' in e for e in errors), errors
    assert any(f'subscription to "{subjects.job_commands(OTHER_JOB)}"' in e for e in errors)
    assert not any(f'"{subjects.heartbeat(JOB)}"' in e for e in errors), errors


async def test_an_agent_cannot_ask_on_another_nodes_subject(tmp_path: Path) -> None:
    auth = nats_auth.AuthDir(tmp_path / "auth", rounds=4)
    auth.ensure_initialised()
    n1 = tmp_path / "n1.json"
    nats_auth.write_private(n1, auth.issue("agent", "n1").to_json())
    server = NatsServerProcess(tmp_path / "nats", config_file=auth.server_config)
    server.start()
    try:
        controller = await connect(server.url, auth.path / nats_auth.CONTROLLER_CREDS)

        async def answer(msg: Any) -> None:
            await msg.respond(b"credential")

        await controller.subscribe(subjects.CRED_RPC_ALL, cb=answer)
        await controller.flush()
        errors: list[str] = []
        agent = await connect(server.url, n1, errors)
        own = await agent.request(subjects.cred_rpc("n1"), b"{}", timeout=2)
        assert own.data == b"credential"
        with pytest.raises(nats.errors.TimeoutError):
            await agent.request(subjects.cred_rpc("n2"), b"{}", timeout=0.5)
        assert any('publish to "marduk.v1.credrpc.n2"' in e for e in errors), errors
        await agent.close()
        await controller.close()
    finally:
        server.stop()


async def test_without_the_embedded_auth_server_the_request_gets_a_clear_error() -> None:
    service = JobCredentialService(ctx=None, auth=None, server=None)  # type: ignore[arg-type]
    reply = await service.handle("n1", m.encode(m.Request(args={"job": 1, "uid": 1000})))
    assert not reply.ok and reply.error == NOT_EMBEDDED and "docs/security.md" in reply.error


def test_the_runtime_waits_for_its_credential_only_so_long(tmp_path: Path) -> None:
    client = MardukClient("nats://127.0.0.1:1", JOB, 0, creds=str(tmp_path / "never.json"),
                          creds_wait=timedelta(seconds=0.3))
    client.start("r", lambda: m.ReplicaRegister(replica_id="job77_rg0:u", job_id=JOB,
                                                replica_group=0, node="n1"))
    try:
        client.send_heartbeat(m.Heartbeat(replica_id="job77_rg0:u", job_id=JOB, step=1))
        assert client.wait_first_config(timedelta(seconds=5))
        assert client.stats["creds_missing"] == 1 and not client.connected
    finally:
        client.close()
    assert not (tmp_path / "never.json").exists()


def test_a_job_credential_is_kept_for_the_next_node_and_goes_with_the_user(
        tmp_path: Path) -> None:
    auth = nats_auth.AuthDir(tmp_path / "auth", rounds=4)
    first, new = auth.job_credential(str(JOB))
    again, new_again = auth.job_credential(str(JOB))
    assert new and not new_again and again == first
    kept = auth.job_credential_path(str(JOB))
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert first.password not in auth.roster_path.read_text()
    assert auth.remove(f"job-{JOB}") and not kept.exists()
    fresh, new = auth.job_credential(str(JOB))
    assert new and fresh.password != first.password
