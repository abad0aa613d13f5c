"""The step relay: the Unix socket the SPANK plugin reports job steps to.

A client connects, writes one or more JSON lines (see `domain.step_report`), and closes; the
agent writes nothing back, so the plugin never waits on Marduk. Each report is checked,
its GPU indices resolved to UUIDs through the agent's inventory, written to the journal,
and queued in the outbox for JetStream. A malformed line is logged and counted, never fatal.

The socket is mode 0666: slurmstepd reports as root, but task-context callbacks run as the
job's user. Because anyone on the node can therefore connect, a report is accepted only from
root or from the user it names (checked with SO_PEERCRED where the platform has it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

from marduk_slurm.agent.job_creds import JobCredentials
from marduk_slurm.agent.journal import StepEntry, StepJournal
from marduk_slurm.agent.outbox import Outbox
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.step_report import (
    MAX_LINE_BYTES,
    StepReport,
    parse_line,
    resolve_gpus,
    to_message,
)
from marduk_slurm.errors import MardukError, ProtocolError

log = logging.getLogger(__name__)

Inventory = Callable[[], Mapping[int, str]]


class SocketInUse(MardukError, OSError):
    """Another process already answers on the agent socket."""


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists; pid 0 (not reported) counts as alive: we cannot tell."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _msg_id(node: str, kind: str, job_id: int, step_id: int) -> str:
    return f"{node}.{kind}.{job_id}.{step_id}.{time.time_ns()}"


class StepRelay:
    def __init__(
        self,
        *,
        node: str,
        socket_path: Path,
        journal: StepJournal,
        outbox: Outbox,
        inventory: Inventory,
        idle_timeout_s: float = 10.0,
        job_creds: JobCredentials | None = None,
    ) -> None:
        self.node = node
        self.socket_path = socket_path
        self.journal = journal
        self.outbox = outbox
        self.inventory = inventory
        self.idle_timeout_s = idle_timeout_s
        self.job_creds = job_creds  # agent.job_credentials_dir; None when off
        self.stats: Counter[str] = Counter()
        self.malformed: Counter[str] = Counter()
        self._server: asyncio.AbstractServer | None = None
        self._socket_ino = 0
        self._other_nodes: set[str] = set()

    # -- start-up --------------------------------------------------------------------------

    async def restore(self) -> None:
        """Announce again the steps the journal says are running (a step whose process is
        gone is reported as ended instead), and deliver the ends still owed."""
        entries = await asyncio.to_thread(self.journal.load)
        changed = False
        for entry in entries:
            if not entry.ended and not pid_alive(entry.pid):
                log.info(
                    "step %d.%d: pid %d is gone since the agent stopped; reporting it ended",
                    entry.job_id,
                    entry.step_id,
                    entry.pid,
                )
                entry.ended, entry.ended_at, changed = True, time.time(), True
            if entry.ended:
                self._queue_end(entry)
            else:
                self._queue_start(entry, again=True)
                if self.job_creds is not None:
                    self.job_creds.step_started(entry.job_id, entry.step_id, entry.uid)
        if changed:
            await self.journal.save()
        if entries:
            log.info("journal: %d step(s) re-announced", len(entries))

    async def start(self) -> None:
        """Listen on the socket (remove a stale one first; refuse to steal a live one)."""
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        await asyncio.to_thread(_remove_stale_socket, path)
        self._server = await asyncio.start_unix_server(
            self._on_client, path=str(path), limit=MAX_LINE_BYTES + 1
        )
        os.chmod(path, 0o666)
        self._socket_ino = path.stat().st_ino
        log.info("step relay listening on %s", path)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None
        # Remove only our own socket, not one a newer agent already bound.
        with contextlib.suppress(OSError):
            if self.socket_path.stat().st_ino == self._socket_ino:
                self.socket_path.unlink()

    # -- connections -----------------------------------------------------------------------

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        peer_uid = _peer_uid(writer)
        try:
            while True:
                line = await self._read_line(reader)
                if line is None:
                    break
                if line.strip():
                    await self.accept_line(line, peer_uid)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()

    async def _read_line(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            line = await asyncio.wait_for(reader.readline(), self.idle_timeout_s)
        except TimeoutError:
            self._reject("idle_timeout", f"no complete line within {self.idle_timeout_s:g} s")
            return None
        except (ValueError, asyncio.LimitOverrunError):
            self._reject("too_long", f"a line over {MAX_LINE_BYTES} bytes; connection closed")
            return None
        except (ConnectionError, OSError) as exc:
            self._reject("read_error", str(exc))
            return None
        return line or None  # b"" is end of file; a last line without "\n" still counts

    def _reject(self, reason: str, detail: str) -> None:
        self.malformed[reason] += 1
        self.stats["malformed"] += 1
        log.warning("step relay: rejected a report (%s): %s", reason, detail)

    async def accept_line(self, line: bytes, peer_uid: int | None = None) -> StepReport | None:
        """Check one line and relay it; None when it was rejected (logged and counted)."""
        self.stats["lines"] += 1
        try:
            report = parse_line(line, self.node)
        except ProtocolError as exc:
            self._reject(exc.reason, f"{exc.detail}: {line[:200]!r}")
            return None
        if peer_uid not in (None, 0) and peer_uid != report.uid:
            self._reject("uid_mismatch", f"uid {peer_uid} reported a step of uid {report.uid}")
            return None
        if report.node != self.node and report.node not in self._other_nodes:
            self._other_nodes.add(report.node)
            log.warning(
                "step reports name node %s but this agent is %s: set agent.node to "
                "the Slurm node name",
                report.node,
                self.node,
            )
        await self.relay(report)
        return report

    # -- relaying --------------------------------------------------------------------------

    async def relay(self, report: StepReport) -> None:
        now = time.time()
        entry = self.journal.steps.get(report.key)
        if report.event == "step_start":
            uuids, missing = resolve_gpus(report.gpu_indices, self.inventory())
            if missing:
                log.warning(
                    "step %d.%d: GPU indices %s are not in this node's inventory",
                    report.job_id,
                    report.step_id,
                    missing,
                )
            entry = StepEntry(
                report.job_id,
                report.step_id,
                report.node,
                list(report.gpu_indices),
                uuids,
                report.pid,
                report.uid,
                now,
            )
            self.journal.steps[entry.key] = entry
            await self.journal.save()
            self._queue_start(entry, again=False)
            if self.job_creds is not None:  # fetched in a task of its own: never waits
                self.job_creds.step_started(report.job_id, report.step_id, report.uid)
        else:
            if entry is None:  # an end without a start we saw: still worth reporting
                entry = StepEntry(
                    report.job_id,
                    report.step_id,
                    report.node,
                    pid=report.pid,
                    uid=report.uid,
                    started_at=now,
                )
                self.journal.steps[entry.key] = entry
            entry.ended, entry.exit_status, entry.ended_at = True, report.exit_status, now
            await self.journal.save()
            self._queue_end(entry)
            if self.job_creds is not None:
                await self.job_creds.step_ended(report.job_id, report.step_id)
        self.stats[report.event] += 1

    def _queue_start(self, entry: StepEntry, *, again: bool) -> None:
        uuids = entry.gpu_uuids
        if not uuids and entry.gpu_indices:  # the inventory may have arrived since
            uuids, _ = resolve_gpus(entry.gpu_indices, self.inventory())
            entry.gpu_uuids = uuids
        report = StepReport(
            "step_start",
            entry.job_id,
            entry.step_id,
            entry.node,
            tuple(entry.gpu_indices),
            None,
            entry.pid,
            entry.uid,
        )
        msg = to_message(report, uuids, time.time() if again else entry.started_at)
        self.outbox.put(
            subjects.node_event(entry.node, "step_start"),
            m.encode(msg),
            _msg_id(entry.node, "step_start", entry.job_id, entry.step_id),
        )
        if again:
            self.stats["reannounced"] += 1

    def _queue_end(self, entry: StepEntry) -> None:
        report = StepReport(
            "step_end", entry.job_id, entry.step_id, entry.node, exit_status=entry.exit_status
        )
        msg = to_message(report, [], entry.ended_at or time.time())
        key = entry.key

        async def forget() -> None:
            # Only now may the journal let go of the step: its end is in JetStream.
            current = self.journal.steps.get(key)
            if current is not None and current.ended:
                del self.journal.steps[key]
                await self.journal.save()

        self.outbox.put(
            subjects.node_event(entry.node, "step_end"),
            m.encode(msg),
            _msg_id(entry.node, "step_end", entry.job_id, entry.step_id),
            forget,
        )


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        log.info("removing stale socket %s", path)
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUse(f"another process answers on {path}: is an agent already running?")
