/* Small DOM helpers. h() builds elements; strings become text nodes, never markup. */

import { STATUS_LABEL } from "./config.js";
import { auth } from "./state.js";

export const $ = (id) => document.getElementById(id);

export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props) {
    for (const [key, value] of Object.entries(props)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key === "dataset") Object.assign(el.dataset, value);
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
  return el;
}

export function setText(el, text) {
  const value = text === null || text === undefined ? "" : String(text);
  if (el.textContent !== value) el.textContent = value;
}

export const statusLabel = (status) => STATUS_LABEL[status] || status;

export function badge(status) {
  return h("span", { class: "badge", dataset: { status } }, statusLabel(status));
}

export function announce(message) {
  const region = $("announce");
  region.textContent = "";
  // A fresh text node after a tick makes screen readers read repeated messages too.
  setTimeout(() => { region.textContent = message; }, 50);
}

export function toast(message, kind = "error") {
  if (auth.loggedOut) return; // the login form says all there is to say
  const box = h("div", { class: `toast ${kind}` }, h("span", null, message),
    h("button", { type: "button", class: "icon-btn", "aria-label": "Dismiss", onclick: () => box.remove() }, "×"));
  $("toasts").append(box);
  setTimeout(() => box.remove(), kind === "error" ? 9000 : 4000);
}
