/* The session as the page sees it. The session cookie (HttpOnly) rides along by itself, on
 * requests and on event streams, since the page and the API share an origin. A state-changing
 * request also echoes the CSRF cookie in a header: a page of another origin can neither read that
 * cookie nor set that header. Any 401 shows the login form.
 */

import { auth, fleet, current } from "./state.js";
import { $, h, setText } from "./dom.js";

export function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)opsplane_csrf=([^;]*)/);
  return match ? decodeURIComponent(match[1]) : "";
}

export function showLogin(message) {
  const first = !auth.loggedOut;
  auth.loggedOut = true;
  auth.user = null;
  if (fleet.source) {
    fleet.source.close();
    fleet.source = null;
  }
  if (current.leave) {
    current.leave();
    current.leave = null;
  }
  document.body.classList.add("logged-out");
  $("login").hidden = false;
  document.title = "Log in · opsplane";
  setText($("login-error"), message || "");
  if (first) ($("login-name").value ? $("login-password") : $("login-name")).focus();
}

export function showUser(me) {
  auth.user = me;
  const who = $("whoami");
  who.replaceChildren(h("strong", null, me.name), ` · ${me.role}`);
  who.title = me.groups ? `${me.name} (${me.role} on ${me.groups.join(", ")})` : `${me.name} (${me.role})`;
  who.hidden = false;
  $("logout").hidden = me.via !== "session";
}
