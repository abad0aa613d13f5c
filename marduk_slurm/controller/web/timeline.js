// The fault timeline of one job, drawn as inline SVG by this page (no chart library, nothing
// fetched from elsewhere): each replica group's step rate above, the quorum size each group
// reports below, and a dashed line with a label for each mark (fault, drain, leave, standby
// assumed or respawn, full strength). Reads GET /api/timeline (docs/observability.md).
// Uses $, el, getJSON, time and report from app.js.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const TL = { W: 1000, H: 330, left: 56, right: 12, rateTop: 14, rateH: 190, qTop: 236, qH: 60 };
const GROUP_COLORS = ["#2e5aac", "#e07b10", "#067647", "#9e3ac0", "#b42318", "#0e7c86",
  "#6b4f1d", "#c2185b", "#4d5b6b", "#7a8f00"];
const MARK_COLORS = { fault: "#b42318", drain: "#b54708", leave: "#6b7280", replace: "#2e5aac",
  heal: "#067647" };
const MARK_NAMES = { fault: "fault", drain: "drain", leave: "leave",
  replace: "standby assumed / respawn", heal: "full strength" };

const timeline = { job: null, auto: true, timer: null, data: null };

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = String(text);
  return node;
}

// The time axis runs from a little before the first sample or mark to now: a window of
// 15 minutes with a minute of data would squeeze it against the right edge.
function viewOf(d) {
  const times = [...d.groups.flatMap((g) => g.segments.flat().map((p) => p[0])),
    ...d.marks.map((m) => m.t)];
  const first = times.length ? Math.min(...times) : d.start;
  const span = d.end - first;
  return { ...d, start: Math.max(d.start, first - Math.max(2, span * 0.05)) };
}

function scaleX(d) {
  const span = Math.max(1, d.end - d.start);
  return (t) => TL.left + (t - d.start) / span * (TL.W - TL.left - TL.right);
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((k) => k * p).find((m) => m >= v);
}

function axes(root, d, x, rateMax, qMax) {
  const right = TL.W - TL.right;
  for (const [top, h, max, label] of [[TL.rateTop, TL.rateH, rateMax, "steps/s"],
    [TL.qTop, TL.qH, qMax, "quorum"]]) {
    root.append(svg("rect", { x: TL.left, y: top, width: right - TL.left, height: h,
      fill: "none", stroke: "#dde1e7" }));
    root.append(svg("text", { x: TL.left - 6, y: top + 10, "text-anchor": "end",
      class: "tl-axis" }, max));
    root.append(svg("text", { x: TL.left - 6, y: top + h, "text-anchor": "end",
      class: "tl-axis" }, 0));
    root.append(svg("text", { x: 4, y: top + h / 2, class: "tl-axis" }, label));
  }
  for (let i = 0; i <= 4; i++) {
    const t = d.start + (d.end - d.start) * i / 4;
    root.append(svg("text", { x: x(t), y: TL.qTop + TL.qH + 16, "text-anchor": "middle",
      class: "tl-axis" }, time(t)));
  }
}

function seriesPath(points, x, y, stepped) {
  let path = "";
  points.forEach(([t, v], i) => {
    const px = x(t).toFixed(1);
    if (i === 0) path += `M${px},${y(v).toFixed(1)}`;
    else path += (stepped ? `H${px}V${y(v).toFixed(1)}` : `L${px},${y(v).toFixed(1)}`);
  });
  return path;
}

function drawSeries(root, d, x, rateMax, qMax) {
  const yRate = (v) => TL.rateTop + TL.rateH * (1 - Math.min(v, rateMax) / rateMax);
  const yQ = (v) => TL.qTop + TL.qH * (1 - v / qMax);
  d.groups.forEach((g, index) => {
    const color = GROUP_COLORS[g.group % GROUP_COLORS.length];
    // Groups at the same rate draw on top of each other: each one thinner than the one
    // before, so that those underneath still show.
    const width = Math.max(1.2, 3.2 - 0.8 * index);
    g.segments.forEach((seg, i) => {
      const rate = svg("path", { d: seriesPath(seg.map((p) => [p[0], p[1]]), x, yRate, false),
        fill: "none", stroke: color, "stroke-width": width, class: "tl-series" });
      rate.dataset.group = g.group;
      rate.dataset.segment = i;
      const quorum = svg("path", { d: seriesPath(seg.map((p) => [p[0], p[2]]), x, yQ, true),
        fill: "none", stroke: color, "stroke-width": width, class: "tl-quorum" });
      quorum.dataset.group = g.group;
      root.append(rate, quorum);
    });
  });
}

// A row for each label: the first where it starts after the previous label there ended,
// so that marks close in time do not write over each other (widths estimated from the
// number of characters). A label near the right edge reads leftward from its line.
function labelPlaces(marks, x) {
  const ends = [];
  return marks.map((m) => {
    const px = x(m.t);
    const width = (m.label.length + 1) * 5.6;
    const leftward = px + width > TL.W - TL.right;
    const start = leftward ? px - width : px;
    let row = ends.findIndex((end) => end < start);
    if (row < 0) row = ends.length < 6 ? ends.length : ends.indexOf(Math.min(...ends));
    ends[row] = leftward ? px : px + width;
    return { px, row, leftward };
  });
}

function drawMarks(root, d, x) {
  const places = labelPlaces(d.marks, x);
  d.marks.forEach((m, i) => {
    const color = MARK_COLORS[m.kind] || "#1d2430";
    const { px, row, leftward } = places[i];
    const g = svg("g", { class: "tl-mark" });
    g.dataset.kind = m.kind;
    g.append(svg("line", { x1: px, x2: px, y1: TL.rateTop, y2: TL.qTop + TL.qH, stroke: color,
      "stroke-dasharray": "4 3", "stroke-width": 1.2 }));
    const label = svg("text", { x: leftward ? px - 3 : px + 3, y: TL.rateTop + 11 + 12 * row,
      fill: color, class: "tl-label", "text-anchor": leftward ? "end" : "start" }, m.label);
    label.append(svg("title", {}, `${time(m.t)} ${m.label}`));
    g.append(label);
    root.append(g);
  });
}

function drawLegend(root, d) {
  let px = TL.left;
  for (const g of d.groups) {
    const color = GROUP_COLORS[g.group % GROUP_COLORS.length];
    root.append(svg("rect", { x: px, y: TL.H - 10, width: 14, height: 3, fill: color }));
    const text = svg("text", { x: px + 18, y: TL.H - 6, class: "tl-legend" }, `group ${g.group}`);
    text.dataset.group = g.group;
    root.append(text);
    px += 90;
  }
}

function renderTimeline(data) {
  const d = viewOf(data);
  const box = $("#timeline");
  const root = svg("svg", { viewBox: `0 0 ${TL.W} ${TL.H}`, role: "img",
    "aria-label": `fault timeline of job ${d.job}` });
  root.dataset.job = d.job;
  const rates = d.groups.flatMap((g) => g.segments.flat().map((p) => p[1]));
  const rateMax = niceMax(Math.max(0, ...rates));
  const qMax = Math.max(1, d.full_quorum, ...d.groups.flatMap((g) => g.segments.flat().map((p) => p[2])));
  const x = scaleX(d);
  axes(root, d, x, rateMax, qMax);
  drawSeries(root, d, x, rateMax, qMax);
  drawMarks(root, d, x);
  drawLegend(root, d);
  if (!d.groups.length) {
    root.append(svg("text", { x: TL.W / 2, y: TL.rateTop + TL.rateH / 2, "text-anchor": "middle",
      class: "tl-empty" }, `no step samples for job ${d.job} in this window`));
  }
  box.replaceChildren(root);
  const faults = d.marks.filter((m) => m.kind === "fault").length;
  const missing = d.missing.map((k) => MARK_NAMES[k] || k).join(", ");
  $("#timeline-summary").textContent = `job ${d.job} · ${d.groups.length} group(s) · ` +
    `${faults} fault(s) · ${d.samples} samples` + (d.unmapped ? ` (${d.unmapped} without a group)` : "") +
    (missing ? ` · not seen: ${missing}` : "");
}

// The job to show: the one typed in, else the first job of the replica table.
function timelineJob() {
  const typed = new FormData($("#timeline-form")).get("job").trim();
  if (typed) return typed;
  const first = replicas.order.length ? replicas.rows.get(replicas.order[0]) : null;
  return first ? String(first[replicas.col.job_id]) : null;
}

async function loadTimeline() {
  const job = timelineJob();
  if (job === null) {
    $("#timeline-summary").textContent = "no job yet";
    return;
  }
  const windowS = new FormData($("#timeline-form")).get("window");
  const resp = await fetch(`/api/timeline?${new URLSearchParams({ job, window: windowS })}`,
    { cache: "no-store" });
  const data = await resp.json();
  if (!resp.ok) {
    $("#timeline-summary").textContent = data.error || `error ${resp.status}`;
    return;
  }
  timeline.data = data;
  renderTimeline(data);
}

// Called by app.js for every event of the stream: a fault or its follow-up redraws soon.
let timelineSoon = null;
function onTimelineEvent(ev) {
  if (!["gpu_verdict", "drained", "replica_leave", "standby_assumed", "replica_register",
    "drain_requested"].includes(ev.kind)) return;
  clearTimeout(timelineSoon);
  timelineSoon = setTimeout(() => loadTimeline().catch(report), 500);
}

document.addEventListener("DOMContentLoaded", () => {
  const form = $("#timeline-form");
  form.addEventListener("submit", (e) => { e.preventDefault(); loadTimeline().catch(report); });
  form.addEventListener("change", () => loadTimeline().catch(report));
  setInterval(() => loadTimeline().catch(report), 3000);
  setTimeout(() => loadTimeline().catch(report), 500);
});
