"""The write lane's order: a fault's decision (urgent) runs before heartbeat write-behind
(background) already waiting, first come first served within a priority; a call whose caller
gave up before it started does not run; shutdown runs what is queued."""

from __future__ import annotations

import threading

from marduk_slurm.controller.context import BACKGROUND, URGENT, PriorityWriter


def test_urgent_calls_overtake_queued_background_ones() -> None:
    lane = PriorityWriter("test-writer")
    release, order = threading.Event(), []
    running = lane.submit(BACKGROUND, release.wait, 10)  # the writer is busy with a chunk
    queued = [lane.submit(BACKGROUND, order.append, f"heartbeats {k}") for k in range(3)]
    cancelled = lane.submit(BACKGROUND, order.append, "given up")
    assert cancelled.cancel()
    urgent = [lane.submit(URGENT, order.append, f"verdict {k}") for k in range(2)]
    release.set()
    for future in (running, *queued, *urgent):
        future.result(5)
    assert order == ["verdict 0", "verdict 1", "heartbeats 0", "heartbeats 1", "heartbeats 2"]
    last = lane.submit(BACKGROUND, order.append, "last")
    lane.shutdown()
    assert last.done() and order[-1] == "last"


def test_a_failing_call_reports_its_error_and_the_lane_goes_on() -> None:
    lane = PriorityWriter("test-writer")
    failed = lane.submit(URGENT, int, "not a number")
    assert isinstance(failed.exception(5), ValueError)
    assert lane.submit(URGENT, int, "7").result(5) == 7
    lane.shutdown()
