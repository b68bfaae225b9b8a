/* The fleet view: every host with its live metrics, filtered, sorted and paged in the page. */

import { LINK_LABEL, FLEET_PAGE } from "./config.js";
import { fleet } from "./state.js";
import { $, h, setText } from "./dom.js";
import { parseTime, relTime, absTime, plural, pct } from "./format.js";
import { groupsOfFleet } from "./fleet.js";
import { renderKeyed, renderPager, bar, updateBar, light } from "./keyed.js";
import { replaceHash } from "./nav.js";

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

export function enterFleet(params) {
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

export function leaveFleet() {
  fleetView.active = false;
}

export function initFleetView() {
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
