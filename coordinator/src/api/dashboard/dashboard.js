// The fleet dashboard: plain JavaScript over the coordinator's JSON API, charts as inline SVG.
// Routes live in the URL fragment (#/, #/device/ID, #/rollouts, #/rollout/ID, #/fl, #/fl/ID);
// a token may come as ?token=... after the route (it stays in the fragment, never sent to
// the server) and is then kept in sessionStorage.
"use strict";

const PAGE = 50;
let token = sessionStorage.getItem("edge-token") || "";
let timer = null;

function esc(v) {
  return String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function route() {
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  if (params.get("token")) {
    token = params.get("token");
    sessionStorage.setItem("edge-token", token);
  }
  return { parts: (path || "/").split("/").filter(Boolean).map(decodeURIComponent), params };
}

async function api(path) {
  const r = await fetch(path, { headers: token ? { Authorization: "Bearer " + token } : {} });
  const body = await r.json().catch(() => ({}));
  if (r.status === 401 || r.status === 403) {
    document.getElementById("login").hidden = false;
    throw new Error(body.error || "not authorized");
  }
  if (!r.ok) throw new Error(`${path}: ${r.status} ${body.error || ""}`);
  return body;
}

function mib(b) { return b == null ? "-" : (b / 1048576).toFixed(1) + " MiB"; }
function age(ms) {
  if (!ms) return "never";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? s + "s ago" : s < 3600 ? Math.round(s / 60) + "m ago" : Math.round(s / 3600) + "h ago";
}
function card(id, label, n, cls) {
  return `<div class="card"><div class="n ${cls || ""}" id="${id}">${esc(n)}</div><div>${esc(label)}</div></div>`;
}

// A line chart: series = [{name, points: [[x, y], ...]}]; x in ms or rounds.
function chart(id, title, series, unit, opts) {
  const W = 360, H = 160, L = 48, B = 22, T = 8, R = 8;
  const pts = series.flatMap((s) => s.points);
  const n = pts.length;
  let svg = `<svg id="${id}" data-points="${n}" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" role="img" aria-label="${esc(title)}">`;
  if (n === 0) {
    svg += `<text x="${W / 2}" y="${H / 2}" text-anchor="middle" fill="#6b7280">no data yet</text></svg>`;
    return `<div class="chart"><h3>${esc(title)}</h3>${svg}</div>`;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  const y0 = Math.min(0, ...ys), y1 = Math.max(...ys, y0 + 1e-9);
  const bars = opts && opts.bars;
  // Bars sit in bands (x values are whole rounds); lines span the axis.
  const sx = bars
    ? (x) => L + ((x - x0 + 0.5) / (x1 - x0 + 1)) * (W - L - R)
    : (x) => L + (x1 === x0 ? (W - L - R) / 2 : ((x - x0) / (x1 - x0)) * (W - L - R));
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - B - T);
  const colors = ["#2f6fdb", "#d9480f", "#2b8a3e", "#862e9c"];
  svg += `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" stroke="#999"/>`;
  svg += `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" stroke="#999"/>`;
  svg += `<text x="${L - 4}" y="${T + 8}" text-anchor="end" font-size="10">${esc(fmt(y1))}${esc(unit)}</text>`;
  svg += `<text x="${L - 4}" y="${H - B}" text-anchor="end" font-size="10">${esc(fmt(y0))}</text>`;
  const xl = opts && opts.rounds ? (v) => "round " + v : (v) => new Date(v).toLocaleTimeString();
  svg += `<text x="${L}" y="${H - 6}" font-size="10">${esc(xl(x0))}</text>`;
  svg += `<text x="${W - R}" y="${H - 6}" font-size="10" text-anchor="end">${esc(xl(x1))}</text>`;
  series.forEach((s, i) => {
    const c = colors[i % colors.length];
    if (bars) {
      const w = Math.max(2, (W - L - R) / (x1 - x0 + 1) - 4);
      s.points.forEach((p) => {
        svg += `<rect x="${sx(p[0]) - w / 2}" y="${sy(p[1])}" width="${w}" height="${H - B - sy(p[1])}" fill="${c}"><title>${esc(fmt(p[1]))}</title></rect>`;
      });
    } else {
      svg += `<polyline fill="none" stroke="${c}" stroke-width="1.5" points="${s.points.map((p) => sx(p[0]) + "," + sy(p[1])).join(" ")}"/>`;
    }
    if (series.length > 1) svg += `<text x="${L + 6 + i * 70}" y="${T + 10}" font-size="10" fill="${c}">${esc(s.name)}</text>`;
  });
  svg += "</svg>";
  return `<div class="chart"><h3>${esc(title)}</h3>${svg}</div>`;
}
function fmt(v) { return Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(1) : v.toFixed(3); }

async function overview(params) {
  const offset = Number(params.get("offset") || 0);
  const q = new URLSearchParams({ limit: PAGE, offset });
  for (const k of ["state", "online", "attention", "version", "group"]) if (params.get(k)) q.set(k, params.get(k));
  const [all, page] = await Promise.all([api("/api/devices?limit=1"), api("/api/devices?" + q)]);
  const need = await api("/api/devices?attention=true&limit=20");
  let h = `<div class="cards">${card("device-count", "devices", all.total)}${card("online-count", "online", all.online, "ok")}` +
    `${card("offline-count", "offline", all.total - all.online, all.total - all.online ? "warn" : "")}` +
    `${card("attention-count", "need attention", all.attention, all.attention ? "warn" : "")}</div>`;
  h += `<h2>Versions</h2><table id="versions"><tr><th>agent version</th><th>devices</th></tr>` +
    Object.entries(all.versions).map(([v, n]) => `<tr data-version="${esc(v)}"><td>${esc(v || "unknown")}</td><td>${n}</td></tr>`).join("") + "</table>";
  if (need.devices.length) {
    h += `<h2>Needing attention</h2><table id="attention"><tr><th>device</th><th>why</th></tr>` +
      need.devices.map((d) => `<tr data-device="${esc(d.device)}"><td><a href="#/device/${encodeURIComponent(d.device)}">${esc(d.device)}</a></td><td class="warn">${esc(d.attention.join("; "))}</td></tr>`).join("") + "</table>";
  }
  h += `<h2>Devices</h2><div class="filters">` +
    `<a href="#/">all</a><a href="#/?online=true">online</a><a href="#/?online=false">offline</a><a href="#/?attention=true">need attention</a>` +
    `<a href="#/?state=pending">pending enrollment</a><span class="muted" id="page-info">${page.total ? offset + 1 : 0}-${offset + page.devices.length} of ${page.total}</span>` +
    (offset > 0 ? `<a href="#/?${new URLSearchParams({ ...Object.fromEntries(params), offset: Math.max(0, offset - PAGE) })}">previous</a>` : "") +
    (offset + PAGE < page.total ? `<a id="next-page" href="#/?${new URLSearchParams({ ...Object.fromEntries(params), offset: offset + PAGE })}">next</a>` : "") + "</div>";
  h += `<table id="devices"><tr><th>device</th><th>state</th><th>groups</th><th>online</th><th>last seen</th><th>agent</th><th>CPU %</th><th>memory</th><th>outbox c/m/r/t</th><th>inference</th><th>attention</th></tr>`;
  for (const d of page.devices) {
    h += `<tr data-device="${esc(d.device)}"><td><a href="#/device/${encodeURIComponent(d.device)}">${esc(d.device)}</a></td><td>${esc(d.state)}</td><td>${esc(d.groups.join(", "))}</td>` +
      `<td class="${d.online ? "ok" : "warn"}">${d.online ? "online" : "offline"}</td><td>${age(d.last_seen_ms)}</td><td>${esc(d.agent_version || "-")}</td>` +
      `<td>${d.cpu_percent == null ? "-" : d.cpu_percent.toFixed(1)}</td><td>${mib(d.mem_used_bytes)}</td><td>${d.outbox_depth ? d.outbox_depth.join("/") : "-"}</td>` +
      `<td>${esc(d.providers.join(", ") || "-")}</td><td class="warn">${esc(d.attention.join("; "))}</td></tr>`;
  }
  return h + "</table>";
}

async function device(id) {
  const d = await api("/api/devices/" + encodeURIComponent(id));
  const t = d.telemetry ? d.telemetry.body : null;
  const hist = d.history;
  let h = `<h1 id="device-name">${esc(d.device)}</h1><div class="cards">${card("device-state", "enrollment", d.state)}` +
    `${card("device-online", "status", d.online ? "online" : "offline", d.online ? "ok" : "warn")}${card("device-version", "agent", d.agent_version || "-")}` +
    `${card("device-seen", "last seen", age(d.last_seen_ms))}${card("device-messages", "messages", d.messages)}</div>`;
  if (d.attention.length) h += `<p class="warn" id="device-attention">${esc(d.attention.join("; "))}</p>`;
  h += `<div class="charts">` +
    chart("chart-cpu", "CPU %", [{ name: "cpu", points: hist.map((s) => [s.received_ms, s.cpu_percent]) }], "%") +
    chart("chart-mem", "Memory used (MiB)", [
      { name: "machine", points: hist.map((s) => [s.received_ms, s.mem_used_bytes / 1048576]) },
      { name: "agent RSS", points: hist.map((s) => [s.received_ms, s.agent_rss_bytes / 1048576]) }], "") +
    chart("chart-outbox", "Outbox depth (messages)", ["control", "model", "results", "telemetry"].map((c, i) =>
      ({ name: c, points: hist.map((s) => [s.received_ms, s.outbox_depth[i]]) })), "") + "</div>";
  // Stage rates from the last two samples' call counters.
  const last = hist[hist.length - 1], prev = hist[hist.length - 2];
  const p = t && t.pipeline;
  if (p) {
    h += `<h2>Pipeline ${esc(p.name)} v${esc(p.version)}</h2><table id="stages"><tr><th>stage</th><th>module</th><th>calls</th><th>calls/s</th><th>errors</th><th>p50 µs</th><th>p99 µs</th><th>state</th></tr>`;
    for (const s of p.stages) {
      let rate = "-";
      if (last && prev) {
        const a = prev.stages.find((x) => x.name === s.name), b = last.stages.find((x) => x.name === s.name);
        const dt = (last.received_ms - prev.received_ms) / 1000;
        if (a && b && dt > 0) rate = ((b.calls - a.calls) / dt).toFixed(1);
      }
      h += `<tr data-stage="${esc(s.name)}"><td>${esc(s.name)}</td><td>${esc(s.module)}</td><td>${s.calls}</td><td>${rate}</td><td>${s.errors + s.traps + s.timeouts}</td><td>${s.p50_us}</td><td>${s.p99_us}</td><td class="${s.failed ? "warn" : ""}">${esc(s.failed || "ok")}</td></tr>`;
    }
    h += "</table>";
  } else {
    h += `<p class="muted" id="no-pipeline">No pipeline runs on this device.</p>`;
  }
  const inf = t && t.inference;
  if (inf && !inf.models.length && !inf.status.reason) {
    h += `<h2>Inference</h2><p class="muted" id="no-models">No ONNX model loaded.</p>`;
  } else if (inf) {
    h += `<h2>Inference</h2>` + (inf.status.reason ? `<p class="warn">unavailable: ${esc(inf.status.reason)}</p>` : "") +
      `<table id="models"><tr><th>model</th><th>version</th><th>provider in use</th><th>placement</th><th>runs</th><th>p50 µs</th><th>p99 µs</th></tr>` +
      inf.models.map((m) => `<tr data-model="${esc(m.name)}"><td>${esc(m.name)}</td><td>${esc(m.version)}</td><td class="provider">${esc(m.provider)}</td><td>${esc(m.placement)}</td><td>${m.runs}</td><td>${m.p50_us}</td><td>${m.p99_us}</td></tr>`).join("") + "</table>";
  }
  const off = t && t.offload;
  if (off) {
    h += `<h2>Offload (${esc(off.mode)})</h2><table id="offload"><tr><th>decision</th><th>count</th></tr>` +
      Object.entries(off.decisions).map(([k, n]) => `<tr data-decision="${esc(k)}"><td>${esc(k)}</td><td>${n}</td></tr>`).join("") +
      Object.entries(off.fallbacks).map(([k, n]) => `<tr><td>fallback: ${esc(k)}</td><td>${n}</td></tr>`).join("") + "</table>";
  }
  if (t) {
    h += `<h2>Outbox</h2><table id="outbox"><tr><th>bytes</th><th>capacity</th><th>delivered</th><th>expired</th><th>evicted</th><th>refused</th></tr>` +
      `<tr><td>${t.outbox.depth_bytes}</td><td>${t.outbox.capacity_bytes}</td><td>${t.outbox.delivered}</td><td>${t.outbox.expired}</td><td>${t.outbox.evicted}</td><td class="${t.outbox.refused ? "warn" : ""}">${t.outbox.refused}</td></tr></table>`;
  }
  return h;
}

async function rollouts() {
  const r = await api("/api/deployments");
  if (!r.rollouts.length) return `<p id="no-rollouts">No deployments yet.</p>`;
  return `<h1>Rollouts</h1><table id="rollouts"><tr><th>deployment</th><th>version</th><th>target</th><th>healthy</th><th>failed</th><th>in progress</th><th>state</th></tr>` +
    r.rollouts.map((x) => `<tr data-rollout="${esc(x.deployment_id)}"><td><a href="#/rollout/${encodeURIComponent(x.deployment_id)}">${esc(x.deployment_id)}</a></td><td>${x.version}</td><td>${esc(x.target)}</td><td class="ok">${x.healthy}</td><td class="${x.failed ? "warn" : ""}">${x.failed}</td><td>${x.in_progress}</td><td>${esc(x.finished || "running")}</td></tr>`).join("") + "</table>";
}

async function rollout(id) {
  const x = await api("/api/deployments/" + encodeURIComponent(id));
  let h = `<h1 id="rollout-name">${esc(x.deployment_id)} (version ${x.version}, ${esc(x.target)})</h1><div class="cards">` +
    `${card("rollout-healthy", "healthy", x.healthy, "ok")}${card("rollout-failed", "failed", x.failed, x.failed ? "warn" : "")}${card("rollout-progress", "in progress", x.in_progress)}` +
    `${card("rollout-state", "state", x.finished || "running")}</div>`;
  h += `<table id="rollout-devices"><tr><th>device</th><th>outcome</th><th>step</th><th>progress</th><th>detail</th><th>chunks sent/total</th><th>resent</th><th>dropped</th></tr>`;
  for (const d of x.devices) {
    h += `<tr data-device="${esc(d.device)}" data-outcome="${esc(d.outcome)}"><td><a href="#/device/${encodeURIComponent(d.device)}">${esc(d.device)}</a></td><td class="${d.outcome === "failed" ? "warn" : d.outcome === "healthy" ? "ok" : ""}">${esc(d.outcome)}</td>` +
      `<td>${esc(d.step || "-")}</td><td><div class="bar"><div style="width:${Math.round(d.fraction * 100)}%"></div></div></td><td>${esc(d.detail)}</td><td>${d.chunks_sent}/${d.chunks_total}</td><td>${d.resent}</td><td>${d.chunks_dropped}</td></tr>`;
  }
  return h + "</table>";
}

async function tasks() {
  const r = await api("/api/fl/tasks");
  if (!r.tasks.length) return `<p id="no-tasks">No federated tasks yet.</p>`;
  return `<h1>Federated tasks</h1><table id="tasks"><tr><th>task</th><th>model</th><th>members</th><th>phase</th><th>round</th><th>accuracy</th><th>update bytes</th></tr>` +
    r.tasks.map((t) => `<tr data-task="${esc(t.task)}"><td><a href="#/fl/${encodeURIComponent(t.task)}">${esc(t.task)}</a></td><td>${esc(t.model)}</td><td>${esc(t.members)}</td><td>${esc(t.phase)}${t.reason ? ": " + esc(t.reason) : ""}</td><td>${t.rounds_closed}/${t.rounds}</td><td>${t.eval_accuracy == null ? "-" : (t.eval_accuracy * 100).toFixed(1) + "%"}</td><td>${t.bytes_in}</td></tr>`).join("") + "</table>";
}

async function task(id) {
  const t = await api("/api/fl/tasks/" + encodeURIComponent(id));
  const acc = t.history.filter((r) => r.eval_accuracy != null || r.train_accuracy != null);
  let h = `<h1 id="task-name">${esc(t.task)}</h1><div class="cards">${card("task-phase", "phase", t.phase)}${card("task-rounds", "rounds closed", t.rounds_closed + "/" + t.rounds)}` +
    `${card("task-accuracy", "held-out accuracy", t.eval_accuracy == null ? "-" : (t.eval_accuracy * 100).toFixed(1) + "%")}${card("task-bytes", "update bytes", t.bytes_in)}</div>`;
  if (t.reason) h += `<p>${esc(t.reason)}</p>`;
  h += `<div class="charts">` +
    chart("chart-accuracy", "Accuracy per round", [
      { name: "held-out", points: acc.filter((r) => r.eval_accuracy != null).map((r) => [r.round, r.eval_accuracy]) },
      { name: "training", points: acc.filter((r) => r.train_accuracy != null).map((r) => [r.round, r.train_accuracy]) }], "", { rounds: true }) +
    chart("chart-bytes", "Upload bytes per round", [{ name: "bytes in", points: t.history.map((r) => [r.round, r.bytes_in]) }], "", { rounds: true, bars: true }) + "</div>";
  h += `<table id="rounds"><tr><th>round</th><th>selected</th><th>received</th><th>late</th><th>rejected</th><th>bytes in</th><th>train loss</th><th>accuracy</th><th>closed</th></tr>` +
    t.history.map((r) => `<tr data-round="${r.round}"><td>${r.round}</td><td>${r.selected}</td><td>${r.received}</td><td>${r.late}</td><td>${r.rejected}</td><td>${r.bytes_in}</td><td>${r.train_loss == null ? "-" : r.train_loss.toFixed(3)}</td><td>${r.eval_accuracy == null ? "-" : (r.eval_accuracy * 100).toFixed(1) + "%"}</td><td>${esc(r.close_reason || "")}</td></tr>`).join("") + "</table>";
  return h;
}

async function render() {
  const { parts, params } = route();
  const view = document.getElementById("view");
  const error = document.getElementById("error");
  document.body.dataset.ready = "";
  try {
    let html;
    if (parts[0] === "device" && parts[1]) html = await device(parts[1]);
    else if (parts[0] === "rollouts") html = await rollouts();
    else if (parts[0] === "rollout" && parts[1]) html = await rollout(parts[1]);
    else if (parts[0] === "fl" && parts[1]) html = await task(parts[1]);
    else if (parts[0] === "fl") html = await tasks();
    else html = await overview(params);
    view.innerHTML = html;
    error.textContent = "";
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    error.textContent = String(e.message || e);
  }
  document.body.dataset.ready = "1";
  clearTimeout(timer);
  timer = setTimeout(render, 5000);
}

document.getElementById("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("edge-token", token);
  document.getElementById("login").hidden = true;
  render();
});
window.addEventListener("hashchange", render);
render();
