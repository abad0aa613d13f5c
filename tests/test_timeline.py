"""The fault timeline from plain values: step rates, broken lines, marks from history events,
full strength derived from the samples; the controller's bounded step samples; and the plot
file, parsed back (SVG) or checked as a real PNG."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from marduk_slurm.controller.timeline import StepSamples, step_samples
from marduk_slurm.domain import messages as m
from marduk_slurm.domain import timeline as tl


def steady(group: int, t0: float, t1: float, *, rate: float = 20.0, quorum: int = 2,
           source: str = "", every: float = 0.25, step0: int = 0) -> list[tl.StepSample]:
    n = round((t1 - t0) / every)
    return [tl.StepSample(t0 + i * every, group, step0 + int(rate * i * every), quorum,
                          source or f"g{group}") for i in range(n + 1)]


def two_groups_one_fault(heal: bool = True) -> list[tl.StepSample]:
    """Group 0 trains throughout (alone from 105 to 110); group 1 stops at 104.5 and comes
    back (a new incarnation) at 110 when `heal`."""
    samples = [*steady(0, 100, 105), *steady(0, 105.25, 110, quorum=1, step0=105),
               *steady(0, 110.25, 120, step0=200), *steady(1, 100, 104.5, source="old")]
    if heal:
        samples += steady(1, 110.25, 120, source="new", step0=200)
    return samples


FAULT = tl.Mark(104.6, tl.FAULT, "fault: XID 79 on n2", 1)


def test_step_rate_is_steps_over_the_window() -> None:
    [series] = tl.group_series(steady(0, 0, 10, rate=8.0), window_s=2.0)
    [segment] = series.segments
    assert len(segment) == 40  # the first sample has no rate
    assert all(p.rate == pytest.approx(8.0) for p in segment[8:])


def test_a_gap_or_a_new_incarnation_breaks_the_line() -> None:
    samples = [*steady(0, 0, 5), *steady(0, 10, 15, step0=100),  # 5 s without samples
               *steady(0, 15.25, 20, source="other", step0=200)]  # another replica id
    [series] = tl.group_series(samples, gap_s=3.0)
    assert len(series.segments) == 3
    # No rate across the gap: a line from step 100 at 5 s to 10 s would read 20 steps/s.
    assert all(p.t < 5.1 or p.t > 10.1 for seg in series.segments for p in seg)


def test_samples_and_marks_out_of_order_give_the_same_timeline() -> None:
    samples = two_groups_one_fault()
    marks = [FAULT, tl.Mark(105.0, tl.LEAVE, "group 1 left", 1),
             tl.Mark(104.7, tl.DRAIN, "n2 drained")]
    forward = tl.build_timeline(samples, marks)
    backward = tl.build_timeline(list(reversed(samples)), list(reversed(marks)))
    assert forward == backward
    assert [mk.kind for mk in forward.marks] == ["fault", "drain", "leave", "heal"]


def test_full_strength_is_the_first_full_quorum_after_the_dip() -> None:
    timeline = tl.build_timeline(two_groups_one_fault(), [FAULT])
    [heal] = timeline.marks_of(tl.HEAL)
    assert heal.t == pytest.approx(110.25)  # group 0 at 2 again, group 1 back
    assert timeline.full_quorum == 2
    assert timeline.missing == ("drain", "leave", "replace")


def test_a_group_that_never_heals_has_no_heal_mark_and_says_so() -> None:
    timeline = tl.build_timeline(two_groups_one_fault(heal=False), [FAULT])
    assert timeline.marks_of(tl.HEAL) == []
    assert "heal" in timeline.missing
    # The survivor's own quorum back at 2 (another group, unseen) is not full strength:
    # the group that reported before the fault never reported again.
    assert timeline.groups[0].segments[-1][-1].quorum == 2


def test_without_a_fault_nothing_is_missing() -> None:
    timeline = tl.build_timeline(steady(0, 0, 5), [])
    assert timeline.marks == () and timeline.missing == ()


def test_marks_from_history() -> None:
    groups = {"job5_rg1:old": 1, "job5_rg1:new": 1}
    events = [  # out of order on purpose
        {"id": 6, "ts": 110.0, "kind": "replica_register", "node": "n3",
         "replica_id": "job5_rg1:new", "evidence": {}},
        {"id": 1, "ts": 104.6, "kind": "gpu_verdict", "node": "n2", "xid": 79,
         "action": "drain_node", "evidence": {}},
        {"id": 0, "ts": 50.0, "kind": "gpu_verdict", "node": "n2", "xid": None,
         "action": "none", "evidence": {}},  # a healthy reading
        {"id": 2, "ts": 104.61, "kind": "drain_requested", "node": "n2", "evidence": {}},
        {"id": 4, "ts": 104.8, "kind": "drained", "node": "n2", "evidence": {}},
        {"id": 3, "ts": 105.0, "kind": "replica_leave", "node": "n2",
         "replica_id": "job5_rg1:old", "evidence": {"exit_code": 75}},
        {"id": 5, "ts": 20.0, "kind": "replica_register", "node": "n2",
         "replica_id": "job5_rg1:old", "evidence": {}},  # the first start: no respawn
    ]
    marks = tl.marks_from_history(events, groups)
    assert [(mk.kind, mk.label) for mk in marks] == [
        ("fault", "fault: XID 79 on n2"), ("drain", "n2 drained"),
        ("leave", "group 1 left (told to)"), ("replace", "group 1 respawned on n3")]
    assumed = tl.marks_from_history([{"ts": 1.0, "kind": "standby_assumed",
                                      "replica_id": "job5_standby0:x",
                                      "evidence": {"replica_group": 1}}], {})
    assert [(mk.kind, mk.group) for mk in assumed] == [("replace", 1)]
    # A drain Slurm never confirmed stays as queued.
    queued = tl.marks_from_history([events[3]], groups)
    assert [mk.label for mk in queued] == ["drain of n2 queued"]


def test_json_round_trip_and_thinning() -> None:
    timeline = tl.build_timeline(two_groups_one_fault(), [FAULT])
    assert tl.from_json(tl.to_json(timeline)).marks == timeline.marks
    thinned = tl.thin(timeline, 20)
    assert sum(g.points() for g in thinned.groups) <= 30
    assert sum(g.points() for g in timeline.groups) > 60
    with pytest.raises(ValueError, match="not a timeline"):
        tl.from_json({"groups": [{"group": "x"}]})


def test_non_finite_times_are_left_out() -> None:
    samples = [*steady(0, 0, 2), tl.StepSample(math.nan, 0, 5, 2), tl.StepSample(math.inf, 0,
                                                                                  9, 2)]
    timeline = tl.build_timeline(samples, [tl.Mark(math.nan, tl.FAULT, "x")])
    assert timeline.end == pytest.approx(2.0) and timeline.marks == ()


# -- the controller's step samples ------------------------------------------------------------


def beat(job: int, replica: str, step: int, participants: int = 2) -> m.Heartbeat:
    return m.Heartbeat(replica_id=replica, job_id=job, step=step, participants=participants)


def test_step_samples_keep_one_per_replica_per_period_in_a_fixed_ring() -> None:
    ring = StepSamples(every_s=0.25, job_samples=1000)
    for i in range(8):  # every 0.1 s: one in three kept per replica
        ring.on_flush([beat(1, "a", i), beat(1, "b", i, participants=1)], 100.0 + i * 0.1)
    assert [(s[1], s[2], s[3]) for s in ring.samples(1, 0)] == [
        ("a", 0, 2), ("b", 0, 1), ("a", 3, 2), ("b", 3, 1), ("a", 6, 2), ("b", 6, 1)]
    assert [s[2] for s in ring.samples(1, 100.55)] == [6, 6]
    small = StepSamples(job_samples=4)  # 1 replica in 4 samples: one per 30 s (120 s)
    for i in range(6):
        small.on_flush([beat(1, "a", i)], 100.0 + 30 * i)
    assert [s[2] for s in small.samples(1, 0)] == [2, 3, 4, 5]  # the newest 4, oldest first


def test_a_large_job_is_sampled_less_often_to_span_its_history() -> None:
    ring = StepSamples(every_s=0.25, job_samples=100)
    replicas = [f"r{i}" for i in range(10)]
    for i in range(30):  # 10 replicas in 100 samples: one each per 12 s (120 s in all)
        ring.on_flush([beat(1, r, i) for r in replicas], 100.0 + i)
    assert sorted({s[0] for s in ring.samples(1, 0)}) == [100.0, 112.0, 124.0]


def test_jobs_beyond_the_rings_wait_for_a_silent_one() -> None:
    ctx = SimpleNamespace(stats=Counter())
    ring = StepSamples(ctx, max_jobs=2)  # type: ignore[arg-type]
    ring.on_flush([beat(1, "a", 1), beat(2, "b", 1)], 100.0)
    ring.on_flush([beat(3, "c", 1)], 101.0)  # both rings busy: not sampled, counted
    assert set(ring.jobs) == {1, 2} and ctx.stats["timeline_jobs_refused"] == 1
    ring.on_flush([beat(2, "b", 2)], 125.0)
    ring.on_flush([beat(3, "c", 2)], 135.0)  # job 1 silent for 35 s: its ring goes to job 3
    assert set(ring.jobs) == {2, 3} and ring.samples(1, 0) == []
    assert [s[2] for s in ring.samples(3, 0)] == [2]


def test_a_ring_knows_a_bounded_number_of_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    from marduk_slurm.controller import timeline as service

    monkeypatch.setattr(service, "MAX_REPLICAS_PER_JOB", 2)
    ctx = SimpleNamespace(stats=Counter())
    ring = StepSamples(ctx)  # type: ignore[arg-type]
    ring.on_flush([beat(1, f"r{i}", 5) for i in range(5)], 100.0)
    assert {s[1] for s in ring.samples(1, 0)} == {"r0", "r1"}
    assert ctx.stats["timeline_samples_dropped"] == 3


def test_step_samples_of_unknown_replicas_are_counted_not_drawn() -> None:
    raw = [(1.0, "job5_rg0:a", 10, 2), (1.0, "job5_standby0:x", 0, 0)]
    samples, unmapped = step_samples(raw, {"job5_rg0:a": 0})
    assert [(s.group, s.step) for s in samples] == [(0, 10)] and unmapped == 1


# -- the plot file ----------------------------------------------------------------------------

SVG = "{http://www.w3.org/2000/svg}"


def full_story() -> tl.Timeline:
    marks = [FAULT, tl.Mark(104.8, tl.DRAIN, "n2 drained"),
             tl.Mark(105.0, tl.LEAVE, "group 1 left", 1),
             tl.Mark(109.8, tl.REPLACE, "standby assumed group 1", 1)]
    return tl.build_timeline(two_groups_one_fault(), marks)


def svg_ids(path: Path) -> list[str]:
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    return [el.get("id", "") for el in root.iter() if el.get("id")]


def test_the_svg_has_each_series_and_each_mark(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="pip install 'marduk-slurm[plots]'")
    from marduk_slurm.adapters.timeline_plot import write_plot

    path = write_plot(full_story(), tmp_path / "t.svg", title="job 5")
    ids = svg_ids(path)
    series = sorted(i.rsplit("-", 1)[0] for i in ids if i.startswith("series-group-"))
    assert series == ["series-group-0", "series-group-1", "series-group-1"]  # 1 broke once
    assert len([i for i in ids if i.startswith("quorum-group-")]) == 3
    marks = sorted(i.split("-")[1] for i in ids if i.startswith("mark-") and
                   not i.endswith("-q"))
    assert marks == sorted(["fault", "drain", "leave", "replace", "heal"])
    texts = {"".join(el.itertext()).strip()
             for el in ET.parse(path).getroot().iter(f"{SVG}text")}
    for label in ("fault: XID 79 on n2", "n2 drained", "group 1 left",
                  "standby assumed group 1", "full strength (2 groups)", "group 0", "group 1"):
        assert label in texts, texts


def test_a_missing_heal_is_in_the_title_and_has_no_line(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="pip install 'marduk-slurm[plots]'")
    from marduk_slurm.adapters.timeline_plot import write_plot

    timeline = tl.build_timeline(two_groups_one_fault(heal=False), [FAULT])
    ids = svg_ids(write_plot(timeline, tmp_path / "t.svg"))
    assert not [i for i in ids if i.startswith("mark-heal")]
    texts = ["".join(el.itertext()) for el in
             ET.parse(tmp_path / "t.svg").getroot().iter(f"{SVG}text")]
    assert any("not seen: drain, leave, standby assumed / respawn, full strength" in t
               for t in texts), texts


def test_the_png_is_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="pip install 'marduk-slurm[plots]'")
    from marduk_slurm.adapters.timeline_plot import write_plot

    path = write_plot(full_story(), tmp_path / "t.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    with pytest.raises(ValueError, match=r"\.svg or \.png"):
        write_plot(full_story(), tmp_path / "t.pdf")


def test_follow_up_verdicts_and_finished_replicas_are_not_faults() -> None:
    """What the drill's controller recorded: XID 79, the same GPU lost 3 s later (a second
    verdict and a drain request of an already drained node), the group back, both groups
    ending at max_steps; then the GPU reads healthy again and faults anew."""
    gpu = "GPU-SIM-4658"
    groups = {"job1_rg1:a": 1, "job1_rg1:b": 1, "job1_rg0:c": 0}
    ev = [
        {"id": 18, "ts": 76.0, "kind": "gpu_verdict", "node": "n2", "gpu_uuid": gpu,
         "xid": 79, "action": "drain_node"},
        {"id": 20, "ts": 76.0, "kind": "drain_requested", "node": "n2"},
        {"id": 21, "ts": 76.1, "kind": "drained", "node": "n2"},
        {"id": 22, "ts": 76.1, "kind": "replica_leave", "node": "n2", "replica_id": "job1_rg1:a",
         "evidence": {"exit_code": 75}},
        {"id": 25, "ts": 78.9, "kind": "gpu_verdict", "node": "n2", "gpu_uuid": gpu,
         "xid": None, "action": "drain_node"},  # GPU is lost
        {"id": 26, "ts": 78.9, "kind": "drain_requested", "node": "n2"},
        {"id": 28, "ts": 81.3, "kind": "replica_register", "node": "n3",
         "replica_id": "job1_rg1:b"},
        {"id": 30, "ts": 84.9, "kind": "replica_leave", "node": "n3", "replica_id": "job1_rg1:b",
         "evidence": {"exit_code": 0}},
        {"id": 31, "ts": 84.9, "kind": "replica_leave", "node": "n1", "replica_id": "job1_rg0:c",
         "evidence": {"exit_code": 0}},
    ]
    marks = tl.marks_from_history(ev, groups)
    assert [(mk.kind, mk.label) for mk in marks] == [
        ("fault", "fault: XID 79 on n2"), ("drain", "n2 drained"),
        ("leave", "group 1 left (told to)"), ("replace", "group 1 respawned on n3")]
    again = [{"id": 35, "ts": 89.8, "kind": "gpu_verdict", "node": "n2", "gpu_uuid": gpu,
              "action": "none"},
             {"id": 40, "ts": 95.0, "kind": "gpu_verdict", "node": "n2", "gpu_uuid": gpu,
              "xid": 48, "action": "drain_node"}]
    faults = tl.marks_from_history(ev + again, groups)
    assert [mk.label for mk in faults if mk.kind == "fault"] == [
        "fault: XID 79 on n2", "fault: XID 48 on n2"]
    resumed = [{"id": 37, "ts": 90.0, "kind": "resumed", "node": "n2"}, again[1]]
    assert len([mk for mk in tl.marks_from_history(
        ev + resumed, groups) if mk.kind == "fault"]) == 2


def test_labels_of_marks_close_in_time_take_separate_rows() -> None:
    pytest.importorskip("matplotlib", reason="pip install 'marduk-slurm[plots]'")
    from marduk_slurm.adapters.timeline_plot import label_rows

    # 20 characters at 1% each: a label covers a fifth of the span.
    places = label_rows([(10.0, 19), (12.0, 19), (40.0, 19), (95.0, 19), (97.0, 19)],
                        0.0, 100.0, char_fraction=0.01)
    assert places == [(0, False), (1, False), (0, False), (0, True), (1, True)]


@pytest.mark.parametrize("args", [
    {}, {"job": None}, {"job": True}, {"job": -1}, {"job": 2**32 + 1}, {"job": "7; rm"},
    {"job": 1.5}, {"job": [7]}, {"job": 7, "window_s": float("nan")},
    {"job": 7, "window_s": float("inf")}, {"job": 7, "window_s": 0}, {"job": 7, "window_s": 901},
    {"job": 7, "window_s": "-1"}, {"job": 7, "window_s": {"x": 1}}, {"job": "9" * 100_000}])
async def test_the_timeline_verb_refuses_bad_arguments(args: dict[str, object]) -> None:
    from marduk_slurm.controller.timeline import TimelineService

    service = TimelineService(SimpleNamespace(stats=Counter()))  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # the RPC server answers it as "invalid"
        await service.rpc_timeline(args, "fuzz")
