"""Exit codes of a training process that runs `ManagerMarduk`, as the sbatch supervisor reads them.

The supervisor loop in the sbatch template decides from the code alone whether to start the
replica group again, and where:

========  ==============  =====================================================================
code      name            what the supervisor does
========  ==============  =====================================================================
0         EXIT_DONE       training finished (max_steps reached): do not respawn
75        EXIT_LEAVE      told to leave (GPU fault, drain): respawn, on another node
76        EXIT_STOP       told to stop for good: do not respawn
other     crash           respawn on the same allocation, up to the restart limit
========  ==============  =====================================================================

75 is BSD's EX_TEMPFAIL ("try again later"), which is what a commanded leave means; 76 is the
next free code below the signal range (128+N), so neither collides with Python's own 1 and 2.
"""

from __future__ import annotations

from typing import Final

EXIT_DONE: Final = 0
EXIT_LEAVE: Final = 75
EXIT_STOP: Final = 76

# Codes after which the supervisor must not start the replica group again.
NO_RESPAWN: Final = frozenset({EXIT_DONE, EXIT_STOP})


def should_respawn(code: int) -> bool:
    """Whether the sbatch supervisor starts the replica group again after `code`."""
    return code not in NO_RESPAWN


def describe(code: int) -> str:
    """A word for logs and the history: done, leave, stop or crash."""
    return {EXIT_DONE: "done", EXIT_LEAVE: "leave", EXIT_STOP: "stop"}.get(code, "crash")
