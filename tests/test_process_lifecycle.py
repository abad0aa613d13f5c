"""Process lifecycle: what survives a SIGKILLed controller, what a restart finds, and what
reconnects by itself afterwards. Real processes throughout."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.controller import risk_watch
from marduk_slurm.controller.context import Context, StoreRunner
from marduk_slurm.controller.decisions import Policy
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.inject import (
    inject_request_id,
    is_repeat_of_applied_inject,
    mark_repeat,
)
from marduk_slurm.settings import ControllerSettings
from marduk_slurm.supervisor import Supervisor

from agent_fixtures import AgentProcess, agent
from harness import (
    REPO,
    ControllerProcess,
    cli_json,
    marduk_argv,
    publish_durable,
    run_cli,
    wait_for,
)

__all__ = ["agent"]  # the fixture, imported for pytest


def _servers_on(store_dir: Path) -> list[int]:
    """Pids of live nats-servers whose JetStream is in `store_dir`."""
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if (argv and argv[0].endswith(b"nats-server") and state != "Z"
                and str(store_dir / "jetstream").encode() in argv):
            pids.append(int(name))
    return pids


def _register(job: int, group: int) -> tuple[str, bytes]:
    msg = m.ReplicaRegister(replica_id=f"job{job}_rg{group}:x", job_id=job,
                            replica_group=group, node="n1", gpu_uuids=[f"GPU-{group}"],
                            ts=time.time())
    return subjects.job_event(job, "replica_register"), m.encode(msg)


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[ControllerProcess]:
    ctl = ControllerProcess(tmp_path / "state", "")
    yield ctl
    ctl.stop()


def test_sigkilled_controller_takes_its_nats_server_and_restarts_on_the_same_url(
        embedded: ControllerProcess) -> None:
    ctl = embedded.start()
    store = ctl.state_dir / "nats"
    url = ctl.url
    first = asyncio.run(publish_durable(url, [_register(41, 0)]))
    wait_for(lambda: cli_json("replicas", "--job", "41", "--nats-url", url), 15,
             what="the first replica")
    assert len(_servers_on(store)) == 1
    ctl.kill()
    wait_for(lambda: not _servers_on(store), 5, what="the nats-server to die with its parent")
    ctl.start()
    assert ctl.url == url, "the restarted controller's NATS URL changed"
    assert len(_servers_on(store)) == 1
    # One JetStream directory, one server: the stream goes on where it stopped.
    second = asyncio.run(publish_durable(url, [_register(41, 1)]))
    assert second[0] == first[0] + 1
    replicas = wait_for(lambda: len(r := cli_json("replicas", "--job", "41", "--nats-url", url))
                        == 2 and r, 15, what="both replicas after the restart")
    assert {r["replica_group"] for r in replicas} == {0, 1}


def test_a_start_stops_a_leftover_server_on_its_store_and_keeps_its_port(
        tmp_path: Path) -> None:
    port_file = tmp_path / "nats.port"
    old = NatsServerProcess(tmp_path / "nats", port_file=port_file)
    url = old.start()
    new = NatsServerProcess(tmp_path / "nats", port_file=port_file)
    try:
        assert new.start() == url
        assert old.proc is not None and old.proc.wait(5) is not None
        assert _servers_on(tmp_path / "nats") == [new.proc.pid]
    finally:
        new.stop()
        old.stop()


def test_a_taken_port_gives_a_new_one_and_remembers_it(tmp_path: Path) -> None:
    port_file = tmp_path / "nats.port"
    server = NatsServerProcess(tmp_path / "nats", port_file=port_file)
    first = server.start()
    server.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(port_file.read_text())))
        squatter.listen()
        server = NatsServerProcess(tmp_path / "nats", port_file=port_file)
        try:
            second = server.start()
        finally:
            server.stop()
    assert second != first
    assert port_file.read_text().strip() == second.rsplit(":", 1)[1]


class LocalAgent(AgentProcess):
    """An agent that finds NATS through a local controller's state directory."""

    def __init__(self, base: Path, controller_state_dir: Path) -> None:
        super().__init__(base, "")
        self.controller_state_dir = controller_state_dir

    def start(self, timeout_s: float = 20.0, *, wait_nats: bool = True) -> LocalAgent:
        argv = marduk_argv("agent", "--node", self.node, "--simulate-gpus", str(self.gpus),
                           "--socket", str(self.socket_path), "--state-dir", str(self.state_dir),
                           "--controller-state-dir", str(self.controller_state_dir),
                           "--log-level", "info")
        self._log_offset = 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, cwd=REPO)
        self.wait_log("connected to NATS", timeout_s)
        return self


def test_agent_with_controller_state_dir_follows_a_restart_on_a_new_port(
        tmp_path: Path, embedded: ControllerProcess) -> None:
    ctl = embedded.start()
    old_url = ctl.url
    agent = LocalAgent(tmp_path, ctl.state_dir).start()
    try:
        ctl.kill()
        wait_for(lambda: not _servers_on(ctl.state_dir / "nats"), 5, what="the old server gone")
        with socket.socket() as squatter:  # the old port is taken while the controller is down
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", int(old_url.rsplit(":", 1)[1])))
            squatter.listen()
            ctl.start()
        new_url = ctl.url
        assert new_url != old_url
        agent.wait_log(f"connected to NATS at {new_url}", 20)
        proc = run_cli("inject", "--node", "n2", "--gpu", "0", "--xid", "79",
                       "--nats-url", new_url)
        assert proc.returncode == 0 and "via agent" in proc.stdout, proc.stdout + proc.stderr
    finally:
        agent.stop()


# -- supervised restarts -----------------------------------------------------------------------


async def test_supervisor_backoff_resets_after_a_stable_run() -> None:
    sup = Supervisor(max_restarts=10, backoff_base_s=0.05, backoff_max_s=5.0, stable_s=0.3)
    runs = 0

    async def crashes_then_serves_then_crashes() -> None:
        nonlocal runs
        runs += 1
        if runs == 4:
            await asyncio.sleep(0.4)  # a stable run: longer than stable_s
        if runs <= 4:
            raise RuntimeError(f"crash {runs}")

    sup.start("task", crashes_then_serves_then_crashes)
    await asyncio.wait_for(_until(lambda: runs == 5), 10)
    await sup.stop()
    delays = sup.delays["task"]
    assert delays[2] > 0.05, "the backoff did not grow over quick crashes"
    assert delays[3] <= 0.05, f"the backoff was not reset after a stable run: {delays}"


async def test_a_task_that_ignores_its_cancellation_is_named_and_left_behind(
        caplog: pytest.LogCaptureFixture) -> None:
    sup = Supervisor()
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await release.wait()  # a cleanup that never ends

    sup.start("stubborn", stubborn)
    sup.start("polite", lambda: asyncio.sleep(3600))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await sup.stop(timeout_s=0.3) == ["stubborn"]
    assert time.monotonic() - started < 5
    assert "task stubborn did not stop within 0 s of its cancellation" in caplog.text
    assert "in stubborn" in caplog.text  # where it waits
    release.set()


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await asyncio.sleep(0.01)


async def test_risk_watch_restart_counts_each_reading_once(
        tmp_path: Path, nats_server: NatsServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(risk_watch, "SCORE_EVERY_S", 0.05)
    store = Store(tmp_path / "marduk.db")
    store.migrate()
    store.add_event("gpu_verdict", now=time.time(), node="n1", gpu_uuid="GPU-old",
                    action="watch", evidence={"gpu_index": 0, "xids": [48]})
    bus = Bus(nats_server.url, name="test-risk")
    await bus.connect()
    ctx = Context(StoreRunner(store), bus, Policy())
    scored = 0

    def settings() -> ControllerSettings:
        nonlocal scored
        scored += 1
        if scored == 1:  # the first scoring round crashes the task once
            raise RuntimeError("crash")
        return ControllerSettings()

    watch = risk_watch.RiskWatch(ctx, settings)
    sup = Supervisor(backoff_base_s=0.01, backoff_max_s=0.01)
    sup.start("risk", watch.run)
    try:
        await asyncio.wait_for(_until(lambda: scored >= 2), 10)
        assert sup.crashes["risk"] == 1
        event = m.FeedEvent(id=2, kind="gpu_verdict", node="n1", gpu_uuid="GPU-new",
                            evidence={"gpu_index": 1, "xids": [48]}, ts=time.time())
        await bus.publish(subjects.FEED, m.encode(event))
        await bus.flush()
        await asyncio.wait_for(_until(lambda: "GPU-new" in watch.tracker.gpus), 10)
        await asyncio.sleep(0.3)  # time for a duplicate delivery to arrive
        assert len(watch.tracker.gpus["GPU-new"].readings) == 1
        assert len(watch.tracker.gpus["GPU-old"].readings) == 1
    finally:
        await sup.stop()
        await bus.close()
        store.close()


def test_unreadable_history_row_is_skipped_and_counted(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    state = tmp_path / "state"
    state.mkdir()
    store = Store(state / "marduk.db")
    store.migrate()
    now = time.time()
    store.add_event("gpu_verdict", now=now, node="n1", gpu_uuid="GPU-bad", action="watch",
                    evidence={"ecc": [1]})
    store.add_event("gpu_verdict", now=now, node="n1", gpu_uuid="GPU-good", action="watch",
                    evidence={"gpu_index": 0, "xids": [48]})
    store.add_event("straggler_policy", now=now, job_id=7, reason="no-such-policy")
    store.close()
    ctl = ControllerProcess(state, nats_server.url).start()
    try:
        status = wait_for(lambda: (s := ctl.request("status"))["counters"].get(
            "startup_rows_skipped") == 2 and s, 15, what="the skipped rows counted")
        assert status["counters"]["startup_rows_skipped"] == 2
        risk = ctl.request("risk")
        assert {r["gpu_uuid"] for r in risk} >= {"GPU-good"}
        assert "crashed" not in ctl.log()
    finally:
        assert ctl.stop() == 0


# -- inject fallback -----------------------------------------------------------------------


def _inventory(node: str, *, simulated: bool) -> tuple[str, bytes]:
    msg = m.GpuInventory(node=node, gpus=[m.GpuDescriptor(f"GPU-{node}-0", 0)],
                         simulated=simulated, ts=time.time())
    return subjects.node_event(node, "gpu_inventory"), m.encode(msg)


def _verdicts(ctl: ControllerProcess, node: str) -> list[dict[str, object]]:
    return [e for e in ctl.request("history", {"node": node}) if e["kind"] == "gpu_verdict"]


def test_inject_without_an_agent_publishes_only_for_simulated_gpus_unless_forced(
        controller: ControllerProcess) -> None:
    asyncio.run(publish_durable(controller.url, [_inventory("real1", simulated=False),
                                                 _inventory("sim1", simulated=True)]))
    wait_for(lambda: {"real1", "sim1"} <= {n["name"] for n in controller.request("nodes")},
             what="both inventories")
    url = ["--nats-url", controller.url]
    refused = run_cli("inject", "--node", "real1", "--gpu", "0", "--xid", "79", *url)
    assert refused.returncode != 0 and "--force" in refused.stderr, refused.stderr
    simulated = cli_json("inject", "--node", "sim1", "--gpu", "0", "--xid", "79", *url)
    forced = cli_json("inject", "--node", "real1", "--gpu", "0", "--xid", "79", "--force", *url)
    assert simulated["via"] == forced["via"] == "bus"
    for node, reply in (("sim1", simulated), ("real1", forced)):
        verdict = wait_for(lambda n=node: _verdicts(controller, n), what=f"{node}'s verdict")
        assert len(verdict) == 1  # the refused inject left nothing behind
        assert verdict[0]["evidence"]["inject_request_id"] == reply["request_id"]


def test_agent_verdict_carries_the_controllers_inject_request_id(
        controller: ControllerProcess, agent: AgentProcess) -> None:
    wait_for(lambda: any(n["name"] == "n2" and n["gpus"] for n in controller.request("nodes")),
             what="the agent's inventory")
    reply = cli_json("inject", "--node", "n2", "--gpu", "1", "--xid", "79",
                     "--nats-url", controller.url)
    assert reply["via"] == "agent" and reply["request_id"].startswith("inj-")
    verdict = wait_for(lambda: [e for e in _verdicts(controller, "n2")
                                if e["action"] == "drain_node"], what="the agent's verdict")
    assert verdict[0]["source"] == "agent"
    assert inject_request_id(verdict[0]["evidence"]) == reply["request_id"]


@pytest.mark.parametrize(("evidence", "applied", "repeat"), [
    ({"inject_request_id": "inj-" + "a" * 32}, {"inj-" + "a" * 32}, True),
    ({"inject_request_id": "inj-" + "a" * 32}, {"inj-" + "b" * 32}, False),
    ({"xids": [79]}, {"inj-" + "a" * 32}, False),  # a real fault is never a repeat
    ({"inject_request_id": ["inj-" + "a" * 32]}, {"inj-" + "a" * 32}, False),  # wrong shape
])
def test_a_second_verdict_for_one_inject_request_is_a_repeat(
        evidence: dict[str, object], applied: set[str], repeat: bool) -> None:
    assert is_repeat_of_applied_inject(evidence, applied) is repeat


def test_risk_scores_ignore_a_recorded_repeat_of_an_inject() -> None:
    watch = risk_watch.RiskWatch(cast(Context, None), ControllerSettings)
    evidence = {"gpu_index": 0, "xids": [48], "inject_request_id": "inj-" + "c" * 32}
    watch._apply("gpu_verdict", "n1", "GPU-0", evidence, time.time())
    watch._apply("gpu_verdict", "n1", "GPU-0", mark_repeat(evidence), time.time())
    assert len(watch.tracker.gpus["GPU-0"].readings) == 1
