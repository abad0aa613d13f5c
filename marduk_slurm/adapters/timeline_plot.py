"""A fault timeline (`marduk_slurm.domain.timeline.Timeline`) as a picture file, through
matplotlib (the `plots` extra: ``pip install 'marduk-slurm[plots]'``) on its Agg backend, so
it draws without a display. The file's format follows its suffix: ``.svg`` or ``.png``.

Two stacked axes share the time axis (seconds from the first fault, or from the start):
each group's step rate above, the quorum size each group reports below. Every mark is a
vertical line across both with its label; a kind that did not happen has no line, and the
title says which. In an SVG the artists carry ids (``series-group-<g>-<segment>``,
``quorum-group-<g>-<segment>``, ``mark-<kind>-<i>``) and the text stays text,
so that a test, or a reader, can find them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from marduk_slurm.domain.timeline import Timeline

SUFFIXES = (".svg", ".png")
MARK_COLORS = {"fault": "#b42318", "drain": "#b54708", "leave": "#6b7280",
               "replace": "#2e5aac", "heal": "#067647"}
MARK_NAMES = {"fault": "fault", "drain": "drain", "leave": "leave",
              "replace": "standby assumed / respawn", "heal": "full strength"}


class PlotsUnavailable(ImportError):
    """matplotlib is not installed (the `plots` extra)."""


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise PlotsUnavailable("plots need matplotlib: pip install 'marduk-slurm[plots]'"
                               ) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def title_of(timeline: Timeline, title: str) -> str:
    missing = [MARK_NAMES[k] for k in timeline.missing]
    if not timeline.marks_of("fault"):
        return f"{title}\nno fault in this window"
    return f"{title}\nnot seen: {', '.join(missing)}" if missing else title


def write_plot(timeline: Timeline, path: Path, title: str = "fault timeline") -> Path:
    """Draw `timeline` into `path` (.svg or .png); returns the path."""
    if path.suffix.lower() not in SUFFIXES:
        raise ValueError(f"{path}: a timeline plot is written as {' or '.join(SUFFIXES)}")
    plt = _pyplot()
    # Text as <text>, not glyph paths: an SVG whose labels a reader can search and select.
    with plt.rc_context({"svg.fonttype": "none"}):
        return _write(plt, timeline, path, title)


def _write(plt: Any, timeline: Timeline, path: Path, title: str) -> Path:
    fig, (rate_ax, quorum_ax) = plt.subplots(
        2, 1, sharex=True, figsize=(11, 6), height_ratios=(3, 1), constrained_layout=True)
    try:
        _draw(timeline, rate_ax, quorum_ax)
        fig.suptitle(title_of(timeline, title), fontsize=11)
        fig.savefig(path, format=path.suffix.lower().lstrip("."), dpi=110,
                    metadata={"Date": None} if path.suffix.lower() == ".svg" else None)
    finally:
        plt.close(fig)
    return path


def _view(timeline: Timeline) -> tuple[float, float]:
    """The time span drawn: from a little before the first sample or mark to the end. A
    window of 15 minutes around a minute of data would squeeze it against one edge."""
    times = [p.t for g in timeline.groups for seg in g.segments for p in seg]
    times += [mk.t for mk in timeline.marks]
    if not times:
        return timeline.start, timeline.end
    first, last = min(times), max(timeline.end, max(times))
    return max(timeline.start, first - max(2.0, 0.05 * (last - first))), last


def label_rows(marks: list[tuple[float, int]], start: float, end: float, *,
               char_fraction: float, max_rows: int = 6) -> list[tuple[int, bool]]:
    """Where each mark's label goes (time, length in characters), in order: (text row,
    whether it reads leftward from its line, as one near the right edge must). A label takes
    the first row where it starts after the previous one there ended, so that labels of
    marks close in time do not overwrite each other. `char_fraction` is one character's
    width as a share of the span drawn."""
    span = max(end - start, 1e-9)
    ends: list[float] = []  # per row, where its last label ends (share of the span)
    out = []
    for t, chars in marks:
        x, width = (t - start) / span, (chars + 1) * char_fraction
        leftward = x + width > 1.0
        left = x - width if leftward else x
        row = next((r for r, e in enumerate(ends) if e < left), len(ends))
        if row >= max_rows:
            row = min(range(max_rows), key=lambda r: ends[r])
        if row == len(ends):
            ends.append(0.0)
        ends[row] = x if leftward else x + width
        out.append((row, leftward))
    return out


def _draw(timeline: Timeline, rate_ax: Any, quorum_ax: Any) -> None:
    faults = timeline.marks_of("fault")
    t0 = faults[0].t if faults else timeline.start  # seconds from the (first) fault
    start, end = _view(timeline)
    _draw_series(timeline, rate_ax, quorum_ax, t0)
    _draw_marks(timeline, rate_ax, quorum_ax, t0, start, end)
    rate_ax.set_ylabel(f"steps/s ({timeline.rate_window_s:g} s window)")
    rate_ax.set_ylim(bottom=0)
    quorum_ax.set_ylabel("quorum size")
    quorum_ax.set_xlabel("seconds from the fault" if faults else "seconds")
    quorum_ax.set_ylim(-0.2, max(timeline.full_quorum, 1) + 0.5)
    quorum_ax.yaxis.get_major_locator().set_params(integer=True)
    quorum_ax.set_xlim(start - t0, max(end - t0, start - t0 + 1.0))
    if timeline.groups:
        rate_ax.legend(loc="lower left", fontsize=8)


def _draw_series(timeline: Timeline, rate_ax: Any, quorum_ax: Any, t0: float) -> None:
    for index, g in enumerate(timeline.groups):
        color = f"C{g.group % 10}"
        # Groups at the same rate draw on top of each other: each one thinner than the one
        # before, so that those underneath still show.
        width = max(1.0, 3.0 - 0.8 * index)
        for i, seg in enumerate(g.segments):
            xs = [p.t - t0 for p in seg]
            label = f"group {g.group}" if i == 0 else None
            (line,) = rate_ax.plot(xs, [p.rate for p in seg], color=color, lw=width,
                                   label=label)
            line.set_gid(f"series-group-{g.group}-{i}")
            (q,) = quorum_ax.step(xs, [p.quorum for p in seg], where="post", color=color,
                                  lw=width)
            q.set_gid(f"quorum-group-{g.group}-{i}")
    if not timeline.groups:
        rate_ax.text(0.5, 0.5, "no step samples in this window", transform=rate_ax.transAxes,
                     ha="center", va="center", color="#6b7280")


def _draw_marks(timeline: Timeline, rate_ax: Any, quorum_ax: Any, t0: float, start: float,
                end: float) -> None:
    places = label_rows([(mk.t, len(mk.label)) for mk in timeline.marks], start, end,
                        char_fraction=0.0058)
    for i, (mark, (row, leftward)) in enumerate(zip(timeline.marks, places, strict=True)):
        color = MARK_COLORS.get(mark.kind, "#1d2430")
        x = mark.t - t0
        rate_ax.axvline(x, color=color, lw=1.0, ls="--").set_gid(f"mark-{mark.kind}-{i}")
        quorum_ax.axvline(x, color=color, lw=1.0, ls="--").set_gid(f"mark-{mark.kind}-{i}-q")
        rate_ax.annotate(mark.label, xy=(x, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(-2 if leftward else 2, -4 - 11 * row),
                         textcoords="offset points", ha="right" if leftward else "left",
                         fontsize=7.5, color=color, va="top",
                         bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 0.5}
                         ).set_gid(f"label-{mark.kind}-{i}")
