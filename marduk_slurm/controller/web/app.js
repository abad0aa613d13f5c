// The marduk dashboard: reads the controller's JSON API once, then follows its event stream
// (the replica table arrives over the stream itself).
// Every value from the server is inserted as text (never as HTML).
"use strict";

const FAULT_KINDS = new Set(["gpu_verdict", "port_verdict", "mount_verdict", "drain_requested", "drained", "drain_skipped",
  "drain_failed", "operator_drain", "operator_resume", "resumed", "leave_requested",
  "replica_leave", "straggler", "straggler_cleared", "risk_drain", "step_gone",
  "resume_check_failed", "job_credential_refused"]);
const NODE_KINDS = new Set([...FAULT_KINDS, "gpu_inventory", "replica_register", "step_start",
  "step_end"]);

const $ = (sel) => document.querySelector(sel);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells, cls) {
  const tr = el("tr", null, cls);
  for (const cell of cells) tr.append(cell instanceof Node ? wrap(cell) : el("td", cell ?? "-"));
  return tr;
}

function wrap(node) {
  if (node.tagName === "TD") return node;
  const td = el("td");
  td.append(node);
  return td;
}

function fill(tbody, rows, emptyText, columns) {
  if (!rows.length) {
    const td = el("td", emptyText);
    td.colSpan = columns;
    const tr = el("tr", null, "empty");
    tr.append(td);
    rows = [tr];
  }
  tbody.replaceChildren(...rows);
}

function badge(text, level) { return el("span", text, "badge " + (level || "")); }
function time(ts) { return ts ? new Date(ts * 1000).toLocaleTimeString() : "-"; }
function ago(ts) {
  if (!ts) return "-";
  const s = Date.now() / 1000 - ts;
  return s < 1 ? "now" : s < 120 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`;
}
function num(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
function shortUuid(u) { return u && u.length > 16 ? u.slice(0, 13) + "…" : (u || "-"); }
function riskLevel(score) { return score >= 50 ? "bad" : score >= 20 ? "warn" : "ok"; }

async function getJSON(path) {
  const resp = await fetch(path, { cache: "no-store" });
  if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
  return resp.json();
}

// -- status ---------------------------------------------------------------------------------

async function loadStatus() {
  const s = await getJSON("/api/status");
  $("#summary").textContent = `NATS ${s.nats} · nodes ${s.nodes} (${s.nodes_drained} drained) · ` +
    `GPUs ${s.gpus} · jobs ${s.jobs_active} · replicas ${s.replicas_active} · ` +
    `stragglers ${s.stragglers} · Slurm actions pending ${s.outbox_pending} · ` +
    `rejected ${s.rejected_total}`;
  renderRejected(s);
}

// What the controller refused: by (subject class, message kind, cause), busiest first. A
// controller without these keys yet shows its per-reason counts, or nothing.
function renderRejected(s) {
  let rows = Array.isArray(s.rejections) ? s.rejections : null;
  if (rows === null && s.rejected && typeof s.rejected === "object") {
    rows = Object.entries(s.rejected).map(([cause, count]) => ({ subject: "-", kind: "-", cause, count }))
      .sort((a, b) => b.count - a.count);
  }
  rows = rows || [];
  const total = rows.reduce((sum, r) => sum + Number(r.count || 0), 0);
  const dead = s.dead_letters === undefined ? "" : ` · dead letters ${s.dead_letters}`;
  $("#rejected-summary").textContent = `${total} rejected${dead}`;
  fill($("#rejected tbody"), rows.slice(0, 10).map((r) => {
    const tr = row([el("span", r.subject, "mono"), r.kind, r.cause, el("td", r.count, "num")]);
    tr.dataset.cause = String(r.cause);
    return tr;
  }), "nothing rejected", 4);
}

// -- replicas -------------------------------------------------------------------------------
// The server sends the table once (a snapshot, in parts) and then what changed each tick
// (a delta: rows added, changed, removed). Rows are arrays in the order of the snapshot's
// `fields`. Only the rows in view are in the page: a table of 100,000 replicas keeps a few
// dozen <tr> elements, with spacer rows standing in for the rest.

const replicas = {
  rows: new Map(), order: [], col: {}, version: -1, pending: null, summary: null, ts: 0,
  rowHeight: 0, scheduled: false,
};

function replicaKey(r) {
  const c = replicas.col;
  return [r[c.job_id], r[c.replica_group], r[c.group_rank], r[c.replica_id]];
}

function compareKeys(a, b) {
  for (let i = 0; i < a.length; i++) {
    if (a[i] < b[i]) return -1;
    if (a[i] > b[i]) return 1;
  }
  return 0;
}

// The store's order: job, group, rank, replica id.
function sortReplicas() {
  const keyed = [...replicas.rows.values()].map((r) => [replicaKey(r), r[replicas.col.replica_id]]);
  keyed.sort((a, b) => compareKeys(a[0], b[0]));
  replicas.order = keyed.map((k) => k[1]);
}

function onSnapshot(msg) {
  const snap = JSON.parse(msg.data);
  if (snap.part === 0) {
    replicas.col = Object.fromEntries(snap.fields.map((name, i) => [name, i]));
    replicas.pending = new Map();
  }
  if (!replicas.pending) return;  // a part of a snapshot whose start this page missed
  for (const r of snap.rows) replicas.pending.set(r[replicas.col.replica_id], r);
  if (snap.part + 1 < snap.parts) return;
  replicas.rows = replicas.pending;
  replicas.pending = null;
  replicas.version = snap.v;
  replicas.summary = snap.summary;
  sortReplicas();
  renderReplicasSoon();
}

function onDelta(msg) {
  const d = JSON.parse(msg.data);
  if (d.v <= replicas.version || replicas.pending) return;
  const id = replicas.col.replica_id;
  for (const r of d.add) replicas.rows.set(r[id], r);
  for (const r of d.change) replicas.rows.set(r[id], r);
  for (const rid of d.remove) replicas.rows.delete(rid);
  if (d.add.length || d.remove.length) sortReplicas();
  replicas.version = d.v;
  replicas.summary = d.summary;
  replicas.ts = d.ts;
  renderReplicasSoon();
}

function renderReplicasSoon() {
  if (replicas.scheduled) return;
  replicas.scheduled = true;
  requestAnimationFrame(() => { replicas.scheduled = false; renderReplicas(); });
}

function replicaRow(r) {
  const c = replicas.col;
  const tr = row([
    r[c.job_id], r[c.replica_group], r[c.node], r[c.state], r[c.last_step],
    el("td", num(r[c.step_rate], 2), "num"), el("td", num(r[c.step_time_ms], 1), "num"),
    el("td", num(r[c.work_ms], 1), "num"), ago(r[c.last_seen]), r[c.config_revision],
    r[c.straggler] ? badge("straggler", "bad") : el("span", "-", "muted"),
    el("span", r[c.replica_id], "mono"),
  ], "r" + (r[c.straggler] ? " fault" : ""));
  tr.dataset.replica = r[c.replica_id];
  return tr;
}

function spacer(rows) {
  const td = el("td");
  td.colSpan = 12;
  td.style.height = `${rows * replicas.rowHeight}px`;  // CSSOM, allowed by the page's CSP
  const tr = el("tr", null, "spacer");
  tr.append(td);
  return tr;
}

function renderReplicas() {
  const box = $("#replicas-scroll");
  const tbody = $("#replicas tbody");
  renderReplicaSummary();
  const total = replicas.order.length;
  if (!total) { fill(tbody, [], "no replicas", 12); return; }
  if (!replicas.rowHeight) {  // measured once, from a real row
    tbody.replaceChildren(replicaRow(replicas.rows.get(replicas.order[0])));
    replicas.rowHeight = tbody.firstChild.getBoundingClientRect().height || 24;
  }
  const head = $("#replicas thead").getBoundingClientRect().height;
  const overscan = 10;
  const first = Math.max(0, Math.floor((box.scrollTop - head) / replicas.rowHeight) - overscan);
  const count = Math.ceil(box.clientHeight / replicas.rowHeight) + 2 * overscan;
  const last = Math.min(total, first + count);
  const rows = replicas.order.slice(first, last).map((rid) => replicaRow(replicas.rows.get(rid)));
  tbody.replaceChildren(spacer(first), ...rows, spacer(total - last));
  box.dataset.rows = String(total);
  box.dataset.first = String(first);
}

function renderReplicaSummary() {
  const s = replicas.summary;
  if (!s) return;
  const states = Object.entries(s.states).map(([k, v]) => `${k} ${v}`).join(", ");
  const when = replicas.ts ? ` · updated ${time(replicas.ts)}` : "";
  $("#replicas-summary").textContent =
    `${s.replicas} replicas${states ? ` (${states})` : ""} · jobs ${s.jobs} · ` +
    `stragglers ${s.stragglers}${when}`;
}

// -- nodes: drained list and the DR mapping ---------------------------------------------------

function renderNodes(nodes) {
  const drained = nodes.filter((n) => n.flags.includes("DRAIN") || n.drain_pending);
  fill($("#drained tbody"), drained.map((n) => {
    const p = n.drain_pending;
    const state = n.flags.includes("DRAIN") ? badge(n.state || "drained", "bad")
      : badge("drain queued", "warn");
    if (p && p.last_error) state.title = `Slurm: ${p.last_error}`;
    const tr = row([el("strong", n.name), state, n.drained_by_marduk ? "yes" : "no",
      badge(String(n.risk), riskLevel(n.risk)),
      el("td", n.reason || (p ? p.reason : "") || "-", "reason")], "fault");
    tr.dataset.node = n.name;
    return tr;
  }), "no drained nodes", 5);

  const tree = el("ul", null, "tree");
  for (const n of nodes) {
    const li = el("li");
    li.append(el("strong", n.name), " ", el("span", n.state || "", "muted"));
    if (n.flags.includes("DRAIN")) li.append(" ", badge("drained", "bad"));
    else if (n.drain_pending) li.append(" ", badge("drain queued", "warn"));
    const gpus = el("ul", null, "tree");
    for (const g of n.gpus) {
      const gl = el("li");
      gl.append(`GPU ${g.idx} `, el("span", shortUuid(g.uuid), "mono"), " ");
      gl.append(badge(g.health, g.health === "none" ? "ok" : "bad"), " ");
      const risk = badge(`risk ${g.risk}`, riskLevel(g.risk));
      risk.title = (g.risk_factors || []).join("\n");
      gl.append(risk);
      const reps = el("ul", null, "tree");
      for (const r of n.replicas.filter((r) => (r.gpu_uuids || []).includes(g.uuid))) {
        const rl = el("li");
        rl.append(el("span", r.replica_id, "mono"), ` → job ${r.job_id} group ${r.replica_group}`);
        reps.append(rl);
      }
      gl.append(reps);
      gpus.append(gl);
    }
    // Ports and mount points (node health beyond the GPU): those with a verdict to show.
    for (const c of (n.components || []).filter((c) => c.health !== "none")) {
      const cl = el("li", null, "component");
      cl.append(`${c.component} `, el("span", c.target, "mono"), " ",
        badge(c.health, c.health === "watch" ? "warn" : "bad"), " ",
        el("span", c.health_reason, "reason"));
      gpus.append(cl);
    }
    const loose = n.replicas.filter((r) => !(r.gpu_uuids || []).some((u) => n.gpus.some((g) => g.uuid === u)));
    for (const r of loose) {
      const rl = el("li");
      rl.append(el("span", r.replica_id, "mono"), ` → job ${r.job_id} (GPU not in inventory)`);
      gpus.append(rl);
    }
    li.append(gpus);
    tree.append(li);
  }
  $("#mapping").replaceChildren(nodes.length ? tree : el("p", "no nodes yet", "muted"));
}

async function loadNodes() { renderNodes(await getJSON("/api/nodes")); }

// -- history --------------------------------------------------------------------------------

function filters() {
  const f = new FormData($("#filters"));
  return { node: f.get("node").trim(), job: f.get("job").trim(), since: f.get("since"),
           faults: f.get("faults") === "on" };
}

function matches(ev, f) {
  if (f.node && ev.node !== f.node) return false;
  if (f.job && String(ev.job_id) !== f.job) return false;
  if (f.faults && !FAULT_KINDS.has(ev.kind)) return false;
  return true;
}

function historyRow(ev, fresh) {
  const cls = [FAULT_KINDS.has(ev.kind) && ev.kind !== "resumed" ? "fault" : "", fresh ? "fresh" : ""];
  const tr = row([ev.id, time(ev.ts), el("strong", ev.kind), ev.node, ev.job_id,
    el("span", ev.gpu_uuid ? shortUuid(ev.gpu_uuid) : (ev.evidence || {}).target || "-", "mono"),
    el("td", ev.reason, "reason")], cls.join(" "));
  tr.dataset.kind = ev.kind;
  tr.dataset.id = ev.id;
  return tr;
}

async function loadHistory() {
  const f = filters();
  const q = new URLSearchParams({ limit: "300" });
  if (f.node) q.set("node", f.node);
  if (f.job) q.set("job", f.job);
  if (f.since) q.set("since", String(Date.now() / 1000 - Number(f.since)));
  if (f.faults) q.set("kind", [...FAULT_KINDS].join(","));
  const events = await getJSON("/api/history?" + q);
  fill($("#history tbody"), events.reverse().map((ev) => historyRow(ev, false)), "no events", 7);
}

function addEvent(ev) {
  if (!matches(ev, filters())) return;
  const tbody = $("#history tbody");
  if (tbody.querySelector(`tr[data-id="${Number(ev.id)}"]`)) return;
  const empty = tbody.querySelector("tr.empty");
  if (empty) empty.remove();
  tbody.prepend(historyRow(ev, true));
  while (tbody.children.length > 300) tbody.lastChild.remove();
}

// -- live updates -----------------------------------------------------------------------------

let refreshTimer = null;
function refreshSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => { loadNodes().catch(report); loadStatus().catch(report); }, 300);
}

function report(err) { console.error(err); }

function connect() {
  const source = new EventSource("/api/events");
  const conn = $("#conn");
  source.onopen = () => { conn.textContent = "live"; conn.className = "conn on"; };
  source.onerror = () => { conn.textContent = "reconnecting"; conn.className = "conn off"; };
  source.addEventListener("event", (msg) => {
    const ev = JSON.parse(msg.data);
    addEvent(ev);
    if (NODE_KINDS.has(ev.kind)) refreshSoon();
    if (typeof onTimelineEvent === "function") onTimelineEvent(ev);  // timeline.js
  });
  source.addEventListener("snapshot", onSnapshot);
  source.addEventListener("delta", onDelta);
}

document.addEventListener("DOMContentLoaded", () => {
  $("#filters").addEventListener("submit", (e) => { e.preventDefault(); loadHistory().catch(report); });
  $("#filters").addEventListener("change", () => loadHistory().catch(report));
  $("#replicas-scroll").addEventListener("scroll", renderReplicasSoon, { passive: true });
  Promise.all([loadStatus(), loadNodes(), loadHistory()]).catch(report);
  connect();
  setInterval(() => loadStatus().catch(report), 5000);
});
