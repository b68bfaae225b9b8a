/* The API. Every request goes through api(), every stream through stream(): credentials
 * and the CSRF header are added here and nowhere else.
 */

import { API } from "./config.js";
import { auth } from "./state.js";
import { csrfToken, showLogin } from "./session.js";

const UNSAFE = new Set(["POST", "PUT", "PATCH", "DELETE"]);

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function describe(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = (d.loc || []).filter((p) => p !== "body").join(".");
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("; ");
  }
  return "";
}

/** root: the path is at the server root (the catalog's seed routes), not under /api/v1. */
export async function api(path, { method = "GET", body, signal, as = "json", root = false } = {}) {
  const headers = { Accept: as === "json" ? "application/json" : "text/plain" };
  const init = { method, headers, signal, credentials: "same-origin", cache: "no-store" };
  if (UNSAFE.has(method)) {
    const token = csrfToken();
    if (token) headers["X-CSRF-Token"] = token;
  }
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch((root ? "" : API) + path, init);
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "The control plane is unreachable.");
  }
  if (!response.ok) {
    let message = "";
    try {
      const answer = await response.json();
      // The seed's envelope ({code, data, msg}) says what went wrong in msg.
      message = describe(answer.detail) || (typeof answer.msg === "string" ? answer.msg : "");
    } catch { /* not JSON */ }
    if (response.status === 401) showLogin(auth.user ? "Your session has ended: log in again." : "");
    throw new ApiError(response.status, message || `${response.status} ${response.statusText}`);
  }
  return as === "json" ? response.json() : as === "blob" ? response.blob() : response.text();
}

export function stream(path) {
  return new EventSource(API + path, { withCredentials: true });
}
