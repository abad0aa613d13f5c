"""Node names and reasons against the real Slurm 22.05 cluster (scripts/slurm-cluster.sh).

Each test resumes what it drained. n4 is the node these tests drain.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from marduk_slurm.adapters.slurm.base import InvalidSlurmArgument
from marduk_slurm.adapters.slurm.commands import CommandsBackend, SlurmCommandRunner

from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401  (fixture)

pytestmark = pytest.mark.slurm


@pytest.fixture
async def backend(slurm_cluster: SlurmCluster) -> AsyncIterator[CommandsBackend]:  # noqa: F811
    runner = SlurmCommandRunner(timeout_s=15, slurm_conf=slurm_cluster.slurm_conf)
    backend = CommandsBackend(runner)
    yield backend
    await runner.run(["scontrol", "update", "nodename=n4", "state=resume"], check=False)


async def scontrol(backend: CommandsBackend, *args: str) -> str:
    result = await backend.runner.run(["scontrol", *args], check=False)
    return result.stdout + result.stderr


async def test_node_name_with_leading_dash_never_reaches_scontrol_as_option(
        backend: CommandsBackend) -> None:
    # Unprotected, scontrol reads the name as its option and prints its help.
    assert "Valid <OPTION> values" in await scontrol(backend, "show", "-o", "node", "--help")
    before = backend.stats()["calls"]
    for call in (lambda: backend.drain(["--help"], "x"), lambda: backend.resume(["-n4"]),
                 lambda: backend.down(["n4", "-o"], "x")):
        with pytest.raises(InvalidSlurmArgument, match="starts with '-'"):
            await call()
    assert backend.stats()["calls"] == before  # refused before any command ran
    # Reads leave such a name out, and the names they send sit after `--`.
    assert [n.name for n in await backend.get_nodes(["--help", "n4"])] == ["n4"]
    answer = await scontrol(backend, "show", "-o", "node", "--", "--help")
    assert "Valid <OPTION>" not in answer and "not found" in answer


async def test_drain_reason_with_newline_parses_on_real_cluster(
        backend: CommandsBackend) -> None:
    # Set by someone with plain scontrol: marduk itself never sends a line break.
    await backend.runner.run(["scontrol", "update", "nodename=n4", "state=drain",
                              "reason=a\nb"])
    (node,) = await backend.get_nodes(["n4"])
    listed = {n.name: n for n in await backend.list_nodes()}
    assert node.state.is_drained() or node.state.is_draining()
    assert (node.reason, node.reason_user) == ("a\nb", "root")
    assert (listed["n4"].reason, listed["n4"].reason_user) == ("a\nb", "root")


async def test_marduk_reason_reaches_slurm_as_one_printable_line(
        backend: CommandsBackend) -> None:
    await backend.drain(["n4"], "marduk: xid 79\nsee ticket\x1b[31m")
    (node,) = await backend.get_nodes(["n4"])
    assert node.reason == "marduk: xid 79 / see ticket\\x1b[31m"
    text = await scontrol(backend, "show", "-o", "node", "n4")
    assert text.count("\n") == 1 and "\x1b" not in text
    await backend.resume(["n4"])
    for _ in range(50):
        (node,) = await backend.get_nodes(["n4"])
        if not node.reason:
            break
        await asyncio.sleep(0.1)
    assert not node.reason
