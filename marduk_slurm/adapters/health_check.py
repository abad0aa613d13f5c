"""The site health check that may gate a resume: a command run for one node, e.g. a GPU
burn-in or an NCCL test submitted as a Slurm job on exactly that node
(``srun -w {node} --gres=gpu:8 /opt/site/gpu-burn 60``). Exit 0 means healthy."""

from __future__ import annotations

import asyncio
import shlex
import time
from dataclasses import dataclass


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
                    env: dict[str, str] | None = None) -> CheckResult:
    """Run `template` with ``{node}`` replaced; never raises for a failing check."""
    command = template.replace("{node}", node)
    t0 = time.monotonic()
    try:
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(command), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL, env=env)
    except (OSError, ValueError) as exc:
        return CheckResult(command, None, f"cannot start: {exc}", time.monotonic() - t0)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return CheckResult(command, None, f"timed out after {timeout_s:.0f} s",
                           time.monotonic() - t0)
    text = out.decode(errors="replace")[-2000:]
    return CheckResult(command, proc.returncode, text, time.monotonic() - t0)
