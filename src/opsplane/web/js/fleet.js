/* The fleet store: every host, loaded once and kept current by the fleet event stream. Views
 * subscribe to changes (fleet.listeners); samples feed the per-host sparkline.
 */

import { SAMPLES } from "./config.js";
import { auth, fleet } from "./state.js";
import { $, setText, toast } from "./dom.js";
import { parseTime } from "./format.js";
import { api, stream } from "./api.js";

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

export function samplesOf(name) {
  const ring = fleet.samples.get(name);
  const out = [];
  if (!ring) return out;
  for (let i = 0; i < ring.n; i++) {
    const k = (ring.head - ring.n + i + SAMPLES) % SAMPLES;
    out.push({ t: ring.t[k], cpu: ring.cpu[k], mem: ring.mem[k] });
  }
  return out;
}

export function upsertHost(host, fromStream) {
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

export async function loadHosts() {
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

export async function loadSummary() {
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

export function connectFleet() {
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

export function groupsOfFleet() {
  const groups = new Map();
  for (const host of fleet.hosts.values()) {
    for (const g of host.groups || []) groups.set(g, (groups.get(g) || 0) + 1);
  }
  return new Map([...groups.entries()].sort((a, b) => a[0].localeCompare(b[0])));
}
