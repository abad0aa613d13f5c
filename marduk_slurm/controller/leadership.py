"""Which controller acts: the leader holds the lease (adapters/lease.py), the others wait.

Every controller ingests the events stream into its own database; only the holder of the
lease carries decisions out (Slurm calls, commands, operator writes). The lease's revision is
the fencing token. The leader renews every `lease_s / RENEWALS_PER_LEASE`; it counts itself
the leader only until `lease_s` after it *sent* its last successful renewal (the server
expires the value `lease_s` after it *stored* it, which is later), so it stops acting before
anyone else can take over. `check()` is asked before each action that must happen once: it
refuses (and counts) when the lease may have lapsed (the process was stopped, NATS was away)
or when the bucket names another revision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from marduk_slurm import __version__
from marduk_slurm.adapters.lease import LeaseLost, LeaseStore, LeaseTaken
from marduk_slurm.errors import BusError, BusTimeout, MardukError

log = logging.getLogger(__name__)

RENEWALS_PER_LEASE = 4
# A standby asks whether the lease is free this many times per lease.
POLLS_PER_LEASE = 8


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class NotLeader(MardukError):
    """This controller does not hold the lease (any more): it must not act."""


def holder_value(controller_id: str, started: float) -> bytes:
    return json.dumps({"id": controller_id, "host": socket.gethostname(), "pid": os.getpid(),
                       "version": __version__, "started": round(started, 3)}).encode()


def read_holder(value: bytes) -> dict[str, Any]:
    """The lease's value as shown to operators; never trusted for a decision."""
    try:
        data = json.loads(value[:4096])
    except (ValueError, UnicodeDecodeError):
        return {"id": "?"}
    if not isinstance(data, dict):
        return {"id": "?"}
    return {k: data[k] for k in ("id", "host", "pid", "version", "started")
            if isinstance(data.get(k), str | int | float)}


def read_standby(value: bytes) -> dict[str, Any]:
    """A standby's announcement as shown to operators (bounded, never trusted)."""
    data = read_holder(value)
    try:
        raw = json.loads(value[:4096])
    except (ValueError, UnicodeDecodeError):
        return data
    if isinstance(raw, dict):
        data.update({k: raw[k] for k in ("consumer", "behind")
                     if isinstance(raw.get(k), str | int)})
    return data


class Leadership:
    def __init__(self, lease: LeaseStore, controller_id: str, *, lease_s: float) -> None:
        self.lease = lease
        self.id = controller_id
        self.lease_s = lease_s
        self.role = "standby"
        self.token = 0  # the lease revision we last wrote: checked against the bucket
        # The revision at which we took the lease: the fencing token that commands and
        # reports carry. It is the same for everything one leader sends (renewals do not move
        # it, so two of its commands can never look stale to each other), and a later
        # leader's is always larger.
        self.term = 0
        self.holder: dict[str, Any] = {}  # who leads, as last read
        self.holder_revision = 0
        self.stats: Counter[str] = Counter()
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.started = time.time()
        self.leader_since = 0.0
        self._value = holder_value(controller_id, self.started)
        self._renewed_at = 0.0  # monotonic time at which the last good renewal was sent
        self._announced_at = 0.0
        # What a standby says of itself besides who it is (its consumer, how far behind).
        self.presence: Callable[[], Awaitable[dict[str, Any]]] | None = None
        self._standbys_cache: tuple[float, list[dict[str, Any]]] = (0.0, [])

    # -- taking the lease ------------------------------------------------------------------

    async def acquire(self) -> float:
        """Wait as a standby until the lease is ours; returns how long we waited."""
        began = time.monotonic()
        last_seen: tuple[Any, int] | None = None
        while True:
            sent = time.monotonic()
            try:
                self.token = await self.lease.create(self._value)
            except LeaseTaken:
                await self._note_holder(last_seen)
                last_seen = (self.holder.get("id"), self.holder_revision)
                if await self._take_from_own_dead_run():
                    self._renewed_at = sent
                    return self._became_leader(began)
            except (BusError, BusTimeout) as exc:
                self.stats["lease_errors"] += 1
                if self.stats["lease_errors"] % 20 == 1:
                    log.warning("standby: cannot ask for the lease: %s", exc)
            else:
                self._renewed_at = sent
                return self._became_leader(began)
            if time.monotonic() - self._announced_at > self.lease_s / 2:
                await self._announce()
            await asyncio.sleep(self.lease_s / POLLS_PER_LEASE)

    def _became_leader(self, began: float) -> float:
        self.role, self.leader_since = "leader", time.time()
        self.term = self.token
        self.holder, self.holder_revision = read_holder(self._value), self.token
        self.stats["lease_taken"] += 1
        return time.monotonic() - began

    async def _take_from_own_dead_run(self) -> bool:
        """A controller restarted in place (systemd after a crash) finds the lease of its
        previous run: same id, this host, a process that no longer exists (or this very
        process, which stepped down when it could not renew: NATS was away). It takes that
        lease over at once, by revision (a compare-and-set), rather than wait for it to
        lapse. A holder on another host, or whose process still runs, is waited out. (Ids
        must be unique: two controllers with one id on one host name, in separate process
        namespaces, would take the lease from each other.)"""
        holder = self.holder
        pid = holder.get("pid")
        ours = pid == os.getpid()  # this process's own term, before it stepped down
        if (holder.get("id") != self.id or holder.get("host") != socket.gethostname()
                or not isinstance(pid, int) or pid <= 0
                or not (ours or not process_exists(pid))):
            return False
        try:
            self.token = await self.lease.renew(self._value, self.holder_revision)
        except (BusError, BusTimeout):  # LeaseLost included: it lapsed or moved on meanwhile
            return False
        log.info("took the lease back from %s (pid %d)", "this controller's own earlier term"
                 if ours else "this controller's previous run, gone", pid)
        self.stats["lease_taken_from_own_dead_run"] += 1
        return True

    async def _announce(self) -> None:
        """Tell the leader (and `marduk status`) that this standby is alive."""
        self._announced_at = time.monotonic()
        data = read_holder(self._value)
        if self.presence is not None:
            with contextlib.suppress(BusError, BusTimeout):
                data.update(await self.presence())
        try:
            await self.lease.announce(self.id, json.dumps(data).encode())
        except (BusError, BusTimeout) as exc:
            self.stats["announce_failures"] += 1
            log.debug("standby: %s", exc)

    async def standbys(self) -> list[dict[str, Any]]:
        """The live standbys, as they announced themselves (cached for a second)."""
        at, cached = self._standbys_cache
        if time.monotonic() - at < 1.0:
            return cached
        try:
            values = await self.lease.standbys()
        except (BusError, BusTimeout) as exc:
            return [{"error": str(exc)[:200]}]
        found = sorted((s for s in map(read_standby, values) if s.get("id") != self.id),
                       key=lambda s: str(s.get("id")))
        self._standbys_cache = (time.monotonic(), found)
        return found

    async def _note_holder(self, last_seen: tuple[Any, int] | None) -> None:
        try:
            entry = await self.lease.read()
        except (BusError, BusTimeout):
            return
        if entry is None:
            return  # lapsed between our create and this read: ask again
        self.holder, self.holder_revision = read_holder(entry.value), entry.revision
        if last_seen is None or last_seen[0] != self.holder.get("id"):
            log.info("standby: controller %s on %s leads (lease revision %d); waiting for "
                     "its lease to lapse", self.holder.get("id"), self.holder.get("host"),
                     entry.revision)

    # -- holding it ------------------------------------------------------------------------

    def current(self) -> bool:
        """Whether we may still count ourselves the leader, by our own clock alone."""
        return (self.role == "leader" and not self.lost.is_set()
                and time.monotonic() < self._renewed_at + self.lease_s)

    async def hold(self) -> None:
        """Renew until the lease is lost; then set `lost` and return."""
        period = self.lease_s / RENEWALS_PER_LEASE
        while not self.lost.is_set():
            await asyncio.sleep(period)
            sent = time.monotonic()
            try:
                self.token = await self.lease.renew(self._value, self.token)
            except LeaseLost as exc:
                self._lose(str(exc))
                return
            except (BusError, BusTimeout) as exc:
                self.stats["renew_failures"] += 1
                if not self.current():
                    self._lose(f"could not renew within the lease ({self.lease_s:g} s): {exc}")
                    return
                log.warning("lease renewal failed, retrying: %s", exc)
                continue
            if sent > self._renewed_at + self.lease_s:  # we slept past our own lease
                self._lose("the renewal came after the lease had lapsed")
                return
            self._renewed_at = sent
            self.holder_revision = self.token
            self.stats["renewals"] += 1

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.role = "lost"
        self.lost_reason = reason
        self.stats["lease_lost"] += 1
        log.error("leadership lost: %s", reason)
        self.lost.set()

    def step_down(self) -> None:
        """After a loss, back to waiting as a standby (`acquire` again)."""
        self.role, self.token, self.leader_since = "standby", 0, 0.0
        self.lost = asyncio.Event()
        self._announced_at = 0.0

    async def check(self, what: str) -> None:
        """Before an action that must happen once: `NotLeader` (counted) unless the lease is
        ours by our clock and the bucket still holds our value (at our revision, or a later
        one our renewal in flight just wrote). A bucket that does not answer refuses the
        action without deciding the lease: the renewals do that."""
        if not self.current():
            why = self.lost_reason or "the lease may have lapsed"
            self._lose(why)
            self._refuse(what, why)
        try:
            entry = await self.lease.read()
        except (BusError, BusTimeout) as exc:
            self.stats["lease_unverified"] += 1
            raise NotLeader(f"cannot tell whether this controller still leads: {exc}"
                            ) from exc
        if entry is not None and entry.value == self._value and entry.revision >= self.token:
            return
        why = "the lease is gone" if entry is None else (
            f"the lease is at revision {entry.revision} of {read_holder(entry.value).get('id')}"
            f", ours was {self.token}")
        self._lose(why)
        self._refuse(what, why)

    def _refuse(self, what: str, why: str) -> NoReturn:
        self.stats["stale_leader_refusals"] += 1
        log.error("refused to %s: not the leader (%s)", what, why)
        raise NotLeader(f"not the leader: {why}")

    async def release(self) -> None:
        """A clean stop: give the lease up so that a standby takes over at once."""
        if self.role != "leader" or self.lost.is_set():
            return
        self.role = "stopped"
        try:
            if await self.lease.release(self.token):
                log.info("lease released (revision %d)", self.token)
        except (BusError, BusTimeout) as exc:
            log.warning("could not release the lease (it lapses in %.3g s): %s",
                        self.lease_s, exc)

    def view(self) -> dict[str, Any]:
        """For `marduk status` and the metrics."""
        leading = self.role == "leader"
        return {
            "id": self.id, "role": self.role, "lease_s": self.lease_s, "term": self.term,
            "lease_revision": self.token if leading else self.holder_revision,
            "renewed_ago_s": round(time.monotonic() - self._renewed_at, 3) if leading else None,
            "leader_since": self.leader_since or None,
            "leader": dict(self.holder),
            "stale_leader_refusals": self.stats["stale_leader_refusals"],
            "lease_renewals": self.stats["renewals"],
        }
