// The Aube operator dashboard: polls /_aube/dashboard/state once a second and redraws. Plain DOM, no libraries:
// the page works on a machine without internet. Text goes in with textContent only, never as HTML.
"use strict";

const STATE_URL = "/_aube/dashboard/state";
const POLL_MS = 1000;
const WINDOW_S = 600; // the charts' time span
const STATES = ["starting", "free", "busy", "draining", "unhealthy"];
const SVG = "http://www.w3.org/2000/svg";

function $(id) { return document.getElementById(id); }

function cell(text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function num(n) { return cell(String(n), n === 0 ? "num zero" : "num"); }

function stateBadge(state) {
  const td = document.createElement("td");
  const span = document.createElement("span");
  span.className = "state state-" + state;
  span.textContent = state;
  td.appendChild(span);
  return td;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.floor(seconds);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}

function fill(tbody, rows, columns, empty) {
  const out = rows.map((row) => {
    const tr = document.createElement("tr");
    for (const [key, value] of Object.entries(row.data || {})) tr.dataset[key] = value;
    row.cells.forEach((td) => tr.appendChild(td));
    return tr;
  });
  if (out.length === 0) {
    const tr = document.createElement("tr");
    const td = cell(empty, "empty");
    td.colSpan = columns;
    tr.appendChild(td);
    out.push(tr);
  }
  tbody.replaceChildren(...out);
}

function renderTotals(state) {
  const t = state.totals;
  $("total-functions").textContent = t.functions;
  $("total-instances").textContent = t.instances;
  $("total-streams").textContent = t.open_streams;
  $("total-free").textContent = t.states.free || 0;
  $("total-starting").textContent = t.states.starting || 0;
  $("replica").textContent = "proxy " + state.proxy_id;
}

function renderFunctions(state) {
  fill($("functions"), state.functions.map((f) => ({
    data: { function: f.name },
    cells: [
      cell(f.name + (f.deleting ? " (deleting)" : ""), "mono"), num(f.version), cell(f.runtime), cell(f.tenant || "(operator)"),
      cell(f.protected ? "token" : "public"),
      ...STATES.map((s) => num(f.states[s] || 0)), num(f.outdated),
      cell(f.min_free + " / " + f.max_instances, "num"),
    ],
  })), 12, "no functions deployed");
}

function renderStreams(state) {
  const busy = state.instances.filter((i) => i.state === "busy");
  fill($("streams"), busy.map((i) => ({
    data: { function: i.function, instance: i.instance_id },
    cells: [cell(i.function, "mono"), cell(i.instance_id, "mono"), cell(i.host), cell(i.claimed_by || "–"),
      cell(duration(i.busy_for), "num")],
  })), 5, "no open streams");
}

function renderHosts(state) {
  fill($("hosts"), state.hosts.map((h) => ({
    data: { host: h.host },
    cells: [cell(h.host, "mono"), ...STATES.map((s) => num(h.states[s] || 0))],
  })), 6, "no instances");
}

function renderInstances(state) {
  fill($("instances"), state.instances.map((i) => ({
    data: { function: i.function, instance: i.instance_id, state: i.state },
    cells: [cell(i.function, "mono"), num(i.slot), cell(i.instance_id, "mono"), num(i.version), stateBadge(i.state),
      cell(i.host), cell(i.runtime), num(i.streams_served), cell(duration(i.age), "num")],
  })), 9, "no instances");
}

function renderChart(series, key, now) {
  const svg = $("chart-" + key);
  const values = series[key];
  const max = Math.max(1, ...values);
  const width = Math.max(1, (300 * series.interval) / WINDOW_S);
  const bars = [];
  values.forEach((v, i) => {
    const x = 300 - ((now - series.t[i]) / WINDOW_S) * 300;
    if (x < 0 || v <= 0) return;
    const h = (v / max) * 56;
    const rect = document.createElementNS(SVG, "rect");
    rect.setAttribute("x", String(x - width));
    rect.setAttribute("y", String(60 - h));
    rect.setAttribute("width", String(Math.max(1, width - 0.3)));
    rect.setAttribute("height", String(h));
    const title = document.createElementNS(SVG, "title");
    title.textContent = new Date(series.t[i] * 1000).toLocaleTimeString() + ": " + v;
    rect.appendChild(title);
    bars.push(rect);
  });
  svg.replaceChildren(...bars);
  // Counts add up over the window; open streams is a level, so its figure is the latest one.
  const sum = key === "open_streams" ? (values.length ? values[values.length - 1] : 0) : values.reduce((a, b) => a + b, 0);
  $("sum-" + key).textContent = String(sum);
}

function render(state) {
  renderTotals(state);
  renderFunctions(state);
  renderStreams(state);
  renderHosts(state);
  renderInstances(state);
  for (const key of ["claims", "rejections", "cold_starts", "open_streams"]) renderChart(state.series, key, state.at);
  $("series-note").textContent = "(one bar per " + state.series.interval + " s; claims and rejections of this replica)";
}

let updates = 0;

async function poll() {
  const status = $("status");
  try {
    const response = await fetch(STATE_URL, { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status);
    const state = await response.json();
    render(state);
    updates += 1;
    document.body.dataset.updates = String(updates);
    status.textContent = "live · " + new Date(state.at * 1000).toLocaleTimeString();
    status.className = "status live";
  } catch (err) {
    status.textContent = "disconnected (" + err.message + ")";
    status.className = "status down";
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

document.addEventListener("DOMContentLoaded", poll);
