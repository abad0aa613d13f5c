"""The controller's HTTP side against a real controller: JSON API, /metrics, `marduk top`, and
the dashboard page itself in headless Chromium (live updates over server-sent events)."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction

from browser import Browser, artifacts_dir, find_chromium
from harness import ControllerProcess, publish_core, publish_durable, run_cli, wait_for

JOB = 777




def get(url: str, headers: dict[str, str] | None = None, method: str = "GET"
        ) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def seed(url: str) -> None:
    """Node n1 with two GPUs and a replica of job 777 on GPU 0, heartbeating."""
    gpus = [m.GpuDescriptor(uuid=f"GPU-n1-{i}", index=i, name="sim") for i in range(2)]
    register = m.ReplicaRegister(replica_id=f"job{JOB}_rg0:abc", job_id=JOB, step_id=0,
                                 replica_group=0, node="n1", gpu_uuids=["GPU-n1-0"], step=5)
    asyncio.run(publish_durable(url, [
        (subjects.node_event("n1", "gpu_inventory"),
         m.encode(m.GpuInventory(node="n1", gpus=gpus, simulated=True))),
        (subjects.job_event(JOB, "replica_register"), m.encode(register)),
    ]))
    beats = [m.Heartbeat(replica_id=register.replica_id, job_id=JOB, step=s, step_time_ms=100.0,
                         allreduce_ms=20.0, participants=1, ts=time.time())
             for s in range(6, 9)]
    asyncio.run(publish_core(url, [(subjects.heartbeat(JOB), m.encode(b)) for b in beats]))


def fault(url: str, xid: int = 79) -> None:
    verdict = m.Verdict(node="n1", gpu_uuid="GPU-n1-0", gpu_index=0, action=GpuAction.DRAIN_NODE,
                        reason=f"xid {xid}: GPU has fallen off the bus", xid=xid,
                        ts=time.time(), evidence={"xids": [xid], "ecc": {"sbe_aggregate": 4}})
    asyncio.run(publish_durable(url, [(subjects.node_event("n1", "verdict"),
                                       m.encode(verdict))]))


def api(base: str, path: str) -> Any:
    import json
    status, body = get(base + path)
    assert status == 200, body
    return json.loads(body)


def test_api_and_metrics_show_the_mapping_a_fault_and_a_queued_drain(
        web_controller: tuple[ControllerProcess, str]) -> None:
    ctl, base = web_controller
    seed(ctl.url)
    wait_for(lambda: (page := api(base, "/api/replicas")["items"]) and page[0]["last_step"] >= 8,
             what="the replica's heartbeats")
    fault(ctl.url)
    nodes = wait_for(lambda: (n := api(base, "/api/nodes")) and n[0]["drain_pending"] and n,
                     what="a queued drain of n1")
    assert nodes[0]["drain_pending"]["reason"].startswith("marduk: xid=79 gpu=GPU-n1-0")
    # The verdict's XID is risk evidence, taken from the feed just after the commit.
    wait_for(lambda: api(base, "/api/nodes")[0]["gpus"][0]["risk"] == 10, what="a risk score")
    history = api(base, f"/api/history?node=n1&job=&since={time.time() - 60}")
    kinds = [e["kind"] for e in history]
    assert "gpu_verdict" in kinds and "drain_requested" in kinds
    assert [e["kind"] for e in api(base, "/api/history?kind=gpu_verdict")] == ["gpu_verdict"]

    status, text = get(base + "/metrics")
    assert status == 200
    for line in ('marduk_gpu_faults_total{action="drain_node",xid="79"} 1.0',
                 'marduk_outbox_pending{kind="drain"} 1.0', "marduk_nats_connected 1.0",
                 'marduk_events_total{kind="drain_requested"} 1.0'):
        assert line in text, line
    assert 'marduk_replicas{job="777",state="leaving"} 1.0' in text  # told to leave
    assert "marduk_heartbeat_ingest_lag_seconds_count" in text
    assert 'marduk_gpu_risk_score{gpu="GPU-n1-0",node="n1"}' in text

    # Read-only, and only for loopback Host names (no DNS rebinding).
    assert get(base + "/api/status", method="POST")[0] == 403  # no operator token set up
    assert get(base + "/api/status", headers={"Host": "evil.example:80"})[0] == 421
    assert get(base + "/api/history?job=x")[0] == 400
    page = get(base + "/")[1]
    assert 'id="rejected"' in page and 'id="rejected-summary"' in page

    proc = run_cli("top", "--once", "--nats-url", ctl.url)
    assert proc.returncode == 0, proc.stderr
    assert f"job{JOB}_rg0:abc" in proc.stdout and "n1" in proc.stdout
    assert "queued" in proc.stdout  # the drain Slurm has not confirmed (no Slurm here)
    proc = run_cli("nodes", "--nats-url", ctl.url)
    assert proc.returncode == 0 and "RISK" in proc.stdout, proc.stderr


def test_dashboard_page_follows_faults_and_drains_live(
        web_controller: tuple[ControllerProcess, str]) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    ctl, base = web_controller
    seed(ctl.url)
    browser = Browser(chromium, base + "/")
    try:
        browser.wait("document.querySelector('#conn').textContent === 'live'",
                     what="the event stream")
        browser.wait("document.querySelector('#mapping').textContent.includes('GPU-n1-0')",
                     what="the DR mapping")
        browser.wait(f"document.querySelector('#replicas').textContent.includes('job{JOB}_rg0')",
                     what="the replica row")
        browser.wait("document.querySelector('#rejected-summary').textContent"
                     ".includes('rejected')", what="the rejected-input panel")
        browser.evaluate("window.__notReloaded = true")
        fault(ctl.url)
        browser.wait("!!document.querySelector('#history tr[data-kind=\"gpu_verdict\"]')",
                     what="the fault in the history")
        browser.wait("!!document.querySelector('#drained tr[data-node=\"n1\"]')",
                     what="n1 in the drained nodes")
        assert browser.evaluate("window.__notReloaded === true"), "the page reloaded"
        text = browser.evaluate("document.body.innerText")
        assert "drain queued" in text and "xid 79" in text
        time.sleep(1.5)  # one replica tick and the fade of the fresh rows
        shot = browser.screenshot(artifacts_dir() / "dashboard.png")
        print(f"\ndashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000
    finally:
        browser.close()


def test_the_grafana_dashboard_uses_only_metrics_the_controller_exports(
        web_controller: tuple[ControllerProcess, str]) -> None:
    import re
    _, base = web_controller
    exported = get(base + "/metrics")[1]
    grafana = (Path(__file__).resolve().parent.parent / "docs" / "grafana-marduk.json")
    used = set(re.findall(r"marduk_[a-z_]+", grafana.read_text())) - {"marduk_slurm"}
    missing = sorted(name for name in used if f"\n{name}" not in exported
                     and f"# TYPE {name}" not in exported)
    assert not missing, missing


def test_changes_over_http_need_the_operator_token(
        web_controller: tuple[ControllerProcess, str], tmp_path: Path) -> None:
    ctl, base = web_controller
    status, body = get(base + "/api/status", method="POST")
    assert status == 403 and "no operator token" in body  # none configured: changes are off
    token_file = tmp_path / "state" / "auth" / "http-token"
    token_file.parent.mkdir(exist_ok=True)
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    assert get(base + "/api/status", method="POST")[0] == 401
    assert get(base + "/api/status", {"Authorization": "Bearer wrong"}, "POST")[0] == 401
    # The right token gets past the guard (there is no such endpoint: 405, not 401).
    assert get(base + "/api/status", {"Authorization": "Bearer s3cret-token"}, "POST")[0] == 405
    assert get(base + "/api/status")[0] == 200  # reads need no token
    assert "s3cret-token" not in ctl.log()


def test_the_replica_table_keeps_only_the_rows_in_view(
        tmp_path: Path, nats_server: NatsServerProcess) -> None:
    from test_dashboard_stream import start

    chromium = find_chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    ctl, base = start(tmp_path, nats_server.url, 20_000)
    browser = Browser(chromium, base + "/")
    try:
        browser.wait("document.querySelector('#replicas-scroll').dataset.rows === '20000'",
                     what="20,000 replicas in the table", timeout_s=60)
        assert "20000 replicas (active 20000)" in browser.evaluate(
            "document.querySelector('#replicas-summary').textContent")
        rendered = browser.evaluate("document.querySelectorAll('#replicas tr.r').length")
        assert 0 < rendered < 100, rendered
        # Scrolled to the end, the last replica in the store's order is in view.
        browser.evaluate("const box = document.querySelector('#replicas-scroll');"
                         "box.scrollTop = box.scrollHeight")
        browser.wait("document.querySelector('#replicas').textContent.includes('job199_rg99:')",
                     what="the last replica after scrolling")
        assert browser.evaluate("document.querySelectorAll('#replicas tr.r').length") < 100
        shot = browser.screenshot(artifacts_dir() / "dashboard-20000-replicas.png",
                                  whole_page=False)
        print(f"\nscreenshot: {shot}")
    finally:
        browser.close()
        assert ctl.stop() == 0, ctl.log()
