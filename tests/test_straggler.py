"""Straggler statistics (domain.straggler): robust thresholds, sustain and recovery windows."""

from __future__ import annotations

import random

import pytest

from marduk_slurm.domain.straggler import (
    StragglerConfig,
    StragglerDetector,
    mad,
    median,
    percentile,
    suggest_torchft_timeouts,
)

JOB = 7


def test_robust_statistics() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([]) == 0.0
    assert mad([1.0, 2.0, 3.0, 4.0, 100.0]) == 1.0  # the wild value does not move it
    assert percentile(range(1, 101), 99) == 99 and percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        StragglerConfig(factor=0.5)
    with pytest.raises(ValueError):
        StragglerConfig(min_replicas=2)


def lockstep(det: StragglerDetector, step: int, now: float, work: dict[str, float],
             jitter: random.Random | None = None) -> list[tuple[str, bool]]:
    """One synchronous step: every replica's step time is the slowest work plus a little;
    the others wait the difference in the allreduce."""
    noisy = {r: w * (1 + jitter.gauss(0, 0.1)) if jitter else w for r, w in work.items()}
    step_ms = max(noisy.values()) + 5.0
    for replica, own in noisy.items():
        det.observe(replica, JOB, step, step_ms, step_ms - own, now, now)
    return [(c.replica_id, c.flagged) for c in det.evaluate(JOB, now)]


def run(det: StragglerDetector, work: dict[str, float], steps: range, dt: float = 0.5,
        jitter: random.Random | None = None) -> list[tuple[float, str, bool]]:
    out = []
    for step in steps:
        now = step * dt
        out += [(now, r, f) for r, f in lockstep(det, step, now, work, jitter)]
    return out


def test_a_slow_replica_in_lockstep_is_flagged_after_the_sustain_window_and_cleared() -> None:
    det = StragglerDetector(StragglerConfig(sustain_s=3.0))
    fast = {f"r{i}": 100.0 for i in range(4)}
    assert run(det, fast, range(1, 20)) == []
    slow = {**fast, "r3": 400.0}
    changes = run(det, slow, range(20, 40))
    assert [(r, f) for _, r, f in changes] == [("r3", True)]
    flagged_at = changes[0][0]
    # The smoothed value needs 3 of 5 slow samples (1 s), then 3 s sustained.
    assert 3.0 <= flagged_at - 20 * 0.5 <= 5.0
    assert det.flagged() == {"r3"}
    stats = det.stats(JOB)
    assert stats is not None and stats.median_work_ms == pytest.approx(100.0)
    # The step time is the same for everyone: only the work tells.
    assert stats.median_step_ms == pytest.approx(405.0)
    changes = run(det, fast, range(40, 60))
    assert [(r, f) for _, r, f in changes] == [("r3", False)]
    assert det.flagged() == set()


def test_a_short_slowdown_is_not_a_straggler() -> None:
    det = StragglerDetector(StragglerConfig(sustain_s=3.0))
    fast = {f"r{i}": 100.0 for i in range(4)}
    run(det, fast, range(1, 10))
    assert run(det, {**fast, "r1": 500.0}, range(10, 14)) == []  # 2 s of slow steps
    assert run(det, fast, range(14, 30)) == []


def test_noise_alone_flags_nothing() -> None:
    det = StragglerDetector(StragglerConfig())
    rng = random.Random(1)
    work = {f"r{i}": 200.0 for i in range(8)}
    assert run(det, work, range(1, 2000), jitter=rng) == []


def test_two_replicas_are_too_few_to_judge() -> None:
    det = StragglerDetector(StragglerConfig(sustain_s=0.0))
    assert run(det, {"a": 100.0, "b": 1000.0}, range(1, 20)) == []
    stats = det.stats(JOB)
    assert stats is not None and stats.replicas == 2 and stats.threshold_ms == 0.0


def test_tiny_steps_need_an_absolute_excess() -> None:
    det = StragglerDetector(StragglerConfig(sustain_s=0.0, min_excess_ms=10.0))
    assert run(det, {"a": 1.0, "b": 1.0, "c": 1.0, "d": 5.0}, range(1, 20)) == []


def test_repeated_or_empty_beats_are_not_new_samples() -> None:
    det = StragglerDetector()
    assert det.observe("a", JOB, 5, 100.0, 10.0, 1.0, 1.0)
    assert not det.observe("a", JOB, 5, 100.0, 10.0, 1.1, 1.1)  # the same step again
    assert not det.observe("a", JOB, 6, 0.0, 0.0, 1.2, 1.2)  # no timing yet
    assert det.observe("a", JOB, 7, 100.0, 10.0, 1.5, 1.5)
    assert det.tracks["a"].step_rate() == pytest.approx(4.0)


def test_a_flagged_replica_that_goes_silent_is_cleared_as_gone() -> None:
    det = StragglerDetector(StragglerConfig(sustain_s=0.0, stale_s=10.0))
    fast = {f"r{i}": 100.0 for i in range(3)}
    run(det, {**fast, "slow": 900.0}, range(1, 10))
    assert det.flagged() == {"slow"}
    for step in range(10, 40):  # only the fast ones keep beating
        run(det, fast, range(step, step + 1))
    changes = det.prune(40 * 0.5)
    assert [(c.replica_id, c.flagged, c.reason) for c in changes] == [
        ("slow", False, "gone: no heartbeat")]
    assert "slow" not in det.tracks


def test_replicas_that_left_the_mapping_are_forgotten_with_their_job_rate() -> None:
    det = StragglerDetector(StragglerConfig(sustain_s=0.0))
    fast = {f"r{i}": 100.0 for i in range(3)}
    run(det, {**fast, "slow": 900.0}, range(1, 10))  # steps at t=0.5 .. 4.5
    assert det.flagged() == {"slow"} and det.stats(JOB) is not None
    det.observe("late", JOB + 1, 1, 50.0, 5.0, 6.0, 6.0)  # first heard of after the check
    changes = det.retain({"r0"}, checked_at=5.0)
    assert [(c.replica_id, c.flagged, c.reason) for c in changes] == [
        ("slow", False, "gone: left the mapping")]
    assert set(det.tracks) == {"r0", "late"}
    changes = det.retain(set(), checked_at=6.5)  # the job ended: nothing of it is left
    assert changes == [] and det.tracks == {} and det.jobs() == []
    assert det.stats(JOB) is None


def test_timeout_suggestions_scale_with_p99_and_have_floors() -> None:
    small = {s.name: s.seconds for s in suggest_torchft_timeouts(50.0)}
    big = {s.name: s.seconds for s in suggest_torchft_timeouts(20_000.0)}
    assert small == {"Manager(timeout=)": 10.0, "Manager(quorum_timeout=)": 30.0,
                     "torchft_lighthouse heartbeat timeout": 1.0}
    assert big["Manager(timeout=)"] == 200.0 and big["Manager(quorum_timeout=)"] == 400.0


def test_timeout_policy_targets_follow_p99_within_bounds_and_ignore_noise() -> None:
    from marduk_slurm.domain.straggler import TimeoutPolicy

    policy = TimeoutPolicy(k=10, floor_s=1, ceiling_s=100)
    assert policy.target(300) == {"timeout": 3.0, "quorum_timeout": 6.0}
    assert policy.target(1) == {"timeout": 1.0, "quorum_timeout": 3.0}  # the floors
    assert policy.target(60_000) == {"timeout": 100.0, "quorum_timeout": 100.0}  # ceiling
    assert policy.changes({}, 300) == {"timeout": 3.0, "quorum_timeout": 6.0}
    assert policy.changes({"timeout": 3.0, "quorum_timeout": 6.0}, 330) == {}  # +10%: noise
    assert policy.changes({"timeout": 3.0, "quorum_timeout": 6.0}, 600) == {
        "timeout": 6.0, "quorum_timeout": 12.0}
    for bad in ({"k": 0}, {"k": -1}, {"k": float("nan")}, {"floor_s": float("inf")},
                {"k": True}, {"k": "10"}, {"ceiling_s": 10**6}, {"floor_s": 10, "ceiling_s": 20},
                {"k": 10**4}):
        with pytest.raises(ValueError):
            TimeoutPolicy(**bad)  # type: ignore[arg-type]
