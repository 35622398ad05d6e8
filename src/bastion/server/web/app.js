// Bastion's chat page: streams /v1/chat/completions (fetch + SSE), keeps conversations
// in localStorage, shows the server's security events. Model output only ever reaches
// the DOM through markdown.js (text nodes) or textContent.
"use strict";

const STORE = { convs: "bastion.conversations", current: "bastion.current", settings: "bastion.settings",
                key: "bastion.apiKey" };
const $ = (id) => document.getElementById(id);
const state = { convs: [], current: null, models: [], controller: null, busy: false, modelsTimer: null };

// ---------------------------------------------------------------- storage
function load(key, fallback) {
  try { const v = JSON.parse(localStorage.getItem(key)); return v === null ? fallback : v; } catch (e) { return fallback; }
}
function save() {
  localStorage.setItem(STORE.convs, JSON.stringify(state.convs));
  localStorage.setItem(STORE.current, JSON.stringify(state.current));
}
function saveSettings() {
  localStorage.setItem(STORE.settings, JSON.stringify({
    model: $("model").value, temperature: $("temperature").value, maxTokens: $("max-tokens").value }));
}
function apiKey() { return sessionStorage.getItem(STORE.key) || localStorage.getItem(STORE.key) || ""; }
function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}
function conv() { return state.convs.find((c) => c.id === state.current); }
function newConv() {
  const c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 6), title: "New chat",
              system: $("system").value, messages: [] };
  state.convs.unshift(c);
  state.current = c.id;
  save();
  return c;
}

// ---------------------------------------------------------------- API key
function askKey(message) {
  $("key-error").textContent = message || "";
  $("key-dialog").hidden = false;
  $("api-key").focus();
  return new Promise((resolve) => { state.keyResolve = resolve; });
}
$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  localStorage.removeItem(STORE.key);
  sessionStorage.removeItem(STORE.key);
  ($("remember-key").checked ? localStorage : sessionStorage).setItem(STORE.key, key);
  $("key-dialog").hidden = true;
  $("api-key").value = "";
  $("forget-key").hidden = false;
  if (state.keyResolve) state.keyResolve();
});
$("forget-key").addEventListener("click", () => {
  localStorage.removeItem(STORE.key);
  sessionStorage.removeItem(STORE.key);
  $("forget-key").hidden = true;
});

// fetch with the key; a 401 asks for the key (once per refusal) and retries
async function api(path, init) {
  for (;;) {
    const resp = await fetch(path, { ...init, headers: headers() });
    if (resp.status !== 401) return resp;
    await askKey(apiKey() ? "That key was refused." : "");
  }
}

// ---------------------------------------------------------------- models
const VERDICTS = { pass: "gate: pass", warn: "gate: warn", fail: "gate: FAIL (loaded by override)",
                   pending: "gate: pending" };
const PENDING_HINT = "The gate's behaviour scan of this adapter is running; it is served once the scan passes.";
const PENDING_RECHECK_MS = 10000;
function verdictOf(m) {
  if (!m || !m.parent) return ["base model", ""];
  return m.vetting ? [VERDICTS[m.vetting] || "gate: " + m.vetting, m.vetting] : ["not vetted", "unvetted"];
}
async function loadModels() {
  const resp = await api("/v1/models", { method: "GET" });
  if (!resp.ok) { status("Cannot list models (HTTP " + resp.status + ")"); return; }
  state.models = (await resp.json()).data;
  const select = $("model");
  const wanted = load(STORE.settings, {}).model;
  select.textContent = "";
  for (const m of state.models) {
    const opt = document.createElement("option");
    opt.value = m.id;
    opt.textContent = m.parent ? m.id + " (adapter, " + verdictOf(m)[0] + ")" : m.id;
    select.appendChild(opt);
  }
  if (state.models.some((m) => m.id === wanted)) select.value = wanted;
  showVerdict();
  // an adapter being vetted is served (or leaves the list) when its scan ends: look again
  clearTimeout(state.modelsTimer);
  if (state.models.some((m) => m.vetting === "pending")) state.modelsTimer = setTimeout(loadModels, PENDING_RECHECK_MS);
}
function showVerdict() {
  const [text, cls] = verdictOf(state.models.find((m) => m.id === $("model").value));
  $("vetting").textContent = text;
  $("vetting").className = "badge " + cls;
  $("vetting").title = cls === "pending" ? PENDING_HINT : "";
}
$("model").addEventListener("change", () => { showVerdict(); saveSettings(); });
function status(text) { $("status").textContent = text || ""; }

// ---------------------------------------------------------------- rendering
function renderList() {
  const list = $("conversations");
  list.textContent = "";
  for (const c of state.convs) {
    const li = document.createElement("li");
    li.className = c.id === state.current ? "current" : "";
    const title = li.appendChild(document.createElement("span"));
    title.className = "title";
    title.textContent = c.title;
    const del = li.appendChild(document.createElement("button"));
    del.textContent = "×";
    del.title = "Delete this conversation";
    del.addEventListener("click", (ev) => { ev.stopPropagation(); removeConv(c.id); });
    li.addEventListener("click", () => { if (!state.busy) { state.current = c.id; save(); renderAll(); } });
    list.appendChild(li);
  }
}
function renderAll() {
  const c = conv();
  $("system").value = c ? c.system || "" : $("system").value;
  renderList();
  const box = $("messages");
  box.textContent = "";
  if (c) c.messages.forEach((m, i) => box.appendChild(messageNode(c, m, i)));
  box.scrollTop = box.scrollHeight;
}
function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.disabled = state.busy;
  b.addEventListener("click", onClick);
  return b;
}
function messageNode(c, m, index) {
  const node = document.createElement("div");
  node.className = "msg " + m.role;
  node.dataset.role = m.role;
  const who = node.appendChild(document.createElement("div"));
  who.className = "who";
  who.appendChild(document.createElement("span")).textContent = m.role === "user" ? "You" : (m.model || "assistant");
  const actions = who.appendChild(document.createElement("span"));
  actions.className = "actions";
  if (m.role === "user") actions.appendChild(button("Edit", () => editMessage(node, c, index)));
  if (m.role === "assistant" && index === c.messages.length - 1) {
    actions.appendChild(button("Regenerate", () => regenerate(c)));
  }
  const body = node.appendChild(document.createElement("div"));
  body.className = "body";
  fillBody(body, m);
  const events = node.appendChild(document.createElement("div"));
  events.className = "events";
  for (const e of m.events || []) {
    const div = events.appendChild(document.createElement("div"));
    div.className = "event " + e.kind;
    div.textContent = e.text;
  }
  return node;
}
function fillBody(body, m) {
  body.textContent = "";
  if (m.role === "assistant") body.appendChild(window.BastionMarkdown.render(m.content));
  else body.textContent = m.content;  // the user's own words, shown as typed
}
function editMessage(node, c, index) {
  const body = node.querySelector(".body");
  body.textContent = "";
  const area = body.appendChild(document.createElement("textarea"));
  area.className = "edit";
  area.value = c.messages[index].content;
  const row = body.appendChild(document.createElement("div"));
  row.appendChild(button("Send", () => {
    if (!area.value.trim()) return;
    c.messages[index].content = area.value;
    c.messages.length = index + 1;  // the answers to the old text go
    if (index === 0) c.title = titleOf(area.value);
    respond(c);
  }));
  row.appendChild(button("Cancel", renderAll));
  area.focus();
}

// ---------------------------------------------------------------- chatting
function titleOf(text) { return text.trim().replace(/\s+/g, " ").slice(0, 48) || "New chat"; }
function setBusy(busy) {
  state.busy = busy;
  document.body.dataset.busy = busy ? "1" : "";
  $("send").disabled = busy;
  $("stop").hidden = !busy;
  for (const b of document.querySelectorAll("#messages button")) b.disabled = busy;
}
async function send() {
  const text = $("prompt").value;
  if (!text.trim() || state.busy) return;
  const c = conv() || newConv();
  if (!c.messages.length) c.title = titleOf(text);
  c.messages.push({ role: "user", content: text });
  $("prompt").value = "";
  await respond(c);
}
function regenerate(c) {
  if (c.messages.length && c.messages[c.messages.length - 1].role === "assistant") c.messages.pop();
  respond(c);
}
function removeConv(id) {
  if (state.busy) return;  // re-rendering would detach the message being streamed into
  state.convs = state.convs.filter((c) => c.id !== id);
  if (state.current === id) state.current = state.convs.length ? state.convs[0].id : null;
  save();
  renderAll();
}

// One answer for conversation `c`, streamed into a new assistant message.
async function respond(c) {
  c.system = $("system").value;
  const model = $("model").value;
  const history = c.messages.map((m) => ({ role: m.role, content: m.content }));
  const messages = (c.system.trim() ? [{ role: "system", content: c.system }] : []).concat(history);
  const reply = { role: "assistant", content: "", model: model, events: [] };
  c.messages.push(reply);
  save();
  renderAll();
  setBusy(true);
  status("");
  const node = $("messages").lastElementChild;
  node.classList.add("streaming");
  const body = { model: model, messages: messages, stream: true, stream_options: { include_usage: true } };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  if (maxTokens > 0) body.max_tokens = maxTokens;
  state.controller = new AbortController();
  try {
    const resp = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
                                                      signal: state.controller.signal });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      reply.events.push({ kind: "error", text: "Error " + resp.status + ": " + ((err.error || {}).message || resp.statusText) });
    } else {
      await readStream(resp, reply, node.querySelector(".body"));
    }
  } catch (e) {
    if (e.name === "AbortError") reply.events.push({ kind: "stopped", text: "Stopped." });
    else reply.events.push({ kind: "error", text: "Connection failed: " + e.message });
  } finally {
    state.controller = null;
    setBusy(false);
    save();
    renderAll();
  }
}

// The SSE body: events separated by a blank line, each "data: <json>" or "data: [DONE]".
async function readStream(resp, reply, bodyNode) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finish = null;
  let usage = null;
  let pending = false;
  const paint = () => { pending = false; fillBody(bodyNode, reply); };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const parts = buffer.split(/\r?\n\r?\n/);
    buffer = parts.pop();
    for (const part of parts) {
      const data = part.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data || data === "[DONE]") continue;
      const chunk = JSON.parse(data);
      if (chunk.error) { reply.events.push({ kind: "error", text: "Error: " + chunk.error.message }); continue; }
      if (chunk.usage) usage = chunk.usage;
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) reply.content += choice.delta.content;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (!pending) { pending = true; requestAnimationFrame(paint); }
    }
  }
  securityEvents(reply, finish, usage);
}
function securityEvents(reply, finish, usage) {
  if (finish === "content_filter") {
    reply.events.push({ kind: "guard", text: "Answer cut by the leak guard: it would have disclosed protected text." });
  } else if (finish === "length") {
    reply.events.push({ kind: "note", text: "Stopped at the max tokens limit." });
  } else if (finish === "abort") {
    reply.events.push({ kind: "error", text: "The server aborted this answer (shutting down)." });
  }
  const replaced = usage ? usage.cleangen_replaced_tokens : null;
  if (replaced !== null && replaced !== undefined) {
    reply.events.push({ kind: "cleangen", text: "CleanGen replaced " + replaced + (replaced === 1 ? " token" : " tokens") + "." });
  }
}

// ---------------------------------------------------------------- wiring
$("composer").addEventListener("submit", (ev) => { ev.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
$("new-chat").addEventListener("click", () => { if (!state.busy) { newConv(); renderAll(); } });
$("system").addEventListener("change", () => { const c = conv(); if (c) { c.system = $("system").value; save(); } });
for (const id of ["temperature", "max-tokens"]) $(id).addEventListener("change", saveSettings);

(function init() {
  const s = load(STORE.settings, {});
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.maxTokens !== undefined) $("max-tokens").value = s.maxTokens;
  state.convs = load(STORE.convs, []);
  state.current = load(STORE.current, null);
  if (!conv()) state.current = state.convs.length ? state.convs[0].id : null;
  $("forget-key").hidden = !apiKey();
  renderAll();
  loadModels().then(() => { document.body.dataset.ready = "1"; });
})();
