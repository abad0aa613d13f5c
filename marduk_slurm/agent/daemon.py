"""The node agent daemon: start-up order, tasks, signals, shutdown.

Start-up: open the GPUs (NVML, or simulated GPUs when agent.simulate_gpus > 0), queue the
GPU inventory, load the step journal and queue its re-announcements, listen on the step
socket, then tell systemd READY=1. NATS is connected in the background: the agent must take
step reports from slurmstepd even while NATS is away, so nothing above waits for it; the
outbox delivers what was queued once NATS answers. SIGTERM/SIGINT stop cleanly (exit 0);
SIGHUP reloads the fault policy; a task that keeps crashing stops the agent (exit 1).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from marduk_slurm import settings as settings_mod
from marduk_slurm.adapters.bus import Bus
from marduk_slurm.adapters.nvml import (
    GpuSource,
    GpuSourceError,
    NvmlGpuSource,
    NvmlRunner,
    SimulatedGpuSource,
)
from marduk_slurm.adapters.systemd import Notifier, install_signal_handlers
from marduk_slurm.agent.health import GpuWatcher
from marduk_slurm.agent.job_creds import JobCredentials
from marduk_slurm.agent.journal import StepJournal
from marduk_slurm.agent.node_watch import NodeWatchConfig, NodeWatcher
from marduk_slurm.agent.outbox import Outbox
from marduk_slurm.agent.rpc import AgentRpc
from marduk_slurm.agent.step_relay import StepRelay
from marduk_slurm.backoff import Backoff
from marduk_slurm.errors import BusError, SettingsError
from marduk_slurm.settings import Settings
from marduk_slurm.supervisor import Supervisor

log = logging.getLogger(__name__)

JOURNAL_FILE = "steps.json"
# The URL file a controller with an embedded nats-server keeps in its state directory.
CONTROLLER_URL_FILE = "nats.url"
URL_CHECK_S = 1.0


def node_name(s: Settings) -> str:
    """agent.node, else the short host name (what Slurm calls most nodes)."""
    return s.agent.node or socket.gethostname().split(".")[0]



def check_settings(s: Settings) -> None:
    where = s.sources.get
    if s.agent.log_level not in settings_mod.LOG_LEVELS:
        raise SettingsError(
            f"{where('agent.log_level', 'default')}: agent.log_level must be "
            f"one of {', '.join(settings_mod.LOG_LEVELS)}"
        )
    if s.agent.poll_interval_s <= 0 or s.agent.nvml_timeout_s <= 0:
        raise SettingsError("agent.poll_interval_s and agent.nvml_timeout_s must be > 0")
    if s.agent.buffer_max < 1:
        raise SettingsError(f"{where('agent.buffer_max', 'default')}: must be >= 1")


def node_watch_config(s: Settings) -> NodeWatchConfig:
    a = s.agent
    return NodeWatchConfig(
        sysfs_root=Path(a.sysfs_root), ib_ports=list(a.ib_ports), net_ports=list(a.net_ports),
        mounts=list(a.mounts), mounts_read_only=list(a.mounts_read_only),
        interval_s=a.node_health_interval_s, probe_timeout_s=a.mount_probe_timeout_s)


class Agent:
    def __init__(
        self,
        settings: Settings,
        nats_url: str,
        *,
        notifier: Notifier | None = None,
        reload: Callable[[], Settings] | None = None,
    ) -> None:
        check_settings(settings)
        self.settings = settings
        self.node = node_name(settings)
        self.notifier = notifier or Notifier()
        self.reload_settings = reload
        self.state_dir = Path(settings.agent.state_dir)
        self.bus = Bus(
            nats_url,
            name=f"marduk-agent-{self.node}",
            creds=settings.nats.creds,
            connect_timeout_s=settings.nats.connect_timeout_s,
        )
        # Without nats.url the agent found NATS through a local controller's URL file; it
        # reads it again whenever the connection fails, so a moved server is followed.
        self.url_file = (None if settings.nats.url else
                         Path(settings.controller.state_dir) / CONTROLLER_URL_FILE)
        self.outbox = Outbox(self.bus, max_items=settings.agent.buffer_max)
        self.stop_event = asyncio.Event()
        self.supervisor = Supervisor()
        self.runner: NvmlRunner | None = None
        self.watcher: GpuWatcher | None = None
        self.gpu_error = ""  # why there is no watcher, when there is none
        self.relay: StepRelay | None = None
        creds_dir = settings.agent.job_credentials_dir
        self.job_creds = (JobCredentials(self.bus, self.node, Path(creds_dir))
                          if creds_dir else None)
        watch = node_watch_config(settings)
        self.node_watcher = (NodeWatcher(watch, settings.node_health_policy(), node=self.node,
                                         outbox=self.outbox) if watch.enabled else None)

    def _source_factory(self) -> Callable[[], GpuSource]:
        count = self.settings.agent.simulate_gpus
        if count > 0:
            log.warning(
                "SIMULATED GPUs: %d GPUs that exist only in memory on %s "
                "(agent.simulate_gpus); no NVML is used",
                count,
                self.node,
            )
            return lambda: SimulatedGpuSource(self.node, count)
        return lambda: NvmlGpuSource(self.node)

    async def _open_gpus(self) -> None:
        timeout = timedelta(seconds=self.settings.agent.nvml_timeout_s)
        try:
            self.runner = await NvmlRunner.open(self._source_factory(), call_timeout=timeout)
        except GpuSourceError as exc:
            # Steps must still be relayed; the controller sees a node with no inventory.
            # A hung NVML init is abandoned in its thread (see NvmlRunner.open), not awaited.
            self.gpu_error = str(exc)
            log.error("no GPU watching on %s: %s", self.node, exc)
            self.notifier.status(f"no GPU watching: {exc}")
            return
        a = self.settings.agent
        self.watcher = GpuWatcher(
            self.runner,
            node=self.node,
            outbox=self.outbox,
            bus=self.bus,
            policy=self.settings.fault_policy(),
            poll_interval_s=a.poll_interval_s,
            allow_inject=a.allow_inject,
            extra_summary=self._counters,
        )
        await self.watcher.enumerate()

    def _counters(self) -> dict[str, Any]:
        relay = self.relay
        return {
            "nats": "connected" if self.bus.connected else "disconnected",
            "outbox": {**self.outbox.stats, "waiting": len(self.outbox)},
            "step_relay": {
                **(relay.stats if relay else {}),
                "malformed_by_reason": dict(relay.malformed) if relay else {},
                "running_steps": len(relay.journal.steps) if relay else 0,
            },
            "job_credentials": dict(self.job_creds.stats) if self.job_creds else None,
            "node_health": self.node_watcher.summary() if self.node_watcher else None,
        }

    def _inventory(self) -> dict[int, str]:
        return self.watcher.index_map() if self.watcher else {}

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (exit 0) or a task that keeps crashing (exit 1)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.notifier.status("opening GPUs")
        try:
            await self._open_gpus()
            self.relay = StepRelay(
                node=self.node,
                socket_path=Path(self.settings.agent.socket),
                journal=StepJournal(self.state_dir / JOURNAL_FILE),
                outbox=self.outbox,
                inventory=self._inventory,
                job_creds=self.job_creds,
            )
            await self.relay.restore()
            await self.relay.start()
            return await self._serve()
        finally:
            await self._shutdown()

    async def _serve(self) -> int:
        sup = self.supervisor
        sup.start("nats", self._connect)
        sup.start("outbox", self.outbox.run)
        if self.watcher is not None:
            sup.start("xid_events", self.watcher.watch_xids)
            sup.start("health_poll", self.watcher.poll)
        if self.node_watcher is not None:
            sup.start("node_health", self.node_watcher.run)
        sup.start("housekeeping", self._housekeeping)
        install_signal_handlers(self.stop_event.set, self._reload)
        self.notifier.ready(f"ready: node {self.node}, socket {self.settings.agent.socket}")
        log.info(
            "agent ready on %s (socket %s, NATS %s)",
            self.node,
            self.settings.agent.socket,
            self.bus.url,
        )
        stop = asyncio.create_task(self.stop_event.wait())
        fatal = asyncio.create_task(sup.fatal.wait())
        await asyncio.wait([stop, fatal], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        fatal.cancel()
        return 1 if sup.fatal.is_set() else 0

    async def _connect(self) -> None:
        """Connect to NATS (retrying until it answers), answer agent requests, and follow a
        local controller that came back on another URL."""
        if self.bus.nc is not None:
            # A supervised restart: drop the old connection and its subscription, or the
            # agent would answer every inject twice.
            await self.bus.close()
        while True:
            await self._connect_once()
            # Answered without a GPU watcher too: a check then fails at once, saying why,
            # rather than leaving the operator to wait out its timeout.
            a = self.settings.agent
            rpc = AgentRpc(self.node, self.watcher, health_check=a.health_check,
                           health_check_timeout_s=a.health_check_timeout_s,
                           gpu_error=self.gpu_error, node_watcher=self.node_watcher)
            for subject in rpc.subscriptions:
                await self.bus.subscribe(subject, rpc.on_message)
            log.info("connected to NATS at %s", self.bus.url)
            if self.url_file is None:
                return
            await self._wait_for_new_url()
            log.warning("NATS lost; the controller's URL file now says %s", self._url_from_file())
            await self.bus.close()

    async def _connect_once(self) -> None:
        backoff = Backoff(base_s=0.5, max_s=10.0)
        while True:
            self.bus.url = self._url_from_file() or self.bus.url
            try:
                await self.bus.connect(retry=True)
                return
            except BusError as exc:
                delay = backoff.next()
                log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)

    def _url_from_file(self) -> str:
        """The URL in the local controller's URL file; "" when there is none to follow."""
        if self.url_file is None:
            return ""
        try:
            return self.url_file.read_text().strip()
        except OSError:
            return ""

    async def _wait_for_new_url(self) -> None:
        """Return once NATS has been away for a while and the URL file names another server:
        nats-py only ever retries the URL it was given."""
        away_since: float | None = None
        while True:
            await asyncio.sleep(URL_CHECK_S)
            if self.bus.connected:
                away_since = None
                continue
            now = time.monotonic()
            away_since = away_since or now
            url = self._url_from_file()
            if now - away_since >= URL_CHECK_S and url and url != self.bus.url:
                return

    async def _housekeeping(self) -> None:
        """Watchdog pings from the main loop (a stuck loop stops them)."""
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(self.notifier.watchdog_period_s)

    def _reload(self) -> None:
        if self.reload_settings is None:
            return
        self.notifier.reloading()
        try:
            new = self.reload_settings()
            check_settings(new)
            policy = new.fault_policy()
            node_policy = new.node_health_policy()
        except SettingsError as exc:
            log.error("reload refused, keeping current settings: %s", exc)
            self.notifier.ready("reload refused")
            return
        logging.getLogger().setLevel(new.agent.log_level.upper())
        if self.watcher is not None:
            self.watcher.policy = policy
            self.watcher.poll_interval_s = new.agent.poll_interval_s
        if self.node_watcher is not None:
            self.node_watcher.policy = node_policy
            self.node_watcher.config.interval_s = new.agent.node_health_interval_s
            self.node_watcher.config.probe_timeout_s = new.agent.mount_probe_timeout_s
        self.settings = new
        log.info(
            "settings reloaded: fault policy, port and mount thresholds, poll intervals and "
            "log level (the rest, what is watched among it, takes effect at the next restart)"
        )
        self.notifier.ready("settings reloaded")

    async def _shutdown(self) -> None:
        self.notifier.stopping("stopping")
        log.info("agent stopping")
        if self.relay is not None:
            await self.relay.stop()
        # Give queued reports a moment; whatever is left is in the journal for next time.
        if self.bus.connected and len(self.outbox):
            await self.outbox.flush(2.0)
        await self.supervisor.stop()
        if self.job_creds is not None:
            await self.job_creds.close()
        if self.runner is not None:
            await self.runner.aclose()
        await self.bus.close()
        log.info("agent stopped (%d message(s) not yet published)", len(self.outbox))


async def run(
    settings: Settings, nats_url: str, reload: Callable[[], Settings] | None = None
) -> int:
    """The agent's entry point: build it and run it until stopped."""
    return await Agent(settings, nats_url, reload=reload).run()
