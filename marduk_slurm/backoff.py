"""The one retry delay of the project: capped exponential backoff with full jitter.

Every retry loop (the controller's outbox and ingest, the agent's outbox, the supervisor, the
runtime's reconnects) asks this module how long to wait, so that a thousand agents that lost
the controller at the same moment do not come back at the same moment either.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


def backoff_delay(attempt: int, *, base_s: float = 0.2, max_s: float = 10.0,
                  jitter: float = 0.5, rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry).

    The delay grows as ``base_s * 2 ** (attempt - 1)`` up to `max_s`; then a random fraction
    of up to `jitter` of it is taken off (0 keeps it exact, 1 is "full jitter"). Never negative,
    never above `max_s`, whatever `attempt` is.
    """
    if attempt < 1:
        attempt = 1
    exponent = min(attempt - 1, 62)  # 2**62 * base already exceeds any cap
    delay = min(base_s * float(2 ** exponent), max_s)
    jitter = min(max(jitter, 0.0), 1.0)
    if jitter:
        delay -= delay * jitter * (rng or random).random()
    return max(delay, 0.0)


@dataclass
class Backoff:
    """A retry counter for one loop: `next()` gives the delay, `reset()` after a success."""

    base_s: float = 0.2
    max_s: float = 10.0
    jitter: float = 0.5
    attempt: int = 0
    rng: random.Random | None = field(default=None, repr=False)

    def next(self) -> float:
        self.attempt += 1
        return backoff_delay(self.attempt, base_s=self.base_s, max_s=self.max_s,
                             jitter=self.jitter, rng=self.rng)

    def reset(self) -> None:
        self.attempt = 0
