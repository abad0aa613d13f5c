"""A job's fault timeline: each replica group's step rate and quorum size over time, with the
fault and what followed it (drain, leave, standby assumed or respawn, back to full strength)
marked. Pure values in, one `Timeline` value out: the controller's timeline query, the
dashboard, the drill's plot files and `marduk timeline` all draw this one value.

Step samples are (time, group, step, quorum size) as the controller heard them from the
replicas' heartbeats; a group's step rate is the steps it made over a sliding window. A gap
in a group's samples, or a new incarnation of the group (another replica id), breaks its
line instead of drawing a slope across time nobody measured. "Full strength" is derived from
the samples: the first moment after a fault, and after the quorum was seen smaller, when
every group reports the full quorum again. What did not happen (or was not seen) has no
mark, and the timeline lists it under `missing`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from marduk_slurm.domain.exit_codes import EXIT_DONE, EXIT_LEAVE, EXIT_STOP

# The marks a fault is expected to be followed by; "replace" is a standby that assumed the
# group or a cold respawn, "heal" is back to full strength.
FAULT, DRAIN, LEAVE, REPLACE, HEAL = "fault", "drain", "leave", "replace", "heal"
MARK_KINDS = (FAULT, DRAIN, LEAVE, REPLACE, HEAL)
# History events that start a fault's story (a GPU verdict only when it asks for an action).
FAULT_EVENTS = frozenset({"gpu_verdict", "straggler", "step_gone", "risk_drain",
                          "operator_drain"})
# Those about a node rather than a job (a job's timeline takes them for its nodes).
NODE_EVENT_KINDS = ("drain_requested", "drained", "gpu_verdict", "operator_drain",
                    "resumed", "risk_drain")
# Every history kind the timeline reads.
EVENT_KINDS = (*sorted(FAULT_EVENTS), "drain_requested", "drained", "replica_leave",
               "resumed", "standby_assumed", "replica_register")
DEFAULT_RATE_WINDOW_S = 2.0
DEFAULT_GAP_S = 3.0


@dataclass(frozen=True)
class StepSample:
    """One heartbeat's worth: when, which group (and which incarnation of it), its step and
    the number of groups in its quorum."""

    t: float
    group: int
    step: int
    quorum: int
    source: str = ""  # the replica id: a new one is a new incarnation of the group


@dataclass(frozen=True)
class Mark:
    t: float
    kind: str  # one of MARK_KINDS
    label: str
    group: int | None = None


@dataclass(frozen=True)
class RatePoint:
    t: float
    rate: float  # steps per second over the window before t
    quorum: int


@dataclass(frozen=True)
class GroupSeries:
    group: int
    segments: tuple[tuple[RatePoint, ...], ...]  # each a line; between them, no data

    def points(self) -> int:
        return sum(len(s) for s in self.segments)


@dataclass(frozen=True)
class Timeline:
    start: float
    end: float
    groups: tuple[GroupSeries, ...]
    marks: tuple[Mark, ...]
    missing: tuple[str, ...]  # MARK_KINDS that a fault in view had no mark for
    full_quorum: int  # the largest quorum seen before the first fault (or at all)
    rate_window_s: float = DEFAULT_RATE_WINDOW_S

    def marks_of(self, kind: str) -> list[Mark]:
        return [m for m in self.marks if m.kind == kind]


# -- step rate ----------------------------------------------------------------------------------


def _split(samples: Sequence[StepSample], gap_s: float) -> list[list[StepSample]]:
    """A group's samples (in time order) cut where the line must break: a gap, another
    incarnation, or a step that went back."""
    runs: list[list[StepSample]] = []
    for s in samples:
        last = runs[-1][-1] if runs else None
        if (last is None or s.t - last.t > gap_s or s.source != last.source
                or s.step < last.step):
            runs.append([s])
        else:
            runs[-1].append(s)
    return runs


def _rates(run: Sequence[StepSample], window_s: float) -> tuple[RatePoint, ...]:
    """Steps per second over the window before each sample (from the oldest sample still in
    the window); the run's first sample has no rate."""
    points: list[RatePoint] = []
    first = 0
    for i, s in enumerate(run):
        while run[first].t < s.t - window_s and first < i:
            first += 1
        base = run[first] if first < i else (run[i - 1] if i else None)
        if base is None or s.t <= base.t:
            continue
        points.append(RatePoint(s.t, (s.step - base.step) / (s.t - base.t), s.quorum))
    return tuple(points)


def group_series(samples: Iterable[StepSample], *, window_s: float = DEFAULT_RATE_WINDOW_S,
                 gap_s: float = DEFAULT_GAP_S) -> tuple[GroupSeries, ...]:
    by_group: dict[int, list[StepSample]] = {}
    for s in samples:
        if math.isfinite(s.t):
            by_group.setdefault(s.group, []).append(s)
    out = []
    for group in sorted(by_group):
        ordered = sorted(by_group[group], key=lambda s: (s.t, s.step))
        segments = tuple(seg for run in _split(ordered, gap_s) if (seg := _rates(run, window_s)))
        out.append(GroupSeries(group, segments))
    return tuple(out)


# -- back to full strength ----------------------------------------------------------------------


def full_strength_after(samples: Sequence[StepSample], fault_t: float, full: int,
                        until: float = math.inf) -> float | None:
    """The first sample time after `fault_t` (and before `until`) when the quorum had been
    seen below `full` and every group that reported before the fault reports `full` again.
    None: not seen (the quorum never dropped in the samples, or a group never came back)."""
    ordered = sorted(samples, key=lambda s: s.t)
    expected = {s.group for s in ordered if s.t <= fault_t}
    dipped = False
    latest: dict[int, int] = {}
    for s in ordered:
        if s.t <= fault_t or s.t >= until:
            continue
        latest[s.group] = s.quorum
        dipped = dipped or s.quorum < full
        if (dipped and expected <= latest.keys()
                and all(q >= full for q in latest.values())):
            return s.t
    return None


def full_quorum(samples: Sequence[StepSample], before: float) -> int:
    earlier = [s.quorum for s in samples if s.t < before]
    return max(earlier or [s.quorum for s in samples] or [0])


# -- marks from the controller's history --------------------------------------------------------


def _group_of(event: Mapping[str, Any], groups: Mapping[str, int]) -> int | None:
    evidence = event.get("evidence") or {}
    group = evidence.get("replica_group") if isinstance(evidence, Mapping) else None
    if isinstance(group, int) and not isinstance(group, bool):
        return group
    return groups.get(str(event.get("replica_id") or ""))


def _how_it_left(code: Any) -> str:
    if not isinstance(code, int) or isinstance(code, bool):
        return "left"
    return {EXIT_LEAVE: "left (told to)", EXIT_STOP: "stopped"}.get(
        code, f"crashed (exit {code})")


class _HistoryReader:
    """Reads a job's history in time order into marks, keeping what a mark depends on:
    which GPUs have a fault open (a later verdict on one is a follow-up, not a new fault,
    until it reads healthy or its node is resumed), which groups left (a registration is a
    respawn only after its group left), which nodes Slurm drained (their queued drain is
    not marked twice)."""

    def __init__(self, groups: Mapping[str, int], drained: set[str]) -> None:
        self.groups = groups
        self.drained = drained
        self.left: set[int] = set()
        self.open_faults: set[tuple[str, str]] = set()

    def mark(self, event: Mapping[str, Any]) -> Mark | None:
        kind, t = event.get("kind"), float(event.get("ts") or 0.0)
        node = str(event.get("node") or "-")
        group = _group_of(event, self.groups)
        if kind in FAULT_EVENTS or kind == "resumed":
            return self._fault(event, t, node, group)
        if kind == "drained":
            return Mark(t, DRAIN, f"{node} drained", None)
        if kind == "drain_requested" and node not in self.drained:
            return Mark(t, DRAIN, f"drain of {node} queued", None)
        if kind == "replica_leave" and group is not None:
            evidence = event.get("evidence") or {}
            code = evidence.get("exit_code") if isinstance(evidence, Mapping) else None
            if code == EXIT_DONE:
                return None  # a replica that finished: not part of a fault's story
            self.left.add(group)
            return Mark(t, LEAVE, f"group {group} {_how_it_left(code)}", group)
        if kind == "standby_assumed":
            return Mark(t, REPLACE, f"standby assumed group {group}", group)
        if kind == "replica_register" and group is not None and group in self.left:
            self.left.discard(group)
            return Mark(t, REPLACE, f"group {group} respawned on {node}", group)
        return None

    def _fault(self, event: Mapping[str, Any], t: float, node: str, group: int | None
               ) -> Mark | None:
        kind = event.get("kind")
        gpu = (node, str(event.get("gpu_uuid") or ""))
        if kind == "resumed":
            self.open_faults = {f for f in self.open_faults if f[0] != node}
            return None
        if kind == "gpu_verdict" and event.get("action") in (None, "", "none"):
            self.open_faults.discard(gpu)  # a healthy reading, not a fault
            return None
        if kind == "gpu_verdict":
            if gpu in self.open_faults:
                return None  # the same GPU again (lost after its XID): a follow-up
            self.open_faults.add(gpu)
        xid = event.get("xid")
        what = f"XID {xid}" if xid is not None else str(kind).replace("_", " ")
        return Mark(t, FAULT, f"fault: {what} on {node}", group)


def marks_from_history(events: Iterable[Mapping[str, Any]], groups: Mapping[str, int]
                       ) -> list[Mark]:
    """The marks of a job's history events (`marduk history --json` rows), in time order.
    `groups` maps replica ids to their group (see `_HistoryReader` for what is left out)."""
    ordered = sorted(events, key=lambda e: (float(e.get("ts") or 0.0), e.get("id") or 0))
    reader = _HistoryReader(groups, {str(e.get("node")) for e in ordered
                                     if e.get("kind") == "drained"})
    return [mark for event in ordered if (mark := reader.mark(event)) is not None]


# -- the timeline -------------------------------------------------------------------------------


def build_timeline(samples: Sequence[StepSample], marks: Iterable[Mark], *,
                   window_s: float = DEFAULT_RATE_WINDOW_S, gap_s: float = DEFAULT_GAP_S,
                   start: float | None = None, end: float | None = None) -> Timeline:
    """The timeline of `samples` and `marks` (in any order). A heal mark is added after each
    fault where the samples show the return to full strength; `missing` names the kinds a
    fault had no mark for."""
    samples = [s for s in samples if math.isfinite(s.t)]
    given = sorted((m for m in marks if math.isfinite(m.t) and m.kind != HEAL),
                   key=lambda m: m.t)
    faults = [m for m in given if m.kind == FAULT]
    full = full_quorum(samples, faults[0].t if faults else math.inf)
    heals = []
    for i, fault in enumerate(faults):
        until = faults[i + 1].t if i + 1 < len(faults) else math.inf
        healed = full_strength_after(samples, fault.t, full, until)
        if healed is not None:
            heals.append(Mark(healed, HEAL, f"full strength ({full} groups)", fault.group))
    all_marks = tuple(sorted([*given, *heals], key=lambda m: m.t))
    missing = tuple(k for k in MARK_KINDS if faults and not any(m.kind == k for m in all_marks))
    times = [s.t for s in samples] + [m.t for m in all_marks]
    return Timeline(
        start=start if start is not None else min(times, default=0.0),
        end=end if end is not None else max(times, default=0.0),
        groups=group_series(samples, window_s=window_s, gap_s=gap_s), marks=all_marks,
        missing=missing, full_quorum=full, rate_window_s=window_s)


def thin(timeline: Timeline, max_points: int) -> Timeline:
    """The same timeline with at most about `max_points` rate points in all (every k-th point
    of each segment, its last one kept): a bounded answer for a page or a reply."""
    total = sum(g.points() for g in timeline.groups)
    if total <= max_points:
        return timeline
    stride = math.ceil(total / max(1, max_points))
    groups = tuple(GroupSeries(g.group, tuple(
        (*seg[:-1:stride], seg[-1]) for seg in g.segments)) for g in timeline.groups)
    return Timeline(timeline.start, timeline.end, groups, timeline.marks, timeline.missing,
                    timeline.full_quorum, timeline.rate_window_s)


# -- as JSON (the API's answer, and back for the plot) ------------------------------------------


def to_json(timeline: Timeline) -> dict[str, Any]:
    return {
        "start": timeline.start, "end": timeline.end, "full_quorum": timeline.full_quorum,
        "rate_window_s": timeline.rate_window_s, "missing": list(timeline.missing),
        "groups": [{"group": g.group, "segments": [
            [[round(p.t, 3), round(p.rate, 3), p.quorum] for p in seg] for seg in g.segments]}
            for g in timeline.groups],
        "marks": [{"t": round(m.t, 3), "kind": m.kind, "label": m.label, "group": m.group}
                  for m in timeline.marks],
    }


def from_json(data: Mapping[str, Any]) -> Timeline:
    """A timeline from `to_json`'s form (as the controller answers it); ValueError when it
    is not one."""
    try:
        groups = tuple(GroupSeries(int(g["group"]), tuple(
            tuple(RatePoint(float(t), float(rate), int(q)) for t, rate, q in seg)
            for seg in g["segments"])) for g in data["groups"])
        marks = tuple(Mark(float(m["t"]), str(m["kind"]), str(m["label"]),
                           None if m.get("group") is None else int(m["group"]))
                      for m in data["marks"])
        return Timeline(float(data["start"]), float(data["end"]), groups, marks,
                        tuple(str(k) for k in data["missing"]), int(data["full_quorum"]),
                        float(data.get("rate_window_s", DEFAULT_RATE_WINDOW_S)))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a timeline: {exc!r}") from None
