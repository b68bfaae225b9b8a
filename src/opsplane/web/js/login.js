/* The login form and the logout button. */

import { API } from "./config.js";
import { $, setText } from "./dom.js";
import { describe, api } from "./api.js";

async function submitLogin(e) {
  e.preventDefault();
  const name = $("login-name").value.trim();
  const password = $("login-password").value;
  if (!name || !password) {
    setText($("login-error"), "Give your name and password.");
    return;
  }
  const button = $("login-submit");
  button.disabled = true;
  setText($("login-error"), "");
  try {
    const response = await fetch(`${API}/auth/login`, {
      method: "POST",
      headers: { Accept: "application/json", "Content-Type": "application/json" },
      body: JSON.stringify({ name, password }),
      credentials: "same-origin",
      cache: "no-store",
    });
    if (response.ok) {
      // A fresh start with the session: every view loads as on a first visit, and the
      // address (the view the user was on) is kept.
      location.reload();
      return;
    }
    let message = "";
    try { message = describe((await response.json()).detail); } catch { /* not JSON */ }
    setText($("login-error"), response.status === 401 ? "Wrong name or password." : message || `${response.status} ${response.statusText}`);
    $("login-password").select();
  } catch {
    setText($("login-error"), "The control plane is unreachable.");
  } finally {
    button.disabled = false;
  }
}

async function logout() {
  try { await api("/auth/logout", { method: "POST" }); } catch { /* gone already */ }
  location.reload();
}

export function initLogin() {
  $("login-form").addEventListener("submit", submitLogin);
  $("logout").addEventListener("click", logout);
}
