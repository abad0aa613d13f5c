// The marduk dashboard: reads the controller's JSON API once, then follows its event stream.
// Every value from the server is inserted as text (never as HTML).
"use strict";

const FAULT_KINDS = new Set(["gpu_verdict", "drain_requested", "drained", "drain_skipped",
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

function renderReplicas(replicas) {
  const rows = replicas.map((r) => row([
    r.job_id, r.replica_group, r.node, r.state, r.last_step,
    el("td", num(r.step_rate, 2), "num"), el("td", num(r.step_time_ms, 1), "num"),
    el("td", num(r.work_ms, 1), "num"), ago(r.last_seen), r.config_revision,
    r.straggler ? badge("straggler", "bad") : el("span", "-", "muted"),
    el("span", r.replica_id, "mono"),
  ], r.straggler ? "fault" : ""));
  fill($("#replicas tbody"), rows, "no replicas", 12);
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
    el("span", shortUuid(ev.gpu_uuid), "mono"), el("td", ev.reason, "reason")], cls.join(" "));
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
  });
  source.addEventListener("replicas", (msg) => renderReplicas(JSON.parse(msg.data).replicas));
}

document.addEventListener("DOMContentLoaded", () => {
  $("#filters").addEventListener("submit", (e) => { e.preventDefault(); loadHistory().catch(report); });
  $("#filters").addEventListener("change", () => loadHistory().catch(report));
  Promise.all([loadStatus(), loadNodes(), getJSON("/api/replicas").then(renderReplicas),
               loadHistory()]).catch(report);
  connect();
  setInterval(() => loadStatus().catch(report), 5000);
});
