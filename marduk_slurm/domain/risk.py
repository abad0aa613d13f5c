"""GPU failure risk: a points table over NVML evidence trends, not a model.

Each GPU gets a score from 0 to 100, the sum of the points below (capped), with every
contributing factor named, so an operator can see why. The rule is a heuristic in the spirit
of NVIDIA's field guidance (pending row remaps and page retirements need a reset; growing
corrected-ECC counts, many retired pages and repeated memory XIDs precede uncorrectable
errors); it has not been fitted to failure data and claims no predictive accuracy.

| evidence (within `window_s`) | points |
|---|---|
| corrected (single-bit) ECC growth: >=1, >=10, >=100 | 5, 15, 30 |
| uncorrected (double-bit) ECC growth: >=1, >=5 | 25, 40 |
| retired pages (sbe+dbe): >=1, >=16, >=48 | 5, 15, 25 |
| retired pages growth: >=1 | 10 |
| page retirement pending a reset | 20 |
| row remap pending a reset | 25 |
| uncorrectable row remaps > 0 | 10 |
| row remap failure | 60 |
| thermal throttling in >=10% / >=50% of polls (at least 3 polls known) | 5 / 15 |
| each XID seen (memory XIDs 48 63 64 92 94 95 count 15, others 10), at most | 45 |

Evidence arrives in two forms: the full NVML evidence attached to every verdict (published
only when the verdict changes), and the agent's periodic health summary, which carries every
GPU's counters at every poll (`messages.GpuCounters`: ECC, retired and remapped pages,
temperature, power, throttle reasons, XID counts since the agent started); a summary from an
older agent has only the verdict's action and reason. Growth is the sum of the increases
between consecutive readings (after a reset, a volatile counter at a driver reload, from
zero), so nothing is lost or counted twice; an XID counts once whether a verdict or the
counters report it.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

MEMORY_XIDS = frozenset({48, 63, 64, 92, 94, 95})
THERMAL_REASONS = frozenset({"hw_thermal_slowdown", "sw_thermal_slowdown", "hw_slowdown"})
MAX_SCORE = 100


@dataclass(frozen=True)
class Observation:
    """What one reading says about a GPU; None: this reading does not tell."""

    ts: float
    corrected_ecc: int | None = None
    retired_pages: int | None = None
    retired_pending: bool | None = None
    remap_pending: bool | None = None
    remap_uncorrectable: int | None = None
    remap_failure: bool | None = None
    thermal_throttled: bool | None = None
    xids: tuple[int, ...] = ()  # XIDs this reading saw (a verdict's)
    uncorrected_ecc: int | None = None
    xid_counts: tuple[tuple[int, int], ...] | None = None  # (xid, count since agent start)
    temperature_c: float | None = None
    power_w: float | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _sum(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _either(aggregate: Any, volatile: Any) -> int | None:
    value = _int(aggregate)
    return value if value is not None else _int(volatile)


def from_evidence(evidence: dict[str, Any], ts: float) -> Observation:
    """The evidence dict of a verdict (domain.gpu_health._evidence's shape)."""
    ecc = evidence.get("ecc") or {}
    pages = evidence.get("retired_pages") or {}
    remap = evidence.get("row_remap") or {}
    throttle = evidence.get("throttle_reasons")
    corrected = _int(ecc.get("sbe_aggregate"))
    return Observation(
        ts=ts,
        corrected_ecc=corrected if corrected is not None else _int(ecc.get("sbe_volatile")),
        retired_pages=_sum(_int(pages.get("sbe")), _int(pages.get("dbe"))),
        retired_pending=pages.get("pending") if isinstance(pages.get("pending"), bool) else None,
        remap_pending=remap.get("pending") if isinstance(remap.get("pending"), bool) else None,
        remap_uncorrectable=_int(remap.get("uncorrectable")),
        remap_failure=remap.get("failure") if isinstance(remap.get("failure"), bool) else None,
        thermal_throttled=(bool(THERMAL_REASONS & set(throttle))
                           if isinstance(throttle, list) else None),
        xids=tuple(x for x in evidence.get("xids") or () if _int(x) is not None),
        uncorrected_ecc=_either(ecc.get("dbe_aggregate"), ecc.get("dbe_volatile")),
    )


def from_counters(c: dict[str, Any], ts: float) -> Observation:
    """The counters of a health summary (`messages.GpuCounters`, as a dict)."""
    throttle = c.get("throttle_reasons")
    listed = c.get("xids")
    xids: list[Any] = listed if isinstance(listed, list) else []
    counts = tuple((x["xid"], x["count"]) for x in xids if isinstance(x, dict)
                   and _int(x.get("xid")) is not None and _int(x.get("count")) is not None)
    temp, power = c.get("temperature_c"), c.get("power_w")
    return Observation(
        ts=ts,
        corrected_ecc=_either(c.get("ecc_sbe_aggregate"), c.get("ecc_sbe_volatile")),
        uncorrected_ecc=_either(c.get("ecc_dbe_aggregate"), c.get("ecc_dbe_volatile")),
        retired_pages=_sum(_int(c.get("retired_pages_sbe")), _int(c.get("retired_pages_dbe"))),
        retired_pending=_flag(c.get("retired_pages_pending")),
        remap_pending=_flag(c.get("remap_pending")),
        remap_uncorrectable=_int(c.get("remap_uncorrectable")),
        remap_failure=_flag(c.get("remap_failure")),
        thermal_throttled=(bool(THERMAL_REASONS & set(throttle))
                           if isinstance(throttle, list) else None),
        xid_counts=counts,
        temperature_c=float(temp) if isinstance(temp, int | float) else None,
        power_w=float(power) if isinstance(power, int | float) else None,
    )


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


_THERMAL_TEXT = re.compile(r"clocks throttled:.*(thermal|hw_slowdown)")


def from_summary_gpu(gpu: dict[str, Any], ts: float) -> Observation:
    """One GPU of the agent's health summary: its verdict action and reason (the worst
    finding only), plus its counters (or verdict evidence) when the agent sends them."""
    if isinstance(gpu.get("counters"), dict):
        return from_counters(gpu["counters"], ts)
    if isinstance(gpu.get("evidence"), dict):
        return from_evidence(gpu["evidence"], ts)
    action, reason = str(gpu.get("action", "")), str(gpu.get("reason", ""))
    healthy = action == "none"
    return Observation(
        ts=ts,
        thermal_throttled=True if _THERMAL_TEXT.search(reason) else (False if healthy else None),
        remap_pending=True if "row remapping pending" in reason else (False if healthy else None),
        retired_pending=True if "page retirement pending" in reason else
        (False if healthy else None),
    )


@dataclass(frozen=True)
class RiskFactor:
    name: str
    points: int
    detail: str


@dataclass(frozen=True)
class RiskScore:
    gpu_uuid: str
    node: str
    index: int | None
    score: int
    factors: tuple[RiskFactor, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"gpu_uuid": self.gpu_uuid, "node": self.node, "index": self.index,
                "score": self.score,
                "factors": [{"name": f.name, "points": f.points, "detail": f.detail}
                            for f in self.factors]}


def _tier(value: int, tiers: Iterable[tuple[int, int]]) -> int:
    points = 0
    for minimum, pts in tiers:
        if value >= minimum:
            points = pts
    return points


def _latest(observations: list[Observation], attr: str) -> Any:
    for obs in reversed(observations):
        value = getattr(obs, attr)
        if value is not None:
            return value
    return None


def growth(values: list[int]) -> int:
    """The sum of the increases between consecutive readings. A counter found lower than
    before was reset (a volatile one, at a driver reload): it counted up from zero since."""
    return sum(b - a if b >= a else b for a, b in itertools.pairwise(values))


def _growth_factor(obs: list[Observation], attr: str, name: str, what: str,
                   tiers: list[tuple[int, int]]) -> list[RiskFactor]:
    values = [getattr(o, attr) for o in obs if getattr(o, attr) is not None]
    grown = growth(values)
    pts = _tier(grown, tiers)
    if not pts:
        return []
    return [RiskFactor(name, pts, f"+{grown} {what} ({values[0]} -> {values[-1]})")]


def _counter_factors(obs: list[Observation]) -> list[RiskFactor]:
    out = _growth_factor(obs, "corrected_ecc", "corrected_ecc_growth",
                         "corrected ECC errors", [(1, 5), (10, 15), (100, 30)])
    out += _growth_factor(obs, "uncorrected_ecc", "uncorrected_ecc_growth",
                          "uncorrected ECC errors", [(1, 25), (5, 40)])
    pages = _latest(obs, "retired_pages")
    if pages:
        out.append(RiskFactor("retired_pages", _tier(pages, [(1, 5), (16, 15), (48, 25)]),
                              f"{pages} retired pages"))
    out += _growth_factor(obs, "retired_pages", "retired_pages_growth", "retired pages",
                          [(1, 10)])
    if _latest(obs, "retired_pending"):
        out.append(RiskFactor("retirement_pending", 20, "page retirement pending a reset"))
    if _latest(obs, "remap_pending"):
        out.append(RiskFactor("remap_pending", 25, "row remap pending a reset"))
    uncorrectable = _latest(obs, "remap_uncorrectable")
    if uncorrectable:
        out.append(RiskFactor("remap_uncorrectable", 10,
                              f"{uncorrectable} rows remapped for uncorrectable errors"))
    if _latest(obs, "remap_failure"):
        out.append(RiskFactor("remap_failure", 60, "row remapping failed"))
    return out


def _trend_factors(obs: list[Observation]) -> list[RiskFactor]:
    out = []
    known = [o.thermal_throttled for o in obs if o.thermal_throttled is not None]
    if len(known) >= 3:
        share = sum(known) / len(known)
        pts = _tier(round(share * 100), [(10, 5), (50, 15)])
        if pts:
            out.append(RiskFactor("thermal_throttling", pts,
                                  f"thermally throttled in {share:.0%} of {len(known)} polls"))
    xids = xid_occurrences(obs)
    if xids:
        pts = min(45, sum((15 if x in MEMORY_XIDS else 10) * n for x, n in xids.items()))
        out.append(RiskFactor("recent_xids", pts, "xids " + ", ".join(
            f"{x}" if n == 1 else f"{x} x{n}" for x, n in sorted(xids.items())[:8])))
    return out


def xid_occurrences(obs: list[Observation]) -> dict[int, int]:
    """Each XID's occurrences in the window: the verdicts that named it or the growth of
    the summaries' counts, whichever says more (both report the same events)."""
    from_verdicts: Counter[int] = Counter(x for o in obs for x in o.xids)
    polls = [dict(o.xid_counts) for o in obs if o.xid_counts is not None]
    from_counts = {x: growth([p.get(x, 0) for p in polls])
                   for x in {x for p in polls for x in p}}
    return {x: n for x in from_verdicts.keys() | from_counts.keys()
            if (n := max(from_verdicts[x], from_counts.get(x, 0)))}


def score(observations: list[Observation]) -> tuple[int, tuple[RiskFactor, ...]]:
    """The score of one GPU from its observations in the window, oldest first."""
    ordered = sorted(observations, key=lambda o: o.ts)
    factors = tuple(_counter_factors(ordered) + _trend_factors(ordered))
    return min(MAX_SCORE, sum(f.points for f in factors)), factors


@dataclass
class GpuHistory:
    node: str
    index: int | None
    readings: deque[Observation] = field(default_factory=lambda: deque(maxlen=500))
    polls: deque[Observation] = field(default_factory=lambda: deque(maxlen=720))
    version: int = 0  # counts what was added: a full deque drops one as it takes one
    # The last score for each kind of window (whole window, since resume): (version, window
    # start it was scored from, oldest observation it used, points, factors).
    cache: dict[bool, tuple[int, float, float, int, tuple[RiskFactor, ...]]] = field(
        default_factory=dict)

    def add(self, kind: deque[Observation], observation: Observation) -> None:
        kind.append(observation)
        self.version += 1

    def score(self, start: float, since_resume: bool) -> tuple[int, tuple[RiskFactor, ...]]:
        """score() of the observations since `start`. A GPU's score depends on nothing but
        that set, which changes only when something is added or an observation leaves the
        window: until then the last score stands, so a scoring pass over a large cluster
        only recomputes the GPUs with news."""
        cached = self.cache.get(since_resume)
        if cached is not None:
            version, scored_from, oldest, points, factors = cached
            if version == self.version and scored_from <= start <= oldest:
                return points, factors
        recent = [o for o in (*self.readings, *self.polls) if o.ts >= start]
        points, factors = score(recent)
        oldest = min((o.ts for o in recent), default=math.inf)
        self.cache[since_resume] = (self.version, start, oldest, points, factors)
        return points, factors


@dataclass
class RiskTracker:
    """Observations per GPU within `window_s`, and their scores.

    A resume keeps a node's history: the evidence still describes the GPU, and ages out of
    the window like any other. It only marks where the evidence that may drain the node again
    starts (`scores(..., since_resume=True)`): a resume follows a repair or a passed check,
    so what was seen before it already had its say."""

    window_s: float = 24 * 3600.0
    gpus: dict[str, GpuHistory] = field(default_factory=dict)
    resumed_at: dict[str, float] = field(default_factory=dict)  # node -> last resume
    # What a scoring pass must look at, per kind of window (whole window, since resume): the
    # GPUs with news, and when each scored GPU's oldest evidence leaves the window (a heap;
    # an entry made stale by a later scoring only costs a cached look-up). Every other GPU
    # keeps its last score, so a pass costs what changed, not the size of the cluster.
    _dirty: dict[bool, set[str]] = field(default_factory=dict)
    _expiry: dict[bool, list[tuple[float, str]]] = field(default_factory=dict)
    _scores: dict[bool, dict[str, RiskScore]] = field(default_factory=dict)
    _version: dict[bool, int] = field(default_factory=dict)  # passes that changed a score
    _ordered: dict[bool, tuple[int, list[RiskScore]]] = field(default_factory=dict)

    def _history(self, uuid: str, node: str, index: int | None) -> GpuHistory:
        hist = self.gpus.get(uuid)
        if hist is None or hist.node != node:
            hist = self.gpus[uuid] = GpuHistory(node, index)
        if index is not None:
            hist.index = index
        for dirty in self._dirty.values():
            dirty.add(uuid)
        return hist

    def add_verdict(self, uuid: str, node: str, index: int | None,
                    evidence: dict[str, Any], ts: float) -> None:
        hist = self._history(uuid, node, index)
        hist.add(hist.readings, from_evidence(evidence, ts))

    def add_summary(self, node: str, summary: dict[str, Any], ts: float) -> None:
        for gpu in summary.get("gpus") or ():
            if isinstance(gpu, dict) and isinstance(gpu.get("uuid"), str):
                index = _int(gpu.get("index"))
                hist = self._history(gpu["uuid"], node, index)
                hist.add(hist.polls, from_summary_gpu(gpu, ts))

    def update(self, now: float, *, since_resume: bool = False) -> list[RiskScore]:
        """Score anew the GPUs with news since the last pass of this kind, and those whose
        oldest evidence left the window; return their new scores. Every other GPU keeps its
        score, so a pass costs what changed, not the size of the cluster. With
        `since_resume`, from the evidence that arrived after the node was last resumed."""
        kind = since_resume
        if kind not in self._dirty:  # the first pass of this kind looks at every GPU
            self._dirty[kind], self._expiry[kind], self._scores[kind] = set(self.gpus), [], {}
            self._version[kind] = 0
        todo, expiry, scores = self._dirty[kind], self._expiry[kind], self._scores[kind]
        while expiry and expiry[0][0] <= now:
            todo.add(heapq.heappop(expiry)[1])
        changed = []
        for uuid in todo:
            hist = self.gpus[uuid]
            start = now - self.window_s
            if since_resume:
                start = max(start, self.resumed_at.get(hist.node, start))
            points, factors = hist.score(start, since_resume)
            new = scores[uuid] = RiskScore(uuid, hist.node, hist.index, points, factors)
            changed.append(new)
            oldest = hist.cache[kind][2]
            if oldest != math.inf:
                heapq.heappush(expiry, (oldest + self.window_s, uuid))
        todo.clear()
        if changed:
            self._version[kind] += 1
        return changed

    def current(self, *, since_resume: bool = False) -> dict[str, RiskScore]:
        """Every scored GPU's score as of the last `update` of this kind, by UUID."""
        return self._scores.get(since_resume, {})

    def ordered(self, *, since_resume: bool = False) -> list[RiskScore]:
        """The scores of the last `update`, by node, GPU index and UUID: a listing's order,
        sorted again only after a pass that changed something."""
        kind = since_resume
        version = self._version.get(kind, 0)
        cached = self._ordered.get(kind)
        if cached is None or cached[0] != version:
            cached = self._ordered[kind] = (version, sorted(
                self.current(since_resume=kind).values(),
                key=lambda s: (s.node, s.index or 0, s.gpu_uuid)))
        return list(cached[1])

    def scores(self, now: float, *, since_resume: bool = False) -> list[RiskScore]:
        """Every GPU's score from its evidence in the window, in listing order."""
        self.update(now, since_resume=since_resume)
        return self.ordered(since_resume=since_resume)

    def mark_resumed(self, node: str, ts: float) -> None:
        """`node` was resumed at `ts`: its history stays, the evidence to drain it anew starts
        after `ts`."""
        self.resumed_at[node] = max(ts, self.resumed_at.get(node, ts))
        if True in self._dirty:  # where its since-resume window starts has moved
            self._dirty[True].update(u for u, h in self.gpus.items() if h.node == node)
