/* Keyed rendering: rows are reused by key so that live updates never steal focus or
 * scroll position, and only rows on screen exist in the DOM. Also the pager and the metric bars.
 */

import { h, setText } from "./dom.js";
import { plural, pct } from "./format.js";

export function renderKeyed(tbody, cache, items, keyOf, create, update) {
  const seen = new Set();
  let cursor = tbody.firstElementChild;
  for (const item of items) {
    const key = keyOf(item);
    seen.add(key);
    let row = cache.get(key);
    if (!row) {
      row = create(item);
      cache.set(key, row);
    }
    update(row, item);
    if (row !== cursor) tbody.insertBefore(row, cursor);
    else cursor = cursor.nextElementSibling;
  }
  for (const [key, row] of cache) {
    if (!seen.has(key)) {
      row.remove();
      cache.delete(key);
    }
  }
}

export function renderPager(nav, page, pages, total, onPage, noun) {
  if (pages <= 1) {
    nav.replaceChildren();
    return;
  }
  // The buttons are kept across updates, so that a live refresh never takes the focus away.
  if (!nav.firstChild) {
    nav.append(
      h("button", { type: "button", class: "btn small", "aria-label": "Previous page", onclick: () => nav._go(-1) }, "‹ Prev"),
      h("span", { class: "pager-info" }),
      h("button", { type: "button", class: "btn small", "aria-label": "Next page", onclick: () => nav._go(1) }, "Next ›"),
    );
  }
  nav._go = (step) => onPage(Math.min(pages, Math.max(1, page + step)));
  nav.firstChild.disabled = page <= 1;
  nav.lastChild.disabled = page >= pages;
  setText(nav.children[1], `Page ${page.toLocaleString()} of ${pages.toLocaleString()} · ${plural(total, noun)}`);
}

export function bar(value, max, label) {
  const fill = h("span", { class: "bar-fill" });
  const el = h("span", { class: "metric", title: label },
    h("span", { class: "bar", "aria-hidden": "true" }, fill), h("span", { class: "metric-value" }));
  updateBar(el, value, max, label);
  return el;
}

export function updateBar(el, value, max, label, text) {
  const fill = el.firstChild.firstChild;
  const ratio = value === null || value === undefined ? 0 : Math.max(0, Math.min(1, value / max));
  fill.style.width = `${(ratio * 100).toFixed(1)}%`;
  el.dataset.level = ratio >= 0.9 ? "high" : ratio >= 0.7 ? "mid" : "low";
  setText(el.lastChild, text !== undefined ? text : pct(value));
  el.title = label;
}

export function light(status) {
  return h("span", { class: "light", dataset: { status }, "aria-hidden": "true" });
}
