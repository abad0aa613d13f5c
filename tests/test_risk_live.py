"""Predictive drains from GPU risk, against a real controller: verdict evidence from the
history and the agents' health summaries on marduk.v1.health.<node>."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from marduk_slurm.adapters.nats_server import NatsServerProcess
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import subjects
from marduk_slurm.domain.gpu_health import GpuAction

from agent_fixtures import AgentProcess
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


# -- fed by a real agent --------------------------------------------------------------------

DRIVEN_NVML = Path(__file__).parent / "fakes" / "driven_nvml"
SBE_VOL, DBE_VOL, SBE_AGG, DBE_AGG, RETIRED_SBE = 3, 4, 5, 6, 29  # NVML field ids


def gpu_risk(url: str, uuid: str) -> dict[str, Any] | None:
    return next((r for r in cli_json("risk", "--nats-url", url) if r["gpu_uuid"] == uuid), None)


def drive(state: Path, gpu0: dict[str, Any]) -> None:
    """Change GPU 0 of the driven NVML (written whole, then renamed: never half read)."""
    tmp = state.with_suffix(".tmp")
    tmp.write_text(json.dumps({"0": gpu0}))
    tmp.replace(state)


def test_counter_growth_seen_by_a_real_agent_raises_the_score(
        tmp_path: Path, controller: ControllerProcess) -> None:
    state = tmp_path / "nvml-state.json"
    agent = AgentProcess(tmp_path, controller.url, node="n1", gpus=0, poll_interval_s=0.3)
    agent.env.update(PYTHONPATH=os.pathsep.join([str(DRIVEN_NVML),
                                                 agent.env.get("PYTHONPATH", "")]),
                     MARDUK_TEST_NVML_STATE=str(state))
    gpu0, gpu1 = "GPU-driven-0000", "GPU-driven-0001"
    drive(state, {"fields": {str(RETIRED_SBE): 0}})  # a GPU that reports retired pages
    try:
        agent.start()
        first = wait_for(lambda: gpu_risk(controller.url, gpu0), what="the GPU in the scores")
        assert first["score"] == 0 and first["node"] == "n1"
        # The counters grow; the verdict ("none") does not change, so no verdict is sent:
        # only the health summaries can tell.
        drive(state, {"fields": {str(SBE_VOL): 5000, str(SBE_AGG): 5000,
                                 str(RETIRED_SBE): 40}})
        risk = wait_for(lambda: (r := gpu_risk(controller.url, gpu0)) and r["score"] >= 55
                        and r, what="the score to rise")
        factors = {f["name"]: (f["points"], f["detail"]) for f in risk["factors"]}
        assert factors == {
            "corrected_ecc_growth": (30, "+5000 corrected ECC errors (0 -> 5000)"),
            "retired_pages": (15, "40 retired pages"),
            "retired_pages_growth": (10, "+40 retired pages (0 -> 40)")}, factors
        verdicts = [e for e in cli_json("history", "--node", "n1", "--nats-url", controller.url)
                    if e["kind"] == "gpu_verdict" and e["gpu_uuid"] == gpu0]
        assert [v["action"] for v in verdicts] == ["none"], verdicts  # the first reading only
        # Uncorrected errors and a memory XID: the XID reaches the controller twice (in the
        # verdict it causes and in the summary's XID counts) and counts once.
        drive(state, {"fields": {str(SBE_VOL): 5000, str(SBE_AGG): 5000, str(RETIRED_SBE): 40,
                                 str(DBE_VOL): 2, str(DBE_AGG): 2}, "xids": [48]})
        risk = wait_for(lambda: (r := gpu_risk(controller.url, gpu0))
                        and {"uncorrected_ecc_growth", "recent_xids"}
                        <= {f["name"] for f in r["factors"]} and r, what="DBE and XID factors")
        factors = {f["name"]: (f["points"], f["detail"]) for f in risk["factors"]}
        assert factors["uncorrected_ecc_growth"] == (25, "+2 uncorrected ECC errors (0 -> 2)")
        assert factors["recent_xids"] == (15, "xids 48")
        assert risk["score"] == 95
        other = gpu_risk(controller.url, gpu1)
        assert other is not None and other["score"] == 0, other
    finally:
        assert agent.stop() == 0, agent.log()
