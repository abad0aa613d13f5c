"""Predictive drains from GPU risk, against a real controller: verdict evidence from the
history and the agents' health summaries on marduk.v1.health.<node>."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction

from harness import ControllerProcess, cli_json, publish_core, publish_durable, run_cli, wait_for


def watch_verdict(sbe: int, xid: int | None) -> tuple[str, bytes]:
    msg = m.Verdict(node="n1", gpu_uuid="GPU-n1-0", gpu_index=0, action=GpuAction.WATCH,
                    reason="high single-bit ECC error rate", xid=xid, ts=time.time(),
                    evidence={"ecc": {"sbe_aggregate": sbe}, "xids": [xid] if xid else []})
    return subjects.node_event("n1", "verdict"), m.encode(msg)


def test_a_rising_risk_drains_its_node_once(tmp_path: Path,
                                           nats_server: NatsServerProcess) -> None:
    ctl = ControllerProcess(tmp_path / "state", nats_server.url, extra_env={
        "MARDUK_CONTROLLER_HTTP_LISTEN": "", "MARDUK_CONTROLLER_RISK_DRAIN_THRESHOLD": "60"},
    ).start()
    try:
        summary = {"v": 1, "type": "node_health", "node": "n1", "ts": time.time(),
                   "gpus": [{"uuid": "GPU-n1-0", "index": 0, "action": "watch",
                             "reason": "clocks throttled: hw_thermal_slowdown"}]}
        asyncio.run(publish_core(ctl.url, [(subjects.node_health("n1"),
                                            json.dumps(summary).encode())] * 3))
        asyncio.run(publish_durable(ctl.url, [watch_verdict(0, None)]))
        risk = wait_for(lambda: (r := cli_json("risk", "--nats-url", ctl.url)) and r[0]["score"]
                        and r, what="a risk score")
        assert risk[0]["score"] == 15  # throttled in every poll
        asyncio.run(publish_durable(ctl.url, [watch_verdict(150, 92)] * 2))
        history = wait_for(lambda: [e for e in cli_json("history", "--nats-url", ctl.url)
                                    if e["kind"] in ("risk_drain", "drain_requested")],
                           15, 0.2, "a predictive drain")
        drain = next(e for e in history if e["kind"] == "risk_drain")
        assert drain["node"] == "n1" and drain["gpu_uuid"] == "GPU-n1-0"
        factors = {f["name"] for f in drain["evidence"]["factors"]}
        assert factors == {"corrected_ecc_growth", "thermal_throttling", "recent_xids"}
        time.sleep(6)  # the next scoring pass must not drain again
        kinds = [e["kind"] for e in cli_json("history", "--nats-url", ctl.url)]
        assert kinds.count("risk_drain") == 1 and kinds.count("drain_requested") == 1

        # A resume keeps the evidence: the score and its factors are still there...
        before = cli_json("risk", "--nats-url", ctl.url)[0]
        run_cli("resume", "n1", "--force", "--nats-url", ctl.url)
        wait_for(lambda: any(e["kind"] in ("resumed", "operator_resume")
                             for e in cli_json("history", "--nats-url", ctl.url)),
                 what="the resume on record")
        time.sleep(6)  # a scoring pass after the resume
        after = cli_json("risk", "--nats-url", ctl.url)
        assert [(r["score"], r["factors"]) for r in after] == [(before["score"],
                                                                  before["factors"])]
        assert before["score"] >= 60
        # ...but it already had its say: no drain until new evidence arrives.
        kinds = [e["kind"] for e in cli_json("history", "--nats-url", ctl.url)]
        assert kinds.count("risk_drain") == 1
        asyncio.run(publish_durable(ctl.url, [watch_verdict(150, 92), watch_verdict(400, 92),
                                              watch_verdict(700, 94)]))
        again = wait_for(lambda: [e for e in cli_json("history", "--nats-url", ctl.url)
                                  if e["kind"] == "risk_drain"][1:], 15, 0.2,
                         "a drain on evidence that came after the resume")
        assert {f["name"] for f in again[0]["evidence"]["factors"]} == {
            "corrected_ecc_growth", "recent_xids"}
    finally:
        assert ctl.stop() == 0, ctl.log()
