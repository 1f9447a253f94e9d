// vigil's dashboard: polls /api/state once a second and redraws. No framework, no build step.
"use strict";

const history = new Map(); // chain -> [{t, p50, max}], the last minute
const HISTORY_MS = 60000;
let lastTasks = "";

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c === undefined || c === null ? "" : String(c)));
  return e;
}
const ms = (v) => (v === undefined || v === null ? "–" : Number(v).toFixed(v < 10 ? 2 : 1));
const tag = (text, cls) => el("span", { class: "tag " + (cls || "") }, text);
function fill(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...rows);
}

function sparkline(points, bound, deadline) {
  const W = 260, H = 36, ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("width", W); svg.setAttribute("height", H);
  const top = Math.max(1e-9, ...points.map((p) => p.max), bound || 0, deadline || 0) * 1.1;
  const now = Date.now();
  const x = (t) => W - ((now - t) / HISTORY_MS) * W;
  const y = (v) => H - (v / top) * H;
  const line = (v, color) => {
    if (!v) return;
    const l = document.createElementNS(ns, "line");
    l.setAttribute("x1", 0); l.setAttribute("x2", W); l.setAttribute("y1", y(v)); l.setAttribute("y2", y(v));
    l.setAttribute("stroke", color); l.setAttribute("stroke-dasharray", "4 3");
    svg.append(l);
  };
  line(bound, "#1f5fa8");
  line(deadline, "#c0392b");
  for (const [key, color] of [["max", "#c0392b"], ["p50", "#1e8449"]]) {
    if (points.length < 2) continue;
    const p = document.createElementNS(ns, "polyline");
    p.setAttribute("points", points.map((q) => `${x(q.t).toFixed(1)},${y(q[key]).toFixed(1)}`).join(" "));
    p.setAttribute("fill", "none"); p.setAttribute("stroke", color); p.setAttribute("stroke-width", "1.5");
    svg.append(p);
  }
  return svg;
}

function render(s) {
  const st = s.status || {};
  const verdict = document.getElementById("verdict");
  if (s.error) {
    verdict.textContent = "stale: " + s.error; verdict.className = "stale";
  } else if (st.ok) {
    verdict.textContent = "ok"; verdict.className = "ok";
  } else {
    verdict.textContent = "attention"; verdict.className = "bad";
  }
  document.getElementById("leader").textContent = st.leader ? `${st.leader.id} (generation ${st.leader.generation})` : "none";
  document.getElementById("failed").textContent = st.failed && st.failed.length ? st.failed.join(", ") : "none";
  document.getElementById("scenario").textContent = s.scenario || "–";
  document.getElementById("served").textContent = s.served_by || "–";
  document.getElementById("updated").textContent = s.at_ms ? new Date(s.at_ms).toLocaleTimeString() : "–";
  if (!st.hosts) return;

  fill("hosts", st.hosts.map((h) => {
    const failed = (st.failed || []).includes(h.host) || h.fenced;
    const state = failed ? tag("failed", "bad") : h.heartbeat !== null ? tag("up", "ok") : tag("silent", "warn");
    return el("tr", { "data-host": h.host, "data-state": failed ? "failed" : h.heartbeat !== null ? "up" : "silent" },
      el("td", {}, h.host), el("td", { class: "state" }, state), el("td", { class: "num" }, h.heartbeat ?? "–"), el("td", {}, h.agent_pid ? `pid ${h.agent_pid}` : "–"));
  }));

  fill("vms", st.vms.map((v) => {
    const f = v.figures;
    const repl = v.replication === "-" ? "–" : tag(v.replication, v.replication === "protected" ? "ok" : "bad");
    return el("tr", { "data-vm": v.vm, "data-host": v.host || "" },
      el("td", { title: v.detail }, v.vm), el("td", {}, v.mode), el("td", { class: "host" }, v.host || "stopped"), el("td", {}, v.backup || "–"),
      el("td", {}, v.serving ? tag("yes", "ok") : tag("no", "bad")),
      el("td", { class: "num exec" }, v.jobs && v.jobs.jobs > 0 ? (v.wcet_us && v.jobs.exec_p99_us > v.wcet_us
        ? el("span", { class: "bad" }, `${v.jobs.exec_p99_us.toFixed(0)} / ${v.wcet_us.toFixed(0)}`)
        : `${v.jobs.exec_p99_us.toFixed(0)} / ${v.wcet_us ? v.wcet_us.toFixed(0) : "–"}`) : "–"),
      el("td", {}, repl),
      el("td", { class: "policy" }, f ? f.policy : "–"),
      el("td", { class: "num" }, f ? f.per_second.toFixed(1) : "–"),
      el("td", { class: "num" }, f ? `${ms(f.pause_mean_ms)} / ${ms(f.pause_max_ms)}` : "–"),
      el("td", { class: "num" }, f ? `${ms(f.output_delay_mean_ms)} / ${ms(f.output_delay_max_ms)}` : "–"),
      el("td", { class: "num device" }, v.jobs && v.jobs.device_samples > 0
        ? `${v.jobs.device_p50_us.toFixed(0)} / ${v.jobs.device_max_us.toFixed(0)}` : "–"));
  }));

  const bounds = new Map(((st.plan || {}).chains || []).map((c) => [c.chain, c]));
  const now = Date.now();
  const chains = [...new Set([...Object.keys(st.measured || {}), ...bounds.keys()])].sort();
  fill("chains", chains.map((c) => {
    const m = (st.measured || {})[c];
    const b = bounds.get(c) || {};
    if (m && m.window > 0) {
      const h = history.get(c) || [];
      if (!h.length || h[h.length - 1].at !== m.at_ms) h.push({ t: now, at: m.at_ms, p50: m.p50_ms, max: m.max_ms });
      while (h.length && now - h[0].t > HISTORY_MS) h.shift();
      history.set(c, h);
    }
    const above = (st.above_bound || []).includes(c);
    const late = m && m.deadline_ms && m.max_ms > m.deadline_ms;
    const verdict = above ? tag("above its bound", "bad") : late ? tag("late", "bad") : b.status ? tag(b.status, b.status === "ok" ? "ok" : "bad") : "–";
    return el("tr", { "data-chain": c },
      el("td", {}, c), el("td", {}, m ? m.vm : "–"),
      el("td", { class: "num" }, m ? ms(m.p50_ms) : "–"), el("td", { class: "num" }, m ? ms(m.p99_ms) : "–"), el("td", { class: "num" }, m ? ms(m.max_ms) : "–"),
      el("td", { class: "num" }, ms(b.worst_ms)), el("td", { class: "num" }, ms(b.deadline_ms ?? (m && m.deadline_ms))),
      el("td", { class: "num" }, m ? `${m.over_deadline} / ${m.failures}` : "–"), el("td", {}, verdict),
      el("td", {}, sparkline(history.get(c) || [], b.worst_ms, b.deadline_ms ?? (m && m.deadline_ms))));
  }));

  const inForce = (s.scenario || "none");
  fill("plans", (st.plans || []).map((p) => {
    const name = p.failed.length ? p.failed.join("+") : "none";
    const bad = p.chains.filter((c) => c.status !== "ok").map((c) => `${c.chain}: ${c.status}`);
    return el("tr", { class: name === inForce ? "inforce" : "", "data-scenario": name },
      el("td", {}, name === inForce ? `${name} (in force)` : name), el("td", {}, tag(p.coverage, p.coverage === "covered" ? "ok" : "warn")),
      el("td", { class: "what" }, p.actions.length ? p.actions.join("; ") : "nothing to do"),
      el("td", {}, bad.length ? el("span", { class: "bad" }, bad.join(", ")) : el("span", { class: "ok" }, `${p.chains.length} hold`)));
  }));

  fill("events", (st.events || []).slice().reverse().map((e) =>
    el("tr", {}, el("td", {}, new Date(e.at_ms).toLocaleTimeString()), el("td", {}, e.source), el("td", { class: "what" }, e.what))));

  const tasks = s.tasks || [];
  const key = tasks.map((t) => t.task).join(",");
  const select = document.getElementById("task");
  if (key !== lastTasks) {
    const keep = select.value;
    select.replaceChildren(...tasks.map((t) => el("option", { value: t.task }, `${t.task} (${t.resource || "?"})`)));
    if (tasks.some((t) => t.task === keep)) select.value = keep;
    lastTasks = key;
    showPlot(tasks, s.scenario);
  }
}

function showPlot(tasks, scenario) {
  const select = document.getElementById("task");
  const t = tasks.find((x) => x.task === select.value);
  document.getElementById("wcrt").textContent = t ? `worst-case response ${ms(t.wcrt_ms)} ms` : "";
  const img = el("img", { alt: `curves of ${select.value}`, src: `/plot/${encodeURIComponent(select.value)}.svg?plan=${encodeURIComponent(scenario || "")}` });
  document.getElementById("plot").replaceChildren(t ? img : "no analysis");
}

let lastState = {};
async function poll() {
  try {
    const r = await fetch("/api/state", { cache: "no-store" });
    lastState = await r.json();
    render(lastState);
  } catch (e) {
    const v = document.getElementById("verdict");
    v.textContent = "manager unreachable"; v.className = "stale";
  }
  setTimeout(poll, 1000);
}
document.getElementById("task").addEventListener("change", () => showPlot(lastState.tasks || [], lastState.scenario));
poll();
