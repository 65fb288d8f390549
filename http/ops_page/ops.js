// The operator's page: polls the coordinator's /ops/api/* JSON every two
// seconds and draws the deployment, its runs, the selected run's curves
// (plain SVG) and its checkpoints. No libraries.
"use strict";

const state = { run: null };

async function getJson(path) {
  const r = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { window.location = "/ops/login"; throw new Error("not signed in"); }
  const body = await r.json();
  if (!r.ok) throw new Error((body.error && body.error.message) || r.statusText);
  return body;
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fmt(v, digits = 4) {
  if (v === undefined || v === null || Number.isNaN(v)) return "–";
  if (Math.abs(v) >= 1e4 || (Math.abs(v) < 1e-3 && v !== 0)) return v.toExponential(2);
  return Number(v).toPrecision(digits);
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; ++i; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function when(ms) { return ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "never"; }

function fillRows(table, rows) {
  const body = table.querySelector("tbody");
  body.replaceChildren(...rows);
}

function drawDeployment(d) {
  const model = document.getElementById("model");
  const l = d.layout;
  const items = [
    ["state", d.state + (d.detail ? ` (${d.detail})` : "")],
    ["model", `${d.model.base_model} (${d.model.architecture})`],
    ["layout", `${l.replicas} replica(s) × ${l.node_count} node(s) × ${l.devices_per_node} device(s); tp ${l.tp}, ep ${l.ep}, cp ${l.cp}`],
    ["active parameters", d.model.active_parameters ? d.model.active_parameters.toLocaleString() : "–"],
    ["max_seq_len", d.model.max_seq_len],
    ["unfinished operations", d.unfinished_ops],
  ];
  model.replaceChildren(...items.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  model.dataset.state = d.state;
  fillRows(document.getElementById("replicas"), d.replicas.map((r) => {
    const tr = el("tr");
    tr.append(el("td", r.replica), el("td", r.registered ? "yes" : "no", r.registered ? "good" : "bad"),
              el("td", r.connected ? "yes" : "no", r.connected ? "good" : "bad"), el("td", r.host), el("td", r.pid),
              el("td", r.heartbeat_age_s === null ? "–" : `${r.heartbeat_age_s.toFixed(1)} s`));
    return tr;
  }));
}

function drawRuns(runs) {
  if (!state.run && runs.length) state.run = runs[0].run_id;
  fillRows(document.getElementById("runs"), runs.map((r) => {
    const tr = el("tr");
    tr.dataset.run = r.run_id;
    if (r.run_id === state.run) tr.className = "selected";
    const x = r.latest || {};
    const perToken = x.loss_tokens ? x.loss_sum / x.loss_tokens : undefined;
    const live = r.state === "live";
    tr.append(el("td", r.run_id), el("td", r.state), el("td", live ? r.step : "–"),
              el("td", live ? r.policy_version : "–"), el("td", live ? r.lora_rank || "full" : "–"), el("td", fmt(perToken)), el("td", fmt(x.grad_norm)),
              el("td", fmt(x.tokens_per_s, 3)), el("td", x.mfu === undefined ? "–" : `${(100 * x.mfu).toFixed(2)} %`));
    tr.addEventListener("click", () => { state.run = r.run_id; refresh(); });
    return tr;
  }));
}

// A line chart of points [{x, y}] into an SVG, with its extremes labelled.
// data-points on the SVG says how many points it drew.
function chart(svg, points, xLabel) {
  const W = 420, H = 200, L = 48, R = 10, T = 10, B = 28;
  const ns = "http://www.w3.org/2000/svg";
  const node = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  svg.replaceChildren();
  svg.dataset.points = String(points.length);
  svg.append(node("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }),
             node("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  if (!points.length) {
    svg.append(node("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet"));
    return;
  }
  const xs = points.map((p) => p.x), ys = points.map((p) => p.y);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 + 1e-9; y1 += Math.abs(y1) * 0.05 + 1e-9; }
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  svg.append(node("polyline", { class: "line", points: points.map((p) => `${px(p.x)},${py(p.y)}`).join(" ") }));
  for (const p of points) svg.append(node("circle", { class: "point", cx: px(p.x), cy: py(p.y), r: 2.2 }));
  svg.append(node("text", { x: L - 4, y: T + 8, "text-anchor": "end" }, fmt(y1, 3)),
             node("text", { x: L - 4, y: H - B, "text-anchor": "end" }, fmt(y0, 3)),
             node("text", { x: L, y: H - 8 }, String(Math.min(...xs))),
             node("text", { x: W - R, y: H - 8, "text-anchor": "end" }, `${Math.max(...xs)} ${xLabel}`));
}

function drawHistory(points) {
  const loss = [], grad = [], tokens = [];
  for (const p of points) {
    const m = p.metrics || {};
    if (p.type === "forward_backward" && m["num_loss_tokens:sum"] > 0) {
      loss.push({ x: loss.length + 1, y: m["loss:sum"] / m["num_loss_tokens:sum"] });
    } else if (p.type === "optim_step") {
      if (m["grad_norm:mean"] !== undefined) grad.push({ x: p.step, y: m["grad_norm:mean"] });
      if (p.tokens_per_s !== undefined) tokens.push({ x: p.step, y: p.tokens_per_s });
    }
  }
  chart(document.getElementById("chart-loss"), loss, "forward_backward");
  chart(document.getElementById("chart-grad-norm"), grad, "step");
  chart(document.getElementById("chart-tokens"), tokens, "step");
}

function drawCheckpoints(list) {
  fillRows(document.getElementById("checkpoints"), list.map((c) => {
    const perRank = {};
    for (const f of c.files) {
      const k = f.node_rank < 0 ? "whole" : `node_rank ${f.node_rank}`;
      perRank[k] = perRank[k] || { n: 0, size: 0 };
      perRank[k].n += 1;
      perRank[k].size += f.size_bytes;
    }
    const tr = el("tr");
    tr.append(el("td", c.id), el("td", c.type), el("td", bytes(c.size_bytes)), el("td", when(c.created_unix_ms)),
              el("td", when(c.expires_unix_ms)),
              el("td", Object.entries(perRank).map(([k, v]) => `${k}: ${v.n} file(s), ${bytes(v.size)}`).join("; ")));
    return tr;
  }));
}

async function refresh() {
  const error = document.getElementById("error");
  try {
    const [d, runs] = await Promise.all([getJson("/ops/api/deployment"), getJson("/ops/api/runs")]);
    drawDeployment(d);
    drawRuns(runs.runs);
    const section = document.getElementById("run");
    section.hidden = !state.run;
    if (state.run) {
      document.getElementById("run-id").textContent = state.run;
      const run = encodeURIComponent(state.run);
      const history = await getJson(`/ops/api/runs/${run}/history`).catch(() => ({ points: [] }));
      drawHistory(history.points);
      const note = document.getElementById("checkpoints-note");
      try {
        drawCheckpoints((await getJson(`/ops/api/runs/${run}/checkpoints`)).checkpoints);
        note.textContent = "";
      } catch (e) {
        drawCheckpoints([]);
        note.textContent = e.message;
      }
    }
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = "true";
    error.textContent = "";
  } catch (e) {
    error.textContent = e.message;
  }
}

refresh();
setInterval(refresh, 2000);
