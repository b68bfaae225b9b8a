/* opsplane web page: plain JavaScript, no framework, no build step.
 *
 * Talks to the control plane only through the public API (/api/v1). Everything a host sends
 * (names, labels, output) is untrusted and reaches the page through textContent only: this file
 * never assigns innerHTML.
 */
"use strict";

(() => {
  const API = "/api/v1";
  const TERMINAL_TASK = new Set(["succeeded", "failed", "canceled", "timed_out"]);
  const TERMINAL_RUN = new Set(["succeeded", "failed", "timed_out", "canceled", "undeliverable", "lost"]);
  const RUN_ORDER = ["running", "dispatched", "pending", "delayed", "succeeded", "failed", "timed_out", "canceled", "undeliverable", "lost"];
  const STATUS_LABEL = { timed_out: "timed out" };
  const LINK_LABEL = { grpc: "gRPC", amqp: "RabbitMQ", ssh: "SSH", local: "Local" };
  const FLEET_PAGE = 100;
  const TASKS_PAGE = 50;
  const RUNS_PAGE = 200;
  const MAX_LINES = 20000; // output lines kept in the page; the full log is a download away
  const SAMPLES = 90; // sparkline points kept per host

  // ---------------------------------------------------------------------------------------
  // Small DOM helpers. h() builds elements; strings become text nodes, never markup.

  const $ = (id) => document.getElementById(id);

  function h(tag, props, ...children) {
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

  function svg(tag, attrs) {
    const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    return el;
  }

  function setText(el, text) {
    const value = text === null || text === undefined ? "" : String(text);
    if (el.textContent !== value) el.textContent = value;
  }

  const statusLabel = (status) => STATUS_LABEL[status] || status;

  function badge(status) {
    return h("span", { class: "badge", dataset: { status } }, statusLabel(status));
  }

  function announce(message) {
    const region = $("announce");
    region.textContent = "";
    // A fresh text node after a tick makes screen readers read repeated messages too.
    setTimeout(() => { region.textContent = message; }, 50);
  }

  function toast(message, kind = "error") {
    if (auth.loggedOut) return; // the login form says all there is to say
    const box = h("div", { class: `toast ${kind}` }, h("span", null, message),
      h("button", { type: "button", class: "icon-btn", "aria-label": "Dismiss", onclick: () => box.remove() }, "×"));
    $("toasts").append(box);
    setTimeout(() => box.remove(), kind === "error" ? 9000 : 4000);
  }

  // ---------------------------------------------------------------------------------------
  // Time and number formatting.

  function parseTime(iso) {
    if (!iso) return null;
    const t = Date.parse(iso);
    return Number.isNaN(t) ? null : t;
  }

  function relTime(iso, now = Date.now()) {
    const t = parseTime(iso);
    if (t === null) return "never";
    const s = Math.round((now - t) / 1000);
    if (s < 2) return "just now";
    if (s < 60) return `${s}s ago`;
    if (s < 3600) return `${Math.floor(s / 60)}m ago`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
    return `${Math.floor(s / 86400)}d ago`;
  }

  function absTime(iso) {
    const t = parseTime(iso);
    return t === null ? "" : new Date(t).toLocaleString();
  }

  function duration(ms) {
    if (ms === null || ms === undefined || ms < 0) return "";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
    return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
  }

  const plural = (n, one, many = `${one}s`) => `${n.toLocaleString()} ${n === 1 ? one : many}`;
  const pct = (v) => (v === null || v === undefined ? "–" : `${v < 10 ? v.toFixed(1) : Math.round(v)}%`);

  function timeEl(iso) {
    return h("time", { datetime: iso || undefined, title: absTime(iso) || undefined, dataset: { rel: iso || "" } }, relTime(iso));
  }

  function refreshTimes(root) {
    const now = Date.now();
    for (const el of root.querySelectorAll("time[data-rel]")) setText(el, relTime(el.dataset.rel || null, now));
  }

  // ---------------------------------------------------------------------------------------
  // Authentication. The session cookie (HttpOnly) rides along by itself, on requests and on
  // event streams, since the page and the API share an origin. A state-changing request also
  // echoes the CSRF cookie in a header: a page of another origin can neither read that cookie
  // nor set that header. Any 401 shows the login form.

  const auth = { user: null, loggedOut: false };
  const UNSAFE = new Set(["POST", "PUT", "PATCH", "DELETE"]);

  function csrfToken() {
    const match = document.cookie.match(/(?:^|;\s*)opsplane_csrf=([^;]*)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function showLogin(message) {
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

  function showUser(me) {
    auth.user = me;
    const who = $("whoami");
    who.replaceChildren(h("strong", null, me.name), ` · ${me.role}`);
    who.title = me.groups ? `${me.name} (${me.role} on ${me.groups.join(", ")})` : `${me.name} (${me.role})`;
    who.hidden = false;
    $("logout").hidden = me.via !== "session";
  }

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

  function initLogin() {
    $("login-form").addEventListener("submit", submitLogin);
    $("logout").addEventListener("click", logout);
  }

  // ---------------------------------------------------------------------------------------
  // The API. Every request goes through api(), every stream through stream(): credentials
  // and the CSRF header are added here and nowhere else.

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function describe(detail) {
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
  async function api(path, { method = "GET", body, signal, as = "json", root = false } = {}) {
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

  function stream(path) {
    return new EventSource(API + path, { withCredentials: true });
  }

  // ---------------------------------------------------------------------------------------
  // The fleet: every host, loaded once and kept current by the fleet event stream. Views
  // subscribe to changes; samples feed the per-host sparkline.

  const fleet = {
    hosts: new Map(),
    samples: new Map(),
    summary: null,
    loaded: false,
    listeners: new Set(),
    pending: new Set(),
    notifyTimer: 0,
    freshDuringLoad: null,
    lastSummaryAt: 0,
    source: null,
    streamBroken: false,
    // The id of the last fleet event: a reconnect resumes from it and gets only the hosts
    // changed meanwhile (a delta), never the whole fleet again.
    lastEventId: "",
  };

  function recordSample(host) {
    const t = parseTime(host.last_seen_at);
    if (t === null || host.cpu_usage === null || host.memory_usage === null) return;
    let ring = fleet.samples.get(host.name);
    if (!ring) {
      ring = { t: new Float64Array(SAMPLES), cpu: new Float32Array(SAMPLES), mem: new Float32Array(SAMPLES), n: 0, head: 0 };
      fleet.samples.set(host.name, ring);
    }
    const last = ring.n ? ring.t[(ring.head + SAMPLES - 1) % SAMPLES] : -1;
    if (t <= last) return;
    ring.t[ring.head] = t;
    ring.cpu[ring.head] = host.cpu_usage;
    ring.mem[ring.head] = host.memory_usage;
    ring.head = (ring.head + 1) % SAMPLES;
    ring.n = Math.min(ring.n + 1, SAMPLES);
  }

  function samplesOf(name) {
    const ring = fleet.samples.get(name);
    const out = [];
    if (!ring) return out;
    for (let i = 0; i < ring.n; i++) {
      const k = (ring.head - ring.n + i + SAMPLES) % SAMPLES;
      out.push({ t: ring.t[k], cpu: ring.cpu[k], mem: ring.mem[k] });
    }
    return out;
  }

  function upsertHost(host, fromStream) {
    if (!host || typeof host.name !== "string") return;
    if (!fromStream && fleet.freshDuringLoad && fleet.freshDuringLoad.has(host.name)) return;
    if (fromStream && fleet.freshDuringLoad) fleet.freshDuringLoad.add(host.name);
    fleet.hosts.set(host.name, host);
    recordSample(host);
    fleet.pending.add(host.name);
    scheduleNotify();
  }

  function removeHost(name) {
    if (!fleet.hosts.delete(name)) return;
    fleet.samples.delete(name);
    fleet.pending.add(name);
    scheduleNotify();
  }

  function scheduleNotify() {
    if (fleet.notifyTimer) return;
    fleet.notifyTimer = setTimeout(() => {
      fleet.notifyTimer = 0;
      const changed = fleet.pending;
      fleet.pending = new Set();
      for (const fn of fleet.listeners) {
        try { fn(changed); } catch (e) { console.error(e); }
      }
    }, 150);
  }

  async function loadHosts() {
    fleet.freshDuringLoad = new Set();
    const seen = new Set();
    try {
      // A first screenful at once, then the rest a thousand at a time by cursor: no host is
      // missed or repeated when hosts register meanwhile, and the first rows show after one
      // small request.
      let size = 200;
      let cursor = "";
      for (let pages = 0; pages < 1000; pages++) {
        const result = await api(`/hosts?size=${size}${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
        for (const host of result.items) {
          seen.add(host.name);
          upsertHost(host, false);
        }
        if (!result.next_cursor) break;
        cursor = result.next_cursor;
        size = 1000;
      }
      // A reload (after a reset) also forgets the hosts removed meanwhile.
      for (const name of [...fleet.hosts.keys()]) {
        if (!seen.has(name) && !fleet.freshDuringLoad.has(name)) removeHost(name);
      }
      fleet.loaded = true;
    } catch (e) {
      toast(`Could not load the hosts: ${e.message}`);
    } finally {
      fleet.freshDuringLoad = null;
      fleet.pending.add("*");
      scheduleNotify();
    }
  }

  async function loadSummary() {
    try {
      setSummary(await api("/fleet/summary"));
    } catch { /* the stream or the next poll will bring it */ }
  }

  function setSummary(summary) {
    fleet.summary = summary;
    fleet.lastSummaryAt = Date.now();
    setText($("sum-online"), summary.online.toLocaleString());
    setText($("sum-offline"), summary.offline.toLocaleString());
    setText($("sum-unknown"), summary.unknown.toLocaleString());
    $("sum-unknown-wrap").hidden = !summary.unknown;
    setText($("sum-running"), summary.running_tasks.toLocaleString());
    document.querySelector('.count[data-kind="offline"]').classList.toggle("alert", summary.offline > 0);
  }

  function setLive(state) {
    const el = $("live");
    if (el.dataset.state === state) return;
    el.dataset.state = state;
    setText($("live-text"), { live: "Live", connecting: "Connecting…", lost: "Reconnecting…" }[state]);
  }

  function connectFleet() {
    // The browser resends the last id by itself when it reconnects; a stream opened anew
    // names it in the query.
    const since = fleet.lastEventId ? `?since=${encodeURIComponent(fleet.lastEventId)}` : "";
    const source = stream(`/fleet/events${since}`);
    fleet.source = source;
    source.addEventListener("host", (e) => upsertHost(JSON.parse(e.data), true));
    source.addEventListener("gone", (e) => removeHost(JSON.parse(e.data).name));
    source.addEventListener("summary", (e) => {
      if (e.lastEventId) fleet.lastEventId = e.lastEventId;
      setSummary(JSON.parse(e.data));
    });
    // The server cannot tell what changed while we were away (it restarted): reload.
    source.addEventListener("reset", () => loadHosts());
    source.onopen = () => {
      setLive("live");
      fleet.streamBroken = false;
    };
    source.onerror = () => {
      setLive("lost");
      fleet.streamBroken = true;
      if (source.readyState === EventSource.CLOSED) {
        // The browser gave up (an HTTP error, not a dropped connection): retry ourselves,
        // after checking the session (a 401 there shows the login form instead).
        setTimeout(() => {
          if (fleet.source !== source || auth.loggedOut) return;
          api("/auth/me").then(() => { if (fleet.source === source) connectFleet(); }).catch(() => {});
        }, 3000);
      }
    };
  }

  function groupsOfFleet() {
    const groups = new Map();
    for (const host of fleet.hosts.values()) {
      for (const g of host.groups || []) groups.set(g, (groups.get(g) || 0) + 1);
    }
    return new Map([...groups.entries()].sort((a, b) => a[0].localeCompare(b[0])));
  }

  // ---------------------------------------------------------------------------------------
  // Keyed rendering: rows are reused by key so that live updates never steal focus or
  // scroll position, and only rows on screen exist in the DOM.

  function renderKeyed(tbody, cache, items, keyOf, create, update) {
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

  function renderPager(nav, page, pages, total, onPage, noun) {
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

  function bar(value, max, label) {
    const fill = h("span", { class: "bar-fill" });
    const el = h("span", { class: "metric", title: label },
      h("span", { class: "bar", "aria-hidden": "true" }, fill), h("span", { class: "metric-value" }));
    updateBar(el, value, max, label);
    return el;
  }

  function updateBar(el, value, max, label, text) {
    const fill = el.firstChild.firstChild;
    const ratio = value === null || value === undefined ? 0 : Math.max(0, Math.min(1, value / max));
    fill.style.width = `${(ratio * 100).toFixed(1)}%`;
    el.dataset.level = ratio >= 0.9 ? "high" : ratio >= 0.7 ? "mid" : "low";
    setText(el.lastChild, text !== undefined ? text : pct(value));
    el.title = label;
  }

  function light(status) {
    return h("span", { class: "light", dataset: { status }, "aria-hidden": "true" });
  }

  // ---------------------------------------------------------------------------------------
  // Fleet view

  const fleetView = {
    rows: new Map(),
    state: { q: "", group: "", status: "", sort: "name", dir: 1, page: 1 },
    list: [],
    active: false,
  };

  function hostMatches(host, q, group, status) {
    if (status && host.status !== status) return false;
    if (group && !(host.groups || []).includes(group)) return false;
    if (!q) return true;
    const hay = host._hay || (host._hay = [
      host.name, host.link, LINK_LABEL[host.link] || "", host.agent_version || "", host.os || "",
      ...(host.groups || []), ...Object.entries(host.labels || {}).map(([k, v]) => `${k}=${v}`),
    ].join("\n").toLowerCase());
    return q.split(/\s+/).every((word) => hay.includes(word));
  }

  const STATUS_RANK = { offline: 0, unknown: 1, online: 2 };

  function computeFleetList() {
    const { q, group, status, sort, dir } = fleetView.state;
    const needle = q.trim().toLowerCase();
    const list = [];
    for (const host of fleet.hosts.values()) if (hostMatches(host, needle, group, status)) list.push(host);
    const byName = (a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
    let cmp;
    if (sort === "name") cmp = byName;
    else if (sort === "status") cmp = (a, b) => (STATUS_RANK[a.status] ?? 1) - (STATUS_RANK[b.status] ?? 1) || byName(a, b);
    else if (sort === "last_seen_at") cmp = (a, b) => (parseTime(a.last_seen_at) || 0) - (parseTime(b.last_seen_at) || 0) || byName(a, b);
    else cmp = (a, b) => (a[sort] ?? -1) - (b[sort] ?? -1) || byName(a, b);
    list.sort((a, b) => dir * cmp(a, b));
    fleetView.list = list;
  }

  function createHostRow(host) {
    const link = h("a", { href: `#/hosts/${encodeURIComponent(host.name)}`, class: "host-link" }, host.name);
    return h("tr", { dataset: { host: host.name } },
      h("td", { class: "c-status", "data-label": "Status" }, light(host.status), h("span", { class: "status-text" })),
      h("td", { class: "c-name", "data-label": "Host" }, link),
      h("td", { class: "c-link", "data-label": "Link" }, h("span", { class: "tag link-tag" })),
      h("td", { class: "c-tags", "data-label": "Groups & labels" }, h("span", { class: "tags" })),
      h("td", { class: "c-metric", "data-label": "CPU" }, bar(null, 100, "")),
      h("td", { class: "c-metric", "data-label": "Memory" }, bar(null, 100, "")),
      h("td", { class: "c-metric", "data-label": "Load" }, bar(null, 4, "")),
      h("td", { class: "c-metric", "data-label": "Disk" }, bar(null, 100, "")),
      h("td", { class: "c-seen", "data-label": "Heartbeat" }, h("time", { dataset: { rel: "" } })),
      h("td", { class: "c-version", "data-label": "Agent" }),
    );
  }

  function updateHostRow(tr, host, loadMax) {
    if (tr._host === host && tr._loadMax === loadMax) return;
    tr._host = host;
    tr._loadMax = loadMax;
    const cells = tr.children;
    tr.dataset.status = host.status;
    cells[0].firstChild.dataset.status = host.status;
    setText(cells[0].lastChild, host.status);
    setText(cells[2].firstChild, LINK_LABEL[host.link] || host.link);
    const key = JSON.stringify([host.groups, host.labels]);
    if (tr._tags !== key) {
      tr._tags = key;
      cells[3].replaceChildren(h("span", { class: "tags" },
        (host.groups || []).map((g) => h("button", { type: "button", class: "tag group", title: `Show only group ${g}`, dataset: { group: g } }, g)),
        Object.entries(host.labels || {}).map(([k, v]) => h("span", { class: "tag label" }, `${k}=${v}`))));
    }
    updateBar(cells[4].firstChild, host.cpu_usage, 100, `CPU ${pct(host.cpu_usage)}`);
    updateBar(cells[5].firstChild, host.memory_usage, 100, `Memory ${pct(host.memory_usage)}`);
    const load = host.load === null || host.load === undefined ? "–" : host.load.toFixed(2);
    updateBar(cells[6].firstChild, host.load, loadMax, `Load ${load} (bar relative to ${loadMax.toFixed(1)})`, load);
    updateBar(cells[7].firstChild, host.disk_usage, 100, `Disk ${pct(host.disk_usage)}`);
    const time = cells[8].firstChild;
    time.dataset.rel = host.last_seen_at || "";
    if (host.last_seen_at) time.setAttribute("datetime", host.last_seen_at);
    time.title = absTime(host.last_seen_at);
    setText(time, relTime(host.last_seen_at));
    setText(cells[9], host.agent_version || "–");
  }

  function renderFleet() {
    if (!fleetView.active) return;
    const { page } = fleetView.state;
    const list = fleetView.list;
    const pages = Math.max(1, Math.ceil(list.length / FLEET_PAGE));
    const current = Math.min(page, pages);
    fleetView.state.page = current;
    const slice = list.slice((current - 1) * FLEET_PAGE, current * FLEET_PAGE);
    // Load has no natural maximum: bars are relative to the busiest host on screen (at least 1).
    let loadMax = 1;
    for (const host of slice) if (host.load > loadMax) loadMax = host.load;
    loadMax = Math.ceil(loadMax);
    renderKeyed($("fleet-rows"), fleetView.rows, slice, (x) => x.name, createHostRow, (tr, host) => updateHostRow(tr, host, loadMax));
    renderPager($("fleet-pager"), current, pages, list.length, (p) => { fleetView.state.page = p; syncFleetHash(); renderFleet(); $("fleet-title").scrollIntoView({ block: "start" }); }, "host");

    const total = fleet.hosts.size;
    const empty = $("fleet-empty");
    empty.replaceChildren();
    if (!fleet.loaded && total === 0) {
      empty.append(h("p", null, "Loading hosts…"));
    } else if (total === 0) {
      empty.append(h("p", { class: "empty-title" }, "No hosts yet."),
        h("p", null, "Start an agent and it appears here within a heartbeat:"),
        h("pre", { class: "cmd" }, `opsplane agent --server ${location.hostname}:50051 --name web-1 --group web`));
    } else if (list.length === 0) {
      empty.append(h("p", { class: "empty-title" }, "No host matches these filters."),
        h("button", { type: "button", class: "btn small", onclick: clearFleetFilters }, "Clear filters"));
    }
    empty.hidden = !empty.firstChild;
    $("fleet-table").hidden = list.length === 0;

    const from = list.length ? (current - 1) * FLEET_PAGE + 1 : 0;
    const to = Math.min(current * FLEET_PAGE, list.length);
    const filtered = list.length !== total;
    setText($("fleet-range"), total === 0 ? "" : filtered
      ? `${plural(list.length, "host")} match of ${total.toLocaleString()}${list.length > FLEET_PAGE ? ` · showing ${from.toLocaleString()}–${to.toLocaleString()}` : ""}`
      : `${plural(total, "host")}${total > FLEET_PAGE ? ` · showing ${from.toLocaleString()}–${to.toLocaleString()}` : ""}`);

    const runLink = $("fleet-run");
    const st = fleetView.state;
    const filteredTargets = st.group && !st.q && !st.status ? `#/run?groups=${encodeURIComponent(st.group)}` : null;
    if (filteredTargets) {
      runLink.href = filteredTargets;
      setText(runLink, `Run on group ${st.group}`);
      runLink.hidden = false;
    } else if (filtered && list.length > 0 && list.length <= 50) {
      runLink.href = `#/run?hosts=${list.map((x) => encodeURIComponent(x.name)).join(",")}`;
      setText(runLink, `Run on these ${plural(list.length, "host")}`);
      runLink.hidden = false;
    } else {
      runLink.href = "#/run";
      setText(runLink, "Run a command");
      runLink.hidden = false;
    }

    for (const th of document.querySelectorAll("#fleet-table th[data-sort]")) {
      if (th.dataset.sort === st.sort) th.setAttribute("aria-sort", st.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  function refreshGroupOptions() {
    const select = $("fleet-group");
    const groups = groupsOfFleet();
    const want = fleetView.state.group;
    const key = JSON.stringify([...groups.entries(), want]);
    if (select._key === key) return;
    select._key = key;
    const options = [h("option", { value: "" }, "All groups")];
    for (const [g, n] of groups) options.push(h("option", { value: g }, `${g} (${n})`));
    if (want && !groups.has(want)) options.push(h("option", { value: want }, want));
    select.replaceChildren(...options);
    select.value = want;
  }

  function onFleetChange(changed) {
    if (!fleetView.active) return;
    refreshGroupOptions();
    computeFleetList();
    renderFleet();
    void changed;
  }

  function syncFleetHash() {
    const { q, group, status, sort, dir, page } = fleetView.state;
    const p = new URLSearchParams();
    if (q) p.set("q", q);
    if (group) p.set("group", group);
    if (status) p.set("status", status);
    if (sort !== "name" || dir !== 1) p.set("sort", `${dir < 0 ? "-" : ""}${sort}`);
    if (page > 1) p.set("page", String(page));
    replaceHash(`/fleet${p.toString() ? `?${p}` : ""}`);
  }

  function clearFleetFilters() {
    Object.assign(fleetView.state, { q: "", group: "", status: "", page: 1 });
    $("fleet-q").value = "";
    $("fleet-group").value = "";
    $("fleet-status").value = "";
    syncFleetHash();
    computeFleetList();
    renderFleet();
  }

  function enterFleet(params) {
    const st = fleetView.state;
    st.q = params.get("q") || "";
    st.group = params.get("group") || "";
    st.status = params.get("status") || "";
    const sort = params.get("sort") || "name";
    st.dir = sort.startsWith("-") ? -1 : 1;
    st.sort = sort.replace(/^-/, "");
    st.page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
    $("fleet-q").value = st.q;
    $("fleet-status").value = st.status;
    fleetView.active = true;
    refreshGroupOptions();
    $("fleet-group").value = st.group;
    computeFleetList();
    renderFleet();
  }

  function initFleetView() {
    let timer = 0;
    $("fleet-q").addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        fleetView.state.q = $("fleet-q").value;
        fleetView.state.page = 1;
        syncFleetHash();
        computeFleetList();
        renderFleet();
      }, fleet.hosts.size > 2000 ? 150 : 30);
    });
    $("fleet-group").addEventListener("change", (e) => {
      fleetView.state.group = e.target.value;
      fleetView.state.page = 1;
      syncFleetHash();
      computeFleetList();
      renderFleet();
    });
    $("fleet-status").addEventListener("change", (e) => {
      fleetView.state.status = e.target.value;
      fleetView.state.page = 1;
      syncFleetHash();
      computeFleetList();
      renderFleet();
    });
    $("fleet-filters").addEventListener("submit", (e) => e.preventDefault());
    for (const th of document.querySelectorAll("#fleet-table th[data-sort]")) {
      th.querySelector("button").addEventListener("click", () => {
        const st = fleetView.state;
        const key = th.dataset.sort;
        if (st.sort === key) st.dir = -st.dir;
        else {
          st.sort = key;
          // Busiest first is what one looks for when sorting by a metric.
          st.dir = key === "name" || key === "status" ? 1 : -1;
        }
        syncFleetHash();
        computeFleetList();
        renderFleet();
      });
    }
    $("fleet-rows").addEventListener("click", (e) => {
      const chip = e.target.closest("button.tag.group");
      if (!chip) return;
      fleetView.state.group = chip.dataset.group;
      fleetView.state.page = 1;
      refreshGroupOptions();
      $("fleet-group").value = fleetView.state.group;
      syncFleetHash();
      computeFleetList();
      renderFleet();
    });
    fleet.listeners.add(onFleetChange);
  }

  // ---------------------------------------------------------------------------------------
  // Run console

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

  function prefillRun({ command, hosts = [], groups = [], all = false, timeout = "", name = "" }) {
    runPrefill = { command, hosts, groups, all, timeout, name };
  }

  function enterRun(params) {
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

  function initRunView() {
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

  // ---------------------------------------------------------------------------------------
  // Output rendering: ANSI colours become classes, other escape sequences are dropped, and
  // every byte of host output reaches the page as text.

  const ANSI_CSI = /\x1b\[([0-9;:?<>=]*)[ -/]*([@-~])|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[PX^_][^\x1b]*\x1b\\|\x1b[ -/]*[0-~]|\r\n|\n|\r|[\x00-\x08\x0b\x0c\x0e-\x1a\x1c-\x1f\x7f]/g;
  const ANSI_INCOMPLETE = /\x1b(?:\[[0-9;:?<>=]*[ -/]*|\][^\x07\x1b]*|[PX^_][^\x1b]*|[ -/]*)?$/;

  function xterm256(n) {
    if (n < 16) return null;
    if (n >= 232) {
      const v = 8 + (n - 232) * 10;
      return `rgb(${v},${v},${v})`;
    }
    const i = n - 16;
    const c = (x) => (x === 0 ? 0 : 55 + x * 40);
    return `rgb(${c(Math.floor(i / 36))},${c(Math.floor(i / 6) % 6)},${c(i % 6)})`;
  }

  class Sgr {
    constructor() { this.reset(); }
    reset() {
      this.fg = null; this.bg = null; this.fgRgb = null; this.bgRgb = null;
      this.bold = false; this.dim = false; this.italic = false; this.underline = false; this.inverse = false;
    }
    apply(paramText) {
      const params = paramText === "" ? [0] : paramText.split(/[;:]/).map((x) => (x === "" ? 0 : Number(x)));
      for (let i = 0; i < params.length; i++) {
        const p = params[i];
        if (p === 0) this.reset();
        else if (p === 1) this.bold = true;
        else if (p === 2) this.dim = true;
        else if (p === 3) this.italic = true;
        else if (p === 4) this.underline = true;
        else if (p === 7) this.inverse = true;
        else if (p === 22) { this.bold = false; this.dim = false; }
        else if (p === 23) this.italic = false;
        else if (p === 24) this.underline = false;
        else if (p === 27) this.inverse = false;
        else if (p >= 30 && p <= 37) { this.fg = p - 30; this.fgRgb = null; }
        else if (p >= 90 && p <= 97) { this.fg = p - 90 + 8; this.fgRgb = null; }
        else if (p === 39) { this.fg = null; this.fgRgb = null; }
        else if (p >= 40 && p <= 47) { this.bg = p - 40; this.bgRgb = null; }
        else if (p >= 100 && p <= 107) { this.bg = p - 100 + 8; this.bgRgb = null; }
        else if (p === 49) { this.bg = null; this.bgRgb = null; }
        else if (p === 38 || p === 48) {
          let color = null; let index = null;
          if (params[i + 1] === 5) {
            const n = params[i + 2] ?? 0;
            if (n < 16) index = n; else color = xterm256(n);
            i += 2;
          } else if (params[i + 1] === 2) {
            color = `rgb(${params[i + 2] & 255},${params[i + 3] & 255},${params[i + 4] & 255})`;
            i += 4;
          }
          if (p === 38) { this.fg = index; this.fgRgb = color; } else { this.bg = index; this.bgRgb = color; }
        }
      }
    }
    key() {
      return `${this.fg}|${this.bg}|${this.fgRgb}|${this.bgRgb}|${+this.bold}${+this.dim}${+this.italic}${+this.underline}${+this.inverse}`;
    }
    isPlain() {
      return this.fg === null && this.bg === null && !this.fgRgb && !this.bgRgb && !this.bold && !this.dim && !this.italic && !this.underline && !this.inverse;
    }
    span(text) {
      const classes = [];
      let fg = this.fg; let bg = this.bg; let fgRgb = this.fgRgb; let bgRgb = this.bgRgb;
      if (this.inverse) { [fg, bg] = [bg, fg]; [fgRgb, bgRgb] = [bgRgb, fgRgb]; classes.push("a-inv"); }
      if (fg !== null) classes.push(`a-f${fg}`);
      if (bg !== null) classes.push(`a-b${bg}`);
      if (this.bold) classes.push("a-bold");
      if (this.dim) classes.push("a-dim");
      if (this.italic) classes.push("a-it");
      if (this.underline) classes.push("a-ul");
      const el = h("span", { class: classes.join(" ") || undefined }, text);
      if (fgRgb) el.style.color = fgRgb;
      if (bgRgb) el.style.backgroundColor = bgRgb;
      return el;
    }
  }

  /** Writes one stream (stdout or stderr) of one run into the shared terminal. */
  class StreamWriter {
    constructor(term, run, stream) {
      this.term = term;
      this.run = run;
      this.stream = stream;
      this.sgr = new Sgr();
      this.carry = "";
      this.line = null;
      this.tail = null;
      this.tailKey = "";
      this.cr = false;
    }

    write(chunk) {
      let text = this.carry + chunk;
      this.carry = "";
      const incomplete = ANSI_INCOMPLETE.exec(text);
      if (incomplete && incomplete[0].length && incomplete[0].length < 512) {
        this.carry = incomplete[0];
        text = text.slice(0, incomplete.index);
      }
      ANSI_CSI.lastIndex = 0;
      let at = 0;
      let m;
      while ((m = ANSI_CSI.exec(text)) !== null) {
        if (m.index > at) this.text(text.slice(at, m.index));
        at = ANSI_CSI.lastIndex;
        const token = m[0];
        if (token === "\n" || token === "\r\n") this.newline();
        else if (token === "\r") this.cr = true;
        else if (m[2] === "m") this.sgr.apply(m[1] || "");
      }
      if (at < text.length) this.text(text.slice(at));
    }

    text(segment) {
      if (!segment) return;
      if (!this.line) this.line = this.term.newLine(this.run, this.stream);
      if (this.cr) {
        // A carriage return redraws the line (progress bars): keep only the host prefix.
        this.cr = false;
        while (this.line.childNodes.length > 1) this.line.lastChild.remove();
        this.tail = null;
      }
      const key = this.sgr.key();
      if (this.tail && this.tailKey === key) {
        this.tail.textContent += segment;
      } else {
        this.tail = this.sgr.isPlain() ? h("span", null, segment) : this.sgr.span(segment);
        this.tailKey = key;
        this.line.append(this.tail);
      }
    }

    newline() {
      if (!this.line) this.line = this.term.newLine(this.run, this.stream);
      this.line = null;
      this.tail = null;
      this.cr = false;
    }
  }

  function hostColor(name) {
    let hash = 0;
    for (let i = 0; i < name.length; i++) hash = (hash * 31 + name.charCodeAt(i)) | 0;
    return Math.abs(hash) % 8;
  }

  /** The output panel: one terminal for all hosts, focusable on one host. */
  class Terminal {
    constructor(el) {
      this.el = el;
      this.writers = new Map();
      this.lines = 0;
      this.focusRun = "";
      this.stick = true;
      this.scrollQueued = false;
      this.prefixWidth = 0;
      this.trimmed = false;
      this.onTrim = null;
      el.replaceChildren();
      el.classList.remove("focus");
    }

    write(run, stream, data) {
      const key = `${run.id}\n${stream}`;
      let writer = this.writers.get(key);
      if (!writer) {
        writer = new StreamWriter(this, run, stream);
        this.writers.set(key, writer);
      }
      writer.write(data);
      this.queueScroll();
    }

    newLine(run, stream) {
      if (run.host.length > this.prefixWidth) {
        this.prefixWidth = Math.min(run.host.length, 28);
        this.el.style.setProperty("--pfx", `${this.prefixWidth + 1}ch`);
      }
      const line = h("div", { class: `ln hc${hostColor(run.host)}`, dataset: { run: run.id, s: stream === "stderr" ? "err" : "out" } },
        h("span", { class: "pfx", title: stream === "stderr" ? `${run.host} (stderr)` : run.host }, run.host));
      if (this.focusRun && this.focusRun !== run.id) line.hidden = true;
      this.el.append(line);
      this.lines++;
      if (this.lines > MAX_LINES) this.trim();
      return line;
    }

    trim() {
      const drop = Math.ceil(MAX_LINES / 10);
      for (let i = 0; i < drop && this.el.firstChild; i++) this.el.firstChild.remove();
      this.lines -= drop;
      if (!this.trimmed) {
        this.trimmed = true;
        if (this.onTrim) this.onTrim();
      }
    }

    focus(runId) {
      this.focusRun = runId;
      this.el.classList.toggle("focus", Boolean(runId));
      for (const line of this.el.children) line.hidden = Boolean(runId) && line.dataset.run !== runId;
      this.stick = true;
      this.queueScroll();
    }

    atBottom() {
      return this.el.scrollTop + this.el.clientHeight >= this.el.scrollHeight - 8;
    }

    queueScroll() {
      if (this.scrollQueued) return;
      this.scrollQueued = true;
      requestAnimationFrame(() => {
        this.scrollQueued = false;
        if (this.stick) this.el.scrollTop = this.el.scrollHeight;
        this.syncFollow();
      });
    }

    onScroll() {
      this.stick = this.atBottom();
      this.syncFollow();
    }

    syncFollow() {
      const button = $("output-follow");
      const show = !this.stick && this.el.scrollHeight > this.el.clientHeight;
      if (button.hidden === show) button.hidden = !show;
    }
  }

  // ---------------------------------------------------------------------------------------
  // Task view

  const taskView = {
    id: null,
    task: null,
    runs: new Map(),
    rows: new Map(),
    legend: new Map(),
    runsVersion: 0,
    source: null,
    term: null,
    filter: "",
    page: 1,
    lastStatus: null,
    runsTimer: 0,
    gen: 0,
  };

  function targetsText(targets) {
    if (!targets) return "";
    if (targets.all) return "all hosts";
    const parts = [];
    if (targets.groups && targets.groups.length) parts.push(`${targets.groups.length === 1 ? "group" : "groups"} ${targets.groups.join(", ")}`);
    if (targets.hosts && targets.hosts.length) {
      parts.push(targets.hosts.length <= 3 ? targets.hosts.join(", ") : plural(targets.hosts.length, "host"));
    }
    return parts.join(" + ");
  }

  function taskDuration(task, now = Date.now()) {
    const start = parseTime(task.started_at);
    if (start === null) return "";
    const end = parseTime(task.finished_at);
    return duration((end === null ? now : end) - start);
  }

  function latestRuns() {
    // A retried host has several runs; its latest attempt is the one that counts.
    const byHost = new Map();
    for (const run of taskView.runs.values()) {
      const prev = byHost.get(run.host);
      if (!prev || run.attempt > prev.attempt) byHost.set(run.host, run);
    }
    return byHost;
  }

  function renderTaskHead() {
    const task = taskView.task;
    if (!task) return;
    const title = isNamed(task) ? task.name : firstLine(task.command);
    setText($("task-title"), title);
    document.title = `${title} · opsplane`;
    const status = $("task-status");
    status.dataset.status = task.status;
    setText(status, statusLabel(task.status));
    setText($("task-command"), task.command);
    // A one-line command is already the title; show the block only when it adds something.
    $("task-command").hidden = !isNamed(task) && !/[\r\n]/.test(task.command.trim()) && task.command.trim().length <= 80;
    const meta = $("task-meta");
    const items = [
      ["Targets", targetsText(task.targets)],
      ["Started", task.started_at ? absTime(task.started_at) : "not yet"],
      ["Duration", taskDuration(task) || "–"],
      ["Timeout", `${task.timeout}s per host`],
      ["By", task.created_by],
      ["ID", task.id],
    ];
    if (task.priority) items.splice(items.length - 1, 0, ["Priority", String(task.priority)]);
    if (task.stop_reason) items.splice(items.length - 1, 0, ["Stopped by", task.stop_reason.replace("_", " ")]);
    if (task.rerun_of) items.splice(items.length - 1, 0, ["Re-run of", h("a", { href: `#/tasks/${encodeURIComponent(task.rerun_of)}` }, task.rerun_of.slice(0, 8))]);
    meta.replaceChildren(...items.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", { class: k === "ID" ? "mono" : undefined }, v))));

    const terminal = TERMINAL_TASK.has(task.status);
    const cancel = $("task-cancel");
    cancel.hidden = terminal;
    if (terminal) { cancel.disabled = false; setText(cancel, "Cancel task"); }
    const failed = [...latestRuns().values()].filter((r) => r.status !== "succeeded" && TERMINAL_RUN.has(r.status));
    const rerun = $("task-rerun");
    // Only a shell command can be sent again as it was; a catalog script task is not one.
    const isCommand = !task.kind || task.kind === "command";
    rerun.hidden = !terminal || failed.length === 0 || !isCommand;
    $("task-edit").hidden = !isCommand;
    setText(rerun, `Re-run on ${failed.length === 1 ? "the failed host" : `${failed.length.toLocaleString()} failed hosts`}`);

    const c = task.counts || {};
    const total = c.total || 0;
    const progress = $("task-progress");
    const order = ["succeeded", "failed", "timed_out", "lost", "undeliverable", "canceled", "running", "dispatched", "delayed", "pending"];
    const segments = [];
    for (const key of order) {
      if (!c[key]) continue;
      const seg = h("span", { class: "seg", dataset: { status: key }, title: `${statusLabel(key)}: ${c[key]}` });
      seg.style.width = `${(100 * c[key]) / Math.max(total, 1)}%`;
      segments.push(seg);
    }
    progress.replaceChildren(...segments);
    const percent = task.progress ? task.progress.percent : 0;
    progress.setAttribute("aria-valuenow", String(Math.round(percent)));
    progress.setAttribute("aria-valuetext", `${task.progress ? task.progress.finished : 0} of ${total} hosts finished`);

    const entries = [{ key: "", count: task.progress ? task.progress.finished : 0 }];
    for (const key of RUN_ORDER) if (c[key] || taskView.filter === key) entries.push({ key, count: c[key] || 0 });
    renderKeyed($("task-legend"), taskView.legend, entries, (e) => e.key || "all", (e) => {
      const button = h("button", { type: "button", class: "legend-item", onclick: () => setRunFilter(e.key && taskView.filter !== e.key ? e.key : "") },
        e.key ? h("span", { class: "dot", dataset: { status: e.key }, "aria-hidden": "true" }) : null, h("strong"), h("span"));
      if (e.key) button.dataset.status = e.key;
      return h("li", null, button);
    }, (li, e) => {
      const button = li.firstChild;
      button.setAttribute("aria-pressed", String(taskView.filter === e.key));
      setText(button.querySelector("strong"), e.count.toLocaleString());
      setText(button.lastChild, e.key ? ` ${statusLabel(e.key)}` : ` of ${total.toLocaleString()} finished`);
    });
  }

  function firstLine(text) {
    const line = (text || "").trim().split(/\r\n|\r|\n/)[0];
    return line.length > 80 ? `${line.slice(0, 79)}…` : line;
  }

  /** True when the task has a name of its own, not the one the server derives from the command. */
  function isNamed(task) {
    if (!task.name || task.name === task.command) return false;
    const first = (task.command || "").trim().split(/\r\n|\r|\n/)[0];
    return task.name !== (first.length <= 80 ? first : `${first.slice(0, 77)}...`);
  }

  function extraLines(command) {
    const n = (command || "").trim().split(/\r\n|\r|\n/).length - 1;
    return n > 0 ? ` (+${plural(n, "line")})` : "";
  }

  function setRunFilter(status) {
    taskView.filter = status;
    taskView.page = 1;
    renderTaskHead();
    renderRuns();
  }

  function runDuration(run, now = Date.now()) {
    if (run.duration_ms !== null && run.duration_ms !== undefined) return duration(run.duration_ms);
    if (run.status === "running") {
      const start = parseTime(run.started_at) ?? run._seenRunning;
      if (start) return duration(now - start);
    }
    return "";
  }

  function createRunRow(run) {
    const outputBtn = h("button", { type: "button", class: "btn small ghost", "aria-pressed": "false", dataset: { act: "focus" } }, "Output");
    const logBtn = h("button", { type: "button", class: "btn small ghost", dataset: { act: "log" }, title: "Download the whole output of this host" }, "Log");
    return h("tr", { dataset: { run: run.id } },
      h("td", { class: "c-name", "data-label": "Host" }, h("a", { href: `#/hosts/${encodeURIComponent(run.host)}` }, run.host), h("span", { class: "attempt" })),
      h("td", { "data-label": "Status" }, badge(run.status)),
      h("td", { class: "num", "data-label": "Exit" }),
      h("td", { class: "num", "data-label": "Duration" }),
      h("td", { class: "row-actions" }, outputBtn, logBtn),
    );
  }

  function updateRunRow(tr, run) {
    const cells = tr.children;
    setText(cells[0].lastChild, run.attempt > 1 ? ` attempt ${run.attempt}` : "");
    const b = cells[1].firstChild;
    b.dataset.status = run.status;
    setText(b, statusLabel(run.status));
    b.title = run.error || "";
    setText(cells[2], run.exit_code === null || run.exit_code === undefined ? "" : String(run.exit_code));
    cells[2].classList.toggle("bad", run.exit_code !== null && run.exit_code !== undefined && run.exit_code !== 0);
    setText(cells[3], runDuration(run));
    const focused = taskView.term && taskView.term.focusRun === run.id;
    tr.classList.toggle("focused", Boolean(focused));
    // A run that never reached its host has no output to show or download.
    const never = ["pending", "delayed", "undeliverable"].includes(run.status);
    for (const button of cells[4].children) button.hidden = never;
    cells[4].firstChild.setAttribute("aria-pressed", String(Boolean(focused)));
    cells[4].firstChild.setAttribute("aria-label", `Output of ${run.host}`);
    cells[4].lastChild.setAttribute("aria-label", `Download the log of ${run.host}`);
  }

  function sortedRuns() {
    let runs = [...taskView.runs.values()];
    if (taskView.filter) runs = runs.filter((r) => r.status === taskView.filter);
    return runs.sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : a.attempt - b.attempt));
  }

  function renderRuns() {
    if (taskView.runsTimer) return;
    taskView.runsTimer = requestAnimationFrame(() => {
      taskView.runsTimer = 0;
      const runs = sortedRuns();
      const pages = Math.max(1, Math.ceil(runs.length / RUNS_PAGE));
      taskView.page = Math.min(taskView.page, pages);
      const slice = runs.slice((taskView.page - 1) * RUNS_PAGE, taskView.page * RUNS_PAGE);
      renderKeyed($("runs-rows"), taskView.rows, slice, (r) => r.id, createRunRow, updateRunRow);
      renderPager($("runs-pager"), taskView.page, pages, runs.length, (p) => { taskView.page = p; renderRuns(); }, "host");
      renderOutputHosts();
    });
  }

  function renderOutputHosts() {
    const select = $("output-host");
    const key = `${taskView.gen}:${taskView.runsVersion}`;
    if (select._key !== key) {
      select._key = key;
      const runs = [...taskView.runs.values()].sort((a, b) => (a.host < b.host ? -1 : a.host > b.host ? 1 : a.attempt - b.attempt));
      const options = [h("option", { value: "" }, "All hosts, interleaved")];
      // A select of 10,000 hosts is no help; the row buttons reach every host.
      for (const run of runs.slice(0, 500)) options.push(h("option", { value: run.id }, run.attempt > 1 ? `${run.host} (attempt ${run.attempt})` : run.host));
      select.replaceChildren(...options);
    }
    const focus = taskView.term ? taskView.term.focusRun : "";
    if (focus && !select.querySelector(`option[value="${CSS.escape(focus)}"]`)) {
      const run = taskView.runs.get(focus);
      if (run) select.append(h("option", { value: run.id }, run.host));
    }
    select.value = focus;
    $("output-download").hidden = !focus;
  }

  function focusOutput(runId) {
    if (!taskView.term) return;
    taskView.term.focus(runId);
    const run = taskView.runs.get(runId);
    setText($("output-title"), run ? `Output of ${run.host}` : "Output");
    for (const [id, tr] of taskView.rows) updateRunRow(tr, taskView.runs.get(id));
    renderOutputHosts();
  }

  async function downloadLog(runId) {
    const run = taskView.runs.get(runId);
    if (!run || !taskView.task) return;
    try {
      const blob = await api(`/tasks/${encodeURIComponent(taskView.task.id)}/runs/${encodeURIComponent(run.id)}/log`, { as: "blob" });
      const url = URL.createObjectURL(new Blob([blob], { type: "text/plain;charset=utf-8" }));
      const safe = run.host.replace(/[^A-Za-z0-9._-]+/g, "_");
      const a = h("a", { href: url, download: `${safe}-${taskView.task.id.slice(0, 8)}${run.attempt > 1 ? `-${run.attempt}` : ""}.log` });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 10000);
    } catch (e) {
      toast(`Could not download the log of ${run.host}: ${e.message}`);
    }
  }

  function mergeRun(data) {
    const id = data.run_id || data.id;
    const known = taskView.runs.get(id);
    if (!known) taskView.runsVersion++;
    const prev = known || { id, host: data.host, attempt: data.attempt || 1, status: "pending", exit_code: null, duration_ms: null, started_at: null };
    // The stream replays history: a run that already ended never steps back to an earlier state.
    if (known && data.status && TERMINAL_RUN.has(known.status) && !TERMINAL_RUN.has(data.status)) return known;
    const run = { ...prev };
    for (const key of ["host", "attempt", "status", "exit_code", "error", "duration_ms", "started_at"]) {
      if (data[key] !== undefined) run[key] = data[key];
    }
    if (run.status === "running" && prev.status !== "running" && !run.started_at) run._seenRunning = Date.now();
    taskView.runs.set(id, run);
    return run;
  }

  function onTaskEvent(task) {
    const before = taskView.lastStatus;
    const known = taskView.task;
    // Replayed history must not show an ended task as running again.
    if (known && TERMINAL_TASK.has(known.status) && !TERMINAL_TASK.has(task.status)) return;
    taskView.task = task;
    renderTaskHead();
    if (TERMINAL_TASK.has(task.status) && before && !TERMINAL_TASK.has(before)) {
      const c = task.counts;
      announce(`Task ${statusLabel(task.status)}: ${c.succeeded} of ${c.total} hosts succeeded.`);
    }
    taskView.lastStatus = task.status;
    if (TERMINAL_TASK.has(task.status)) {
      closeTaskStream();
      loadSummary();
      // The rows now hold final durations and start times; fetch them once.
      refreshRuns(taskView.gen);
    }
  }

  function closeTaskStream() {
    if (taskView.source) {
      taskView.source.close();
      taskView.source = null;
    }
    setStreamState("");
  }

  function setStreamState(text) {
    setText($("output-note"), text || (taskView.term && taskView.term.trimmed ? "Earlier output was trimmed in the page; use Log to download a host's whole output." : ""));
  }

  async function refreshRuns(gen) {
    try {
      // Without output (the console has it): a page of a thousand runs stays small.
      const items = [];
      let cursor = "";
      for (let pages = 0; pages < 100; pages++) {
        const runs = await api(`/tasks/${encodeURIComponent(taskView.id)}/runs?size=1000${cursor ? `&cursor=${encodeURIComponent(cursor)}` : ""}`);
        if (gen !== taskView.gen) return;
        items.push(...runs.items);
        if (!runs.next_cursor) break;
        cursor = runs.next_cursor;
      }
      for (const run of items) {
        const prev = taskView.runs.get(run.id);
        // Never step back: a live event may be newer than this list.
        if (prev && TERMINAL_RUN.has(prev.status) && !TERMINAL_RUN.has(run.status)) continue;
        if (!prev) taskView.runsVersion++;
        taskView.runs.set(run.id, { ...prev, ...run });
      }
      renderRuns();
      renderTaskHead();
    } catch { /* the stream carries the essentials */ }
  }

  async function enterTask(params, id) {
    leaveTask();
    const gen = ++taskView.gen;
    taskView.id = id;
    taskView.task = null;
    taskView.runs = new Map();
    taskView.filter = "";
    taskView.page = 1;
    taskView.lastStatus = null;
    for (const row of taskView.rows.values()) row.remove();
    taskView.rows.clear();
    for (const li of taskView.legend.values()) li.remove();
    taskView.legend.clear();
    newTerminal();
    setText($("output-title"), "Output");
    setText($("output-note"), "");
    $("output-follow").hidden = true;
    $("task-cancel").hidden = true;
    $("task-rerun").hidden = true;
    setText($("task-title"), "Task");
    setText($("task-command"), "");
    $("task-meta").replaceChildren();
    $("task-progress").replaceChildren();
    $("task-status").dataset.status = "";
    setText($("task-status"), "");
    renderOutputHosts();

    let task;
    try {
      task = await api(`/tasks/${encodeURIComponent(id)}`);
    } catch (e) {
      if (gen !== taskView.gen) return;
      showMissing(e.status === 404 ? `There is no task ${id}.` : `Could not load the task: ${e.message}`);
      return;
    }
    if (gen !== taskView.gen) return;
    taskView.task = task;
    taskView.lastStatus = task.status;
    renderTaskHead();
    await refreshRuns(gen);
    if (gen !== taskView.gen) return;
    openTaskStream(gen);
  }

  function newTerminal(focusRun = "") {
    taskView.term = new Terminal($("term"));
    taskView.term.onTrim = () => setStreamState("");
    $("term").classList.toggle("nowrap", !$("output-wrap").checked);
    if (focusRun) taskView.term.focus(focusRun);
  }

  function openTaskStream(gen, again = false) {
    // A stream opened anew replays the task from its first event (an EventSource sends
    // Last-Event-ID only on its own reconnects): start the output over to avoid doubles.
    if (again) newTerminal(taskView.term ? taskView.term.focusRun : "");
    const source = stream(`/tasks/${encodeURIComponent(taskView.id)}/events`);
    taskView.source = source;
    source.addEventListener("run", (e) => {
      if (gen !== taskView.gen) return;
      mergeRun(JSON.parse(e.data));
      renderRuns();
    });
    source.addEventListener("output", (e) => {
      if (gen !== taskView.gen) return;
      const data = JSON.parse(e.data);
      const run = taskView.runs.get(data.run_id) || mergeRun({ run_id: data.run_id, host: data.host });
      taskView.term.write(run, data.stream, typeof data.data === "string" ? data.data : "");
    });
    source.addEventListener("task", (e) => {
      if (gen !== taskView.gen) return;
      onTaskEvent(JSON.parse(e.data));
    });
    source.onopen = () => { if (taskView.source === source) setStreamState(""); };
    source.onerror = () => {
      if (taskView.source !== source) return;
      if (source.readyState === EventSource.CLOSED) {
        // Not a dropped connection but a refusal: reload the task to show where it stands.
        taskView.source = null;
        setStreamState("The live stream closed.");
        api(`/tasks/${encodeURIComponent(taskView.id)}`).then((task) => {
          if (gen !== taskView.gen) return;
          onTaskEvent(task);
          if (!TERMINAL_TASK.has(task.status)) setTimeout(() => { if (gen === taskView.gen && !taskView.source) openTaskStream(gen, true); }, 3000);
        }).catch(() => {});
      } else {
        setStreamState("Reconnecting to the live stream…");
      }
    };
  }

  function leaveTask() {
    taskView.gen++;
    closeTaskStream();
  }

  async function cancelTask() {
    const button = $("task-cancel");
    button.disabled = true;
    setText(button, "Canceling…");
    try {
      const task = await api(`/tasks/${encodeURIComponent(taskView.id)}/cancel`, { method: "POST" });
      announce("Cancel requested; waiting for the hosts to confirm.");
      if (TERMINAL_TASK.has(task.status)) onTaskEvent(task);
    } catch (e) {
      button.disabled = false;
      setText(button, "Cancel task");
      toast(`Could not cancel: ${e.message}`);
    }
  }

  function confirmDialog(text, command, okLabel) {
    const dialog = $("confirm");
    setText($("confirm-title"), "Run again?");
    setText($("confirm-text"), text);
    setText($("confirm-command"), command);
    setText($("confirm-ok"), okLabel);
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue || "cancel"), { once: true });
      dialog.showModal();
      // Enter right after opening must not run anything: the safe choice has the focus.
      dialog.querySelector('button[value="cancel"]').focus();
    });
  }

  async function rerunFailed() {
    const task = taskView.task;
    if (!task) return;
    const hosts = [...latestRuns().values()].filter((r) => r.status !== "succeeded" && TERMINAL_RUN.has(r.status)).map((r) => r.host).sort();
    if (!hosts.length) return;
    const shown = hosts.length <= 8 ? hosts.join(", ") : `${hosts.slice(0, 8).join(", ")} and ${hosts.length - 8} more`;
    const choice = await confirmDialog(`Run this command again on ${plural(hosts.length, "host")} whose run did not succeed: ${shown}.`, task.command, `Run on ${plural(hosts.length, "host")}`);
    if (choice === "edit") {
      prefillRun({ command: task.command, hosts, timeout: String(task.timeout) });
      navigate("/run");
      return;
    }
    if (choice !== "ok") return;
    try {
      // The server picks the same hosts from the stored runs and keeps the task's policy.
      const created = await api(`/tasks/${encodeURIComponent(task.id)}/rerun`, { method: "POST", body: { only: "unsuccessful" } });
      navigate(`/tasks/${encodeURIComponent(created.id)}`);
    } catch (e) {
      toast(`Not started: ${e.message}`);
    }
  }

  function initTaskView() {
    $("task-cancel").addEventListener("click", cancelTask);
    $("task-rerun").addEventListener("click", rerunFailed);
    $("task-edit").addEventListener("click", () => {
      const task = taskView.task;
      if (!task) return;
      const t = task.targets || {};
      prefillRun({ command: task.command, hosts: t.hosts || [], groups: t.groups || [], all: Boolean(t.all), timeout: String(task.timeout) });
      navigate("/run");
    });
    $("runs-rows").addEventListener("click", (e) => {
      const button = e.target.closest("button[data-act]");
      if (!button) return;
      const runId = button.closest("tr").dataset.run;
      if (button.dataset.act === "log") downloadLog(runId);
      else {
        const next = taskView.term && taskView.term.focusRun === runId ? "" : runId;
        focusOutput(next);
        if (next) $("term").focus({ preventScroll: true });
      }
    });
    $("output-host").addEventListener("change", (e) => focusOutput(e.target.value));
    $("output-download").addEventListener("click", () => { if (taskView.term && taskView.term.focusRun) downloadLog(taskView.term.focusRun); });
    $("output-wrap").addEventListener("change", (e) => $("term").classList.toggle("nowrap", !e.target.checked));
    $("term").addEventListener("scroll", () => { if (taskView.term) taskView.term.onScroll(); }, { passive: true });
    $("output-follow").addEventListener("click", () => {
      if (!taskView.term) return;
      taskView.term.stick = true;
      taskView.term.queueScroll();
    });
  }

  // ---------------------------------------------------------------------------------------
  // Task history

  const tasksView = {
    rows: new Map(),
    state: { status: "", name: "", page: 1 },
    timer: 0,
    gen: 0,
    controller: null,
  };

  function createTaskRow(task) {
    return h("tr", { class: "clickable", dataset: { task: task.id } },
      h("td", { class: "c-tstatus", "data-label": "Status" }, badge(task.status)),
      h("td", { class: "c-task", "data-label": "Task" }, h("a", { href: `#/tasks/${encodeURIComponent(task.id)}`, class: "task-link" }), h("code", { class: "task-cmd" })),
      h("td", { class: "c-targets", "data-label": "Targets" }),
      h("td", { class: "c-hosts", "data-label": "Hosts" }),
      h("td", { class: "c-by", "data-label": "By" }),
      h("td", { class: "c-when", "data-label": "Started" }, h("time", { dataset: { rel: "" } })),
      h("td", { class: "c-dur num", "data-label": "Duration" }),
    );
  }

  function updateTaskRow(tr, task) {
    const cells = tr.children;
    const b = cells[0].firstChild;
    b.dataset.status = task.status;
    setText(b, statusLabel(task.status));
    const named = isNamed(task);
    const link = cells[1].firstChild;
    setText(link, named ? task.name : firstLine(task.command));
    link.classList.toggle("is-cmd", !named);
    const cmd = cells[1].lastChild;
    setText(cmd, named ? firstLine(task.command) + extraLines(task.command) : extraLines(task.command).trim());
    cmd.hidden = !cmd.textContent;
    setText(cells[2], targetsText(task.targets));
    const c = task.counts || {};
    const bad = (c.failed || 0) + (c.timed_out || 0) + (c.lost || 0) + (c.undeliverable || 0);
    const hosts = cells[3];
    hosts.replaceChildren(h("span", null, `${(c.succeeded || 0).toLocaleString()}/${(c.total || 0).toLocaleString()} ok`));
    if (bad) hosts.append(h("span", { class: "bad" }, ` · ${bad.toLocaleString()} failed`));
    if (c.canceled) hosts.append(h("span", { class: "muted" }, ` · ${c.canceled.toLocaleString()} canceled`));
    if (c.running) hosts.append(h("span", { class: "info" }, ` · ${c.running.toLocaleString()} running`));
    setText(cells[4], task.created_by);
    const when = task.started_at || task.created_at;
    const time = cells[5].firstChild;
    time.dataset.rel = when || "";
    time.title = absTime(when);
    setText(time, relTime(when));
    setText(cells[6], taskDuration(task) || "–");
  }

  async function loadTasks() {
    const gen = ++tasksView.gen;
    if (tasksView.controller) tasksView.controller.abort();
    const controller = new AbortController();
    tasksView.controller = controller;
    const { status, name, page } = tasksView.state;
    const p = new URLSearchParams({ page: String(page), size: String(TASKS_PAGE) });
    if (status) p.set("status", status);
    if (name.trim()) p.set("name", name.trim());
    let result;
    try {
      result = await api(`/tasks?${p}`, { signal: controller.signal });
    } catch (e) {
      if (e.name !== "AbortError" && gen === tasksView.gen) toast(`Could not load tasks: ${e.message}`);
      return;
    }
    if (gen !== tasksView.gen || current.name !== "tasks") return;
    const pages = Math.max(1, Math.ceil(result.total / TASKS_PAGE));
    if (page > pages && result.total > 0) {
      tasksView.state.page = pages;
      loadTasks();
      return;
    }
    renderKeyed($("tasks-rows"), tasksView.rows, result.items, (t) => t.id, createTaskRow, updateTaskRow);
    renderPager($("tasks-pager"), page, pages, result.total, (n) => { tasksView.state.page = n; syncTasksHash(); loadTasks(); }, "task");
    const empty = $("tasks-empty");
    empty.replaceChildren();
    if (result.total === 0) {
      if (status || name) {
        empty.append(h("p", { class: "empty-title" }, "No task matches these filters."),
          h("button", { type: "button", class: "btn small", onclick: () => { $("tasks-name").value = ""; $("tasks-status").value = ""; Object.assign(tasksView.state, { status: "", name: "", page: 1 }); syncTasksHash(); loadTasks(); } }, "Clear filters"));
      } else {
        empty.append(h("p", { class: "empty-title" }, "No tasks yet."), h("p", null, h("a", { href: "#/run" }, "Run a command"), " and it appears here."));
      }
    }
    empty.hidden = !empty.firstChild;
    $("tasks-rows").closest("table").hidden = result.total === 0;
    const from = (page - 1) * TASKS_PAGE + 1;
    setText($("tasks-range"), result.total ? `${plural(result.total, "task")}${result.total > TASKS_PAGE ? ` · showing ${from}–${Math.min(page * TASKS_PAGE, result.total)}` : ""}, newest first` : "");
  }

  function syncTasksHash() {
    const { status, name, page } = tasksView.state;
    const p = new URLSearchParams();
    if (status) p.set("status", status);
    if (name) p.set("name", name);
    if (page > 1) p.set("page", String(page));
    replaceHash(`/tasks${p.toString() ? `?${p}` : ""}`);
  }

  function enterTasks(params) {
    tasksView.state = {
      status: params.get("status") || "",
      name: params.get("name") || "",
      page: Math.max(1, parseInt(params.get("page") || "1", 10) || 1),
    };
    $("tasks-status").value = tasksView.state.status;
    $("tasks-name").value = tasksView.state.name;
    loadTasks();
    clearInterval(tasksView.timer);
    // No stream for the list: refresh while it is on screen, so running tasks tick along.
    tasksView.timer = setInterval(() => { if (!document.hidden) loadTasks(); }, 4000);
  }

  function leaveTasks() {
    clearInterval(tasksView.timer);
    tasksView.timer = 0;
    if (tasksView.controller) tasksView.controller.abort();
  }

  function initTasksView() {
    let timer = 0;
    $("tasks-name").addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        tasksView.state.name = $("tasks-name").value;
        tasksView.state.page = 1;
        syncTasksHash();
        loadTasks();
      }, 250);
    });
    $("tasks-status").addEventListener("change", (e) => {
      tasksView.state.status = e.target.value;
      tasksView.state.page = 1;
      syncTasksHash();
      loadTasks();
    });
    $("tasks-filters").addEventListener("submit", (e) => e.preventDefault());
    $("tasks-rows").addEventListener("click", (e) => {
      if (e.target.closest("a, button")) return;
      const tr = e.target.closest("tr[data-task]");
      if (tr && !window.getSelection().toString()) navigate(`/tasks/${encodeURIComponent(tr.dataset.task)}`);
    });
  }

  // ---------------------------------------------------------------------------------------
  // Host view

  const HISTORY_HOURS = 3;
  const FINE_MS = 5 * 60000; // live points kept at full rate this long, then one a minute
  const GAP_MS = 5 * 60000; // a longer silence breaks the line
  const HOST_RUNS = 20;

  // series: the chart's points, oldest first: the stored history (one a minute), extended by
  // the live heartbeats of the fleet stream. history: how many came from the stored history.
  const hostView = { name: null, gen: 0, series: [], history: 0, runsTimer: 0, runsController: null };

  function compactSeries(series, now) {
    const cutoff = now - HISTORY_HOURS * 3600000;
    const fine = now - FINE_MS;
    const out = [];
    let minute = -1;
    for (const p of series) {
      if (p.t < cutoff) continue;
      if (p.t < fine) {
        const m = Math.floor(p.t / 60000);
        if (m === minute) continue;
        minute = m;
      }
      out.push(p);
    }
    return out;
  }

  /** Adds the live samples newer than the series' last point; returns the series. */
  function hostSeries(name) {
    let series = hostView.series;
    for (const p of samplesOf(name)) if (!series.length || p.t > series[series.length - 1].t) series.push(p);
    if (series.length > 400) series = hostView.series = compactSeries(series, series[series.length - 1].t);
    return series;
  }

  async function loadHostHistory(name, gen) {
    try {
      const answer = await api(`/hosts/${encodeURIComponent(name)}/heartbeats?hours=${HISTORY_HOURS}`);
      if (gen !== hostView.gen) return;
      const history = [];
      for (const item of answer.items || []) {
        const t = parseTime(item.at);
        if (t === null || typeof item.cpu_usage !== "number" || typeof item.memory_usage !== "number") continue;
        history.push({ t, cpu: item.cpu_usage, mem: item.memory_usage });
      }
      const merged = [...history, ...hostView.series].sort((a, b) => a.t - b.t);
      hostView.series = merged.filter((p, i) => i === 0 || p.t > merged[i - 1].t);
      hostView.history = history.length;
      renderChart(name);
    } catch (e) {
      if (e.name !== "AbortError" && gen === hostView.gen && e.status !== 404) toast(`Could not load the heartbeat history: ${e.message}`);
    }
  }

  function createHostRunRow(run) {
    const title = run.task_name || firstLine(run.command) || run.task_id;
    const showCmd = run.task_name && run.task_name !== run.command && run.command;
    const tr = h("tr", { dataset: { task: run.task_id, run: run.id } },
      h("td", { class: "c-tstatus", "data-label": "Status" }, badge(run.status)),
      h("td", { class: "c-task", "data-label": "Task" },
        h("a", { href: `#/tasks/${encodeURIComponent(run.task_id)}`, class: `task-link${run.task_name ? "" : " is-cmd"}`, title: run.command || undefined }, title),
        showCmd ? h("code", { class: "task-cmd" }, firstLine(run.command) + extraLines(run.command)) : null),
      h("td", { class: `num c-exit${run.exit_code ? " bad" : ""}`, "data-label": "Exit" }, run.exit_code === null || run.exit_code === undefined ? "" : String(run.exit_code)),
      h("td", { class: "num c-dur", "data-label": "Duration" }, run.duration_ms === null || run.duration_ms === undefined ? (TERMINAL_RUN.has(run.status) ? "–" : "…") : duration(run.duration_ms)),
      h("td", { class: "c-when", "data-label": "Started" }, run.started_at ? timeEl(run.started_at) : "–"),
    );
    return tr;
  }

  async function loadHostRuns(name, gen) {
    if (hostView.runsController) hostView.runsController.abort();
    const controller = new AbortController();
    hostView.runsController = controller;
    try {
      const answer = await api(`/hosts/${encodeURIComponent(name)}/runs?size=${HOST_RUNS}`, { signal: controller.signal });
      if (gen !== hostView.gen) return;
      const items = answer.items || [];
      $("host-runs-rows").replaceChildren(...items.map(createHostRunRow));
      $("host-runs-table").hidden = items.length === 0;
      const empty = $("host-runs-empty");
      empty.hidden = items.length > 0;
      setText(empty, items.length ? "" : "No run on this host yet.");
      const total = answer.total || 0;
      setText($("host-runs-count"), total > items.length ? `latest ${items.length} of ${total.toLocaleString()}` : total ? plural(total, "run") : "");
    } catch (e) {
      if (e.name === "AbortError" || gen !== hostView.gen) return;
      if (e.status !== 404) {
        const empty = $("host-runs-empty");
        empty.hidden = false;
        setText(empty, `Could not load the runs: ${e.message}`);
      }
    } finally {
      if (hostView.runsController === controller) hostView.runsController = null;
    }
  }

  function leaveHost() {
    hostView.gen++;
    hostView.name = null;
    clearInterval(hostView.runsTimer);
    hostView.runsTimer = 0;
    if (hostView.runsController) hostView.runsController.abort();
  }

  /** Load has no natural maximum: its bar is relative to the busiest host of the fleet. */
  function fleetLoadMax(host) {
    let max = Math.max(1, host.load || 0);
    for (const other of fleet.hosts.values()) if (other.load > max) max = other.load;
    return Math.ceil(max);
  }

  function renderHost(host) {
    setText($("host-title"), host.name);
    document.title = `${host.name} · opsplane`;
    $("host-light").dataset.status = host.status;
    const status = $("host-status");
    status.dataset.status = host.status;
    setText(status, host.status);
    $("host-run").href = `#/run?hosts=${encodeURIComponent(host.name)}`;

    const metrics = [
      ["CPU", host.cpu_usage, 100, pct(host.cpu_usage)],
      ["Memory", host.memory_usage, 100, pct(host.memory_usage)],
      ["Load (1 min)", host.load, fleetLoadMax(host), host.load === null || host.load === undefined ? "–" : host.load.toFixed(2)],
      ["Disk /", host.disk_usage, 100, pct(host.disk_usage)],
    ];
    $("host-metrics").replaceChildren(...metrics.map(([label, value, max, text]) => {
      const b = bar(value, max, `${label} ${text}`);
      updateBar(b, value, max, `${label} ${text}`, text);
      return h("div", { class: "metric-card" }, h("span", { class: "metric-label" }, label), h("span", { class: "metric-big" }, text), b);
    }));

    const labels = Object.entries(host.labels || {});
    const rows = [
      ["Status", host.status],
      ["Last heartbeat", timeEl(host.last_seen_at)],
      ["Connected since", host.connected_at ? absTime(host.connected_at) : "–"],
      ["Link", LINK_LABEL[host.link] || host.link],
      ["Groups", host.groups && host.groups.length ? h("span", { class: "tags" }, host.groups.map((g) => h("a", { class: "tag group", href: `#/fleet?group=${encodeURIComponent(g)}` }, g))) : "–"],
      ["Labels", labels.length ? h("span", { class: "tags" }, labels.map(([k, v]) => h("span", { class: "tag label" }, `${k}=${v}`))) : "–"],
      ["Agent version", host.agent_version || "–"],
      ["OS", host.os || "–"],
    ];
    $("host-details").replaceChildren(...rows.map(([k, v]) => h("div", null, h("dt", null, k), h("dd", null, v))));
    renderChart(host.name);
  }

  function renderChart(name) {
    const samples = name === hostView.name ? hostSeries(name) : samplesOf(name);
    const box = $("host-chart");
    const W = 600; const H = 150;
    const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", class: "spark" });
    const last = samples[samples.length - 1];
    const label = samples.length
      ? `CPU and memory over the last ${duration(last.t - samples[0].t) || "moment"}: ${plural(samples.length, "sample")}, now CPU ${pct(last.cpu)}, memory ${pct(last.mem)}.`
      : "No heartbeat received yet.";
    chart.setAttribute("aria-label", label);
    for (const y of [0, 0.5, 1]) chart.append(svg("line", { x1: 0, x2: W, y1: 1 + (H - 2) * y, y2: 1 + (H - 2) * y, class: "grid-line", "vector-effect": "non-scaling-stroke" }));
    // At least a minute of width, so that the first few points do not stretch across the chart.
    const span = samples.length ? Math.max(last.t - samples[0].t, 60000) : 60000;
    if (samples.length) {
      const x = (t) => W - ((last.t - t) / span) * W;
      const y = (v) => H - 1 - (Math.max(0, Math.min(100, v)) / 100) * (H - 2);
      // A silence of several minutes (the host was down) breaks the line.
      const segments = [];
      let segment = [];
      for (const p of samples) {
        if (segment.length && p.t - segment[segment.length - 1].t > GAP_MS) {
          segments.push(segment);
          segment = [];
        }
        segment.push(p);
      }
      segments.push(segment);
      for (const [key, cls] of [["mem", "mem"], ["cpu", "cpu"]]) {
        for (const part of segments) {
          if (part.length === 1) {
            chart.append(svg("circle", { cx: x(part[0].t).toFixed(1), cy: y(part[0][key]).toFixed(1), r: 2.5, class: `chart-dot-${cls}` }));
            continue;
          }
          const points = part.map((p) => `${x(p.t).toFixed(1)},${y(p[key]).toFixed(1)}`);
          const first = x(part[0].t).toFixed(1);
          const end = x(part[part.length - 1].t).toFixed(1);
          chart.append(svg("polygon", { points: `${first},${H} ${points.join(" ")} ${end},${H}`, class: `area-${cls}` }));
          chart.append(svg("polyline", { points: points.join(" "), class: `line-${cls}`, "vector-effect": "non-scaling-stroke" }));
        }
      }
    }
    const ago = span < 90000 ? `${Math.round(span / 1000)} s ago` : span < 7200000 ? `${Math.round(span / 60000)} min ago` : `${(span / 3600000).toFixed(1)} h ago`;
    box.dataset.points = String(samples.length);
    box.dataset.history = String(name === hostView.name ? hostView.history : 0);
    box.replaceChildren(
      h("div", { class: "chart-y", "aria-hidden": "true" }, h("span", null, "100%"), h("span", null, "50%"), h("span", null, "0%")),
      h("div", { class: "chart-plot" }, chart),
      h("div", { class: "chart-x", "aria-hidden": "true" }, h("span", null, ago), h("span", null, "now")),
    );
    const legend = $("host-chart-legend");
    legend.replaceChildren(
      h("li", { class: "lg-cpu" }, h("span", { class: "swatch", "aria-hidden": "true" }), `CPU ${last ? pct(last.cpu) : "–"}`),
      h("li", { class: "lg-mem" }, h("span", { class: "swatch", "aria-hidden": "true" }), `Memory ${last ? pct(last.mem) : "–"}`),
      h("li", { class: "lg-span" }, samples.length > 1 ? `${plural(samples.length, "heartbeat")} over ${duration(last.t - samples[0].t)}` : "collecting live heartbeats…"),
    );
  }

  async function enterHost(params, name) {
    const gen = ++hostView.gen;
    hostView.name = name;
    hostView.series = [];
    hostView.history = 0;
    setText($("host-title"), name);
    $("host-chart").replaceChildren();
    $("host-chart-legend").replaceChildren();
    $("host-runs-rows").replaceChildren();
    $("host-runs-empty").hidden = true;
    setText($("host-runs-count"), "");
    clearInterval(hostView.runsTimer);
    // The history and the runs load alongside the host itself; the runs list is refreshed
    // while the page is on screen (no stream for it).
    loadHostHistory(name, gen);
    loadHostRuns(name, gen);
    hostView.runsTimer = setInterval(() => { if (!document.hidden && gen === hostView.gen) loadHostRuns(name, gen); }, 10000);
    $("host-metrics").replaceChildren();
    $("host-details").replaceChildren();
    $("host-light").dataset.status = "unknown";
    setText($("host-status"), "");
    const cached = fleet.hosts.get(name);
    if (cached) renderHost(cached);
    try {
      const host = await api(`/hosts/${encodeURIComponent(name)}`);
      if (gen !== hostView.gen) return;
      upsertHost(host, false);
      renderHost(fleet.hosts.get(name) || host);
    } catch (e) {
      if (gen !== hostView.gen) return;
      if (!cached) showMissing(e.status === 404 ? `There is no host named “${name}”.` : `Could not load the host: ${e.message}`);
    }
  }

  function initHostView() {
    $("host-runs-rows").addEventListener("click", (e) => {
      if (e.target.closest("a, button")) return;
      const tr = e.target.closest("tr[data-task]");
      if (tr && !window.getSelection().toString()) navigate(`/tasks/${encodeURIComponent(tr.dataset.task)}`);
    });
    fleet.listeners.add((changed) => {
      if (current.name !== "host" || !hostView.name) return;
      if (changed.has(hostView.name) || changed.has("*")) {
        const host = fleet.hosts.get(hostView.name);
        if (host) renderHost(host);
      }
    });
  }

  // ---------------------------------------------------------------------------------------
  // Routing: #/fleet, #/run, #/tasks, #/tasks/ID, #/hosts/NAME (with ?query for filters).

  const current = { name: null, leave: null };

  const ROUTES = [
    { re: /^\/fleet$/, name: "fleet", view: "view-fleet", enter: enterFleet, leave: () => { fleetView.active = false; }, title: "Fleet", filter: "fleet-q" },
    { re: /^\/run$/, name: "run", view: "view-run", enter: enterRun, title: "Run", filter: "cmd" },
    { re: /^\/tasks$/, name: "tasks", view: "view-tasks", enter: enterTasks, leave: leaveTasks, title: "Tasks", filter: "tasks-name" },
    { re: /^\/tasks\/([^/]+)$/, name: "task", view: "view-task", enter: enterTask, leave: leaveTask, title: "Task", nav: "tasks", filter: "output-host" },
    { re: /^\/hosts\/([^/]+)$/, name: "host", view: "view-host", enter: enterHost, leave: leaveHost, title: "Host", nav: "fleet" },
  ];

  function parseHash() {
    const raw = location.hash.replace(/^#/, "") || "/fleet";
    const q = raw.indexOf("?");
    return { path: q < 0 ? raw : raw.slice(0, q), params: new URLSearchParams(q < 0 ? "" : raw.slice(q + 1)) };
  }

  function navigate(path) {
    location.hash = `#${path}`;
  }

  function replaceHash(path) {
    history.replaceState(null, "", `#${path}`);
  }

  function showView(id) {
    for (const view of document.querySelectorAll("main > .view")) view.hidden = view.id !== id;
  }

  function showMissing(text) {
    setText($("missing-text"), text);
    showView("view-missing");
    document.title = "Not found · opsplane";
  }

  function route(focus) {
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

  function safeDecode(s) {
    try { return decodeURIComponent(s); } catch { return s; }
  }

  // ---------------------------------------------------------------------------------------
  // Keyboard shortcuts, theme, start-up.

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
      if (current.name === "task" && taskView.task && !TERMINAL_TASK.has(taskView.task.status)) {
        const dur = $("task-meta").querySelectorAll("dd")[2];
        if (dur) setText(dur, taskDuration(taskView.task) || "–");
        for (const [id, tr] of taskView.rows) {
          const run = taskView.runs.get(id);
          if (run && run.status === "running") setText(tr.children[3], runDuration(run));
        }
      }
      if (Date.now() - fleet.lastSummaryAt > 15000) loadSummary();
    }, 1000);
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
