/* How tasks and runs read as text, shared by the task view, the history and the host view. */

import { parseTime, duration, plural } from "./format.js";

export function targetsText(targets) {
  if (!targets) return "";
  if (targets.all) return "all hosts";
  const parts = [];
  if (targets.groups && targets.groups.length) parts.push(`${targets.groups.length === 1 ? "group" : "groups"} ${targets.groups.join(", ")}`);
  if (targets.hosts && targets.hosts.length) {
    parts.push(targets.hosts.length <= 3 ? targets.hosts.join(", ") : plural(targets.hosts.length, "host"));
  }
  return parts.join(" + ");
}

export function taskDuration(task, now = Date.now()) {
  const start = parseTime(task.started_at);
  if (start === null) return "";
  const end = parseTime(task.finished_at);
  return duration((end === null ? now : end) - start);
}

export function firstLine(text) {
  const line = (text || "").trim().split(/\r\n|\r|\n/)[0];
  return line.length > 80 ? `${line.slice(0, 79)}…` : line;
}

/** True when the task has a name of its own, not the one the server derives from the command. */
export function isNamed(task) {
  if (!task.name || task.name === task.command) return false;
  const first = (task.command || "").trim().split(/\r\n|\r|\n/)[0];
  return task.name !== (first.length <= 80 ? first : `${first.slice(0, 77)}...`);
}

export function extraLines(command) {
  const n = (command || "").trim().split(/\r\n|\r|\n/).length - 1;
  return n > 0 ? ` (+${plural(n, "line")})` : "";
}

export function runDuration(run, now = Date.now()) {
  if (run.duration_ms !== null && run.duration_ms !== undefined) return duration(run.duration_ms);
  if (run.status === "running") {
    const start = parseTime(run.started_at) ?? run._seenRunning;
    if (start) return duration(now - start);
  }
  return "";
}
