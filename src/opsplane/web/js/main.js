/* opsplane web page: plain JavaScript in ES modules, no framework, no build step. This is the
 * entry point (index.html loads it with <script type="module">): keyboard shortcuts, theme,
 * start-up. docs/architecture.md has the module map.
 *
 * The page talks to the control plane only through the public API (/api/v1). Everything a host
 * sends (names, labels, output) is untrusted and reaches the page through textContent only: no
 * module assigns innerHTML.
 */

import { auth, fleet, current } from "./state.js";
import { $ } from "./dom.js";
import { refreshTimes } from "./format.js";
import { showLogin, showUser } from "./session.js";
import { api } from "./api.js";
import { initLogin } from "./login.js";
import { loadHosts, loadSummary, connectFleet } from "./fleet.js";
import { navigate } from "./nav.js";
import { initFleetView } from "./fleet-view.js";
import { initRunView } from "./run-view.js";
import { tickTask, initTaskView } from "./task-view.js";
import { initTasksView } from "./tasks-view.js";
import { initHostView } from "./host-view.js";
import { initSchedulesView } from "./schedules-view.js";
import { initTemplatesView } from "./templates-view.js";
import { ROUTES, route } from "./router.js";

function typing(target) {
  return target instanceof HTMLElement && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
}

function onKey(e) {
  if (auth.loggedOut) return;
  if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey) return;
  if (document.querySelector("dialog[open]")) return;
  if (e.key === "Escape" && typing(e.target)) {
    e.target.blur();
    return;
  }
  if (typing(e.target)) return;
  if (e.key === "r") {
    e.preventDefault();
    if (current.name === "run") $("cmd").focus();
    else navigate("/run");
  } else if (e.key === "/") {
    e.preventDefault();
    const r = ROUTES.find((x) => x.name === current.name);
    if (r && r.filter) $(r.filter).focus();
    else navigate("/fleet");
  } else if (e.key === "f") {
    navigate("/fleet");
  } else if (e.key === "t") {
    navigate("/tasks");
  } else if (e.key === "?") {
    $("help").showModal();
  }
}

const THEMES = ["auto", "light", "dark"];
const THEME_LABEL = { auto: "Theme: follow system", light: "Theme: light", dark: "Theme: dark" };

function applyTheme(theme) {
  if (theme === "auto") delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
  const button = $("theme");
  button.setAttribute("aria-label", THEME_LABEL[theme]);
  button.title = THEME_LABEL[theme];
  button.dataset.theme = theme;
}

function initTheme() {
  let theme = "auto";
  try { theme = localStorage.getItem("opsplane.theme") || "auto"; } catch { /* no storage */ }
  if (!THEMES.includes(theme)) theme = "auto";
  applyTheme(theme);
  $("theme").addEventListener("click", () => {
    const next = THEMES[(THEMES.indexOf($("theme").dataset.theme) + 1) % THEMES.length];
    applyTheme(next);
    try { localStorage.setItem("opsplane.theme", next); } catch { /* no storage */ }
  });
}

function start() {
  if (matchMedia("(pointer: coarse)").matches) {
    // Keyboard hints mean nothing on a touch screen.
    for (const input of document.querySelectorAll("input[placeholder]")) input.placeholder = input.placeholder.replace(/\s*\( \/ \)$/, "");
  }
  initTheme();
  initFleetView();
  initRunView();
  initTaskView();
  initTasksView();
  initHostView();
  initSchedulesView();
  initTemplatesView();
  $("skip").addEventListener("click", (e) => {
    e.preventDefault();
    $("main").focus();
  });
  $("help-open").addEventListener("click", () => $("help").showModal());
  initLogin();
  document.addEventListener("keydown", onKey);
  window.addEventListener("hashchange", () => { if (!auth.loggedOut) route(true); });
  // Nothing loads before the session is known: logged out, the login form is all there is.
  api("/auth/me").then((me) => {
    showUser(me);
    route(false);
    connectFleet();
    loadSummary();
    loadHosts();
  }).catch((e) => {
    if (e.status !== 401) showLogin(`Could not reach the control plane: ${e.message}`);
  });
  setInterval(() => {
    if (document.hidden || auth.loggedOut || !auth.user) return;
    // Relative times tick; the summary is polled only when the stream has been quiet.
    const view = document.querySelector("main > .view:not([hidden])");
    if (view) refreshTimes(view);
    if (current.name === "task") tickTask();
    if (Date.now() - fleet.lastSummaryAt > 15000) loadSummary();
  }, 1000);
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
else start();
