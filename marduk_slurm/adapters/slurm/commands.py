"""The Slurm-commands backend: scontrol, sinfo and scancel as subprocesses.

Every command goes through `SlurmCommandRunner`: an argv list (never a shell), the binary
found with `shutil.which`, `asyncio.create_subprocess_exec`, a time limit after which the
process is killed, `SLURM_CONF` passed when configured, and counters of calls and failures
per command. Node operations are batched: one `scontrol update` names many nodes as a
compressed hostlist (`n[1-1000]`), so draining 1,000 nodes is one RPC, not 1,000.

Measured on Slurm 22.05: `scontrol update` takes 4-19 ms; with slurmctld stopped it retries
for ~9 s before "Unable to contact slurm controller (connect failure)", so a time limit
shorter than that also reads as `SlurmUnavailable`.

Node names are checked (domain/slurm_names.py) and put after `--`, so none can be read as an
option; reasons go out as one printable line. Output that does not parse is a `SlurmError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from marduk_slurm.adapters.slurm import parse
from marduk_slurm.adapters.slurm.base import (
    STEP_NAMES,
    SlurmJob,
    SlurmNode,
    SlurmStep,
    checked_node_names,
    checked_reason,
)
from marduk_slurm.domain import hostlist, slurm_names
from marduk_slurm.errors import SlurmError, SlurmUnavailable

# Node names per scontrol call: a compressed list stays short, but an argument of a few
# hundred KB (thousands of unrelated names) is where slurmctld's message limits start to bite.
DEFAULT_BATCH_SIZE = 2000

T = TypeVar("T")


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class SlurmCommandRunner:
    """Runs Slurm commands off the event loop, each with a time limit, and counts them."""

    def __init__(
        self,
        *,
        timeout_s: float,
        slurm_conf: str | None = None,
        base_env: Mapping[str, str] | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.slurm_conf = slurm_conf
        self._env = dict(os.environ if base_env is None else base_env)
        if slurm_conf is not None:
            self._env["SLURM_CONF"] = slurm_conf
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()

    async def run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        """Run `argv`; with `check`, a non-zero exit raises the classified Slurm error."""
        command = argv[0]
        self.calls[command] += 1
        try:
            result = await self._exec(argv)
        except SlurmError:
            self.failures[command] += 1
            raise
        if result.returncode != 0:
            self.failures[command] += 1
            if check:
                raise parse.classify_failure(
                    " ".join(argv[:2]), result.returncode, result.stderr, result.stdout
                )
        return result

    async def _exec(self, argv: Sequence[str]) -> CommandResult:
        path = shutil.which(argv[0], path=self._env.get("PATH"))
        if path is None:
            raise SlurmError(f"{argv[0]} not found on PATH; is slurm-client installed?")
        try:
            process = await asyncio.create_subprocess_exec(
                path,
                *argv[1:],
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self._env,
            )
        except OSError as err:  # not executable, argv too long, out of processes
            raise SlurmError(f"{argv[0]} could not be started: {err}") from err
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), self.timeout_s)
        except TimeoutError:
            await _kill(process)
            raise SlurmUnavailable(
                f"{' '.join(argv[:2])}: no answer within {self.timeout_s:g} s "
                "(slurmctld unreachable or overloaded)"
            ) from None
        except asyncio.CancelledError:
            await _kill(process)
            raise
        return CommandResult(
            tuple(argv), process.returncode or 0, stdout.decode(errors="replace"),
            stderr.decode(errors="replace"),
        )  # fmt: skip

    def stats(self) -> dict[str, int]:
        counters = {"calls": sum(self.calls.values()), "failures": sum(self.failures.values())}
        counters.update({f"calls.{cmd}": n for cmd, n in self.calls.items()})
        counters.update({f"failures.{cmd}": n for cmd, n in self.failures.items()})
        return counters


async def _kill(process: asyncio.subprocess.Process) -> None:
    """Kill and reap, so a hung scontrol leaves neither a process nor a zombie."""
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(Exception):
        await process.wait()


class CommandsBackend:
    """`SlurmBackend` over Slurm's command-line tools (any Slurm version with JSON sinfo)."""

    name = "commands"
    lists_steps = True

    def __init__(self, runner: SlurmCommandRunner, *, batch_size: int = DEFAULT_BATCH_SIZE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.runner = runner
        self.batch_size = batch_size

    async def list_nodes(self) -> list[SlurmNode]:
        # sinfo --json ignores filters in 22.05, so callers filter; it has reason user/time
        # as fields, where scontrol only prints them inside the reason text.
        return await self._read(["sinfo", "--json"], parse.parse_sinfo_json)

    async def get_nodes(self, names: Sequence[str]) -> list[SlurmNode]:
        # A name Slurm must not be given cannot be one it knows: leave it out of the answer.
        wanted = {name for name in names if _is_node_name(name)}
        if not wanted:
            return []
        found: list[SlurmNode] = []
        ordered = sorted(wanted)
        for start in range(0, len(ordered), self.batch_size):
            batch = hostlist.compress(ordered[start : start + self.batch_size])
            result = await self.runner.run(["scontrol", "show", "-o", "node", "--", batch],
                                           check=False)
            # Unknown names make scontrol fail for the whole list; fall back to everything.
            if result.returncode != 0:
                return [n for n in await self.list_nodes() if n.name in wanted]
            found += self._parsed(result, parse.parse_scontrol_nodes)
        return [n for n in found if n.name in wanted]

    async def list_jobs(self) -> list[SlurmJob]:
        # -d adds the per-node `GRES=gpu:1(IDX:0)` detail that gives GPU indices.
        return await self._read(["scontrol", "-d", "show", "-o", "job"],
                                parse.parse_scontrol_jobs)

    async def list_steps(self) -> list[SlurmStep]:
        return await self._read(["scontrol", "show", "-o", "step"], parse.parse_scontrol_steps)

    async def drain(self, nodes: Sequence[str], reason: str) -> None:
        await self._update_nodes(nodes, "drain", checked_reason(reason, "drain"))

    async def resume(self, nodes: Sequence[str]) -> None:
        await self._update_nodes(nodes, "resume", None)

    async def down(self, nodes: Sequence[str], reason: str) -> None:
        await self._update_nodes(nodes, "down", checked_reason(reason, "down"))

    async def signal_step(self, job_id: int, step_id: int, signum: int) -> None:
        # scancel exits 0 for a step that does not exist in a live job; that is Slurm's call.
        step = STEP_NAMES.get(step_id, str(step_id))
        if step == "batch":
            argv = ["scancel", "--batch", f"--signal={signum}", str(job_id)]
        else:
            argv = ["scancel", f"--signal={signum}", f"{job_id}.{step}"]
        await self.runner.run(argv)

    async def requeue(self, job_id: int) -> None:
        await self.runner.run(["scontrol", "requeue", str(job_id)])

    async def ping(self) -> bool:
        try:
            result = await self.runner.run(["scontrol", "ping"], check=False)
        except SlurmError:
            return False
        return result.returncode == 0 and "is UP" in result.stdout

    def stats(self) -> dict[str, int]:
        return self.runner.stats()

    async def _read(self, argv: list[str], parser: Callable[[str], T]) -> T:
        return self._parsed(await self.runner.run(argv), parser)

    def _parsed(self, result: CommandResult, parser: Callable[[str], T]) -> T:
        """`parser(stdout)`; output it does not understand counts as a failed call."""
        try:
            return parser(result.stdout)
        except SlurmError:
            self.runner.failures[result.argv[0]] += 1
            raise

    async def _update_nodes(self, nodes: Sequence[str], state: str, reason: str | None) -> None:
        names = checked_node_names(nodes)
        for start in range(0, len(names), self.batch_size):
            batch = hostlist.compress(names[start : start + self.batch_size])
            argv = ["scontrol", "update", "--", f"nodename={batch}", f"state={state}"]
            if reason is not None:
                argv.append(f"reason={reason}")
            await self.runner.run(argv)


def _is_node_name(name: str) -> bool:
    try:
        slurm_names.check_node_name(name)
    except ValueError:
        return False
    return True
