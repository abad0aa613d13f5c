"""The replica's side of the wire protocol, usable without torch or torchft.

`ReplicaLink` speaks for one replica over a `Bus` on an asyncio loop (the benchmark runs a
thousand of them over a few connections). `MardukClient` gives a training process one link
on a background thread with its own event loop, so that nothing the training thread calls ever
waits for NATS:

* heartbeats go into a bounded buffer that drops the oldest when NATS is slow or down;
* durable messages (register, ack, leave) wait in a queue and are retried until JetStream
  confirms them; after a reconnect the replica registers again and fetches the latest config;
* commands arrive on the loop thread and wait in a queue that the training thread drains at a
  step boundary (`poll_commands`);
* a standby (hot spare) listens only for its `assume` command (`start(..., standby=True)`,
  `wait_assignment`), then becomes the group's replica (`assume`);
* a replica told to leave that is still running after its grace (stuck in a collective or
  a quorum call, or at exit behind one, docs/runtime.md) has its stacks written to stderr,
  reports the leave if it had not, and exits, so that its slot is never held past the grace;
* a credential file that is not there yet (the node agent writes it when it relays the step's
  start, docs/security.md) is waited for on the loop thread, up to `creds_wait`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import faulthandler
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import timedelta
from typing import Any

import msgspec

from marduk_slurm.adapters.bus import Bus
from marduk_slurm.backoff import Backoff
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.exit_codes import EXIT_LEAVE
from marduk_slurm.errors import BusError, BusTimeout, ProtocolError

log = logging.getLogger(__name__)

Command = m.JobCommand | m.ReplicaCommand


class ReplicaLink:
    """One replica (job, group, replica id) talking to the controller over a shared bus."""

    def __init__(self, bus: Bus, job_id: int, replica_group: int, replica_id: str,
                 on_command: Callable[[Command], None], *, standby: bool = False) -> None:
        self.bus = bus
        self.job_id = job_id
        self.replica_group = replica_group
        self.replica_id = replica_id
        self.on_command = on_command
        self.standby = standby  # a hot spare: hears only its own assume or leave command
        self.rejected = 0
        # The newest controller term seen on a command (messages.ReplicaCommand.fence), and
        # the commands refused for carrying an older one (a leader that lost its lease).
        self.fence = 0
        self.stale_commands = 0
        self._subscriptions: list[Any] = []

    async def subscribe(self) -> None:
        if self.standby:
            subjects_ = [subjects.standby_commands(self.job_id)]
        else:
            subjects_ = [subjects.job_commands(self.job_id),
                         subjects.replica_commands(self.job_id, self.replica_group)]
        for subject in subjects_:
            self._subscriptions.append(await self.bus.subscribe(subject, self._on_message))

    async def become(self, replica_group: int, replica_id: str) -> None:
        """A standby that took its assume command is now a replica of `replica_group`."""
        for sub in self._subscriptions:
            with contextlib.suppress(Exception):  # a closed connection has nothing to undo
                await sub.unsubscribe()
        self._subscriptions.clear()
        self.standby = False
        self.replica_group = replica_group
        self.replica_id = replica_id
        await self.subscribe()

    async def _on_message(self, msg: Any) -> None:
        try:
            cmd = m.decode_command(msg.data)
        except ProtocolError as exc:
            self.rejected += 1
            log.warning("ignored command on %s: %s", msg.subject, exc)
            return
        if cmd.job_id != self.job_id:
            self.rejected += 1
            return
        if isinstance(cmd, m.ReplicaCommand):
            if cmd.action == "assume" and not self.standby:
                return  # a standby may be told to assume a group, or to leave
            # An assume names the standby without "/<rank>": every rank of it takes it.
            own = self.replica_id.split("/", 1)[0] if self.standby else self.replica_id
            # The group's subject also carries leaves meant for an earlier incarnation of the
            # group (same prefix, other uuid): only our own full replica id counts.
            if cmd.replica_id != own:
                return
            if not self._current_term(cmd):
                return
        self.on_command(cmd)

    def _current_term(self, cmd: m.ReplicaCommand) -> bool:
        """Whether `cmd` comes from the newest controller term seen (or carries none)."""
        if cmd.fence is None:
            return True  # a controller without a lease (older, or a lone one)
        if cmd.fence < self.fence:
            self.stale_commands += 1
            log.warning("refused a %s command from controller term %d: term %d leads now",
                        cmd.action, cmd.fence, self.fence)
            return False
        self.fence = cmd.fence
        return True

    async def fetch_latest(self, timeout_s: float) -> m.JobCommand | None:
        """The revision a replica that joins or reconnects must apply (None: no revision)."""
        request = m.Request(args={}, actor=self.replica_id)
        raw = await self.bus.request(subjects.job_rpc(self.job_id, "config_latest"),
                                     m.encode(request), timeout_s)
        reply = m.decode_reply(raw)
        if not reply.ok:
            raise BusError(f"config_latest refused: {reply.error}")
        if not reply.data:
            return None
        return m.JobCommand(job_id=self.job_id, revision=int(reply.data["revision"]),
                            apply_at_step=int(reply.data["apply_at_step"]),
                            changes=dict(reply.data["changes"]), ts=time.time())

    def ack_message(self, revision: int, step: int, ok: bool = True, error: str = ""
                    ) -> tuple[str, bytes, str]:
        msg = m.ConfigAck(replica_id=self.replica_id, job_id=self.job_id, revision=revision,
                          applied_at_step=step, ok=ok, error=error[:1000], ts=time.time())
        # No dedup id: storing an ack twice is harmless (the row is replaced), and JetStream's
        # duplicate tracking costs both sides time on the path `config set` waits for.
        return subjects.job_event(self.job_id, "config_ack"), m.encode(msg), ""

    def assume_ack_message(self, cmd: m.ReplicaCommand, ok: bool = True, error: str = ""
                           ) -> tuple[str, bytes, str]:
        standby_id = cmd.replica_id
        msg = m.AssumeAck(standby_id=standby_id, job_id=self.job_id,
                          replica_group=cmd.replica_group or 0, event_id=cmd.event_id, ok=ok,
                          error=error[:1000], ts=time.time())
        return (subjects.job_event(self.job_id, "assume_ack"), m.encode(msg),
                f"{standby_id}/assume/{cmd.event_id}")

    def leave_message(self, reason: str, exit_code: int, step: int) -> tuple[str, bytes, str]:
        msg = m.ReplicaLeave(replica_id=self.replica_id, job_id=self.job_id, reason=reason,
                             exit_code=exit_code, step=step, ts=time.time())
        return (subjects.job_event(self.job_id, "replica_leave"), m.encode(msg),
                f"{self.replica_id}/leave")

    def register_message(self, msg: m.ReplicaRegister) -> tuple[str, bytes, str]:
        # A fresh id per registration: a re-register after a reconnect must not be dropped
        # as a duplicate of the first one.
        return (subjects.job_event(self.job_id, "replica_register"), m.encode(msg),
                f"{self.replica_id}/register/{uuid.uuid4().hex[:12]}")

    async def publish_heartbeat(self, hb: m.Heartbeat) -> None:
        await self.bus.publish(subjects.heartbeat(self.job_id), m.encode(hb))


class MardukClient:
    """A training process's connection to the controller, on its own thread and event loop."""

    def __init__(self, nats_url: str, job_id: int, replica_group: int, *, name: str = "",
                 creds: str = "", heartbeat_buffer: int = 1024, durable_buffer: int = 4096,
                 send_interval: timedelta = timedelta(milliseconds=25),
                 connect_timeout: timedelta = timedelta(seconds=2),
                 creds_wait: timedelta = timedelta(seconds=60),
                 leave_grace: timedelta | None = None,
                 exit_process: Callable[[int], None] = os._exit) -> None:
        self.nats_url = nats_url
        self.job_id = job_id
        self.replica_group = replica_group
        self.bus = Bus(nats_url, name=name or f"marduk-replica-{job_id}-{replica_group}",
                       creds=creds, connect_timeout_s=connect_timeout.total_seconds())
        self.send_interval_s = send_interval.total_seconds()
        self.creds_wait_s = creds_wait.total_seconds()
        self._heartbeats: collections.deque[m.Heartbeat] = collections.deque(
            maxlen=heartbeat_buffer)
        self._durable: collections.deque[tuple[str, bytes, str]] = collections.deque(
            maxlen=durable_buffer)
        self._commands: collections.deque[Command] = collections.deque()
        self.stats: collections.Counter[str] = collections.Counter()
        self.link: ReplicaLink | None = None
        self._register: Callable[[], m.ReplicaRegister] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="marduk-client",
                                        daemon=True)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None
        self._first_config = threading.Event()
        self._assignment: m.ReplicaCommand | None = None
        self._assigned = threading.Event()
        self._subscribed = False
        self._closed = False
        # Jittered, so that the replicas of a large job that lost NATS together do not all
        # come back in the same instant; each is reset after a success.
        self._connect_backoff = Backoff(base_s=0.5, max_s=10.0)
        # A leave is carried out at a step boundary and the process exits; still running
        # this long (plus 3 of the slowest steps seen) after the command, it is stuck and
        # exits from here. Only for a process that is one training replica (ManagerMarduk
        # sets it): None, the default, never ends the process.
        self.leave_grace_s = None if leave_grace is None else leave_grace.total_seconds()
        self._exit_process = exit_process
        self._slowest_step_s = 0.0
        self._last_step = 0
        self._leaving = False  # the training thread reported its leave itself
        self._exit_code = EXIT_LEAVE
        self._overdue: threading.Timer | None = None
        self._resend_backoff = Backoff(base_s=0.2, max_s=5.0)

    # -- training-thread API (never waits on NATS) ------------------------------------------

    def start(self, replica_id: str, register: Callable[[], m.ReplicaRegister], *,
              standby: bool = False) -> None:
        """Connect in the background; `register` builds the registration, called on every
        (re)connect so that it carries the current step and hyperparameters. A standby hears
        only its assume command (`wait_assignment`) until it `assume`s a group."""
        self._register = register
        self.link = ReplicaLink(self.bus, self.job_id, self.replica_group, replica_id,
                                self._on_command, standby=standby)
        self._thread.start()
        self._call(self._main)

    def wait_assignment(self, timeout: timedelta) -> m.ReplicaCommand | None:
        """A standby waits (bounded) for its command (assume a group, or leave); None when
        none came in time."""
        if not self._assigned.wait(timeout.total_seconds()):
            return None
        return self._assignment

    def send_assume_ack(self, cmd: m.ReplicaCommand, ok: bool = True, error: str = "") -> None:
        assert self.link is not None, "start() first"
        self._queue_durable(self.link.assume_ack_message(cmd, ok, error))

    def assume(self, replica_group: int, replica_id: str,
               register: Callable[[], m.ReplicaRegister]) -> None:
        """The standby is now `replica_id` of `replica_group`: listen to the group's commands
        and the job's revisions, register as that replica, fetch the latest revision."""
        assert self.link is not None, "start() first"
        self.replica_group = replica_group
        self._register = register

        async def become() -> None:
            assert self.link is not None
            await self.link.become(replica_group, replica_id)
            if self.bus.connected:
                await self._on_connected()
        self._call(become)

    def send_heartbeat(self, hb: m.Heartbeat) -> None:
        self._last_step = hb.step
        self._slowest_step_s = max(self._slowest_step_s, hb.step_time_ms / 1000.0)
        if len(self._heartbeats) == self._heartbeats.maxlen:
            self.stats["heartbeats_dropped"] += 1
        self._heartbeats.append(hb)

    def send_ack(self, revision: int, step: int, ok: bool = True, error: str = "") -> None:
        assert self.link is not None, "start() first"
        self._queue_durable(self.link.ack_message(revision, step, ok, error))

    def send_leave(self, reason: str, exit_code: int, step: int) -> None:
        assert self.link is not None, "start() first"
        self._leaving, self._exit_code = True, exit_code
        self._queue_durable(self.link.leave_message(reason, exit_code, step))

    def exit_within(self, deadline: timedelta, code: int) -> None:
        """The process is leaving with `code` and should end within `deadline`; past it,
        it is stuck on its way out and ends from here (as after the leave's grace)."""
        self._leaving, self._exit_code = True, code
        self._arm_overdue(deadline.total_seconds())

    def poll_commands(self) -> list[Command]:
        """Commands received since the last call, oldest first."""
        out = []
        while self._commands:
            out.append(self._commands.popleft())
        return out

    def wait_first_config(self, timeout: timedelta) -> bool:
        """Wait (bounded) until the latest revision was fetched once; False if NATS or the
        controller did not answer in time (training goes on; it is fetched on reconnect)."""
        return self._first_config.wait(timeout.total_seconds())

    def flush(self, timeout: timedelta) -> bool:
        """Wait until the durable messages queued so far are confirmed; False on timeout."""
        if not self._thread.is_alive():
            return not self._durable
        future = asyncio.run_coroutine_threadsafe(self._drained(), self._loop)
        try:
            future.result(timeout.total_seconds())
            return True
        except FutureTimeout:
            future.cancel()
            return False

    def close(self, timeout: timedelta = timedelta(seconds=2)) -> None:
        if self._closed or not self._thread.is_alive():
            return
        self._closed = True
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            future.result(timeout.total_seconds())
        except (FutureTimeout, BusError):
            future.cancel()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout.total_seconds())

    @property
    def connected(self) -> bool:
        return self.bus.connected

    # -- loop thread -----------------------------------------------------------------------

    def _on_command(self, cmd: Command) -> None:
        standing_by = self.link is not None and self.link.standby
        if isinstance(cmd, m.ReplicaCommand) and (cmd.action == "assume" or standing_by):
            if self._assignment is None:  # re-sent until acknowledged: the first one counts
                self._assignment = cmd
                self._assigned.set()
            return
        self._commands.append(cmd)
        if (isinstance(cmd, m.ReplicaCommand) and cmd.action == "leave"
                and self.leave_grace_s is not None and self._overdue is None):
            self._arm_overdue(self.leave_grace_s + 3 * self._slowest_step_s)

    def _arm_overdue(self, seconds: float) -> None:
        """End the process in `seconds` (`_leave_overdue`), replacing an earlier deadline.
        A thread, not the loop: the loop ends with close(), and a process can hang after
        that too (at exit, joining torchft's executor thread in a quorum call)."""
        if self._overdue is not None:
            self._overdue.cancel()
        self._overdue = threading.Timer(seconds, self._leave_overdue)
        self._overdue.daemon = True
        self._overdue.start()

    def _leave_overdue(self) -> None:
        """Told to leave `grace` ago and still alive: stuck in a step or on the way out."""
        self.stats["leave_overdue"] += 1
        where = "on its way out" if self._leaving else "in a step"
        log.error("told to leave, and still running after the grace: stuck %s. Every "
                  "thread's stack follows, then the process exits %d", where, self._exit_code)
        with contextlib.suppress(Exception):  # stderr may be closed; the exit still happens
            faulthandler.dump_traceback(all_threads=True)
        if not self._leaving and not self._closed and self.link is not None:
            self._queue_durable(self.link.leave_message(
                "told to leave; stuck in a step, left without reaching its boundary",
                EXIT_LEAVE, self._last_step))
            self.flush(timedelta(seconds=2))
        self._exit_process(self._exit_code)

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _call(self, coro_fn: Callable[[], Any]) -> None:
        def spawn() -> None:
            task = self._loop.create_task(coro_fn())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._loop.call_soon_threadsafe(spawn)

    def _queue_durable(self, item: tuple[str, bytes, str]) -> None:
        self._durable.append(item)
        self._loop.call_soon_threadsafe(self._kick)

    def _kick(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self.bus.on_state = self._on_state
        if not await self._wait_for_creds():
            self._first_config.set()  # nobody should wait for a config that cannot come
            return
        while not self._closed:
            try:
                await self.bus.connect(retry=True)
                self._connect_backoff.reset()
                break
            except BusError as exc:
                self.stats["connect_failures"] += 1
                log.debug("NATS not reachable yet: %s", exc)
                await asyncio.sleep(self._connect_backoff.next())
        assert self.link is not None
        await self.link.subscribe()
        self._subscribed = True
        self._call(self._send_heartbeats)
        self._call(self._send_durable)
        await self._on_connected()

    async def _wait_for_creds(self) -> bool:
        """Wait (bounded) for the credential file to appear; False when it did not. Until
        then heartbeats are buffered and dropped as when NATS is away."""
        path = self.bus.creds
        deadline = time.monotonic() + self.creds_wait_s
        while path and not os.path.exists(path):
            if self._closed:
                return False
            if time.monotonic() >= deadline:
                self.stats["creds_missing"] += 1
                log.warning("no NATS credential at %s after %.0f s: training goes on without "
                            "telemetry or commands", path, self.creds_wait_s)
                return False
            self.stats["creds_waits"] += 1
            await asyncio.sleep(0.2)
        return True

    def _on_state(self, state: str) -> None:
        # The first connect is handled by _main once the subscriptions exist.
        if state == "connected" and self._subscribed:
            self.stats["reconnects"] += 1
            self._call(self._on_connected)

    async def _on_connected(self) -> None:
        """(Re)register and fetch the latest revision: after an outage the controller may have
        restarted or published revisions this replica never saw."""
        assert self.link is not None and self._register is not None
        self._durable.appendleft(self.link.register_message(self._register()))
        self._kick()
        try:
            latest = await self.link.fetch_latest(2.0)
        except (BusError, BusTimeout, ProtocolError, msgspec.ValidationError) as exc:
            log.warning("could not fetch the latest config revision: %s", exc)
            latest = None
        if latest is not None:
            self._commands.append(latest)
        self._first_config.set()

    async def _send_heartbeats(self) -> None:
        assert self.link is not None
        while True:
            await asyncio.sleep(self.send_interval_s)
            while self._heartbeats and self.bus.connected:
                hb = self._heartbeats.popleft()
                try:
                    await self.link.publish_heartbeat(hb)
                    self.stats["heartbeats_sent"] += 1
                except BusError:
                    self.stats["heartbeats_dropped"] += 1
                    break

    async def _send_durable(self) -> None:
        assert self._wake is not None
        while True:
            if not self._durable or not self.bus.connected:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                continue
            item = self._durable[0]
            subject, data, msg_id = item
            try:
                await self.bus.publish_durable(subject, data, msg_id=msg_id, timeout_s=2.0)
            except (BusError, BusTimeout) as exc:
                self.stats["durable_retries"] += 1
                log.debug("durable publish to %s failed, will retry: %s", subject, exc)
                await asyncio.sleep(self._resend_backoff.next())
                continue
            self._resend_backoff.reset()
            self.stats["durable_sent"] += 1
            if self._durable and self._durable[0] is item:
                self._durable.popleft()

    async def _drained(self) -> None:
        while self._durable:
            await asyncio.sleep(0.01)

    async def _shutdown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.bus.nc is not None:
            await self.bus.close()
