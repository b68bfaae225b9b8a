/* The task view: its head (status, progress, legend), its live event stream and its actions
 * (cancel, re-run the failed hosts, edit and run again).
 */

import { TERMINAL_TASK, TERMINAL_RUN, RUN_ORDER } from "./config.js";
import { taskView } from "./state.js";
import { $, h, setText, statusLabel, announce, toast } from "./dom.js";
import { absTime, plural } from "./format.js";
import { api, stream } from "./api.js";
import { loadSummary } from "./fleet.js";
import { renderKeyed } from "./keyed.js";
import { navigate, showMissing } from "./nav.js";
import { prefillRun } from "./run-view.js";
import { Terminal } from "./terminal.js";
import { targetsText, taskDuration, firstLine, isNamed, runDuration } from "./task-text.js";
import { latestRuns, mergeRun, renderRuns, renderOutputHosts, focusOutput, downloadLog } from "./task-runs.js";

function renderTaskHead() {
  const task = taskView.task;
  if (!task) return;
  const title = isNamed(task) ? task.name : firstLine(task.command);
  setText($("task-title"), title);
  document.title = `${title} · opsplane`;
  const status = $("task-status");
  status.dataset.status = task.status;
  setText(status, statusLabel(task.status));
  setText($("task-command"), task.command);
  // A one-line command is already the title; show the block only when it adds something.
  $("task-command").hidden = !isNamed(task) && !/[\r\n]/.test(task.command.trim()) && task.command.trim().length <= 80;
  const meta = $("task-meta");
  const items = [
    ["Targets", targetsText(task.targets)],
    ["Started", task.started_at ? absTime(task.started_at) : "not yet"],
    ["Duration", taskDuration(task) || "–"],
    ["Timeout", `${task.timeout}s per host`],
    ["By", task.created_by],
    ["ID", task.id],
  ];
  if (task.priority) items.splice(items.length - 1, 0, ["Priority", String(task.priority)]);
  if (task.stop_reason) items.splice(items.length - 1, 0, ["Stopped by", task.stop_reason.replace("_", " ")]);
  if (task.rerun_of) items.splice(items.length - 1, 0, ["Re-run of", h("a", { href: `#/tasks/${encodeURIComponent(task.rerun_of)}` }, task.rerun_of.slice(0, 8))]);
  meta.replaceChildren(...items.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", { class: k === "ID" ? "mono" : undefined }, v))));

  const terminal = TERMINAL_TASK.has(task.status);
  const cancel = $("task-cancel");
  cancel.hidden = terminal;
  if (terminal) { cancel.disabled = false; setText(cancel, "Cancel task"); }
  const failed = [...latestRuns().values()].filter((r) => r.status !== "succeeded" && TERMINAL_RUN.has(r.status));
  const rerun = $("task-rerun");
  // Only a shell command can be sent again as it was; a catalog script task is not one.
  const isCommand = !task.kind || task.kind === "command";
  rerun.hidden = !terminal || failed.length === 0 || !isCommand;
  $("task-edit").hidden = !isCommand;
  setText(rerun, `Re-run on ${failed.length === 1 ? "the failed host" : `${failed.length.toLocaleString()} failed hosts`}`);

  const c = task.counts || {};
  const total = c.total || 0;
  const progress = $("task-progress");
  const order = ["succeeded", "failed", "timed_out", "lost", "undeliverable", "canceled", "running", "dispatched", "delayed", "pending"];
  const segments = [];
  for (const key of order) {
    if (!c[key]) continue;
    const seg = h("span", { class: "seg", dataset: { status: key }, title: `${statusLabel(key)}: ${c[key]}` });
    seg.style.width = `${(100 * c[key]) / Math.max(total, 1)}%`;
    segments.push(seg);
  }
  progress.replaceChildren(...segments);
  const percent = task.progress ? task.progress.percent : 0;
  progress.setAttribute("aria-valuenow", String(Math.round(percent)));
  progress.setAttribute("aria-valuetext", `${task.progress ? task.progress.finished : 0} of ${total} hosts finished`);

  const entries = [{ key: "", count: task.progress ? task.progress.finished : 0 }];
  for (const key of RUN_ORDER) if (c[key] || taskView.filter === key) entries.push({ key, count: c[key] || 0 });
  renderKeyed($("task-legend"), taskView.legend, entries, (e) => e.key || "all", (e) => {
    const button = h("button", { type: "button", class: "legend-item", onclick: () => setRunFilter(e.key && taskView.filter !== e.key ? e.key : "") },
      e.key ? h("span", { class: "dot", dataset: { status: e.key }, "aria-hidden": "true" }) : null, h("strong"), h("span"));
    if (e.key) button.dataset.status = e.key;
    return h("li", null, button);
  }, (li, e) => {
    const button = li.firstChild;
    button.setAttribute("aria-pressed", String(taskView.filter === e.key));
    setText(button.querySelector("strong"), e.count.toLocaleString());
    setText(button.lastChild, e.key ? ` ${statusLabel(e.key)}` : ` of ${total.toLocaleString()} finished`);
  });
}

function setRunFilter(status) {
  taskView.filter = status;
  taskView.page = 1;
  renderTaskHead();
  renderRuns();
}

function onTaskEvent(task) {
  const before = taskView.lastStatus;
  const known = taskView.task;
  // Replayed history must not show an ended task as running again.
  if (known && TERMINAL_TASK.has(known.status) && !TERMINAL_TASK.has(task.status)) return;
  taskView.task = task;
  renderTaskHead();
  if (TERMINAL_TASK.has(task.status) && before && !TERMINAL_TASK.has(before)) {
    const c = task.counts;
    announce(`Task ${statusLabel(task.status)}: ${c.succeeded} of ${c.total} hosts succeeded.`);
  }
  taskView.lastStatus = task.status;
  if (TERMINAL_TASK.has(task.status)) {
    closeTaskStream();
    loadSummary();
    // The rows now hold final durations and start times; fetch them once.
    refreshRuns(taskView.gen);
  }
}

function closeTaskStream() {
  if (taskView.source) {
    taskView.source.close();
    taskView.source = null;
  }
  setStreamState("");
}

function setStreamState(text) {
  setText($("output-note"), text || (taskView.term && taskView.term.trimmed ? "Earlier output was trimmed in the page; use Log to download a host's whole output." : ""));
}

async function refreshRuns(gen) {
  try {
    // Without output (the console has it): a page of a thousand runs stays small.
    const items = [];
    let cursor = "";
    for (let pages = 0; pages < 100; pages++) {
      const runs = await api(`/tasks/${encodeURIComponent(taskView.id)}/runs?size=1000${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
      if (gen !== taskView.gen) return;
      items.push(...runs.items);
      if (!runs.next_cursor) break;
      cursor = runs.next_cursor;
    }
    for (const run of items) {
      const prev = taskView.runs.get(run.id);
      // Never step back: a live event may be newer than this list.
      if (prev && TERMINAL_RUN.has(prev.status) && !TERMINAL_RUN.has(run.status)) continue;
      if (!prev) taskView.runsVersion++;
      taskView.runs.set(run.id, { ...prev, ...run });
    }
    renderRuns();
    renderTaskHead();
  } catch { /* the stream carries the essentials */ }
}

export async function enterTask(params, id) {
  leaveTask();
  const gen = ++taskView.gen;
  taskView.id = id;
  taskView.task = null;
  taskView.runs = new Map();
  taskView.filter = "";
  taskView.page = 1;
  taskView.lastStatus = null;
  for (const row of taskView.rows.values()) row.remove();
  taskView.rows.clear();
  for (const li of taskView.legend.values()) li.remove();
  taskView.legend.clear();
  newTerminal();
  setText($("output-title"), "Output");
  setText($("output-note"), "");
  $("output-follow").hidden = true;
  $("task-cancel").hidden = true;
  $("task-rerun").hidden = true;
  setText($("task-title"), "Task");
  setText($("task-command"), "");
  $("task-meta").replaceChildren();
  $("task-progress").replaceChildren();
  $("task-status").dataset.status = "";
  setText($("task-status"), "");
  renderOutputHosts();

  let task;
  try {
    task = await api(`/tasks/${encodeURIComponent(id)}`);
  } catch (e) {
    if (gen !== taskView.gen) return;
    showMissing(e.status === 404 ? `There is no task ${id}.` : `Could not load the task: ${e.message}`);
    return;
  }
  if (gen !== taskView.gen) return;
  taskView.task = task;
  taskView.lastStatus = task.status;
  renderTaskHead();
  await refreshRuns(gen);
  if (gen !== taskView.gen) return;
  openTaskStream(gen);
}

function newTerminal(focusRun = "") {
  taskView.term = new Terminal($("term"));
  taskView.term.onTrim = () => setStreamState("");
  $("term").classList.toggle("nowrap", !$("output-wrap").checked);
  if (focusRun) taskView.term.focus(focusRun);
}

function openTaskStream(gen, again = false) {
  // A stream opened anew replays the task from its first event (an EventSource sends
  // Last-Event-ID only on its own reconnects): start the output over to avoid doubles.
  if (again) newTerminal(taskView.term ? taskView.term.focusRun : "");
  const source = stream(`/tasks/${encodeURIComponent(taskView.id)}/events`);
  taskView.source = source;
  source.addEventListener("run", (e) => {
    if (gen !== taskView.gen) return;
    mergeRun(JSON.parse(e.data));
    renderRuns();
  });
  source.addEventListener("output", (e) => {
    if (gen !== taskView.gen) return;
    const data = JSON.parse(e.data);
    const run = taskView.runs.get(data.run_id) || mergeRun({ run_id: data.run_id, host: data.host });
    taskView.term.write(run, data.stream, typeof data.data === "string" ? data.data : "");
  });
  source.addEventListener("task", (e) => {
    if (gen !== taskView.gen) return;
    onTaskEvent(JSON.parse(e.data));
  });
  source.onopen = () => { if (taskView.source === source) setStreamState(""); };
  source.onerror = () => {
    if (taskView.source !== source) return;
    if (source.readyState === EventSource.CLOSED) {
      // Not a dropped connection but a refusal: reload the task to show where it stands.
      taskView.source = null;
      setStreamState("The live stream closed.");
      api(`/tasks/${encodeURIComponent(taskView.id)}`).then((task) => {
        if (gen !== taskView.gen) return;
        onTaskEvent(task);
        if (!TERMINAL_TASK.has(task.status)) setTimeout(() => { if (gen === taskView.gen && !taskView.source) openTaskStream(gen, true); }, 3000);
      }).catch(() => {});
    } else {
      setStreamState("Reconnecting to the live stream…");
    }
  };
}

export function leaveTask() {
  taskView.gen++;
  closeTaskStream();
}

async function cancelTask() {
  const button = $("task-cancel");
  button.disabled = true;
  setText(button, "Canceling…");
  try {
    const task = await api(`/tasks/${encodeURIComponent(taskView.id)}/cancel`, { method: "POST" });
    announce("Cancel requested; waiting for the hosts to confirm.");
    if (TERMINAL_TASK.has(task.status)) onTaskEvent(task);
  } catch (e) {
    button.disabled = false;
    setText(button, "Cancel task");
    toast(`Could not cancel: ${e.message}`);
  }
}

function confirmDialog(text, command, okLabel) {
  const dialog = $("confirm");
  setText($("confirm-title"), "Run again?");
  setText($("confirm-text"), text);
  setText($("confirm-command"), command);
  setText($("confirm-ok"), okLabel);
  dialog.returnValue = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue || "cancel"), { once: true });
    dialog.showModal();
    // Enter right after opening must not run anything: the safe choice has the focus.
    dialog.querySelector('button[value="cancel"]').focus();
  });
}

async function rerunFailed() {
  const task = taskView.task;
  if (!task) return;
  const hosts = [...latestRuns().values()].filter((r) => r.status !== "succeeded" && TERMINAL_RUN.has(r.status)).map((r) => r.host).sort();
  if (!hosts.length) return;
  const shown = hosts.length <= 8 ? hosts.join(", ") : `${hosts.slice(0, 8).join(", ")} and ${hosts.length - 8} more`;
  const choice = await confirmDialog(`Run this command again on ${plural(hosts.length, "host")} whose run did not succeed: ${shown}.`, task.command, `Run on ${plural(hosts.length, "host")}`);
  if (choice === "edit") {
    prefillRun({ command: task.command, hosts, timeout: String(task.timeout) });
    navigate("/run");
    return;
  }
  if (choice !== "ok") return;
  try {
    // The server picks the same hosts from the stored runs and keeps the task's policy.
    const created = await api(`/tasks/${encodeURIComponent(task.id)}/rerun`, { method: "POST", body: { only: "unsuccessful" } });
    navigate(`/tasks/${encodeURIComponent(created.id)}`);
  } catch (e) {
    toast(`Not started: ${e.message}`);
  }
}

/** Once a second while the task view is on screen: running durations tick along. */
export function tickTask() {
  if (!taskView.task || TERMINAL_TASK.has(taskView.task.status)) return;
  const dur = $("task-meta").querySelectorAll("dd")[2];
  if (dur) setText(dur, taskDuration(taskView.task) || "–");
  for (const [id, tr] of taskView.rows) {
    const run = taskView.runs.get(id);
    if (run && run.status === "running") setText(tr.children[3], runDuration(run));
  }
}

export function initTaskView() {
  $("task-cancel").addEventListener("click", cancelTask);
  $("task-rerun").addEventListener("click", rerunFailed);
  $("task-edit").addEventListener("click", () => {
    const task = taskView.task;
    if (!task) return;
    const t = task.targets || {};
    prefillRun({ command: task.command, hosts: t.hosts || [], groups: t.groups || [], all: Boolean(t.all), timeout: String(task.timeout) });
    navigate("/run");
  });
  $("runs-rows").addEventListener("click", (e) => {
    const button = e.target.closest("button[data-act]");
    if (!button) return;
    const runId = button.closest("tr").dataset.run;
    if (button.dataset.act === "log") downloadLog(runId);
    else {
      const next = taskView.term && taskView.term.focusRun === runId ? "" : runId;
      focusOutput(next);
      if (next) $("term").focus({ preventScroll: true });
    }
  });
  $("output-host").addEventListener("change", (e) => focusOutput(e.target.value));
  $("output-download").addEventListener("click", () => { if (taskView.term && taskView.term.focusRun) downloadLog(taskView.term.focusRun); });
  $("output-wrap").addEventListener("change", (e) => $("term").classList.toggle("nowrap", !e.target.checked));
  $("term").addEventListener("scroll", () => { if (taskView.term) taskView.term.onScroll(); }, { passive: true });
  $("output-follow").addEventListener("click", () => {
    if (!taskView.term) return;
    taskView.term.stick = true;
    taskView.term.queueScroll();
  });
}
