/* nsd's web view: task list, a live task page (SSE over fetch, so the bearer token goes in a header) and
   the cluster. Plain JS, no build step; every text goes in via textContent, never as HTML. */
"use strict";

const TERMINAL = new Set(["done", "failed", "cancelled"]);
const main = document.getElementById("main");
let leave = () => {};  // stops what the current page runs (polling, an event stream)

function token() { return localStorage.getItem("nsd-token") || ""; }
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (token()) h.Authorization = "Bearer " + token();
  return h;
}
function say(text) { document.getElementById("message").textContent = text || ""; }

async function api(path, options) {
  const r = await fetch(path, Object.assign({}, options, { headers: headers() }));
  if (r.status === 401) { say("This gateway needs a token: enter it above."); throw new Error("401"); }
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).error || why; } catch (e) { /* not JSON */ }
    say(why); throw new Error(why);
  }
  say("");
  return r.json();
}

function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick") node.onclick = v; else if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}
const fmt = v => (v === null || v === undefined) ? "–" : (typeof v === "number" ? Number(v.toPrecision(6)).toString() : String(v));
const badge = state => h("span", { class: "state " + state, "data-state": state }, state);

function best(task) {
  const m = (task.trials || []).map(t => t.metric).filter(v => v !== null && v !== undefined && isFinite(v));
  if (!m.length) return null;
  return task.goal && task.goal.higher_is_better === false ? Math.min(...m) : Math.max(...m);
}

/* The task view after one event: the same fold as nsd.client.view.apply_event. */
function applyEvent(task, ev) {
  if (ev.kind === "snapshot") return structuredClone(ev.task);
  task = structuredClone(task);
  task.seq = ev.seq;
  if (ev.kind === "state") {
    task.state = ev.state;
    for (const k of ["met_goal", "error"]) if (k in ev) task[k] = ev[k];
    if (ev.winner !== null && ev.winner !== undefined) {
      const w = task.trials[ev.winner];
      task.winner = { index: w.index, config: w.config, label: w.label, stage: w.stage, fallback: w.fallback, metric: w.metric,
                      figures: w.figures, measured_on: w.measured_on, pruned: w.pruned, deploy: w.deploy };
    }
  } else if (ev.kind === "plan") {
    task.baseline = ev.baseline;
    task.baseline_figures = ev.baseline_figures || null;
    task.baseline_on = ev.baseline_on || null;
    task.trials = ev.trials.map(t => Object.assign({}, t, { state: "pending", metric: null, attempt: 1, worker: null,
                                                             seconds: null, error: null }));
  } else if (ev.kind === "baseline") {  // the FP32 metric (and figures), evaluated beside the first trials
    task.baseline = ev.baseline;
    task.baseline_figures = ev.baseline_figures || null;
    task.baseline_on = ev.baseline_on || null;
  } else if (ev.kind === "stage") {  // the fallback search added a stage's trials (README: the fallback search)
    task.trials = task.trials.concat(ev.trials.map(t => Object.assign({}, t, { state: "pending", metric: null, attempt: 1,
                                                                               worker: null, seconds: null, error: null })));
  } else if (ev.kind === "trial") {
    const t = task.trials[ev.index];
    for (const k of ["state", "metric", "attempt", "worker", "seconds", "error", "bound", "stopped_early", "interval",
                     "refine", "cached", "figures", "measured_on", "pruned", "deploy"]) if (k in ev) t[k] = ev[k];
  }
  return task;
}

/* Deployment figures (README "Deployment figures"): the fastest measured form of a figures map, and bytes for people. */
function fastest(figures) {
  const forms = (figures && figures.forms) || [];
  return forms.length ? forms.reduce((a, b) => (b.p50_ms < a.p50_ms ? b : a)) : null;
}
function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB"]; let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return i ? `${n.toFixed(1)} ${units[i]}` : `${n} B`;
}

/* Server-Sent Events read from a fetch body; on a dropped connection it resumes with Last-Event-ID. */
function follow(taskId, onEvent) {
  const abort = new AbortController();
  let last = null;
  (async () => {
    while (!abort.signal.aborted) {
      let ended = false;
      try {
        const extra = last === null ? {} : { "Last-Event-ID": String(last) };
        const r = await fetch(`/v1/tasks/${encodeURIComponent(taskId)}/events`, { headers: headers(extra), signal: abort.signal });
        if (!r.ok) { say(r.status === 401 ? "This gateway needs a token: enter it above." : `events: ${r.status}`); return; }
        const reader = r.body.getReader(), decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
            const fields = {};
            for (const line of block.split("\n")) { const i = line.indexOf(": "); if (i > 0) fields[line.slice(0, i)] = line.slice(i + 2); }
            if (!fields.data) continue;
            last = Number(fields.id);
            const ev = JSON.parse(fields.data);
            ended = onEvent(ev) || ended;
          }
        }
      } catch (e) {
        if (abort.signal.aborted) return;
      }
      if (ended) return;
      await new Promise(res => setTimeout(res, 1000));  // the stream broke before the end: resume
    }
  })();
  return () => abort.abort();
}

async function showTasks() {
  main.replaceChildren(h("h1", {}, "Tasks"), h("p", { class: "muted" }, "Loading…"));
  const details = new Map();  // task_id -> full view, for best-so-far (finished tasks are kept)
  const draw = async () => {
    const { tasks } = await api("/v1/tasks");
    const rows = [];
    for (const t of tasks.slice().reverse().slice(0, 100)) {  // the newest hundred
      if (!details.has(t.task_id) || !TERMINAL.has(details.get(t.task_id).state)) {
        try { details.set(t.task_id, await api(`/v1/tasks/${encodeURIComponent(t.task_id)}`)); } catch (e) { /* gone */ }
      }
      const full = details.get(t.task_id) || {};
      const pct = t.trials_total ? Math.round(100 * t.trials_done / t.trials_total) : 0;
      rows.push(h("tr", { "data-task": t.task_id },
        h("td", {}, h("a", { href: `#/task/${t.task_id}` }, t.task_id)), h("td", {}, t.name), h("td", {}, badge(t.state)),
        h("td", {}, h("div", { class: "bar", title: `${t.trials_done}/${t.trials_total}` }, h("span", { style: `width:${pct}%` }))),
        h("td", { class: "num" }, `${t.trials_done}/${t.trials_total}`), h("td", { class: "num" }, fmt(best(full))),
        h("td", {}, full.winner ? `${full.winner.label} (${fmt(full.winner.metric)})` : "–")));
    }
    main.replaceChildren(h("h1", {}, "Tasks"), tasks.length ? h("table", { id: "tasks" },
      h("thead", {}, h("tr", {}, ["task", "name", "state", "progress", "trials", "best so far", "winner"].map(c => h("th", {}, c)))),
      h("tbody", {}, rows)) : h("p", { class: "muted" }, "No tasks yet: submit one (nsd submit, POST /v1/tasks or gRPC Submit)."));
  };
  let timer = null, live = true;
  const loop = async () => { try { await draw(); } catch (e) { /* said already */ } if (live) timer = setTimeout(loop, 2000); };
  loop();
  return () => { live = false; clearTimeout(timer); };
}

function showTask(taskId) {
  let task = null;
  const facts = h("div", { class: "facts" }), chart = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  chart.id = "chart";
  const tradeoff = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  tradeoff.id = "tradeoff";  // metric against latency, size as the marker, the Pareto set drawn (chart.js)
  const cancel = h("button", { class: "danger", id: "cancel" }, "Cancel");
  const download = h("button", { id: "download", disabled: "" }, "Download model, result and README (tar)");
  const table = h("table", { id: "trials" });
  main.replaceChildren(h("h1", {}, "Task ", h("span", { id: "task-id" }, taskId)), facts, h("div", { class: "actions" }, cancel, download), chart, tradeoff, table);
  cancel.onclick = async () => { cancel.disabled = true; try { await api(`/v1/tasks/${encodeURIComponent(taskId)}/cancel`, { method: "POST" }); } catch (e) { cancel.disabled = false; } };
  download.onclick = async () => {
    const r = await fetch(`/v1/tasks/${encodeURIComponent(taskId)}/artifact`, { headers: headers() });
    if (!r.ok) { say(`download: ${r.status}`); return; }
    const url = URL.createObjectURL(await r.blob());
    const a = h("a", { href: url, download: `nsd-${taskId}.tar` }); document.body.append(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  };
  const render = () => {
    const fact = (name, value, id, wide) => h("div", { class: wide ? "fact wide" : "fact" }, h("b", {}, name), h("span", { id }, value));
    const done = task.trials.filter(t => !["pending", "running"].includes(t.state)).length;
    facts.replaceChildren(
      fact("name", task.name), fact("state", badge(task.state), "state"), fact("trials", `${done}/${task.trials.length}`, "progress"),
      fact("baseline", fmt(task.baseline)), fact("goal", `${task.goal.criterion} loss ≤ ${task.goal.tolerable_loss}`),
      fact("best so far", fmt(best(task)), "best"),
      fact("winner", task.winner ? `#${task.winner.index} ${task.winner.label} (${fmt(task.winner.metric)})` : "–", "winner", true),
      fact("met goal", fmt(task.met_goal)), ...(task.error ? [fact("error", task.error)] : []),
      ...figureFacts(task, fact));
    cancel.disabled = TERMINAL.has(task.state);
    if (task.artifact) download.removeAttribute("disabled"); else download.setAttribute("disabled", "");
    const extra = ["stage", "fallback"].filter(k => task.trials.some(t => t[k] !== undefined && t[k] !== null
                                                                       && !(Array.isArray(t[k]) && !t[k].length) && t[k] !== "config"));
    const measured = task.trials.some(t => t.deploy);
    const front = new Set(paretoFront(task).map(t => t.index));
    const figureCells = t => !measured ? [] : [
      h("td", { class: "num latency" }, t.deploy ? `${fmt(t.deploy.latency_ms)} ms` : "–"),
      h("td", { class: "num speedup" }, t.deploy && t.deploy.speedup ? `${t.deploy.speedup.toFixed(2)}×` : "–"),
      h("td", { class: "num size" }, t.deploy ? bytes(t.deploy.size_bytes) : "–"),
      h("td", { class: "num memory" }, t.deploy ? bytes(t.deploy.peak_bytes) : "–"),
      h("td", { class: "pareto" }, front.has(t.index) ? "★" : (t.pruned ? "not evaluated" : ""))];
    table.replaceChildren(
      h("thead", {}, h("tr", {}, ["#", "config", ...extra, "state", "metric",
                                  ...(measured ? ["latency", "speed-up", "size", "peak memory", "Pareto"] : []),
                                  "worker", "seconds", "attempt"].map(c => h("th", {}, c)))),
      h("tbody", {}, task.trials.map(t => h("tr", { "data-index": t.index, "data-state": t.state, class: task.winner && task.winner.index === t.index ? "winner" : null },
        h("td", { class: "num" }, t.index), h("td", {}, t.label), ...extra.map(k => h("td", {}, fmt(Array.isArray(t[k]) ? t[k].join(", ") : t[k]))),
        h("td", {}, badge(t.state)), h("td", { class: "num" }, fmt(t.metric)), ...figureCells(t), h("td", {}, fmt(t.worker)),
        h("td", { class: "num" }, t.seconds === null ? "–" : t.seconds.toFixed(2)), h("td", { class: "num" }, t.attempt)))));
    drawChart(chart, task);
    tradeoff.style.display = measured ? "" : "none";
    if (measured) drawTradeoff(tradeoff, task);
  };
  return follow(taskId, ev => {
    task = applyEvent(task, ev);
    if (ev.kind === "state" && TERMINAL.has(ev.state) && !task.artifact) {
      // The final event does not carry the artifact: one read of the view (no trials: they are paged) fills it in.
      api(`/v1/tasks/${encodeURIComponent(taskId)}?limit=0`).then(v => { task.artifact = v.artifact; render(); }).catch(() => {});
    }
    render();
    return TERMINAL.has(task.state);
  });
}

function brokers(pair) {
  /* A broker pair: which one serves, and how far behind the other one's copy is. */
  const peer = pair.peer;
  const other = peer ? [h("span", {}, ` · ${peer.role} `), badge(peer.state),
    h("span", { class: "muted" }, peer.behind == null ? "" : ` ${peer.behind} behind`),
    h("span", { class: "muted" }, peer.whole ? "" : " (catching up)")] : [h("span", { class: "muted" }, " · its peer is not heard")];
  return h("p", { id: "brokers" }, h("span", {}, `${pair.role} `), badge(pair.state),
    h("span", { class: "muted" }, ` epoch ${pair.epoch}`), ...other);
}

/* The facts the figures add: FP32's latency and size, the objective, the winner's speed-up (README "JSON output"). */
function figureFacts(task, fact) {
  const fp32 = fastest(task.baseline_figures), w = task.winner && task.winner.deploy;
  const out = [];
  if (task.objective && task.objective !== "first") out.push(fact("objective", typeof task.objective === "string" ? task.objective
    : Object.entries(task.objective).map(([k, v]) => `${v}×${k}`).join(" + "), "objective"));
  if (fp32) out.push(fact("FP32", `${fmt(fp32.p50_ms)} ms, ${bytes(task.baseline_figures.size_bytes)}`, "fp32"));
  if (w) out.push(fact("winner deployed", `${fmt(w.latency_ms)} ms${w.speedup ? `, ${w.speedup.toFixed(2)}× FP32` : ""}, ${bytes(w.size_bytes)}`,
                       "deployed", true));
  return out;
}

async function showCluster() {
  const draw = async () => {
    const { workers, pair } = await api("/v1/cluster");
    main.replaceChildren(h("h1", {}, "Cluster"), pair ? brokers(pair) : "", workers.length ? h("table", { id: "workers" },
      h("thead", {}, h("tr", {}, ["worker", "host", "state", "cores", "slots", "busy", "running"].map(c => h("th", {}, c)))),
      h("tbody", {}, workers.map(w => h("tr", { "data-worker": w.worker_id },
        h("td", {}, w.worker_id), h("td", {}, w.host), h("td", {}, badge(w.state || "")), h("td", { class: "num" }, w.cores),
        h("td", { class: "num" }, w.slots), h("td", { class: "num" }, w.busy), h("td", {}, (w.running || []).join(", ") || "–")))))
      : h("p", { class: "muted" }, "No workers registered."));
  };
  let timer = null, live = true;
  const loop = async () => { try { await draw(); } catch (e) { /* said already */ } if (live) timer = setTimeout(loop, 2000); };
  loop();
  return () => { live = false; clearTimeout(timer); };
}

async function route() {
  leave();
  const hash = location.hash || "#/";
  const m = hash.match(/^#\/task\/([^/]+)$/);
  if (m) leave = showTask(decodeURIComponent(m[1]));
  else if (hash === "#/cluster") leave = await showCluster();
  else leave = await showTasks();
}

document.getElementById("token").value = token();
document.getElementById("token-form").onsubmit = e => {
  e.preventDefault();
  localStorage.setItem("nsd-token", document.getElementById("token").value.trim());
  route();
};
window.addEventListener("hashchange", route);
route();
