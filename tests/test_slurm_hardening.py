"""What may reach Slurm, and what Slurm may print back, without a crash (no cluster needed).

Garbage output comes from a fake `scontrol`/`sinfo` script on PATH (the real ones cannot be
made to print it); what depends on real Slurm is in test_slurm_hardening_live.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import stat
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.slurm import parse
from marduk_slurm.adapters.slurm.base import InvalidSlurmArgument, SlurmNode
from marduk_slurm.adapters.slurm.commands import CommandsBackend, SlurmCommandRunner
from marduk_slurm.adapters.slurm.pyslurm_backend import PyslurmBackend
from marduk_slurm.adapters.store import Store
from marduk_slurm.cli.commands import parse_scontrol_args
from marduk_slurm.controller.context import Context, StoreRunner
from marduk_slurm.controller.decisions import Policy
from marduk_slurm.controller.outbox import OutboxWorker
from marduk_slurm.controller.reconcile import Reconciler
from marduk_slurm.domain import hostlist
from marduk_slurm.domain.slurm_names import (
    MAX_NODE_NAME_LEN,
    check_node_name,
    sanitize_reason,
)
from marduk_slurm.errors import SlurmError

from fakes import fake_pyslurm

DATA = Path(__file__).parent / "data" / "slurm"


# -- node names and reasons (domain) -----------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("--help", "starts with '-'"),
        ("-n1", "starts with '-'"),
        ("n 1", "contains ' '"),
        ("n1\n", "contains '\\\\n'"),
        ("n1,n2", "contains ','"),
        ("n\x00", "contains"),
        ("_n1", "start with a letter or digit"),
        ("", "empty"),
        ("n" * (MAX_NODE_NAME_LEN + 1), "longer than"),
    ],
)
def test_node_name_rules_refuse_what_slurm_would_misread(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_node_name(name)


@pytest.mark.parametrize("name", ["n1", "gpu-01.rack3", "node_7", "N" * MAX_NODE_NAME_LEN])
def test_node_name_rules_accept_real_names(name: str) -> None:
    assert check_node_name(name) == name


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("swap GPU\nticket 42", "swap GPU / ticket 42"),
        ("a\r\nb\rc\x0bd\u2028e", "a / b / c / d / e"),
        ("bell\x07 esc\x1b[31m", "bell\\x07 esc\\x1b[31m"),
        ("  tab\there  ", "tab here"),
        ("\n\n", ""),
    ],
)
def test_reason_is_sanitised_to_one_printable_line(text: str, line: str) -> None:
    assert sanitize_reason(text) == line


def test_reason_longer_than_the_cap_is_cut_visibly() -> None:
    line = sanitize_reason("x" * 1000, max_len=50)
    assert len(line) == 50 and line.endswith("...")


# -- hostlists ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["r[1-999999]n[1-999999]", "n[1-999999]",
                                  "a[1-400]b[1-400]", "n[1-60000],m[1-60000]"])
def test_hostlist_product_over_cap_rejected_before_expansion(text: str) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 100000 names"):
            hostlist.expand(text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # `n[1-999999]` used to build every name first (a ~2 s stall, or memory exhausted).
    assert peak < 100_000, f"{peak} bytes allocated: names were built before the check"


def test_hostlist_count_is_the_product_summed() -> None:
    assert hostlist.count("r[1-2]n[1-3],login,x[01-10]") == 2 * 3 + 1 + 10
    assert len(hostlist.expand("n[1-100000]")) == 100_000  # a whole large cluster still fits


def test_cli_rejects_hostlist_product_before_expanding_it() -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 100000 names"):
            parse_scontrol_args(["r[1-999999]n[1-999999]", "reason=x"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100_000, f"{peak} bytes allocated: names were built before the check"


# -- recorded and garbage output ---------------------------------------------------------


def test_drain_reason_with_newline_parses_from_recorded_output() -> None:
    """Recorded on Slurm 22.05 after `scontrol update nodename=n4 state=drain
    reason="$(printf 'a\\nb')"`: `show -o` prints `Reason=a [root@...]        b`."""
    text = {n.name: n for n in parse.parse_scontrol_nodes(
        (DATA / "scontrol_show_node_newline_reason.txt").read_text())}
    json_nodes = {n.name: n for n in parse.parse_sinfo_json(
        (DATA / "sinfo_newline_reason.json").read_text())}
    assert sorted(text) == sorted(json_nodes) == ["n1", "n2", "n3", "n4"]
    assert (text["n4"].reason, text["n4"].reason_user) == ("a\nb", "root")
    assert text["n4"].reason == json_nodes["n4"].reason
    assert text["n4"].state.is_drained()


def test_record_continuation_line_folds_into_the_reason() -> None:
    text = ("NodeName=n3 State=IDLE+DRAIN Reason=one [root@2026-12-02T00:43:15]\n"
            "       two\rthree\n"
            "NodeName=n4 State=IDLE\n")
    n3, n4 = parse.parse_scontrol_nodes(text)
    assert (n3.name, n3.reason, n3.reason_user) == ("n3", "one\ntwo\rthree", "root")
    assert (n4.name, n4.reason) == ("n4", "")


GARBAGE_SCONTROL = [
    "Segmentation fault\n",  # no record at all
    "NodeName=n1 State=IDLE\nNodeName=n1 State=IDLE\n",  # a reason forging a record
    "NodeName=n1 State=NOT_A_STATE\n",
    "NodeName= State=IDLE\n",
    "NodeName=n1 State=IDLE Gres=gpu:99999999999999\n",
    "NodeName=n1 State=IDLE CPUTot=99999999999999999999999\n",
    "JobId=1 JobState=RUNNING NodeList=n[1-99999999]\n",
    "JobId=99999999999999 JobState=RUNNING\n",
    "JobId=1 JobState=RUNNING NodeList=n1 Nodes=n1 GRES=gpu:2(IDX:0-999999999)\n",
    "StepId=x.0 State=RUNNING\n",
    "StepId=1.0 State=RUNNING NodeList=n[1-\n",
]
GARBAGE_SINFO = [
    "not json",
    "[]",
    '{"nodes": {"n1": {}}}',
    '{"nodes": [5]}',
    '{"nodes": [{"state": "idle"}]}',
    '{"nodes": [{"name": "n1", "state": "idle", "reason": 7}]}',
    '{"nodes": [{"name": "n1", "state": "idle", "cpus": 1e300}]}',
    '{"nodes": [{"name": "n1", "state": "idle", "reason": "r", "reason_changed_at": 1e300}]}',
    '{"nodes": [{"name": "n1", "state": "idle", "partitions": [1]}]}',
    '{"nodes": [], "errors": "boom"}',
    "[" * 100_000,
]


def fake_command(bin_dir: Path, name: str, stdout: str) -> None:
    (bin_dir / f"{name}.out").write_text(stdout)
    script = bin_dir / name
    script.write_text(f"#!/bin/sh\nexec /bin/cat '{bin_dir / name}.out'\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


@pytest.fixture
def garbage_backend(tmp_path: Path) -> Iterator[tuple[CommandsBackend, Path]]:
    runner = SlurmCommandRunner(timeout_s=10, base_env={"PATH": str(tmp_path)})
    yield CommandsBackend(runner), tmp_path


@pytest.mark.parametrize("stdout", GARBAGE_SCONTROL)
async def test_unparseable_scontrol_output_is_a_failed_call_not_a_crash(
        garbage_backend: tuple[CommandsBackend, Path], stdout: str) -> None:
    backend, bin_dir = garbage_backend
    fake_command(bin_dir, "scontrol", stdout)
    fake_command(bin_dir, "sinfo", '{"nodes": []}')
    raised = 0
    for call in (backend.list_jobs, backend.list_steps, lambda: backend.get_nodes(["n1"])):
        try:
            await call()  # anything but SlurmError escaping fails the test
        except SlurmError as err:
            assert "not understood" in str(err) or "twice" in str(err)
            raised += 1
    assert raised >= 1, f"{stdout!r} parsed as if it were Slurm's output"
    assert backend.stats().get("failures.scontrol", 0) == raised


@pytest.mark.parametrize("stdout", GARBAGE_SINFO)
async def test_unparseable_sinfo_output_is_a_failed_call_not_a_crash(
        garbage_backend: tuple[CommandsBackend, Path], stdout: str) -> None:
    backend, bin_dir = garbage_backend
    fake_command(bin_dir, "sinfo", stdout)
    with pytest.raises(SlurmError, match=r"not JSON|not understood|not a list|JSON object"):
        await backend.list_nodes()
    assert backend.stats()["failures.sinfo"] == 1


# -- the pyslurm backend -----------------------------------------------------------------


@pytest.fixture
def pyslurm_backend() -> Iterator[PyslurmBackend]:
    fake_pyslurm.reset()
    backend = PyslurmBackend(timeout_s=2, module=fake_pyslurm)
    yield backend
    fake_pyslurm.block.set()
    backend.close()


async def test_pyslurm_refuses_bad_node_names_before_any_call(
        pyslurm_backend: PyslurmBackend) -> None:
    for bad in (["--help"], ["n1", "-n2"], ["n 1"]):
        with pytest.raises(InvalidSlurmArgument, match="node name"):
            await pyslurm_backend.drain(bad, "xid 79")
        with pytest.raises(InvalidSlurmArgument, match="node name"):
            await pyslurm_backend.resume(bad)
    assert fake_pyslurm.calls == []


async def test_pyslurm_reason_goes_out_as_one_line(pyslurm_backend: PyslurmBackend) -> None:
    await pyslurm_backend.down(["n1"], "gpu lost\nsee ticket\x1b")
    assert fake_pyslurm.calls == [
        ("Nodes.modify", (["n1"], {"state": "DOWN", "reason": "gpu lost / see ticket\\x1b"}))
    ]


async def test_pyslurm_object_of_unexpected_shape_is_a_failed_call(
        pyslurm_backend: PyslurmBackend) -> None:
    fake_pyslurm.nodes["n1"] = fake_pyslurm.FakeNode(name="n1", state="NOT_A_STATE")
    with pytest.raises(SlurmError, match="list_nodes"):
        await pyslurm_backend.list_nodes()
    assert pyslurm_backend.stats()["failures.list_nodes"] == 1


# -- the controller's callers ------------------------------------------------------------


class NullBus:
    async def publish(self, subject: str, data: bytes) -> None:
        return None


@pytest.fixture
async def ctx(tmp_path: Path) -> AsyncIterator[Context]:
    store = Store(tmp_path / "state.db")
    store.migrate()
    runner = StoreRunner(store)
    yield Context(runner, NullBus(), Policy())  # type: ignore[arg-type]
    runner.close()


class ExplodingSlurm:
    """A backend whose calls raise what no backend should, to prove the callers survive."""

    name = "exploding"
    lists_steps = True

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def get_nodes(self, names: Sequence[str]) -> list[SlurmNode]:
        raise self.error

    async def list_nodes(self) -> list[SlurmNode]:
        raise self.error

    async def drain(self, nodes: Sequence[str], reason: str) -> None:
        raise self.error

    async def resume(self, nodes: Sequence[str]) -> None:
        raise self.error


def pending(ctx: Context) -> list[dict[str, Any]]:
    return list(ctx.db.store.db.query("SELECT * FROM outbox"))


@pytest.mark.parametrize("error", [KeyError("NodeName"), RuntimeError("bug"), ValueError("x")])
async def test_outbox_survives_any_exception_from_slurm_and_retries_with_backoff(
        ctx: Context, error: Exception) -> None:
    now = time.time()
    await ctx.db.tx(lambda s: [s.enqueue_slurm_action("drain", "n1", "marduk: x", None, now),
                               s.enqueue_slurm_action("resume", "n2", "", None, now)])
    worker = OutboxWorker(ctx, ExplodingSlurm(error), retry_max_s=5)  # type: ignore[arg-type]
    assert await worker.run_once() == 2
    rows = pending(ctx)
    assert [(r["state"], r["attempts"]) for r in rows] == [("pending", 1), ("pending", 1)]
    assert all(now < r["next_attempt_at"] <= time.time() + 0.5 for r in rows)
    assert all(type(error).__name__ in r["last_error"] for r in rows)
    assert (ctx.stats["slurm_retries"], ctx.stats["slurm_unexpected_errors"]) == (2, 2)


async def test_outbox_retries_drains_when_slurm_output_does_not_parse(ctx: Context) -> None:
    """The read before a drain failing (garbage output) must not drop or fail the drain."""
    now = time.time()
    await ctx.db.tx(lambda s: s.enqueue_slurm_action("drain", "n1", "marduk: x", None, now))
    error = SlurmError("scontrol show node: output not understood")
    worker = OutboxWorker(ctx, ExplodingSlurm(error))  # type: ignore[arg-type]
    await worker.run_once()
    (row,) = pending(ctx)
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 1, str(error))
    assert ctx.stats["slurm_retries"] == 1


async def test_outbox_bad_node_name_fails_only_that_action(
        ctx: Context, pyslurm_backend: PyslurmBackend) -> None:
    now = time.time()
    await ctx.db.tx(lambda s: [s.enqueue_slurm_action("drain", node, "marduk: x", None, now)
                               for node in ("n1", "--help", "n2")])
    worker = OutboxWorker(ctx, pyslurm_backend)
    await worker.run_once()
    states = {r["node"]: r["state"] for r in pending(ctx)}
    assert states == {"n1": "done", "--help": "failed", "n2": "done"}
    modified = [arg[0] for name, arg in fake_pyslurm.calls if name == "Nodes.modify"]
    assert ["--help"] not in modified and ["n1"] in modified and ["n2"] in modified


async def test_outbox_loop_outlives_a_failed_pass(ctx: Context) -> None:
    worker = OutboxWorker(ctx, ExplodingSlurm(RuntimeError()),  # type: ignore[arg-type]
                          retry_max_s=0.05)
    passes = 0

    async def flaky_pass() -> int:
        nonlocal passes
        passes += 1
        if passes == 1:
            raise sqlite3.OperationalError("database is locked")
        if passes == 3:
            raise asyncio.CancelledError  # ends the test's loop the way shutdown does
        ctx.outbox_kick.set()  # no waiting for the next pass
        return 0

    worker.run_once = flaky_pass  # type: ignore[method-assign]
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(worker.run(), timeout=5)
    assert passes == 3 and ctx.stats["outbox_errors"] == 1


async def test_outbox_records_the_reason_slurm_was_given(
        ctx: Context, pyslurm_backend: PyslurmBackend) -> None:
    now = time.time()
    await ctx.db.tx(lambda s: s.enqueue_slurm_action("drain", "n1", "marduk: a\nb", None, now))
    await OutboxWorker(ctx, pyslurm_backend).run_once()
    (_, (_, changes)), = [c for c in fake_pyslurm.calls if c[0] == "Nodes.modify"]
    drained = list(ctx.db.store.db.query("SELECT reason FROM events WHERE kind='drained'"))
    assert changes["reason"] == drained[0]["reason"] == "marduk: a / b"


async def test_reconcile_survives_any_exception_from_slurm(ctx: Context) -> None:
    reconciler = Reconciler(ctx, ExplodingSlurm(ValueError("bad")),  # type: ignore[arg-type]
                            interval_s=1)
    assert await reconciler.reconcile_once() is False
    assert ctx.stats["reconcile_failures"] == 1
    assert ctx.stats["reconcile_unexpected_errors"] == 1
    assert "ValueError" in reconciler.last_error

