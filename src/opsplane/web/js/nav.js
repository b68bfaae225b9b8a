/* Moving between views: the address (#/fleet, #/run, #/tasks, #/tasks/ID, #/hosts/NAME, with
 * ?query for filters) and which view is shown. The route table itself is in router.js.
 */

import { $, setText } from "./dom.js";

export function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/fleet";
  const q = raw.indexOf("?");
  return { path: q < 0 ? raw : raw.slice(0, q), params: new URLSearchParams(q < 0 ? "" : raw.slice(q + 1)) };
}

export function navigate(path) {
  location.hash = `#${path}`;
}

export function replaceHash(path) {
  history.replaceState(null, "", `#${path}`);
}

export function showView(id) {
  for (const view of document.querySelectorAll("main > .view")) view.hidden = view.id !== id;
}

export function showMissing(text) {
  setText($("missing-text"), text);
  showView("view-missing");
  document.title = "Not found · opsplane";
}

export function safeDecode(s) {
  try { return decodeURIComponent(s); } catch { return s; }
}
