"""Straggler statistics: which replica of a job holds the others back, as plain values.

Replica groups of a torchft job train in lockstep: every group waits in the allreduce for the
slowest one, so their step times (commit to commit) come out equal and say nothing about who
is slow. What differs is the time a replica spends on its own work, outside the allreduce
wait: ``work_ms = step_time_ms - allreduce_ms``. The straggler has the longest work and the
shortest wait; the others wait for it. When replicas are not in lockstep (a group outside the
quorum, a heal), a slow step shows in the work time as well, so one signal serves both.

Per job, over the replicas' recent work times (each replica's own median of its last few
samples, so that one slow step is not a straggler), a replica is a *candidate* when its work
exceeds every one of: the job median plus `mad_k` robust deviations (1.4826 x MAD), `factor`
times the median, and the median plus `min_excess_ms`. A candidate for `sustain_s` is
flagged; a flagged replica whose work drops back to halfway between the median and the
threshold for `sustain_s` is cleared. Robust statistics need at least `min_replicas`
replicas: with two, the median sits halfway between them and cannot tell which is slow.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

MAD_TO_SIGMA = 1.4826  # MAD x this estimates the standard deviation of normal data


@dataclass(frozen=True)
class StragglerConfig:
    factor: float = 1.5  # work > factor x job median
    mad_k: float = 5.0  # work > median + k x 1.4826 x MAD
    min_excess_ms: float = 10.0  # work > median + this (tiny steps are not stragglers)
    sustain_s: float = 3.0  # how long a replica stays above (or back below) before it changes
    min_replicas: int = 3  # fewer replicas: no robust statistics, nothing is flagged
    smoothing: int = 5  # a replica's value: median of its last N samples
    history: int = 64  # samples kept per replica (step rate, p99)
    stale_s: float = 30.0  # a replica silent this long is forgotten

    def __post_init__(self) -> None:
        if self.factor < 1.0 or self.mad_k < 0 or self.sustain_s < 0 or self.min_excess_ms < 0:
            raise ValueError("straggler settings: factor >= 1, mad_k, sustain_s and "
                             "min_excess_ms >= 0")
        if self.min_replicas < 3 or self.smoothing < 1 or self.history < self.smoothing:
            raise ValueError("straggler settings: min_replicas >= 3, 1 <= smoothing <= history")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else 0.0


def mad(values: Sequence[float], center: float | None = None) -> float:
    """Median absolute deviation: the spread that one wild value cannot move."""
    if not values:
        return 0.0
    c = median(values) if center is None else center
    return median([abs(v - c) for v in values])


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Sample(NamedTuple):
    """One step of one replica (a tuple: tens of thousands are made per second)."""

    step: int
    ts: float  # the replica's send time
    step_time_ms: float
    allreduce_ms: float

    @property
    def work_ms(self) -> float:
        return max(0.0, self.step_time_ms - self.allreduce_ms)


@dataclass
class ReplicaTrack:
    replica_id: str
    job_id: int
    samples: deque[Sample]
    seen_at: float = 0.0  # controller time of the newest sample
    created_at: float = 0.0  # controller time of the first heartbeat
    flagged: bool = False
    flagged_at: float = 0.0
    above_since: float | None = None
    below_since: float | None = None
    # (n, attr) -> (step of the newest sample, value): a job's statistics ask for the same
    # smoothed values several times per evaluation, and most tracks have no new sample.
    _smoothed: dict[tuple[int, str], tuple[int, float]] = field(default_factory=dict)

    def smoothed(self, n: int, attr: str) -> float:
        newest = self.samples[-1].step if self.samples else -1
        cached = self._smoothed.get((n, attr))
        if cached is not None and cached[0] == newest:
            return cached[1]
        recent = list(itertools.islice(reversed(self.samples), n))
        value = median([getattr(s, attr) for s in recent])
        self._smoothed[(n, attr)] = (newest, value)
        return value

    def step_rate(self) -> float:
        """Steps per second over the kept samples (sender clock)."""
        if len(self.samples) < 2:
            return 0.0
        first, last = self.samples[0], self.samples[-1]
        span = last.ts - first.ts
        return (last.step - first.step) / span if span > 0 else 0.0


@dataclass(frozen=True)
class JobStats:
    job_id: int
    replicas: int
    median_work_ms: float
    mad_work_ms: float
    threshold_ms: float  # work above this makes a candidate (0: too few replicas)
    median_step_ms: float
    median_allreduce_ms: float
    p99_step_ms: float
    step_rate: float  # median of the replicas' steps per second

    def as_dict(self) -> dict[str, Any]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class StragglerChange:
    """A replica became a straggler (flagged=True) or recovered (False)."""

    replica_id: str
    job_id: int
    flagged: bool
    work_ms: float
    stats: JobStats
    reason: str

    def evidence(self) -> dict[str, Any]:
        return {"work_ms": round(self.work_ms, 3), "job": self.stats.as_dict()}


@dataclass
class StragglerDetector:
    config: StragglerConfig = field(default_factory=StragglerConfig)
    tracks: dict[str, ReplicaTrack] = field(default_factory=dict)
    # The same tracks by job: a job's statistics must not scan every replica of the cluster.
    by_job: dict[int, dict[str, ReplicaTrack]] = field(default_factory=dict)

    def observe(self, replica_id: str, job_id: int, step: int, step_time_ms: float,
                allreduce_ms: float, ts: float, now: float) -> bool:
        """Take one heartbeat; True when it carried a new step (a new sample)."""
        track = self.tracks.get(replica_id)
        if track is None:
            track = self.tracks[replica_id] = ReplicaTrack(
                replica_id, job_id, deque(maxlen=self.config.history), created_at=now)
            self.by_job.setdefault(job_id, {})[replica_id] = track
        if step_time_ms <= 0 or (track.samples and track.samples[-1].step >= step):
            return False
        track.samples.append(Sample(step, ts, step_time_ms, allreduce_ms))
        track.seen_at = now
        return True

    def job_tracks(self, job_id: int) -> list[ReplicaTrack]:
        return [t for t in self.by_job.get(job_id, {}).values() if t.samples]

    def jobs(self) -> list[int]:
        return sorted(self.by_job)

    def stats(self, job_id: int) -> JobStats | None:
        tracks = self.job_tracks(job_id)
        if not tracks:
            return None
        n = self.config.smoothing
        work = [t.smoothed(n, "work_ms") for t in tracks]
        med = median(work)
        spread = mad(work, med)
        enough = len(tracks) >= self.config.min_replicas
        threshold = max(med + self.config.mad_k * MAD_TO_SIGMA * spread,
                        self.config.factor * med, med + self.config.min_excess_ms)
        return JobStats(
            job_id=job_id, replicas=len(tracks), median_work_ms=med, mad_work_ms=spread,
            threshold_ms=threshold if enough else 0.0,
            median_step_ms=median([t.smoothed(n, "step_time_ms") for t in tracks]),
            median_allreduce_ms=median([t.smoothed(n, "allreduce_ms") for t in tracks]),
            p99_step_ms=percentile((s.step_time_ms for t in tracks
                                    for s in itertools.islice(reversed(t.samples), n)), 99),
            step_rate=median([t.step_rate() for t in tracks]),
        )

    def evaluate(self, job_id: int, now: float) -> list[StragglerChange]:
        """Update the job's candidates and return the flags raised and cleared now."""
        stats = self.stats(job_id)
        if stats is None or stats.threshold_ms <= 0:
            return []
        clear_below = (stats.median_work_ms + stats.threshold_ms) / 2
        changes = []
        for track in self.job_tracks(job_id):
            if len(track.samples) < min(3, self.config.smoothing):
                continue  # too new to judge
            work = track.smoothed(self.config.smoothing, "work_ms")
            change = self._step(track, work, stats, clear_below, now)
            if change is not None:
                changes.append(change)
        return changes

    def _step(self, track: ReplicaTrack, work: float, stats: JobStats, clear_below: float,
              now: float) -> StragglerChange | None:
        above, below = work > stats.threshold_ms, work <= clear_below
        track.above_since = _since(track.above_since, now) if above else None
        track.below_since = _since(track.below_since, now) if below else None
        sustain = self.config.sustain_s
        if not track.flagged and track.above_since is not None \
                and now - track.above_since >= sustain:
            track.flagged, track.flagged_at = True, now
            reason = (f"work {work:.1f} ms > {stats.threshold_ms:.1f} ms (job median "
                      f"{stats.median_work_ms:.1f} ms, MAD {stats.mad_work_ms:.1f} ms) "
                      f"for {sustain:g} s")
            return StragglerChange(track.replica_id, track.job_id, True, work, stats, reason)
        if track.flagged and track.below_since is not None and now - track.below_since >= sustain:
            track.flagged = False
            reason = (f"recovered: work {work:.1f} ms <= {clear_below:.1f} ms "
                      f"(job median {stats.median_work_ms:.1f} ms)")
            return StragglerChange(track.replica_id, track.job_id, False, work, stats, reason)
        return None

    def prune(self, now: float) -> list[StragglerChange]:
        """Forget silent replicas; a flagged one that went silent is cleared as gone."""
        gone = [t for t in self.tracks.values() if now - t.seen_at > self.config.stale_s]
        return self._drop(gone, "gone: no heartbeat")

    def retain(self, live: set[str], checked_at: float) -> list[StragglerChange]:
        """Forget the replicas that are no longer live (their step or job ended, they left),
        as the mapping said at `checked_at`; one first heard of after that is kept until the
        next check. A flagged one is cleared as gone."""
        ended = [t for r, t in self.tracks.items()
                 if r not in live and t.created_at <= checked_at]
        return self._drop(ended, "gone: left the mapping")

    def _drop(self, tracks: list[ReplicaTrack], why: str) -> list[StragglerChange]:
        """Forget these replicas; each flagged one is cleared, saying `why`."""
        changes = []
        for track in tracks:
            self.forget(track.replica_id)
            stats = self.stats(track.job_id)
            if track.flagged and stats is not None:
                changes.append(StragglerChange(track.replica_id, track.job_id, False, 0.0,
                                               stats, why))
        return changes

    def forget(self, replica_id: str) -> None:
        track = self.tracks.pop(replica_id, None)
        if track is None:
            return
        job = self.by_job.get(track.job_id, {})
        job.pop(replica_id, None)
        if not job:
            self.by_job.pop(track.job_id, None)

    def flagged(self) -> set[str]:
        return {r for r, t in self.tracks.items() if t.flagged}


def _since(started: float | None, now: float) -> float:
    return now if started is None else started


@dataclass(frozen=True)
class TimeoutSuggestion:
    name: str  # where it is set
    seconds: float
    why: str


def suggest_torchft_timeouts(p99_step_ms: float) -> list[TimeoutSuggestion]:
    """torchft timeouts that fit a job's observed p99 step time (rules of thumb, see
    docs/observability.md): generous enough that a slow but healthy step never times out,
    short enough that a hung peer is given up on within a few steps."""
    p99_s = max(p99_step_ms, 0.0) / 1000.0
    return [
        TimeoutSuggestion("Manager(timeout=)", round(max(10.0, 10 * p99_s), 1),
                          "collectives and should_commit: 10 x p99 step, at least 10 s"),
        TimeoutSuggestion("Manager(quorum_timeout=)", round(max(30.0, 20 * p99_s), 1),
                          "a quorum may include healing from a peer: 20 x p99, at least 30 s"),
        TimeoutSuggestion("torchft_lighthouse heartbeat timeout",
                          round(max(1.0, 2 * p99_s), 1),
                          "--heartbeat_timeout_ms: drop a dead replica within about two "
                          "steps, at least 1 s of jitter allowance"),
    ]


@dataclass(frozen=True)
class TimeoutPolicy:
    """torchft's timeouts moved with a job's step times (`marduk straggler timeouts`), within
    the operator's bounds: `timeout` = k x p99 step time, `quorum_timeout` = 2k x p99 (a
    quorum may include healing), each at least `floor_s` (3 x `floor_s` for the quorum) and
    at most `ceiling_s`. A change smaller than `MIN_CHANGE` of the current value is not
    made, so that noise in the p99 does not send a revision every few seconds."""

    k: float = 10.0
    floor_s: float = 10.0
    ceiling_s: float = 600.0

    MIN_CHANGE = 0.2  # relative
    MIN_SAMPLES = 20  # step times over the job's replicas before any change

    def __post_init__(self) -> None:
        for name in ("k", "floor_s", "ceiling_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                    math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.k > 1000 or self.ceiling_s > 86400:
            raise ValueError("k is at most 1000 and ceiling_s at most 86400 (a day)")
        if self.ceiling_s < 3 * self.floor_s:
            raise ValueError(f"ceiling_s ({self.ceiling_s:g}) must be at least 3 x floor_s "
                             f"({3 * self.floor_s:g}), the quorum timeout's floor")

    def target(self, p99_step_ms: float) -> dict[str, float]:
        p99_s = max(p99_step_ms, 0.0) / 1000.0

        def clamp(value: float, floor: float) -> float:
            return round(min(self.ceiling_s, max(floor, value)), 1)
        return {"timeout": clamp(self.k * p99_s, self.floor_s),
                "quorum_timeout": clamp(2 * self.k * p99_s, 3 * self.floor_s)}

    def changes(self, current: dict[str, float], p99_step_ms: float) -> dict[str, float]:
        """The keys to change: those whose target differs from the value in force (None:
        never set, torchft's own default) by more than MIN_CHANGE."""
        out = {}
        for key, value in self.target(p99_step_ms).items():
            now = current.get(key)
            if now is None or abs(value - now) > self.MIN_CHANGE * now:
                out[key] = value
        return out

    def as_dict(self) -> dict[str, float]:
        return {"k": self.k, "floor_s": self.floor_s, "ceiling_s": self.ceiling_s}


def step_times_p99(tracks: Iterable[ReplicaTrack]) -> tuple[float, int]:
    """(p99 of every kept step time of these replicas, how many there were)."""
    times = [s.step_time_ms for t in tracks for s in t.samples]
    return (percentile(times, 99) if times else 0.0), len(times)

