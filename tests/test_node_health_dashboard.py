"""A port verdict on the controller's HTTP side: the JSON API, /metrics, and the dashboard page
in headless Chromium (the verdict in the history with its target, the port under its node)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from typing import Any

import pytest

from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects

from browser import Browser, find_chromium
from harness import ControllerProcess, publish_durable, wait_for


def api(base: str, path: str) -> Any:
    with urllib.request.urlopen(base + path, timeout=10) as resp:
        return json.loads(resp.read())


def port_down(url: str) -> None:
    """What the agent of n1 publishes when its IB port goes down (agent/node_watch.py)."""
    msg = m.NodeVerdict(node="n1", component="port", target="mlx5_0/1", action="drain_node",
                        reason="port mlx5_0/1 state DOWN (not ACTIVE)", ts=time.time(),
                        evidence={"component": "port", "target": "mlx5_0/1",
                                  "state": "DOWN", "findings": [
                                      {"action": "drain_node", "code": "state",
                                       "reason": "port mlx5_0/1 state DOWN (not ACTIVE)"}]})
    asyncio.run(publish_durable(url, [(subjects.node_event("n1", "node_verdict"),
                                       m.encode(msg))]))


def test_a_port_verdict_reaches_the_api_metrics_and_the_page(
        web_controller: tuple[ControllerProcess, str]) -> None:
    ctl, base = web_controller
    chromium = find_chromium()
    browser = Browser(chromium, base + "/") if chromium else None
    try:
        if browser is not None:
            browser.wait("document.querySelector('#conn').textContent === 'live'",
                         what="the event stream")
        port_down(ctl.url)
        nodes = wait_for(lambda: (n := api(base, "/api/nodes")) and n[0]["drain_pending"] and n,
                         what="a queued drain of n1")
        assert nodes[0]["drain_pending"]["reason"].startswith("marduk: port=mlx5_0/1 state")
        assert [(c["component"], c["target"], c["health"]) for c in nodes[0]["components"]] \
            == [("port", "mlx5_0/1", "drain_node")]
        history = api(base, "/api/history?kind=port_verdict")
        assert [(e["kind"], e["evidence"]["target"]) for e in history] == [
            ("port_verdict", "mlx5_0/1")]
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        assert 'marduk_component_faults_total{action="drain_node",component="port"} 1.0' \
            in metrics
        if browser is None:
            pytest.skip("chromium is not installed (apt-get install -y chromium): the API "
                        "and metrics were checked, the page was not")
        browser.wait("!!document.querySelector('#history tr[data-kind=\"port_verdict\"]')",
                     what="the verdict in the history")
        row = browser.evaluate(
            "document.querySelector('#history tr[data-kind=\"port_verdict\"]').innerText")
        assert "mlx5_0/1" in row and "state DOWN" in row
        browser.wait("document.querySelector('#mapping').textContent.includes('mlx5_0/1')",
                     what="the port under its node")
        mapping = browser.evaluate("document.querySelector('#mapping').innerText")
        assert "port mlx5_0/1 drain_node" in mapping
    finally:
        if browser is not None:
            browser.close()
