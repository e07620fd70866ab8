// The broker's live page: one code cell run on the visitor's own session.
// Only the public API: POST api/v1/sessions, its events stream, and the
// execute API streamed as server-sent events. {id, token} stay in
// localStorage so a reload finds the same session (and kernel state) again.
"use strict";

const STORE_KEY = "session-broker-page";
const $ = (id) => document.getElementById(id);
let session = null; // {id, token, ready}
let busy = false;

function saved() {
  try { return JSON.parse(localStorage.getItem(STORE_KEY) || "null"); } catch { return null; }
}
function remember(s) {
  session = s;
  if (s) localStorage.setItem(STORE_KEY, JSON.stringify({ id: s.id, token: s.token }));
  else localStorage.removeItem(STORE_KEY);
  $("end").hidden = !s;
}

// A refusal carries {error, reason, message}: show the broker's own words.
class Refused extends Error {
  constructor(status, body) {
    super((body && body.message) || `HTTP ${status}`);
    this.status = status;
    this.reason = body && body.reason;
  }
}
async function refusal(resp) {
  let body = null;
  try { body = await resp.json(); } catch { /* not JSON: the status says it */ }
  return new Refused(resp.status, body);
}
function auth() { return { Authorization: `token ${session.token}` }; }

function showProblem(text) {
  $("problem").textContent = text;
  $("problem").hidden = !text;
}
function showSession(body) {
  if (!body) { $("session").textContent = "No session yet."; return; }
  const expires = body.expires_at ? new Date(body.expires_at).toLocaleString() : "?";
  $("session").textContent =
    `Your session ${body.id} is ${body.status} (${body.backend} backend); it ends at ${expires} at the latest.`;
}
function showProgress(percent, text) {
  $("progress").hidden = false;
  $("bar-fill").style.width = `${Math.max(3, Math.min(100, percent))}%`;
  $("progress-text").textContent = text;
}

// Server-sent events from a fetch response: yields {event, data}.
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

// The saved session, if it is still alive; otherwise forget it.
async function restore() {
  const s = saved();
  if (!s) return;
  session = s;
  const resp = await fetch(`api/v1/sessions/${encodeURIComponent(s.id)}`, { headers: auth() });
  if (!resp.ok) { remember(null); return; }
  const body = await resp.json();
  if (body.status !== "pending" && body.status !== "ready") { remember(null); return; }
  remember({ ...s, ready: body.status === "ready" });
  showSession(body);
  $("run-status").textContent = `Reconnected to your session ${s.id}.`;
}

async function createSession() {
  showProgress(3, "Asking the broker for a session...");
  const resp = await fetch("api/v1/sessions", { method: "POST" });
  if (!resp.ok) throw await refusal(resp);
  const body = await resp.json();
  remember({ id: body.id, token: body.token, ready: body.status === "ready" });
  showSession(body);
  if (!session.ready) await followSpawn();
}

// The spawn's progress events, until ready (or the broker's failure message).
async function followSpawn() {
  const resp = await fetch(`api/v1/sessions/${session.id}/events`,
    { headers: { ...auth(), Accept: "text/event-stream" } });
  if (!resp.ok) throw await refusal(resp);
  let percent = 5;
  for await (const { data } of events(resp)) {
    percent = typeof data.progress === "number" ? data.progress : Math.min(95, percent + 15);
    if (data.phase === "ready") {
      session.ready = true;
      showProgress(100, "Your session is ready.");
      const info = await fetch(`api/v1/sessions/${session.id}`, { headers: auth() });
      if (info.ok) showSession(await info.json());
      return;
    }
    if (["failed", "stopped", "error"].includes(data.phase)) {
      remember(null);
      throw new Refused(data.status_code || 502, data);
    }
    showProgress(percent, `${data.phase}: ${data.message || ""}`.trim());
  }
  throw new Error("The progress stream ended before the session was ready.");
}

// ---- outputs -------------------------------------------------------------
const SAFE_TAGS = new Set(["TABLE", "THEAD", "TBODY", "TFOOT", "TR", "TH", "TD", "CAPTION",
  "B", "I", "EM", "STRONG", "P", "DIV", "SPAN", "BR", "UL", "OL", "LI", "PRE", "CODE", "SMALL",
  "H1", "H2", "H3", "H4", "H5", "H6", "SUB", "SUP", "HR", "IMG"]);
const SAFE_ATTRS = new Set(["colspan", "rowspan", "alt", "title"]);

// text/html from a kernel, reduced to inert markup: known tags, no scripts,
// styles, links or event handlers; images only as data:image URLs.
function sanitized(html) {
  const doc = new DOMParser().parseFromString(html, "text/html");
  const clean = (node) => {
    for (const child of [...node.children]) {
      if (!SAFE_TAGS.has(child.tagName)) {
        if (["SCRIPT", "STYLE", "IFRAME", "OBJECT", "EMBED", "TEMPLATE"].includes(child.tagName)) {
          child.remove();
        } else {
          clean(child);
          child.replaceWith(...child.childNodes);
        }
        continue;
      }
      for (const attr of [...child.attributes]) {
        const keep = SAFE_ATTRS.has(attr.name) ||
          (child.tagName === "IMG" && attr.name === "src" && /^data:image\/(png|jpeg|gif);/.test(attr.value));
        if (!keep) child.removeAttribute(attr.name);
      }
      clean(child);
    }
  };
  clean(doc.body);
  const div = document.createElement("div");
  div.className = "html";
  div.append(...doc.body.childNodes);
  return div;
}

function text(content, cls) {
  const pre = document.createElement("pre");
  if (cls) pre.className = cls;
  pre.textContent = content;
  return pre;
}

function bundle(data) {
  if (data["image/png"]) {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${data["image/png"].replace(/\s/g, "")}`;
    img.alt = data["text/plain"] || "image output";
    return img;
  }
  if (data["image/jpeg"]) {
    const img = document.createElement("img");
    img.src = `data:image/jpeg;base64,${data["image/jpeg"].replace(/\s/g, "")}`;
    return img;
  }
  if (data["text/html"]) return sanitized(data["text/html"]);
  return text(data["text/plain"] || "", "result");
}

function appendStream(name, content) {
  const out = $("output");
  const last = out.lastElementChild;
  if (last && last.tagName === "PRE" && last.className === name) last.textContent += content;
  else out.append(text(content, name));
}

async function execute(code) {
  const resp = await fetch(`api/v1/sessions/${session.id}/execute`, {
    method: "POST",
    headers: { ...auth(), "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify({ code }),
  });
  if (!resp.ok) throw await refusal(resp);
  const shown = [];
  for await (const { event, data } of events(resp)) {
    if (event === "stream") appendStream(data.name, data.text);
    else if (event === "result" || event === "display") {
      const node = bundle(data.data || {});
      shown.push(node);
      $("output").append(node);
    } else if (event === "update_display" && shown[data.index]) {
      const node = bundle(data.data || {});
      shown[data.index].replaceWith(node);
      shown[data.index] = node;
    } else if (event === "clear_output") $("output").replaceChildren();
    else if (event === "error") {
      $("output").append(text((data.traceback || []).join("\n") || `${data.ename}: ${data.evalue}`, "error"));
    } else if (event === "failed") throw new Refused(data.status_code || 502, data);
    else if (event === "done") {
      const what = { ok: "Done", error: "Finished with an error", timeout: "Stopped: time limit reached" };
      $("run-status").textContent = `${what[data.status] || data.status} in ${data.duration_ms} ms` +
        (data.truncated ? " (output truncated)" : "") + ".";
    }
  }
}

async function run() {
  if (busy) return;
  busy = true;
  $("run").disabled = true;
  showProblem("");
  $("output").replaceChildren();
  $("run-status").textContent = "";
  try {
    if (!session) await createSession();
    else if (!session.ready) await followSpawn(); // restored while still spawning
    $("progress").hidden = true;
    $("run-status").textContent = "Running...";
    try {
      await execute($("code").value);
    } catch (err) {
      // The saved session ended (expired, culled, deleted): start a new one once.
      if (!(err instanceof Refused) || ![401, 404, 410].includes(err.status)) throw err;
      remember(null);
      await createSession();
      $("progress").hidden = true;
      await execute($("code").value);
    }
  } catch (err) {
    $("progress").hidden = true;
    $("run-status").textContent = "";
    showProblem(err.message);
  } finally {
    busy = false;
    $("run").disabled = false;
  }
}

async function endSession() {
  if (!session) return;
  await fetch(`api/v1/sessions/${session.id}`, { method: "DELETE", headers: auth() });
  remember(null);
  showSession(null);
  $("run-status").textContent = "Session ended.";
}

function duration(seconds) {
  if (seconds >= 3600 && seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds >= 60 && seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

async function showLimits() {
  const resp = await fetch("page/limits.json");
  if (!resp.ok) { $("limits").replaceChildren(); return; }
  const l = await resp.json();
  const items = [
    l.max_sessions_per_visitor ? `${l.max_sessions_per_visitor} live sessions at once` : "no limit on live sessions",
    l.max_creations_per_visitor
      ? `${l.max_creations_per_visitor} new sessions per ${duration(l.creation_window)}` : null,
    `a session lives at most ${duration(l.session_max_age)}` +
      (l.session_idle_timeout ? `, and ends after ${duration(l.session_idle_timeout)} without activity` : ""),
    `a run may take ${duration(l.execute_timeout_default)} (the API allows up to ${duration(l.execute_timeout_max)})`,
  ].filter(Boolean);
  $("limits").replaceChildren(...items.map((t) => { const li = document.createElement("li"); li.textContent = t; return li; }));
}

document.addEventListener("DOMContentLoaded", () => {
  $("run").addEventListener("click", run);
  $("end").addEventListener("click", endSession);
  $("code").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && e.shiftKey) { e.preventDefault(); run(); }
  });
  showLimits().catch(() => {});
  restore().catch(() => remember(null)).finally(() => document.body.dataset.ready = "1");
});
