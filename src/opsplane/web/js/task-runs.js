/* The task view's runs: merging run events, the runs table and the output host picker. */

import { TERMINAL_RUN, RUNS_PAGE } from "./config.js";
import { taskView } from "./state.js";
import { $, h, setText, statusLabel, badge, toast } from "./dom.js";
import { api } from "./api.js";
import { renderKeyed, renderPager } from "./keyed.js";
import { runDuration } from "./task-text.js";

export function latestRuns() {
  // A retried host has several runs; its latest attempt is the one that counts.
  const byHost = new Map();
  for (const run of taskView.runs.values()) {
    const prev = byHost.get(run.host);
    if (!prev || run.attempt > prev.attempt) byHost.set(run.host, run);
  }
  return byHost;
}

function createRunRow(run) {
  const outputBtn = h("button", { type: "button", class: "btn small ghost", "aria-pressed": "false", dataset: { act: "focus" } }, "Output");
  const logBtn = h("button", { type: "button", class: "btn small ghost", dataset: { act: "log" }, title: "Download the whole output of this host" }, "Log");
  return h("tr", { dataset: { run: run.id } },
    h("td", { class: "c-name", "data-label": "Host" }, h("a", { href: `#/hosts/${encodeURIComponent(run.host)}` }, run.host), h("span", { class: "attempt" })),
    h("td", { "data-label": "Status" }, badge(run.status)),
    h("td", { class: "num", "data-label": "Exit" }),
    h("td", { class: "num", "data-label": "Duration" }),
    h("td", { class: "row-actions" }, outputBtn, logBtn),
  );
}

function updateRunRow(tr, run) {
  const cells = tr.children;
  setText(cells[0].lastChild, run.attempt > 1 ? ` attempt ${run.attempt}` : "");
  const b = cells[1].firstChild;
  b.dataset.status = run.status;
  setText(b, statusLabel(run.status));
  b.title = run.error || "";
  setText(cells[2], run.exit_code === null || run.exit_code === undefined ? "" : String(run.exit_code));
  cells[2].classList.toggle("bad", run.exit_code !== null && run.exit_code !== undefined && run.exit_code !== 0);
  setText(cells[3], runDuration(run));
  const focused = taskView.term && taskView.term.focusRun === run.id;
  tr.classList.toggle("focused", Boolean(focused));
  // A run that never reached its host has no output to show or download.
  const never = ["pending", "delayed", "undeliverable"].includes(run.status);
  for (const button of cells[4].children) button.hidden = never;
  cells[4].firstChild.setAttribute("aria-pressed", String(Boolean(focused)));
  cells[4].firstChild.setAttribute("aria-label", `Output of ${run.host}`);
  cells[4].lastChild.setAttribute("aria-label", `Download the log of ${run.host}`);
}

function sortedRuns() {
  let runs = [...taskView.runs.values()];
  if (taskView.filter) runs = runs.filter((r) => r.status === taskView.filter);
  return runs.sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : a.attempt - b.attempt));
}

export function renderRuns() {
  if (taskView.runsTimer) return;
  taskView.runsTimer = requestAnimationFrame(() => {
    taskView.runsTimer = 0;
    const runs = sortedRuns();
    const pages = Math.max(1, Math.ceil(runs.length / RUNS_PAGE));
    taskView.page = Math.min(taskView.page, pages);
    const slice = runs.slice((taskView.page - 1) * RUNS_PAGE, taskView.page * RUNS_PAGE);
    renderKeyed($("runs-rows"), taskView.rows, slice, (r) => r.id, createRunRow, updateRunRow);
    renderPager($("runs-pager"), taskView.page, pages, runs.length, (p) => { taskView.page = p; renderRuns(); }, "host");
    renderOutputHosts();
  });
}

export function renderOutputHosts() {
  const select = $("output-host");
  const key = `${taskView.gen}:${taskView.runsVersion}`;
  if (select._key !== key) {
    select._key = key;
    const runs = [...taskView.runs.values()].sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : a.attempt - b.attempt));
    const options = [h("option", { value: "" }, "All hosts, interleaved")];
    // A select of 10,000 hosts is no help; the row buttons reach every host.
    for (const run of runs.slice(0, 500)) options.push(h("option", { value: run.id }, run.attempt > 1 ? `${run.host} (attempt ${run.attempt})` : run.host));
    select.replaceChildren(...options);
  }
  const focus = taskView.term ? taskView.term.focusRun : "";
  if (focus && !select.querySelector(`option[value="${CSS.escape(focus)}"]`)) {
    const run = taskView.runs.get(focus);
    if (run) select.append(h("option", { value: run.id }, run.host));
  }
  select.value = focus;
  $("output-download").hidden = !focus;
}

export function focusOutput(runId) {
  if (!taskView.term) return;
  taskView.term.focus(runId);
  const run = taskView.runs.get(runId);
  setText($("output-title"), run ? `Output of ${run.host}` : "Output");
  for (const [id, tr] of taskView.rows) updateRunRow(tr, taskView.runs.get(id));
  renderOutputHosts();
}

export async function downloadLog(runId) {
  const run = taskView.runs.get(runId);
  if (!run || !taskView.task) return;
  try {
    const blob = await api(`/tasks/${encodeURIComponent(taskView.task.id)}/runs/${encodeURIComponent(run.id)}/log`, { as: "blob" });
    const url = URL.createObjectURL(new Blob([blob], { type: "text/plain;charset=utf-8" }));
    const safe = run.host.replace(/[^A-Za-z0-9._-]+/g, "_");
    const a = h("a", { href: url, download: `${safe}-${taskView.task.id.slice(0, 8)}${run.attempt > 1 ? `-${run.attempt}` : ""}.log` });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  } catch (e) {
    toast(`Could not download the log of ${run.host}: ${e.message}`);
  }
}

export function mergeRun(data) {
  const id = data.run_id || data.id;
  const known = taskView.runs.get(id);
  if (!known) taskView.runsVersion++;
  const prev = known || { id, host: data.host, attempt: data.attempt || 1, status: "pending", exit_code: null, duration_ms: null, started_at: null };
  // The stream replays history: a run that already ended never steps back to an earlier state.
  if (known && data.status && TERMINAL_RUN.has(known.status) && !TERMINAL_RUN.has(data.status)) return known;
  const run = { ...prev };
  for (const key of ["host", "attempt", "status", "exit_code", "error", "duration_ms", "started_at"]) {
    if (data[key] !== undefined) run[key] = data[key];
  }
  if (run.status === "running" && prev.status !== "running" && !run.started_at) run._seenRunning = Date.now();
  taskView.runs.set(id, run);
  return run;
}
