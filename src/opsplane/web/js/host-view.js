/* The host view: details, live metrics, a CPU and memory chart (stored history extended by the
 * live heartbeats) and the host's recent runs.
 */

import { TERMINAL_RUN, LINK_LABEL } from "./config.js";
import { fleet, current } from "./state.js";
import { $, h, svg, setText, badge, toast } from "./dom.js";
import { parseTime, absTime, duration, plural, pct, timeEl } from "./format.js";
import { api } from "./api.js";
import { samplesOf, upsertHost } from "./fleet.js";
import { bar, updateBar } from "./keyed.js";
import { navigate, showMissing } from "./nav.js";
import { firstLine, extraLines } from "./task-text.js";

const HISTORY_HOURS = 3;
const FINE_MS = 5 * 60000; // live points kept at full rate this long, then one a minute
const GAP_MS = 5 * 60000; // a longer silence breaks the line
const HOST_RUNS = 20;

// series: the chart's points, oldest first: the stored history (one a minute), extended by
// the live heartbeats of the fleet stream. history: how many came from the stored history.
const hostView = { name: null, gen: 0, series: [], history: 0, runsTimer: 0, runsController: null };

function compactSeries(series, now) {
  const cutoff = now - HISTORY_HOURS * 3600000;
  const fine = now - FINE_MS;
  const out = [];
  let minute = -1;
  for (const p of series) {
    if (p.t < cutoff) continue;
    if (p.t < fine) {
      const m = Math.floor(p.t / 60000);
      if (m === minute) continue;
      minute = m;
    }
    out.push(p);
  }
  return out;
}

/** Adds the live samples newer than the series' last point; returns the series. */
function hostSeries(name) {
  let series = hostView.series;
  for (const p of samplesOf(name)) if (!series.length || p.t > series[series.length - 1].t) series.push(p);
  if (series.length > 400) series = hostView.series = compactSeries(series, series[series.length - 1].t);
  return series;
}

async function loadHostHistory(name, gen) {
  try {
    const answer = await api(`/hosts/${encodeURIComponent(name)}/heartbeats?hours=${HISTORY_HOURS}`);
    if (gen !== hostView.gen) return;
    const history = [];
    for (const item of answer.items || []) {
      const t = parseTime(item.at);
      if (t === null || typeof item.cpu_usage !== "number" || typeof item.memory_usage !== "number") continue;
      history.push({ t, cpu: item.cpu_usage, mem: item.memory_usage });
    }
    const merged = [...history, ...hostView.series].sort((a, b) => a.t - b.t);
    hostView.series = merged.filter((p, i) => i === 0 || p.t > merged[i - 1].t);
    hostView.history = history.length;
    renderChart(name);
  } catch (e) {
    if (e.name !== "AbortError" && gen === hostView.gen && e.status !== 404) toast(`Could not load the heartbeat history: ${e.message}`);
  }
}

function createHostRunRow(run) {
  const title = run.task_name || firstLine(run.command) || run.task_id;
  const showCmd = run.task_name && run.task_name !== run.command && run.command;
  const tr = h("tr", { dataset: { task: run.task_id, run: run.id } },
    h("td", { class: "c-tstatus", "data-label": "Status" }, badge(run.status)),
    h("td", { class: "c-task", "data-label": "Task" },
      h("a", { href: `#/tasks/${encodeURIComponent(run.task_id)}`, class: `task-link${run.task_name ? "" : " is-cmd"}`, title: run.command || undefined }, title),
      showCmd ? h("code", { class: "task-cmd" }, firstLine(run.command) + extraLines(run.command)) : null),
    h("td", { class: `num c-exit${run.exit_code ? " bad" : ""}`, "data-label": "Exit" }, run.exit_code === null || run.exit_code === undefined ? "" : String(run.exit_code)),
    h("td", { class: "num c-dur", "data-label": "Duration" }, run.duration_ms === null || run.duration_ms === undefined ? (TERMINAL_RUN.has(run.status) ? "–" : "…") : duration(run.duration_ms)),
    h("td", { class: "c-when", "data-label": "Started" }, run.started_at ? timeEl(run.started_at) : "–"),
  );
  return tr;
}

async function loadHostRuns(name, gen) {
  if (hostView.runsController) hostView.runsController.abort();
  const controller = new AbortController();
  hostView.runsController = controller;
  try {
    const answer = await api(`/hosts/${encodeURIComponent(name)}/runs?size=${HOST_RUNS}`, { signal: controller.signal });
    if (gen !== hostView.gen) return;
    const items = answer.items || [];
    $("host-runs-rows").replaceChildren(...items.map(createHostRunRow));
    $("host-runs-table").hidden = items.length === 0;
    const empty = $("host-runs-empty");
    empty.hidden = items.length > 0;
    setText(empty, items.length ? "" : "No run on this host yet.");
    const total = answer.total || 0;
    setText($("host-runs-count"), total > items.length ? `latest ${items.length} of ${total.toLocaleString()}` : total ? plural(total, "run") : "");
  } catch (e) {
    if (e.name === "AbortError" || gen !== hostView.gen) return;
    if (e.status !== 404) {
      const empty = $("host-runs-empty");
      empty.hidden = false;
      setText(empty, `Could not load the runs: ${e.message}`);
    }
  } finally {
    if (hostView.runsController === controller) hostView.runsController = null;
  }
}

export function leaveHost() {
  hostView.gen++;
  hostView.name = null;
  clearInterval(hostView.runsTimer);
  hostView.runsTimer = 0;
  if (hostView.runsController) hostView.runsController.abort();
}

/** Load has no natural maximum: its bar is relative to the busiest host of the fleet. */
function fleetLoadMax(host) {
  let max = Math.max(1, host.load || 0);
  for (const other of fleet.hosts.values()) if (other.load > max) max = other.load;
  return Math.ceil(max);
}

function renderHost(host) {
  setText($("host-title"), host.name);
  document.title = `${host.name} · opsplane`;
  $("host-light").dataset.status = host.status;
  const status = $("host-status");
  status.dataset.status = host.status;
  setText(status, host.status);
  $("host-run").href = `#/run?hosts=${encodeURIComponent(host.name)}`;

  const metrics = [
    ["CPU", host.cpu_usage, 100, pct(host.cpu_usage)],
    ["Memory", host.memory_usage, 100, pct(host.memory_usage)],
    ["Load (1 min)", host.load, fleetLoadMax(host), host.load === null || host.load === undefined ? "–" : host.load.toFixed(2)],
    ["Disk /", host.disk_usage, 100, pct(host.disk_usage)],
  ];
  $("host-metrics").replaceChildren(...metrics.map(([label, value, max, text]) => {
    const b = bar(value, max, `${label} ${text}`);
    updateBar(b, value, max, `${label} ${text}`, text);
    return h("div", { class: "metric-card" }, h("span", { class: "metric-label" }, label), h("span", { class: "metric-big" }, text), b);
  }));

  const labels = Object.entries(host.labels || {});
  const rows = [
    ["Status", host.status],
    ["Last heartbeat", timeEl(host.last_seen_at)],
    ["Connected since", host.connected_at ? absTime(host.connected_at) : "–"],
    ["Link", LINK_LABEL[host.link] || host.link],
    ["Groups", host.groups && host.groups.length ? h("span", { class: "tags" }, host.groups.map((g) => h("a", { class: "tag group", href: `#/fleet?group=${encodeURIComponent(g)}` }, g))) : "–"],
    ["Labels", labels.length ? h("span", { class: "tags" }, labels.map(([k, v]) => h("span", { class: "tag label" }, `${k}=${v}`))) : "–"],
    ["Agent version", host.agent_version || "–"],
    ["OS", host.os || "–"],
  ];
  $("host-details").replaceChildren(...rows.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", null, v))));
  renderChart(host.name);
}

function renderChart(name) {
  const samples = name === hostView.name ? hostSeries(name) : samplesOf(name);
  const box = $("host-chart");
  const W = 600; const H = 150;
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", class: "spark" });
  const last = samples[samples.length - 1];
  const label = samples.length
    ? `CPU and memory over the last ${duration(last.t - samples[0].t) || "moment"}: ${plural(samples.length, "sample")}, now CPU ${pct(last.cpu)}, memory ${pct(last.mem)}.`
    : "No heartbeat received yet.";
  chart.setAttribute("aria-label", label);
  for (const y of [0, 0.5, 1]) chart.append(svg("line", { x1: 0, x2: W, y1: 1 + (H - 2) * y, y2: 1 + (H - 2) * y, class: "grid-line", "vector-effect": "non-scaling-stroke" }));
  // At least a minute of width, so that the first few points do not stretch across the chart.
  const span = samples.length ? Math.max(last.t - samples[0].t, 60000) : 60000;
  if (samples.length) {
    const x = (t) => W - ((last.t - t) / span) * W;
    const y = (v) => H - 1 - (Math.max(0, Math.min(100, v)) / 100) * (H - 2);
    // A silence of several minutes (the host was down) breaks the line.
    const segments = [];
    let segment = [];
    for (const p of samples) {
      if (segment.length && p.t - segment[segment.length - 1].t > GAP_MS) {
        segments.push(segment);
        segment = [];
      }
      segment.push(p);
    }
    segments.push(segment);
    for (const [key, cls] of [["mem", "mem"], ["cpu", "cpu"]]) {
      for (const part of segments) {
        if (part.length === 1) {
          chart.append(svg("circle", { cx: x(part[0].t).toFixed(1), cy: y(part[0][key]).toFixed(1), r: 2.5, class: `chart-dot-${cls}` }));
          continue;
        }
        const points = part.map((p) => `${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`);
        const first = x(part[0].t).toFixed(1);
        const end = x(part[part.length - 1].t).toFixed(1);
        chart.append(svg("polygon", { points: `${first},${H} ${points.join(" ")} ${end},${H}`, class: `area-${cls}` }));
        chart.append(svg("polyline", { points: points.join(" "), class: `line-${cls}`, "vector-effect": "non-scaling-stroke" }));
      }
    }
  }
  const ago = span < 90000 ? `${Math.round(span / 1000)} s ago` : span < 7200000 ? `${Math.round(span / 60000)} min ago` : `${(span / 3600000).toFixed(1)} h ago`;
  box.dataset.points = String(samples.length);
  box.dataset.history = String(name === hostView.name ? hostView.history : 0);
  box.replaceChildren(
    h("div", { class: "chart-y", "aria-hidden": "true" }, h("span", null, "100%"), h("span", null, "50%"), h("span", null, "0%")),
    h("div", { class: "chart-plot" }, chart),
    h("div", { class: "chart-x", "aria-hidden": "true" }, h("span", null, ago), h("span", null, "now")),
  );
  const legend = $("host-chart-legend");
  legend.replaceChildren(
    h("li", { class: "lg-cpu" }, h("span", { class: "swatch", "aria-hidden": "true" }), `CPU ${last ? pct(last.cpu) : "–"}`),
    h("li", { class: "lg-mem" }, h("span", { class: "swatch", "aria-hidden": "true" }), `Memory ${last ? pct(last.mem) : "–"}`),
    h("li", { class: "lg-span" }, samples.length > 1 ? `${plural(samples.length, "heartbeat")} over ${duration(last.t - samples[0].t)}` : "collecting live heartbeats…"),
  );
}

export async function enterHost(params, name) {
  const gen = ++hostView.gen;
  hostView.name = name;
  hostView.series = [];
  hostView.history = 0;
  setText($("host-title"), name);
  $("host-chart").replaceChildren();
  $("host-chart-legend").replaceChildren();
  $("host-runs-rows").replaceChildren();
  $("host-runs-empty").hidden = true;
  setText($("host-runs-count"), "");
  clearInterval(hostView.runsTimer);
  // The history and the runs load alongside the host itself; the runs list is refreshed
  // while the page is on screen (no stream for it).
  loadHostHistory(name, gen);
  loadHostRuns(name, gen);
  hostView.runsTimer = setInterval(() => { if (!document.hidden && gen === hostView.gen) loadHostRuns(name, gen); }, 10000);
  $("host-metrics").replaceChildren();
  $("host-details").replaceChildren();
  $("host-light").dataset.status = "unknown";
  setText($("host-status"), "");
  const cached = fleet.hosts.get(name);
  if (cached) renderHost(cached);
  try {
    const host = await api(`/hosts/${encodeURIComponent(name)}`);
    if (gen !== hostView.gen) return;
    upsertHost(host, false);
    renderHost(fleet.hosts.get(name) || host);
  } catch (e) {
    if (gen !== hostView.gen) return;
    if (!cached) showMissing(e.status === 404 ? `There is no host named “${name}”.` : `Could not load the host: ${e.message}`);
  }
}

export function initHostView() {
  $("host-runs-rows").addEventListener("click", (e) => {
    if (e.target.closest("a, button")) return;
    const tr = e.target.closest("tr[data-task]");
    if (tr && !window.getSelection().toString()) navigate(`/tasks/${encodeURIComponent(tr.dataset.task)}`);
  });
  fleet.listeners.add((changed) => {
    if (current.name !== "host" || !hostView.name) return;
    if (changed.has(hostView.name) || changed.has("*")) {
      const host = fleet.hosts.get(hostView.name);
      if (host) renderHost(host);
    }
  });
}
