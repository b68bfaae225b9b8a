/* The schedules view: every schedule with its next fire times and a pause switch, the history
 * of the one picked (#/schedules?id=ID), and the form that creates one (admins, and operators
 * for the templates they may launch). Refreshed while on screen; rows are keyed, so a refresh
 * never takes a switch from under the pointer.
 */

import { auth, current } from "./state.js";
import { $, h, setText, badge, toast } from "./dom.js";
import { absTime, plural, timeEl } from "./format.js";
import { api } from "./api.js";
import { renderKeyed } from "./keyed.js";
import { replaceHash } from "./nav.js";
import { paramFields, paramValues, mayRun, role } from "./template-form.js";

const view = { rows: new Map(), history: new Map(), selected: "", timer: 0, gen: 0, templates: [] };

const whenText = (s) => (s.cron ? `${s.cron} (${s.timezone})` : `every ${plural(s.interval_seconds, "second")}`);
const mayChange = (s) => role() === "admin" || (role() === "operator" && auth.user && s.created_by === auth.user.name);

function createRow(s) {
  const toggle = h("input", { type: "checkbox", role: "switch", class: "pause-switch", "aria-label": `Pause the schedule of ${s.template}` });
  toggle.addEventListener("change", () => setPaused(s.id, toggle));
  const open = h("button", { type: "button", class: "btn small", onclick: () => select(s.id) }, "History");
  return h("tr", { dataset: { schedule: s.id } },
    h("td", { "data-label": "Template" }, h("strong", null, s.template)),
    h("td", { "data-label": "When" }, h("code")),
    h("td", { "data-label": "Next fire times", class: "next-fires" }),
    h("td", { "data-label": "By" }),
    h("td", { "data-label": "Paused" }, h("label", { class: "check" }, toggle)),
    h("td", null, open));
}

function updateRow(tr, s) {
  const cells = tr.children;
  setText(cells[1].firstChild, whenText(s));
  const next = s.next_fire_times.map((t) => h("li", null, h("time", { datetime: t }, absTime(t))));
  cells[2].replaceChildren(next.length ? h("ol", { class: "fires" }, next) : h("span", { class: "muted" }, s.paused ? "paused" : "–"));
  setText(cells[3], s.created_by);
  const toggle = cells[4].querySelector("input");
  if (toggle.dataset.busy !== "1") toggle.checked = s.paused;
  toggle.disabled = !mayChange(s) || toggle.dataset.busy === "1";
  tr.setAttribute("aria-selected", String(s.id === view.selected));
}

async function setPaused(id, toggle) {
  toggle.dataset.busy = "1";
  toggle.disabled = true;
  try {
    await api(`/schedules/${encodeURIComponent(id)}`, { method: "PATCH", body: { paused: toggle.checked } });
  } catch (e) {
    toggle.checked = !toggle.checked;
    toast(`Could not change the schedule: ${e.message}`);
  } finally {
    toggle.dataset.busy = "";
    toggle.disabled = false;
  }
  load();
}

function select(id) {
  view.selected = id;
  replaceHash(`/schedules?id=${encodeURIComponent(id)}`);
  view.history.clear();
  $("schedule-history-rows").replaceChildren();
  load();
}

function fireRow(f) {
  return h("tr", null,
    h("td", { "data-label": "Due" }, timeEl(f.due_at)),
    h("td", { "data-label": "Outcome" }, badge(f.outcome)),
    h("td", { "data-label": "Task" }, f.task_id ? h("a", { href: `#/tasks/${encodeURIComponent(f.task_id)}` }, `…${f.task_id.slice(-8)}`) : "–"),
    h("td", { "data-label": "Task status" }, f.task_status ? badge(f.task_status) : "–"),
    h("td", { "data-label": "Detail", class: "detail" }, f.detail || ""));
}

async function load() {
  const gen = ++view.gen;
  let list;
  let fires = null;
  try {
    list = await api("/schedules");
    if (view.selected) fires = await api(`/schedules/${encodeURIComponent(view.selected)}/history?limit=50`);
  } catch (e) {
    if (gen === view.gen) toast(`Could not load schedules: ${e.message}`);
    return;
  }
  if (gen !== view.gen || current.name !== "schedules") return;
  renderKeyed($("schedules-rows"), view.rows, list.items, (s) => s.id, createRow, updateRow);
  const empty = $("schedules-empty");
  empty.replaceChildren(h("p", { class: "empty-title" }, "No schedules yet."));
  empty.hidden = list.items.length > 0;
  $("schedules-rows").closest("table").hidden = list.items.length === 0;
  setText($("schedules-range"), list.items.length ? plural(list.items.length, "schedule") : "");
  const panel = $("schedule-history-panel");
  panel.hidden = fires === null;
  if (fires !== null) {
    const s = list.items.find((x) => x.id === view.selected);
    setText($("schedule-history-title"), `History of ${s ? s.template : view.selected} (…${view.selected.slice(-8)})`);
    // Rebuilt whole: a fire's row changes only through its task's status, and there are 50.
    $("schedule-history-rows").replaceChildren(...fires.items.map(fireRow));
    const none = $("schedule-history-empty");
    none.replaceChildren(h("p", null, "No due time handled yet."));
    none.hidden = fires.items.length > 0;
  }
}

function showParams() {
  const t = view.templates.find((x) => x.name === $("schedule-template").value);
  const box = $("schedule-params");
  box.replaceChildren(h("legend", null, "Parameters"), ...(t ? paramFields(t.parameters) : []));
  box.hidden = !t || t.parameters.length === 0;
}

async function loadForm() {
  const form = $("schedule-form");
  form.hidden = !mayRun();
  if (form.hidden) return;
  try {
    view.templates = (await api("/templates")).items;
  } catch (e) {
    toast(`Could not load templates: ${e.message}`);
    return;
  }
  const select_ = $("schedule-template");
  const chosen = select_.value;
  select_.replaceChildren(...view.templates.map((t) => h("option", { value: t.name, selected: t.name === chosen }, t.name)));
  showParams();
}

async function submitSchedule(e) {
  e.preventDefault();
  const error = $("schedule-error");
  setText(error, "");
  const body = { template: $("schedule-template").value, params: paramValues($("schedule-params")) };
  if (document.querySelector('input[name="schedule-timing"]:checked').value === "cron") {
    body.cron = $("schedule-cron").value.trim();
    body.timezone = $("schedule-timezone").value.trim() || "UTC";
  } else {
    const n = Number($("schedule-interval").value);
    body.interval_seconds = Number.isInteger(n) && n > 0 ? n : null;
  }
  $("schedule-submit").disabled = true;
  try {
    const created = await api("/schedules", { method: "POST", body });
    select(created.id);
  } catch (err) {
    setText(error, err.message);
  } finally {
    $("schedule-submit").disabled = false;
  }
}

export function enterSchedules(params) {
  view.selected = params.get("id") || "";
  view.rows.clear();
  $("schedules-rows").replaceChildren();
  load();
  loadForm();
  clearInterval(view.timer);
  view.timer = setInterval(() => { if (!document.hidden) load(); }, 3000);
}

export function leaveSchedules() {
  clearInterval(view.timer);
  view.timer = 0;
  view.gen += 1;
}

export function initSchedulesView() {
  $("schedule-template").addEventListener("change", showParams);
  $("schedule-form").addEventListener("submit", submitSchedule);
  for (const radio of document.querySelectorAll('input[name="schedule-timing"]')) {
    radio.addEventListener("change", () => {
      const cron = document.querySelector('input[name="schedule-timing"]:checked').value === "cron";
      $("schedule-cron-row").hidden = !cron;
      $("schedule-interval-row").hidden = cron;
    });
  }
  try { $("schedule-timezone").value = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; } catch { /* UTC */ }
}
