"""The controller daemon: start-up order, supervised tasks, signals, shutdown.

Start-up: open and migrate the database, start the embedded nats-server when no URL is set,
connect to NATS (retrying), make sure the events stream exists, reconcile with Slurm, start
the tasks, and only then tell systemd READY=1. SIGTERM stops cleanly; SIGHUP reloads settings.
"""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import time
from collections.abc import Awaitable
from pathlib import Path

from marduk_slurm import settings as settings_mod
from marduk_slurm.adapters.bus import Bus
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
from marduk_slurm.controller.ingest import EventIngest, HeartbeatWriter
from marduk_slurm.controller.job_creds import JobCredentialService
from marduk_slurm.controller.leaves import LeaveSender
from marduk_slurm.controller.operations import Operations
from marduk_slurm.controller.outbox import OutboxWorker
from marduk_slurm.controller.reconcile import Reconciler
from marduk_slurm.controller.rpc import RpcServer
from marduk_slurm.errors import BusTimeout
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
        self.heartbeats = HeartbeatWriter(ctx, flush_ms=c.heartbeat_flush_ms)
        self.ctx, self.ops = ctx, ops
        sup = self.supervisor
        sup.start("ingest", EventIngest(ctx).run)
        sup.start("heartbeats", self.heartbeats.run)
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
        sup.start("housekeeping", lambda: self._housekeeping(ctx))
        install_signal_handlers(self.stop_event.set, self._reload)
        self.notifier.ready(f"ready: NATS {ctx.bus.url}, Slurm backend {self.slurm.name}")
        log.info("controller ready (NATS %s, Slurm backend %s)", ctx.bus.url, self.slurm.name)
        stop = asyncio.create_task(self.stop_event.wait())
        fatal = asyncio.create_task(sup.fatal.wait())
        await asyncio.wait([stop, fatal], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        fatal.cancel()
        return 1 if sup.fatal.is_set() else 0

    def _job_credentials(self, ctx: Context) -> JobCredentialService:
        """Agents' requests for job credentials: answered with a credential only when the
        roster is ours to change (the embedded server with auth), else with a clear error."""
        if self.nats_server is not None and self.settings.nats.auth:
            return JobCredentialService(ctx, AuthDir(self.state_dir / "auth"),
                                        self.nats_server)
        return JobCredentialService(ctx, None, None)

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
        self.ops.fault_policy = new.fault_policy()
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
