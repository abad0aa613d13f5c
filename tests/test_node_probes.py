"""Ports read from a fake sysfs tree and mounts probed, in-process: hostile file contents, a
probe that hangs (the event loop keeps running, no second probe starts, the verdict comes
after the time limit), and the watcher publishing only what changed."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest

from marduk_slurm.adapters.node_probes import (
    COUNTER_MAX,
    MountProber,
    ThreadProbe,
    find_ports,
    probe_mount,
    read_port,
)
from marduk_slurm.agent.node_watch import NodeWatchConfig, NodeWatcher
from marduk_slurm.agent.outbox import Outbox
from marduk_slurm.domain import messages as m
from marduk_slurm.domain.node_health import NodeHealthPolicy, ProbeOutcome

from node_health_fixtures import FakeSysfs

IB = "mlx5_0/1"


def test_a_healthy_tree_reads_as_it_is_written(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path)
    fake.ib_port(IB, link_downed=2, errors=7)
    fake.net_port("eth0", carrier_changes=5)
    ib = read_port(tmp_path, IB, 1.0)
    assert (ib.present, ib.state, ib.phys_state, ib.flaps, ib.errors) == (
        True, "ACTIVE", "LinkUp", 2, {})
    assert ib.counters["symbol_error"] == 7 and len(ib.counters) == 6
    net = read_port(tmp_path, "eth0", 1.0)
    assert (net.state, net.flaps, net.counters) == ("up", 5, {"rx_errors": 0, "tx_errors": 0})
    assert not read_port(tmp_path, "mlx5_9/1", 1.0).present
    assert not read_port(tmp_path, "eth7", 1.0).present


@pytest.mark.parametrize("content, value, error", [
    ("12\n", 12, None),
    ("  12  \n\n", 12, None),
    ("9" * 30, COUNTER_MAX, None),  # a counter beyond 2^53 is clamped
    ("9" * 41, None, "not a counter"),
    ("-5", None, "not a counter"),
    ("abc", None, "not a counter"),
    ("1e9", None, "not a counter"),
    ("", None, "not a counter"),
    ("1\n2", None, "not a counter"),
    ("\x00\x1b[31m", None, "not a counter"),
    ("x" * 10_000_000, None, "more than 256 bytes"),
])
def test_hostile_counter_files_are_errors_in_the_reading(tmp_path: Path, content: str,
                                                         value: int | None,
                                                         error: str | None) -> None:
    FakeSysfs(tmp_path).net_port("eth0")
    FakeSysfs(tmp_path).write("class/net/eth0/carrier_changes", content)
    reading = read_port(tmp_path, "eth0", 1.0)
    assert reading.flaps == value
    if error is None:
        assert reading.errors == {}
    else:
        assert error in reading.errors["carrier_changes"]
        # Whatever the file held, the evidence is printable and bounded.
        assert m.printable(reading.errors["carrier_changes"])
        assert len(reading.errors["carrier_changes"]) < 200


def test_hostile_state_files_and_odd_entries(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path)
    base = fake.ib_port(IB)
    fake.write(f"class/infiniband/{IB.replace('/', '/ports/')}/state", "4: ACT\u202eIVE\n")
    (base / "phys_state").unlink()
    (base / "phys_state").mkdir()  # a directory where a file should be
    (base / "counters" / "symbol_error").unlink()  # not every HCA has every counter
    reading = read_port(tmp_path, IB, 1.0)
    assert reading.state is None and "not a state" in reading.errors["state"]
    assert reading.phys_state is None and reading.errors["phys_state"] == "EISDIR"
    assert "symbol_error" not in reading.counters and "symbol_error" not in reading.errors
    verdict = NodeHealthPolicy().judge_port([reading])
    assert verdict.action.value == "watch"
    # The verdict goes on the wire as it is: the controller's checks accept its evidence.
    msg = m.NodeVerdict(node="n2", component="port", target=IB, action="watch",
                        reason=verdict.reason, evidence=verdict.evidence)
    assert m.decode_durable(m.encode(msg)) == msg


def test_all_finds_real_ports_and_skips_hostile_names(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path)
    fake.ib_port("mlx5_0/1")
    fake.ib_port("mlx5_1/1")
    fake.net_port("eth0")
    fake.net_port("lo", device=False)
    fake.net_port("-evil", device=True)
    (tmp_path / "class" / "net" / "bad\nname" / "device").mkdir(parents=True)
    assert find_ports(tmp_path, ["all"], ["all"]) == ["mlx5_0/1", "mlx5_1/1", "eth0"]
    assert find_ports(tmp_path / "nowhere", ["all"], ["all"]) == []
    assert find_ports(tmp_path, ["mlx5_0/1", "all"], []) == ["mlx5_0/1", "mlx5_1/1"]


# -- a probe that hangs ----------------------------------------------------------------------


async def _ticks_while(coro: Any) -> tuple[Any, int]:
    """Run `coro` while a ticker counts how often the event loop ran it: a blocked loop
    counts nothing."""
    ticks = 0
    stop = asyncio.Event()

    async def tick() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    try:
        return await coro, ticks
    finally:
        stop.set()
        await ticker


def test_a_hung_call_times_out_and_is_not_started_again() -> None:
    release = threading.Event()
    calls = []

    def stuck() -> str:
        calls.append(1)
        release.wait(30)
        return "late"

    async def scenario() -> None:
        probe: ThreadProbe[str] = ThreadProbe("test")
        first, ticks = await _ticks_while(probe.run(stuck, 0.3))
        assert first.outcome is ProbeOutcome.TIMED_OUT and ticks > 3
        second = await probe.run(stuck, 0.3)
        assert second.outcome is ProbeOutcome.HUNG and second.elapsed_s >= first.elapsed_s
        assert len(calls) == 1 and probe.runs == 1 and probe.hung == 1
        release.set()
        while probe.busy:
            await asyncio.sleep(0.01)
        third = await probe.run(lambda: "fresh", 5.0)
        assert (third.outcome, third.value, probe.runs) == (ProbeOutcome.OK, "fresh", 2)
        failed = await probe.run(lambda: 1 // 0, 5.0)
        assert failed.outcome is ProbeOutcome.FAILED
        assert isinstance(failed.error, ZeroDivisionError)

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_a_probe_blocked_on_a_fifo_is_hung(tmp_path: Path) -> None:
    """open() of a FIFO for writing blocks until a reader comes: a stand-in for a hung
    filesystem that the kernel would also never let go."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def write_fifo() -> None:
        with open(fifo, "wb") as fh:
            fh.write(b"x")

    async def scenario() -> list[ProbeOutcome]:
        prober = MountProber(str(tmp_path), write=True, node="n2", probe=write_fifo)
        first = await prober.probe(0.3)
        second = await prober.probe(0.3)
        return [first.outcome, second.outcome]

    try:
        assert asyncio.run(scenario()) == [ProbeOutcome.TIMED_OUT, ProbeOutcome.HUNG]
    finally:
        # A reader lets the stuck thread finish.
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)


def test_the_real_probe_refuses_a_path_that_is_no_mount_point(tmp_path: Path) -> None:
    async def probe(path: str, write: bool) -> Any:
        return await MountProber(path, write=write, node="n2").probe(5.0)

    reading = asyncio.run(probe(str(tmp_path), True))
    assert reading.outcome is ProbeOutcome.NOT_MOUNTED
    missing = asyncio.run(probe(str(tmp_path / "gone"), False))
    assert (missing.outcome, missing.errno_name) == (ProbeOutcome.FAILED, "ENOENT")


@pytest.mark.skipif(not (os.path.ismount("/dev/shm") and os.access("/dev/shm", os.W_OK)),
                    reason="needs a writable mount point (/dev/shm)")
def test_the_write_probe_leaves_nothing_and_never_follows_a_planted_link(
        tmp_path: Path) -> None:
    node = f"test{os.getpid()}"
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    planted = Path("/dev/shm") / f".marduk-probe.{node}"
    planted.symlink_to(victim)
    try:
        probe_mount("/dev/shm", write=True, node=node)
        assert not planted.exists() and not planted.is_symlink()
        assert victim.read_text() == "keep me"
        probe_mount("/dev/shm", write=False, node=node)
    finally:
        if planted.is_symlink():
            planted.unlink()


# -- the watcher -------------------------------------------------------------------------------


class RecordingBus:
    connected = True

    def __init__(self) -> None:
        self.sent: list[m.NodeVerdict] = []

    async def publish_durable(self, subject: str, data: bytes, *, msg_id: str = "",
                              timeout_s: float = 5.0) -> int:
        msg = m.decode_durable(data)  # what the controller would decode, or an error
        assert isinstance(msg, m.NodeVerdict) and subject.endswith(".node_verdict")
        self.sent.append(msg)
        return len(self.sent)


async def _published(bus: RecordingBus, outbox: Outbox) -> list[tuple[str, str, str]]:
    await outbox.flush(5.0)
    return [(v.target, v.action, v.reason) for v in bus.sent]


def test_the_watcher_drains_on_a_hung_mount_after_the_time_limit_and_keeps_the_loop(
        tmp_path: Path) -> None:
    release = threading.Event()
    started = []

    def hang() -> None:
        started.append(1)
        release.wait(30)

    async def scenario() -> None:
        bus = RecordingBus()
        outbox = Outbox(bus)
        sender = asyncio.create_task(outbox.run())
        config = NodeWatchConfig(mounts=["/lustre"], interval_s=0.05, probe_timeout_s=0.3)
        probes = {"/lustre": MountProber("/lustre", write=True, node="n2", probe=hang)}
        watcher = NodeWatcher(config, NodeHealthPolicy(mount_slow_s=0.1), node="n2",
                              outbox=outbox, mount_probes=probes)
        verdict, ticks = await _ticks_while(watcher.check_mount("/lustre"))
        assert verdict.action.value == "drain_node" and ticks > 3
        assert "probe hung" in verdict.reason and verdict.evidence["outcome"] == "timed_out"
        for _ in range(3):  # still hung: reported, never started again, published once
            again = await watcher.check_mount("/lustre")
            assert again.action.value == "drain_node" and "still hung" in again.reason
        assert len(started) == 1
        assert watcher.summary()["hung"] == ["/lustre"]
        release.set()
        while probes["/lustre"].runner.busy:
            await asyncio.sleep(0.01)
        healthy = await watcher.check_mount("/lustre")
        assert healthy.action.value == "none"
        assert [a for _, a, _ in await _published(bus, outbox)] == ["drain_node", "none"]
        sender.cancel()

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_the_watcher_publishes_a_flapping_port_once(tmp_path: Path) -> None:
    fake = FakeSysfs(tmp_path)
    fake.net_port("eth0", carrier_changes=2)
    fake.ib_port(IB)

    async def scenario() -> list[tuple[str, str, str]]:
        bus = RecordingBus()
        outbox = Outbox(bus)
        sender = asyncio.create_task(outbox.run())
        config = NodeWatchConfig(sysfs_root=tmp_path, ib_ports=["all"], net_ports=["eth0"],
                                 interval_s=0.05, probe_timeout_s=5.0)
        watcher = NodeWatcher(config, NodeHealthPolicy(), node="n2", outbox=outbox)
        await watcher.check_all()
        for changes in (3, 4, 5, 6, 7):  # link lost again and again
            fake.write("class/net/eth0/carrier_changes", f"{changes}\n")
            await watcher.check_all()
        fake.write(f"class/infiniband/{IB.replace('/', '/ports/')}/state", "1: DOWN\n")
        await watcher.check_all()
        fake.write("class/net/eth0/carrier_changes", "garbage\n")
        await watcher.check_all()
        sent = await _published(bus, outbox)
        sender.cancel()
        return sent

    sent = asyncio.run(scenario())
    assert [(t, a) for t, a, _ in sent] == [
        ("mlx5_0/1", "none"), ("eth0", "none"),
        ("eth0", "watch"),  # lost once
        ("eth0", "drain_node"),  # three times in the window: flapping, published once
        ("mlx5_0/1", "drain_node"),
        ("eth0", "drain_node")]  # the unreadable counter adds a finding to the flapping
    assert "flapping" in sent[3][2] and "state DOWN" in sent[4][2]


def test_drills_on_the_watcher(tmp_path: Path) -> None:
    FakeSysfs(tmp_path).ib_port(IB)

    async def scenario() -> None:
        bus = RecordingBus()
        outbox = Outbox(bus)
        sender = asyncio.create_task(outbox.run())
        config = NodeWatchConfig(sysfs_root=tmp_path, ib_ports=[IB], mounts=["/lustre"])
        watcher = NodeWatcher(config, NodeHealthPolicy(), node="n2", outbox=outbox)
        await watcher.check_ports()
        flap = watcher.inject("port", IB, "flap", "drill", "inj-" + "0" * 32)
        assert flap.action.value == "drain_node" and flap.evidence["injected"] is True
        hang = watcher.inject("mount", "/lustre", "hang", "drill")
        assert hang.action.value == "drain_node" and hang.evidence["injected_fault"] == "hang"
        for args in (("port", "mlx5_9/1", "flap"), ("mount", "/nfs", "hang"),
                     ("gpu", "0", "flap")):
            with pytest.raises(ValueError):
                watcher.inject(*args, actor="drill")
        sent = await _published(bus, outbox)
        assert [(t, a) for t, a, _ in sent] == [
            (IB, "none"), (IB, "drain_node"), ("/lustre", "drain_node")]
        assert msgspec.to_builtins(bus.sent[1].evidence)["inject_request_id"].startswith("inj-")
        sender.cancel()

    asyncio.run(scenario())


def test_two_rounds_at_once_wait_for_each_other_instead_of_seeing_a_hang() -> None:
    """A node check's round during the periodic one: a probe that is merely running must not
    be reported as hung (and drain the node)."""
    gate = threading.Event()

    def slow_but_fine() -> None:
        gate.wait(5)

    async def scenario() -> None:
        bus = RecordingBus()
        outbox = Outbox(bus)
        sender = asyncio.create_task(outbox.run())
        probes = {"/lustre": MountProber("/lustre", write=True, node="n2", probe=slow_but_fine)}
        watcher = NodeWatcher(NodeWatchConfig(mounts=["/lustre"], probe_timeout_s=10.0),
                              NodeHealthPolicy(mount_slow_s=9.0), node="n2", outbox=outbox,
                              mount_probes=probes)
        rounds = asyncio.gather(watcher.check_all(), watcher.check_all())
        await asyncio.sleep(0.2)
        gate.set()
        await rounds
        assert (probes["/lustre"].runner.runs, probes["/lustre"].runner.hung) == (2, 0)
        assert [a for _, a, _ in await _published(bus, outbox)] == ["none"]
        sender.cancel()

    asyncio.run(scenario())


def test_a_hung_sysfs_read_is_watched_and_not_read_again_until_it_returns(
        tmp_path: Path) -> None:
    """A driver that does not answer a sysfs read (here: a FIFO where operstate should be,
    which blocks open() until a writer comes)."""
    fake = FakeSysfs(tmp_path)
    fake.net_port("eth0")
    operstate = tmp_path / "class" / "net" / "eth0" / "operstate"
    operstate.unlink()
    os.mkfifo(operstate)

    async def scenario() -> list[tuple[str, str, str]]:
        bus = RecordingBus()
        outbox = Outbox(bus)
        sender = asyncio.create_task(outbox.run())
        config = NodeWatchConfig(sysfs_root=tmp_path, net_ports=["eth0"], probe_timeout_s=0.3)
        watcher = NodeWatcher(config, NodeHealthPolicy(), node="n2", outbox=outbox)
        await watcher.check_ports()
        await watcher.check_ports()
        assert (watcher.port_reader.runs, watcher.port_reader.hung) == (1, 1)
        fd = os.open(operstate, os.O_WRONLY | os.O_NONBLOCK)  # the reader is waiting
        os.write(fd, b"up\n")
        os.close(fd)
        while watcher.port_reader.busy:
            await asyncio.sleep(0.01)
        operstate.unlink()
        operstate.write_text("up\n")
        await watcher.check_ports()
        sent = await _published(bus, outbox)
        sender.cancel()
        return sent

    sent = asyncio.run(scenario())
    assert [(t, a) for t, a, _ in sent] == [("sysfs", "watch"), ("sysfs", "none"),
                                            ("eth0", "none")]
    assert "timed_out" in sent[0][2]
