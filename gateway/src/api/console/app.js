// calwatch console: plain JavaScript, no dependencies. Talks to the gateway's API with a
// bearer token; the alert feed reads the SSE stream through fetch (so the token stays in a
// header, never in a URL) and resumes with Last-Event-ID after a drop.
"use strict";

const state = { token: null, me: null, alerts: new Map(), lastEventId: null, streamAbort: null, timer: null };
const $ = (sel) => document.querySelector(sel);

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const fmtTime = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").slice(0, 19) : "—");
const fmtNum = (x, d = 2) => (x === null || x === undefined ? "—" : Number(x).toFixed(d));
const pill = (text, cls) => el("span", { class: `pill ${cls}` }, text);

async function api(path, opts = {}) {
  const r = await fetch(path, {
    ...opts,
    headers: { Authorization: `Bearer ${state.token}`, ...(opts.headers || {}) },
  });
  if (r.status === 401) { signOut("Your token was refused."); throw new Error("unauthorized"); }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || body.error || `HTTP ${r.status}`);
  return body;
}

function signOut(message) {
  localStorage.removeItem("cw_token");
  state.token = null;
  if (state.streamAbort) state.streamAbort.abort();
  showLogin(message || "");
}

function showLogin(message) {
  $("#login").hidden = false;
  $("#view").replaceChildren();
  $("#who").textContent = "";
  $("#login-error").textContent = message;
}

async function signIn(token) {
  state.token = token;
  try {
    state.me = await api("/api/me");
  } catch (e) {
    return;
  }
  localStorage.setItem("cw_token", token);
  $("#login").hidden = true;
  $("#who").textContent = `${state.me.name} · ${state.me.role}${state.me.owner ? " · " + state.me.owner : ""}`;
  if (state.me.role !== "verifier") startStream();
  route();
}

// ---- alerts -------------------------------------------------------------------------

function upsertAlert(a, fresh) {
  state.alerts.set(a.id, { ...a, fresh });
  if (location.hash.startsWith("#/alerts") || location.hash === "" || location.hash === "#/") renderAlerts();
}

async function startStream() {
  if (state.streamAbort) state.streamAbort.abort();
  const ctrl = new AbortController();
  state.streamAbort = ctrl;
  const setState = (t, cls) => { const s = $("#stream-state"); s.textContent = t; s.className = `pill ${cls}`; };
  for (let attempt = 0; !ctrl.signal.aborted; attempt++) {
    try {
      const headers = { Authorization: `Bearer ${state.token}`, Accept: "text/event-stream" };
      if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
      const r = await fetch("/api/alerts/stream", { headers, signal: ctrl.signal });
      if (!r.ok) throw new Error(`HTTP ${r.status}`);
      setState("live", "live");
      attempt = 0;
      const reader = r.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          handleSse(block);
        }
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
    }
    setState("reconnecting", "sev-warning");
    await new Promise((res) => setTimeout(res, Math.min(5000, 500 * 2 ** attempt)));
  }
}

function handleSse(block) {
  let event = "message", data = "", id = null;
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue;
    const [k, ...rest] = line.split(":");
    const v = rest.join(":").replace(/^ /, "");
    if (k === "event") event = v;
    else if (k === "data") data += (data ? "\n" : "") + v;
    else if (k === "id") id = v;
  }
  if (id) state.lastEventId = id;
  if (event === "alert") upsertAlert(JSON.parse(data), true);
  else if (event === "resync") loadAlerts();
}

async function loadAlerts() {
  const body = await api("/api/alerts?limit=200");
  for (const a of body.items.reverse()) {
    const known = state.alerts.get(a.id);
    if (!known || known.updated <= a.updated) state.alerts.set(a.id, { ...a, fresh: false });
  }
  renderAlerts();
}

async function ack(id, button) {
  button.disabled = true;
  try {
    const a = await api(`/api/alerts/${encodeURIComponent(id)}/ack`, { method: "POST" });
    upsertAlert(a, false);
  } catch (e) {
    button.disabled = false;
    alert(`Not acknowledged: ${e.message}`);
  }
}

function renderAlerts() {
  const view = $("#view");
  if (!view.dataset.page || view.dataset.page !== "alerts") return;
  const filter = $("#alert-filter") ? $("#alert-filter").value : "open";
  const rows = [...state.alerts.values()]
    .filter((a) => filter === "all" || (filter === "open" ? a.state !== "resolved" : a.state === filter))
    .sort((a, b) => b.updated - a.updated)
    .slice(0, 500);
  const canAck = state.me && state.me.role === "supervisor";
  const tbody = el("tbody", {}, rows.map((a) =>
    el("tr", { class: a.fresh ? "fresh" : "", "data-alert-id": a.id, "data-state": a.state },
      el("td", {}, fmtTime(a.updated)),
      el("td", {}, pill(a.severity, `sev-${a.severity}`)),
      el("td", {}, a.kind),
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(a.device)}` }, a.device)),
      el("td", {}, a.owner, el("div", { class: "muted" }, a.site)),
      el("td", { class: "alert-state" }, pill(a.state, `st-${a.state}`), a.ack_by ? el("div", { class: "muted" }, `by ${a.ack_by}`) : null),
      el("td", {}, a.count),
      el("td", {}, a.message),
      el("td", {}, canAck && a.state === "active"
        ? el("button", { type: "button", class: "ack-button", onclick: (ev) => ack(a.id, ev.target) }, "Acknowledge")
        : null))));
  const table = $("#alert-table");
  if (table) table.replaceChildren(
    el("thead", {}, el("tr", {}, ["Updated", "Severity", "Kind", "Instrument", "Owner / site", "State", "Count", "Message", ""].map((h) => el("th", {}, h)))),
    tbody);
  $("#alert-count").textContent = `${rows.length} shown`;
}

function pageAlerts() {
  const view = $("#view");
  view.dataset.page = "alerts";
  const select = el("select", { id: "alert-filter", onchange: renderAlerts },
    ["open", "active", "acknowledged", "resolved", "all"].map((s) => el("option", { value: s }, s)));
  view.replaceChildren(
    el("h1", {}, "Alerts"),
    el("div", { class: "filters" }, "Show", select, el("span", { id: "alert-count", class: "muted" })),
    el("table", { id: "alert-table" }));
  renderAlerts();
  loadAlerts().catch((e) => view.append(el("p", { class: "error" }, e.message)));
}

// ---- instruments --------------------------------------------------------------------

async function pageDevices(params) {
  const view = $("#view");
  view.dataset.page = "devices";
  const q = new URLSearchParams(params);
  if (!q.get("limit")) q.set("limit", "200");
  const vstate = el("select", { id: "vstate-filter" },
    ["", "valid", "due_soon", "overdue", "unverified", "failed"].map((s) => el("option", { value: s }, s || "any state")));
  vstate.value = q.get("vstate") || "";
  const kind = el("select", { id: "kind-filter" },
    ["", "scale", "dispenser", "energy_meter", "other"].map((s) => el("option", { value: s }, s || "any kind")));
  kind.value = q.get("kind") || "";
  const apply = () => {
    const n = new URLSearchParams();
    if (vstate.value) n.set("vstate", vstate.value);
    if (kind.value) n.set("kind", kind.value);
    location.hash = `#/devices?${n}`;
  };
  vstate.onchange = apply;
  kind.onchange = apply;
  view.replaceChildren(el("h1", {}, "Instruments"), el("div", { class: "filters" }, vstate, kind, el("span", { id: "device-count", class: "muted" })));
  const body = await api(`/api/devices?${q}`);
  $("#device-count").textContent = `${body.items.length} of ${body.total}`;
  view.append(el("table", { id: "device-table" },
    el("thead", {}, el("tr", {}, ["Instrument", "Kind", "Owner", "Site", "Verification", "Days to due", "Last seen", "Open alerts"].map((h) => el("th", {}, h)))),
    el("tbody", {}, body.items.map((d) => el("tr", { "data-device-id": d.id },
      el("td", {}, el("a", { href: `#/device/${encodeURIComponent(d.id)}` }, d.id), el("div", { class: "muted" }, d.model)),
      el("td", {}, d.kind),
      el("td", {}, d.owner),
      el("td", {}, d.site),
      el("td", {}, pill(d.vstate, `vs-${d.vstate}`)),
      el("td", {}, d.days_to_due === null ? "—" : Math.floor(d.days_to_due)),
      el("td", {}, fmtTime(d.last_seen)),
      el("td", {}, d.open_alerts.join(", ")))))));
}

// ---- coverage -----------------------------------------------------------------------

function coverageTable(by, rows) {
  return el("table", { id: `coverage-${by}` },
    el("thead", {}, el("tr", {}, [by, "Registered", "In use", "Verified", "Coverage", ""].map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((r) => {
      const pct = r.coverage_pct;
      const bar = el("div", { class: "bar", title: `target ${r.target_pct}%` },
        el("i", { class: pct !== null && pct < r.target_pct ? "below" : "", style: `width:${pct === null ? 0 : pct}%` }),
        el("b", { style: `left:${r.target_pct}%` }));
      return el("tr", {}, el("td", {}, r.key), el("td", {}, r.registered), el("td", {}, r.in_use), el("td", {}, r.verified),
        el("td", {}, pct === null ? "—" : `${pct.toFixed(1)} %`), el("td", {}, bar));
    })));
}

async function pageCoverage() {
  const view = $("#view");
  view.dataset.page = "coverage";
  view.replaceChildren(el("h1", {}, "Verification coverage"), el("p", { class: "muted" }, "Instruments that reported in the last day with a valid certificate, against the 92 % target."));
  for (const by of ["site", "kind", "owner"]) {
    const body = await api(`/api/coverage?by=${by}`);
    view.append(el("h2", {}, `By ${by}`), coverageTable(by, body.items));
  }
}

// ---- one instrument -----------------------------------------------------------------

function chart(points, { band = null, label = "" } = {}) {
  const W = 800, H = 220, P = 32;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  const add = (tag, attrs, text) => {
    const n = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  if (points.length === 0) {
    add("text", { x: W / 2 - 80, y: H / 2 }, "waiting for readings…");
    return svg;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (band) { y0 = Math.min(y0, -band * 1.2); y1 = Math.max(y1, band * 1.2); }
  if (y0 === y1) { y0 -= 1; y1 += 1; }
  const x0 = Math.min(...xs), x1 = Math.max(...xs) === x0 ? x0 + 1 : Math.max(...xs);
  const X = (x) => P + ((x - x0) / (x1 - x0)) * (W - 2 * P);
  const Y = (y) => H - P - ((y - y0) / (y1 - y0)) * (H - 2 * P);
  if (band) {
    add("rect", { class: "band", x: P, y: Y(band), width: W - 2 * P, height: Y(-band) - Y(band) });
    add("line", { class: "limit", x1: P, x2: W - P, y1: Y(band), y2: Y(band) });
    add("line", { class: "limit", x1: P, x2: W - P, y1: Y(-band), y2: Y(-band) });
    add("text", { x: W - P + 2, y: Y(band) + 3 }, "+MPE");
    add("text", { x: W - P + 2, y: Y(-band) + 3 }, "−MPE");
  }
  add("line", { class: "axis", x1: P, x2: W - P, y1: H - P, y2: H - P });
  add("text", { x: 2, y: Y(y1) + 4 }, fmtNum(y1, 3));
  add("text", { x: 2, y: Y(y0) + 4 }, fmtNum(y0, 3));
  add("text", { x: P, y: H - 8 }, fmtTime(x0));
  add("text", { x: W - P - 110, y: H - 8 }, fmtTime(x1));
  add("text", { x: P + 4, y: 14 }, label);
  add("path", { class: "line", d: points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("") });
  return svg;
}

const PRIMARY = { scale: "gross_kg", dispenser: "totalizer_l", energy_meter: "energy_kwh" };

async function pageDevice(id) {
  const view = $("#view");
  view.dataset.page = "device";
  const d = await api(`/api/devices/${encodeURIComponent(id)}`);
  const field = (k, v) => el("div", {}, el("span", {}, k), v === null || v === undefined || v === "" ? "—" : v);
  const charts = el("div", { id: "charts" });
  view.replaceChildren(
    el("h1", {}, `${d.id} `, pill(d.vstate, `vs-${d.vstate}`)),
    el("div", { class: "grid", id: "device-facts" },
      field("Kind", d.kind), field("Model / serial", `${d.model} / ${d.serial}`), field("Owner", d.owner), field("Site", d.site),
      field("Agent", d.agent), field("Class", d.accuracy_class ?? (d.mpe_pct !== null ? `${d.mpe_pct} %` : null)),
      field("Max / e", d.max !== null ? `${d.max} kg / ${d.e} kg` : null),
      field("Certificate", d.certificate ? `${d.certificate.certificate} (${d.certificate.result})` : null),
      field("Valid until", d.certificate ? fmtTime(d.certificate.valid_until) : null),
      field("Days to due", d.days_to_due === null ? null : Math.floor(d.days_to_due)),
      field("Last seen", fmtTime(d.last_seen)), field("Readings / gaps", `${d.readings} / ${d.gaps}`),
      field("Drift r (EWMA)", fmtNum(d.drift.r_ewma, 3)), field("CUSUM + / −", `${fmtNum(d.drift.cusum_pos)} / ${fmtNum(d.drift.cusum_neg)}`),
      field("Days to |r| = 1", fmtNum(d.drift.days_to_limit, 0)), field("Open alerts", d.open_alerts.join(", "))),
    el("h2", {}, "Recent readings"), charts,
    el("h2", {}, "Certificates"),
    el("table", {}, el("thead", {}, el("tr", {}, ["Certificate", "Verified", "Valid until", "Result", "Verifier", "Seal counter", "k-factor"].map((h) => el("th", {}, h)))),
      el("tbody", {}, d.certificates.slice().reverse().map((c) => el("tr", {},
        el("td", {}, c.certificate), el("td", {}, fmtTime(c.verified_at)), el("td", {}, fmtTime(c.valid_until)),
        el("td", {}, c.result), el("td", {}, c.verifier), el("td", {}, c.event_counter ?? "—"), el("td", {}, c.k_factor ?? "—"))))));
  const refresh = async () => {
    if (view.dataset.page !== "device") return;
    const r = await api(`/api/devices/${encodeURIComponent(id)}/readings`);
    const name = PRIMARY[d.kind] && r.readings.some((x) => x.values[PRIMARY[d.kind]] !== undefined)
      ? PRIMARY[d.kind]
      : Object.keys((r.readings[0] || { values: {} }).values).find((k) => typeof r.readings[0].values[k] === "number");
    const pts = name ? r.readings.filter((x) => typeof x.values[name] === "number").map((x) => [x.ts, x.values[name]]) : [];
    charts.replaceChildren(
      chart(pts, { label: name || "" }),
      chart(r.r, { band: 1, label: `normalised error r = error / MPE${r.r_source ? " (" + r.r_source + ")" : ""}` }));
  };
  await refresh();
  state.timer = setInterval(() => refresh().catch(() => {}), 2000);
}

// ---- routing ------------------------------------------------------------------------

async function route() {
  if (!state.token) return showLogin("");
  if (state.timer) { clearInterval(state.timer); state.timer = null; }
  const hash = location.hash || "#/alerts";
  const [path, qs] = hash.slice(1).split("?");
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", hash.startsWith(a.getAttribute("href")));
  try {
    if (path.startsWith("/device/")) await pageDevice(decodeURIComponent(path.slice(8)));
    else if (path === "/devices") await pageDevices(qs || "");
    else if (path === "/coverage") await pageCoverage();
    else pageAlerts();
  } catch (e) {
    $("#view").replaceChildren(el("p", { class: "error" }, e.message));
  }
}

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (ev) => { ev.preventDefault(); signIn($("#token-input").value.trim()); });
  $("#logout").addEventListener("click", () => signOut(""));
  const m = location.hash.match(/token=([A-Za-z0-9_]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname + "#/alerts");
    signIn(m[1]);
  } else if (localStorage.getItem("cw_token")) {
    signIn(localStorage.getItem("cw_token"));
  } else {
    showLogin("");
  }
});
