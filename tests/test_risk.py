"""GPU failure risk (domain.risk): the points table, evidence parsing, the tracker."""

from __future__ import annotations

from marduk_slurm.domain.gpu_health import FaultPolicy, GpuReading
from marduk_slurm.domain.risk import (
    Observation,
    RiskTracker,
    from_evidence,
    from_summary_gpu,
    score,
)


def evidence(**fields: object) -> dict[str, object]:
    reading = GpuReading(uuid="GPU-a", index=0, node="n1", **fields)  # type: ignore[arg-type]
    return FaultPolicy().evaluate(reading).evidence


def names(points_factors: tuple[int, tuple[object, ...]]) -> dict[str, int]:
    return {f.name: f.points for f in points_factors[1]}  # type: ignore[attr-defined]


def test_a_healthy_gpu_scores_zero() -> None:
    obs = [from_evidence(evidence(ecc_sbe_aggregate=3, retired_pages_sbe=0,
                                  retired_pages_dbe=0), ts) for ts in (1.0, 2.0, 3.0)]
    assert score(obs) == (0, ())


def test_each_trend_adds_its_points() -> None:
    obs = [
        from_evidence(evidence(ecc_sbe_aggregate=10), 1.0),
        from_evidence(evidence(ecc_sbe_aggregate=40, retired_pages_sbe=20, retired_pages_dbe=1,
                               remap_pending=True, xids=(92,),
                               throttle_reasons=frozenset({"hw_thermal_slowdown"})), 2.0),
        Observation(ts=3.0, thermal_throttled=True),
    ]
    got = names(score(obs))
    assert got == {"corrected_ecc_growth": 15, "retired_pages": 15, "remap_pending": 25,
                   "thermal_throttling": 15, "recent_xids": 15}
    assert score(obs)[0] == 85


def test_the_score_is_capped() -> None:
    obs = [from_evidence(evidence(remap_failure=True, remap_pending=True,
                                  retired_pages_pending=True, xids=(48, 95, 94)), 1.0)]
    assert score(obs)[0] == 100


def test_summary_entries_say_what_their_reason_says() -> None:
    hot = from_summary_gpu({"uuid": "GPU-a", "action": "watch",
                            "reason": "clocks throttled: hw_thermal_slowdown"}, 1.0)
    power = from_summary_gpu({"uuid": "GPU-a", "action": "watch",
                              "reason": "clocks throttled: sw_power_cap"}, 1.0)
    healthy = from_summary_gpu({"uuid": "GPU-a", "action": "none", "reason": "healthy"}, 1.0)
    remap = from_summary_gpu({"uuid": "GPU-a", "action": "reset_gpu",
                              "reason": "row remapping pending a GPU reset"}, 1.0)
    assert hot.thermal_throttled is True and power.thermal_throttled is None
    assert healthy.thermal_throttled is False and healthy.remap_pending is False
    assert remap.remap_pending is True and remap.thermal_throttled is None


def test_tracker_windows_and_keeps_a_resumed_nodes_history() -> None:
    tracker = RiskTracker(window_s=100.0)
    tracker.add_verdict("GPU-a", "n1", 0, evidence(xids=(79,)), 10.0)
    summary = {"node": "n1", "gpus": [{"uuid": "GPU-a", "index": 0, "action": "watch",
                                       "reason": "clocks throttled: hw_slowdown"}]}
    for ts in (20.0, 21.0, 22.0):
        tracker.add_summary("n1", summary, ts)
    [now] = tracker.scores(50.0)
    assert now.node == "n1" and now.index == 0 and now.score == 25  # xid 10 + thermal 15
    [later] = tracker.scores(115.0)  # the XID left the window, the polls did not
    assert later.score == 15
    tracker.mark_resumed("n1", 60.0)
    tracker.mark_resumed("n1", 30.0)  # an older resume, replayed late, moves nothing back
    # The history stays (and decays by the window); only evidence after the resume counts
    # towards draining the node again.
    [kept] = tracker.scores(115.0)
    assert (kept.score, [f.name for f in kept.factors]) == (15, ["thermal_throttling"])
    [fresh] = tracker.scores(115.0, since_resume=True)
    assert (fresh.score, fresh.factors) == (0, ())
    tracker.add_verdict("GPU-a", "n1", 0, evidence(xids=(79,)), 70.0)
    [fresh] = tracker.scores(115.0, since_resume=True)
    assert fresh.score == 10 and [f.name for f in fresh.factors] == ["recent_xids"]
    assert tracker.scores(115.0)[0].score == 25


def test_summary_counters_score_their_growth() -> None:
    def poll(ts: float, **c: object) -> Observation:
        return from_summary_gpu({"uuid": "GPU-a", "action": "none", "counters": c}, ts)

    obs = [poll(1.0, ecc_sbe_volatile=0, ecc_sbe_aggregate=None, retired_pages_sbe=0),
           poll(2.0, ecc_sbe_volatile=4000, retired_pages_sbe=10),
           # A driver reload resets the volatile counter: what came after still counts.
           poll(3.0, ecc_sbe_volatile=1000, retired_pages_sbe=40, ecc_dbe_volatile=0),
           poll(4.0, ecc_sbe_volatile=1000, retired_pages_sbe=40, ecc_dbe_volatile=1)]
    points, factors = score(obs)
    details = {f.name: (f.points, f.detail) for f in factors}
    assert details == {
        "corrected_ecc_growth": (30, "+5000 corrected ECC errors (0 -> 1000)"),
        "uncorrected_ecc_growth": (25, "+1 uncorrected ECC errors (0 -> 1)"),
        "retired_pages": (15, "40 retired pages"),
        "retired_pages_growth": (10, "+40 retired pages (0 -> 40)")}
    assert points == 80


def test_an_xid_in_a_verdict_and_in_the_counts_counts_once() -> None:
    def poll(ts: float, counts: dict[int, int]) -> Observation:
        xids = [{"xid": x, "count": n} for x, n in counts.items()]
        return from_summary_gpu({"uuid": "GPU-a", "counters": {"xids": xids}}, ts)

    verdict = from_evidence(evidence(xids=(48,)), 2.5)
    obs = [poll(1.0, {}), poll(2.0, {48: 1}), verdict, poll(3.0, {48: 1, 13: 2}),
           poll(4.0, {48: 1, 13: 2})]
    _, factors = score(obs)
    assert [(f.name, f.points, f.detail) for f in factors] == [
        ("recent_xids", 35, "xids 13 x2, 48")]


def test_a_scoring_pass_reuses_a_score_only_while_its_evidence_is_unchanged() -> None:
    """The tracker keeps each GPU's last score until something is added or an observation
    leaves the window; at every moment its scores equal a fresh tracker's, fed the same."""
    feed: list[tuple[str, int, float]] = []  # (gpu, xid, ts)
    live = RiskTracker(window_s=100.0)

    def add(tracker: RiskTracker, gpu: str, xid: int, ts: float) -> None:
        tracker.add_verdict(gpu, "n1", int(gpu[-1]), evidence(xids=(xid,)), ts)

    for ts, gpu, xid in [(1.0, "GPU-0", 13), (5.0, "GPU-1", 48), (40.0, "GPU-0", 79),
                         (90.0, "GPU-1", 13), (95.0, "GPU-2", 31)]:
        feed.append((gpu, xid, ts))
        add(live, gpu, xid, ts)
    seen = set()
    for now in (96.0, 100.5, 104.0, 106.0, 139.0, 141.0, 150.0, 189.0, 191.0, 196.0):
        if now == 150.0:  # late evidence, stamped in the past, still in the window
            feed.append(("GPU-2", 79, 120.0))
            add(live, "GPU-2", 79, 120.0)
        if now == 141.0:
            live.mark_resumed("n1", 125.0)
        fresh = RiskTracker(window_s=100.0)
        for gpu, xid, ts in feed:
            add(fresh, gpu, xid, ts)
        if now >= 141.0:
            fresh.mark_resumed("n1", 125.0)
        got = [(s.gpu_uuid, s.score, s.factors) for s in live.scores(now)]
        assert got == [(s.gpu_uuid, s.score, s.factors) for s in fresh.scores(now)], now
        assert ([(s.gpu_uuid, s.score) for s in live.scores(now, since_resume=True)]
                == [(s.gpu_uuid, s.score) for s in fresh.scores(now, since_resume=True)]), now
        seen.add(tuple(score for _, score, _ in got))
    assert len(seen) >= 4  # the window moved past evidence several times


def test_a_page_of_nodes_gets_the_scores_of_its_own_nodes() -> None:
    from marduk_slurm.controller.risk_watch import RiskWatch

    watch = RiskWatch(None, lambda: None)  # type: ignore[arg-type]
    names = [f"n{i:03d}" for i in range(100)]
    scored = names[::7] + names[40:46]
    watch.by_node = {n: {f"GPU-{n}": (10, [f"x {n}"])} for n in scored}
    watch.risk_nodes = sorted(watch.by_node)
    for size in (1, 3, 10, 100):
        for first in range(0, 100, size):
            page, after = names[first:first + size], names[first - 1] if first else ""
            got = watch.for_page(after, size)
            assert {u for n in page if n in watch.by_node for u in watch.by_node[n]} <= set(got)
            assert len(got) <= size


def test_a_pass_scores_only_what_changed_and_the_views_index_matches_a_rebuild() -> None:
    """The controller's index of scored GPUs by node is kept up to date from each pass's
    changes; after a random run of verdicts, moves and ageing it equals one built from
    every score at once."""
    import random

    from marduk_slurm.controller.risk_watch import RiskWatch
    from marduk_slurm.settings import ControllerSettings

    watch = RiskWatch(None, ControllerSettings, window_s=50.0)  # type: ignore[arg-type]
    rnd = random.Random(7)
    for uuid in ("GPU-a", "GPU-b"):
        watch.tracker.add_verdict(uuid, "n1", 0, evidence(xids=(79,)), 1.0)
    assert {s.gpu_uuid for s in watch._score(now=1.0)} == {"GPU-a", "GPU-b"}
    assert watch._score(now=1.0) == []  # nothing new: nothing scored again
    now = 1.0
    for _ in range(300):
        now += rnd.choice((0.5, 5.0))
        uuid, node = f"GPU-{rnd.randrange(20)}", f"n{rnd.randrange(6)}"
        watch._arrived.append(lambda u=uuid, n=node, t=now: watch.tracker.add_verdict(
            u, n, 0, evidence(xids=(rnd.choice((79, 48)),)), t))
        changed = watch._score(now=now)
        assert uuid in {s.gpu_uuid for s in changed}
        rebuilt: dict[str, dict[str, tuple[int, list[str]]]] = {}
        for s in watch.tracker.scores(now):
            if s.score:
                rebuilt.setdefault(s.node, {})[s.gpu_uuid] = (
                    s.score, [f.detail for f in s.factors])
        assert watch.by_node == rebuilt
        assert watch.risk_nodes == sorted(rebuilt)
    ordered = watch.tracker.ordered()
    assert ordered == sorted(ordered, key=lambda s: (s.node, s.index or 0, s.gpu_uuid))
