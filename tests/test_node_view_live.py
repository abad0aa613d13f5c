"""The node view an operator reads is Slurm's, fresh: right after a drain or resume made with
marduk, and within one reconcile pass after one made outside marduk (plain scontrol), which
also enters the history as its own kind with the user Slurm names.

Against the real controller and the real local Slurm cluster (only n4 is drained here, and it
is left resumed).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess

from harness import ControllerProcess, cli_json, run_cli, wait_for
from slurm_fixtures import SlurmCluster, slurm_cluster  # noqa: F401

NODE = "n4"


def scontrol(conf: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *argv], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SLURM_CONF": conf}, check=True)


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster) -> Iterator[SlurmCluster]:  # noqa: F811
    yield slurm_cluster
    subprocess.run(["scontrol", "update", f"nodename={NODE}", "state=resume"],
                   capture_output=True, env={**os.environ, "SLURM_CONF": slurm_cluster.slurm_conf})


def controller(tmp_path: Path, nats: NatsServerProcess, cluster: SlurmCluster,
               reconcile_s: float) -> ControllerProcess:
    env = {"MARDUK_SLURM_CONF": cluster.slurm_conf, "MARDUK_SLURM_COMMAND_TIMEOUT_S": "5"}
    return ControllerProcess(tmp_path / "state", nats.url, slurm_backend="commands",
                             extra_env=env, reconcile_s=reconcile_s).start()


def node_row(url: str) -> dict[str, Any]:
    rows = cli_json("nodes", NODE, "--nats-url", url)
    assert len(rows) == 1
    return rows[0]


def history(url: str) -> list[dict[str, Any]]:
    return cli_json("history", "--node", NODE, "--nats-url", url)


def reconcile_passes(url: str) -> int:
    return int(cli_json("status", "--nats-url", url)["counters"].get("reconciles", 0))


def one_full_pass(url: str) -> None:
    """Wait until a reconcile pass has run from start to end after this call: the second
    pass counted from now began after it."""
    start = reconcile_passes(url)
    wait_for(lambda: reconcile_passes(url) >= start + 2, timeout_s=60, what="two passes")


@pytest.mark.slurm
def test_view_is_fresh_right_after_marduk_drain_and_resume(
        tmp_path: Path, nats_server: NatsServerProcess, cluster: SlurmCluster) -> None:
    # No reconcile pass in this test's lifetime: only the command itself can freshen the view.
    ctl = controller(tmp_path, nats_server, cluster, reconcile_s=3600)
    try:
        assert node_row(ctl.url)["state"] == "IDLE"
        proc = run_cli("drain", NODE, "reason=view check", "--nats-url", ctl.url)
        assert proc.returncode == 0 and f"{NODE}: drain done" in proc.stdout, proc.stderr
        row = node_row(ctl.url)
        assert row["state"] == "IDLE+DRAIN" and row["flags"] == ["DRAIN"], row
        assert row["drained_by_marduk"] and row["reason"].startswith("marduk: view check")
        # Slurm's own record of who set the reason, read back after the call.
        assert row["reason_user"] == "root"
        proc = run_cli("resume", NODE, "--nats-url", ctl.url)
        assert proc.returncode == 0 and f"{NODE}: resume done" in proc.stdout, proc.stderr
        row = node_row(ctl.url)
        # Slurm may add NOT_RESPONDING for a moment after a resume; no drain is left.
        assert row["state"].split("+")[0] == "IDLE" and "DRAIN" not in row["state"], row
        assert "DRAIN" not in row["flags"] and row["reason"] == "", row
        assert not row["drained_by_marduk"]
        kinds = [e["kind"] for e in history(ctl.url)]
        assert "foreign_drain" not in kinds and "foreign_resume" not in kinds, kinds
    finally:
        assert ctl.stop() == 0, ctl.log()


@pytest.mark.slurm
def test_drain_and_resume_outside_marduk_show_within_one_reconcile(
        tmp_path: Path, nats_server: NatsServerProcess, cluster: SlurmCluster) -> None:
    ctl = controller(tmp_path, nats_server, cluster, reconcile_s=1.0)
    conf = cluster.slurm_conf
    try:
        assert "DRAIN" not in node_row(ctl.url)["flags"]
        scontrol(conf, "update", f"nodename={NODE}", "state=drain", "reason=fan noise, RMA 77")
        one_full_pass(ctl.url)
        row = node_row(ctl.url)
        assert (row["state"], row["reason"], row["reason_user"]) == (
            "IDLE+DRAIN", "fan noise, RMA 77", "root"), row
        assert not row["drained_by_marduk"]
        [drain] = [e for e in history(ctl.url) if e["kind"] == "foreign_drain"]
        assert (drain["source"], drain["reason"]) == ("root", "fan noise, RMA 77")
        # Seen again on every later pass, recorded once.
        one_full_pass(ctl.url)
        assert [e["kind"] for e in history(ctl.url)].count("foreign_drain") == 1
        # marduk refuses to lift someone else's drain, naming who set it.
        proc = run_cli("resume", NODE, "--nats-url", ctl.url)
        assert proc.returncode != 0 and "drained by root" in proc.stderr, proc.stderr
        scontrol(conf, "update", f"nodename={NODE}", "state=resume")
        one_full_pass(ctl.url)
        row = node_row(ctl.url)
        assert "DRAIN" not in row["state"] and "DRAIN" not in row["flags"], row
        assert row["reason"] == "", row
        kinds = [e["kind"] for e in history(ctl.url)]
        assert kinds.count("foreign_resume") == 1, kinds
    finally:
        assert ctl.stop() == 0, ctl.log()
