/* Routing: the route table and route(), which leaves the current view and enters the next. */

import { current } from "./state.js";
import { $ } from "./dom.js";
import { parseHash, replaceHash, showView, showMissing, safeDecode } from "./nav.js";
import { enterFleet, leaveFleet } from "./fleet-view.js";
import { enterRun } from "./run-view.js";
import { enterTask, leaveTask } from "./task-view.js";
import { enterTasks, leaveTasks } from "./tasks-view.js";
import { enterHost, leaveHost } from "./host-view.js";
import { enterTemplates, leaveTemplates } from "./templates-view.js";
import { enterSchedules, leaveSchedules } from "./schedules-view.js";

export const ROUTES = [
  { re: /^\/fleet$/, name: "fleet", view: "view-fleet", enter: enterFleet, leave: leaveFleet, title: "Fleet", filter: "fleet-q" },
  { re: /^\/run$/, name: "run", view: "view-run", enter: enterRun, title: "Run", filter: "cmd" },
  { re: /^\/tasks$/, name: "tasks", view: "view-tasks", enter: enterTasks, leave: leaveTasks, title: "Tasks", filter: "tasks-name" },
  { re: /^\/tasks\/([^/]+)$/, name: "task", view: "view-task", enter: enterTask, leave: leaveTask, title: "Task", nav: "tasks", filter: "output-host" },
  { re: /^\/templates$/, name: "templates", view: "view-templates", enter: enterTemplates, leave: leaveTemplates, title: "Templates" },
  { re: /^\/schedules$/, name: "schedules", view: "view-schedules", enter: enterSchedules, leave: leaveSchedules, title: "Schedules" },
  { re: /^\/hosts\/([^/]+)$/, name: "host", view: "view-host", enter: enterHost, leave: leaveHost, title: "Host", nav: "fleet" },
];

export function route(focus) {
  const { path, params } = parseHash();
  if (path === "/" || path === "" || !location.hash.startsWith("#/")) {
    replaceHash("/fleet");
    return route(focus);
  }
  if (current.leave) current.leave();
  current.leave = null;
  let found = null;
  let arg = null;
  for (const r of ROUTES) {
    const m = r.re.exec(path);
    if (m) {
      found = r;
      arg = m[1] === undefined ? null : safeDecode(m[1]);
      break;
    }
  }
  for (const link of document.querySelectorAll(".nav a")) {
    if (found && link.dataset.nav === (found.nav || found.name)) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (!found) {
    current.name = null;
    showMissing("There is nothing at this address.");
    return;
  }
  current.name = found.name;
  current.leave = found.leave || null;
  document.title = `${found.title} · opsplane`;
  showView(found.view);
  found.enter(params, arg);
  if (focus) {
    // On a touch screen, focusing the command box would pop the keyboard up unasked.
    if (found.name === "run" && !matchMedia("(pointer: coarse)").matches) $("cmd").focus();
    else {
      const heading = document.querySelector(`#${found.view} h1`);
      heading.focus({ preventScroll: true });
      window.scrollTo(0, 0);
    }
  }
}
