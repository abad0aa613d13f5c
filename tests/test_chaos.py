"""Faults injected into real processes: the controller SIGKILLed under load, NATS restarted under
real training, slurmctld down during a fault, the database locked or its disk full, and 10,000
malformed messages. Each test appends its figures to chaos-report.md in $MARDUK_TEST_ARTIFACTS
(default /tmp/marduk-test-artifacts)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.store import Store
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError

from chaos_fuzz import fuzz_durable, fuzz_heartbeats, fuzz_requests
from harness import ControllerProcess, publish_durable, run_cli, wait_for
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

ARTIFACTS = Path(os.environ.get("MARDUK_TEST_ARTIFACTS", "/tmp/marduk-test-artifacts"))


def report(title: str, figures: dict[str, Any], note: str = "") -> None:
    """Append one section to the chaos report (and print it, for -s runs)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    lines = [f"## {title}", "", f"{time.strftime('%Y-%m-%d %H:%M:%S')}, {os.cpu_count()} CPUs",
             "", "| figure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in figures.items()]
    lines += ["", note, ""] if note else [""]
    text = "\n".join(lines) + "\n"
    with (ARTIFACTS / "chaos-report.md").open("a") as fh:
        fh.write(text)
    print(text)


def step_start(job: int, node: str) -> tuple[str, bytes]:
    msg = m.StepStart(job_id=job, step_id=0, node=node, ts=time.time())
    return subjects.node_event(node, "step_start"), m.encode(msg)


def recorded_jobs(db: Path, first: int) -> tuple[int, int]:
    """(distinct step_start jobs >= first, duplicate rows) read beside the running daemon."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        row = conn.execute("SELECT COUNT(DISTINCT job_id), COUNT(*) FROM events "
                           "WHERE kind='step_start' AND job_id >= ?", (first,)).fetchone()
    except sqlite3.OperationalError:
        return 0, 0
    finally:
        conn.close()
    return int(row[0]), int(row[1]) - int(row[0])


def db_path(ctl: ControllerProcess) -> Path:
    return Path(ctl.env.get("MARDUK_CONTROLLER_DATABASE", ctl.state_dir / "marduk.db"))


def integrity(db: Path) -> str:
    store = Store(db)
    try:
        return store.integrity_check()
    finally:
        store.close()


class Producer(threading.Thread):
    """Durable events at a steady rate, plus heartbeats, on its own event loop."""

    def __init__(self, url: str, *, rate_hz: float, first_job: int) -> None:
        super().__init__(daemon=True)
        self.url, self.period, self.first_job = url, 1.0 / rate_hz, first_job
        self.sent: list[int] = []
        self.retries = 0
        self.heartbeats = 0
        self.stop_event = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        bus = Bus(self.url, name="chaos-producer")
        await bus.connect(retry=True)
        next_t = time.monotonic()
        while not self.stop_event.is_set():
            job = self.first_job + len(self.sent)
            subject, data = step_start(job, f"n{job % 8}")
            try:
                await bus.publish_durable(subject, data, msg_id=f"chaos-{job}")
            except BusError:
                self.retries += 1  # same id again: JetStream's duplicate window dedups it
                continue
            self.sent.append(job)
            if job % 4 == 0:
                hb = m.Heartbeat(replica_id="job1_rg0:u", job_id=1, step=job, step_time_ms=10.0,
                                 allreduce_ms=1.0, participants=2, ts=time.time())
                await bus.publish(subjects.heartbeat(1), m.encode(hb))
                self.heartbeats += 1
            next_t += self.period
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        await bus.close()


@pytest.mark.slow
def test_controller_sigkilled_five_times_under_steady_load_loses_nothing(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    state = tmp_path / "state"
    ctl = ControllerProcess(state, nats_server.url).start()
    producer = Producer(nats_server.url, rate_hz=200, first_job=100_000)
    producer.start()
    downtime: list[float] = []
    for _ in range(5):
        time.sleep(1.0)
        killed = time.monotonic()
        ctl.kill()
        ctl.start()  # returns once the restarted controller answers `status`
        downtime.append(time.monotonic() - killed)
    time.sleep(1.0)
    producer.stop_event.set()
    producer.join(10)
    sent = len(producer.sent)
    stopped = time.monotonic()
    wait_for(lambda: recorded_jobs(db_path(ctl), 100_000)[0] >= sent, 60, 0.2,
             "every acknowledged event recorded")
    catch_up = time.monotonic() - stopped
    assert ctl.stop() == 0, ctl.log()
    recorded, duplicates = recorded_jobs(db_path(ctl), 100_000)
    check = integrity(db_path(ctl))
    report("Controller SIGKILLed under steady load", {
        "events sent (acked by JetStream)": sent, "events recorded": recorded,
        "events lost": sent - recorded, "duplicates": duplicates, "kills": len(downtime),
        "heartbeats sent": producer.heartbeats, "publish retries": producer.retries,
        "downtime per restart, s (kill to ready)": ", ".join(f"{d:.2f}" for d in downtime),
        "max downtime, s": f"{max(downtime):.2f}",
        "backlog caught up after the load stopped, s": f"{catch_up:.2f}",
        "integrity_check": check})
    assert (recorded, duplicates, check) == (sent, 0, "ok")


def hold_exclusive_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that holds BEGIN EXCLUSIVE on the database for `seconds`."""
    code = ("import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True)\n"
            "time.sleep(float(sys.argv[2])); c.execute('COMMIT')\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db), str(seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def recover(ctl: ControllerProcess, db: Path, first: int, total: int, since: float
            ) -> tuple[float, str]:
    """Wait until every event is committed; restart the controller as systemd would if it
    chose to exit. Returns (seconds from `since`, what the daemon did)."""
    def done() -> bool:
        assert ctl.proc is not None
        if ctl.proc.poll() is not None:
            ctl.restarted = f"exited {ctl.proc.returncode}, restarted"  # type: ignore[attr-defined]
            ctl.start()
        return recorded_jobs(db, first)[0] >= total
    ctl.restarted = "stayed up"  # type: ignore[attr-defined]
    wait_for(done, 90, 0.2, f"all {total} events committed after the fault cleared")
    return time.monotonic() - since, ctl.restarted  # type: ignore[attr-defined]


@pytest.mark.slow
def test_database_locked_by_another_process_then_released(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    ctl = ControllerProcess(tmp_path / "state", nats_server.url).start()
    db = db_path(ctl)
    asyncio.run(publish_durable(ctl.url, [step_start(200_000 + i, "n1") for i in range(20)]))
    wait_for(lambda: recorded_jobs(db, 200_000)[0] == 20, what="baseline events")
    locker = hold_exclusive_lock(db, 8.0)
    asyncio.run(publish_durable(ctl.url, [step_start(200_020 + i, "n1") for i in range(200)]))
    locker.wait(30)
    released = time.monotonic()
    seconds, fate = recover(ctl, db, 200_000, 220, released)
    log = ctl.log()
    assert ctl.stop() == 0, log
    recorded, duplicates = recorded_jobs(db, 200_000)
    check = integrity(db)
    report("Database locked by another process (BEGIN EXCLUSIVE, 8 s)", {
        "events published during the lock": 200, "recorded": recorded,
        "duplicates": duplicates, "daemon": fate,
        "lock released to all committed, s": f"{seconds:.2f}",
        "clear error in the log": "database is locked" in log, "integrity_check": check})
    assert "database is locked" in log
    assert (recorded, duplicates, check) == (220, 0, "ok")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs, for a real ENOSPC (2 MiB is less than the WAL of a busy database)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    try:
        with filler.open("wb", buffering=0) as fh:
            while True:
                fh.write(b"\0" * 4096)
    except OSError:
        pass  # ENOSPC: the last block is taken
    return filler


@pytest.mark.slow
def test_disk_full_then_space_freed(tmp_path: Path, nats_server: NatsServerProcess,
                                    small_fs: Path) -> None:
    db = small_fs / "marduk.db"
    ctl = ControllerProcess(tmp_path / "state", nats_server.url,
                            extra_env={"MARDUK_CONTROLLER_DATABASE": str(db)}).start()
    asyncio.run(publish_durable(ctl.url, [step_start(300_000 + i, "n2") for i in range(20)]))
    wait_for(lambda: recorded_jobs(db, 300_000)[0] == 20, what="baseline events")
    filler = fill(small_fs)
    asyncio.run(publish_durable(ctl.url, [step_start(300_020 + i, "n2") for i in range(400)]))
    wait_for(lambda: "full" in ctl.log(), 30, 0.2, "the disk-full error in the log")
    time.sleep(3.0)  # let it sit on a full disk for a while
    filler.unlink()
    freed = time.monotonic()
    seconds, fate = recover(ctl, db, 300_000, 420, freed)
    log = ctl.log()
    assert ctl.stop() == 0, log
    recorded, duplicates = recorded_jobs(db, 300_000)
    check = integrity(db)
    report("Disk full (16 MiB tmpfs filled to the last block)", {
        "events published while full": 400, "recorded": recorded, "duplicates": duplicates,
        "daemon": fate, "space freed to all committed, s": f"{seconds:.2f}",
        "clear error in the log": "database or disk is full" in log,
        "integrity_check": check}, note="A real ENOSPC: the database lives on a tmpfs mount.")
    assert "database or disk is full" in log
    assert (recorded, duplicates, check) == (420, 0, "ok")


@pytest.mark.slow
def test_ten_thousand_malformed_messages(tmp_path: Path, nats_server: NatsServerProcess
                                         ) -> None:
    ctl = ControllerProcess(tmp_path / "state", nats_server.url).start()
    durable, heartbeats = fuzz_durable(5000), fuzz_heartbeats(3000)
    requests = fuzz_requests(10_000 - len(durable) - len(heartbeats))
    started = time.monotonic()

    async def send() -> list[m.Reply | None]:
        bus = Bus(ctl.url, name="fuzzer")
        await bus.connect()
        for subject, data in durable:
            await bus.publish_durable(subject, data)
        for subject, data in heartbeats:
            await bus.publish(subject, data)
        await bus.flush()
        replies: list[m.Reply | None] = []
        for subject, data in requests:
            try:
                replies.append(m.decode_reply(await bus.request(subject, data, 5.0)))
            except BusError:
                replies.append(None)
        await bus.close()
        return replies

    replies = asyncio.run(send())
    status = wait_for(lambda: (s := ctl.request("status"))["rejected_total"] >= len(durable)
                      and s, 60, 0.2, "every durable message counted")
    elapsed = time.monotonic() - started
    # Each counter row names the kind of message it refused: heartbeats and requests by
    # theirs, durable messages by the kind they claimed (or "?").
    by_cause: dict[str, int] = {}
    by_lane = {"durable": 0, "heartbeat": 0, "request": 0}
    for row in status["rejections"]:
        by_cause[row["cause"]] = by_cause.get(row["cause"], 0) + row["count"]
        lane = row["kind"] if row["kind"] in ("heartbeat", "request") else "durable"
        by_lane[lane] += row["count"]
    error_replies = sum(1 for r in replies if r is not None and not r.ok)
    assert ctl.proc is not None and ctl.proc.poll() is None
    asyncio.run(publish_durable(ctl.url, [step_start(400_000, "n3")]))
    wait_for(lambda: recorded_jobs(db_path(ctl), 400_000)[0] == 1, what="a valid event after")
    assert ctl.stop() == 0, ctl.log()
    report("10,000 malformed messages", {
        "durable (JetStream) sent / counted / persisted rejections":
            f"{len(durable)} / {by_lane['durable']} / {status['rejected_total']}",
        "heartbeats sent / counted": f"{len(heartbeats)} / {by_lane['heartbeat']}",
        "rpc + jobrpc requests sent / counted": f"{len(requests)} / {by_lane['request']}",
        "rpc error replies / no reply": f"{error_replies} / {replies.count(None)}",
        "by reason": ", ".join(f"{k}={v}" for k, v in sorted(by_cause.items())),
        "daemon": "up, still ingesting", "seconds": f"{elapsed:.1f}"},
        note="Every message sent is invalid by docs/protocol.md (tests/chaos_fuzz.py checks "
             "that without the project's decoders): each must be counted once, in its lane.")
    assert status["rejected_total"] == len(durable)
    assert by_lane == {"durable": len(durable), "heartbeat": len(heartbeats),
                       "request": len(requests)}
    assert error_replies == len(requests)


@pytest.mark.slow
@pytest.mark.slurm
def test_slurmctld_down_during_a_fault_then_back(
        tmp_path: Path, nats_server: NatsServerProcess,
        slurm_cluster: SlurmCluster) -> None:  # noqa: F811
    from chaos_slurm import drain_after_slurmctld_returns

    figures = drain_after_slurmctld_returns(tmp_path, nats_server, slurm_cluster)
    report("slurmctld stopped during a GPU fault", figures)
    assert figures["drained after the outage"] is True
    assert figures["outbox pending afterwards"] == 0


@pytest.mark.slow
@pytest.mark.torch
def test_nats_restarted_during_real_training(tmp_path: Path, nats_server: NatsServerProcess,
                                             controller: ControllerProcess) -> None:
    pytest.importorskip("torchft", reason="torchft is not importable")
    from chaos_torch import nats_outage_under_training

    figures = nats_outage_under_training(tmp_path, nats_server, controller)
    report("NATS restarted during real torchft training (2 replica groups)", figures)
    assert figures["steps blocked (gap > 1 s during the outage)"] == 0
    assert figures["config applied on both groups at the same step"] is True
    run_cli("status", "--nats-url", controller.url)
