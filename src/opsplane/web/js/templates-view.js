/* The templates view: every template with a launch form generated from its parameters.
 * A launch opens the task's live view; a refusal (4xx) is shown beside the form, in the
 * server's words. Who may launch is the server's decision; the page only disables the forms
 * the user's role and grants cannot use, so a viewer is not invited to a sure 403.
 */

import { current } from "./state.js";
import { $, h, setText, toast } from "./dom.js";
import { api } from "./api.js";
import { navigate } from "./nav.js";
import { renderKeyed } from "./keyed.js";
import { targetsText } from "./task-text.js";
import { paramFields, paramValues, targetsOverride, namesList, parseParamSpec, mayRun, role } from "./template-form.js";

const view = { gen: 0, cards: new Map() };

function launchForm(template, grant) {
  const launchable = mayRun() || grant !== undefined;
  const error = h("p", { class: "error", role: "alert" });
  const params = h("div", { class: "params" }, paramFields(template.parameters));
  const hosts = h("input", { type: "text", name: "hosts", autocomplete: "off", spellcheck: "false", placeholder: "web-1, web-2", "aria-label": `Hosts for ${template.name}` });
  const groups = h("input", { type: "text", name: "groups", autocomplete: "off", spellcheck: "false", placeholder: "web", "aria-label": `Groups for ${template.name}` });
  const submit = h("button", { type: "submit", class: "btn primary", disabled: !launchable }, "Launch");
  const note = launchable ? null : h("p", { class: "hint" }, `Your role (${role()}) may launch only the templates granted to you.`);
  const form = h("form", { class: "template-form", novalidate: true, dataset: { template: template.name } },
    params,
    template.kind === "script" ? h("p", { class: "hint" }, "Runs this script of the script directory on the control plane's own host.") : h("details", { class: "override" },
      h("summary", null, `Targets: ${targetsText(template.targets) || "none by default"} · override`),
      h("div", { class: "row" },
        h("div", { class: "field grow" }, h("span", { class: "label" }, "Hosts"), hosts),
        h("div", { class: "field grow" }, h("span", { class: "label" }, "Groups"), groups)),
      grant ? h("p", { class: "hint" }, `Granted to you on ${grant.groups.join(", ")}.`) : null),
    h("div", { class: "actions" }, submit, error),
    note);
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    if (submit.disabled) return;
    setText(error, "");
    const body = { params: paramValues(params) };
    const targets = targetsOverride(hosts.value, groups.value);
    if (targets) body.targets = targets;
    submit.disabled = true;
    try {
      const task = await api(`/templates/${encodeURIComponent(template.name)}/launch`, { method: "POST", body });
      navigate(`/tasks/${encodeURIComponent(task.id)}`);
    } catch (err) {
      setText(error, err.message);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}

function card(template, grant) {
  return h("article", { class: "panel template-card", dataset: { template: template.name } },
    h("div", { class: "template-head" },
      h("h2", { class: "h2" }, template.name),
      h("span", { class: "tag" }, `v${template.version}`)),
    template.description ? h("p", { class: "sub" }, template.description) : null,
    h("pre", { class: "cmd" }, template.command),
    launchForm(template, grant));
}

export async function enterTemplates() {
  const gen = ++view.gen;
  let templates;
  let grants;
  try {
    [templates, grants] = await Promise.all([api("/templates"), api("/auth/me/template-grants")]);
  } catch (e) {
    if (gen === view.gen) toast(`Could not load templates: ${e.message}`);
    return;
  }
  if (gen !== view.gen || current.name !== "templates") return;
  const byName = new Map(grants.items.map((g) => [g.template, g]));
  // Keyed by version and grant: coming back to the view keeps what the user typed into a form
  // (and never swaps a form from under a pointer while the list reloads).
  const key = (t) => `${role()}@${t.name}@${t.version}@${(byName.get(t.name) || { groups: [] }).groups.join(",")}`;
  renderKeyed($("templates-list"), view.cards, templates.items, key, (t) => card(t, byName.get(t.name)), () => {});
  const empty = $("templates-empty");
  empty.replaceChildren(h("p", { class: "empty-title" }, "No templates yet."),
    h("p", null, "An admin creates them: ", h("code", null, "opsplane templates create NAME --command …")));
  empty.hidden = templates.items.length > 0;
  $("template-admin").hidden = role() !== "admin";
  const select = $("grant-template");
  const chosen = select.value;
  select.replaceChildren(...templates.items.map((t) => h("option", { value: t.name, selected: t.name === chosen }, t.name)));
}

async function submitTemplate(e) {
  e.preventDefault();
  const error = $("template-error");
  setText(error, "");
  const lines = $("template-params").value.split(/\r?\n/).map((l) => l.trim()).filter(Boolean);
  const groups = namesList($("template-groups").value);
  const body = {
    name: $("template-name").value.trim(),
    description: $("template-description").value.trim(),
    command: $("template-command").value,
    parameters: lines.map(parseParamSpec),
    targets: { groups },
  };
  $("template-submit").disabled = true;
  try {
    await api("/templates", { method: "POST", body });
    $("template-form").reset();
    await enterTemplates();
  } catch (err) {
    setText(error, err.message);
  } finally {
    $("template-submit").disabled = false;
  }
}

async function submitGrant(e) {
  e.preventDefault();
  setText($("grant-error"), "");
  setText($("grant-done"), "");
  const user = $("grant-user").value.trim();
  const body = { template: $("grant-template").value, groups: namesList($("grant-groups").value) };
  try {
    const grant = await api(`/users/${encodeURIComponent(user)}/template-grants`, { method: "POST", body });
    setText($("grant-done"), `${grant.user} may launch ${grant.template} on ${grant.groups.join(", ")}.`);
  } catch (err) {
    setText($("grant-error"), err.message || "The grant was refused.");
  }
}

export function initTemplatesView() {
  $("template-form").addEventListener("submit", submitTemplate);
  $("grant-form").addEventListener("submit", submitGrant);
}

export function leaveTemplates() {
  view.gen += 1;
}
