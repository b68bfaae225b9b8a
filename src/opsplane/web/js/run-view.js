/* The run console: pick targets, type a command (or pick a catalog script), start a task. */

import { fleet, current } from "./state.js";
import { $, h, setText } from "./dom.js";
import { plural } from "./format.js";
import { api } from "./api.js";
import { loadSummary, groupsOfFleet } from "./fleet.js";
import { light } from "./keyed.js";
import { navigate } from "./nav.js";

const runView = {
  hosts: new Set(),
  groups: new Set(),
  all: false,
  scripts: null, // catalog script paths, once GET /list has answered
};

function targetSelection() {
  if (runView.all) return [...fleet.hosts.values()];
  const chosen = new Map();
  for (const name of runView.hosts) {
    const host = fleet.hosts.get(name);
    chosen.set(name, host || { name, status: "unknown" });
  }
  if (runView.groups.size) {
    for (const host of fleet.hosts.values()) {
      if ((host.groups || []).some((g) => runView.groups.has(g))) chosen.set(host.name, host);
    }
  }
  return [...chosen.values()];
}

function renderTargets() {
  const chips = $("target-chips");
  chips.replaceChildren();
  const remove = (kind, name) => () => {
    (kind === "group" ? runView.groups : runView.hosts).delete(name);
    renderTargets();
    $("target-input").focus();
  };
  for (const g of runView.groups) {
    chips.append(h("li", { class: "chip group" }, h("span", { class: "chip-kind" }, "group"), h("span", null, g),
      h("button", { type: "button", class: "chip-x", "aria-label": `Remove group ${g}`, onclick: remove("group", g) }, "×")));
  }
  for (const name of runView.hosts) {
    const host = fleet.hosts.get(name);
    chips.append(h("li", { class: "chip" }, light(host ? host.status : "unknown"), h("span", null, name),
      h("button", { type: "button", class: "chip-x", "aria-label": `Remove host ${name}`, onclick: remove("host", name) }, "×")));
  }
  $("picker").classList.toggle("disabled", runView.all);
  $("target-input").disabled = runView.all;
  for (const radio of document.querySelectorAll('input[name="target-mode"]')) radio.checked = radio.value === (runView.all ? "all" : "pick");

  const selected = targetSelection();
  const online = selected.filter((x) => x.status === "online").length;
  const match = $("target-match");
  match.replaceChildren();
  match.dataset.count = String(selected.length);
  if (selected.length === 0) {
    match.append(runView.all ? "The fleet is empty." : "No target selected yet.");
  } else {
    match.append(h("strong", null, `Matches ${plural(selected.length, "host")}`));
    const off = selected.length - online;
    match.append(` · ${online.toLocaleString()} online`);
    if (off) match.append(h("span", { class: "warn" }, ` · ${off.toLocaleString()} not online (their runs end undeliverable)`));
    if (selected.length <= 12) {
      match.append(h("span", { class: "match-names" }, selected.map((x) => x.name).sort().join(", ")));
    }
  }
  syncRunButton();
}

function syncRunButton() {
  const count = targetSelection().length;
  const command = $("cmd").value.trim();
  const button = $("run-submit");
  button.disabled = !command || count === 0 || button.dataset.busy === "1";
  setText(button, button.dataset.busy === "1" ? "Starting…" : count ? `Run on ${plural(count, "host")}` : "Run");
}

function addTargets(text) {
  const errors = [];
  const groups = groupsOfFleet();
  for (const raw of text.split(/[\s,]+/)) {
    const word = raw.trim();
    if (!word) continue;
    const groupName = word.startsWith("group:") ? word.slice(6) : word.startsWith("@") ? word.slice(1) : null;
    if (groupName !== null) {
      if (groups.has(groupName)) runView.groups.add(groupName);
      else errors.push(`no group named “${groupName}”`);
    } else if (fleet.hosts.has(word)) {
      runView.hosts.add(word);
    } else if (groups.has(word)) {
      runView.groups.add(word);
    } else {
      errors.push(`no host or group named “${word}”`);
    }
  }
  setText($("target-error"), errors.length ? `Not added: ${errors.join("; ")}.` : "");
  renderTargets();
  return errors.length === 0;
}

function refreshTargetOptions() {
  const input = $("target-input");
  const q = input.value.trim().toLowerCase().replace(/^group:|^@/, "");
  const options = [];
  for (const [g, n] of groupsOfFleet()) {
    if (runView.groups.has(g)) continue;
    if (!q || g.toLowerCase().includes(q)) options.push(h("option", { value: `group:${g}` }, `group · ${plural(n, "host")}`));
    if (options.length >= 20) break;
  }
  // Only the best few hosts: a datalist of 10,000 options makes typing sluggish.
  let hosts = 0;
  for (const host of fleet.hosts.values()) {
    if (hosts >= 50) break;
    if (runView.hosts.has(host.name)) continue;
    if (!q || host.name.toLowerCase().includes(q)) {
      options.push(h("option", { value: host.name }, `host · ${host.status}${host.groups && host.groups.length ? ` · ${host.groups.join(", ")}` : ""}`));
      hosts++;
    }
  }
  $("target-options").replaceChildren(...options);
}

const DRAFT_KEY = "opsplane.draft";

function saveDraft() {
  try {
    sessionStorage.setItem(DRAFT_KEY, JSON.stringify({
      command: $("cmd").value, timeout: $("timeout").value, name: $("task-name").value,
      hosts: [...runView.hosts], groups: [...runView.groups], all: runView.all,
    }));
  } catch { /* storage may be disabled */ }
}

function loadDraft() {
  try {
    const draft = JSON.parse(sessionStorage.getItem(DRAFT_KEY) || "null");
    if (!draft) return;
    $("cmd").value = draft.command || "";
    $("timeout").value = draft.timeout || "";
    $("task-name").value = draft.name || "";
    runView.hosts = new Set(draft.hosts || []);
    runView.groups = new Set(draft.groups || []);
    runView.all = Boolean(draft.all);
  } catch { /* a broken draft is no draft */ }
}

let runPrefill = null;

export function prefillRun({ command, hosts = [], groups = [], all = false, timeout = "", name = "" }) {
  runPrefill = { command, hosts, groups, all, timeout, name };
}

export function enterRun(params) {
  if (runPrefill) {
    const p = runPrefill;
    runPrefill = null;
    if (p.command !== undefined) $("cmd").value = p.command;
    $("timeout").value = p.timeout || "";
    $("task-name").value = p.name || "";
    runView.hosts = new Set(p.hosts);
    runView.groups = new Set(p.groups);
    runView.all = p.all;
  } else if (params.has("hosts") || params.has("groups") || params.has("all")) {
    runView.hosts = new Set((params.get("hosts") || "").split(",").filter(Boolean));
    runView.groups = new Set((params.get("groups") || "").split(",").filter(Boolean));
    runView.all = params.get("all") === "1";
  }
  setText($("run-error"), "");
  setText($("target-error"), "");
  setText($("script-error"), "");
  loadScripts();
  renderTargets();
  refreshTargetOptions();
  saveDraft();
}

// Script mode: the catalog's async routes (GET /list), run with POST and a JSON array of
// arguments. The session id the catalog answers is an opsplane task id.
const HIDDEN_SCRIPTS = new Set(["/async/query", "/async/kill"]);

async function loadScripts() {
  if (runView.scripts) return;
  runView.scripts = [];
  let paths = [];
  try {
    const answer = await api("/list", { root: true });
    if (answer && answer.code === 0 && Array.isArray(answer.data)) {
      paths = answer.data
        .filter((r) => r && r.method === "POST" && typeof r.path === "string" && r.path.startsWith("/async/") && !HIDDEN_SCRIPTS.has(r.path))
        .map((r) => r.path);
    }
  } catch { /* no catalog on this server: no script mode */ }
  runView.scripts = [...new Set(paths)].sort();
  $("script").replaceChildren(...runView.scripts.map((path) => h("option", { value: path }, path.slice("/async/".length))));
  $("run-mode").hidden = runView.scripts.length === 0;
  if (!runView.scripts.length) setRunMode("command");
}

function setRunMode(mode) {
  const script = mode === "script" && runView.scripts && runView.scripts.length > 0;
  $("run-form").classList.toggle("script-mode", script);
  $("script-box").hidden = !script;
  for (const radio of document.querySelectorAll('input[name="run-mode"]')) radio.checked = radio.value === (script ? "script" : "command");
}

function scriptArgs() {
  return $("script-args").value.split(/\r\n|\r|\n/).map((line) => line.trim()).filter(Boolean);
}

async function submitScript() {
  const button = $("script-submit");
  const path = $("script").value;
  if (button.disabled || !path) return;
  button.disabled = true;
  setText(button, "Starting…");
  setText($("script-error"), "");
  try {
    // No argument: no body at all, which the catalog reads as "no arguments" (null), what
    // an in-process handler expects; otherwise the JSON array of strings.
    const args = scriptArgs();
    const answer = await api(path, { method: "POST", body: args.length ? args : undefined, root: true });
    if (!answer || answer.code !== 0 || typeof answer.data !== "string" || !answer.data) {
      throw new Error((answer && answer.msg) || "the catalog gave no session id");
    }
    loadSummary();
    navigate(`/tasks/${encodeURIComponent(answer.data)}`);
  } catch (err) {
    setText($("script-error"), `Not started: ${err.message}`);
  } finally {
    button.disabled = false;
    setText(button, "Run script");
  }
}

async function submitRun(e) {
  e.preventDefault();
  if ($("run-form").classList.contains("script-mode")) {
    submitScript();
    return;
  }
  const button = $("run-submit");
  if (button.disabled) return;
  const command = $("cmd").value;
  const pending = $("target-input").value.trim();
  if (pending && !addTargets(pending)) return;
  $("target-input").value = "";
  const body = {
    command,
    targets: { hosts: [...runView.hosts], groups: [...runView.groups], all: runView.all },
  };
  const timeout = $("timeout").value.trim();
  if (timeout) {
    const seconds = Number(timeout);
    if (!Number.isInteger(seconds) || seconds < 1) {
      setText($("run-error"), "The timeout is a whole number of seconds, 1 or more.");
      $("timeout").focus();
      return;
    }
    body.timeout = seconds;
  }
  const name = $("task-name").value.trim();
  if (name) body.name = name;
  button.dataset.busy = "1";
  syncRunButton();
  setText($("run-error"), "");
  try {
    const task = await api("/tasks", { method: "POST", body });
    $("task-name").value = "";
    saveDraft();
    loadSummary();
    navigate(`/tasks/${encodeURIComponent(task.id)}`);
  } catch (err) {
    setText($("run-error"), `Not started: ${err.message}`);
  } finally {
    button.dataset.busy = "";
    syncRunButton();
  }
}

export function initRunView() {
  loadDraft();
  $("run-form").addEventListener("submit", submitRun);
  for (const radio of document.querySelectorAll('input[name="run-mode"]')) {
    radio.addEventListener("change", () => {
      if (radio.checked) setRunMode(radio.value);
      if (radio.checked && radio.value === "script") $("script").focus();
    });
  }
  $("script-submit").addEventListener("click", submitScript);
  $("script-args").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      submitScript();
    }
  });
  $("cmd").addEventListener("input", () => { syncRunButton(); saveDraft(); });
  $("cmd").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      $("run-form").requestSubmit();
    }
  });
  for (const id of ["timeout", "task-name"]) $(id).addEventListener("input", saveDraft);
  const input = $("target-input");
  input.addEventListener("keydown", (e) => {
    if ((e.key === "Enter" || e.key === ",") && input.value.trim()) {
      e.preventDefault();
      if (addTargets(input.value)) input.value = "";
      refreshTargetOptions();
      saveDraft();
    } else if (e.key === "Enter" && e.ctrlKey) {
      e.preventDefault();
      $("run-form").requestSubmit();
    } else if (e.key === "Enter") {
      e.preventDefault();
    } else if (e.key === "Backspace" && !input.value) {
      const lastHost = [...runView.hosts].pop();
      const lastGroup = [...runView.groups].pop();
      if (lastHost) runView.hosts.delete(lastHost);
      else if (lastGroup) runView.groups.delete(lastGroup);
      renderTargets();
      saveDraft();
    }
  });
  input.addEventListener("input", (e) => {
    // Picking a suggestion from the list adds it at once.
    if (e.inputType === "insertReplacementText" || e.inputType === undefined) {
      const value = input.value.trim();
      const known = value.startsWith("group:") ? groupsOfFleet().has(value.slice(6)) : fleet.hosts.has(value);
      if (known && addTargets(value)) {
        input.value = "";
        saveDraft();
      }
    }
    refreshTargetOptions();
  });
  for (const radio of document.querySelectorAll('input[name="target-mode"]')) {
    radio.addEventListener("change", () => {
      runView.all = radio.value === "all" && radio.checked;
      renderTargets();
      saveDraft();
    });
  }
  fleet.listeners.add(() => {
    if (current.name === "run") {
      renderTargets();
      if (document.activeElement !== input) refreshTargetOptions();
    }
  });
}
