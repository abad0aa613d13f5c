"""The controllers' leadership lease: one key in a JetStream key-value bucket (nats-py).

The bucket keeps one revision per key and expires every value `ttl_s` after it was written,
so a lease that is not renewed lapses on the NATS server's clock, never on a controller's.
Taking the lease is a create (refused while the key exists); renewing it is an update that
names the revision the holder last wrote (refused once anyone else wrote the key or it
expired). The revision a write returns is the holder's fencing token: it only grows, so a
newer leader always holds a larger one.

Everything nats-py stays here: callers see `LeaseEntry` values and our errors.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from marduk_slurm.adapters.bus import JETSTREAM_UNAVAILABLE, Bus
from marduk_slurm.errors import BusError, BusTimeout

log = logging.getLogger(__name__)

LEASE_BUCKET = "marduk_leader"
LEASE_KEY = "leader"
STANDBY_PREFIX = "standby."
# JetStream's answers to a write that names a revision that is not the last one.
WRONG_LAST_SEQUENCE = (10071, 10164)


class LeaseTaken(BusError):
    """Someone else holds the lease."""


class LeaseLost(BusError):
    """The lease is no longer ours: it expired, or another controller took it."""


@dataclass(frozen=True)
class LeaseEntry:
    value: bytes
    revision: int


class LeaseStore:
    """The lease bucket on one bus."""

    def __init__(self, bus: Bus, *, ttl_s: float, replicas: int = 1) -> None:
        if not 0.5 <= ttl_s <= 300:
            raise ValueError(f"lease ttl must be within 0.5 and 300 s, got {ttl_s}")
        self.bus = bus
        self.ttl_s = ttl_s
        self.replicas = replicas
        self._kv: KeyValue | None = None

    async def open(self) -> float:
        """Create the bucket, or bind to the one there. Returns the bucket's TTL, which is
        the lease for everyone: a site whose controllers disagree on it keeps the first."""
        js = self.bus.js
        config = KeyValueConfig(bucket=LEASE_BUCKET, history=1, ttl=self.ttl_s,
                                replicas=self.replicas)
        try:
            try:
                self._kv = await js.create_key_value(config)
            except nats.js.errors.BadRequestError:  # there already, with another TTL
                self._kv = await js.key_value(LEASE_BUCKET)
            info = await js.stream_info(f"KV_{LEASE_BUCKET}")
        except JETSTREAM_UNAVAILABLE as exc:
            raise BusTimeout(f"JetStream cannot open the lease bucket yet: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot open the lease bucket {LEASE_BUCKET}: {exc}") from exc
        ttl = float(info.config.max_age or 0.0)
        if ttl and abs(ttl - self.ttl_s) > 1e-3:
            log.warning("the lease bucket %s expires values after %.3g s, not the configured "
                        "%.3g s: every controller uses the bucket's (delete the bucket to "
                        "change it)", LEASE_BUCKET, ttl, self.ttl_s)
        self.ttl_s = ttl or self.ttl_s
        return self.ttl_s

    def _bucket(self) -> KeyValue:
        if self._kv is None:
            raise BusError("the lease bucket is not open")
        return self._kv

    async def read(self) -> LeaseEntry | None:
        """The lease as it stands, or None when nobody holds it."""
        try:
            entry = await self._bucket().get(LEASE_KEY)
        except nats.js.errors.KeyNotFoundError:
            return None
        except JETSTREAM_UNAVAILABLE as exc:
            raise BusTimeout(f"no answer about the lease: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot read the lease: {exc}") from exc
        return LeaseEntry(bytes(entry.value or b""), int(entry.revision or 0))

    async def create(self, value: bytes) -> int:
        """Take the lease; its revision (the fencing token). `LeaseTaken` when it is held."""
        try:
            return int(await self._bucket().create(LEASE_KEY, value))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise LeaseTaken("the lease is held by another controller") from exc
        except JETSTREAM_UNAVAILABLE as exc:
            raise BusTimeout(f"no answer taking the lease: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot take the lease: {exc}") from exc

    async def renew(self, value: bytes, revision: int) -> int:
        """Write the lease again if `revision` is still the last one; the new revision.
        `LeaseLost` when it is not (expired, or taken by someone else)."""
        try:
            return int(await self._bucket().update(LEASE_KEY, value, last=revision))
        except nats.js.errors.KeyWrongLastSequenceError as exc:
            raise LeaseLost(f"the lease moved on from revision {revision}") from exc
        except JETSTREAM_UNAVAILABLE as exc:
            raise BusTimeout(f"no answer renewing the lease: {exc}") from exc
        except (nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot renew the lease: {exc}") from exc

    async def announce(self, name: str, value: bytes) -> None:
        """A standby's presence, under `standby.<name>`: it lapses with the bucket's TTL
        unless announced again."""
        try:
            await self._bucket().put(f"{STANDBY_PREFIX}{name}", value)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot announce standby {name}: {exc}") from exc

    async def standbys(self, timeout_s: float = 1.0) -> list[bytes]:
        """The values every live standby announced."""
        values: list[bytes] = []
        try:
            watcher = await self._bucket().watch(f"{STANDBY_PREFIX}*", ignore_deletes=True)
            try:
                async with asyncio.timeout(timeout_s):
                    async for entry in watcher:
                        if entry is None:  # the end of what is stored now
                            break
                        values.append(bytes(entry.value or b""))
            finally:
                await watcher.stop()
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot list the standbys: {exc}") from exc
        return values

    async def release(self, revision: int) -> bool:
        """Give the lease up (a clean stop), only if `revision` is still ours: the next
        controller takes it at once instead of after the TTL. False when it was not ours."""
        try:
            await self._bucket().delete(LEASE_KEY, last=revision)
        except nats.js.errors.APIError as exc:
            if exc.err_code in WRONG_LAST_SEQUENCE:
                return False
            raise BusError(f"cannot release the lease: {exc}") from exc
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            raise BusError(f"cannot release the lease: {exc}") from exc
        return True
