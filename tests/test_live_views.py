"""Ended jobs leave the live views: once a job's steps end, its replicas, step rate and
straggler numbers are gone from `marduk top`, `marduk straggler show` and /metrics, with no
further heartbeat to trigger it. Against a real controller on a real NATS server."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from typing import Any

import pytest

from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from harness import ControllerProcess, cli_json, publish_core, publish_durable, run_cli, wait_for

JOB = 4242
NODE = "n1"
REPLICAS = [f"job{JOB}_rg{g}:abc" for g in range(3)]




def metrics(base: str) -> str:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def top(url: str) -> dict[str, Any]:
    data: dict[str, Any] = cli_json("top", "--once", "--nats-url", url)
    return data


def start_job(url: str) -> None:
    asyncio.run(publish_durable(url, [
        (subjects.node_event(NODE, "step_start"),
         m.encode(m.StepStart(job_id=JOB, step_id=0, node=NODE))),
        *[(subjects.job_event(JOB, "replica_register"),
           m.encode(m.ReplicaRegister(replica_id=r, job_id=JOB, step_id=0, replica_group=g,
                                      node=NODE)))
          for g, r in enumerate(REPLICAS)]]))


def beat(url: str, steps: range, t0: float) -> None:
    """Every replica steps in lockstep, 10 steps per second on the sender's clock."""
    beats = [m.Heartbeat(replica_id=r, job_id=JOB, step=s, step_time_ms=100.0,
                         allreduce_ms=10.0, participants=3, ts=t0 + s * 0.1)
             for s in steps for r in REPLICAS]
    asyncio.run(publish_core(url, [(subjects.heartbeat(JOB), m.encode(b)) for b in beats]))


def test_an_ended_job_leaves_top_stragglers_and_metrics(
        web_controller: tuple[ControllerProcess, str]) -> None:
    ctl, base = web_controller
    start_job(ctl.url)
    wait_for(lambda: len(top(ctl.url)["replicas"]) == 3, what="three replicas")
    t0 = time.time() - 5.0
    for first in range(1, 40, 10):  # a few flushes' worth, so every replica has samples
        beat(ctl.url, range(first, first + 10), t0)
        time.sleep(0.1)
    rates = wait_for(lambda: (r := top(ctl.url)["job_rates"]).get(str(JOB)) and r,
                     what="the job's step rate")
    assert rates[str(JOB)] == pytest.approx(10.0, rel=0.05)
    show = cli_json("straggler", "show", str(JOB), "--nats-url", ctl.url)
    assert show["stats"]["replicas"] == 3 and len(show["replicas"]) == 3
    assert f'marduk_job_step_rate{{job="{JOB}"}}' in metrics(base)

    # The job completes: its step ends; no heartbeat comes after that.
    asyncio.run(publish_durable(ctl.url, [(subjects.node_event(NODE, "step_end"), m.encode(
        m.StepEnd(job_id=JOB, step_id=0, node=NODE, exit_status=0)))]))
    wait_for(lambda: not top(ctl.url)["job_rates"], timeout_s=30,
             what="the ended job's rate to leave top")
    view = top(ctl.url)
    assert view["replicas"] == [] and view["status"]["stragglers"] == 0
    proc = run_cli("straggler", "show", str(JOB), "--nats-url", ctl.url)
    assert proc.returncode != 0 and "no heartbeats" in proc.stderr, proc.stdout
    text = metrics(base)
    assert f'job="{JOB}"' not in text, [ln for ln in text.splitlines() if str(JOB) in ln]
