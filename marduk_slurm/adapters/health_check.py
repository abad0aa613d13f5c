"""The site health check that may gate a resume: a command run for one node, e.g. a GPU
burn-in over ssh (``ssh {node} /opt/site/gpu-burn 60``) or a site script. Exit 0 means
healthy.

Slurm will not start a job on a drained node, so a check submitted as a job on exactly that
node (``srun -w {node} ...``, with or without a reservation) waits in the queue until its time
limit: the check has to reach the node outside Slurm's scheduling (ssh, pdsh, a site script).

The check runs in a process group of its own, and on timeout or cancellation the whole group
is stopped: SIGTERM first (srun then cancels its pending allocation), SIGKILL after a grace
period, so no srun, ssh or pending job outlives the check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from dataclasses import dataclass

# How long a check's process group has between SIGTERM and SIGKILL.
STOP_GRACE_S = 3.0


@dataclass(frozen=True)
class CheckResult:
    command: str
    returncode: int | None  # None: it did not finish in time or could not start
    output: str  # the tail of stdout and stderr
    duration_s: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0

    def evidence(self) -> dict[str, object]:
        return {"command": self.command, "returncode": self.returncode,
                "output": self.output, "duration_s": round(self.duration_s, 3)}


async def run_check(template: str, node: str, *, timeout_s: float,
                    env: dict[str, str] | None = None,
                    stop_grace_s: float = STOP_GRACE_S) -> CheckResult:
    """Run `template` with ``{node}`` replaced; never raises for a failing check. Cancelled,
    it stops the check's process group before the CancelledError goes on."""
    command = template.replace("{node}", node)
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(command), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL, env=env,
            start_new_session=True)
    except (OSError, ValueError) as exc:
        return CheckResult(command, None, f"cannot start: {exc}", time.monotonic() - t0)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        await stop_process_group(proc, stop_grace_s)
        return CheckResult(command, None, f"timed out after {timeout_s:g} s; stopped",
                           time.monotonic() - t0)
    except asyncio.CancelledError:
        await stop_process_group(proc, stop_grace_s)
        raise
    # What the check left running in its group (a background child) goes with it.
    _signal_group(proc.pid, signal.SIGKILL)
    text = out.decode(errors="replace")[-2000:]
    return CheckResult(command, proc.returncode, text, time.monotonic() - t0)


async def stop_process_group(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM to the check's whole group, SIGKILL after `grace_s`; then reap the leader."""
    _signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(proc.wait(), grace_s)
    # Members of the group may outlive the leader (srun's helpers, ssh): kill them all.
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
