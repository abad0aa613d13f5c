"""A commanded leave behind the lighthouse liveness proxy, with real replica groups: two
processes training with ManagerMarduk on CPU (Gloo), a real `torchft_lighthouse` with a short
heartbeat timeout behind `marduk lighthouse-proxy` with a ten-minute one, a real nats-server
and controller.

The lighthouse's join timeout is ten minutes too, so the survivor can form a quorum without
the leaver (within this test's guard) only if the lighthouse sees the leaver's heartbeats
stop, which the proxy allows only because the leaver was told to leave.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torchft",
                    reason="torchft is not importable (pip install marduk-slurm[runtime])")
pytest.importorskip("grpc", reason="grpcio is not importable")

from marduk_slurm.domain.exit_codes import EXIT_LEAVE

from harness import ControllerProcess, wait_for
from runtime_worker import (
    Lighthouse,
    LighthouseProxyProcess,
    WorkerProcess,
    lighthouse_heartbeats,
    send_leave,
)

pytestmark = [pytest.mark.torch, pytest.mark.slow]
JOB = 5151
TEN_MINUTES_MS = 600_000


@pytest.fixture
def proxied(tmp_path: Path, controller: ControllerProcess
            ) -> Iterator[tuple[Lighthouse, LighthouseProxyProcess]]:
    lh = Lighthouse(tmp_path / "lighthouse.log", heartbeat_timeout_ms=300,
                    join_timeout_ms=TEN_MINUTES_MS)
    proxy = LighthouseProxyProcess(lh, tmp_path / "proxy.log", long_timeout_ms=TEN_MINUTES_MS,
                                   job_id=JOB, nats_url=controller.url)
    yield lh, proxy
    assert proxy.stop() == 0, (tmp_path / "proxy.log").read_text()
    lh.stop()


def test_the_survivor_forms_its_quorum_without_the_group_told_to_leave(
        tmp_path: Path, controller: ControllerProcess,
        proxied: tuple[Lighthouse, LighthouseProxyProcess]) -> None:
    lh, proxy = proxied
    env = {"MARDUK_NATS_URL": controller.url, "MARDUK_JOB_ID": str(JOB), "STEP_SLEEP_S": "0.05"}
    ws = [WorkerProcess(g, proxy, tmp_path, {**env, "MARDUK_NODE": f"n{g}"}) for g in (0, 1)]
    try:
        wait_for(lambda: all(w.steps() and w.steps()[-1]["np"] == 2 for w in ws), 180, 0.1,
                 "both groups in one quorum")
        wait_for(lambda: proxy.stats()["nats_connected"], 30, 0.1, "the proxy on NATS")
        leaver = ws[1].events("ready")[0]["replica_id"]
        survivor = ws[0].events("ready")[0]["replica_id"]
        assert sorted(proxy.stats()["relaying"]) == sorted([leaver, survivor])
        send_leave(controller.url, JOB, leaver, 1, "gpu fault")
        assert ws[1].wait(60) == EXIT_LEAVE, ws[1].tail()
        mark = ws[0].last_step()
        alone = wait_for(lambda: [r for r in ws[0].steps()
                                  if r["step"] > mark and r["committed"] and r["np"] == 1],
                         120, 0.1, "the survivor committing alone")
        assert alone, ws[0].tail()
        stats = proxy.stats()
        assert stats["leave_applied"] == 1 and stats["leave_from_nats"] >= 1, stats
        assert stats["relaying"] == [survivor], stats
        seen = lighthouse_heartbeats(lh.port)
        assert seen[leaver][1], f"the leaver is still healthy at the lighthouse: {seen}"
        assert not seen[survivor][1], seen
        assert stats["malformed"] == 0 and stats["upstream_errors"] == 0, stats
    finally:
        for w in ws:
            w.stop()
