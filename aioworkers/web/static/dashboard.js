// aioworkers dashboard: progressive enhancement only. Every page works without this file;
// with it, the numbers and the chart refresh themselves from the JSON endpoint.
"use strict";

const POLL_MS = 2000;
const SERIES = [
  // [label, colour, value of a point: [at, ready, in_flight, delayed, dead, enq/s, done/s, failed/s]]
  ["ready", "#1f6feb", (p) => p[1]],
  ["in flight", "#8250df", (p) => p[2]],
  ["done/s", "#1a7f37", (p) => p[6]],
  ["failed/s", "#cf222e", (p) => p[7]],
];

function fmtNum(v) { return v === null || v === undefined ? "-" : v.toLocaleString("en-US"); }
function fmtRate(v) {
  return v === null || v === undefined ? "-" :
    v.toLocaleString("en-US", { minimumFractionDigits: 1, maximumFractionDigits: 1 });
}
function fmtPct(v) { return v === null || v === undefined ? "-" : (v * 100).toFixed(1) + "%"; }

function updateTable(queues) {
  for (const row of document.querySelectorAll("tr[data-queue]")) {
    const q = queues[row.dataset.queue];
    if (!q) continue;
    const set = (field, text) => {
      const cell = row.querySelector(`[data-field="${field}"]`);
      if (!cell) return;
      const target = cell.querySelector("a") || cell;
      target.textContent = text;
    };
    for (const f of ["ready", "in_flight", "delayed", "dead"]) set(f, fmtNum(q[f]));
    set("enqueued", fmtRate(q.rates.enqueued));
    set("done", fmtRate(q.rates.done));
    set("failed", fmtRate(q.rates.failed));
    set("error_rate", fmtPct(q.error_rate));
  }
}

// What the live workers counted (the worker registry): the throttled column and the line.
function updateWorkers(workers) {
  if (!workers || workers.live === null) return;
  for (const row of document.querySelectorAll("tr[data-queue]")) {
    const cell = row.querySelector('[data-field="throttled"]');
    const n = workers.by_queue[row.dataset.queue];
    if (cell && n !== undefined) cell.textContent = fmtNum(n);
  }
  for (const el of document.querySelectorAll("[data-workers]")) {
    el.textContent = fmtNum(workers[el.dataset.workers]);
  }
}

// Sums the queues' series by time (the samples of one poll share their time).
function combine(series) {
  const byTime = new Map();
  for (const points of Object.values(series)) {
    for (const p of points) {
      const key = Math.round(p[0]);
      const acc = byTime.get(key) || [key, 0, 0, 0, 0, 0, 0, 0];
      for (let i = 1; i < 8; i++) acc[i] += p[i] || 0;
      byTime.set(key, acc);
    }
  }
  return [...byTime.values()].sort((a, b) => a[0] - b[0]);
}

function draw(canvas, points) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 34;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#5b6670";
  if (points.length < 2) {
    ctx.fillText("collecting samples…", pad, h / 2);
    return;
  }
  const t0 = points[0][0], t1 = points[points.length - 1][0];
  let max = 1;
  for (const p of points) for (const [, , value] of SERIES) max = Math.max(max, value(p) || 0);
  const x = (t) => pad + ((t - t0) / Math.max(t1 - t0, 1)) * (w - 2 * pad);
  const y = (v) => h - pad - (v / max) * (h - 2 * pad);
  ctx.strokeStyle = "#d8dee4";
  ctx.beginPath(); ctx.moveTo(pad, y(0)); ctx.lineTo(w - pad, y(0)); ctx.moveTo(pad, y(max)); ctx.lineTo(w - pad, y(max)); ctx.stroke();
  ctx.fillText(fmtNum(Math.round(max)), 2, y(max) + 4);
  ctx.fillText("0", 2, y(0) + 4);
  ctx.fillText(`${Math.round(t1 - t0)} s`, w - pad - 20, h - 8);
  for (const [, colour, value] of SERIES) {
    ctx.strokeStyle = colour; ctx.lineWidth = 2; ctx.beginPath();
    points.forEach((p, i) => { const v = value(p) || 0; i ? ctx.lineTo(x(p[0]), y(v)) : ctx.moveTo(x(p[0]), y(v)); });
    ctx.stroke();
  }
}

function legend() {
  const el = document.getElementById("legend");
  if (!el || el.childElementCount) return;
  for (const [label, colour] of SERIES) {
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = colour;
    item.append(swatch, label);
    el.append(item);
  }
}

async function poll(canvas) {
  try {
    const reply = await fetch(canvas.dataset.poll, { credentials: "same-origin", headers: { accept: "application/json" } });
    if (!reply.ok) return;
    const doc = await reply.json();
    updateTable(doc.queues);
    updateWorkers(doc.workers);
    const points = combine(doc.series);
    draw(canvas, points);
    canvas.dataset.samples = String(points.length);
    canvas.dataset.updated = String(doc.ts);
  } catch (err) {
    // A failed poll (server restarting) is tried again on the next tick.
  }
}

function selectAll() {
  const box = document.getElementById("select-all");
  if (!box) return;
  box.hidden = false;
  box.addEventListener("change", () => {
    for (const c of document.querySelectorAll('input[name="entry"]')) c.checked = box.checked;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  selectAll();
  const canvas = document.getElementById("chart");
  if (!canvas) return;
  legend();
  poll(canvas);
  setInterval(() => poll(canvas), POLL_MS);
});
