"""slurmctld stopped while a GPU fault asks for a drain (used by tests/test_chaos.py; needs the
real local Slurm cluster of tests/slurm_fixtures.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction

from harness import ControllerProcess, publish_durable, wait_for
from slurm_fixtures import SlurmCluster

NODE = "n4"


def _scontrol(conf: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "SLURM_CONF": conf})


def _drained(conf: str) -> bool:
    out = _scontrol(conf, "show", "-o", "node", NODE).stdout
    return "State=" in out and "DRAIN" in out.split("State=", 1)[1].split()[0]


def poll(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    """The first true value of `predicate` within `timeout_s`, else its last value: unlike
    harness.wait_for, not reaching it is a figure to report, not an error here."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def drain_after_slurmctld_returns(tmp_path: Path, nats_server: NatsServerProcess,
                                  cluster: SlurmCluster) -> dict[str, Any]:
    conf = cluster.slurm_conf
    env = {"MARDUK_SLURM_CONF": conf, "MARDUK_SLURM_COMMAND_TIMEOUT_S": "3",
           "MARDUK_CONTROLLER_OUTBOX_RETRY_MAX_S": "2"}
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, slurm_backend="commands",
                            extra_env=env).start()
    try:
        os.kill(int((cluster.base / "run" / "slurmctld.pid").read_text()), signal.SIGTERM)
        wait_for(lambda: _scontrol(conf, "ping").returncode != 0, what="slurmctld down")
        down = time.monotonic()
        verdict = m.Verdict(node=NODE, gpu_uuid="GPU-n4-0", gpu_index=0,
                            action=GpuAction.DRAIN_NODE, reason="xid 79", xid=79,
                            ts=time.time())
        asyncio.run(publish_durable(ctl.url, [(subjects.node_event(NODE, "verdict"),
                                               m.encode(verdict))]))
        wait_for(lambda: ctl.request("status")["counters"].get("slurm_retries"), 30, 0.2,
                 "a failed drain attempt, to be retried")
        time.sleep(3.0)  # a short outage
        # `up` also waits for the slurmds; the clock starts when slurmctld answers a ping.
        starting = threading.Thread(target=cluster.up, daemon=True)
        starting.start()
        wait_for(lambda: _scontrol(conf, "ping").returncode == 0, 120, 0.05, "slurmctld up")
        back = time.monotonic()
        retries = ctl.request("status")["counters"].get("slurm_retries", 0)
        drained = poll(lambda: _drained(conf), 60)
        drained_at = time.monotonic()
        starting.join(120)
        # The outbox confirms a drain after Slurm shows it; what is still pending once it
        # had time to is a drain the controller does not know it made.
        status = poll(lambda: (s := ctl.request("status"))["outbox_pending"] == 0 and s, 30)
        status = status or ctl.request("status")
        return {
            "slurmctld down, s": f"{back - down:.2f}",
            "failed Slurm attempts while down": retries,
            "slurmctld back to node drained, s": f"{drained_at - back:.2f}" if drained
                                                 else "never",
            "outbox pending afterwards": status["outbox_pending"],
            "drained after the outage": drained,
        }
    finally:
        assert ctl.stop() == 0, ctl.log()
        subprocess.run(["bash", str(cluster.script), "up"], capture_output=True, timeout=120)
        _scontrol(conf, "update", f"nodename={NODE}", "state=resume")
