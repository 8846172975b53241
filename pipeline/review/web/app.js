// The reviewer's page: plain JavaScript over the review API. Everything that comes from an item (content, the
// model's rationale, policy text) is untrusted and goes into the page as text nodes only, never as HTML.
"use strict";

const state = { item: null, catalogue: [], revealed: false, busy: false };
const $ = (id) => document.getElementById(id);

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (method !== "GET") init.headers["X-Modpipe-CSRF"] = "1";
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) {
    window.location.assign("/login");
    throw new Error("signed out");
  }
  if (response.status === 204) return null;
  const data = await response.json();
  if (!response.ok) {
    const error = new Error(data.error || "request failed (" + response.status + ")");
    error.status = response.status;
    throw error;
  }
  return data;
}

function flash(message, isError) {
  const box = $("flash");
  box.textContent = message;
  box.className = isError ? "error" : "";
  box.hidden = false;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return (seconds / 86400).toFixed(1) + " d";
}

// -- queue view ---------------------------------------------------------------------------------------------

async function loadQueues() {
  const data = await api("GET", "/v1/queues");
  const body = $("queue-table").querySelector("tbody");
  body.replaceChildren();
  for (const q of data.queues) {
    const row = el("tr");
    row.dataset.queue = q.queue;
    for (const value of [q.queue, q.severity || "-", q.policy_id || "-", q.pending, age(q.oldest_age_s)]) {
      row.appendChild(el("td", value));
    }
    body.appendChild(row);
  }
  $("queue-summary").textContent = data.pending + " pending, " + data.claimed + " claimed";
}

function showQueues() {
  state.item = null;
  $("item-view").hidden = true;
  $("queue-view").hidden = false;
  loadQueues().catch((e) => flash(e.message, true));
}

async function claimNext() {
  if (state.busy) return;
  state.busy = true;
  try {
    const policy = $("claim-policy").value;
    const view = await api("POST", "/v1/claims", policy ? { policy_id: policy } : {});
    if (view === null) {
      flash("Nothing to review in " + (policy || "any queue") + ".");
      await loadQueues();
      return;
    }
    showItem(view);
  } catch (e) {
    flash(e.message, true);
  } finally {
    state.busy = false;
  }
}

// -- item view ----------------------------------------------------------------------------------------------

function showItem(view) {
  state.item = view;
  state.revealed = false;
  $("queue-view").hidden = true;
  $("item-view").hidden = false;
  $("item-id").textContent = view.content_id;
  const appeal = view.appeal_round > 0 ? " - appeal #" + view.appeal_round : "";
  $("item-meta").textContent = view.reason + " - " + view.queue + " - " + age(view.age_s) + " old" + appeal;
  $("lease").textContent = view.lease_until
    ? "Held by you until " + new Date(view.lease_until * 1000).toLocaleTimeString() : "";
  $("content-box").hidden = false;
  $("content-text").hidden = true;
  $("content-text").textContent = "";
  renderTriage(view.triage);
  renderModel(view.model.calls);
  renderHistory(view);
  renderPolicies(view.policies);
  renderDecisionControls(view);
}

function renderTriage(triage) {
  const body = $("triage-table").querySelector("tbody");
  body.replaceChildren();
  const rows = [["violation", triage.violation], ...Object.entries(triage.categories).sort((a, b) => b[1] - a[1])];
  for (const [name, p] of rows) {
    const row = el("tr");
    row.appendChild(el("td", name));
    row.appendChild(el("td", Number(p).toFixed(3)));
    body.appendChild(row);
  }
  const row = el("tr");
  row.appendChild(el("td", "model"));
  row.appendChild(el("td", triage.model_version));
  body.appendChild(row);
}

function renderModel(calls) {
  const box = $("model-calls");
  box.replaceChildren();
  if (!calls.length) {
    box.appendChild(el("p", "The reasoning model gave no answer for this item."));
    return;
  }
  for (const call of calls) {
    const div = el("div", null, "call");
    const answer = call.violation === null ? "no usable answer" : call.violation ? "violates" : "does not violate";
    div.appendChild(el("strong", call.policy.policy_id + " (" + call.effort + " effort): " + answer));
    if (call.confidence !== null) div.appendChild(el("span", " - self-reported confidence " + call.confidence));
    if (call.rule_ids.length) div.appendChild(el("div", "cites " + call.rule_ids.join(", ")));
    if (call.invalid_rule_ids.length) div.appendChild(el("div", "cited rules that do not exist: " + call.invalid_rule_ids.join(", "), "error"));
    if (call.rationale) div.appendChild(el("blockquote", call.rationale));
    if (call.error) div.appendChild(el("div", "error: " + call.error, "error"));
    div.appendChild(el("small", call.model));
    box.appendChild(div);
  }
}

function renderHistory(view) {
  const list = $("history");
  list.replaceChildren();
  if (view.supersedes) {
    const v = view.supersedes;
    list.appendChild(el("li", "appealed verdict: " + v.decision + " by " + v.stage + (v.reviewer_id ? " (" + v.reviewer_id + ")" : "") + " - " + v.rationale));
  }
  for (const entry of view.history) {
    const what = entry.action === "decide" ? (entry.decision === "block" ? "removed" : "allowed") + " under " + entry.policy_id + (entry.rule_id ? " " + entry.rule_id : "") : entry.action;
    list.appendChild(el("li", entry.occurred_at + " " + entry.actor_id + ": " + what + (entry.note ? " - " + entry.note : "")));
  }
  if (!list.children.length) list.appendChild(el("li", "first review"));
}

function renderPolicies(policies) {
  const box = $("policies");
  box.replaceChildren();
  for (const policy of policies) {
    const section = el("section");
    if (policy.missing) {
      section.appendChild(el("p", "Unknown policy " + policy.policy_id, "error"));
      box.appendChild(section);
      continue;
    }
    section.appendChild(el("h4", policy.name + " v" + policy.version + " (" + policy.severity + ")"));
    const cited = new Set(policy.cited_rule_ids);
    const text = el("div", null, "policy-text");
    for (const line of policy.text.split("\n")) {
      const match = line.match(/\*\*([A-Z]{2,4}\d+\.[a-z]+)\*\*/);
      const span = el("span", null, "line");
      if (match && cited.has(match[1])) {
        const mark = el("mark", line, "cited");
        mark.dataset.rule = match[1];
        span.appendChild(mark);
      } else {
        span.textContent = line || "\u00a0";
      }
      text.appendChild(span);
    }
    section.appendChild(text);
    box.appendChild(section);
  }
}

function renderDecisionControls(view) {
  const select = $("decision-policy");
  select.replaceChildren();
  const first = view.policies.filter((p) => !p.missing).map((p) => p.policy_id);
  const ids = [...first, ...state.catalogue.map((p) => p.policy_id).filter((id) => !first.includes(id))];
  for (const id of ids) select.appendChild(el("option", id)).value = id;
  renderRules();
  $("decision-note").value = "";
}

function renderRules() {
  const policy = state.catalogue.find((p) => p.policy_id === $("decision-policy").value);
  const select = $("decision-rule");
  select.replaceChildren();
  select.appendChild(el("option", "(no rule: allow only)")).value = "";
  const cited = new Set(state.item ? state.item.model.calls.flatMap((c) => c.rule_ids) : []);
  for (const rule of policy ? policy.rules : []) {
    const label = (rule.label ? "VIOLATES " : "SAFE ") + rule.rule_id + (cited.has(rule.rule_id) ? " (cited)" : "") + " - " + rule.text;
    const option = el("option", label.length > 110 ? label.slice(0, 107) + "..." : label);
    option.value = rule.rule_id;
    option.dataset.label = rule.label;
    select.appendChild(option);
  }
}

function pickRuleFor(decision) {
  // Keep the reviewer's choice if it fits the decision; otherwise the first cited (or first) rule that does.
  const select = $("decision-rule");
  const wanted = decision === "remove" ? "1" : "0";
  const current = select.selectedOptions[0];
  if (current && (current.dataset.label === wanted || (decision === "allow" && current.value === ""))) return current.value || null;
  const options = [...select.options].filter((o) => o.dataset.label === wanted);
  const cited = options.find((o) => o.textContent.includes("(cited)"));
  const choice = cited || options[0];
  if (decision === "allow") return null;
  if (choice) select.value = choice.value;
  return choice ? choice.value : null;
}

async function reveal() {
  if (!state.item || state.revealed) return;
  const data = await api("GET", "/v1/items/" + encodeURIComponent(state.item.content_id) + "/content");
  $("content-text").textContent = data.text;
  $("content-text").hidden = false;
  $("content-box").hidden = true;
  state.revealed = true;
}

async function act(kind) {
  if (!state.item || state.busy) return;
  state.busy = true;
  const id = state.item.content_id;
  const path = "/v1/items/" + encodeURIComponent(id);
  try {
    if (kind === "allow" || kind === "remove") {
      const verdict = await api("POST", path + "/decision", {
        decision: kind,
        policy_id: $("decision-policy").value,
        rule_id: pickRuleFor(kind),
        note: $("decision-note").value,
        revision: state.item.revision,  // the text the reviewer saw: an edit since is refused (409)
      });
      flash("Decided " + id + ": " + verdict.decision + " (verdict " + verdict.verdict_id + ").");
    } else if (kind === "skip") {
      await api("POST", path + "/skip");
      flash("Skipped " + id + ".");
    } else if (kind === "escalate") {
      await api("POST", path + "/escalate", { note: $("decision-note").value });
      flash("Escalated " + id + " to the admin queue.");
    }
    showQueues();
  } catch (e) {
    flash(e.message, true);
    if (e.status === 409) showQueues();
  } finally {
    state.busy = false;
  }
}

// -- wiring -------------------------------------------------------------------------------------------------

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const tag = event.target.tagName;
  if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT") return;
  const inItem = state.item !== null;
  const actions = {
    n: () => !inItem && claimNext(),
    r: () => inItem && reveal().catch((e) => flash(e.message, true)),
    a: () => inItem && act("allow"),
    x: () => inItem && act("remove"),
    s: () => inItem && act("skip"),
    e: () => inItem && act("escalate"),
  };
  const action = actions[event.key];
  if (action) {
    event.preventDefault();
    action();
  }
});

async function init() {
  $("claim-next").addEventListener("click", claimNext);
  $("refresh").addEventListener("click", () => loadQueues().catch((e) => flash(e.message, true)));
  $("reveal").addEventListener("click", () => reveal().catch((e) => flash(e.message, true)));
  $("allow").addEventListener("click", () => act("allow"));
  $("remove").addEventListener("click", () => act("remove"));
  $("skip").addEventListener("click", () => act("skip"));
  $("escalate").addEventListener("click", () => act("escalate"));
  $("back").addEventListener("click", async () => {
    if (state.item) await api("POST", "/v1/items/" + encodeURIComponent(state.item.content_id) + "/release").catch(() => null);
    showQueues();
  });
  $("decision-policy").addEventListener("change", renderRules);
  $("logout").addEventListener("click", async () => {
    await api("POST", "/v1/logout").catch(() => null);
    window.location.assign("/login");
  });
  const me = await api("GET", "/v1/me");
  $("whoami").textContent = me.principal_id + " (" + me.role + ")";
  state.catalogue = await api("GET", "/v1/policies");
  for (const p of state.catalogue) $("claim-policy").appendChild(el("option", p.policy_id)).value = p.policy_id;
  await loadQueues();
  document.body.dataset.ready = "1";
}

init().catch((e) => flash(e.message, true));
