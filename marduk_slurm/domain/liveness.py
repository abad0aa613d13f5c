"""Which replicas the lighthouse liveness proxy keeps alive at the real lighthouse.

The real torchft lighthouse runs with a short heartbeat timeout; the proxy in front of it
holds the operator's long one. A replica that heartbeated the proxy (or asked it for a
quorum, an implicit heartbeat in torchft) within `long_timeout_s` is relayed: the proxy
heartbeats the lighthouse on its behalf. So a replica that dies unannounced is seen dead
after the long timeout plus at most the short one, never sooner than without the proxy. A
replica that marduk told to leave is dropped at once: its relayed heartbeats stop and its
own are no longer forwarded, so the lighthouse sees it gone within the short timeout.

Pure: times are passed in (monotonic seconds). Both tables are bounded; what does not fit is
counted, never raised.
"""

from __future__ import annotations

import collections
from enum import StrEnum
from typing import Final

MAX_REPLICAS: Final = 1024
MAX_LEFT: Final = 4096


class LeaveOutcome(StrEnum):
    APPLIED = "applied"  # was alive here: dropped from now on
    REPEATED = "repeated"  # already gone (leaves are re-sent until the replica confirms)
    UNKNOWN = "unknown"  # never heard of within the long timeout: ignored


class LivenessTable:
    """Last heartbeat per replica id, and the ids told to leave."""

    def __init__(self, long_timeout_s: float, *, max_replicas: int = MAX_REPLICAS,
                 max_left: int = MAX_LEFT) -> None:
        if not long_timeout_s > 0:
            raise ValueError(f"long_timeout_s must be positive, got {long_timeout_s!r}")
        if max_replicas < 1 or max_left < 1:
            raise ValueError("max_replicas and max_left must be at least 1")
        self.long_timeout_s = long_timeout_s
        self.max_replicas = max_replicas
        self.max_left = max_left
        self._last: dict[str, float] = {}
        self._left: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.counts: collections.Counter[str] = collections.Counter()

    def heard(self, replica_id: str, now: float) -> bool:
        """A heartbeat or quorum request from `replica_id`: True to forward it, False to drop
        it (the replica was told to leave). A new id that does not fit is still forwarded,
        without the long timeout's grace (counted as `table_full`)."""
        if replica_id in self._left:
            self.counts["dropped_after_leave"] += 1
            return False
        if replica_id not in self._last and len(self._last) >= self.max_replicas:
            self._expire(now)
            if len(self._last) >= self.max_replicas:
                self.counts["table_full"] += 1
                return True
        self._last[replica_id] = now
        return True

    def relay_due(self, now: float) -> list[str]:
        """The replicas to heartbeat on behalf of now: those heard within the long timeout.
        The others are forgotten (the lighthouse ages them out within its short timeout)."""
        self._expire(now)
        return list(self._last)

    def alive(self, replica_id: str, now: float) -> bool:
        last = self._last.get(replica_id)
        return last is not None and now - last < self.long_timeout_s

    def leave(self, replica_id: str) -> LeaveOutcome:
        """`replica_id` (torchft's id) was told to leave."""
        if replica_id in self._left:
            outcome = LeaveOutcome.REPEATED
        elif self._last.pop(replica_id, None) is not None:
            outcome = LeaveOutcome.APPLIED
            self._left[replica_id] = None
            while len(self._left) > self.max_left:
                self._left.popitem(last=False)
        else:
            outcome = LeaveOutcome.UNKNOWN
        self.counts[f"leave_{outcome}"] += 1
        return outcome

    def has_left(self, replica_id: str) -> bool:
        return replica_id in self._left

    def __len__(self) -> int:
        return len(self._last)

    def _expire(self, now: float) -> None:
        stale = [r for r, t in self._last.items() if now - t >= self.long_timeout_s]
        for replica_id in stale:
            del self._last[replica_id]
        self.counts["expired"] += len(stale)
