/* A template's parameters as form fields, and the values read back from them: shared by the
 * templates view (launch) and the schedules view (create). The server checks every value
 * again; the fields only spare the user a round trip for the obvious.
 */

import { auth } from "./state.js";
import { h } from "./dom.js";

let seq = 0;

/** One labelled field per parameter: text, number, select or password, defaults filled in. */
export function paramFields(parameters) {
  return parameters.map((p) => {
    const id = `param-${++seq}`;
    const required = p.required || ((p.type === "int" || p.type === "choice") && (p.default === undefined || p.default === null));
    const common = { id, name: p.name, dataset: { param: p.name, type: p.type }, required, "aria-required": required ? "true" : undefined };
    let input;
    if (p.type === "choice") {
      const options = (p.choices || []).map((c) => h("option", { value: c, selected: String(p.default) === c }, c));
      if (p.default === undefined || p.default === null) options.unshift(h("option", { value: "" }, "Choose…"));
      input = h("select", common, options);
    } else if (p.type === "int") {
      input = h("input", { ...common, type: "number", step: "1", inputmode: "numeric", value: p.default ?? "" });
    } else if (p.type === "secret") {
      input = h("input", { ...common, type: "password", autocomplete: "new-password" });
    } else {
      input = h("input", { ...common, type: "text", autocomplete: "off", spellcheck: "false", value: p.default ?? "" });
    }
    const label = h("label", { for: id }, p.name,
      required ? h("span", { class: "req", title: "required" }, " *") : null,
      h("span", { class: "opt" }, ` ${p.type}`));
    return h("div", { class: "field param" }, label, input, p.description ? h("p", { class: "hint" }, p.description) : null);
  });
}

/** The values the user gave; an empty field is left out, so the server applies the default
 * (or says the parameter is required). */
export function paramValues(container) {
  const values = {};
  for (const input of container.querySelectorAll("[data-param]")) {
    const raw = input.value;
    if (raw === "") continue;
    const n = Number(raw);
    values[input.dataset.param] = input.dataset.type === "int" && raw.trim() !== "" && Number.isInteger(n) ? n : raw;
  }
  return values;
}

/** One parameter in the CLI's words: NAME[:TYPE][=DEFAULT], a choice as choice(a|b). */
export function parseParamSpec(text) {
  const eq = text.indexOf("=");
  const head = eq < 0 ? text : text.slice(0, eq);
  const colon = head.indexOf(":");
  const name = (colon < 0 ? head : head.slice(0, colon)).trim();
  const kind = colon < 0 ? "string" : head.slice(colon + 1).trim();
  const spec = { name, type: kind || "string" };
  const choice = /^choice\((.*)\)$/.exec(kind);
  if (choice) {
    spec.type = "choice";
    spec.choices = choice[1].split("|");
  }
  if (eq >= 0) spec.default = text.slice(eq + 1);
  return spec;
}

/** "web-1, web-2" -> ["web-1", "web-2"]: names separated by commas or spaces. */
export function namesList(text) {
  return text.split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);
}

/** Targets overriding the template's, or undefined when both boxes are empty. */
export function targetsOverride(hostsText, groupsText) {
  const hosts = namesList(hostsText);
  const groups = namesList(groupsText);
  return hosts.length || groups.length ? { hosts, groups } : undefined;
}

export const role = () => (auth.user ? auth.user.role : "viewer");
export const mayRun = () => role() === "admin" || role() === "operator";
