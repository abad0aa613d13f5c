"""The controller daemon: start-up order, supervised tasks, signals, shutdown.

Start-up: open and migrate the database, start the embedded nats-server when no URL is set,
connect to NATS (retrying), make sure the events stream exists, start ingesting (every
controller, leader or standby, into its own database) and tell systemd READY=1; then wait for
the lease (controller/leadership.py). Once it leads: catch up with the stream, reconcile with
Slurm and start the tasks that act. A leader that loses its lease stops them and waits as a
standby again. SIGTERM stops what acts, releases the lease, then stops the rest;
SIGHUP reloads settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import logging
import re
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

from marduk_slurm import settings as settings_mod
from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.lease import LeaseStore
from marduk_slurm.adapters.nats_auth import CONTROLLER_CREDS, AuthDir
from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.adapters.slurm.base import SlurmBackend
from marduk_slurm.adapters.slurm.factory import make_backend
from marduk_slurm.adapters.slurm.none import NoSlurm
from marduk_slurm.adapters.store import Store
from marduk_slurm.adapters.systemd import Notifier, install_signal_handlers
from marduk_slurm.backoff import Backoff
from marduk_slurm.controller import config_service, observe
from marduk_slurm.controller.context import Context, StoreRunner
from marduk_slurm.controller.decisions import Policy
from marduk_slurm.controller.ingest import DURABLE_NAME, EventIngest, HeartbeatWriter
from marduk_slurm.controller.job_creds import JobCredentialService
from marduk_slurm.controller.leadership import Leadership
from marduk_slurm.controller.leaves import LeaveSender
from marduk_slurm.controller.operations import Operations
from marduk_slurm.controller.outbox import OutboxWorker
from marduk_slurm.controller.reconcile import Reconciler
from marduk_slurm.controller.replication import Replication
from marduk_slurm.controller.rpc import RpcServer
from marduk_slurm.domain import subjects
from marduk_slurm.errors import BusError, BusTimeout
from marduk_slurm.settings import Settings
from marduk_slurm.supervisor import Supervisor

log = logging.getLogger(__name__)

NATS_URL_FILE = "nats.url"
# The embedded server's port, kept across restarts so that the URL agents know stays valid.
NATS_PORT_FILE = "nats.port"
# A stop's steps are bounded (SHUTDOWN_STEP_S each) and so is the whole (SHUTDOWN_LIMIT_S,
# under systemd's default TimeoutStopSec of 90 s): see Controller._shutdown.
SHUTDOWN_STEP_S = 5.0
SHUTDOWN_LIMIT_S = 15.0
# Another process fetching from our consumer: 2, as a settings error (give it its own id).
EXIT_CONSUMER_IN_USE = 2
# How long pulls on our consumer may last before they count as another live controller's
# (a dead process's expire within a fetch's 1 s).
CONSUMER_CHECK_S = 1.5
# Tasks that carry nothing out: a standby runs them; at a stop they stop after the lease is
# released (the lease task renews it until then).
STANDBY_TASKS = ("ingest", "heartbeats", "housekeeping")
LAST_TO_STOP = (*STANDBY_TASKS, "lease")
# How long a new leader waits to ingest the stream's backlog before it acts regardless.
CATCH_UP_LIMIT_S = 30.0
T = TypeVar("T")


def build_slurm(s: Settings) -> SlurmBackend:
    if s.slurm.backend == "none":
        return NoSlurm()
    return make_backend(s.slurm.backend, timeout_s=s.slurm.command_timeout_s,
                        slurm_conf=s.slurm.conf or None)



class Controller:
    def __init__(self, settings: Settings, *, slurm: SlurmBackend | None = None,
                 notifier: Notifier | None = None, reload: object = None) -> None:
        self.settings = settings
        self.slurm = slurm or build_slurm(settings)
        self.notifier = notifier or Notifier()
        self.reload_settings = reload  # callable returning fresh Settings, for SIGHUP
        self.state_dir = Path(settings.controller.state_dir)
        self.nats_server: NatsServerProcess | None = None
        self.stop_event = asyncio.Event()
        self.ops: Operations | None = None  # while this controller leads
        self.supervisor = Supervisor(max_restarts=settings.controller.task_max_restarts,
                                     window_s=settings.controller.task_restart_window_s)

    async def _start_nats(self) -> str:
        if self.settings.nats.url:
            return self.settings.nats.url
        self.notifier.status("starting embedded nats-server")
        config = None
        if self.settings.nats.auth:
            auth = AuthDir(self.state_dir / "auth")
            if await asyncio.to_thread(auth.ensure_initialised):
                log.info("NATS auth: created controller and operator credentials in %s",
                         auth.path)
            config = auth.server_config
        self.nats_server = NatsServerProcess(self.state_dir / "nats", config_file=config,
                                             port_file=self.state_dir / NATS_PORT_FILE)
        await asyncio.to_thread(self.nats_server.prepare)
        # Spawned from the loop's own thread: the kernel's parent-death signal follows the
        # thread that forked, and a worker thread of to_thread may exit long before we do.
        self.nats_server.launch()
        url = await asyncio.to_thread(self.nats_server.wait_ready)
        (self.state_dir / NATS_URL_FILE).write_text(url + "\n")
        log.info("embedded nats-server at %s (JetStream in %s)", url, self.state_dir / "nats")
        return url

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a task that keeps crashing (exit 1)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.notifier.status("opening database")
        store = Store(self.settings.database_path)
        version = await asyncio.to_thread(store.migrate)
        log.info("database %s at schema version %d", self.settings.database_path, version)
        db = StoreRunner(store)
        bus = Bus("", name="marduk-controller", creds=self.settings.nats.creds,
                  connect_timeout_s=self.settings.nats.connect_timeout_s)
        ctx = Context(db, bus, Policy(self.settings.slurm.reason_prefix,
                                      self.settings.controller.leave_on_drain))
        bus.on_state = lambda state: setattr(ctx, "nats_state", state)
        try:
            bus.url = await self._start_nats()
            if self.nats_server is not None and self.settings.nats.auth and not bus.creds:
                bus.creds = str(self.state_dir / "auth" / CONTROLLER_CREDS)
            self.notifier.status(f"connecting to NATS at {bus.url}")
            await bus.connect(retry=True)
            await self._ensure_stream(bus)
            return await self._serve(ctx)
        finally:
            await self._shutdown(ctx)

    async def _ensure_stream(self, bus: Bus) -> None:
        """Create the events stream, waiting while JetStream cannot answer yet (a NATS cluster
        that is starting, or electing a meta leader); a refusal (say more replicas than the
        cluster has servers) is an error."""
        n = self.settings.nats
        backoff = Backoff(base_s=0.5, max_s=5.0)
        last_log = 0.0
        while True:
            try:
                await bus.ensure_events_stream(replicas=n.stream_replicas,
                                               max_age_s=n.stream_max_age_s)
                return
            except BusTimeout as exc:
                self.notifier.status(f"waiting for JetStream: {exc}")
                if time.monotonic() - last_log > 10:  # one line per 10 s while it waits
                    last_log = time.monotonic()
                    log.warning("%s; retrying", exc)
                await asyncio.sleep(backoff.next())

    async def _serve(self, ctx: Context) -> int:
        """Ingest at once, as every controller does; act only once this one leads."""
        c = self.settings.controller
        self.ctx = ctx
        leadership = await self._open_leadership(ctx)
        sup = self.supervisor
        ctx.acting = False
        if not await self._consumer_free(ctx):
            return EXIT_CONSUMER_IN_USE
        self.ingest = EventIngest(ctx, durable=self.durable)
        sup.start("ingest", self.ingest.run)
        self.heartbeats = HeartbeatWriter(ctx, flush_ms=c.heartbeat_flush_ms)
        sup.start("heartbeats", self.heartbeats.run)
        sup.start("housekeeping", lambda: self._housekeeping(ctx))
        install_signal_handlers(self.stop_event.set, self._reload)
        self.notifier.ready(f"standby {self.controller_id}: waiting for the lease")
        log.info("controller %s (%s) ingesting with consumer %s", self.controller_id,
                 "standby" if c.standby else "primary", self.durable)
        while True:  # a leader that loses its lease waits as a standby again
            log.info("controller %s waiting for the lease", self.controller_id)
            waited = await self._until_stopped(leadership.acquire())
            if waited is None:
                return 1 if sup.fatal.is_set() else 0
            took = time.monotonic()
            # Renewed from now on: catching up may take longer than the lease.
            sup.start("lease", leadership.hold)
            if await self._until_stopped(self._catch_up(ctx)) is None:
                return 1 if sup.fatal.is_set() else 0
            if not leadership.lost.is_set():
                ctx.acting = True
                log.info("controller %s leads (lease revision %d) after waiting %.3f s; "
                         "caught up with the stream in %.3f s", self.controller_id,
                         leadership.token, waited, time.monotonic() - took)
                if not await self._lead(ctx, leadership):
                    return 1 if sup.fatal.is_set() else 0
            await self._step_down(ctx, leadership)

    async def _lead(self, ctx: Context, leadership: Leadership) -> bool:
        """Start what acts, and run until the lease is lost (True) or a stop (False)."""
        c = self.settings.controller
        reconciler = Reconciler(ctx, self.slurm, interval_s=c.reconcile_interval_s,
                                step_grace_s=c.step_grace_s)
        self.notifier.status("reconciling with Slurm")
        if not await reconciler.reconcile_once():
            log.warning("starting without a first Slurm reconcile: %s", reconciler.last_error)
        ops = Operations(ctx, self.slurm, self.settings.fault_policy(), reconciler.refresh_nodes,
                         resume_check=self.settings.slurm.resume_check,
                         resume_check_timeout_s=self.settings.slurm.resume_check_timeout_s,
                         resume_check_by_partition=self.settings.slurm.resume_check_by_partition,
                         slurm_health=reconciler.health)
        self.ops = ops
        sup = self.supervisor
        sup.start("outbox", OutboxWorker(ctx, self.slurm, retry_max_s=c.outbox_retry_max_s).run)
        sup.start("reconcile", reconciler.run)
        sup.start("leaves", LeaveSender(ctx).run)
        rpc = RpcServer(ctx, ops)
        config = config_service.install(ctx, rpc)
        obs = observe.install(ctx, rpc, ops, sup, self.heartbeats,
                              lambda: self.settings.controller)
        obs.stragglers.revise = config.revise
        sup.start("rpc", rpc.run)
        sup.start("job_credentials", self._job_credentials(ctx).run)
        self.notifier.status(f"leader {self.controller_id}: NATS {ctx.bus.url}, Slurm backend "
                             f"{self.slurm.name}")
        log.info("controller ready (NATS %s, Slurm backend %s)", ctx.bus.url, self.slurm.name)
        return await self._until_stopped(leadership.lost.wait()) is not None

    async def _step_down(self, ctx: Context, leadership: Leadership) -> None:
        """The lease is lost: stop acting at once (nothing is carried out from here on:
        `Context.may_act` already says no), stop the tasks that act, and wait as a standby
        of whoever leads now. Ingest goes on."""
        ctx.acting = False
        log.error("controller %s stops acting: leadership lost (%s); it waits as a standby",
                  self.controller_id, leadership.lost_reason)
        self.notifier.status(f"standby {self.controller_id}: leadership lost "
                             f"({leadership.lost_reason[:200]})")
        await self.supervisor.stop(timeout_s=SHUTDOWN_STEP_S, keep=STANDBY_TASKS)
        self.heartbeats.on_flush.clear()  # the analysis that acted on them is gone
        self.ops = None
        leadership.step_down()

    async def _until_stopped(self, work: Awaitable[T]) -> T | None:
        """`work`'s result, or None when a stop (SIGTERM, a task that keeps crashing) came
        first; `work` is then cancelled."""
        task = asyncio.ensure_future(work)
        stop = asyncio.create_task(self.stop_event.wait())
        fatal = asyncio.create_task(self.supervisor.fatal.wait())
        await asyncio.wait([task, stop, fatal], return_when=asyncio.FIRST_COMPLETED)
        for other in (stop, fatal):
            other.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _open_leadership(self, ctx: Context) -> Leadership:
        c, n = self.settings.controller, self.settings.nats
        lease = LeaseStore(ctx.bus, ttl_s=c.lease_s, replicas=n.stream_replicas)
        backoff = Backoff(base_s=0.5, max_s=5.0)
        while True:
            try:
                lease_s = await lease.open()
                break
            except BusTimeout as exc:
                self.notifier.status(f"waiting for JetStream: {exc}")
                await asyncio.sleep(backoff.next())
        leadership = Leadership(lease, self.controller_id, lease_s=lease_s)
        leadership.presence = lambda: self._presence(ctx)
        ctx.leadership = self.leadership = leadership
        ctx.replication = Replication(self.controller_id)
        ctx.replication.current_fence = lambda: leadership.term
        return leadership

    async def _consumer_free(self, ctx: Context) -> bool:
        """Whether no other process fetches from this controller's consumer. Two controllers
        on one consumer would each get part of the events; the second one refuses to start.
        A pull of a process that just died expires within a second: only one that lasts
        longer counts."""
        deadline = time.monotonic() + CONSUMER_CHECK_S
        while True:
            try:
                state = await ctx.bus.consumer_state(self.durable)
            except (BusError, BusTimeout) as exc:
                log.warning("cannot ask whether consumer %s is in use: %s", self.durable, exc)
                return True
            if state is None or state.num_waiting == 0:
                return True
            if time.monotonic() > deadline:
                log.error("consumer %s of %s is in use by another running controller: each "
                          "controller needs its own (--id NAME, or --standby); not starting",
                          self.durable, subjects.EVENTS_STREAM)
                return False
            await asyncio.sleep(0.1)

    async def _presence(self, ctx: Context) -> dict[str, Any]:
        """What a standby announces besides who it is: its consumer and how far behind."""
        state = await ctx.bus.consumer_state(self.durable)
        return {"consumer": self.durable,
                "behind": state.num_pending if state is not None else -1}

    async def _catch_up(self, ctx: Context) -> bool:
        """Before acting: ingest what the stream held when we took the lease, so that every
        action the old leader reported is settled here first (controller/replication.py)."""
        deadline = time.monotonic() + CATCH_UP_LIMIT_S
        target = None
        while time.monotonic() < deadline:
            try:
                if target is None:
                    target = (await ctx.bus.stream_info())["last_seq"]
                state = await ctx.bus.consumer_state(self.durable)
                if state is not None and self.ingest.caught_up(state, target):
                    return True
            except (BusError, BusTimeout) as exc:  # JetStream busy, or electing a leader
                log.warning("catching up: %s", exc)
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.02)
        log.warning("acting before the stream is ingested up to sequence %d (still behind "
                    "after %.0f s): an action the old leader reported may be read from Slurm "
                    "again before it is carried out", target or 0, CATCH_UP_LIMIT_S)
        return False

    def _job_credentials(self, ctx: Context) -> JobCredentialService:
        """Agents' requests for job credentials: answered with a credential only when the
        roster is ours to change (the embedded server with auth), else with a clear error."""
        if self.nats_server is not None and self.settings.nats.auth:
            return JobCredentialService(ctx, AuthDir(self.state_dir / "auth"),
                                        self.nats_server)
        return JobCredentialService(ctx, None, None)

    @property
    def controller_id(self) -> str:
        c = self.settings.controller
        if c.id:
            return c.id
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname()).strip("-")[:56] or "host"
        return f"{host}-standby" if c.standby else host

    @property
    def durable(self) -> str:
        """The events consumer: the historical name for a primary without an id (an upgrade
        keeps its consumer), one of its own for every other controller."""
        c = self.settings.controller
        return f"{DURABLE_NAME}-{self.controller_id}" if c.standby or c.id else DURABLE_NAME

    async def _housekeeping(self, ctx: Context) -> None:
        """Watchdog pings from the main loop (a stuck loop stops them) and pruning."""
        last_prune = 0.0
        while True:
            if self.settings.controller.watchdog:
                self.notifier.watchdog()
            if time.time() - last_prune > 3600:
                # Sequences older than the stream's retention can never be redelivered.
                cutoff = time.time() - self.settings.nats.stream_max_age_s
                await ctx.db(ctx.db.store.prune_ingested, cutoff)
                last_prune = time.time()
            await asyncio.sleep(self.notifier.watchdog_period_s)

    def _reload(self) -> None:
        if not callable(self.reload_settings):
            return
        self.notifier.reloading()
        try:
            new = self.reload_settings()
        except settings_mod.SettingsError as exc:
            log.error("reload refused, keeping current settings: %s", exc)
            self.notifier.ready("reload refused")
            return
        changed = [k for k, v in new.effective().items()
                   if v["value"] != self.settings.effective()[k]["value"]]
        logging.getLogger().setLevel(new.controller.log_level.upper())
        self.ctx.policy = Policy(new.slurm.reason_prefix, new.controller.leave_on_drain)
        ops = getattr(self, "ops", None)  # a standby has no operations
        if ops is not None:
            ops.fault_policy = new.fault_policy()
        self.settings = new
        log.info("settings reloaded; changed: %s (NATS, database and Slurm settings take "
                 "effect at the next restart)", ", ".join(changed) or "nothing")
        self.notifier.ready("settings reloaded")

    async def _shutdown(self, ctx: Context) -> None:
        """Stop in order, each step bounded. A step that overruns is named in the log with
        what it waits on, and the shutdown goes on; past SHUTDOWN_LIMIT_S in all, every
        thread's stack goes to stderr and the process exits 1 (a stop never hangs)."""
        self.notifier.stopping("stopping")
        log.info("controller stopping")
        faulthandler.dump_traceback_later(SHUTDOWN_LIMIT_S, exit=True)
        try:
            # First everything that acts (the outbox, commands, requests, analysis), then
            # the lease goes, at once, to a standby; ingest stops last.
            ctx.acting = False
            await self.supervisor.stop(timeout_s=SHUTDOWN_STEP_S, keep=LAST_TO_STOP)
            leadership = getattr(self, "leadership", None)
            if leadership is not None:
                await bounded("releasing the lease", leadership.release())
            await self.supervisor.stop(timeout_s=SHUTDOWN_STEP_S)
            heartbeats = getattr(self, "heartbeats", None)
            if heartbeats is not None:
                await bounded("writing the last heartbeats", heartbeats.flush())
            await bounded("closing the NATS connection", ctx.bus.close())
            await bounded("closing the database", asyncio.to_thread(ctx.db.close))
            if self.nats_server is not None:
                await asyncio.to_thread(self.nats_server.stop)
                (self.state_dir / NATS_URL_FILE).unlink(missing_ok=True)
        finally:
            faulthandler.cancel_dump_traceback_later()
        log.info("controller stopped")


async def bounded(what: str, step: Awaitable[object], timeout_s: float = SHUTDOWN_STEP_S
                  ) -> None:
    """One shutdown step, given up (and logged) after timeout_s."""
    try:
        await asyncio.wait_for(step, timeout_s)
    except TimeoutError:
        log.error("shutdown: %s took over %.0f s; going on without it", what, timeout_s)
