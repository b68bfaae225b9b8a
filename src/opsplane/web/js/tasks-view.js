/* The task history: the list of tasks, newest first, with filters, refreshed while on screen. */

import { TASKS_PAGE } from "./config.js";
import { current } from "./state.js";
import { $, h, setText, statusLabel, badge, toast } from "./dom.js";
import { relTime, absTime, plural } from "./format.js";
import { api } from "./api.js";
import { renderKeyed, renderPager } from "./keyed.js";
import { navigate, replaceHash } from "./nav.js";
import { targetsText, taskDuration, firstLine, isNamed, extraLines } from "./task-text.js";

const tasksView = {
  rows: new Map(),
  state: { status: "", name: "", page: 1 },
  timer: 0,
  gen: 0,
  controller: null,
};

function createTaskRow(task) {
  return h("tr", { class: "clickable", dataset: { task: task.id } },
    h("td", { class: "c-tstatus", "data-label": "Status" }, badge(task.status)),
    h("td", { class: "c-task", "data-label": "Task" }, h("a", { href: `#/tasks/${encodeURIComponent(task.id)}`, class: "task-link" }), h("code", { class: "task-cmd" })),
    h("td", { class: "c-targets", "data-label": "Targets" }),
    h("td", { class: "c-hosts", "data-label": "Hosts" }),
    h("td", { class: "c-by", "data-label": "By" }),
    h("td", { class: "c-when", "data-label": "Started" }, h("time", { dataset: { rel: "" } })),
    h("td", { class: "c-dur num", "data-label": "Duration" }),
  );
}

function updateTaskRow(tr, task) {
  const cells = tr.children;
  const b = cells[0].firstChild;
  b.dataset.status = task.status;
  setText(b, statusLabel(task.status));
  const named = isNamed(task);
  const link = cells[1].firstChild;
  setText(link, named ? task.name : firstLine(task.command));
  link.classList.toggle("is-cmd", !named);
  const cmd = cells[1].lastChild;
  setText(cmd, named ? firstLine(task.command) + extraLines(task.command) : extraLines(task.command).trim());
  cmd.hidden = !cmd.textContent;
  setText(cells[2], targetsText(task.targets));
  const c = task.counts || {};
  const bad = (c.failed || 0) + (c.timed_out || 0) + (c.lost || 0) + (c.undeliverable || 0);
  const hosts = cells[3];
  hosts.replaceChildren(h("span", null, `${(c.succeeded || 0).toLocaleString()}/${(c.total || 0).toLocaleString()} ok`));
  if (bad) hosts.append(h("span", { class: "bad" }, ` · ${bad.toLocaleString()} failed`));
  if (c.canceled) hosts.append(h("span", { class: "muted" }, ` · ${c.canceled.toLocaleString()} canceled`));
  if (c.running) hosts.append(h("span", { class: "info" }, ` · ${c.running.toLocaleString()} running`));
  setText(cells[4], task.created_by);
  const when = task.started_at || task.created_at;
  const time = cells[5].firstChild;
  time.dataset.rel = when || "";
  time.title = absTime(when);
  setText(time, relTime(when));
  setText(cells[6], taskDuration(task) || "–");
}

async function loadTasks() {
  const gen = ++tasksView.gen;
  if (tasksView.controller) tasksView.controller.abort();
  const controller = new AbortController();
  tasksView.controller = controller;
  const { status, name, page } = tasksView.state;
  const p = new URLSearchParams({ page: String(page), size: String(TASKS_PAGE) });
  if (status) p.set("status", status);
  if (name.trim()) p.set("name", name.trim());
  let result;
  try {
    result = await api(`/tasks?${p}`, { signal: controller.signal });
  } catch (e) {
    if (e.name !== "AbortError" && gen === tasksView.gen) toast(`Could not load tasks: ${e.message}`);
    return;
  }
  if (gen !== tasksView.gen || current.name !== "tasks") return;
  const pages = Math.max(1, Math.ceil(result.total / TASKS_PAGE));
  if (page > pages && result.total > 0) {
    tasksView.state.page = pages;
    loadTasks();
    return;
  }
  renderKeyed($("tasks-rows"), tasksView.rows, result.items, (t) => t.id, createTaskRow, updateTaskRow);
  renderPager($("tasks-pager"), page, pages, result.total, (n) => { tasksView.state.page = n; syncTasksHash(); loadTasks(); }, "task");
  const empty = $("tasks-empty");
  empty.replaceChildren();
  if (result.total === 0) {
    if (status || name) {
      empty.append(h("p", { class: "empty-title" }, "No task matches these filters."),
        h("button", { type: "button", class: "btn small", onclick: () => { $("tasks-name").value = ""; $("tasks-status").value = ""; Object.assign(tasksView.state, { status: "", name: "", page: 1 }); syncTasksHash(); loadTasks(); } }, "Clear filters"));
    } else {
      empty.append(h("p", { class: "empty-title" }, "No tasks yet."), h("p", null, h("a", { href: "#/run" }, "Run a command"), " and it appears here."));
    }
  }
  empty.hidden = !empty.firstChild;
  $("tasks-rows").closest("table").hidden = result.total === 0;
  const from = (page - 1) * TASKS_PAGE + 1;
  setText($("tasks-range"), result.total ? `${plural(result.total, "task")}${result.total > TASKS_PAGE ? ` · showing ${from}–${Math.min(page * TASKS_PAGE, result.total)}` : ""}, newest first` : "");
}

function syncTasksHash() {
  const { status, name, page } = tasksView.state;
  const p = new URLSearchParams();
  if (status) p.set("status", status);
  if (name) p.set("name", name);
  if (page > 1) p.set("page", String(page));
  replaceHash(`/tasks${p.toString() ? `?${p}` : ""}`);
}

export function enterTasks(params) {
  tasksView.state = {
    status: params.get("status") || "",
    name: params.get("name") || "",
    page: Math.max(1, parseInt(params.get("page") || "1", 10) || 1),
  };
  $("tasks-status").value = tasksView.state.status;
  $("tasks-name").value = tasksView.state.name;
  loadTasks();
  clearInterval(tasksView.timer);
  // No stream for the list: refresh while it is on screen, so running tasks tick along.
  tasksView.timer = setInterval(() => { if (!document.hidden) loadTasks(); }, 4000);
}

export function leaveTasks() {
  clearInterval(tasksView.timer);
  tasksView.timer = 0;
  if (tasksView.controller) tasksView.controller.abort();
}

export function initTasksView() {
  let timer = 0;
  $("tasks-name").addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      tasksView.state.name = $("tasks-name").value;
      tasksView.state.page = 1;
      syncTasksHash();
      loadTasks();
    }, 250);
  });
  $("tasks-status").addEventListener("change", (e) => {
    tasksView.state.status = e.target.value;
    tasksView.state.page = 1;
    syncTasksHash();
    loadTasks();
  });
  $("tasks-filters").addEventListener("submit", (e) => e.preventDefault());
  $("tasks-rows").addEventListener("click", (e) => {
    if (e.target.closest("a, button")) return;
    const tr = e.target.closest("tr[data-task]");
    if (tr && !window.getSelection().toString()) navigate(`/tasks/${encodeURIComponent(tr.dataset.task)}`);
  });
}
