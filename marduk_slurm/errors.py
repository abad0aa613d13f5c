"""The one error hierarchy of marduk-slurm.

Every error the project raises on purpose derives from `MardukError`, and also from the stdlib
type it resembles, so callers can catch either.
"""

from __future__ import annotations


class MardukError(Exception):
    """Base class of every marduk-slurm error."""


class SettingsError(MardukError, ValueError):
    """A settings file, environment variable or flag is wrong (names the source and key)."""


class ProtocolError(MardukError, ValueError):
    """An inbound message is malformed; `reason` is a short counter label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class IdentityError(ProtocolError):
    """A message speaks for an identity its sender does not own (another job's replica, another
    node's GPU). `retry` marks a conflict that may resolve itself once an earlier message of
    the sender arrives (a step start still on its way)."""

    def __init__(self, reason: str, detail: str = "", *, retry: bool = False) -> None:
        super().__init__(reason, detail)
        self.retry = retry


class NotFound(MardukError, LookupError):
    """A node, job or replica that the request names does not exist."""


class BusError(MardukError, ConnectionError):
    """NATS is unreachable or refused an operation."""


class BusTimeout(MardukError, TimeoutError):
    """A NATS request got no answer in time."""


class BusClosed(BusError):
    """The connection was closed for good (the process is shutting down)."""


class SlurmError(MardukError, RuntimeError):
    """A Slurm command or API call failed."""


class SlurmUnavailable(SlurmError, ConnectionError):
    """slurmctld cannot be reached; the action should be retried later."""


class StoreError(MardukError, RuntimeError):
    """The SQLite store failed (locked, disk full, corrupt)."""
