// Cube dashboard: plain DOM, no dependencies. Every request carries the
// API key the user entered; the server decides what it may see.
"use strict";

const keyName = "cube.apiKey";
const $ = (id) => document.getElementById(id);

function key() { return localStorage.getItem(keyName) || ""; }

function say(msg) { $("status").textContent = msg; }

async function api(method, path) {
  const res = await fetch(path, { method, headers: { "X-API-Key": key() } });
  if (!res.ok) {
    let msg = res.status + " " + res.statusText;
    try { const b = await res.json(); if (b && b.message) msg = b.message; } catch (_) {}
    throw new Error(method + " " + path + ": " + msg);
  }
  return res.status === 204 ? null : res.json();
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function when(s) { return s ? new Date(s).toLocaleString() : ""; }

function action(td, label, method, path) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", async () => {
    try { await api(method, path); say(""); } catch (e) { say(e.message); }
    load();
  });
  td.appendChild(b);
}

async function load() {
  if (!key()) { say("Enter an API key (cube key create prints one)."); return; }
  try {
    const [sbs, tpls] = await Promise.all([api("GET", "/v2/sandboxes?state=running,paused"), api("GET", "/templates")]);
    const body = $("sandboxes");
    body.replaceChildren();
    for (const s of sbs || []) {
      const tr = document.createElement("tr");
      cell(tr, s.sandboxID, "id");
      cell(tr, s.alias || s.templateID);
      cell(tr, s.state);
      cell(tr, when(s.startedAt));
      cell(tr, when(s.endAt));
      cell(tr, s.cpuCount);
      cell(tr, s.memoryMB);
      const td = cell(tr, "");
      const id = encodeURIComponent(s.sandboxID);
      if (s.state === "running") action(td, "Pause", "POST", "/sandboxes/" + id + "/pause");
      if (s.state === "paused") action(td, "Resume", "POST", "/sandboxes/" + id + "/resume");
      action(td, "Kill", "DELETE", "/sandboxes/" + id);
      body.appendChild(tr);
    }
    const tb = $("templates");
    tb.replaceChildren();
    for (const t of tpls || []) {
      const tr = document.createElement("tr");
      cell(tr, t.templateID, "id");
      cell(tr, (t.aliases || []).join(", "));
      cell(tr, t.cpuCount);
      cell(tr, t.memoryMB);
      cell(tr, t.buildStatus || t.status || "");
      tb.appendChild(tr);
    }
    say((sbs || []).length + " sandbox(es)");
  } catch (e) { say(e.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = key();
  $("keyform").addEventListener("submit", (ev) => {
    ev.preventDefault();
    localStorage.setItem(keyName, $("key").value.trim());
    load();
  });
  $("forget").addEventListener("click", () => { localStorage.removeItem(keyName); $("key").value = ""; load(); });
  $("refresh").addEventListener("click", load);
  load();
  setInterval(load, 5000);
});
