"""The fault timeline on a real controller fed over a real NATS: two replica groups heartbeat,
a GPU fault sends one away, it comes back on another node. The controller's answer (HTTP and
the `timeline` verb through `marduk timeline`), its bad queries, the plot file, and the
dashboard drawing it in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction

from browser import Browser, find_chromium
from harness import ControllerProcess, http_get, publish_core, publish_durable, run_cli, wait_for

JOB = 778
OLD, SURVIVOR, NEW = f"job{JOB}_rg0:old", f"job{JOB}_rg1:b", f"job{JOB}_rg0:new"






def api(base: str, path: str) -> Any:
    status, body = http_get(base + path)
    assert status == 200, body
    return json.loads(body)


def durable(url: str, *items: tuple[str, m.Message]) -> None:
    asyncio.run(publish_durable(url, [(s, m.encode(msg)) for s, msg in items]))


def register(replica: str, group: int, node: str) -> tuple[str, m.Message]:
    return (subjects.job_event(JOB, "replica_register"),
            m.ReplicaRegister(replica_id=replica, job_id=JOB, replica_group=group, node=node,
                              gpu_uuids=[f"GPU-{node}-0"], step=0))


def beats(url: str, replicas: dict[str, int], step: int, rounds: int) -> int:
    """`rounds` heartbeats of each replica (id -> participants), 0.3 s apart: the controller
    keeps one sample per replica per 0.25 s. Returns the next step."""
    for _ in range(rounds):
        step += 5
        asyncio.run(publish_core(url, [(subjects.heartbeat(JOB), m.encode(m.Heartbeat(
            replica_id=r, job_id=JOB, step=step, step_time_ms=60.0, participants=n,
            ts=time.time()))) for r, n in replicas.items()]))
        time.sleep(0.3)
    return step


def play_the_fault(url: str, base: str) -> None:
    """Group 0 on n1 and group 1 on n2 train; XID 79 on n1's GPU; group 0 leaves, group 1
    trains alone; group 0 comes back on n3 and both train at full strength."""
    inventory = [(subjects.node_event(n, "gpu_inventory"), m.GpuInventory(
        node=n, gpus=[m.GpuDescriptor(uuid=f"GPU-{n}-0", index=0)], simulated=True))
        for n in ("n1", "n2", "n3")]
    durable(url, *inventory, register(OLD, 0, "n1"), register(SURVIVOR, 1, "n2"))
    wait_for(lambda: api(base, "/api/replicas")["total"] == 2, what="two replicas")
    step = beats(url, {OLD: 2, SURVIVOR: 2}, 0, 8)
    durable(url, (subjects.node_event("n1", "verdict"), m.Verdict(
        node="n1", gpu_uuid="GPU-n1-0", gpu_index=0, action=GpuAction.DRAIN_NODE,
        reason="xid 79: GPU has fallen off the bus", xid=79, ts=time.time())))
    step = beats(url, {SURVIVOR: 2}, step, 2)  # the survivor has not noticed yet
    durable(url, (subjects.job_event(JOB, "replica_leave"), m.ReplicaLeave(
        replica_id=OLD, job_id=JOB, reason="told to leave", exit_code=75, step=step)))
    step = beats(url, {SURVIVOR: 1}, step, 6)
    durable(url, register(NEW, 0, "n3"))
    beats(url, {SURVIVOR: 2, NEW: 2}, step, 8)


def kinds(data: dict[str, Any]) -> list[str]:
    return [mk["kind"] for mk in data["marks"]]


def test_the_timeline_of_a_fault_from_heartbeats_and_history(
        web_controller: tuple[ControllerProcess, str], tmp_path: Path) -> None:
    ctl, base = web_controller
    play_the_fault(ctl.url, base)
    data = wait_for(lambda: (d := api(base, f"/api/timeline?job={JOB}&window=120"))
                    and "heal" in kinds(d) and d, what="full strength in the timeline")
    assert kinds(data) == ["fault", "drain", "leave", "replace", "heal"], data["marks"]
    assert data["missing"] == [] and data["full_quorum"] == 2
    labels = [mk["label"] for mk in data["marks"]]
    assert labels[:4] == ["fault: XID 79 on n1", "drain of n1 queued", "group 0 left (told to)",
                          "group 0 respawned on n3"]  # queued: no Slurm here
    assert [g["group"] for g in data["groups"]] == [0, 1]
    group0 = data["groups"][0]["segments"]
    assert len(group0) == 2  # two incarnations: two lines, none drawn across the gap
    survivor = [p for seg in data["groups"][1]["segments"] for p in seg]
    assert {p[2] for p in survivor} == {1, 2}  # the quorum went down and came back
    # Each sample's rate is what the beats said: 5 steps every 0.3 s or so.
    rates = [p[1] for p in survivor[3:]]
    assert min(rates) > 5 and max(rates) < 40, rates
    heal = data["marks"][-1]["t"]
    assert heal > data["marks"][3]["t"]  # after the respawn registered

    # Through the verb, with the picture.
    plot = tmp_path / "job.svg"
    proc = run_cli("timeline", str(JOB), "--window", "120", "--plot", str(plot), "--json",
                   "--nats-url", ctl.url)
    if proc.returncode == 1 and "matplotlib" in proc.stderr:
        pytest.skip("matplotlib is not installed (pip install 'marduk-slurm[plots]')")
    assert proc.returncode == 0, proc.stderr
    assert kinds(json.loads(proc.stdout))[:4] == kinds(data)[:4]
    ids = [e.get("id", "") for e in ET.parse(plot).getroot().iter()]
    assert sorted(i.split("-")[1] for i in ids if i.startswith("mark-")
                  and not i.endswith("-q")) == sorted(kinds(data))
    text = run_cli("timeline", str(JOB), "--nats-url", ctl.url)
    assert text.returncode == 0 and "group 0 respawned on n3" in text.stdout, text.stderr


def test_bad_timeline_queries_are_refused_and_counted(
        web_controller: tuple[ControllerProcess, str]) -> None:
    ctl, base = web_controller
    bad = ("", "job=", "job=-1", f"job={2**32 + 1}", "job=1e3", "job=7&job=8",
           "job=7&window=0", "job=7&window=nan", "job=7&window=1e9",
           "job=7&window=-5", "job=7&foo=1", "job=7%0a8", "job=" + "9" * 5000)
    for query in bad:
        status, body = http_get(f"{base}/api/timeline?{query}")
        assert status == 400, (query, status, body)
        assert "error" in json.loads(body)
    empty = api(base, "/api/timeline?job=4242")  # nobody's job: nothing to draw, no error
    assert empty["groups"] == [] and empty["marks"] == [] and empty["samples"] == 0
    metrics = http_get(base + "/metrics")[1]
    counted = f'marduk_controller_operations_total{{op="http_bad_query"}} {len(bad)}.0'
    assert counted in metrics, [
        line for line in metrics.splitlines() if "http_bad_query" in line]
    refused = run_cli("timeline", "x", "--nats-url", ctl.url)
    assert refused.returncode == 2 and "job" in refused.stderr
    bad_window = run_cli("timeline", "7", "--window", "1e9", "--nats-url", ctl.url)
    assert bad_window.returncode == 2
    bad_plot = run_cli("timeline", "7", "--plot", "x.pdf", "--nats-url", ctl.url)
    assert bad_plot.returncode == 2 and ".svg or .png" in bad_plot.stderr


def test_the_dashboard_draws_the_timeline(web_controller: tuple[ControllerProcess, str],
                                          tmp_path: Path) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    ctl, base = web_controller
    play_the_fault(ctl.url, base)
    wait_for(lambda: "heal" in kinds(api(base, f"/api/timeline?job={JOB}&window=120")),
             what="full strength in the timeline")
    browser = Browser(chromium, base + "/")
    try:
        browser.wait("document.querySelector('#conn').textContent === 'live'",
                     what="the event stream")
        browser.evaluate(f"document.querySelector('#timeline-form [name=job]').value = '{JOB}';"
                         "document.querySelector('#timeline-form [name=window]').value = '60';"
                         "document.querySelector('#timeline-form')"
                         ".dispatchEvent(new Event('change'))")
        browser.wait(f"document.querySelector('#timeline svg')?.dataset.job === '{JOB}' && "
                     "document.querySelectorAll('#timeline .tl-mark[data-kind=heal]')"
                     ".length === 1", what="the timeline with its full-strength mark")
        drawn = browser.evaluate(
            "(() => { const q = (s) => [...document.querySelectorAll(s)];"
            "return {series: q('#timeline path.tl-series').map((p) => p.dataset.group),"
            "quorum: q('#timeline path.tl-quorum').length,"
            "marks: q('#timeline .tl-mark').map((g) => g.dataset.kind),"
            "labels: q('#timeline .tl-label').map((t) => t.firstChild.textContent),"
            "legend: q('#timeline .tl-legend').map((t) => t.textContent),"
            "summary: document.querySelector('#timeline-summary').textContent}; })()")
        assert sorted(drawn["series"]) == ["0", "0", "1"], drawn  # group 0 came back
        assert drawn["quorum"] == 3
        assert drawn["marks"] == ["fault", "drain", "leave", "replace", "heal"], drawn
        assert "fault: XID 79 on n1" in drawn["labels"]
        assert drawn["legend"] == ["group 0", "group 1"]
        assert "not seen" not in drawn["summary"] and "1 fault(s)" in drawn["summary"]
        # Each label in its mark's colour (the page's CSS must not paint over it).
        fill = browser.evaluate("getComputedStyle(document.querySelector("
                                "'#timeline .tl-mark[data-kind=fault] text')).fill")
        assert fill == "rgb(180, 35, 24)", fill
        paths = browser.evaluate("[...document.querySelectorAll('#timeline path.tl-series')]"
                                 ".map((p) => p.getAttribute('d'))")
        assert all(d.startswith("M") and "NaN" not in d for d in paths), paths
        shot = browser.screenshot(tmp_path / "dashboard-timeline.png")
        print(f"\ndashboard timeline screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        browser.close()
